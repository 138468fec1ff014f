"""`continuous`: a vLLM-like iteration-level engine (vLLM v1 scheduler semantics, counts only).

Each step (one forward pass):
- Running requests go first, in admission order: every decoding sequence gets one token; a request
  still prefilling gets a chunk of what is left of `max_num_batched_tokens`. vLLM gets "decodes first"
  from this order, since only the newest admission can still be mid-prefill.
- KV blocks for the step are reserved before it runs. When there are not enough, a running request is
  preempted by recompute (vLLM's default): its blocks are freed, it goes back to the front of the waiting
  queue, and later prefills its prompt plus the tokens it had generated (the prefix cache may still hold
  part of it). No new request is admitted in a step that preempted. The victim is the newest request
  under `fifo` (vLLM's FCFS policy), else the one the scheduler ranks last (vLLM's priority policy takes
  the largest (priority, arrival time); `priority_aging` and `sjf` use their own keys), newest on a tie.
- Then waiting requests are admitted, head of the queue first, while the token budget, `max_num_seqs`
  and free blocks allow. A prefix-cache hit counts as computed; at least one prompt token is always
  computed. Without `chunked_prefill`, a prompt must fit whole into the step's remaining budget and the
  head of the queue waits until it does, as vLLM v1's scheduler stops admitting at a waiting prompt
  that does not fit the remaining budget when chunked prefill is off (some releases skipped past it).
- `long_prefill_threshold` (optional): prompts of at least this many tokens wait in a separate queue, and
  at most one of them is prefilling at any time (vLLM v0's `max_long_partial_prefills=1`, as in control
  planes that split small and large prefill queues). Short prompts are admitted first; a long one is
  admitted when no other long prompt is prefilling. So short prompts never queue behind long ones.
- A request's first token comes at the end of the step that completes its prefill; every later step
  gives each decoding request one token. A request that can never fit (prompt + max_tokens above the KV
  capacity, or above max_num_batched_tokens without chunked prefill, as vLLM's max_model_len check) is
  refused at once: outcome http_error, status 400. A client deadline ends a request at the first step
  boundary at or after it (outcome timeout); its blocks are freed there.

Step time: cost.step_time(prefill tokens, Σ chunk*(context before + chunk), decodes, Σ decode context),
where a decode's context is its prompt plus the tokens generated so far.

Speed. Per-request work is O(log n): a decoding request is not touched per step. The engine keeps a
global step counter; a decoding request stores the counter value at which it would have had zero tokens
(`dec_base`), so its token count, KV length and block count follow from the counter, and its finish step
is a static heap key. The block demand of the next k steps follows from a count of decoding requests per
position-in-block phase. While batch membership is fixed (no prefill, nobody finishing, no deadline, no
preemption), step i of a segment lasts A + B*i (the cost model is affine in decode context), so boundary
times, the number of steps done by time t and the step at which a deadline falls have closed forms.
With `fast_forward`, a whole segment is one SimPy timeout; an arrival that could join (a free sequence
slot) wakes the engine, which waits for the step in flight to end, applies exactly the steps done, and
plans again. Without it, the same arithmetic runs one SimPy timeout per step, checking the queue at every
boundary; both give identical records (a test checks requests.csv byte for byte).

KV telemetry (stats()["kv_cache"]): utilisation sampled once a simulated second, peak blocks and GB,
internal fragmentation (allocated slots not holding a token, over allocated slots, per request tables),
external fragmentation (the share of blocks that were free while the head of the queue could not be
admitted for lack of blocks: paging has no other external fragmentation), preemptions.
"""
from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from heapq import heappop, heappush

import numpy as np
from simpy.events import NORMAL, URGENT

from ..errors import InputError
from ..kvcache import KVCache
from . import ENGINES
from .base import EngineBase

INF = float("inf")
ITL_FLUSH = 5 * 100_000  # buffered gap descriptors (5 floats each) before they go to the world


def kv_blocks(cfg, cost) -> int:
    """Blocks given, or derived: what the weights leave of gpu_memory_gb * utilisation on each of the
    profile's tensor-parallel GPUs, in blocks of block_size tokens."""
    if cfg.num_blocks:
        return int(cfg.num_blocks)
    tp = int((cost.meta or {}).get("tp") or 1)
    mem = cfg.gpu_memory_gb * cfg.gpu_memory_utilization * 1e9 * tp
    return int((mem - cost.weight_bytes) // (cost.kv_bytes_per_token * cfg.block_size))


class _Wait:
    """What env.timeout() gives, less its argument checks: an event, already triggered, that the caller
    schedules and gives its callbacks (the engine makes ~3 per request: no Python __init__ to run)."""

    __slots__ = ("callbacks",)
    _ok = True
    _value = None


@ENGINES.register("continuous")
class Continuous(EngineBase):
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
        req.units = None
        (self.long_q if self.long_q is not None and P >= self.long_thr else self.queue).push(req)
        self.n_queued += 1
        self.q_tokens += P
        if len(self.running) < self.S:
            self._wake()

    def dropped(self, req) -> None:
        """The reaper timed out one of our queued requests (it stays in the queue until popped)."""
        self.n_queued -= 1
        self.q_tokens -= req.prompt
        if self.ff_wait and len(self.running) < self.S:
            self._wake()  # the head may have changed: check admission at the next boundary, as step by step would

    def outstanding(self) -> int:
        return self.n_queued + len(self.running)

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

    # ------------------------------------------------------------------ scheduling at a boundary
    def _head(self):
        q = self.queue
        while len(q):
            r = q.peek()
            if r.outcome is None:
                return r, q
            q.pop()  # timed out while queued (already uncounted by dropped())
        q = self.long_q
        if q is not None and not self.long_active:
            while len(q):
                r = q.peek()
                if r.outcome is None:
                    return r, q
                q.pop()
        return None, None

    def _schedule(self):
        """Reserve the next step's blocks (preempting if short), admit waiting requests.
        Returns None for a decode-only step, else (duration, chunks, decodes)."""
        kv, bs, dec = self.kv, self.bs, self.dec
        n = len(dec)
        need_dec = self.cnt[self.tick % bs] if n else 0
        if not self.pre and need_dec <= kv.free and (n >= self.S or not len(self.queue)) and (
                self.long_q is None or not len(self.long_q)):
            # the common boundary: decodes only, nobody to admit, no eviction or preemption
            kv.free -= need_dec
            self.dec_blocks += need_dec
            self.preempted_now = False
            used = kv.num_blocks - kv.free - kv.evictable
            if used > self.peak_used:
                self.peak_used = used
            return None
        budget = self.M - n
        need = need_dec
        chunks = []
        for r in self.pre:
            if budget <= 0:
                break
            c = r.computed
            ch = r.prefill_to - c
            if ch > budget:
                ch = budget
            nb = (c + ch + bs - 1) // bs - r.blocks
            chunks.append((r, ch, nb))
            need += nb
            budget -= ch
        preempted = need > kv.available()
        self.preempted_now = preempted  # admission waits a step: the next boundary must be looked at
        while need > kv.available():
            r = self._victim()
            if r.rid in dec:
                if (self.tick - r.dec_base - 1 + r.prompt) % bs == 0:
                    need -= 1
                    need_dec -= 1
                budget += 1
                self._leave(r)
            else:
                for i, (cr, ch, nb) in enumerate(chunks):  # its chunk in this step, if it has one
                    if cr is r:
                        del chunks[i]
                        need -= nb
                        budget += ch
                        break
                self._drop_pre(r)
            self._requeue(r)
        if need:
            kv.allocate(need)
            self.dec_blocks += need_dec
            for r, _, nb in chunks:
                r.blocks += nb
        if not preempted and budget > 0 and len(self.running) < self.S:
            self._admit(chunks, budget)
        used = kv.used()
        if used > self.peak_used:
            self.peak_used = used
        if not chunks:
            return None
        n = len(dec)
        ptok = pattn = 0
        for r, ch, _ in chunks:
            ptok += ch
            pattn += ch * (r.computed + ch)
        self.seg = False
        return self.cost.step_time(ptok, pattn, n, self.sum_c + n), chunks, n

    def _victim(self):
        """The running request to preempt: the newest, or with a ranking scheduler the one it ranks last."""
        running = self.running
        key = getattr(self.queue, "key", None)
        if key is None:
            return running[next(reversed(running))]
        worst = wk = None
        for r in reversed(running.values()):  # newest first: a tie keeps the newest
            k = key(r)
            if worst is None or k > wk:
                worst, wk = r, k
        return worst

    def _admit(self, chunks, budget):
        kv, bs, S, running, world = self.kv, self.bs, self.S, self.running, self.world
        queue, long_q = self.queue, self.long_q
        while budget > 0 and len(running) < S:
            if not len(queue) and (long_q is None or not len(long_q)):
                break
            r, q = self._head()
            if r is None:
                break
            total = r.prompt + r.generated
            k = take = m = 0
            hashes = r.prefix_hashes if self.caching else None
            if hashes:
                hb = self.hb.get(r.cls)
                if hb is None:
                    hb = self.hb[r.cls] = int(world.stream.hash_block[r.cls])
                m = hb // bs
                if m and not hb % bs:
                    lim = min(len(hashes), r.prompt // hb, (total - 1) // hb)
                    if lim > 0:
                        k, take = kv.match(hashes, lim)
                else:
                    hashes = None
            cached = k * m * bs
            ch = total - cached
            if ch > budget:
                if not self.chunked:
                    break
                ch = budget
            nb = (cached + ch + bs - 1) // bs - k * m
            if nb + take > kv.available():
                break
            q.pop()
            self.n_queued -= 1
            self.q_tokens -= r.prompt
            world.started(r, self.t)
            if r.preemptions:
                self.pw.pop(r.rid, None)
            if hashes:
                r.units = [k, kv.acquire(hashes, k) if k else [], m, m * bs]  # next unit to cache, units held
                self.lookups += 1
                self.lookup_tokens += total
                if k:
                    self.hit_reqs += 1
                    self.hit_tokens += cached
            kv.allocate(nb)
            self.admitted_tokens += total
            r.computed = cached
            r.prefill_to = total
            r.blocks = k * m + nb
            r.cached += cached
            self.pre.append(r)
            running[r.rid] = r
            if q is self.long_q:
                self.long_active += 1
            chunks.append((r, ch, nb))
            budget -= ch

    # ------------------------------------------------------------------ applying steps
    def _after_mixed(self, T, mixed):
        d, chunks, n = mixed
        self.tick += 1
        tick = self.tick
        self.t = T
        self.steps += 1
        self.busy_s += d
        nseq = n + len(chunks)
        self.batch_sizes[nseq] = self.batch_sizes.get(nseq, 0) + 1
        world = self.world
        if n:
            self.sum_c += n
            self._gap(tick, d)
            ns = self.ns
            if self.ff:
                if ns:
                    self.itl_buf.extend((d, 0, 0, 1, ns))
            else:
                if ns:
                    world.add_itl(d, ns)
                self._touch(tick, T)
            if world.token_listener is not None:
                world.emit(list(self.dec.values()), (T,))
        if self.step_log is not None:
            self._log(T - d, T, 1, sum(ch for _, ch, _ in chunks), n, nseq, [(r.rid, ch) for r, ch, _ in chunks])
        done = False
        for r, ch, _ in chunks:
            c = r.computed + ch
            r.computed = c
            r.prefilled += ch
            if r.units is not None:
                self._cache_units(r, c)
            if c >= r.prefill_to:
                done = True
                self._prefill_done(r, T, tick, nseq)
        if done:
            self._prune_pre()
        self._events(T, tick)

    def _prefill_done(self, r, T, tick, nseq):
        g = r.generated + 1
        r.generated = g
        if r.first_token is None:
            r.first_token = T
            r.batch_size = nseq
        else:  # recomputed after a preemption: the client saw nothing since its last token
            gap = T - r.last_token
            if r.stream and self.ff:
                self.itl_buf.extend((gap, 0, 0, 1, 1))
            elif r.stream:
                self.world.add_itl(gap, 1)
            if gap > r.itl_max:
                r.itl_max = gap
        r.last_token = T
        world = self.world
        if world.token_listener is not None:
            world.emit((r,), (T,))
        target = r.target
        if g >= target:
            self._release_pre(r)
            world.finish(r, "ok", T)
        elif r.deadline <= T:
            self._release_pre(r)
            world.finish(r, "timeout", T)
        else:
            base = tick - g
            r.dec_base = base
            r.dec_since = tick
            self.cnt[(base + 1 - r.prompt) % self.bs] += 1
            self.sum_c += r.computed
            self.dec_blocks += r.blocks
            self.dec[r.rid] = r
            if r.stream:
                self.ns += 1
            heappush(self.fin, (base + target, r.rid, base, r))
            if self.ff:
                heappush(self.dlh, (r.deadline, r.rid, base, r))

    def _T(self, i):
        return self.t0 + (i * self.A + self.B * (i * (i - 1) // 2))

    def _done_by(self, x):
        """Segment index of the last boundary at or before time x."""
        i0, A, B = self.seg_i, self.A, self.B
        y = x - self.t0
        if B > 0:
            h = A - 0.5 * B
            i = int((math.sqrt(h * h + 2.0 * B * y) - h) / B)
        else:
            i = int(y / A)
        if i < i0:
            i = i0
        t0 = self.t0
        while t0 + ((i + 1) * A + B * ((i + 1) * i // 2)) <= x:
            i += 1
        while i > i0 and t0 + (i * A + B * (i * (i - 1) // 2)) > x:
            i -= 1
        return i

    def _need(self, start, count):
        """New blocks decoding requests take over `count` steps, the first starting at tick `start`."""
        bs, cnt = self.bs, self.cnt
        q, rest = divmod(count, bs)
        s = q * len(self.dec)
        if rest:
            p = start % bs
            e = p + rest
            s += sum(cnt[p:e]) if e <= bs else sum(cnt[p:]) + sum(cnt[:e - bs])
        return s

    def _plan(self):
        """Steps until the batch changes: a finish, a deadline, or blocks running out."""
        if self.preempted_now:
            return 1
        dec, fin = self.dec, self.fin
        while True:
            f, rid, base, r = fin[0]
            if rid in dec and r.dec_base == base:
                break
            heappop(fin)
        k = f - self.tick
        d = INF
        dlh = self.dlh
        while dlh:
            dd, rid, base, r = dlh[0]
            if rid in dec and r.dec_base == base:
                d = dd
                break
            heappop(dlh)
        if self.pw:
            for r in self.pw.values():
                if r.deadline < d:
                    d = r.deadline
        i = self.seg_i + k
        if d < INF and d < self.t0 + (i * self.A + self.B * (i * (i - 1) // 2)):  # _T(i)
            if d <= self.t:
                i = self.seg_i + 1
            else:
                i = self._done_by(d)
                if self._T(i) < d:
                    i += 1
            if i - self.seg_i < k:
                k = i - self.seg_i
        if k > 1:  # steps 2..k need blocks beyond those this boundary reserved
            n, bs = len(dec), self.bs
            avail = self.kv.available()
            if ((k - 2) // bs + 1) * n > avail:
                q = avail // n
                rest = avail - q * n
                p = (self.tick + 1) % bs
                x, cnt = 0, self.cnt
                while cnt[p] <= rest:
                    rest -= cnt[p]
                    x += 1
                    p += 1
                    if p == bs:
                        p = 0
                kb = 1 + q * bs + x
                if kb < k:
                    k = kb
        return k

    def _apply(self, k):
        """k decode-only steps of the current segment are done."""
        i0 = self.seg_i
        i1 = i0 + k
        dec = self.dec
        n = len(dec)
        tick = self.tick
        if k > 1:
            need = self._need(tick + 1, k - 1)
            if need:
                self.kv.allocate(need)
                self.dec_blocks += need
                used = self.kv.used()
                if used > self.peak_used:
                    self.peak_used = used
        tick += k
        self.tick = tick
        self.sum_c += n * k
        self.seg_i = i1
        T = self._T(i1)
        self.busy_s += T - self.t
        t_prev, self.t = self.t, T
        A, B = self.A, self.B
        self._gap(tick, A + B * (i1 - 1))
        self.steps += k
        bsz = self.batch_sizes
        bsz[n] = bsz.get(n, 0) + k
        world = self.world
        ns = self.ns
        if self.ff:
            if ns:
                buf = self.itl_buf
                buf.extend((A, B, i0, k, ns))
                if len(buf) >= ITL_FLUSH:
                    self._flush_itl()
        else:
            if ns:
                world.add_itl(A + B * i0, ns)
            self._touch(tick, T)
        if world.token_listener is not None:
            world.emit(list(dec.values()), [self._T(i) for i in range(i0 + 1, i1 + 1)])
        if self.step_log is not None:
            self._log(t_prev, T, k, 0, n, n, [])
        self._events(T, tick)

    def _events(self, T, tick):
        """Boundary bookkeeping: finished requests, deadlines."""
        world, dec = self.world, self.dec
        fin = self.fin
        while fin and fin[0][0] <= tick:
            _, rid, base, r = heappop(fin)
            if rid in dec and r.dec_base == base:
                self._leave(r)
                world.finish(r, "ok", T)
        if self.ff:
            dlh = self.dlh
            while dlh and dlh[0][0] <= T:
                _, rid, base, r = heappop(dlh)
                if rid in dec and r.dec_base == base:
                    self._leave(r)
                    world.finish(r, "timeout", T)
        else:  # step by step: scan, so a deadline moved by the twin server (client hang-up) is seen
            late = [r for r in dec.values() if r.deadline <= T]
            for r in late:
                self._leave(r)
                world.finish(r, "timeout", T)
        if self.pre:
            late = [r for r in self.pre if r.deadline <= T]
            for r in late:
                self._release_pre(r)
                world.finish(r, "timeout", T)
            if late:
                self._prune_pre()
        if self.pw:
            late = [r for r in self.pw.values() if r.deadline <= T]
            for r in late:
                del self.pw[r.rid]
                if r.outcome is None:
                    world.queued -= 1
                    self.n_queued -= 1
                    self.q_tokens -= r.prompt
                    world.finish(r, "timeout", T)

    # ------------------------------------------------------------------ leaving
    def _leave(self, r):
        """A decoding request stops (finish, deadline, preemption) at the current boundary."""
        rid = r.rid
        dec = self.dec
        del dec[rid]
        del self.running[rid]
        if r.stream:
            self.ns -= 1
        base, P, bs = r.dec_base, r.prompt, self.bs
        g = self.tick - base
        c = P + g - 1
        self.cnt[(base + 1 - P) % bs] -= 1
        self.sum_c -= c
        nb = (c + bs - 1) // bs
        self.dec_blocks -= nb
        r.generated = g
        r.last_token = self.t
        vals = self.gvals
        j = bisect_right(self.gticks, r.dec_since)
        if j < len(vals) and vals[j] > r.itl_max:
            r.itl_max = vals[j]
        if not dec:
            self.gticks.clear()  # later decoders only look at steps after they join
            vals.clear()
        self.seg = False
        self._free(r, nb)

    def _release_pre(self, r):
        del self.running[r.rid]
        self._free(r, r.blocks)

    def _drop_pre(self, r):
        self._release_pre(r)
        self._prune_pre()

    def _prune_pre(self):
        running = self.running
        pre = self.pre
        if len(pre) == 1 and self.long_q is None:  # the common case: one prompt prefilling
            r = pre[0]
            if r.rid not in running or r.computed >= r.prefill_to:
                self.pre = []
            return
        self.pre = [r for r in self.pre if r.rid in running and r.computed < r.prefill_to]
        if self.long_q is not None:
            thr = self.long_thr
            self.long_active = sum(1 for r in self.pre if r.prompt >= thr)

    def _free(self, r, nb):
        u = r.units
        if u is None:
            self.kv.release(nb)
        else:
            self.kv.release(nb - len(u[1]) * u[2], u[1])
            r.units = None
        r.blocks = 0

    def _requeue(self, r):
        """Preempted (recompute): back to the front of its queue, to prefill prompt + generated again."""
        r.computed = 0
        r.preemptions += 1
        if r.preemptions == 1:
            self.preempted_reqs += 1
        self.preemptions += 1
        (self.long_q if self.long_q is not None and r.prompt >= self.long_thr else self.queue).push_front(r)
        self.n_queued += 1
        self.q_tokens += r.prompt
        self.world.queued += 1  # world.started() counts it out again when it is re-admitted
        self.pw[r.rid] = r
        self.seg = False

    # ------------------------------------------------------------------ prefix cache, ITL, telemetry
    def _cache_units(self, r, c):
        """Units whose tokens are all computed now join the cache (vLLM caches full blocks as they fill)."""
        u = r.units
        j, held, m, ht = u
        hashes = r.prefix_hashes
        top = min(c, r.prompt) // ht
        if top > len(hashes):
            top = len(hashes)
        if j >= top:
            return
        kv = self.kv
        while j < top:
            if kv.insert(hashes[j], m):
                held.append(hashes[j])
            j += 1
        u[0] = j

    def _gap(self, tick, v):
        vals = self.gvals
        if vals and vals[-1] <= v:
            ticks = self.gticks
            while vals and vals[-1] <= v:
                vals.pop()
                ticks.pop()
        self.gticks.append(tick)
        vals.append(v)

    def _touch(self, tick, T):
        """Step by step (the twin server reads requests live): keep decoding requests' counts current."""
        for r in self.dec.values():
            r.generated = tick - r.dec_base
            r.last_token = T

    def _flush_itl(self):
        buf = self.itl_buf
        if not len(buf):
            return
        a = np.array(buf, dtype=float).reshape(-1, 5)
        self.itl_buf = array("d")
        k = a[:, 3].astype(np.int64)
        idx = np.repeat(np.arange(k.size), k)
        off = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        gaps = a[idx, 0] + a[idx, 1] * (a[idx, 2] + off)
        self.world.add_itl(gaps, a[idx, 4].astype(np.int64))

    def _used_now(self):
        """Blocks in use at env.now, counting steps a fast-forward segment has done since its last boundary."""
        used = self.kv.used()
        j = 0
        if self.seg and self.ff and self.env.now > self.t:
            j = self._done_by(self.env.now) - self.seg_i
            if j:
                used += self._need(self.tick + 1, j)
        return used, j

    def _sample(self, used, j):
        kv = self.kv
        n = len(self.dec)
        tokens = self.sum_c + n * j + sum(r.computed for r in self.pre)
        blocks = self.dec_blocks + (used - kv.used()) + sum(r.blocks for r in self.pre)
        internal = 1.0 - tokens / (blocks * self.bs) if blocks else 0.0
        external = 0.0
        if len(self.running) < self.S:
            r = self._head()[0]
            if r is not None:
                avail = kv.num_blocks - used
                first = min(r.prompt + r.generated, self.M - n)
                if (first + self.bs - 1) // self.bs > avail:
                    external = avail / kv.num_blocks
        self.samples.extend((used / kv.num_blocks, internal, external))

    def _log(self, t0, t1, k, ptok, n, nseq, chunks):
        kv = self.kv
        self.step_log.append({"t0": t0, "t1": t1, "steps": k, "prefill_tokens": ptok, "decodes": n, "seqs": nseq,
                              "running": len(self.running), "used_blocks": kv.used(), "free_blocks": kv.free,
                              "evictable_blocks": kv.evictable, "chunks": chunks, "tick": self.tick})
