"""A run's report folder: requests.csv, summary.json, report.md, PNG plots, the resolved scenario.

The same writer serves `sim run`, `stress run` and the twin server.
"""
from __future__ import annotations

import json
from pathlib import Path


from .records import read_csv, write_csv
from .scenario import dump_scenario

from .plots import PLOTS, write_plots  # noqa: F401  (PLOTS: the plot files a sim run writes)
from .verdict import fmt_ms, pct, slo_text, streamed_of, verdict_lines, verdict_short


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


FORMATS = ("csv", "parquet")


def write_report(out: Path, scenario, rows: list, summary_fn, plots: bool = True, title: str = "sim run",
                 fmt: str = "csv") -> dict:
    """Write the folder; `summary_fn(df)` builds the summary from the records DataFrame. fmt "parquet" writes
    requests.parquet instead of requests.csv: the same rows and dtypes as the CSV reads back, so the summary
    is the same whichever is written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "requests.csv", rows)
    (out / "scenario.yaml").write_text(dump_scenario(scenario))
    df = read_csv(out / "requests.csv")
    if fmt == "parquet":
        df.to_parquet(out / "requests.parquet", index=False)
        (out / "requests.csv").unlink()
    elif (out / "requests.parquet").exists():
        (out / "requests.parquet").unlink()  # a stale one would be read by load_run before the new CSV
    summary = summary_fn(df)
    write_json(out / "summary.json", summary)
    drawn = write_plots(out, df, summary) if plots else []
    (out / "report.md").write_text(markdown(summary, title, drawn))
    return summary


def _fmt(x, scale=1000.0):
    return "–" if x is None else f"{x * scale:.1f}"


def _n(x, nd=2) -> str:
    """A rate or a count for people: thousands separated, a few significant digits."""
    if x is None:
        return "–"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:,.{nd}f}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _lat_row(name: str, d: dict) -> list[str]:
    return [name, _n(d.get("count", 0)), *(fmt_ms(d.get(k)) for k in ("mean", "p50", "p90", "p95", "p99", "max"))]


def markdown(s: dict, title: str, plots=()) -> str:
    """report.md: the verdict first, then compact tables; every raw number stays in summary.json."""
    plots = list(PLOTS) if plots is True else list(plots or [])
    streamed = streamed_of(s)
    L = [f"# {title}: {s['scenario']} (seed {s['seed']}, source {s['source']})", "", "## Verdict", ""]
    L += verdict_lines(s, streamed)
    w = s["window"]
    since = f" from the first request at {w['warmup_from_s']:.2f} s" if "warmup_from_s" in w else ""
    win = ("nothing was sent" if w.get("start_s") is None else
           f"{w['start_s']:.2f}–{w['end_s']:.2f} s ({w['duration_s']:.1f} s)")
    L += ["", f"Measured window {win}; warm-up "
          f"{w['warmup_s']:g} s{since} excluded ({w['excluded_warmup']} requests). Only `ok` requests enter latencies. "
          "Every figure, unrounded, is in `summary.json`.", ""]
    r = s["requests"]
    outs = sorted({o for c in s["outcomes_by_class"].values() for o in c})
    gen = max(r["generated"], 1)
    L += ["## Outcomes (requests)", ""]
    rows = [[c, _n(sum(d.values())), *(_n(d.get(o, 0)) for o in outs)] for c, d in s["outcomes_by_class"].items()]
    rows.append(["**all**", _n(r["generated"]), *(f"{_n(r['outcomes'].get(o, 0))} ({r['outcomes'].get(o, 0) / gen * 100:.1f} %)"
                                               for o in outs)])
    L += _table(["class", "generated", *outs], rows)
    L += ["", "## Latency per class", "", "p50 / p95 / p99. A non-streamed class's TTFT is its whole response time.", ""]
    rows = []
    for c, d in s["latency_by_class"].items():
        trio = [" / ".join(fmt_ms(d[m].get(p)) for p in ("p50", "p95", "p99")) for m in ("queue_wait", "ttft", "tpot", "e2e")]
        if not streamed.get(c, True):
            trio[2] = "n/a"
        rows.append([c, "yes" if streamed.get(c, True) else "no", f"{d['ok']:,} / {d['generated']:,}", *trio])
    L += _table(["class", "streamed", "ok / generated", "queue wait", "TTFT", "TPOT", "E2E"], rows)
    L += ["", "## Latency of streamed and non-streamed classes", "",
          "Never pooled: the TTFT of a non-streamed response is its whole response time. ITL pools the gaps of "
          "streamed responses.", ""]
    rows = []
    for key, label in (("streamed", "streamed"), ("non_streamed", "non-streamed")):
        d = (s.get("latency_by_stream") or {}).get(key)
        if d:
            who = f"{label} ({', '.join(d['classes'])})"
            for m in ("queue_wait", "ttft", "tpot", "e2e"):
                if key == "non_streamed" and m == "tpot":
                    continue
                rows.append(_lat_row(f"{who}: {m.replace('_', ' ')}", d[m]))
    itl = s["latency"].get("itl", {})
    if itl.get("count"):
        rows.append(_lat_row("streamed: ITL (token gaps)", itl))
    L += _table(["metric", "count", "mean", "p50", "p90", "p95", "p99", "max"], rows)
    t, g = s["throughput"], s["goodput"]
    bs = s["batch_size"]
    L += ["", "## Throughput and goodput", "",
          f"- throughput {_n(t['requests_per_s'])} req/s completed, {_n(t['output_tokens_per_s'], 0)} output tokens/s, "
          f"{_n(t['prompt_tokens_per_s'], 0)} prompt tokens/s",
          f"- goodput {_n(g['requests_per_s'])} req/s within the SLO ("
          + slo_text(g["slo"]) + f" per request); {g['met']:,} requests met it: SLO attainment {pct(g['slo_attainment'])} of "
          f"{g.get('denominator', r['generated']):,} offered requests",
          (f"- batch size at first token: mean {bs['mean']:.1f}, p95 {bs['p95']:.0f}, max {bs['max']:.0f}" if bs.get("count")
           else "- batch size: not observable from this source"),
          f"- fairness (Jain over 1 / mean {s['fairness']['basis'].replace('_', ' ')} per class): "
          f"{'–' if s['fairness']['jain'] is None else format(s['fairness']['jain'], '.2f')}; starvation "
          f"(> {s['starvation']['threshold_s']:g} s): {s['starvation']['count']} requests"
          + ("" if not s["starvation"]["by_class"] else " (" + ", ".join(f"{k} {v}" for k, v in s["starvation"]["by_class"].items()) + ")"),
          ""]
    L += sections(s)
    L += ["## Usage and cost", ""]
    for key in ("project", "user"):
        rows = [[p, _n(d["requests"]), _n(d["ok"]), _n(d["prompt_tokens"]), _n(d["output_tokens"]), f"{d['cost']:.4f}"]
                for p, d in s["usage"][f"by_{key}"].items()]
        L += _table([key, "requests", "ok", "prompt tokens", "output tokens", "cost ($)"], rows) + [""]
    if plots:
        L += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def sections(s: dict) -> list[str]:
    """Engine, KV cache, prefix cache and stress-client figures as compact tables."""
    L = []
    eng = s.get("engine")
    if eng:
        sim = eng.get("simulated_s") or 0
        rows = [[str(i), _n(rep.get("steps")), pct(rep["busy_s"] / sim if sim else None, 0)]
                for i, rep in enumerate(eng.get("replicas") or []) if "busy_s" in rep]
        L += ["## Engine", "", f"{eng.get('type')} engine, profile `{eng.get('profile')}`, {_n(eng.get('steps'))} steps "
              f"over {_n(sim, 1)} simulated s, busy {pct(eng.get('busy_share'), 0)} of the time.", ""]
        L += _table(["replica", "steps", "busy"], rows) + [""]
    kv = s.get("kv_cache")
    if kv:
        rows = [[str(k.get("replica", i)), _n(k.get("capacity_tokens")), f"{k.get('peak_kv_gb', 0):.1f}",
                 pct(k.get("peak_util"), 0), pct(k.get("util_mean"), 0), _n(k.get("preemptions", 0)),
                 _n(k.get("rejected_too_large", 0)), pct(k.get("internal_fragmentation_mean"))]
                for i, k in enumerate(kv)]
        L += ["## KV cache", ""]
        L += _table(["replica", "capacity (tokens)", "peak KV (GB)", "peak use", "mean use", "preemptions",
                     "too large", "internal frag."], rows) + [""]
    pc = s.get("prefix_cache")
    if pc:
        rows = [[str(k.get("replica", i)), _n(k.get("lookups")), _n(k.get("hits")), pct(k.get("token_hit_rate")),
                 _n(k.get("prefill_tokens_saved")), _n(k.get("evicted_blocks"))] for i, k in enumerate(pc)]
        L += ["## Prefix cache", ""]
        L += _table(["replica", "lookups", "hits", "token hit rate", "prefill tokens saved", "evicted blocks"], rows) + [""]
    if s.get("model_pool"):
        L += ["## Model pool", "", "Per-model loads, evictions and queues are in `summary.json` (`model_pool`).", ""]
    st = s.get("stress")
    if st:
        lag, ttfb = st.get("lag_ms") or {}, st.get("ttfb_ms") or {}
        L += ["## Stress client", "",
              f"- {st.get('api')} against {st.get('base_url')}, {st.get('workers')} worker(s), concurrency "
              f"{st.get('concurrency') or 'unbounded'}; stop: {st.get('stop_reason') or 'all requests done'}",
              f"- sent {_n(st.get('sent_open_loop'))} of {_n(st.get('scheduled_open_loop'))} scheduled open-loop requests; "
              f"requested {_n(st.get('requested_rate'))} req/s, achieved {_n(st.get('achieved_rate'))} req/s",
              f"- schedule lag p50 {_n(lag.get('p50'), 3)} ms, p99 {_n(lag.get('p99'), 3)} ms, max {_n(lag.get('max'), 3)} ms"
              + (f"; time to first byte p50 {_n(ttfb.get('p50'), 1)} ms, p99 {_n(ttfb.get('p99'), 1)} ms" if ttfb else ""),
              "- " + ("**flagged**: " + "; ".join(st.get("warnings") or []) if st.get("flagged") else
                      "the client kept to its schedule (no accuracy warning)"), ""]
    return L


def terminal_table(s: dict, console) -> None:
    """Per class, latencies in ms, in 80 columns; the verdict's first line below."""
    from rich import box
    from rich.table import Table
    streamed = streamed_of(s)
    t = Table(title=f"{s['scenario']} ({s['source']}, seed {s['seed']}): latencies in ms", box=box.SIMPLE_HEAD,
              padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("class", "ok/gen", "wait p95", "TTFT p50", "TTFT p95", "TPOT p95", "E2E p95"):
        t.add_column(col, justify="right" if col != "class" else "left", no_wrap=col != "class", max_width=18)
    for c, d in s["latency_by_class"].items():
        name = c if streamed.get(c, True) else f"{c} (whole)"
        t.add_row(name, f"{d['ok']}/{d['generated']}", _ms(d["queue_wait"].get("p95")), _ms(d["ttft"].get("p50")),
                  _ms(d["ttft"].get("p95")), "n/a" if not streamed.get(c, True) else _ms(d["tpot"].get("p95")),
                  _ms(d["e2e"].get("p95")))
    console.print(t)
    th, g = s["throughput"], s["goodput"]
    console.print(f"throughput {_n(th['requests_per_s'])} req/s, {_n(th['output_tokens_per_s'], 0)} tok/s; goodput "
                  f"{_n(g['requests_per_s'])} req/s; SLO attainment {pct(g['slo_attainment'])}", highlight=False)
    console.print(verdict_short(s), highlight=False)


def _ms(x) -> str:
    return "–" if x is None else f"{x * 1000:,.0f}" if x >= 0.1 else f"{x * 1000:.1f}"
