"""How llama.cpp cuts one server batch into forward passes (ubatches): the `passes` of the cost model.

llama-server builds one batch per update_slots iteration: first the sampled token of every generating slot,
in slot order, then prompt tokens of the slots still processing their prompt, slot by slot
(tools/server/server-context.cpp update_slots; each token's sequence id is its slot id). llama_decode cuts
that batch into ubatches of at most `n_ubatch` tokens (src/llama-kv-cache.cpp init_batch), and runs the whole
graph once per ubatch:

- one unified KV buffer (`--kv-unified`; llama-server's default only when the slot count is auto):
  `split_simple`, consecutive tokens of the batch up to n_ubatch: ceil(tokens / n_ubatch) passes;
- one KV stream per slot (the default for an explicit `--parallel N`): `split_equal(sequential=true)`
  (src/llama-batch.cpp). A ubatch takes the first unused token's sequence and then, scanning the batch in
  order, only a sequence whose id is one more than the last taken; every sequence in it contributes the
  same number of tokens, as many as the shortest has left, within n_ubatch. So decoding slots 0,1,2,5,7
  run as three passes ({0,1,2}, {5}, {7}), and a prompt is cut at n_ubatch.

Measured on an H200 (llama-server, Llama-3-8B shape, f16; tests/data/real/llamacpp-h200-llama3-8b-f16):
Poisson traffic at 2 req/s decoded with a median TPOT of 44.5 ms with one KV stream per slot and 27.6 ms
with `--kv-unified`, same request stream.
"""
from __future__ import annotations


def passes(dec_slots, prompt_chunks, n_ubatch: int, unified: bool) -> int:
    """Forward passes of one batch that carry decode tokens (at least 1): `dec_slots` the generating slots
    (ascending), `prompt_chunks` the (slot, tokens) of prompt processing in batch order (ascending slots).

    Only these are priced per pass (CostModel.ubatch_s): a decode pass is bound by reading the weights, while
    a prompt ubatch of hundreds of tokens is bound by its matrix multiplies, which the per-token terms
    price whether or not the prompt is cut."""
    return pass_shape(dec_slots, prompt_chunks, n_ubatch, unified)[0]


def pass_shape(dec_slots, prompt_chunks, n_ubatch: int, unified: bool) -> tuple[int, int]:
    """(decode-carrying passes, how many of them hold more than one token). ggml's CUDA backend runs a pass
    as a CUDA graph only while its batch is one token (ggml-cuda.cu: graphs are disabled when an ADD node's
    src[1]->ne[1] > 1, "batch size > 1"), so every larger pass launches its kernels one by one
    (CostModel.batched_pass_s). Measured on an H200 (tests/data/real/llamacpp-h200-llama3-8b-f16, decode-only
    steps): 4 slots in 1 / 2 / 3 / 4 passes took 9.4 / 20.0 / 22.0 / 24.5 ms, one slot 5.4 ms."""
    nd = len(dec_slots)
    if unified or nd == 0:
        n = max(1, -(-nd // n_ubatch))  # split_simple: the decode tokens lead the batch
        one_token = nd == 1 and not any(c > 0 for _, c in prompt_chunks)  # a lone decode: a CUDA graph
        return n, (0 if nd == 0 or one_token else n)
    if not prompt_chunks:  # decode only: one pass per run of consecutive slot ids
        n = big = 0
        run, last = 0, None
        for s in dec_slots:
            if last is None or s != last + 1:
                big += run > 1
                n += 1
                run = 0
            run += 1
            last = s
        return n, big + (run > 1)
    order = list(dec_slots) + [s for s, _ in prompt_chunks]
    is_dec = set(dec_slots)
    left = dict.fromkeys(dec_slots, 1)
    left.update((s, c) for s, c in prompt_chunks if c > 0)
    n = big = 0
    while any(left[s] > 0 for s in dec_slots):
        chain, last = [], None
        for s in order:
            if left.get(s, 0) > 0 and (last is None or s == last + 1):
                chain.append(s)
                last = s
        k = max(1, min(min(left[s] for s in chain), n_ubatch // len(chain)))
        for s in chain:
            left[s] -= k
        if any(s in is_dec for s in chain):
            n += 1
            big += k * len(chain) > 1
    return max(1, n), big


KV_PAD = 256  # llama_kv_cache::get_n_kv pads the KV length a pass attends over to a multiple of max(n_pad, 256)


def padded_ctx(dec_slots, ctx, steps: int = 1):
    """The decode attention's KV read of `steps` consecutive decode-only steps, with one KV stream per slot.

    A pass over the streams of slots a..b attends over a view of (b - a + 1) streams of n_kv cells each, n_kv
    the largest used extent among them padded to 256 (src/llama-kv-cache.cpp get_n_kv, get_k/get_v view_4d),
    so a short context decoding beside a long one reads as much as the long one (masked). The cost model's
    decode_ctx term is priced on this sum over passes. `dec_slots` ascending, `ctx` their contexts (tokens in
    the KV, aligned); every context grows by one a step. Returns an array of `steps` values.
    Measured on the H200 probes (tests/data/real/llamacpp-h200-llama3-8b-f16): decode-only steps of the
    held-out Poisson runs, with a profile fitted on the probes' decode steps alone, median |error| 2.97 %
    priced on this against 3.18 % on the plain sum of contexts, and the plain sum ran 3.8-4.4 % low at
    2.5-4 req/s (where this sum is 2.3-3.8x the plain one) against -0.9 to +2.3 %."""
    import numpy as np
    i = np.arange(steps)
    total = np.zeros(steps)
    n = 0
    top = 0
    last = None
    for s, c in zip(dec_slots, ctx):
        if last is not None and s != last + 1:
            total += n * np.maximum(KV_PAD, -(-(top + i) // KV_PAD) * KV_PAD)
            n = top = 0
        n += 1
        if c > top:
            top = c
        last = s
    if n:
        total += n * np.maximum(KV_PAD, -(-(top + i) // KV_PAD) * KV_PAD)
    return total
