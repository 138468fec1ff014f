"""The `continuous` engine's steps: applying a step (or a run of decode-only steps) that has ended, the
closed-form arithmetic of fast-forward segments, per-step events (first tokens, finishes, deadlines),
inter-token gaps and KV telemetry. A mixin of `continuous.Continuous`; it keeps no state of its own
(every attribute is the engine's, set in its __init__).

A request's first token comes at the end of the step that completes its prefill; every later step gives
each decoding request one token. A client deadline ends a request at the first step boundary at or
after it (outcome timeout); its blocks are freed there.

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
from heapq import heappop, heappush

import numpy as np

INF = float("inf")
ITL_FLUSH = 5 * 100_000  # buffered gap descriptors (5 floats each) before they go to the world


class Stepping:
    """Applying steps, fast-forward arithmetic, gaps and telemetry, for `Continuous` (see the module docstring)."""

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
