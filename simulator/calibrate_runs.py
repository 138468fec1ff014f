"""`sim calibrate RUN_DIR [RUN_DIR ...]`: a cost profile from what a client measured (trace-only calibration).

1. Steps from each run's token arrivals (simulator/tracefit.py), pooled over the runs.
2. Step terms fitted by simulator/fitting.py on those steps, trimmed: rows more than `trim` off the current
   fit are left out and the fit repeated (a cluster cut in two by a slow front end, a step that also ran
   a preempted request's recompute, a machine hiccup), and prefills served from a prefix cache (steps with
   prompt tokens but no extra time) are dropped before the last round.
3. The front end: requests sent to an idle server (probe_prefill) have TTFT = front end + one step with
   their prompt; short prompts (whose step the decode fit already knows) give the front-end latency, long
   ones then give prefill steps measured end to end, added to the table for the final fit.
4. Refused with one line naming the experiment when the runs cannot determine a term.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .costmodel import COEFFICIENTS, CostModel
from .errors import InputError
from .fitting import error_stats, evaluate, fit, rounded
from .runfolder import load_run_folder
from .refine import _open_loop, _saturated, refine_by_replay
from .stepcount import TERMS as STEP_COUNT_TERMS, fit_step_counts
from .tracefit import drop_cached, reconstruct

# Token budgets the servers default to: vLLM V1's max_num_batched_tokens for the OpenAI server on a GPU
# of >= 70 GiB (vllm/engine/arg_utils.py, default_max_num_batched_tokens: 8192, as its log says at start:
# "Chunked prefill is enabled with max_num_batched_tokens=8192"); llama-server's --batch-size 2048
# (common/common.h n_batch).
BUDGETS = {"continuous": 8192, "llamacpp": 2048}
TRIM_PCT = 35.0
UBATCH = 512  # llama.cpp's n_ubatch default (common/common.h)
MIN_SAVE_STEPS = 20  # busy steps after a prompt-cache copy needed to price the copy from them
SHORT_PROMPT = 256  # idle requests this short give the front-end latency


def _balanced(steps: pd.DataFrame) -> pd.DataFrame:
    """Each kind of step (decode-only, mixed, prefill-only) weighs as much in total as the others, so ten
    thousand decode steps cannot drown the few dozen prefills that fix the prefill terms."""
    pf, dec = steps["prefill_tokens"].to_numpy() > 0, steps["n_decode"].to_numpy() > 0
    kind = np.where(pf, np.where(dec, 1, 2), 0)
    counts = np.bincount(kind, minlength=3).astype(float)
    w = (len(steps) / (np.count_nonzero(counts) * counts[kind]))
    return steps.assign(weight=w)


def _fit_trimmed(steps: pd.DataFrame, rounds: int = 4, fixed: dict | None = None):
    steps = _balanced(steps)
    keep = np.ones(len(steps), dtype=bool)
    model = None
    for _ in range(rounds):
        model, _ = fit(steps[keep], fixed=fixed)
        err = evaluate(model, steps)["error_pct"].abs().to_numpy()
        new = err < TRIM_PCT
        if new.sum() < 20 or (new == keep).all():
            keep = new if new.sum() >= 20 else keep
            break
        keep = new
    model, stats = fit(_balanced(steps[keep]), fixed=fixed)
    return model, keep, stats


def _reports_cached(run) -> bool:
    """The run says per request how many prompt tokens the server's prefix cache served."""
    c = run.requests.get("prefix_cached_tokens")
    return c is not None and bool(c.notna().any())


HIDDEN_HIT_PCT = 1.0  # a prefix cache that served more of a run's prompt tokens than this, unattributed


def _hidden_hits(run) -> float | None:
    """% of the run's prompt tokens a vLLM prefix cache served without saying for which requests: 0 when
    client.csv has prefix_cached_tokens, the server's counters when it has them (RunFolder.prefix_cache),
    else None (unknown: vLLM caches prefixes by default)."""
    if run.kind != "vllm" or _reports_cached(run):
        return 0.0
    pc = run.prefix_cache()
    return pc["hit_pct"] if pc is not None else None


def _prefill_from_sweep(pf: pd.DataFrame, steps: pd.DataFrame, model: CostModel) -> dict:
    """The prefill terms when busy steps' prefills may be served from a hidden prefix cache.

    linear_per_token_s and prefill_attn_s: the slope of TTFT over prompt length in the prefill sweep (prompts
    sent to an idle server; intercept free, since it holds the front end), relative residuals under a Cauchy
    loss (scale 10 %) so a repeat served from the cache (measured: a third of the vLLM sweep's long prompts),
    an outlier far below the others, does not pull it down. prefill_overhead_s: what a busy step with a
    short prompt (under 512 tokens, mostly below one cacheable block run) costs beyond its decodes and its
    tokens (vLLM runs mixed batches with piecewise CUDA graphs, decode-only ones with full graphs:
    compilation_config cudagraph_mode FULL_AND_PIECEWISE)."""
    from scipy.optimize import least_squares
    big = pf[pf["prefill_tokens"] >= 512]
    p = big["prefill_tokens"].to_numpy(float)
    y = big["time_s"].to_numpy(float)
    scale = np.array([1e-2, 2e-5, 1e-9])

    def resid(u):
        a, b, c = u * scale
        return (a + b * p + c * p * p - y) / y

    res = least_squares(resid, np.ones(3), bounds=(0, np.inf), loss="cauchy", f_scale=0.1)
    _, lin, attn = res.x * scale
    short = steps[(steps["prefill_tokens"] > 0) & (steps["prefill_tokens"] < 512) & (steps["n_decode"] > 0)]
    over = 0.0
    if len(short) >= 5:
        m0 = CostModel(**{**model.coefficients(), "prefill_overhead_s": 0.0, "linear_per_token_s": float(lin),
                          "prefill_attn_s": float(attn)})
        extra = short["time_s"].to_numpy() - m0.step_times(short["prefill_tokens"], short["prefill_attn"],
                                                           short["n_decode"], short["decode_ctx"])
        over = float(max(0.0, np.median(extra)))
    return {"prefill_overhead_s": over, "linear_per_token_s": float(lin), "prefill_attn_s": float(attn)}


def _choose_reading(runs, budget, llama: bool):
    """Steps reconstructed under each reading of the server the client cannot see, and the one whose steps the
    cost model fits better (median absolute error over all steps, none trimmed) is kept.
    - vLLM: an emission lag of 0 or 1 step (tracefit.reconstruct: its async scheduling sends a step's tokens
      at the end of the next one).
    - llama-server has no such lag: it decodes a batch, samples and sends every slot's token, then builds the
      next (tools/server/server-context.cpp update_slots); lag 0 (the two lags' scores on the H200 probes
      differ by less than the steps' noise, 3.50 against 3.39 %). What it hides is its KV layout: one stream
      per slot (`--parallel N`'s default: passes per run of consecutive slots) or one unified buffer
      (`--kv-unified`, or auto slots: one pass), which /props does not say. Measured: the one-stream-per-slot
      H200 probes fit at 3.5 % read as split and 10.9 % as unified; the two `--kv-unified` Poisson runs at
      5.4 % read as unified and 6.9 % as split.
    Returns (parts, steps, model, keep, scores, ubatch)."""
    best, scores = None, {}
    options = [(f"kv_{'unified' if u else 'split'}", 0, (UBATCH, u)) for u in (False, True)] if llama else \
        [(lag, lag, None) for lag in (0, 1)]
    for key, lag, ubatch in options:
        parts = [reconstruct(r, budget, ubatch=ubatch, emit_lag=lag) for r in runs]
        steps = pd.concat([p.steps for p in parts], ignore_index=True)
        if len(steps) < 50:
            return parts, steps, None, None, scores, ubatch
        model, keep, _ = _fit_trimmed(steps)
        score = float(np.median(np.abs(evaluate(model, steps)["error_pct"])))
        scores[key] = round(score, 2)
        if best is None or score < best[0]:
            best = (score, parts, steps, model, keep, ubatch)
    return (*best[1:5], scores, best[5])


def _save_from_busy_steps(table: pd.DataFrame, model: CostModel, keep, stats, fixed: dict | None):
    """llama-server's prompt-cache copy priced from the busy steps it stalled, then the rest refitted with it.

    At concurrency 1 a prefill sweep pays, at each launch, the copy of the previous request's slot, and a
    sweep ordered by length makes that copy as long as the prompt being computed: there the copy and the
    prefill are collinear and any split of one total fits. In a busy step the copy (of slots freed by other
    requests) is independent of the step's own tokens. The copy's cost per token is the weighted least-squares
    slope (through 0, relative residuals) of the busy steps' time beyond the rest of the model over their copied
    tokens; the other terms are then refitted with it held, twice. Measured on the H200 probes: 71-74 us a
    token in every size class of busy-step copy from 300 to 8,000 tokens, where the joint fit put 88."""
    busy = ((table["n_decode"].to_numpy() > 0) & (table["save_tokens"].fillna(0).to_numpy() > 0)) if "save_tokens" in table else None
    if busy is None or busy.sum() < MIN_SAVE_STEPS:
        return model, keep, stats, None
    for _ in range(2):
        rows = table[busy & keep]
        if len(rows) < MIN_SAVE_STEPS:
            break
        n = rows["save_tokens"].to_numpy(float)
        t = rows["time_s"].to_numpy(float)
        rest = CostModel(**{**model.coefficients(), "slot_save_s": 0.0})
        r = t - evaluate(rest, rows)["predicted_s"].to_numpy()
        slope = float(np.sum(r * n / t ** 2) / np.sum(n ** 2 / t ** 2))
        if not slope > 0:
            break
        model, keep, stats = _fit_trimmed(table, fixed={**(fixed or {}), "slot_save_s": slope})
    return model, keep, stats, int((busy & keep).sum())


def _from_step_counts(runs, base: pd.DataFrame, frontend: float):
    """(model, front end, info) from the runs' step counts, or (None, the front end given, info). The busy
    time a run's fit reads starts each request at its send plus the front end, which is TTFT minus the step
    model's prefill for the short idle requests: fitted twice, the second time with the first's front end."""
    model, info = None, {}
    for _ in range(2):
        coef, info = fit_step_counts(runs, frontend)
        if coef is None:
            return None, frontend, info
        model = rounded(CostModel(**{**{c: 0.0 for c in COEFFICIENTS}, **coef}))
        pred = model.step_times(base["prompt"], base["prompt"] ** 2, np.zeros(len(base)), np.zeros(len(base)))
        frontend = float(max(0.0, np.median(base["ttft_s"].to_numpy() - pred)))
    return model, frontend, info


def _need(cond: bool, folder: str, term: str, why: str):
    if not cond:
        raise InputError(folder, term, why)


def calibrate_runs(folders: list, engine: str, name: str, budget: int | None = None, model_info: dict | None = None,
                   gpu: str | None = None, refine: bool = True) -> tuple[str, CostModel, dict]:
    if engine not in BUDGETS:
        raise InputError("--engine", engine, f"expected one of {sorted(BUDGETS)}")
    budget = budget or BUDGETS[engine]
    runs = [load_run_folder(f) for f in folders]
    where = ", ".join(str(f) for f in folders)
    kinds = sorted({r.kind for r in runs})
    # llama.cpp: forward passes per step from the slot of each request (n_ubatch 512, llama-server's default;
    # the KV layout as the steps fit it best; engines/llamacpp_batch.py)
    parts, steps, model, keep, lag_scores, ubatch = _choose_reading(runs, budget, engine == "llamacpp")
    idle = pd.concat([p.idle.assign(run=p.name) for p in parts], ignore_index=True)
    _need(len(steps) >= 50, where, "tokens.parquet", f"only {len(steps)} measurable engine steps in these runs; "
          "run the decode probes (stress probe, probe_decode at several users)")
    _need(steps["n_decode"].max() >= 4, where, "decode_seq_s", "every measured step decoded fewer than 4 requests: "
          "run probe_decode with more users (stress probe --users 1,4,16,64)")
    ctx_per = steps["decode_ctx"] / steps["n_decode"].clip(lower=1)
    _need(ctx_per.quantile(0.9) > 2 * max(ctx_per.quantile(0.1), 1), where, "decode_ctx_s",
          "the decodes all ran at about one context length: run probe_decode at two prompt lengths "
          "(stress probe --contexts 256,2048)")
    _need(len(idle) >= 3, where, "frontend", "no request was sent to an idle server: run probe_prefill "
          "(concurrency 1) so the front-end latency can be told from step time")

    # 1. step terms from the busy steps (fitted while choosing the emission lag)
    decode_only = model.step_times(np.zeros(len(steps)), np.zeros(len(steps)), steps["n_decode"], steps["decode_ctx"],
                                   1 + steps["extra_passes"].to_numpy(), steps["batched_passes"].to_numpy())
    cached = drop_cached(steps, decode_only).to_numpy()
    # 2. front-end latency from short idle requests: TTFT - their (known) step
    short = idle[idle["prompt"] <= SHORT_PROMPT]
    base = short if len(short) >= 3 else idle.nsmallest(max(3, len(idle) // 4), "prompt")
    pred = (model.step_times(base["prompt"], base["prompt"] ** 2, np.zeros(len(base)), np.zeros(len(base)))
            + model.slot_save_s * base["save_tokens"].to_numpy())
    frontend = float(max(0.0, np.median(base["ttft_s"].to_numpy() - pred)))
    # 3. long idle prompts: prefill steps measured end to end
    long = idle[idle["prompt"] > SHORT_PROMPT]
    pf = pd.DataFrame({"prefill_tokens": long["prompt"], "prefill_attn": long["prompt"].astype(float) ** 2,
                       "n_decode": 0, "decode_ctx": 0.0, "time_s": long["ttft_s"] - frontend, "t_s": np.nan,
                       "extra_passes": 0, "save_tokens": long["save_tokens"], "batched_passes": 0,
                       "run": long["run"]})
    pf = pf[pf["time_s"] > 0]
    fixed = None
    hits = {r.name: _hidden_hits(r) for r in runs if r.kind == "vllm"}
    hidden = any(h is None or h > HIDDEN_HIT_PCT for h in hits.values())
    # the sweep must reach long prompts, or its slope and curvature cannot be told apart (a 1,024-token sweep
    # of the twin put 2.3x its prefill time on a 4,096-token prompt)
    if (hidden or engine == "continuous") and len(pf) and pf["prefill_tokens"].max() >= 4096:
        # vLLM serves prompt blocks from its prefix cache (on by default) without saying so (unless started with
        # --enable-prompt-tokens-details): a busy step's prefill may be partly cached, and cheaper by an amount
        # no client sees (measured: 31 % of prompt tokens on salted random prompts, extra/ data set). The
        # prefill terms come from the prefill sweep instead; busy steps with prefill are left out.
        # the short-prompt steps of the open-loop runs: closed-loop users in lockstep send their prompts at once
        # and repeat lengths, which is where the hidden cache hits most
        ol = {r.name for r in runs if _open_loop(r)}
        fixed = _prefill_from_sweep(pf, steps[~cached & steps["run"].isin(ol).to_numpy()], model)
        m2 = CostModel(**{**model.coefficients(), **fixed})
        pred = (m2.step_times(base["prompt"], base["prompt"] ** 2, np.zeros(len(base)), np.zeros(len(base))))
        frontend = float(max(0.0, np.median(base["ttft_s"].to_numpy() - pred)))
        pf = pf.assign(time_s=long["ttft_s"].loc[pf.index] - frontend)
        pf = pf[pf["time_s"] > 0]
        # busy steps kept: decode-only ones, and the short-prompt steps of the open-loop runs, which tell an
        # additive step overhead from the roofline's weight read and price prefill_overhead_s
        short_ol = (steps["prefill_tokens"] < 512) & steps["run"].isin(ol).to_numpy()
        fixed.pop("prefill_overhead_s")
        table = pd.concat([steps[~cached & ((steps["prefill_tokens"] == 0) | short_ol)], pf], ignore_index=True)
    else:
        table = pd.concat([steps[~cached], pf], ignore_index=True)
    _need(table["prefill_tokens"].max() >= 1024, where, "linear_per_token_s",
          "no prefill of 1024 tokens or more was measured: run probe_prefill")
    model, keep, stats = _fit_trimmed(table, fixed=fixed)
    save_from = None
    if engine == "llamacpp":
        model, keep, stats, save_from = _save_from_busy_steps(table, model, keep, stats, fixed)
    counted = {}
    if engine == "continuous":  # vLLM: the server's own step count prices its steps (simulator/stepcount.py)
        got, frontend, counted = _from_step_counts(runs, base, frontend)
        if got is not None:
            model = got
            held = {k: v for k, v in (stats.get("held_at_zero") or {}).items() if k not in STEP_COUNT_TERMS}
            stats = {"method": "scipy nnls of each run's busy time over its step count and token totals "
                               "(vllm:iteration_tokens_total); relative residuals; the steps reconstructed from "
                               "token arrivals are scored with it",
                     "held_at_zero": {**held, "weights_s": "run totals cannot place a roofline knee",
                                      "prefill_overhead_s": "run totals do not say how many steps held prompts"}}
    written = rounded(model)
    ev = evaluate(written, table[keep])
    sk = np.where(table["prefill_tokens"][keep] > 0, np.where(table["n_decode"][keep] > 0, "mixed", "prefill"), "decode")
    trimmed = "" if counted.get("per_run_error_pct") else f"; rows more than {TRIM_PCT:g} % off the fit left out, fit repeated"
    fit_meta = {**error_stats(ev), "method": stats["method"] + trimmed, "trimmed_rows": int((~keep).sum()),
                "cached_prefill_steps": int(cached.sum()),
                "by_step_kind": {k: error_stats(ev[sk == k]) for k in ("decode", "mixed", "prefill") if (sk == k).any()}}
    if stats.get("held_at_zero"):
        fit_meta["held_at_zero"] = stats["held_at_zero"]
    fe_err = base["ttft_s"].to_numpy() - frontend - written.step_times(base["prompt"], base["prompt"] ** 2,
                                                                        np.zeros(len(base)), np.zeros(len(base))) \
        - written.slot_save_s * base["save_tokens"].to_numpy()
    facts = {}
    for r in runs:
        for k, v in r.facts.items():
            if k not in ("num_requests_running", "num_requests_waiting") and v is not None:
                facts.setdefault(k, v)
    per_run = {}
    evall = evaluate(written, table)
    for rn in table["run"].unique():
        m = (table["run"] == rn).to_numpy() & keep
        per_run[str(rn)] = {"steps": int(m.sum()), "median_error_pct": round(float(np.median(evall["error_pct"][m])), 2)
                            if m.any() else None}
    fit_meta["emit_lag_steps"] = parts[0].info["emit_lag_steps"]
    if save_from:
        fit_meta["slot_save_s_from"] = f"{save_from} busy steps after a prompt-cache copy (the rest refitted with it)"
    if counted:
        fit_meta["step_counts"] = counted
    if "per_run_error_pct" in counted:
        source = "the server's step count over the runs (vllm:iteration_tokens_total)"
    elif fixed and hidden:
        source = "the idle prefill sweep (the server's prefix cache hides hits in busy steps)"
    elif fixed:
        source = "the idle prefill sweep (vLLM's async scheduling splits a busy step's prompt over two intervals)"
    else:
        source = "busy steps and the idle prefill sweep"
    fit_meta["prefill_terms_from"] = source
    if ubatch is None:
        fit_meta["median_abs_error_pct_by_emit_lag"] = lag_scores
    else:
        fit_meta["kv_unified"] = bool(ubatch[1])
        fit_meta["median_abs_error_pct_by_kv_layout"] = lag_scores
    if hits:  # what vLLM's prefix cache served that the client could not attribute to requests
        known = {k: v for k, v in hits.items() if v is not None}
        fit_meta["unattributed_prefix_cache_hit_pct"] = known or "not reported (no per-request counts, no counters)"
    report = {"fit": fit_meta, "frontend_s": round(frontend, 6), "hidden_hits": hits,
              "frontend_fit": {"requests": int(len(base)), "median_abs_ms": round(float(np.median(np.abs(fe_err))) * 1e3, 3)},
              "runs": [p.info for p in parts], "per_run": per_run, "server_kinds": list(kinds), "facts": facts,
              "budget_tokens": budget}
    doc = {"name": name, "engine": f"calibrated from client traces ({', '.join(kinds)}; sim engine {engine})",
           "version": 1, "model": dict(model_info or {"name": "unknown"}),
           **({"gpu": {"name": gpu}} if gpu else {}),
           "source": {"dataset": "client_traces", "runs": [_source(f, r) for f, r in zip(folders, runs)]},
           "server": facts, "sim_engine": {"type": engine, "token_budget": budget},
           "fit": fit_meta,
           "frontend": {"latency_s": float(f"{frontend:.4g}"),
                        "note": "HTTP, tokenisation, detokenisation and streaming around the engine, from TTFT of "
                                "requests sent to an idle server minus their step"},
           "coefficients": {c: float(f"{getattr(written, c):.4g}") for c in COEFFICIENTS}}
    open_loop = [r for r in runs if _open_loop(r)]
    saturated = {r.name: why for r in open_loop if (why := _saturated(r))}
    if len(saturated) < len(open_loop):
        open_loop = [r for r in open_loop if r.name not in saturated]
    else:
        saturated = {}  # every run is past the knee: refining on them beats not refining at all
    per_stream = 0.0
    refined = refine_by_replay(open_loop, engine, written, frontend) if refine and open_loop else None
    if saturated:
        fit_meta["refine_left_out_past_saturation"] = saturated
    if refined is not None and refined[0] is None:
        fit_meta["refine"] = (f"not applied: replaying {', '.join(r.name for r in open_loop)} came no closer "
                              f"(median |error| {refined[1]} % -> {refined[2]} %)")
        refined = None
    if refined is not None:
        alpha, frontend, per_stream, before, after = refined
        written = CostModel(**{c: float(f"{getattr(written, c) * alpha:.4g}") for c in COEFFICIENTS},
                            **{k: getattr(written, k) for k in ("kv_bytes_per_token", "weight_bytes")})
        doc["coefficients"] = {c: getattr(written, c) for c in COEFFICIENTS}
        doc["frontend"]["latency_s"] = float(f"{frontend:.4g}")
        if per_stream > 0:
            doc["frontend"]["per_stream_s"] = float(f"{per_stream:.4g}")
        doc["refined_by_replay"] = {"step_scale": round(alpha, 4), "frontend_s": round(frontend, 6),
                                    "frontend_per_stream_s": float(f"{per_stream:.4g}"),
                                    "runs": [r.name for r in open_loop],
                                    "median_run_abs_error_pct_before": before, "median_run_abs_error_pct_after": after,
                                    "method": "the open-loop calibration runs replayed: one scale on every step "
                                              "coefficient (golden section on TPOT and E2E p50/p95), then the "
                                              "front-end latency moved by the median TTFT p50 offset and, for "
                                              "vLLM, a wait per streaming response (golden section on TTFT "
                                              "p50/p95), twice"}
        report["refined"] = doc["refined_by_replay"]
        report["frontend_s"] = round(frontend, 6)
    header = (f"# Fitted by `sim calibrate {' '.join(Path(f).name for f in folders)[:200]} --engine {engine}` "
              "from client-side measurements only; refit rather than edit.\n")
    text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=110)
    mi = model_info or {}
    final = CostModel(**{c: getattr(written, c) for c in COEFFICIENTS}, frontend_s=float(f"{frontend:.4g}"),
                      frontend_per_stream_s=float(f"{per_stream:.4g}"),
                      **{k: int(mi[k]) for k in ("kv_bytes_per_token", "weight_bytes") if k in mi})
    return text, final, report


def _source(given, run) -> dict:
    """A run as the profile names it: the folder and its requests.csv, or the vLLM bench file it came from."""
    if run.origin is not None:
        return {"file": Path(given).name, "sha256": hashlib.sha256(Path(run.origin).read_bytes()).hexdigest()}
    return {"folder": Path(given).name, "requests_sha256": hashlib.sha256((run.path / "requests.csv").read_bytes()).hexdigest()}
