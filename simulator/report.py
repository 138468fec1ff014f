"""A run's report folder: requests.csv, summary.json, report.md, PNG plots, the resolved scenario.

The same writer serves `sim run`, `stress run` and the twin server.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .records import read_csv, write_csv
from .scenario import dump_scenario

PLOTS = ("ttft_cdf.png", "latency_over_time.png", "queue_and_level.png", "batch_size_hist.png", "outcomes_by_class.png")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_report(out: Path, scenario, rows: list, summary_fn, plots: bool = True, title: str = "sim run") -> dict:
    """Write the folder; `summary_fn(df)` builds the summary from the records DataFrame."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "requests.csv", rows)
    (out / "scenario.yaml").write_text(dump_scenario(scenario))
    df = read_csv(out / "requests.csv")
    summary = summary_fn(df)
    write_json(out / "summary.json", summary)
    if plots:
        write_plots(out, df, summary)
    (out / "report.md").write_text(markdown(summary, title, plots))
    return summary


def _fmt(x, scale=1000.0):
    return "–" if x is None else f"{x * scale:.1f}"


def markdown(s: dict, title: str, plots: bool = True) -> str:
    L = [f"# {title}: {s['scenario']} (seed {s['seed']}, source {s['source']})", ""]
    w = s["window"]
    since = f" from the first request at {w['warmup_from_s']:.3f} s" if "warmup_from_s" in w else ""
    L += [f"Measured window {w['start_s']:.3f}–{w['end_s']:.3f} s ({w['duration_s']:.3f} s); warm-up {w['warmup_s']} s{since} "
          f"excluded ({w['excluded_warmup']} requests). Latencies in ms; only `ok` requests enter them.", ""]
    r = s["requests"]
    L += ["## Outcomes", "", "| outcome | count | share |", "|---|---:|---:|"]
    for k, v in r["outcomes"].items():
        L.append(f"| {k} | {v} | {100 * v / max(r['generated'], 1):.1f} % |")
    L += ["", "| class | " + " | ".join(sorted({o for c in s["outcomes_by_class"].values() for o in c})) + " |"]
    outs = sorted({o for c in s["outcomes_by_class"].values() for o in c})
    L.append("|---|" + "---:|" * len(outs))
    for c, d in s["outcomes_by_class"].items():
        L.append(f"| {c} | " + " | ".join(str(d.get(o, 0)) for o in outs) + " |")
    L += ["", "## Latency (all classes)", "", "| metric | count | mean | p50 | p90 | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, d in s["latency"].items():
        L.append(f"| {m} | {d.get('count', 0)} | " + " | ".join(_fmt(d.get(k)) for k in ("mean", "p50", "p90", "p95", "p99", "max")) + " |")
    L += ["", "## Per class (p50 / p95 / p99, ms)", "", "| class | ok/generated | queue wait | TTFT | TPOT | E2E |", "|---|---:|---:|---:|---:|---:|"]
    for c, d in s["latency_by_class"].items():
        cells = ["/".join(_fmt(d[m].get(p)) for p in ("p50", "p95", "p99")) for m in ("queue_wait", "ttft", "tpot", "e2e")]
        L.append(f"| {c} | {d['ok']}/{d['generated']} | " + " | ".join(cells) + " |")
    t, g = s["throughput"], s["goodput"]
    L += ["", "## Throughput and goodput", "",
          f"- {t['requests_per_s']} requests/s, {t['output_tokens_per_s']} output tokens/s, {t['prompt_tokens_per_s']} prompt tokens/s",
          f"- goodput {g['requests_per_s']} requests/s under SLO {g['slo']}; {g['met']} requests met it; "
          f"SLO attainment {g['slo_attainment']} of all generated requests",
          f"- batch size: mean {s['batch_size'].get('mean')}, p95 {s['batch_size'].get('p95')}, max {s['batch_size'].get('max')}",
          f"- fairness (Jain over 1/mean {s['fairness']['basis']} per class): {s['fairness']['jain']}; "
          f"starvation (> {s['starvation']['threshold_s']} s): {s['starvation']['count']} {s['starvation']['by_class']}", ""]
    L += ["## Usage and cost", "", "| project | requests | ok | prompt tokens | output tokens | cost |", "|---|---:|---:|---:|---:|---:|"]
    for p, d in s["usage"]["by_project"].items():
        L.append(f"| {p} | {d['requests']} | {d['ok']} | {d['prompt_tokens']} | {d['output_tokens']} | {d['cost']} |")
    L += ["", "| user | requests | ok | prompt tokens | output tokens | cost |", "|---|---:|---:|---:|---:|---:|"]
    for p, d in s["usage"]["by_user"].items():
        L.append(f"| {p} | {d['requests']} | {d['ok']} | {d['prompt_tokens']} | {d['output_tokens']} | {d['cost']} |")
    for section in ("engine", "kv_cache", "prefix_cache", "stress"):
        if section in s:
            L += ["", f"## {section.replace('_', ' ').title()}", "", "```json", json.dumps(s[section], indent=1, sort_keys=True)[:4000], "```"]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS]
    return "\n".join(L) + "\n"


def _thin(n: int, most: int) -> np.ndarray:
    """Indices of at most `most` evenly spread items of n, always the first and the last."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(int))


def write_plots(out: Path, df: pd.DataFrame, s: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df[df["outcome"] == "ok"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for cls, g in ok.groupby("class_name", sort=True):
        x = np.sort(g["ttft_s"].to_numpy() * 1000)
        y = np.arange(1, x.size + 1) / x.size
        keep = _thin(x.size, 4000)  # a drawn CDF needs no more points; long runs have millions
        ax.plot(x[keep], y[keep], label=str(cls))
    ax.set(xlabel="TTFT (ms)", ylabel="CDF", title="TTFT CDF per class")
    ax.legend(fontsize=7) if len(ok) else None
    fig.tight_layout(); fig.savefig(out / PLOTS[0], dpi=90); plt.close(fig)

    ts = s["timeseries"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if ts.get("t"):
        ax.plot(ts["t"], [np.nan if v is None else v * 1000 for v in ts["ttft_p95"]], label="TTFT p95 (ms)")
        dots = ok.iloc[_thin(len(ok), 20000)]  # every request up to 20k, else an even sample of them
        ax.scatter(dots["end_s"], dots["e2e_s"] * 1000, s=2, alpha=0.3, color="gray",
                   label="E2E per request (ms)" if len(dots) == len(ok) else f"E2E, {len(dots):,} of {len(ok):,} requests (ms)")
    ax.set(xlabel="time (s)", ylabel="ms", title="Latency over time"); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(out / PLOTS[1], dpi=90); plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    if "queued" in ts:
        ax.plot(ts["t"], [np.nan if v is None else v for v in ts["queued"]], label="queued")
        ax.plot(ts["t"], [np.nan if v is None else v for v in ts.get("running", [])][: len(ts["t"])] or [np.nan] * len(ts["t"]), label="running")
        ax2 = ax.twinx()
        ax2.step(ts["t"], [np.nan if v is None else v for v in ts.get("level", [0] * len(ts["t"]))], color="red", where="post")
        ax2.set_ylabel("degradation level", color="red")
    else:
        ax.plot(ts.get("t", []), ts.get("arrivals", []), label="arrivals/s")
    ax.set(xlabel="time (s)", title="Queue depth and degradation level"); ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout(); fig.savefig(out / PLOTS[2], dpi=90); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    hist = s["batch_size"].get("histogram", {})
    ax.bar([int(k) for k in hist], list(hist.values()))
    ax.set(xlabel="batch size at first token", ylabel="requests", title="Batch size histogram")
    fig.tight_layout(); fig.savefig(out / PLOTS[3], dpi=90); plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    tab = pd.crosstab(df["class_name"], df["outcome"])
    if len(tab):
        tab.plot(kind="bar", stacked=True, ax=ax)
    ax.set(xlabel="class", ylabel="requests", title="Outcomes per class")
    fig.tight_layout(); fig.savefig(out / PLOTS[4], dpi=90); plt.close(fig)


def terminal_table(s: dict, console) -> None:
    from rich.table import Table
    t = Table(title=f"{s['scenario']} ({s['source']}, seed {s['seed']})")
    for col in ("class", "generated", "ok", "TTFT p50", "TTFT p95", "TPOT p95", "E2E p95", "wait p95"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for c, d in s["latency_by_class"].items():
        t.add_row(c, str(d["generated"]), str(d["ok"]), _fmt(d["ttft"].get("p50")), _fmt(d["ttft"].get("p95")),
                  _fmt(d["tpot"].get("p95")), _fmt(d["e2e"].get("p95")), _fmt(d["queue_wait"].get("p95")))
    console.print(t)
    console.print(f"outcomes {s['requests']['outcomes']}  throughput {s['throughput']['requests_per_s']} req/s, "
                  f"{s['throughput']['output_tokens_per_s']} tok/s  goodput {s['goodput']['requests_per_s']} req/s")
