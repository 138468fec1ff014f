"""Limits that no real scenario reaches but that bound a run's work and memory.

`check_limits` runs inside `load_scenario`, so `sim validate`, `sim run`, `sim sweep`, `sim serve` and
`stress run` all share it and refuse an oversized scenario before any request is generated. A scenario
that legitimately needs more raises a limit in its own `limits:` section (README, "Scenario format").
What is read before the scenario is parsed (file size, nesting, strings) is capped by environment
variables instead (simulator/safeio.py).
"""
from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError

HOW = "if this is legitimate, raise it in the scenario's limits: section"


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    requests: Annotated[int, Field(gt=0)] = 2_000_000  # requests a run generates (expected count)
    arrival_draws: Annotated[int, Field(gt=0)] = 20_000_000  # random candidates drawn by thinning (onoff, piecewise)
    horizon_s: Annotated[float, Field(gt=0)] = 604_800.0  # simulated seconds: any duration, a trace's span (7 days)
    users: Annotated[int, Field(gt=0)] = 100_000  # closed-loop users, all classes
    replicas: Annotated[int, Field(gt=0)] = 1_024
    gpus: Annotated[int, Field(gt=0)] = 4_096  # model pool GPUs, given or derived
    kv_blocks: Annotated[int, Field(gt=0)] = 100_000_000  # per replica, given or derived from GPU memory
    block_size: Annotated[int, Field(gt=0)] = 65_536  # tokens per KV block
    slots: Annotated[int, Field(gt=0)] = 1_024  # llama.cpp n_parallel
    tokens: Annotated[int, Field(gt=0)] = 10_000_000  # one request's prompt or output, a context, a batch
    trace_rows: Annotated[int, Field(gt=0)] = 5_000_000  # lines in one trace or length file
    file_bytes: Annotated[int, Field(gt=0)] = 64 << 20  # one trace or length file (64 MiB)
    prefix_blocks: Annotated[int, Field(gt=0)] = 10_000_000  # prefix-block ids the synthetic prefixes of a run carry
    engine_steps: Annotated[int, Field(gt=0)] = 20_000_000  # engine steps a run needs at least (prefill chunks, steps)


DEFAULT = Limits()
TOKEN_FIELDS = {"value", "low", "high", "min", "max", "mean", "tokens", "max_tokens", "default_max_tokens",
                "max_max_tokens", "n_ctx", "n_batch", "max_num_batched_tokens", "long_prefill_threshold", "block_tokens"}


def _num(v) -> str:
    return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:,.6g}"


def _over(file, field, value, name, lim, unit="", what=""):
    raise InputError(file, field, f"{_num(value)}{unit}{what} is over limits.{name} = {_num(lim)}{unit}; {HOW}")


def _walk(model, path=""):
    """(path, field name, value) of every scalar field in a pydantic model tree."""
    for name in type(model).model_fields:
        if name == "limits":
            continue
        v = getattr(model, name)
        p = f"{path}.{name}" if path else name
        if isinstance(v, BaseModel):
            yield from _walk(v, p)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, BaseModel):
                    yield from _walk(x, f"{p}[{i}]")
                elif isinstance(x, tuple):  # piecewise knots (time_s, rate)
                    yield f"{p}[{i}][0]", "knot_s", x[0]
                elif name == "values":  # sequence lengths
                    yield f"{p}[{i}]", "value", x
        else:
            yield p, name, v


def _profile(sc, name, field):
    from .costmodel import scenario_profile
    return scenario_profile(sc, name, field)


def _rates(a):
    """(mean rate, highest rate) of an open-loop arrival process."""
    if a.type in ("poisson", "constant", "gamma"):
        return a.rate, a.rate
    if a.type == "onoff":
        return (a.on_rate * a.on_s + a.off_rate * a.off_s) / (a.on_s + a.off_s), max(a.on_rate, a.off_rate)
    if a.type == "piecewise":
        ts = [p[0] for p in a.points]
        rs = [p[1] for p in a.points]
        area = sum((t1 - t0) * (r0 + r1) / 2 for (t0, r0), (t1, r1) in zip(a.points, a.points[1:]))
        return (area / ts[-1] if ts[-1] > 0 else max(rs)), max(rs)
    raise AssertionError(a.type)


def check_limits(sc, file: str) -> None:
    L: Limits = sc.limits
    for path, name, v in _walk(sc):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (name.endswith("_s") or name == "knot_s") and v > L.horizon_s:
            _over(file, path, v, "horizon_s", L.horizon_s, " s")
        if name in TOKEN_FIELDS and v > L.tokens:
            _over(file, path, v, "tokens", L.tokens, " tokens")
    e, cl = sc.engine, sc.cluster
    if e.block_size > L.block_size:
        _over(file, "engine.block_size", e.block_size, "block_size", L.block_size, " tokens")
    if e.num_blocks is not None and e.num_blocks > L.kv_blocks:
        _over(file, "engine.num_blocks", e.num_blocks, "kv_blocks", L.kv_blocks, " blocks")
    if e.n_parallel > L.slots:
        _over(file, "engine.n_parallel", e.n_parallel, "slots", L.slots, " slots")
    replicas = sum(p.replicas for p in cl.model_pool) if cl.model_pool else cl.replicas
    if replicas > L.replicas:
        _over(file, "cluster.model_pool" if cl.model_pool else "cluster.replicas", replicas, "replicas", L.replicas)
    if cl.gpus is not None and cl.gpus > L.gpus:
        _over(file, "cluster.gpus", cl.gpus, "gpus", L.gpus)
    users = sum(c.arrival.users for c in sc.workload.classes if c.arrival.type == "closed_loop")
    if users > L.users:
        _over(file, "workload.classes", users, "users", L.users, "", " closed-loop users")

    # cost profiles: read once here (cached), so a bad one is refused by validate too
    cost = _profile(sc, e.profile, "engine.profile")
    costs = [("engine", cost)] + [(f"cluster.model_pool[{i}]", _profile(sc, p.profile, f"cluster.model_pool[{i}].profile"))
                                  for i, p in enumerate(cl.model_pool) if p.profile]
    if e.type == "continuous" and e.num_blocks is None:
        from .engines.continuous import kv_blocks
        for where, c in costs:
            nb = kv_blocks(e, c)
            if nb > L.kv_blocks:
                _over(file, "engine.gpu_memory_gb", nb, "kv_blocks", L.kv_blocks, " blocks",
                      f" (derived with the {where} profile)")
    if cl.model_pool and cl.gpus is None:
        per_gpu = e.gpu_memory_gb * e.gpu_memory_utilization * 1e9
        total = 0
        for p in cl.model_pool:
            c = _profile(sc, p.profile, "cluster.model_pool.profile") if p.profile else cost
            w = p.weight_gb * 1e9 if p.weight_gb else float(c.weight_bytes)
            total += max(int(c.meta.get("tp") or 1), math.ceil(w / per_gpu)) * p.replicas
        if total > L.gpus:
            _over(file, "cluster.model_pool", total, "gpus", L.gpus, " GPUs", " (derived from the models' weights)")

    for i, c in enumerate(sc.workload.classes):
        for f in ("prompt_tokens", "output_tokens"):
            period = getattr(getattr(c, f), "period", None)  # a sequence is laid out period by period
            if period and period > L.requests:
                _over(file, f"workload.classes[{i}].{f}.repeat", period, "requests", L.requests, " lengths",
                      " in one period (values x repeat)")
    _check_requests(sc, file, cost)


def _precheck(path: str, L: Limits, field: str) -> None:
    """A data file's size and line count, before any parser builds rows from it."""
    from .safeio import read_bytes
    data = read_bytes(path, L.file_bytes, "", f"limits.file_bytes; {HOW}")
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if lines > L.trace_rows + 1:
        raise InputError(path, "", f"{lines:,} lines, over limits.trace_rows = {L.trace_rows:,} (read for {field}); {HOW}")


def _check_requests(sc, file, cost) -> None:
    L: Limits = sc.limits
    dur, n = sc.duration_s, sc.num_requests
    open_rate, expected, closed, blocks, steps, prefix_at = 0.0, 0.0, False, 0.0, 0.0, None
    e = sc.engine
    for i, c in enumerate(sc.workload.classes):
        k, rate = _class_requests(sc, i, c, cost, file)
        kk = k if n is None else n if dur is None else min(n, k)
        # the fewest steps the requests need: prompt chunks of the step budget, and with fast-forward off
        # one step per output token of a full batch
        prompt, output = _mean_len(c, "prompt_tokens"), _mean_len(c, "output_tokens")
        if c.prefix is not None:
            prompt += c.prefix.tokens * c.prefix.share
        chunk = e.max_num_batched_tokens if e.type == "continuous" else e.n_batch if e.type == "llamacpp" else None
        steps += kk * (prompt / chunk if chunk else 0.0)
        if not e.fast_forward:
            width = {"continuous": e.max_num_seqs, "llamacpp": e.n_parallel}.get(e.type, e.max_batch_size)
            steps += kk * output / width

        expected += k
        open_rate += rate
        closed |= c.arrival.type == "closed_loop"
        if c.prefix is not None:  # each request carrying a prefix holds tokens // block_tokens block ids
            per = c.prefix.tokens // c.prefix.block_tokens
            blocks += (k if n is None else n if dur is None else min(n, k)) * c.prefix.share * per
            if blocks > L.prefix_blocks and prefix_at is None:
                prefix_at = i
    if dur is None and n is not None and not closed and open_rate > 0:
        # a count-bounded run lasts about num_requests / rate; trace classes end with their trace
        span = n / open_rate
        if span > L.horizon_s:
            _over(file, "num_requests", span, "horizon_s", L.horizon_s, " s",
                  f" (to draw {n:,} requests at {open_rate:.6g}/s)")
    total = n if dur is None and n is not None else expected if n is None else min(n, expected)
    if total > L.requests:
        field = "num_requests" if n is not None and total == n else "duration_s" if dur is not None else "workload"
        _over(file, field, total, "requests", L.requests, " requests", " (expected)")
    n_open = sum(c.arrival.type not in ("closed_loop", "trace") for c in sc.workload.classes)
    if dur is None and n is not None and n * n_open > L.arrival_draws:  # each open class draws num_requests
        _over(file, "workload.classes", n * n_open, "arrival_draws", L.arrival_draws, "",
              f" arrivals drawn ({n_open} open-loop class(es) x num_requests)")
    if prefix_at is not None:
        _over(file, f"workload.classes[{prefix_at}].prefix", blocks, "prefix_blocks", L.prefix_blocks, "",
              " prefix-block ids (requests x share x tokens / block_tokens)")
    if steps > L.engine_steps:
        _over(file, "workload.classes", steps, "engine_steps", L.engine_steps, " steps",
              " (requests x mean prompt / step token budget" + (", + outputs / batch)" if not e.fast_forward else ")"))


def _mean_len(c, field) -> float:
    """A length setting's mean in tokens (an estimate: clipping ignored where it only lowers it)."""
    spec = getattr(c, field)
    t = spec.type
    if t == "fixed":
        return float(spec.value)
    if t == "uniform":
        return (spec.low + spec.high) / 2
    if t in ("lognormal", "exponential"):
        return float(min(spec.mean, spec.max))
    if t == "sequence":
        return sum(spec.values) / len(spec.values)
    if t == "empirical":
        from .traces import read_empirical
        vals, p = read_empirical(spec.path, spec.column, spec.field)
        return float(vals.mean() if p is None else (vals * p).sum())
    if t == "trace":
        from .traces import read_trace
        d = read_trace(c.arrival.format, c.arrival.path)
        return float((d.prompt if field == "prompt_tokens" else d.output).mean())
    return 1.0  # a kind this estimate does not know: counted as one token


def _class_requests(sc, i, c, cost, file) -> tuple[float, float]:
    """(expected requests, mean open-loop rate) of one class; its data files checked on the way."""
    from .traces import read_empirical, read_trace
    import numpy as np
    L: Limits = sc.limits
    dur, n = sc.duration_s, sc.num_requests
    a, where = c.arrival, f"workload.classes[{i}]"
    for f in ("prompt_tokens", "output_tokens"):
        spec = getattr(c, f)
        if spec.type == "empirical":
            _precheck(spec.path, L, f"{where}.{f}")
            vals, _ = read_empirical(spec.path, spec.column, spec.field)
            if vals.size and int(vals.max()) > L.tokens:
                _over(spec.path, spec.column or spec.field or "", int(vals.max()), "tokens", L.tokens,
                      " tokens", f" (in {where}.{f})")
    if a.type == "closed_loop":
        if n is None:  # duration-bounded: each user's cycle takes at least its think time or one engine step
            cycle = max(a.think_time_s, cost.step_time(0, 0, 1, 0), 1e-3)
            return a.users * dur / cycle, 0.0
        return float(n), 0.0
    if a.type == "trace":
        _precheck(a.path, L, f"{where}.arrival")
        data = read_trace(a.format, a.path)
        t = data.t * a.time_scale
        sel = np.nonzero(t >= a.start_s * a.time_scale)[0]
        if a.limit:
            sel = sel[: a.limit]
        if sel.size:
            span = float(t[sel[-1]] - t[sel[0]])
            if span > L.horizon_s:
                _over(a.path, f"{where}.arrival (time_scale {a.time_scale:g})", span, "horizon_s", L.horizon_s,
                      " s", " of trace")
            for f, arr in (("prompt_tokens", data.prompt), ("output_tokens", data.output)):
                if getattr(c, f).type == "trace":
                    m = int(arr[sel].max())
                    if m > L.tokens:
                        _over(a.path, f"{where}.{f}", m, "tokens", L.tokens, " tokens", " in one trace row")
        return float(sel.size), 0.0
    mean, peak = _rates(a)
    h, k = 0.0, float(n or 0)
    if dur is not None:
        h = dur if not (a.type == "piecewise" and not a.repeat) else min(dur, a.points[-1][0])
        k = mean * h
    elif n is not None:
        h = 3.0 * n / max(mean, 1e-9) + 60.0  # the generators' open-ended horizon (workload._finite)
    if a.type in ("onoff", "piecewise") and peak * h > L.arrival_draws:
        _over(file, f"{where}.arrival", peak * h, "arrival_draws", L.arrival_draws,
              "", " candidate arrivals (peak rate x horizon)")
    return k, mean


def limits_doc() -> str:
    """The defaults, for the README table."""
    return "\n".join(f"| `{k}` | {v:,} |" for k, v in DEFAULT.model_dump().items())

