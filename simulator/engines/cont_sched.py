"""The `continuous` engine's scheduler (vLLM v1 scheduler semantics, counts only): what a step boundary
reserves, preempts and admits, and what leaving the batch frees. A mixin of `continuous.Continuous`; it
keeps no state of its own (every attribute is the engine's, set in its __init__).

At each boundary:
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
"""
from __future__ import annotations

from bisect import bisect_right


class Scheduling:
    """Scheduling at a step boundary, for `Continuous` (see the module docstring)."""

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
