"""SLO targets checked against a run's summary: `[CLASS:]METRIC.STAT=LIMIT`, as `sim capacity --slo` takes them.

    ttft.p95=0.5s   tpot.p95=50ms   vip_chat:e2e.p99=10s   shed=1%

METRIC is ttft, tpot, e2e or queue_wait with STAT p50, p90, p95, p99, mean or max (seconds: `0.5s`, `50ms`
or a bare number of seconds), or `shed`: the share of generated requests turned away for lack of capacity
(queue full, degraded, timed out or failed; a tenant's own rate limit or quota is policy, not capacity, and
does not count). Without a class, a target holds for every class it applies to: TTFT and TPOT only for
streamed classes (a non-streamed response's TTFT is its whole response time, so it is never pooled with a
first-token time), E2E, queue wait and shed for all. A class with no completed request misses every latency
target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

METRICS = ("ttft", "tpot", "e2e", "queue_wait")
STATS = ("p50", "p90", "p95", "p99", "mean", "max")
STREAMED_ONLY = ("ttft", "tpot")
SHED = ("rejected_queue_full", "rejected_degraded", "timeout", "http_error", "connection_error", "stream_error")
DEFAULT_SHED = 0.01
_NUM = re.compile(r"^([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|s|%)?$", re.I)


@dataclass(frozen=True)
class Target:
    scope: str | None  # a class name, or None: every class it applies to
    metric: str  # ttft/tpot/e2e/queue_wait or "shed"
    stat: str  # p95 ... ("share" for shed)
    limit: float  # seconds, or a share 0..1

    @property
    def name(self) -> str:
        base = "shed" if self.metric == "shed" else f"{self.metric}.{self.stat}"
        return f"{self.scope}:{base}" if self.scope else base

    def text(self) -> str:
        lim = f"{self.limit * 100:g} %" if self.metric == "shed" else fmt_s(self.limit)
        return f"{self.name} ≤ {lim}"


def fmt_s(x: float) -> str:
    return f"{x * 1000:g} ms" if x < 1 else f"{x:g} s"


def parse_targets(items: list[str] | None, where: str = "--slo", classes: list[str] | None = None) -> list[Target]:
    out: list[Target] = []
    for item in items or []:
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not val:
            raise InputError(where, item, "expected [CLASS:]METRIC.STAT=LIMIT, e.g. ttft.p95=0.5s or shed=1%")
        scope, _, what = key.rpartition(":")
        scope = scope or None
        if scope is not None and classes is not None and scope not in classes:
            raise InputError(where, item, f"unknown class {scope!r} (classes: {', '.join(classes)})")
        m = _NUM.match(val)
        if not m:
            raise InputError(where, item, f"not a limit: {val!r} (write 0.5s, 50ms or 1%)")
        num, unit = float(m.group(1)), (m.group(2) or "").lower()
        if what == "shed":
            if unit not in ("%", ""):
                raise InputError(where, item, "shed is a share: write 1% or 0.01")
            limit = num / 100 if unit == "%" else num
            if not 0 <= limit <= 1:
                raise InputError(where, item, "shed must be between 0 and 100 %")
            t = Target(scope, "shed", "share", limit)
        else:
            metric, _, stat = what.partition(".")
            if metric not in METRICS or stat not in STATS:
                raise InputError(where, item, f"unknown metric {what!r} (METRIC one of {', '.join(METRICS)}, shed; "
                                              f"STAT one of {', '.join(STATS)})")
            if unit == "%":
                raise InputError(where, item, "a latency limit is a time: write 0.5s or 50ms")
            limit = num / 1000 if unit == "ms" else num
            if limit <= 0:
                raise InputError(where, item, "the limit must be > 0")
            t = Target(scope, metric, stat, limit)
        if any(o.name == t.name for o in out):
            raise InputError(where, item, f"{t.name} is given twice")
        out.append(t)
    return out


def with_default_shed(targets: list[Target]) -> list[Target]:
    """A latency target alone is met by turning requests away: unless told otherwise, at most 1 % may be shed."""
    if any(t.metric == "shed" and t.scope is None for t in targets):
        return targets
    return targets + [Target(None, "shed", "share", DEFAULT_SHED)]


def scenario_targets(sc) -> list[Target]:
    """The scenario's own `slo` block as p95 targets (for marking SLO-feasible sweep points)."""
    out = [Target(None, m, "p95", getattr(sc.slo, f"{m}_s")) for m in ("ttft", "tpot", "e2e")
           if getattr(sc.slo, f"{m}_s", None) is not None]
    return with_default_shed(out)


def streamed_classes(sc) -> dict[str, bool]:
    return {c.name: bool(c.stream) for c in sc.workload.classes}


def class_value(summary: dict, target: Target, cls: str):
    if target.metric == "shed":
        o = summary["outcomes_by_class"].get(cls, {})
        gen = sum(o.values())
        return sum(o.get(k, 0) for k in SHED) / gen if gen else 0.0
    return summary["latency_by_class"].get(cls, {}).get(target.metric, {}).get(target.stat)


def applies(target: Target, cls: str, streamed: dict[str, bool]) -> bool:
    if target.scope is not None:
        return cls == target.scope
    return streamed.get(cls, True) or target.metric not in STREAMED_ONLY


def evaluate(summary: dict, targets: list[Target], streamed: dict[str, bool]) -> dict:
    """{target name: {"value": worst value over its classes, "class": that class, "met": bool}}; a class that
    generated requests but completed none has no latency (None) and misses."""
    res = {}
    for t in targets:
        worst, worst_cls, met = None, None, True
        for cls, d in summary["latency_by_class"].items():
            if not applies(t, cls, streamed) or d.get("generated", 0) == 0:
                continue
            v = class_value(summary, t, cls)
            if v is None:
                worst, worst_cls, met = None, cls, False
                break
            if worst is None or v > worst:
                worst, worst_cls = v, cls
            met = met and v <= t.limit + 1e-12
        res[t.name] = {"value": worst, "class": worst_cls, "met": met}
    return res


def all_met(result: dict) -> bool:
    return all(r["met"] for r in result.values())
