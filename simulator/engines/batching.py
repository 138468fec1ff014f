"""Request-level batching: `single` (one request at a time) and `dynamic_batching` (collect up to
max_batch_size requests or until batch_timeout_s, prefill them together, decode until the batch
drains; no request joins a running batch, as in Triton-style dynamic batching)."""
from __future__ import annotations

import numpy as np

from . import ENGINES
from .base import EngineBase


def _delay_to(now: float, target: float) -> float:
    """The delay d with now + d == target exactly in floating point (SimPy schedules at now + d)."""
    d = target - now
    while now + d < target:
        d = np.nextafter(d, np.inf)
    while now + d > target:
        d = np.nextafter(d, -np.inf)
    return float(d)


@ENGINES.register("dynamic_batching")
class DynamicBatching(EngineBase):
    def __init__(self, world, index, cfg, cost, queue):
        self.max_bs = cfg.max_batch_size
        self.window = cfg.batch_timeout_s
        self.first_wait = None  # when the oldest waiting request was queued (-inf: waited through a batch)
        super().__init__(world, index, cfg, cost, queue)

    def enqueue(self, req) -> None:
        if self.first_wait is None:
            self.first_wait = self.env.now
        super().enqueue(req)

    def loop(self):
        env = self.env
        while True:
            if not self.has_waiting():
                self.first_wait = None
                yield self.idle()
                continue
            while len(self.queue) < self.max_bs and env.now < self.first_wait + self.window:
                yield env.timeout(self.first_wait + self.window - env.now) | self.idle()
            batch = []
            while len(batch) < self.max_bs:
                r = self.take()
                if r is None:
                    break
                batch.append(r)
            self.first_wait = float("-inf") if len(self.queue) else None
            if batch:
                yield from self.serve(batch)

    def serve(self, batch):
        env, world, cost = self.env, self.world, self.cost
        n = len(batch)
        self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
        self.running = batch
        t0 = env.now
        yield env.timeout(cost.prefill_time([r.prompt for r in batch]))
        self.steps += 1
        t = env.now
        active = []
        for r in batch:
            r.batch_size = n
            r.prefilled = r.prompt
            if r.deadline <= t:
                world.finish(r, "timeout", t)
                continue
            r.first_token = r.last_token = t
            r.generated = 1
            world.emit((r,), (t,))
            if r.target <= 1:
                world.finish(r, "ok", t)
            else:
                active.append(r)
        while active:
            n = len(active)
            k = min(r.target - r.generated for r in active) if self.cfg.fast_forward else 1
            ctx = sum(r.prompt + r.generated for r in active)
            times = cost.step_times(0, 0, n, ctx + n * np.arange(k))
            # each step's end as one step at a time would reach it: t + x1, then + x2, ... (sequential float
            # sums, not t + sum(times)), so fast-forward on and off give the same records to the last bit
            ends = np.add.accumulate(np.concatenate(((t,), times)))[1:]
            dmin = min(r.deadline for r in active)
            if ends[-1] > dmin:  # a client hangs up inside this run: stop at the step it happens in
                k = int(np.searchsorted(ends, dmin)) + 1
                times, ends = times[:k], ends[:k]
            yield env.timeout(_delay_to(env.now, float(ends[-1])))
            self.steps += k
            t = env.now
            ns = sum(r.stream for r in active)  # a client sees inter-token gaps only in a stream
            if ns:
                world.add_itl(times, ns)
            if world.token_listener is not None:
                world.emit(active, ends)
            mx = float(times.max())
            still = []
            for r in active:
                r.generated += k
                r.last_token = t
                if mx > r.itl_max:
                    r.itl_max = mx
                if r.generated >= r.target and t <= r.deadline:
                    world.finish(r, "ok", t)
                elif r.deadline <= t:  # hung up before (or as) this segment's last token arrived
                    world.finish(r, "timeout", t)
                else:
                    still.append(r)
            active = still
        self.busy_s += env.now - t0
        self.running = []


@ENGINES.register("single")
class Single(DynamicBatching):
    def __init__(self, world, index, cfg, cost, queue):
        super().__init__(world, index, cfg.model_copy(update={"max_batch_size": 1, "batch_timeout_s": 0.0}), cost, queue)
