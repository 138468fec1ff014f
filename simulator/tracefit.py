"""Engine steps reconstructed from what a client measured (trace-only calibration, `sim calibrate RUN_DIR`).

No engine instrumentation: the inputs are a run folder's per-chunk token arrivals (tokens.parquet), its
requests (send times, the server's own prompt token counts from client.csv) and its facts (server.json).

1. **Steps from token arrivals.** A continuous-batching server (vLLM V1's scheduler, llama-server's
   update_slots loop) gives every running sequence one token per engine step, so the tokens of one step
   reach the client together. All chunk arrival times of a run are sorted and cut into clusters: a cluster
   ends when the next arrival is more than `window` after its first one, or when a request already in it
   arrives again (one token per request per step). `window` is a fraction of the typical inter-token gap.
   A cluster's time is its earliest arrival: the least delayed by the front end's streaming.
2. **What each step held.** Decodes: the requests between their first and last token at that time, each
   with context = prompt + tokens received before it. Prefill: the prompts whose first token is in the
   cluster, processed as the servers do, decodes first and then prompt tokens up to the token budget
   (vLLM `max_num_batched_tokens`, scheduler.py `token_budget`; llama.cpp `n_batch`, server.cpp
   update_slots), so a prompt longer than the remaining budget was chunked over the steps before (walked
   back step by step).
3. **Which step durations are measured.** The interval between two clusters is one step only if the
   engine was busy throughout (some request was decoding across it) and every decoding request emitted
   exactly one token in it (no merged chunks, no missed step). Others are left out.
4. A step whose prefill shows no cost beyond the decode-only prediction is a prefix-cache hit, not a
   measurement of prefill cost (`drop_cached`): vLLM's prefix cache, llama.cpp's slot prompt cache.

The front end (HTTP, tokenisation, detokenisation and streaming around the engine) is fitted apart from
the steps: requests sent to an idle server have TTFT = front-end latency + their prefill step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import InputError
from .runfolder import RunFolder, read_tokens

WINDOW_FRACTION = 0.4  # of the median inter-token gap


@dataclass
class RunSteps:
    name: str
    steps: pd.DataFrame  # FEATURES + time_s + run + t_s
    idle: pd.DataFrame  # requests sent to an idle server: prompt, ttft_s, n_decode_after
    info: dict


def server_tokens(df: pd.DataFrame, column: str) -> pd.Series:
    """`prompt_tokens` or `output_tokens` as the server counted them (client.csv `<column>_server`) where it
    said, else as the client did."""
    v = df[column].astype(float)
    if f"{column}_server" in df.columns:
        s = pd.to_numeric(df[f"{column}_server"], errors="coerce")
        v = s.where(s > 0, v)
    return v


def computed_prompts(df: pd.DataFrame) -> pd.Series:
    """The prompt tokens the engine computed: the server's count less what its prefix cache served."""
    p = server_tokens(df, "prompt_tokens")
    if "prefix_cached_tokens" in df.columns:
        p = (p - pd.to_numeric(df["prefix_cached_tokens"], errors="coerce").fillna(0)).clip(lower=1)
    return p


def _requests(run: RunFolder) -> pd.DataFrame:
    df = run.requests
    ok = df[(df["outcome"] == "ok") & (df["stream"] == 1)].copy()
    ok["P"] = computed_prompts(ok).astype(np.int64)
    return ok.set_index("request_id")


def _pass_shapes(req, f_arr, l_arr, c_time, probe, firsts, budget, ubatch, chunks=None) -> tuple | None:
    """(forward passes beyond the first, passes of more than one token, decode KV read) of each step, from the
    slot that ran each request (client.csv `server_slot`, llama-server's id_slot): the decoding slots at the
    step and the prompts whose first token it emitted, cut as llama.cpp cuts a batch (engines/llamacpp_batch.py).
    With one KV stream per slot the decode KV read is padded per pass (llamacpp_batch.padded_ctx), from each
    decoding request's context at the step: its prompt and the tokens received before it (`chunks`: per request
    the chunk times and the running token count); None with a unified KV (the plain sum of contexts)."""
    if ubatch is None or "server_slot" not in req.columns:
        return None
    slot = pd.to_numeric(req["server_slot"], errors="coerce").to_numpy()
    if np.isnan(slot).any():
        return None
    from .engines.llamacpp_batch import padded_ctx, pass_shape
    slot = slot.astype(np.int64)
    n_ubatch, unified = ubatch
    kv = None if unified or chunks is None else np.zeros(len(c_time))
    P = req["P"].to_numpy(np.int64)
    f_ord, l_ord = np.argsort(f_arr, kind="stable"), np.argsort(l_arr, kind="stable")
    active: dict = {}
    a = b = 0
    out = np.zeros(len(c_time), dtype=np.int64)
    big = np.zeros(len(c_time), dtype=np.int64)
    for j in range(len(c_time)):
        while a < len(f_ord) and f_arr[f_ord[a]] < probe[j]:
            active[f_ord[a]] = slot[f_ord[a]]
            a += 1
        while b < len(l_ord) and l_arr[l_ord[b]] < probe[j]:
            active.pop(l_ord[b], None)
            b += 1
        dec = sorted(active.values())
        room = max(1, budget - len(dec))
        pre = sorted((int(slot[q]), int(min(P[q], room))) for q in firsts[j])
        n, big[j] = pass_shape(dec, pre, n_ubatch, unified)
        out[j] = n - 1
        if kv is not None and active:
            by_slot = sorted((s, q) for q, s in active.items())
            ctx = []
            for _, q in by_slot:
                ts, cum = chunks[q]
                k = int(np.searchsorted(ts, probe[j], side="left"))
                ctx.append(int(P[q]) + (int(cum[k - 1]) if k else 0))
            kv[j] = padded_ctx([s for s, _ in by_slot], ctx)[0]
    return out, big, kv


def _slot_saves(start, l_arr, tokens, c_time, window, inherited: float = 0.0) -> np.ndarray:
    """Tokens llama-server copied to its prompt cache when it launched each request: every slot that went
    idle since the previous launch (its prompt and output), as its cache_idle_slots does on a new task
    (server-context.cpp, common.h cache_idle_slots = true, cache_ram_mib 8192), and at the run's first launch
    what the run before left (`inherited`, simulator/slotstate.py). A launch happens in the loop between two
    steps, so it stalls the step that starts the request's prompt."""
    saves = np.zeros(len(start))
    ends = np.argsort(l_arr, kind="stable")
    k, pool = 0, float(inherited)
    for q in np.argsort(start, kind="stable"):
        j = start[q]
        edge = c_time[j - 1] + window / 2 if j > 0 else -np.inf
        while k < len(ends) and l_arr[ends[k]] < edge:
            pool += tokens[ends[k]]
            k += 1
        saves[q], pool = pool, 0.0
    return saves


def _inherited(run: RunFolder) -> float:
    """Tokens the run before this one (run_order.txt) left in llama-server's slots, not in its prompt cache."""
    from .slotstate import inherited_tokens, predecessor
    n = run.facts.get("total_slots")
    prev = predecessor(run) if isinstance(n, int) and n > 0 else None
    held = inherited_tokens(prev, n) if prev is not None else None
    return float(sum(held)) if held else 0.0


def reconstruct(run: RunFolder, budget: int, window_fraction: float = WINDOW_FRACTION,
                ubatch: tuple | None = None, emit_lag: int = 0) -> RunSteps:
    """`ubatch` = (n_ubatch, kv_unified) for llama.cpp: with the server's slot of every request known, each
    step also gets `extra_passes`. `emit_lag`: steps between the step that computes a token and the one
    whose end sends it. vLLM's async scheduling (on by default since it exists: vllm/config/vllm.py
    `async_scheduling = True` unless incompatible) runs step k+1 before step k's sampled tokens go out, so
    the tokens reaching the client at one time are step k's while the interval before them is step k+1:
    a prompt whose first token arrives with cluster j was computed in the interval ending at cluster j-1.
    calibrate_runs tries 0 and 1 and keeps the one the steps fit better."""
    if str(run.server.get("send_times") or "").startswith("reconstructed"):
        # a vLLM bench file without start_times (simulator/import_vllm_bench.py): each request's token times
        # are off by its send's error, ~10 ms at 64 streams, while steps are told apart by ~2 ms
        raise InputError(run.label, "start_times", "missing, and send times reconstructed from the latencies are "
                         "not precise enough to tell engine steps apart (ms off per request); calibrate from files "
                         "with start_times (vLLM bench serve since PR #32667) or stress probe runs; sim replay "
                         "takes this file")
    tok = read_tokens(run.path)
    req = _requests(run)
    tok = tok[tok["request_id"].isin(req.index) & (tok["n_tokens"] > 0)]
    if len(req) < 2 or len(tok) < 10:
        raise InputError(run.label, "tokens.parquet", f"too few streamed ok requests with token times "
                                                            f"({len(req)} requests, {len(tok)} chunks)")
    tok = tok.sort_values(["request_id", "t_s"], kind="stable")
    rid = tok["request_id"].to_numpy()
    t = tok["t_s"].to_numpy()
    n = tok["n_tokens"].to_numpy().astype(np.int64)
    new_req = np.r_[True, rid[1:] != rid[:-1]]
    before = np.cumsum(n) - n  # tokens of the request received before this chunk
    starts = np.flatnonzero(new_req)
    before -= np.repeat(before[starts], np.diff(np.r_[starts, len(n)]))
    gaps = np.diff(t)[~new_req[1:]]
    if not len(gaps):
        raise InputError(run.label, "tokens.parquet", "no request received more than one chunk")
    med_gap = float(np.median(gaps))
    window = max(2e-4, window_fraction * med_gap)

    first = tok.groupby("request_id")["t_s"].min()
    last = tok.groupby("request_id")["t_s"].max()
    req = req.loc[first.index]
    P = req["P"].to_numpy(np.int64)
    rid_index = {r: i for i, r in enumerate(first.index)}
    out_total = tok.groupby("request_id")["n_tokens"].sum().to_numpy(np.int64)
    f_arr, l_arr = first.to_numpy(), last.to_numpy()

    # -- clusters over all chunks in time order
    order = np.argsort(t, kind="stable")
    ts, rs, ns, ks = t[order], rid[order], n[order], before[order]
    cl_start = []
    cur, cur_t0 = set(), None
    for i in range(len(ts)):
        if cur_t0 is None or ts[i] - cur_t0 > window or rs[i] in cur:
            cl_start.append(i)
            cur, cur_t0 = set(), ts[i]
        cur.add(rs[i])
    bounds = np.r_[cl_start, len(ts)]
    nc = len(cl_start)
    c_time = ts[bounds[:-1]]

    # -- state at each cluster: active decoders and their context (prefix sums over request first/last times)
    f_ord, l_ord = np.argsort(f_arr, kind="stable"), np.argsort(l_arr, kind="stable")
    fs, ls = f_arr[f_ord], l_arr[l_ord]
    cumP_f = np.r_[0, np.cumsum(P[f_ord])]
    cumP_l = np.r_[0, np.cumsum(P[l_ord])]
    cumO_l = np.r_[0, np.cumsum(out_total[l_ord])]
    cum_tok = np.r_[0, np.cumsum(ns)]
    probe = c_time - window / 2
    nf = np.searchsorted(fs, probe, side="left")  # first token strictly before this cluster
    nl = np.searchsorted(ls, probe, side="left")  # finished before this cluster
    n_active = nf - nl
    tok_before = cum_tok[np.searchsorted(ts, probe, side="left")]
    ctx = (cumP_f[nf] - cumP_l[nl]) + (tok_before - cumO_l[nl])

    rows = []
    pf_tokens = np.zeros(nc, dtype=np.int64)
    pf_attn = np.zeros(nc)
    emit_dec = np.zeros(nc, dtype=np.int64)
    multi = np.zeros(nc, dtype=bool)
    firsts: list = [[] for _ in range(nc)]
    for j in range(nc):
        a, b = bounds[j], bounds[j + 1]
        for i in range(a, b):
            if ks[i] == 0:
                firsts[j].append(rid_index[rs[i]])
            else:
                emit_dec[j] += 1
            if ns[i] > 1:
                multi[j] = True
    # -- prefill attribution, decodes first then prompt tokens up to the budget, walking back for long prompts
    start = np.zeros(len(P), dtype=np.int64)  # the step each prompt started in
    sent_at = req["arrival_s"].to_numpy(float)
    for jc in range(nc):
        j = max(0, jc - emit_lag)  # the step that computed the prompt's end (and sampled its first token)
        for q in firsts[jc]:
            left = int(P[q])
            jj = j
            start[q] = j
            sent = sent_at[q]
            while left > 0 and jj >= 0:
                room = budget - int(n_active[jj]) - int(pf_tokens[jj])
                if jj < jc and (n_active[jj] == 0 and jj > 0 and c_time[jj] - c_time[jj - 1] > 4 * med_gap):
                    break  # the engine was idle before: the rest was computed in a step we did not see end
                if jj < jc and (jj == 0 or c_time[jj - 1] < sent):
                    break  # that step began before the request was sent: none of its prompt is in it
                take = left if jj == jc and room >= left else max(0, min(left, room))
                if take <= 0 and jj == jc and pf_tokens[jj] == 0:
                    take = min(left, budget)  # a budget smaller than assumed: keep it in the step
                ctx_before = left - take
                if take > 0:
                    start[q] = jj
                pf_tokens[jj] += take
                pf_attn[jj] += take * (ctx_before + take)
                left -= take
                jj -= 1
    chunks = None
    if ubatch is not None and not ubatch[1]:
        ends = np.r_[starts, len(n)]
        cum_all = np.cumsum(n)
        chunks = [None] * len(first)
        for a, b in zip(ends[:-1], ends[1:]):
            chunks[rid_index[rid[a]]] = (t[a:b], cum_all[a:b] - (cum_all[a - 1] if a else 0))
    shape = _pass_shapes(req, f_arr, l_arr, c_time, probe, firsts, budget, ubatch, chunks)
    extra, batched, kv = shape if shape is not None else (None, None, None)
    if kv is not None:
        ctx = np.where(n_active > 0, kv, ctx)
    saves = _slot_saves(start, l_arr, P + out_total, c_time, window, _inherited(run)) if ubatch is not None else None
    step_save = np.zeros(nc)
    if saves is not None:
        np.add.at(step_save, start, saves)
    for j in range(1, nc):
        d = c_time[j] - c_time[j - 1]
        busy = n_active[j] > 0
        clean = (not multi[j]) and emit_dec[j] == n_active[j]
        # an interval far shorter than the typical gap is two steps' tokens delivered bunched (a stalled
        # stream catching up), not a step: its relative error would swamp every real one
        if busy and clean and d > 0.2 * med_gap:
            rows.append((int(pf_tokens[j]), float(pf_attn[j]), int(n_active[j]), float(ctx[j]), d, c_time[j],
                         int(extra[j]) if extra is not None else 0, float(step_save[j]),
                         int(batched[j]) if batched is not None else 0))
    steps = pd.DataFrame(rows, columns=["prefill_tokens", "prefill_attn", "n_decode", "decode_ctx", "time_s", "t_s",
                                        "extra_passes", "save_tokens", "batched_passes"])
    steps["run"] = run.name

    # -- requests sent to an idle server: nothing else in flight from their send to their first token
    sends = req["arrival_s"].to_numpy(float)
    ttft = req["ttft_s"].to_numpy(float)
    idle = []
    all_send = run.requests["arrival_s"].to_numpy(float)
    all_end = run.requests["end_s"].to_numpy(float) if "end_s" in run.requests.columns else None
    for q in range(len(req)):
        s, ft = sends[q], sends[q] + ttft[q]
        if all_end is not None:
            overlap = np.sum((all_send < ft) & (np.nan_to_num(all_end, nan=np.inf) > s)) - 1
        else:
            overlap = np.sum((f_arr < ft) & (l_arr > s)) - 1
        if overlap == 0:
            idle.append((int(P[q]), float(ttft[q]), float(saves[q]) if saves is not None else 0.0))
    idle_df = pd.DataFrame(idle, columns=["prompt", "ttft_s", "save_tokens"])
    info = {"run": run.name, "chunks": int(len(ts)), "clusters": int(nc), "steps": int(len(steps)),
            "window_ms": round(window * 1e3, 3), "median_gap_ms": round(med_gap * 1e3, 3),
            "requests": int(len(req)), "idle_requests": int(len(idle_df)), "emit_lag_steps": emit_lag}
    return RunSteps(run.name, steps, idle_df, info)


def drop_cached(steps: pd.DataFrame, decode_only_pred: np.ndarray, margin: float = 0.10) -> pd.Series:
    """True for steps that hold prefill tokens yet took no longer than the decode-only prediction
    (+ margin): their prompt was served from a prefix cache, so they say nothing about prefill cost."""
    pf = steps["prefill_tokens"].to_numpy() > 0
    big = steps["prefill_tokens"].to_numpy() >= 64
    return pd.Series(pf & big & (steps["time_s"].to_numpy() <= decode_only_pred * (1 + margin)), index=steps.index)
