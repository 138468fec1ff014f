"""The PNG plots of one run's report (sim, stress and twin alike). Every axis has a label with its unit, SLO
limits are drawn where they apply, classes get their own curves, and a plot of what the source cannot observe
(a client sees no engine queue and no batch sizes) is replaced by what it does see, or left out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TTFT_CDF, LATENCY, LOAD, BATCH, OUTCOMES = ("ttft_cdf.png", "latency_over_time.png", "queue_and_level.png",
                                            "batch_size_hist.png", "outcomes_by_class.png")
PLOTS = (TTFT_CDF, LATENCY, LOAD, BATCH, OUTCOMES)


def _thin(n: int, most: int) -> np.ndarray:
    """Indices of at most `most` evenly spread items of n, always the first and the last."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(int))


def _series(ts: dict, key: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in ts.get(key, [])][: len(ts["t"])], dtype=float)


def write_plots(out: Path, df: pd.DataFrame, s: dict) -> list[str]:
    """Writes the plots that have something to show; returns their file names in report order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df[df["outcome"] == "ok"]
    slo = s["goodput"]["slo"]
    streamed = {str(c): bool(g["stream"].iloc[0]) for c, g in df.groupby("class_name", sort=True)}
    classes = sorted(streamed)
    colour = {c: f"C{i % 10}" for i, c in enumerate(classes)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    if not len(ok):  # no completed request: no latency to draw, only what happened to the requests
        if len(df):
            _outcomes(plt, df, save)
        return written

    # 1. TTFT CDF per class; a non-streamed class's "first token" is its whole response
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cls, g in ok.groupby("class_name", sort=True):
        x = np.sort(g["ttft_s"].to_numpy() * 1000)
        y = np.arange(1, x.size + 1) / x.size
        keep = _thin(x.size, 4000)  # a drawn CDF needs no more points; long runs have millions
        lab = str(cls) if streamed[str(cls)] else f"{cls} (non-streamed: whole response)"
        ax.plot(x[keep], y[keep], label=lab, color=colour[str(cls)], ls="-" if streamed[str(cls)] else "--")
    if slo.get("ttft_s") is not None:
        ax.axvline(slo["ttft_s"] * 1000, color="red", ls=":", lw=1, label=f"TTFT SLO {slo['ttft_s'] * 1000:g} ms")
    if len(ok):
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="lower right")
    ax.set(xlabel="time to first token (ms, log scale)", ylabel="share of completed requests",
           title="TTFT CDF per class")
    ax.grid(alpha=0.3)
    save(fig, TTFT_CDF)

    # 2. latency over time: per-class TTFT p95 per second (streamed), E2E per request below, both with SLO lines
    ts = s["timeseries"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    bin_s = ts.get("bin_s", 1.0)
    for cls, g in ok.groupby("class_name", sort=True):
        if not streamed[str(cls)]:
            continue
        b = (g["end_s"] // bin_s).astype(int)
        p95 = g.groupby(b)["ttft_s"].quantile(0.95)
        a1.plot(p95.index * bin_s, p95.to_numpy() * 1000, color=colour[str(cls)], lw=1, label=str(cls))
    if slo.get("ttft_s") is not None:
        a1.axhline(slo["ttft_s"] * 1000, color="red", ls=":", lw=1, label="TTFT SLO")
    a1.set(ylabel="TTFT p95 per second (ms)", title="Latency over time (streamed classes' TTFT; every class's E2E)")
    a1.set_yscale("log")
    dots = ok.iloc[_thin(len(ok), 20000)]  # every request up to 20k, else an even sample of them
    for cls, g in dots.groupby("class_name", sort=True):
        a2.scatter(g["end_s"], g["e2e_s"], s=2, alpha=0.4, color=colour[str(cls)], label=str(cls))
    if slo.get("e2e_s") is not None:
        a2.axhline(slo["e2e_s"], color="red", ls=":", lw=1, label="E2E SLO")
    a2.set(xlabel="time since start (s)", ylabel="E2E latency (s)")
    note = "" if len(dots) == len(ok) else f" ({len(dots):,} of {len(ok):,} requests)"
    a2.set_title(f"E2E per completed request, at its completion{note}", fontsize=9)
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6, loc="upper left", markerscale=4)
        a.grid(alpha=0.3)
    save(fig, LATENCY)

    # 3. load: the server's queue, running requests and degradation level; a client sees only its own traffic
    fig, ax = plt.subplots(figsize=(8, 4))
    t = np.asarray(ts.get("t", []), dtype=float)
    if "queued" in ts:
        ax.plot(t, _series(ts, "queued"), label="queued (waiting for the engine)")
        if "running" in ts:
            ax.plot(t, _series(ts, "running"), label="running (in a batch)")
        ax.set(ylabel="requests (sampled each second)", title="Queue depth and degradation level")
        if "level" in ts:
            from matplotlib.ticker import MaxNLocator
            ax2 = ax.twinx()
            ax2.step(t, _series(ts, "level"), color="red", where="post", lw=1, alpha=0.7)
            ax2.plot([], [], color="red", lw=1, label="degradation level (right axis)")
            ax2.set_ylabel("degradation level (0 = normal)", color="red")
            ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax2.set_ylim(-0.1, max(1, np.nanmax(_series(ts, "level"), initial=0)) + 0.5)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", framealpha=0.9)
            ax.set_ylim(0, np.nanmax(np.r_[_series(ts, "queued"), _series(ts, "running"), 1]) * 1.35)
    elif len(t):
        for key, lab in (("arrivals", "sent"), ("completions", "completed ok"), ("rejections", "rejected"),
                         ("timeouts", "timed out")):
            if sum(ts.get(key, [])):
                ax.plot(t, np.asarray(ts[key], dtype=float) / bin_s, label=f"{lab} (req/s)", lw=1)
        sent = df[["arrival_s", "end_s"]].dropna().to_numpy(dtype=float)
        if len(sent):
            inflight = ((sent[:, :1] <= t[None, :]) & (sent[:, 1:] > t[None, :])).sum(axis=0) if len(sent) * len(t) < 5e7 \
                else None
            if inflight is not None:
                ax.plot(t, inflight, color="black", lw=1, ls="--", label="in flight at the client")
        ax.set(ylabel="requests/s, or requests in flight", title="Offered and completed load (client view; the "
                                                                  "server's queue is not observable)")
    ax.set_xlabel("time since start (s)")
    if ax.get_legend_handles_labels()[0] and "level" not in ts:
        ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    save(fig, LOAD)

    # 4. batch sizes, only where the engine's batches are known
    hist = s["batch_size"].get("histogram", {})
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([int(k) for k in hist], list(hist.values()))
        ax.set(xlabel="requests in the batch at the request's first token", ylabel="requests",
               title="Batch size at first token")
        save(fig, BATCH)

    _outcomes(plt, df, save)
    return written


def _outcomes(plt, df, save) -> None:
    """5. outcomes per class, with counts."""
    fig, ax = plt.subplots(figsize=(7, 4))
    tab = pd.crosstab(df["class_name"], df["outcome"])
    if len(tab):
        tab.plot(kind="bar", stacked=True, ax=ax, rot=0)
        ax.legend(fontsize=7, title="outcome", title_fontsize=7)
        for i, total in enumerate(tab.sum(axis=1)):
            ax.annotate(f"{total}", (i, total), ha="center", va="bottom", fontsize=7)
    ax.set(xlabel="class", ylabel="requests", title="Outcomes per class")
    save(fig, OUTCOMES)
