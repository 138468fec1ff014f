"""Step costs from the server's own count of its steps (sim calibrate, vLLM).

vLLM counts every engine step and the tokens it scheduled in the histogram vllm:iteration_tokens_total
(vllm/v1/metrics/loggers.py: one observation per scheduler iteration, prompt and generation tokens
together), which `stress run` reads at the start and the end of each run (server.json `histograms`). Over a
run the engine was busy for the sum of its step times, so per run

    busy_s = overhead_s * steps + linear_per_token_s * (prompt + decode tokens) + decode_seq_s * decode tokens
             + decode_ctx_s * (context of every decode) + prefill_attn_s * (prompt tokens x prompt length)

which is linear in the coefficients: non-negative least squares over the calibration runs, relative
residuals. It needs no step to be seen whole in the token arrivals, which under vLLM's async scheduling
the steps holding prompts are not: a prompt's scheduling (block allocation, prefix hashing, input
preparation) runs on the CPU while the step before it is still being sent, so its cost shows up split over
two intervals (measured on the H200 data set: a 7,007-token prompt's 177 ms as 28.5 ms + 148.5 ms; short
prompts look free read one way and cost a whole step read the other). Measured there: the reconstructed
steps fitted with the roofline put prefill at 10 us/token where the idle sweep says 27 us/token; over the
16 probe runs this run-level fit leaves each run's busy time within 1.7 % (median), 5.2 % at most but one
(9.0 %).

The busy time is the union over the run's requests of [send + front end, last token]: the engine is busy
whenever a request is in it (a continuous-batching engine steps while any request runs). Each request adds
one decode the client never sees: async scheduling schedules a finished request's next step before it knows
it finished (the histogram's token sum exceeds prompt + output - 1 by one per request, in every run).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .tracefit import computed_prompts, server_tokens

STEP_FAMILY = "vllm:iteration_tokens_total"
TERMS = ("overhead_s", "linear_per_token_s", "decode_seq_s", "decode_ctx_s", "prefill_attn_s")
MIN_RUNS = 6
TOKEN_MISMATCH = 0.02  # the server counted other tokens than the run's (other traffic, recomputed preemptions)


def busy_seconds(send: np.ndarray, end: np.ndarray) -> float:
    """Length of the union of the intervals [send, end]."""
    o = np.argsort(send, kind="stable")
    s, e = send[o], end[o]
    total, cur_s, cur_e = 0.0, s[0], e[0]
    for a, b in zip(s[1:], e[1:]):
        if a > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return total + cur_e - cur_s


def run_row(run, frontend_s: float) -> tuple[dict | None, str]:
    """(the run's totals, "") or (None, why it cannot be used)."""
    h = run.server_histograms().get(STEP_FAMILY)
    if not h:
        return None, "the server reported no step count (vllm:iteration_tokens_total)"
    df = run.requests
    done = df[df["end_s"].notna() & df["arrival_s"].notna()] if "end_s" in df.columns else df.iloc[:0]
    ok = done[done["outcome"] == "ok"]
    if len(ok) < len(done) or not len(ok):
        return None, "requests that did not end ok (their tokens are unknown)"
    p = server_tokens(ok, "prompt_tokens").to_numpy(float)
    o = server_tokens(ok, "output_tokens").to_numpy(float)
    computed = computed_prompts(ok).to_numpy(float)
    if abs(h["sum"] - (computed.sum() + o.sum())) > TOKEN_MISMATCH * h["sum"]:
        return None, (f"the server counted {h['sum']:.0f} tokens, the run's requests {computed.sum() + o.sum():.0f} "
                      "(other traffic, or preempted requests recomputed)")
    busy = busy_seconds(ok["arrival_s"].to_numpy(float) + frontend_s, ok["end_s"].to_numpy(float))
    # decode k of a request (k = 1 .. output) runs over its prompt and the k tokens before it
    return {"run": run.name, "steps": float(h["count"]), "tokens": computed.sum() + o.sum(), "decodes": o.sum(),
            "decode_ctx": float(np.sum(p * o + o * (o + 1) / 2)), "prefill_attn": float(np.sum(computed * p)),
            "busy_s": busy}, ""


def fit_step_counts(runs, frontend_s: float) -> tuple[dict | None, dict]:
    """(coefficients, info) from the runs' step counts, or (None, info with the reason)."""
    from scipy.optimize import nnls
    rows, skipped = [], {}
    for r in runs:
        row, why = run_row(r, frontend_s)
        if row is None:
            skipped[r.name] = why
        else:
            rows.append(row)
    info = {"runs": len(rows), **({"left_out": skipped} if skipped else {})}
    if len(rows) < MIN_RUNS:
        info["reason"] = f"{len(rows)} runs with the server's step count (at least {MIN_RUNS} needed)"
        return None, info
    t = pd.DataFrame(rows)
    y = t["busy_s"].to_numpy(float)
    a = np.c_[t["steps"], t["tokens"], t["decodes"], t["decode_ctx"], t["prefill_attn"]]
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    aw = a / scale / y[:, None]
    if np.linalg.matrix_rank(aw) < len(TERMS):
        info["reason"] = "the runs' steps, tokens and contexts do not vary independently (run the decode probes " \
                         "at several users and two prompt lengths, and the Poisson probes)"
        return None, info
    x, _ = nnls(aw, np.ones(len(y)))
    coef = dict(zip(TERMS, (x / scale).tolist()))
    err = 100 * (a @ (x / scale) - y) / y
    info.update(per_run_error_pct={n: round(float(e), 2) for n, e in zip(t["run"], err)},
                median_abs_error_pct=round(float(np.median(np.abs(err))), 2),
                max_abs_error_pct=round(float(np.max(np.abs(err))), 2))
    return coef, info
