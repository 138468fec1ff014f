"""Summary statistics from records, as defined in METRICS.md (restated in the README).

Shared by `sim run`, `stress run` and `sim serve`: the input is the records DataFrame (the one
schema), the pooled inter-token gaps, and optional server-side time series.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

PCTS = (50, 90, 95, 99)
LATENCIES = ("queue_wait_s", "ttft_s", "tpot_s", "e2e_s")


def _r(x, nd=6):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, nd)


def dist(values, weights=None) -> dict:
    """count, mean, p50/p90/p95/p99, max. Unweighted: numpy's linear interpolation (METRICS.md);
    weighted (pooled ITL from the simulator, where one step gap stands for many tokens): inverted CDF."""
    v = np.asarray(values, dtype=float)
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        keep = ~np.isnan(v)
        v, w = v[keep], w[keep]
    else:
        v = v[~np.isnan(v)]
    if v.size == 0:
        return {"count": 0}
    if weights is None:
        ps = np.percentile(v, PCTS)
        return {"count": int(v.size), "mean": _r(v.mean()), **{f"p{p}": _r(x) for p, x in zip(PCTS, ps)}, "max": _r(v.max())}
    ps = np.percentile(v, PCTS, weights=w, method="inverted_cdf")
    return {"count": int(w.sum()), "mean": _r(np.average(v, weights=w)),
            **{f"p{p}": _r(x) for p, x in zip(PCTS, ps)}, "max": _r(v.max())}


def group_percentile(groups, values, q) -> tuple[list, list]:
    """(g, np.percentile(values[groups == g], q)) for every group g present, in one sort instead of a
    pass over all values per group (which made a long run's per-second series quadratic). numpy's
    "linear" method step for step: virtual index (n - 1) * q / 100, and its two-sided lerp."""
    groups = np.asarray(groups)
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [], []
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    n = np.diff(np.r_[starts, g.size])
    virtual = (n - 1) * (q / 100)
    prev = np.floor(virtual)
    gamma = virtual - prev
    lo = starts + prev.astype(np.intp)
    a, b = v[lo], v[np.minimum(lo + 1, starts + n - 1)]
    diff = b - a
    out = a + diff * gamma
    upper = gamma >= 0.5
    out[upper] = (b - diff * (1 - gamma))[upper]
    return g[starts].tolist(), out.tolist()


def jain(xs) -> float | None:
    xs = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=float)
    if xs.size == 0 or (xs ** 2).sum() == 0:
        return None
    return _r(xs.sum() ** 2 / (xs.size * (xs ** 2).sum()))


def slo_mask(ok: pd.DataFrame, slo) -> pd.Series:
    m = pd.Series(True, index=ok.index)
    if slo.ttft_s is not None:
        m &= ok["ttft_s"] <= slo.ttft_s
    if slo.tpot_s is not None:
        m &= ok["tpot_s"].fillna(0.0) <= slo.tpot_s  # 1-token outputs have no TPOT: nothing to miss
    if slo.e2e_s is not None:
        m &= ok["e2e_s"] <= slo.e2e_s
    return m


def counts(df: pd.DataFrame, by: str) -> dict:
    out = {}
    for key, g in df.groupby(by, sort=True):
        out[str(key)] = {str(k): int(v) for k, v in g["outcome"].value_counts().sort_index().items()}
    return out


def first_token_latency(summary: dict) -> dict:
    """A run's latency distributions over the requests whose TTFT is a first token: its streamed ones (a
    non-streamed response's TTFT is the whole response), or every request where none was streamed."""
    return (summary.get("latency_by_stream") or {}).get("streamed") or summary["latency"]


def summarize(df: pd.DataFrame, scenario, itl=None, series=None, source: str = "sim", extra: dict | None = None,
              origin: float = 0.0) -> dict:
    """The summary.json content. `itl` is (gaps, weights) pooled over requests; None -> from itl columns.
    The warm-up counts from `origin`: 0, the run's start, for the simulator and the stress tester; the twin
    server passes its first arrival, since its clock starts with the server, not with the load."""
    warm = scenario.warmup_s
    all_df = df
    df = df[df["arrival_s"] >= origin + warm] if warm > 0 else df
    ok = df[df["outcome"] == "ok"]
    start = float(df["arrival_s"].min()) if len(df) else 0.0
    end = float(ok["end_s"].max()) if len(ok) else start
    span = max(end - start, 1e-9)

    lat = {m.removesuffix("_s"): dist(ok[m]) for m in LATENCIES}
    if itl is not None and len(itl[0]):
        lat["itl"] = dist(itl[0], itl[1])
    else:
        lat["itl"] = {"count": 0}

    by_class = {}
    for cls, g in df.groupby("class_name", sort=True):
        gok = g[g["outcome"] == "ok"]
        by_class[str(cls)] = {
            "generated": int(len(g)), "ok": int(len(gok)),
            **{m.removesuffix("_s"): dist(gok[m]) for m in LATENCIES},
        }

    # TTFT of a non-streamed response is its whole response time: never pooled with streamed first tokens
    by_stream = {}
    for key, flag in (("streamed", 1), ("non_streamed", 0)):
        g = ok[ok["stream"] == flag]
        if (df["stream"] == flag).any():
            by_stream[key] = {"classes": sorted(str(c) for c in df.loc[df["stream"] == flag, "class_name"].unique()),
                              **{m.removesuffix("_s"): dist(g[m]) for m in LATENCIES}}

    good = ok[slo_mask(ok, scenario.slo)] if len(ok) else ok
    # a stress run cut short by --max-duration never sent the rest: they were not offered, so they are neither
    # met nor missed (an interrupted run's unsent requests still count as misses)
    errors = df["error"] if "error" in df else pd.Series("", index=df.index)
    cut = df["outcome"].eq("not_sent") & errors.fillna("").astype(str).str.startswith("--max-duration")
    offered = int(len(df) - cut.sum())
    slo_defined = any(getattr(scenario.slo, k) is not None for k in ("ttft_s", "tpot_s", "e2e_s"))

    # fairness: x = 1 / mean queue wait per class, or 1 / mean TTFT where the wait is unobservable
    wait_col = "queue_wait_s" if ok["queue_wait_s"].notna().any() else "ttft_s"
    per_class_mean = {str(c): float(g[wait_col].mean()) for c, g in ok.groupby("class_name", sort=True)}
    thr = scenario.slo.starvation_s
    starving = ok[ok[wait_col] > thr]

    bs = ok["batch_size"]
    bs = bs[bs > 0]
    usage = {}
    for key in ("project", "user"):
        u = {}
        for k, g in df.groupby(key, sort=True):
            u[str(k)] = {"requests": int(len(g)), "ok": int((g["outcome"] == "ok").sum()),
                         "prompt_tokens": int(g.loc[g["outcome"] == "ok", "prompt_tokens"].sum()),
                         "output_tokens": int(g["output_tokens"].sum()), "cost": _r(g["cost"].sum())}
        usage[f"by_{key}"] = u

    summary = {
        "scenario": scenario.name, "seed": scenario.seed, "source": source,
        "window": {"start_s": _r(start), "end_s": _r(end), "duration_s": _r(span), "warmup_s": warm,
                   **({"warmup_from_s": _r(origin)} if origin else {}), "excluded_warmup": int(len(all_df) - len(df))},
        "requests": {"generated": int(len(df)), "ok": int(len(ok)),
                     "outcomes": {str(k): int(v) for k, v in df["outcome"].value_counts().sort_index().items()}},
        "outcomes_by_class": counts(df, "class_name"),
        "outcomes_by_priority": counts(df, "priority"),
        "outcomes_by_class_priority": counts(df.assign(cp=df["class_name"] + "/p" + df["priority"].astype(str)), "cp"),
        "latency": lat,
        "latency_by_class": by_class,
        "latency_by_stream": by_stream,
        "throughput": {"requests_per_s": _r(len(ok) / span), "output_tokens_per_s": _r(ok["output_tokens"].sum() / span),
                       "prompt_tokens_per_s": _r(ok["prompt_tokens"].sum() / span)},
        "goodput": {"slo": {k: getattr(scenario.slo, k) for k in ("ttft_s", "tpot_s", "e2e_s")},
                    "requests_per_s": _r(len(good) / span) if slo_defined else _r(len(ok) / span),
                    "met": int(len(good)), "slo_attainment": _r(len(good) / offered) if offered else None,
                    "denominator": offered, **({"excluded_not_sent_max_duration": int(cut.sum())} if cut.any() else {})},
        "batch_size": {**dist(bs), "histogram": {str(int(k)): int(v) for k, v in bs.value_counts().sort_index().items()}},
        "fairness": {"basis": wait_col.removesuffix("_s"), "per_class_mean": {k: _r(v) for k, v in per_class_mean.items()},
                     "jain": jain([1.0 / max(v, 1e-6) for v in per_class_mean.values()])},
        "starvation": {"threshold_s": thr, "count": int(len(starving)),
                       "by_class": {str(k): int(v) for k, v in starving["class_name"].value_counts().sort_index().items()}},
        "usage": usage,
        "timeseries": timeseries(all_df, series),
    }
    if extra:
        summary.update(extra)
    return summary


def timeseries(df: pd.DataFrame, series: dict | None, bin_s: float = 1.0) -> dict:
    times = df[["arrival_s", "end_s"]].to_numpy(dtype=float)
    if len(df) == 0 or not np.isfinite(times).any():  # nothing sent (a stress run stopped in its start-up)
        return {"bin_s": bin_s, "t": []}
    last = float(np.nanmax(times))
    nb = int(last // bin_s) + 1
    edges = np.arange(nb + 1) * bin_s

    def hist(x):
        return np.histogram(np.asarray(x, dtype=float), bins=edges)[0].astype(int).tolist()
    ok = df[df["outcome"] == "ok"]
    rej = df[df["outcome"].str.startswith("rejected")]
    ts = {"bin_s": bin_s, "t": edges[:-1].tolist(), "arrivals": hist(df["arrival_s"]),
          "completions": hist(ok["end_s"]), "rejections": hist(rej["arrival_s"]),
          "timeouts": hist(df.loc[df["outcome"] == "timeout", "end_s"]),
          "output_tokens": np.histogram(ok["end_s"], bins=edges, weights=ok["output_tokens"])[0].astype(int).tolist()}
    idx = np.clip((ok["end_s"].to_numpy(dtype=float) // bin_s).astype(int), 0, nb - 1)
    p95 = [None] * nb
    for b, x in zip(*group_percentile(idx, ok["ttft_s"].to_numpy(dtype=float), 95)):
        p95[b] = _r(x)
    ts["ttft_p95"] = p95
    if series:
        for k in ("queued", "running", "level", "kv_util"):
            if k in series and len(series[k]):
                vals = np.asarray(series[k], dtype=float)
                ts[k] = [_r(v, 4) for v in vals[:nb]] + [None] * max(0, nb - len(vals))
    return ts
