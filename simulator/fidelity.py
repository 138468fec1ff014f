"""The fidelity table of `sim replay`: a simulated replay next to the measured run it replays.

Signed error = (sim − measured) / measured, in %, of p50/p90/p95/p99 TTFT, TPOT, ITL and E2E and of
throughput (ok requests/s, output tokens/s), overall and per class, over the ok requests of each run's
measured window (the numbers each summary.json states, read through simulator/compare.py); outcome
counts beside them. fidelity_timeseries.png puts running and waiting requests and TTFT over time side
by side (what "running" and "waiting" mean depends on what the run measured; the plot's title says).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import OVERALL, Run, _values, load_run
from .metrics import group_percentile
from .records import read_csv

METRICS = ("ttft", "tpot", "itl", "e2e")
PCTS = ("p50", "p90", "p95", "p99")
THROUGHPUT = (("throughput.requests_per_s", "throughput (req/s)"), ("throughput.output_tokens_per_s", "throughput (output tok/s)"))


def err_pct(measured, sim):
    if measured is None or sim is None or measured == 0:
        return None
    return round(100.0 * (sim - measured) / measured, 3)


def _counts(run: Run, scope: str) -> dict:
    o = run.summary["requests"]["outcomes"] if scope == OVERALL else run.summary["outcomes_by_class"].get(scope, {})
    ok = int(o.get("ok", 0))
    return {"ok": ok, "errors": int(sum(v for k, v in o.items() if k not in ("ok", "not_sent"))),
            "not_sent": int(o.get("not_sent", 0)),
            "error_outcomes": {k: int(v) for k, v in sorted(o.items()) if k not in ("ok", "not_sent")}}


def table(measured: Run, sim: Run) -> dict:
    """{scope: {"metrics": {key: {measured, sim, error_pct}}, "counts": {measured: .., sim: ..}}}."""
    scopes = [OVERALL] + sorted(set(measured.classes) | set(sim.classes))
    out = {}
    for scope in scopes:
        # TTFT is first tokens' (streamed requests'): a rate-limited non-streamed class's few whole-response
        # times must not decide a run's p95 (report.md and the verdict never pool them either)
        vm, vs = _values(measured, scope, PCTS), _values(sim, scope, PCTS)
        keys = [f"{m}.{p}" for m in METRICS for p in PCTS if f"{m}.{p}" in vm] + [k for k, _ in THROUGHPUT]
        out[scope] = {"metrics": {k: {"measured": vm.get(k), "sim": vs.get(k), "error_pct": err_pct(vm.get(k), vs.get(k))}
                                  for k in keys},
                      "counts": {"measured": _counts(measured, scope), "sim": _counts(sim, scope)}}
    return out


def per_request(mdf: pd.DataFrame, sdf: pd.DataFrame) -> dict:
    """Requests ok in both runs, matched by id: the median and p90 of |sim − measured| per latency."""
    j = mdf[mdf["outcome"] == "ok"].merge(sdf[sdf["outcome"] == "ok"], on="request_id", suffixes=("_m", "_s"))
    out = {"matched_ok": int(len(j))}
    for m in ("ttft", "tpot", "e2e"):
        d = (j[f"{m}_s_s"] - j[f"{m}_s_m"]).abs().dropna().to_numpy(dtype=float)
        out[m] = {"p50_abs_s": round(float(np.percentile(d, 50)), 6), "p90_abs_s": round(float(np.percentile(d, 90)), 6)} if d.size else None
    return out


# ------------------------------------------------------------------ time series
def _occupancy(starts, ends, grid) -> np.ndarray:
    """How many [start, end) intervals hold each time in grid."""
    s = np.sort(starts[np.isfinite(starts)])
    e = np.sort(ends[np.isfinite(ends)])
    return np.searchsorted(s, grid, side="right") - np.searchsorted(e, grid, side="right")


def _phases(df: pd.DataFrame, until_s: str, grid) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy of (arrival -> arrival + df[until_s]) as waiting and (that -> end) as running; a missing end
    counts as the arrival, a missing middle as the end, and the middle never passes the end."""
    d = df[df["arrival_s"].notna()]
    a = d["arrival_s"].to_numpy(dtype=float)
    end = d["end_s"].to_numpy(dtype=float)
    end = np.where(np.isfinite(end), end, a)
    mid = a + d[until_s].to_numpy(dtype=float)
    mid = np.where(np.isfinite(mid), np.minimum(mid, end), end)
    return _occupancy(mid, end, grid), _occupancy(a, mid, grid)


def client_view(df: pd.DataFrame, grid) -> tuple[np.ndarray, np.ndarray]:
    """waiting = sent, no token yet (send -> first token); running = receiving tokens (first token -> end)."""
    return _phases(df, "ttft_s", grid)


def server_view(df: pd.DataFrame, grid) -> tuple[np.ndarray, np.ndarray]:
    """The simulator's own: waiting = admitted, not yet scheduled (arrival -> first prefill); running = first
    prefill -> end (as vLLM's num_requests_running / num_requests_waiting)."""
    return _phases(df, "queue_wait_s", grid)


def timeseries(run_folder, measured_df: pd.DataFrame, sim_df: pd.DataFrame) -> dict:
    samples = run_folder.samples if run_folder is not None else pd.DataFrame()
    usable = len(samples) and samples[["running", "waiting"]].notna().any().any()
    if usable:
        grid = samples["t_s"].to_numpy(dtype=float)
        mr = samples["running"].to_numpy(dtype=float)
        mw = samples["waiting"].to_numpy(dtype=float)
        sr, sw = server_view(sim_df, grid)
        what = ("server gauges: measured = server.json samples (running / waiting as the server reports them); "
                "sim = requests between first prefill and end / between arrival and first prefill")
    else:
        last = float(np.nanmax([measured_df["end_s"].max(), sim_df["end_s"].max(), measured_df["arrival_s"].max()]))
        step = max(last / 600.0, 0.01)
        grid = np.arange(0.0, last + step, step)
        mr, mw = client_view(measured_df, grid)
        sr, sw = client_view(sim_df, grid)
        what = ("client view (no server samples in the run): running = requests receiving tokens (first token -> end), "
                "waiting = requests sent with no token yet (send -> first token), in both")
    return {"t": grid, "measured_running": mr, "measured_waiting": mw, "sim_running": sr, "sim_waiting": sw,
            "what": what, "source": "server.json" if usable else "requests.csv"}


def plot(path: Path, ts: dict, measured_df: pd.DataFrame, sim_df: pd.DataFrame, labels=("measured", "sim")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    t = ts["t"]
    for ax, key, name in ((axes[0], "running", "running"), (axes[1], "waiting", "waiting")):
        if ts["source"] == "server.json":  # instantaneous samples about 1 s apart
            ax.plot(t, ts[f"measured_{key}"], color="black", lw=1.2, marker="o", ms=3, label=f"{labels[0]} (server samples)")
            ax.plot(t, ts[f"sim_{key}"], color="tab:orange", lw=1.2, ls="--", marker="x", ms=4, label=f"{labels[1]} (at the same times)")
        else:
            ax.step(t, ts[f"measured_{key}"], where="post", color="black", lw=1.2, label=labels[0])
            ax.step(t, ts[f"sim_{key}"], where="post", color="tab:orange", lw=1.2, ls="--", label=labels[1])
        ax.set_ylabel(f"{name} requests")
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title(("server gauges" if ts["source"] == "server.json" else "client view") + ": "
                      + ("running = in the engine, waiting = queued" if ts["source"] == "server.json"
                         else "running = receiving tokens, waiting = sent, no token yet"), fontsize=9)
    ax = axes[2]
    span = max(float(t[-1]) if len(t) else 1.0, 1e-3)
    width = max(span / 60.0, 0.1)
    for df, color, ls, label in ((measured_df, "black", "-", labels[0]), (sim_df, "tab:orange", "--", labels[1])):
        ok = df[(df["outcome"] == "ok") & df["ttft_s"].notna()]
        x = ok["arrival_s"].to_numpy(dtype=float)
        y = ok["ttft_s"].to_numpy(dtype=float) * 1000
        if not x.size:
            continue
        pick = np.linspace(0, x.size - 1, min(x.size, 3000)).astype(int)
        ax.scatter(x[pick], y[pick], s=6, color=color, alpha=0.35, lw=0)
        bins, p50 = group_percentile((x // width).astype(int), y, 50)
        ax.plot((np.asarray(bins) + 0.5) * width, p50, color=color, ls=ls, lw=1.5, label=f"{label} TTFT p50 per {width:.2g} s")
    ax.set(xlabel="time since the run's start (s)", ylabel="TTFT (ms), by send time")
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ outputs
def _fmt(key: str, x):
    if x is None:
        return "–"
    return f"{x:.3f}" if key.startswith("throughput") else f"{x * 1000:.2f}"


def _pct(x):
    return "–" if x is None else f"{x:+.1f} %"


def markdown(report: dict) -> str:
    r = report
    L = [f"# Fidelity: replay of `{r['measured']}`", "",
         f"Simulated with engine `{r['engine']}`, profile `{r['profile']}` ({r['server_kind']} server); "
         f"{r['replayed']} requests replayed at their measured send times, {r['left_out']} never sent left out. "
         "Error = (sim − measured) / measured; latencies in ms over `ok` requests of each run's measured window.", ""]
    pc = r.get("prefix_cache")
    if pc:
        L += [f"The server's prefix cache served {pc['hit_pct']:g} % of the run's prompt tokens ({pc['hit_tokens']:,} of "
              f"{pc['queried_tokens']:,}, its counters); the replay knew which requests for {pc['attributed_tokens']:,} "
              "(client.csv prefix_cached_tokens)" + (": the rest were computed in full, so prefill is over-predicted."
                                                     if pc["hit_tokens"] > 1.1 * pc["attributed_tokens"] + 100 else "."), ""]
    ov = r["table"]["overall"]["metrics"]
    L += ["## Overall error at a glance", "", "| | " + " | ".join(PCTS) + " |", "|---|" + "---:|" * len(PCTS)]
    for m in METRICS:
        if any(f"{m}.{p}" in ov for p in PCTS):
            L.append(f"| {m.upper()} | " + " | ".join(_pct((ov.get(f"{m}.{p}") or {}).get("error_pct")) for p in PCTS) + " |")
    L += ["", "Throughput: " + ", ".join(f"{k.split('.')[1]} {_pct(ov[k]['error_pct'])}" for k, _ in THROUGHPUT if k in ov) + ".", ""]

    def errs(c):
        return f"{c['errors']}" + (f" ({', '.join(f'{k} {v}' for k, v in c['error_outcomes'].items())})" if c["errors"] else "")
    for scope, d in r["table"].items():
        cm, cs = d["counts"]["measured"], d["counts"]["sim"]
        L += [f"## {scope}", "", f"ok: measured {cm['ok']}, sim {cs['ok']}; errors: measured {errs(cm)}, sim {errs(cs)}"
              + (f"; not sent (measured, left out): {cm['not_sent']}" if cm["not_sent"] else ""), "",
              "| metric | measured | sim | error |", "|---|---:|---:|---:|"]
        for k, v in d["metrics"].items():
            name = dict(THROUGHPUT).get(k, f"{k} (ms)")
            L.append(f"| {name} | {_fmt(k, v['measured'])} | {_fmt(k, v['sim'])} | {_pct(v['error_pct'])} |")
        L.append("")
    pr = r["per_request"]
    L += ["## Request by request", "", f"{pr['matched_ok']} requests ok in both runs, matched by id: |sim − measured| "
          + "; ".join(f"{m.upper()} median {pr[m]['p50_abs_s'] * 1000:.2f} ms, p90 {pr[m]['p90_abs_s'] * 1000:.2f} ms"
                      for m in ("ttft", "tpot", "e2e") if pr.get(m)) + ".", ""]
    L += ["## Over time", "", f"![fidelity_timeseries.png](fidelity_timeseries.png)", "", f"Plotted: {r['timeseries']}", ""]
    return "\n".join(L)


def fidelity(run_folder, sim_dir: Path, out: Path, plots: bool = True, info: dict | None = None) -> dict:
    """Compare the run folder's measurement with the replay in `sim_dir`; write fidelity.md/.json (+ PNG)."""
    measured = load_run(run_folder.path, "measured")
    sim = load_run(sim_dir, "sim")
    info = info or {}
    mdf, sdf = read_csv(run_folder.path / "requests.csv"), read_csv(Path(sim_dir) / "requests.csv")
    shift = float(info.get("time_shift_s") or 0.0)
    if shift:  # back on the measured run's clock
        sdf = sdf.assign(arrival_s=sdf["arrival_s"] - shift, end_s=sdf["end_s"] - shift)
    ts = timeseries(run_folder, mdf, sdf)
    report = {"measured": run_folder.label, "sim": str(sim_dir), "engine": info.get("engine"),
              "profile": info.get("profile"), "server_kind": run_folder.kind,
              "replayed": info.get("requests_replayed"), "left_out": info.get("left_out_not_sent"),
              "table": table(measured, sim), "per_request": per_request(mdf, sdf), "timeseries": ts["what"]}
    pc = run_folder.prefix_cache()
    if pc is not None:
        col = run_folder.requests.get("prefix_cached_tokens")
        pc["attributed_tokens"] = int(pd.to_numeric(col, errors="coerce").fillna(0).sum()) if col is not None else 0
        report["prefix_cache"] = pc
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        plot(out / "fidelity_timeseries.png", ts, mdf, sdf)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    (out / "fidelity.md").write_text(markdown(report))
    return report


def headline(report: dict, scope: str = OVERALL) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, measured, sim, error %) rows of one scope, for a terminal table."""
    return [(k, v["measured"], v["sim"], v["error_pct"]) for k, v in report["table"][scope]["metrics"].items()
            if not (isinstance(v["error_pct"], float) and math.isnan(v["error_pct"]))]
