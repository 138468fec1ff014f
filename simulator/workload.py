"""Scenario -> a deterministic request stream (same seed, same stream, in sim and stress tester).

Open-loop classes are generated up front as sorted numpy arrays; closed-loop classes draw their
lengths lazily but from their own generator in issue order, so the k-th request of a closed-loop
user class has the same lengths whoever sends it.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from .registry import Registry
from .scenario import Scenario, TrafficClass
from .traces import read_empirical, read_trace

ARRIVALS = Registry("arrival process")
LENGTHS = Registry("length distribution")


# ------------------------------------------------------------ arrival processes
# Each returns sorted arrival times in [0, horizon) and at most n of them.
def _cap(t: np.ndarray, horizon: float, n: int) -> np.ndarray:
    return t[t < horizon][:n]


def _renewal(rng, n_chunk, draw, horizon, n):
    out, t0 = [], 0.0
    while True:
        gaps = draw(rng, n_chunk)
        t = t0 + np.cumsum(gaps)
        out.append(t)
        t0 = t[-1]
        if t0 >= horizon or sum(len(x) for x in out) >= n:
            break
    return _cap(np.concatenate(out), horizon, n)


@ARRIVALS.register("poisson")
def poisson(spec, rng, horizon, n):
    return _renewal(rng, 4096, lambda r, k: r.exponential(1.0 / spec.rate, k), horizon, n)


@ARRIVALS.register("constant")
def constant(spec, rng, horizon, n):
    count = n if horizon == np.inf else min(n, int(np.ceil(horizon * spec.rate)) + 1)
    return _cap(np.arange(count) / spec.rate, horizon, n)


@ARRIVALS.register("gamma")
def gamma(spec, rng, horizon, n):
    shape = 1.0 / (spec.cv ** 2)  # mean gap 1/rate, CV as given
    scale = 1.0 / (spec.rate * shape)
    return _renewal(rng, 4096, lambda r, k: r.gamma(shape, scale, k), horizon, n)


def _thinned(rate_fn, rmax, rng, horizon, n):
    """Non-homogeneous Poisson by thinning (Lewis-Shedler)."""
    cand = _renewal(rng, 8192, lambda r, k: r.exponential(1.0 / rmax, k), horizon, np.iinfo(np.int64).max
                    if horizon != np.inf else n * 50)
    keep = rng.random(cand.size) * rmax < rate_fn(cand)
    return cand[keep][:n]


@ARRIVALS.register("onoff")
def onoff(spec, rng, horizon, n):
    period = spec.on_s + spec.off_s

    def rate(t):
        return np.where((t % period) < spec.on_s, spec.on_rate, spec.off_rate)
    return _thinned(rate, max(spec.on_rate, spec.off_rate), rng, _finite(horizon, n, spec.on_rate * spec.on_s / period), n)


@ARRIVALS.register("piecewise")
def piecewise(spec, rng, horizon, n):
    ts = np.array([p[0] for p in spec.points])
    rs = np.array([p[1] for p in spec.points])
    span = ts[-1]

    def rate(t):
        tt = (t % span) if spec.repeat else t
        return np.interp(tt, ts, rs, right=rs[-1] if spec.repeat else 0.0)
    mean = np.trapezoid(rs, ts) / span if span > 0 else rs.max()
    # a curve that does not repeat is zero after its last knot: draw no candidates past it (a short
    # spike in a long run would otherwise be thinned out of millions of candidates)
    h = horizon if spec.repeat else min(horizon, span)
    return _thinned(rate, rs.max(), rng, _finite(h, n, mean), n)


def _finite(horizon, n, mean_rate):
    """An open-ended horizon for count-bounded runs: long enough to produce n arrivals."""
    return horizon if horizon != np.inf else 3.0 * n / max(mean_rate, 1e-9) + 60.0


@ARRIVALS.register("trace")
def trace(spec, rng, horizon, n):
    data = read_trace(spec.format, spec.path)
    t = data.t * spec.time_scale
    idx = np.nonzero(t >= spec.start_s * spec.time_scale)[0]
    if spec.limit:
        idx = idx[: spec.limit]
    t = t[idx] - (t[idx[0]] if idx.size else 0.0)
    keep = idx[t < horizon][:n]
    return t[: keep.size], keep  # times and row indices into the trace


# ------------------------------------------------------------ length distributions
@LENGTHS.register("fixed")
def fixed(spec, rng, k):
    return np.full(k, spec.value, dtype=np.int64)


@LENGTHS.register("uniform")
def uniform(spec, rng, k):
    return rng.integers(spec.low, spec.high + 1, k, dtype=np.int64)


@LENGTHS.register("lognormal")
def lognormal(spec, rng, k):
    mu = np.log(spec.mean) - spec.sigma ** 2 / 2  # so the distribution's mean is `mean`
    return np.clip(np.rint(rng.lognormal(mu, spec.sigma, k)), spec.min, spec.max).astype(np.int64)


@LENGTHS.register("exponential")
def exponential(spec, rng, k):
    # geometric with success probability 1/mean has mean `mean` exactly and stays memoryless
    return np.minimum(rng.geometric(1.0 / spec.mean, k), spec.max).astype(np.int64)


@LENGTHS.register("empirical")
def empirical(spec, rng, k):
    vals, p = read_empirical(spec.path, spec.column, spec.field)
    return rng.choice(vals, size=k, p=p).astype(np.int64)


@LENGTHS.register("sequence")
def sequence(spec, rng, k):
    return np.resize(np.repeat(np.asarray(spec.values, dtype=np.int64), spec.repeat), k)


# ------------------------------------------------------------ the stream
@dataclass
class Stream:
    """Open-loop requests, sorted by arrival time (stable on class order)."""
    t: np.ndarray
    cls: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    max_tokens: np.ndarray
    hashes: list  # per request: tuple of prefix-block ids or None
    hash_block: np.ndarray  # per class: tokens per prefix-block id

    def __len__(self):
        return int(self.t.size)


class ClosedLoopSource:
    """Lengths for a closed-loop class, drawn in issue order from the class's own generator."""

    def __init__(self, scenario: Scenario, ci: int, rng: np.random.Generator):
        self.c = scenario.workload.classes[ci]
        self.ci, self.rng, self.i = ci, rng, 0
        self.buf = None
        # a batch holds whole periods of any `sequence` lengths, so the order runs on across batches
        self.batch = 1024
        for spec in (self.c.prompt_tokens, self.c.output_tokens):
            period = getattr(spec, "period", None)
            if period:
                self.batch = self.batch * period // math.gcd(self.batch, period)
        self.batch = min(self.batch, 1 << 20)

    def next(self):
        if self.buf is None or self.i >= len(self.buf[0]):
            p, o, m, h = _lengths(self.c, self.ci, self.rng, self.batch, None)
            self.buf, self.i = (p, o, m, h), 0
        j = self.i
        self.i += 1
        return int(self.buf[0][j]), int(self.buf[1][j]), int(self.buf[2][j]), self.buf[3][j]


def _lengths(c: TrafficClass, ci: int, rng, k, trace_rows):
    if trace_rows is not None:
        data = read_trace(c.arrival.format, c.arrival.path)
    p = data.prompt[trace_rows] if c.prompt_tokens.type == "trace" else LENGTHS[c.prompt_tokens.type](c.prompt_tokens, rng, k)
    o = data.output[trace_rows] if c.output_tokens.type == "trace" else LENGTHS[c.output_tokens.type](c.output_tokens, rng, k)
    p = np.maximum(p.astype(np.int64), 1)
    o = np.maximum(o.astype(np.int64), 1)
    m = np.full(k, c.max_tokens, dtype=np.int64) if c.max_tokens else o.copy()
    hashes = [None] * k
    if trace_rows is not None and data.hashes is not None:
        hashes = [data.hashes[r] for r in trace_rows]
    elif c.prefix is not None:
        g = rng.integers(0, c.prefix.groups, k)
        has = rng.random(k) < c.prefix.share
        nblk = c.prefix.tokens // c.prefix.block_tokens
        base = (ci + 1) * 1_000_000_000
        hashes = [tuple(base + int(gi) * 100_000 + j for j in range(nblk)) if hi else None for gi, hi in zip(g, has)]
        p = np.where(has, p + c.prefix.tokens, p)  # the shared prefix comes before the class's own prompt
    return p, o, m, hashes


def class_rngs(scenario: Scenario) -> list[np.random.Generator]:
    ss = np.random.SeedSequence(scenario.seed)
    return [np.random.default_rng(s) for s in ss.spawn(len(scenario.workload.classes))]


def build_stream(scenario: Scenario) -> tuple[Stream, dict[int, ClosedLoopSource]]:
    horizon = scenario.duration_s if scenario.duration_s is not None else np.inf
    n = scenario.num_requests if scenario.num_requests is not None else np.iinfo(np.int64).max
    parts, closed = [], {}
    hash_block = np.ones(len(scenario.workload.classes), dtype=np.int64)
    for ci, (c, rng) in enumerate(zip(scenario.workload.classes, class_rngs(scenario))):
        a = c.arrival
        if c.prefix is not None:  # before the closed-loop branch: its requests carry prefix hashes too
            hash_block[ci] = c.prefix.block_tokens
        if a.type == "closed_loop":
            closed[ci] = ClosedLoopSource(scenario, ci, rng)
            continue
        rows = None
        if a.type == "trace":
            t, rows = ARRIVALS["trace"](a, rng, horizon, n)
            hash_block[ci] = read_trace(a.format, a.path).hash_block
        else:
            t = ARRIVALS[a.type](a, rng, horizon, n)
        if c.prefix is not None:
            hash_block[ci] = c.prefix.block_tokens
        p, o, m, h = _lengths(c, ci, rng, t.size, rows)
        parts.append((t, np.full(t.size, ci, dtype=np.int64), p, o, m, h))
    if parts:
        t = np.concatenate([x[0] for x in parts])
        order = np.argsort(t, kind="stable")[: n if n != np.iinfo(np.int64).max else None]
        cat = [np.concatenate([x[i] for x in parts])[order] for i in range(1, 5)]
        hashes_all = [h for x in parts for h in x[5]]
        stream = Stream(t[order], *cat, [hashes_all[j] for j in order], hash_block)
    else:
        e = np.zeros(0, dtype=np.int64)
        stream = Stream(np.zeros(0), e, e, e, e, [], hash_block)
    return stream, closed
