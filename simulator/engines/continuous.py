"""`continuous`: a vLLM-like iteration-level engine (vLLM v1 scheduler semantics, counts only).

Each step is one forward pass over the running requests: every decoding sequence gets one token, a
request still prefilling gets a chunk of the step's token budget, and waiting requests are admitted
while the budget, `max_num_seqs` and free KV blocks allow; when blocks run short, a running request is
preempted by recompute. With `async_scheduling` (vLLM's default), a request that arrives while a step
runs is scheduled one step later than a synchronous scheduler would (see `enqueue`). A request that can
never fit (prompt + max_tokens above the KV capacity, or above max_num_batched_tokens without chunked
prefill, as vLLM's max_model_len check) is refused at once: outcome http_error, status 400.

The engine is one class in three modules, by responsibility:
- this one: the engine as the world sees it (`enqueue`, `dropped`, `kv_util`, `settle`, `stats`, ...)
  and its event loop (the SimPy waits, fast-forward cuts when an arrival could join);
- `cont_sched` (mixin `Scheduling`): what a boundary reserves, preempts and admits, the prefix cache,
  and what leaving the batch frees, with the vLLM scheduler behaviour each part follows;
- `cont_steps` (mixin `Stepping`): applying the steps that ended, the closed-form arithmetic of
  fast-forward segments, finishes and deadlines, inter-token gaps and KV telemetry.
"""
from __future__ import annotations

import math
from array import array
from collections import deque
from heapq import heappush

import numpy as np
from simpy.events import NORMAL, URGENT

from ..errors import InputError
from ..kvcache import KVCache
from . import ENGINES
from .base import EngineBase
from .cont_sched import Scheduling
from .cont_steps import INF, Stepping


def kv_blocks(cfg, cost) -> int:
    """Blocks given, or derived: what the weights leave of gpu_memory_gb * utilisation on each of the
    profile's tensor-parallel GPUs, in blocks of block_size tokens."""
    if cfg.num_blocks:
        return int(cfg.num_blocks)
    tp = int((cost.meta or {}).get("tp") or 1)
    mem = cfg.gpu_memory_gb * cfg.gpu_memory_utilization * 1e9 * tp
    return int((mem - cost.weight_bytes) // (cost.kv_bytes_per_token * cfg.block_size))


_LAGGED = object()  # req.units of a request async scheduling holds back (see Continuous.enqueue)


class _Wait:
    """What env.timeout() gives, less its argument checks: an event, already triggered, that the caller
    schedules and gives its callbacks (the engine makes ~3 per request: no Python __init__ to run)."""

    __slots__ = ("callbacks",)
    _ok = True
    _value = None


@ENGINES.register("continuous")
class Continuous(Scheduling, Stepping, EngineBase):
    def __init__(self, world, index, cfg, cost, queue):
        src = getattr(world.sc, "_source", "<scenario>")
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise InputError(src, "engine.max_num_batched_tokens",
                             f"{cfg.max_num_batched_tokens} is below max_num_seqs ({cfg.max_num_seqs}): each running "
                             "sequence takes one token of every step's budget")
        bs = cfg.block_size
        nb = kv_blocks(cfg, cost)
        if nb < 1:
            tp = int((cost.meta or {}).get("tp") or 1)
            raise InputError(src, "engine.gpu_memory_gb",
                             f"model weights ({cost.weight_bytes / 1e9:.1f} GB) leave no room for a KV cache in "
                             f"{tp} x {cfg.gpu_memory_gb} GB at utilisation {cfg.gpu_memory_utilization}")
        if cfg.prefix_caching:
            hbs = world.stream.hash_block
            for ci, c in enumerate(world.sc.workload.classes):
                hb = int(hbs[ci])
                if hb > 1 and hb % bs:
                    field = f"workload.classes[{ci}].prefix.block_tokens" if c.prefix is not None else "engine.block_size"
                    raise InputError(src, field, f"prefix blocks of {hb} tokens are not whole KV blocks of {bs} tokens")
        self.bs = bs
        self.kv = KVCache(nb, bs)
        self.capacity = nb * bs
        self.S, self.M = cfg.max_num_seqs, cfg.max_num_batched_tokens
        self.chunked, self.caching, self.ff = cfg.chunked_prefill, cfg.prefix_caching, cfg.fast_forward
        self.long_thr = cfg.long_prefill_threshold
        self.lag = cfg.async_scheduling
        self.lagged: deque = deque()  # (boundary it is released at, request): async scheduling's late arrivals
        self.long_q = type(queue)(world.sc.scheduler) if self.long_thr else None
        self.slope = cost.decode_ctx_s  # d(step time)/d(decode context): segments are affine in it
        # clock: canonical time of the last boundary and steps done; float sums are never re-derived
        self.t = 0.0
        self.tick = 0
        # running requests: all (admission order), decoding, prefilling
        self.dec: dict = {}
        self.pre: list = []
        self.cnt = [0] * bs  # decoding requests per phase: those needing a new block at ticks = phase (mod bs)
        self.sum_c = 0  # KV tokens of decoding requests
        self.ns = 0  # streamed requests among them: a step's weight in the pooled ITL (a client sees gaps only in a stream)
        self.dec_blocks = 0  # blocks in decoding requests' tables
        self.fin: list = []  # (finish tick, rid, dec_base, req)
        self.dlh: list = []  # (deadline, rid, dec_base, req), fast-forward only
        self.pw: dict = {}  # preempted requests waiting again (their deadline is the engine's business)
        self.n_queued = 0
        self.q_tokens = 0
        self.long_active = 0
        self.hb: dict = {}
        # the current decode segment: step i ends at t0 + i*A + B*i*(i-1)/2
        self.seg = False
        self.ff_wait = False
        self.ff_end = 0
        self.ff_tmo = None
        self.t0 = self.A = self.B = 0.0
        self.seg_i = 0
        self.gticks: list = []  # monotonic stack of (tick, largest gap of the steps up to it): per-request max ITL
        self.gvals: list = []
        self.itl_buf = array("d")  # (A, B, first index, steps, weight) per run of steps
        self.step_log = None  # tests: a list to get one dict per step (per run of steps when fast-forwarding)
        # telemetry
        self.preemptions = self.preempted_reqs = self.too_large = 0
        self.preempted_now = False
        self.peak_used = 0
        self.samples = array("d")  # (util, internal, external) each simulated second
        self.next_sample = 0.0
        self.lookups = self.hit_reqs = self.hit_tokens = self.lookup_tokens = self.admitted_tokens = 0
        super().__init__(world, index, cfg, cost, queue)
        self.running: dict = {}  # rid -> request, admission order (newest last)
        self.mixed = None

    # ------------------------------------------------------------------ called by the world
    def enqueue(self, req) -> None:
        P, mx = req.prompt, req.applied_max
        if P + mx > self.capacity or (not self.chunked and P + mx > self.M):
            world = self.world
            world.queued -= 1
            req.http_status = 400
            if P + mx > self.capacity:
                req.error = (f"prompt exceeds KV capacity: {P} prompt + {mx} max_tokens > {self.capacity} tokens "
                             f"({self.kv.num_blocks} blocks of {self.bs})")
            else:
                req.error = (f"prompt exceeds max_num_batched_tokens: {P} prompt + {mx} max_tokens > {self.M} "
                             "(chunked_prefill is off)")
            self.too_large += 1
            world.finish(req, "http_error", self.env.now)
            return
        if self.lag and self.waiting > 0:
            # vLLM's async scheduling (vllm/v1/engine/core.py step_with_batch_queue, batch queue of 2): while
            # step k runs, step k+1 is already scheduled; the engine reads its input queue only when step k's
            # output is back, so a request that arrives during step k joins step k+2 at the earliest, where a
            # synchronous loop would admit it into k+1 (measured, tests/data/real/vllm-0.26-h200-llama3-8b:
            # the server's arrival-to-queued time grows with its step time, 7.7 ms at 4 req/s, 51 ms with
            # 2,048-token prefills in every step)
            j = self.tick + 1 if self.waiting < 3 else self.tick + self._done_by(self.env._now) + 1 - self.seg_i
            req.units = _LAGGED
            self.lagged.append((j + 1, req))
            if len(self.running) < self.S:
                self._wake()  # a fast-forward segment ends where the request can join (capped in _next)
            return
        self._queue_up(req)

    def _queue_up(self, req) -> None:
        P = req.prompt
        req.units = None
        (self.long_q if self.long_q is not None and P >= self.long_thr else self.queue).push(req)
        self.n_queued += 1
        self.q_tokens += P
        if len(self.running) < self.S:
            self._wake()

    def _release(self) -> None:
        """At a boundary: the requests async scheduling held back that this boundary may admit."""
        lagged, tick = self.lagged, self.tick
        idle = not self.running and self._head()[0] is None  # no step to wait for: the engine reads them now
        while lagged and (idle or lagged[0][0] <= tick):
            req = lagged.popleft()[1]
            if req.outcome is None:
                self._queue_up(req)

    def dropped(self, req) -> None:
        """The reaper timed out one of our queued requests (it stays in the queue until popped)."""
        u = getattr(req, "units", _LAGGED)  # still in the front end, or held back by async scheduling
        if u is _LAGGED:
            return
        self.n_queued -= 1
        self.q_tokens -= req.prompt
        if self.ff_wait and len(self.running) < self.S:
            self._wake()  # the head may have changed: check admission at the next boundary, as step by step would

    def outstanding(self) -> int:
        return self.n_queued + len(self.running) + len(self.lagged)

    def streaming(self) -> int:
        return self.ns  # streamed requests decoding

    def has_waiting(self) -> bool:
        return self._head()[0] is not None

    def kv_util(self) -> float:
        used, j = self._used_now()
        now = self.env.now
        if now >= self.next_sample:
            self.next_sample = math.floor(now) + 1.0
            self._sample(used, j)
        return used / self.kv.num_blocks

    def kv_load(self) -> float:
        return (self._used_now()[0] + self.q_tokens / self.bs) / self.kv.num_blocks

    def settle(self) -> None:
        """End of run: steps done inside an unfinished fast-forward segment become visible on the
        requests still decoding, and buffered inter-token gaps go to the world."""
        extra = 0
        if self.seg and self.ff and self.env.now > self.t:
            extra = self._done_by(self.env.now) - self.seg_i
        if extra:
            if self.ns:
                self.itl_buf.extend((self.A, self.B, self.seg_i, extra, self.ns))
            tick, T = self.tick + extra, self._T(self.seg_i + extra)
            for r in self.dec.values():
                r.generated = tick - r.dec_base
                r.last_token = T
        else:
            for r in self.dec.values():
                r.generated = self.tick - r.dec_base
                r.last_token = self.t
        self._flush_itl()

    def stats(self) -> dict:
        self._flush_itl()
        st = super().stats()
        kv, bs, cost = self.kv, self.bs, self.cost
        s = np.frombuffer(self.samples, dtype=float).reshape(-1, 3) if len(self.samples) else np.zeros((0, 3))

        def m(x):
            return round(float(x.mean()), 6) if x.size else 0.0

        def mx(x):
            return round(float(x.max()), 6) if x.size else 0.0
        peak_gb = self.peak_used * bs * cost.kv_bytes_per_token / 1e9
        st["kv_cache"] = {
            "replica": self.index, "num_blocks": kv.num_blocks, "block_size": bs, "capacity_tokens": self.capacity,
            "peak_blocks": self.peak_used, "peak_util": round(self.peak_used / kv.num_blocks, 6),
            "peak_kv_gb": round(peak_gb, 6), "peak_gpu_memory_gb": round(cost.weight_bytes / 1e9 + peak_gb, 6),
            "util_mean": m(s[:, 0]), "util_max_sampled": mx(s[:, 0]), "samples": int(s.shape[0]),
            "internal_fragmentation_mean": m(s[:, 1]), "internal_fragmentation_max": mx(s[:, 1]),
            "external_fragmentation_mean": m(s[:, 2]), "external_fragmentation_max": mx(s[:, 2]),
            "preemptions": self.preemptions, "preempted_requests": self.preempted_reqs,
            "rejected_too_large": self.too_large, "blocks_in_use_at_end": kv.used(),
        }
        if self.caching:
            st["prefix_cache"] = {
                "replica": self.index, "lookups": self.lookups, "hits": self.hit_reqs,
                "misses": self.lookups - self.hit_reqs, "hit_tokens": self.hit_tokens,
                "prefill_tokens_saved": self.hit_tokens, "looked_up_tokens": self.lookup_tokens,
                "token_hit_rate": round(self.hit_tokens / self.lookup_tokens, 6) if self.lookup_tokens else 0.0,
                "admitted_prompt_tokens": self.admitted_tokens, **kv.stats(),
            }
        return st

    # ------------------------------------------------------------------ the loop
    # The loop is a callback, not a SimPy process: each wait is an event whose callback is _resume, and
    # `waiting` says what the wait was for. A generator process would cost a resume (send, target
    # bookkeeping) per boundary, ~2.3 per request; the events and their order in SimPy's queue are the
    # same as the generator loop's (it started with an urgent event, each wait was made where it yielded).
    # waiting: -1 start, 0 idle, 1 a step with prefill chunks, 2 one decode step, 3 a fast-forward segment.

    def _start(self):
        ev = _Wait()
        ev.callbacks = [self._resume]
        self.waiting = -1
        self.env.schedule(ev, URGENT)

    def _resume(self, _):
        w = self.waiting
        if w == 3:  # a fast-forward segment (maybe cut short by _cut) ended
            self.ff_wait = False
            self._apply(self.ff_end - self.seg_i)
        elif w == 1:
            T, mixed = self.mixed
            self.mixed = None
            self._after_mixed(T, mixed)
        elif w == 2:
            self._apply(1)
        elif w == 0:
            self.t = self.env.now
        self._next()

    def _next(self):
        """At a boundary: schedule the next step, or a run of steps, or go idle; wait for its end."""
        if self.lagged:
            self._release()
        if not self.running and self._head()[0] is None:
            self.seg = False
            self.waiting = 0
            self.idle().callbacks.append(self._resume)
            return
        mixed = self._schedule()
        if mixed is not None:
            T = self.t + mixed[0]
            self.mixed = (T, mixed)
            self.waiting = 1
            self._at(T)
            return
        if not self.dec:  # pragma: no cover - admission into an empty engine always succeeds
            raise RuntimeError("continuous engine: nothing to run but requests are waiting")
        if not self.seg:  # a new segment: step i of it lasts A + B*i
            n = len(self.dec)
            self.t0 = self.t
            self.A = self.cost.step_time(0, 0, n, self.sum_c + n)
            self.B = self.slope * n
            self.seg_i = 0
            self.seg = True
        if not self.ff:
            self.waiting = 2
            self._at(self._T(self.seg_i + 1))
            return
        end = self.seg_i + self._plan()
        if self.lagged and len(self.running) < self.S:  # end the segment where the next held request is released
            end = min(end, self.seg_i + max(1, self.lagged[0][0] - self.tick))
        self.ff_end = end
        self.ff_tmo = self._at(self._T(end))
        self.waiting = 3
        self.ff_wait = True  # enqueue()/dropped() may cut the segment short: an arrival that could join

    def _wake(self):
        """An arrival (or a queue change) that could join: stop fast-forwarding at the next boundary."""
        if self.ff_wait:
            self.ff_wait = False
            # What proc.interrupt() would do, without throwing an exception into the loop: an urgent
            # event now, whose callback (_cut) moves the loop's wait to the boundary that ends the step
            # in flight. It is scheduled where the interrupt was, and _cut makes the new wait when the
            # interrupted loop did, so SimPy's order of same-time events (and every record) is unchanged.
            ev = _Wait()
            ev.callbacks = [self._cut]
            self.env.schedule(ev, URGENT)
        else:
            w = self.wakeup
            if w is not None and not w.triggered:
                w.succeed()

    def _cut(self, _):
        j = self._done_by(self.env._now) + 1  # the step in flight ends at boundary j
        if j < self.ff_end:
            self.ff_end = j
            old = self.ff_tmo
            self.ff_tmo = self._at(self._T(j))
            old.callbacks.clear()  # it stays in SimPy's queue, with nothing to call

    def _at(self, T):
        """The loop's wait: an event at exactly canonical time T (SimPy adds now + delay) that resumes it."""
        now = self.env._now
        d = T - now
        if now + d != T:
            d2 = math.nextafter(d, INF if now + d < T else -INF)
            if now + d2 == T:
                d = d2
        ev = _Wait()
        ev.callbacks = [self._resume]
        heappush(self.env._queue, (now + (d if d > 0 else 0.0), NORMAL, next(self.env._eid), ev))  # env.schedule()
        return ev
