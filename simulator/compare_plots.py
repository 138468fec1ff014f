"""The CDF plots of `sim compare`: one figure per metric, one panel per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import CDF_METRICS


def cdf_plots(cmp, out: Path) -> list[str]:
    """One figure per metric, one panel per class (A solid, B dashed; a regression of one class is not hidden
    in a pooled curve), the SLO limit dotted where the scenario has one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    classes = sorted(set(cmp.a.classes) | set(cmp.b.classes))
    streamed = {}
    for run in (cmp.a, cmp.b):
        for c, g in run.df.groupby("class_name", sort=True):
            streamed[str(c)] = bool(g["stream"].iloc[0])
    slo = (cmp.a.summary.get("goodput") or {}).get("slo") or {}
    for m in CDF_METRICS:
        shown = [c for c in classes if m != "tpot" or streamed.get(c, True)]
        ncol = min(3, max(len(shown), 1))
        nrow = (max(len(shown), 1) + ncol - 1) // ncol
        fig, axs = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
        for ax, cls in zip(axs.flat, shown):
            for run, style in ((cmp.a, "-"), (cmp.b, "--")):
                ok = run.df[(run.df["outcome"] == "ok") & (run.df["class_name"] == cls)]
                x = np.sort(ok[f"{m}_s"].dropna().to_numpy(dtype=float) * 1000)
                if x.size:
                    keep = np.unique(np.linspace(0, x.size - 1, min(x.size, 4000)).round().astype(int))
                    ax.plot(x[keep], (keep + 1) / x.size, style, label=f"{run.label} (n={x.size})")
            limit = slo.get(f"{m}_s")
            if limit is not None and (m == "e2e" or streamed.get(cls, True)):
                ax.axvline(limit * 1000, color="red", ls=":", lw=1, label=f"SLO {limit * 1000:g} ms")
            what = "whole response" if m == "ttft" and not streamed.get(cls, True) else m.upper()
            ax.set(xlabel=f"{what} (ms, log scale)", ylabel="share of completed requests",
                   title=f"{cls}{'' if streamed.get(cls, True) else ' (non-streamed)'}")
            if ax.lines:
                ax.set_xscale("log")
                ax.legend(fontsize=6, loc="lower right")
            ax.grid(alpha=0.3)
        for ax in list(axs.flat)[len(shown):]:
            ax.remove()
        fig.suptitle(f"{m.upper()} CDF per class: {cmp.a.label} (solid) vs {cmp.b.label} (dashed)", fontsize=10)
        fig.tight_layout()
        name = f"cdf_{m}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names
