"""llama.cpp server (`llama-server -c n_ctx -np n_parallel -b n_batch`), as its update_slots loop runs.

- `n_parallel` slots share one KV cache of `n_ctx` tokens: each slot owns n_ctx / n_parallel of it.
- A request waits in the queue until a slot is free. A prompt of at least the slot's context is refused
  when a slot picks it up (HTTP 400 `exceed_context_size_error`; context shift is off by default, so
  nothing is truncated); generation stops early, as finish_reason "length", when the slot's context
  fills (prompt + generated reaches the slot context).
- Each iteration builds one batch: every generating slot adds its one sampled token, then slots still
  processing their prompt add prompt tokens, in slot order, until the batch holds `n_batch` tokens.
  A slot whose prompt completes in a batch samples its first token at the end of that batch.
- The batch runs as one or more forward passes (ubatches): at most `n_ubatch` tokens each, and with one KV
  stream per slot (`kv_unified: false`, llama-server's default for an explicit `--parallel N`) only slots of
  consecutive ids share a pass (llamacpp_batch.py). Which slot a request gets therefore matters: a free slot
  is picked as llama-server's get_available_slot does (server-context.cpp): the longest cached prompt
  prefix over slot_prompt_similarity, else the least recently used; among never-used slots (t_last_used
  -1 ties, compared with `<=`) the highest id.
- Launching a task stalls the server loop while idle slots are copied to the host prompt cache: with
  `cache_idle_slots` (llama-server's default, with --cache-ram 8192 MiB) every idle slot whose prompt and
  output are not cached yet, else only the slot picked by LRU (server-context.cpp get_available_slot
  prompt_save, and the cache_idle_slots loop after launch_slot_with_task). The copy costs the profile's
  `slot_save_s` per token (H200, Llama-3-8B f16 KV: 68-76 us a token in the busy steps that followed a
  copy, probe and held-out runs alike; sim calibrate prices it from those steps).
  Requests that arrive during that stall are launched before the batch is built (server-queue.cpp
  start_loop pops every queued task before update_slots), so they share the batch.
- A decode's attention cost (the profile's decode_ctx_s) is priced, with one KV stream per slot, on the KV
  each pass reads: every stream of the pass as long as its longest, padded to 256 (llama-kv-cache.cpp
  get_n_kv; llamacpp_batch.padded_ctx); with `kv_unified`, on the plain sum of the decodes' contexts.
- With `prefix_caching` (llama.cpp's `cache_prompt`), a slot keeps the prompt it last served; a new
  request goes to the free slot sharing the longest prefix with it (if that covers over 10% of the
  prompt, llama.cpp's slot_prompt_similarity), else to the least recently used free slot, and only the
  uncached part is processed (at least one token, as llama.cpp re-evaluates the last one).

Decode-only stretches are fast-forwarded: while no slot processes a prompt, the steps until the first
slot finishes are one SimPy timeout, cut at a client deadline, and cut at the step in progress when a
request arrives while a slot is free. Every recorded time comes from the same sequential sums in both
modes (numpy's cumsum adds in order), so records are identical with and without fast-forward.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from . import ENGINES
from .base import EngineBase
from .llamacpp_batch import padded_ctx, pass_shape

SLOT_PROMPT_SIMILARITY = 0.1  # llama-server's default --slot-prompt-similarity


@ENGINES.register("llamacpp")
class LlamaCpp(EngineBase):
    def __init__(self, world, index, cfg, cost, queue):
        if cfg.n_ctx < cfg.n_parallel:
            raise InputError(getattr(world.sc, "_source", "<scenario>"), "engine.n_ctx",
                             f"{cfg.n_ctx} tokens cannot be split over n_parallel={cfg.n_parallel} slots")
        self.n_slots = cfg.n_parallel
        self.slot_ctx = cfg.n_ctx // cfg.n_parallel
        self.n_batch = cfg.n_batch
        self.n_ubatch = cfg.n_ubatch
        self.unified = cfg.kv_unified
        self.passes = 0
        self.prompt_cache = cfg.prefix_caching
        self.slots: list = [None] * self.n_slots
        self.limit = [0] * self.n_slots  # tokens the slot's request will generate (its target, capped by context)
        # (release time, release order): llama-server stamps t_last_used with ggml_time_us at release, and
        # releases slots in id order, so of two slots freed in one step the lower id is older; never-used
        # slots tie at -1 and its `<=` scan ends on the highest id
        self.last_used = [(-1.0, -i) for i in range(self.n_slots)]
        order = cfg.slot_order or ()
        for k, s in enumerate(order):  # used before the run, oldest first: after every never-used slot
            self.last_used[s] = (-1.0 + (k + 1) / (len(order) + 1), 0)
        self.released = 0
        # tokens of an idle slot not yet copied to the prompt cache (a run inherits those of the one before)
        self.unsaved = list(cfg.slot_tokens) if cfg.slot_tokens else [0] * self.n_slots
        self.save_all = cfg.cache_idle_slots
        self.save_s = 0.0
        self.slot_prefix: list = [None] * self.n_slots  # prefix hashes of the prompt a slot last held
        self.t = 0.0  # this engine's clock: all recorded times are sums on it, never env.now
        self.q_tokens = 0  # prompt tokens waiting in the queue (for kv_load)
        self.slot_busy_s = 0.0
        self.max_busy = 0
        self.max_step_prompt = 0
        self.context_errors = 0
        self.truncated = 0
        self.cache_hit_tokens = 0
        self.trace = None  # tests set a list: one (t0, t1, steps, busy_slots, n_decode, prompt_tokens) per wait
        super().__init__(world, index, cfg, cost, queue)

    # ------------------------------------------------------------------ queue
    def enqueue(self, req) -> None:
        self.q_tokens += req.prompt
        super().enqueue(req)

    def has_waiting(self) -> bool:
        q = self.queue
        while len(q):
            if q.peek().outcome is None:
                return True
            self.q_tokens -= q.pop().prompt
        return False

    def _take(self):
        q = self.queue
        while len(q):
            req = q.pop()
            self.q_tokens -= req.prompt
            if req.outcome is None:
                self.world.started(req, self.t)
                return req
        return None

    def kv_util(self) -> float:
        return sum(r.prefilled + r.generated for r in self.running) / self.cfg.n_ctx

    def kv_load(self) -> float:
        return (sum(r.prefilled + r.generated for r in self.running) + self.q_tokens) / self.cfg.n_ctx

    def stats(self) -> dict:
        st = super().stats()
        span = self.env.now * self.n_slots
        st["slots"] = {"n_parallel": self.n_slots, "slot_ctx": self.slot_ctx, "n_batch": self.n_batch,
                       "utilisation": round(self.slot_busy_s / span, 6) if span > 0 else 0.0,
                       "max_busy": self.max_busy, "max_step_prompt_tokens": self.max_step_prompt,
                       "forward_passes": self.passes, "prompt_cache_save_s": round(self.save_s, 6),
                       "context_errors": self.context_errors, "truncated_at_context": self.truncated,
                       "prompt_cache_hit_tokens": self.cache_hit_tokens}
        return st

    # ------------------------------------------------------------------ slots
    def _cached(self, req, s) -> int:
        a, b = req.prefix_hashes, self.slot_prefix[s]
        if not a or not b:
            return 0
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return min(n * int(self.world.stream.hash_block[req.cls]), req.prompt - 1)  # the twin grows this array

    def _pick_slot(self, req):
        free = [s for s in range(self.n_slots) if self.slots[s] is None]
        if self.prompt_cache and req.prefix_hashes:
            best, hit = -1, 0
            for s in free:
                c = self._cached(req, s)
                if c > hit:
                    best, hit = s, c
            if best >= 0 and hit > SLOT_PROMPT_SIMILARITY * req.prompt:
                return best, hit
        s = min(free, key=self.last_used.__getitem__)
        return s, (self._cached(req, s) if self.prompt_cache else 0)

    def _save(self, s):
        """The loop stalls while idle slots' KV state is copied to the prompt cache (at a task launch)."""
        u = self.unsaved
        n = sum(u) if self.save_all else u[s]  # busy slots hold 0: they are marked at release
        if self.save_all:
            self.unsaved = [0] * self.n_slots
        else:
            u[s] = 0
        if n:
            dt = self.cost.slot_save_s * n
            self.t += dt
            self.busy_s += dt
            self.save_s += dt
        return n

    def _fill(self):
        """Free slots take waiting requests (llama.cpp launches tasks before building the batch).

        A launch's prompt-cache copy stalls the loop; requests that arrive meanwhile are launched before
        the batch is built (server-queue.cpp start_loop pops every queued task, re-checking the queue after
        each, before it calls update_slots), so the clock is caught up after each stall."""
        world = self.world
        changed = False
        while len(self.running) < self.n_slots and self.has_waiting():
            req = self._take()
            t = self.t
            if req.prompt >= self.slot_ctx:
                self.context_errors += 1
                req.http_status = 400
                req.error = (f"exceed_context_size_error: request ({req.prompt} tokens) exceeds the available "
                             f"context size ({self.slot_ctx} tokens), try increasing it")
                world.finish(req, "http_error", t)
                continue
            s, cached = self._pick_slot(req)
            self.slots[s] = req
            self.limit[s] = min(req.target, self.slot_ctx - req.prompt)
            req.prefilled = req.cached = cached
            self.cache_hit_tokens += cached
            self.running = [r for r in self.slots if r is not None]
            changed = True
            if self.cost.slot_save_s and self._save(s):
                yield self.env.timeout(max(0.0, self.t - self.env.now))
        if changed and len(self.running) > self.max_busy:
            self.max_busy = len(self.running)

    def _retire(self, t):
        """Finish slots whose request is done or whose client has hung up; free them."""
        world, slots, done = self.world, self.slots, False
        for s in range(self.n_slots):
            r = slots[s]
            if r is None:
                continue
            if r.generated >= self.limit[s]:
                if r.generated < r.target:
                    self.truncated += 1
                world.finish(r, "ok", t)
            elif r.deadline <= t:
                world.finish(r, "timeout", t)
            else:
                continue
            slots[s] = None
            self.last_used[s] = (t, self.released)
            self.unsaved[s] = r.prompt + r.generated
            self.released += 1
            self.slot_prefix[s] = r.prefix_hashes
            done = True
        if done:
            self.running = [r for r in slots if r is not None]

    # ------------------------------------------------------------------ loop
    def loop(self):
        env, slots = self.env, self.slots
        while True:
            yield from self._fill()
            if not self.running:
                yield self.idle()
                self.t = env.now
                continue
            decs, pre = [], []
            for s in range(self.n_slots):
                r = slots[s]
                if r is not None:
                    (decs if r.prefilled >= r.prompt else pre).append(s)
            if pre:
                yield from self._mixed_step(decs, pre)
            else:
                yield from self._decode_run(decs)

    def _account(self, t0, t1, k, n_batch_seqs, n_dec, ptoks):
        self.steps += k
        self.busy_s += t1 - t0
        self.slot_busy_s += len(self.running) * (t1 - t0)
        self.batch_sizes[n_batch_seqs] = self.batch_sizes.get(n_batch_seqs, 0) + k
        if ptoks > self.max_step_prompt:
            self.max_step_prompt = ptoks
        if self.trace is not None:
            self.trace.append((t0, t1, k, len(self.running), n_dec, ptoks))

    def _mixed_step(self, decs, pre):
        env, world, slots = self.env, self.world, self.slots
        budget = self.n_batch - len(decs)
        if self.unified:
            dctx = 0
            for s in decs:
                r = slots[s]
                dctx += r.prompt + r.generated
        else:  # one KV stream per slot: each pass reads its widest stream's extent for every stream in it
            dctx = float(padded_ctx(decs, [slots[s].prompt + slots[s].generated for s in decs])[0]) if decs else 0.0
        chunks, ptoks, pattn = [], 0, 0
        for s in pre:
            if budget <= 0:
                break
            r = slots[s]
            c = min(r.prompt - r.prefilled, budget)
            chunks.append((s, c))
            budget -= c
            ptoks += c
            pattn += c * (r.prefilled + c)
        np_, nb = pass_shape(decs, chunks, self.n_ubatch, self.unified)
        self.passes += np_
        dt = self.cost.step_time(ptoks, pattn, len(decs), dctx, np_, nb)
        t0 = self.t
        t1 = t0 + dt
        yield env.timeout(max(0.0, t1 - env.now))
        bs = len(decs) + len(chunks)
        self._account(t0, t1, 1, bs, len(decs), ptoks)
        got = []
        for s in decs:
            r = slots[s]
            r.generated += 1
            r.last_token = t1
            if dt > r.itl_max:
                r.itl_max = dt
            got.append(r)
        ns = sum(slots[s].stream for s in decs)  # a client sees inter-token gaps only in a stream
        if ns:
            world.add_itl(dt, ns)
        for s, c in chunks:
            r = slots[s]
            r.prefilled += c
            if r.prefilled >= r.prompt:
                r.first_token = r.last_token = t1
                r.generated = 1
                r.batch_size = bs
                got.append(r)
        if got:
            world.emit(got, (t1,))
        self.t = t1
        self._retire(t1)

    def _decode_run(self, decs):
        env, world, slots = self.env, self.world, self.slots
        rs = [slots[s] for s in decs]
        n = len(rs)
        k = min(self.limit[s] - slots[s].generated for s in decs) if self.cfg.fast_forward else 1
        if self.unified:
            ctx = sum(r.prompt + r.generated for r in rs) + n * np.arange(k)
        else:
            ctx = padded_ctx(decs, [r.prompt + r.generated for r in rs], k)
        np_, nb = pass_shape(decs, (), self.n_ubatch, self.unified)
        times = self.cost.step_times(0, 0, n, ctx, np_, nb)
        t0 = self.t
        ends = np.cumsum(np.concatenate(((t0,), times)))[1:]  # in-order sums: the step-by-step clock exactly
        dmin = min(r.deadline for r in rs)
        if ends[-1] >= dmin:  # a client hangs up inside this run: stop at the step it happens in
            k = int(np.searchsorted(ends, dmin)) + 1
        end = float(ends[k - 1])
        if k > 1 and n < self.n_slots:
            # a free slot: an arrival starts its prompt at the end of the step in progress
            yield env.timeout(max(0.0, end - env.now)) | self.idle()
            if env.now < end:
                k = int(np.searchsorted(ends[:k], env.now, side="right")) + 1
                end = float(ends[k - 1])
                yield env.timeout(max(0.0, end - env.now))
        else:
            yield env.timeout(max(0.0, end - env.now))
        times = times[:k]
        self._account(t0, end, k, n, n, 0)
        self.passes += np_ * k
        ns = sum(r.stream for r in rs)
        if ns:
            world.add_itl(times, ns)
        mx = float(times.max())
        for r in rs:
            r.generated += k
            r.last_token = end
            if mx > r.itl_max:
                r.itl_max = mx
        if world.token_listener is not None:
            world.emit(rs, ends[:k])
        self.t = end
        self._retire(end)
