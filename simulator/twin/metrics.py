"""Live counters and latency histograms of the twin, as JSON or Prometheus text (exposition 0.0.4,
through prometheus_client): the project's own servesim_* metrics per outcome and class, beside
vLLM's names (prom.py).

Latencies are taken on the simulated clock, which is the server's wall clock since start, from the
same Request fields that become the record row; so /metrics and requests.csv agree.
"""
from __future__ import annotations

import math
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .prom import VllmMetrics

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)


class Histogram:
    __slots__ = ("counts", "sum", "count")

    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(BUCKETS):
            if x <= b:
                self.counts[i] += 1
                break
        self.sum += x
        self.count += 1

    def cumulative(self) -> list:
        out, c = [], 0
        for n in self.counts:
            c += n
            out.append(c)
        return out

    def as_dict(self) -> dict:
        return {"count": self.count, "sum": round(self.sum, 6),
                "buckets": {_le(b): c for b, c in zip(BUCKETS, self.cumulative())}}


def _le(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(b)


HISTS = {"ttft": "time to first token", "e2e": "end-to-end latency", "queue_wait": "queue wait",
         "tpot": "time per output token"}


class TwinMetrics:
    def __init__(self, world):
        self.outcomes: Counter = Counter()  # (outcome, class)
        self.rejections: Counter = Counter()  # (reason, priority)
        self.hist = {k: Histogram() for k in HISTS}
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.vllm = VllmMetrics(world)
        self.gauges: dict = {}  # set before each scrape
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Own(self))
        self.registry.register(self.vllm)

    def observe(self, req, finish_reason: str | None = None, times=None) -> None:
        self.outcomes[(req.outcome, req.class_name)] += 1
        if req.outcome.startswith("rejected_"):
            self.rejections[(req.outcome.removeprefix("rejected_"), req.priority)] += 1
        self.output_tokens += req.generated
        if req.start is not None:
            self.prompt_tokens += req.prompt
            self.hist["queue_wait"].observe(req.start - req.arrival)
        if req.outcome == "ok":
            self.hist["ttft"].observe(req.first_token - req.arrival)
            self.hist["e2e"].observe(req.end - req.arrival)
            if req.generated > 1:
                self.hist["tpot"].observe((req.last_token - req.first_token) / (req.generated - 1))
        self.vllm.observe(req, finish_reason, times)

    def as_dict(self, gauges: dict) -> dict:
        by_outcome: Counter = Counter()
        for (o, _), n in self.outcomes.items():
            by_outcome[o] += n
        return {"requests": {"total": sum(by_outcome.values()), "by_outcome": dict(sorted(by_outcome.items())),
                             "by_outcome_class": {f"{o}/{c}": n for (o, c), n in sorted(self.outcomes.items())}},
                "rejections": [{"reason": r, "priority": p, "count": n} for (r, p), n in sorted(self.rejections.items())],
                "tokens": {"prompt": self.prompt_tokens, "output": self.output_tokens},
                "latency_s": {k: h.as_dict() for k, h in self.hist.items()},
                "gauges": {k: v for k, (v, _) in gauges.items()}}

    def prometheus(self, gauges: dict) -> bytes:
        self.gauges = gauges
        return generate_latest(self.registry)


class _Own:
    """The servesim_* families, for prometheus_client's registry."""

    def __init__(self, m: TwinMetrics):
        self.m = m

    def collect(self):
        m = self.m
        c = CounterMetricFamily("servesim_requests", "Finished requests by outcome and class.", labels=["outcome", "class"])
        for (o, cl), n in sorted(m.outcomes.items()):
            c.add_metric([o, cl], n)
        yield c
        c = CounterMetricFamily("servesim_rejections", "Gateway rejections by reason and priority.",
                                labels=["reason", "priority"])
        for (r, p), n in sorted(m.rejections.items()):
            c.add_metric([r, str(p)], n)
        yield c
        yield CounterMetricFamily("servesim_prompt_tokens", "Prompt tokens of requests that began prefill.",
                                  value=m.prompt_tokens)
        yield CounterMetricFamily("servesim_output_tokens", "Generated tokens.", value=m.output_tokens)
        for k, h in m.hist.items():
            fam = HistogramMetricFamily(f"servesim_{k}_seconds", f"{HISTS[k].capitalize()} of completed requests, seconds.")
            fam.add_metric([], [(_le(b), c) for b, c in zip(BUCKETS, h.cumulative())], h.sum)
            yield fam
        for g, (v, help_) in m.gauges.items():
            yield GaugeMetricFamily(f"servesim_{g}", help_, value=float("nan") if v is None else v)
