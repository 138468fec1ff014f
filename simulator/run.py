"""`sim run`: scenario -> simulation -> report folder."""
from __future__ import annotations

from pathlib import Path

from .metrics import summarize
from .report import write_report
from .world import simulate


def engine_summary(result) -> dict:
    stats = result.engine_stats
    steps = sum(s["steps"] for s in stats)
    out = {"type": result.scenario.engine.type, "profile": result.scenario.engine.profile, "steps": steps,
           "simulated_s": round(result.sim_time, 6),
           "busy_share": round(sum(s["busy_s"] for s in stats) / max(result.sim_time * len(stats), 1e-9), 6),
           "replicas": stats}
    return out


def run_scenario(sc, out: Path, plots: bool = True, progress=None, fmt: str = "csv") -> tuple[dict, object]:
    result = simulate(sc, progress)
    return write_result(result, out, plots, fmt=fmt), result


def write_result(result, out: Path, plots: bool = True, more: dict | None = None, fmt: str = "csv") -> dict:
    """A simulation's report folder; `more` adds sections to summary.json."""
    sc = result.scenario
    extra = {"engine": engine_summary(result), **(more or {})}
    if getattr(result, "pool", None) is not None:
        extra["model_pool"] = result.pool
    for st in result.engine_stats:
        for key in ("kv_cache", "prefix_cache"):
            if key in st:
                extra.setdefault(key, []).append(st[key])
    return write_report(Path(out), sc, result.rows,
                        lambda df: summarize(df, sc, result.itl, result.series, "sim", extra), plots, fmt=fmt)
