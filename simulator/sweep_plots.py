"""Plots of many runs: the Pareto plot of `sim sweep` and the search plot of `sim capacity`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(point: dict) -> str:
    return ", ".join(f"{p.split('.')[-1]}={v}" for p, v in point.items()) or "scenario"


def pareto_plot(out: Path, axes: list[str], rows: list[dict], name: str = "pareto.png") -> None:
    """Throughput vs p95 TTFT of the worst streamed class, one dot per point; points that meet the scenario's
    SLO (p95 of every class within its `slo`, at most 1 % shed) filled, the others hollow; the Pareto front
    (no other point has both more throughput and lower TTFT) joined by a line."""
    plt = _plt()
    pts = [r for r in rows if r["scope"] == "overall" and r.get("ttft_p95_streamed_s") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pts:
        x = np.array([r["ttft_p95_streamed_s"] * 1000 for r in pts])
        y = np.array([r["requests_per_s"] for r in pts])
        feas = np.array([bool(r.get("slo_feasible")) for r in pts])
        ax.scatter(x[feas], y[feas], s=45, color="tab:green", label="meets the scenario's SLO", zorder=3)
        ax.scatter(x[~feas], y[~feas], s=45, facecolors="none", edgecolors="tab:red", label="misses it", zorder=3)
        order = np.lexsort((-y, x))
        front, best = [], -np.inf
        for i in order:
            if y[i] > best:
                front.append(i)
                best = y[i]
        ax.plot(x[front], y[front], color="black", lw=1, ls="--", marker="o", ms=11, mfc="none", zorder=2,
                label="Pareto front (no point has more throughput at lower TTFT)")
        for k, (r, xi, yi) in enumerate(zip(pts, x, y)):  # staggered, so points close together stay readable
            ax.annotate(_label({a: r[a] for a in axes}), (xi, yi), fontsize=6, xytext=(4, 4 - 9 * (k % 3)),
                        textcoords="offset points")
        ax.margins(x=0.25, y=0.12)
        slo = pts[0].get("slo_ttft_s")
        if slo is not None:
            ax.axvline(slo * 1000, color="tab:red", ls=":", lw=1, label=f"TTFT SLO {slo * 1000:g} ms")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no point has a streamed class with completed requests", ha="center", transform=ax.transAxes)
    ax.set(xlabel="TTFT p95, worst streamed class (ms)", ylabel="throughput (completed requests/s)",
           title="Sweep: throughput vs TTFT p95 per point")
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)


def capacity_plot(path: Path, result: dict, configs, targets, mode: str) -> None:
    """One panel per SLO target (the worst class's value vs the searched rate or setting, the limit dashed), and
    one of SLO attainment and the share served; one colour per configuration; the answer (knee) a dotted line."""
    plt = _plt()
    panels = list(targets) + ["attainment"]
    ncol = 2 if len(panels) > 1 else 1
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axs = plt.subplots(nrow, ncol, figsize=(6 * ncol, 3.2 * nrow), squeeze=False)
    key = "offered_per_s" if mode == "rate" else "value"
    xlabel = "offered load (requests/s)" if mode == "rate" else f"{result['vary']}"
    for ax, panel in zip(axs.flat, panels):
        for j, (c, d) in enumerate(zip(configs, result["configs"])):
            col = COLORS[j % len(COLORS)]
            rows = sorted(c.probes, key=lambda r: r[key])
            x = np.array([r[key] for r in rows], dtype=float)
            met = np.array([r["met"] for r in rows])
            lab = _label(c.point)
            if panel == "attainment":
                ax.plot(x, [100 * (r["slo_attainment"] or 0) for r in rows], color=col, marker=".",
                        label=f"{lab}: SLO attainment")
                ax.plot(x, [100 * r["ok"] / max(r["generated"], 1) for r in rows], color=col, ls="--",
                        label=f"{lab}: completed ok")
            else:
                scale = 100 if panel.metric == "shed" else 1000
                y = np.array([np.nan if r[panel.name] is None else r[panel.name] * scale for r in rows])
                ax.plot(x, y, color=col, lw=1, label=lab)
                ax.scatter(x[met], y[met], color=col, s=18, zorder=3)
                ax.scatter(x[~met], y[~met], facecolors="none", edgecolors=col, s=18, zorder=3)
            ans = d.get("offered_per_s") if mode == "rate" else d.get("value")
            if (d.get("rate_x") if mode == "rate" else d.get("value")) is not None:
                ax.axvline(ans, color=col, ls=":", lw=1.2)
                ax.annotate(f"knee {ans:.3g}", (ans, 1), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=7, color=col, ha="right", va="top")
        if panel == "attainment":
            ax.set(ylabel="% of generated requests", title="SLO attainment (scenario slo) and completed share")
            ax.set_ylim(-3, 103)
        else:
            unit = "%" if panel.metric == "shed" else "ms"
            scale = 100 if panel.metric == "shed" else 1000
            ax.axhline(panel.limit * scale, color="tab:red", ls="--", lw=1, label=f"SLO {panel.limit * scale:g} {unit}")
            what = "shed (queue full, degraded, timeout, error)" if panel.metric == "shed" else \
                f"{panel.metric.upper().replace('QUEUE_WAIT', 'queue wait')} {panel.stat}"
            scope = panel.scope or ("worst streamed class" if panel.metric in ("ttft", "tpot") else "worst class")
            ax.set(ylabel=f"{unit}", title=f"{what}, {scope}")
            if panel.metric != "shed":
                from matplotlib.ticker import NullFormatter, ScalarFormatter
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[len(panels):]:
        ax.remove()
    fig.suptitle(f"sim capacity: {result['scenario']} (filled: every SLO met; hollow: missed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
