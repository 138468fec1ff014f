"""Step-time cost model: how long one engine iteration takes, given what it holds.

One formula serves every engine, so a profile fitted once (from public data or a live
server) drives static batching, continuous batching and llama.cpp slots alike:

    step = overhead
         + prefill_overhead            (only when the step holds prefill tokens; prefill runs without CUDA graphs)
         + max(weights_s, linear_per_token_s * (prefill_tokens + n_decode))   # GEMMs: memory- then compute-bound
         + prefill_attn_s * prefill_attn                                      # Σ chunk * (context_before + chunk)
         + decode_ctx_s * decode_ctx                                          # Σ context read by decodes
         + decode_seq_s * n_decode                                            # per-sequence sampling etc.
         + ubatch_s * (passes - 1)                                            # forward passes beyond the first
         + batched_pass_s * batched                                           # passes of more than one token

`passes` is how many forward passes (ubatches) the step's batch is cut into. vLLM runs one per step. llama.cpp
cuts a batch into ubatches of at most n_ubatch tokens (llama-context.cpp decode), and with one KV stream per
slot (llama-server's default for an explicit `--parallel N`) a ubatch holds only slots of consecutive ids
(llama-kv-cache.cpp init_batch -> llama-batch.cpp split_equal(sequential)), so busy slots 0,1,2,5 decode in
two passes; each pass launches the whole graph and reads the weights again (engines/llamacpp_batch.py).
`batched` counts those passes that hold more than one token: ggml's CUDA backend replays a one-token pass as a
CUDA graph but launches a larger one kernel by kernel (ggml-cuda.cu, "batch size > 1"); the vLLM-like engines
leave it at 0 (their one pass per step is priced by the other terms).

The `max` is a roofline: small steps are bound by reading the weights once, large ones by
matrix-multiply throughput. All coefficients are seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np

PROFILE_DIR = Path(__file__).parent / "profiles"
COEFFICIENTS = ("overhead_s", "prefill_overhead_s", "weights_s", "linear_per_token_s", "prefill_attn_s", "decode_ctx_s",
                "decode_seq_s", "ubatch_s", "batched_pass_s", "slot_save_s")


@dataclass(frozen=True)
class CostModel:
    overhead_s: float = 0.002
    prefill_overhead_s: float = 0.0
    weights_s: float = 0.010
    linear_per_token_s: float = 2.0e-5
    prefill_attn_s: float = 1.0e-9
    decode_ctx_s: float = 2.0e-8
    decode_seq_s: float = 1.0e-4
    ubatch_s: float = 0.0
    batched_pass_s: float = 0.0
    # llama.cpp only: seconds per token to copy an idle slot's KV state into the host prompt cache, which
    # llama-server does for every idle slot not yet cached each time it launches a task (engines/llamacpp.py)
    slot_save_s: float = 0.0
    # KV bytes per token and weight bytes let engines derive KV capacity from GPU memory.
    kv_bytes_per_token: int = 131072
    weight_bytes: int = 16_000_000_000
    # The server's front end around the engine (HTTP, tokenisation, detokenisation, streaming), fitted by
    # trace-only calibration: a request reaches the scheduler frontend_s after its send, plus
    # frontend_per_token_s per prompt token (tokenisation). Not step time: the engine runs meanwhile.
    frontend_s: float = 0.0
    frontend_per_token_s: float = 0.0
    # and frontend_per_stream_s per response the server is streaming when the request comes in: vLLM's API
    # server is one asyncio loop that, every engine step, processes every running request's output
    # (vllm/v1/engine/async_llm.py output_handler) and wakes each stream's writer, so each await on a new
    # request's way in waits a round of them (measured on an H200: bench/README.md)
    frontend_per_stream_s: float = 0.0
    meta: dict = field(default_factory=dict, compare=False)

    def step_time(self, prefill_tokens: float, prefill_attn: float, n_decode: float, decode_ctx: float,
                  passes: int = 1, batched: int = 0) -> float:
        linear = self.linear_per_token_s * (prefill_tokens + n_decode)
        if linear < self.weights_s:
            linear = self.weights_s
        t = (self.overhead_s + (self.prefill_overhead_s if prefill_tokens > 0 else 0.0)
             + linear + self.prefill_attn_s * prefill_attn
             + self.decode_ctx_s * decode_ctx + self.decode_seq_s * n_decode)
        if batched:
            t += self.batched_pass_s * batched
        return t + self.ubatch_s * (passes - 1) if passes > 1 else t

    def step_times(self, prefill_tokens, prefill_attn, n_decode, decode_ctx, passes=1, batched=0) -> np.ndarray:
        """Vectorised step_time over arrays (fast-forward and fitting)."""
        pf = np.asarray(prefill_tokens, dtype=float)
        tokens = pf + np.asarray(n_decode, dtype=float)
        linear = np.maximum(self.weights_s, self.linear_per_token_s * tokens)
        t = (self.overhead_s + self.prefill_overhead_s * (pf > 0) + linear + self.prefill_attn_s * np.asarray(prefill_attn, dtype=float)
             + self.decode_ctx_s * np.asarray(decode_ctx, dtype=float)
             + self.decode_seq_s * np.asarray(n_decode, dtype=float))
        if self.ubatch_s and np.any(np.asarray(passes) > 1):
            t = t + self.ubatch_s * (np.asarray(passes, dtype=float) - 1)
        if self.batched_pass_s and np.any(np.asarray(batched) > 0):
            t = t + self.batched_pass_s * np.asarray(batched, dtype=float)
        return t

    def prefill_time(self, prompt_lens) -> float:
        """A whole-prompt prefill of a batch (static batching)."""
        p = np.asarray(prompt_lens, dtype=float)
        return self.step_time(float(p.sum()), float((p * p).sum()), 0, 0)

    def decode_time(self, n_decode: int, decode_ctx: float) -> float:
        return self.step_time(0, 0, n_decode, decode_ctx)

    def coefficients(self) -> dict:
        return {k: getattr(self, k) for k in COEFFICIENTS}

    def to_dict(self) -> dict:
        d = asdict(self)
        meta = d.pop("meta")
        return {"meta": meta, **d}


def _number(v, path, field, integer=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        from .errors import InputError
        raise InputError(path, field, f"not a number: {v!r}")
    if not math.isfinite(v) or v < 0:
        from .errors import InputError
        raise InputError(path, field, f"must be a finite number >= 0, got {v!r}")
    if integer and v != int(v):
        from .errors import InputError
        raise InputError(path, field, f"must be a whole number, got {v!r}")
    return v


def load_profile(name_or_path: str) -> CostModel:
    """A profile by name (simulator/profiles/NAME.yaml) or by path; every value checked (one-line errors)."""
    from .errors import InputError
    from .safeio import load_yaml_file
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():  # a name (names may hold dots: vllm-0.26-...)
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise InputError(str(path), "engine.profile", f"no such profile (known: {known})")
    raw = load_yaml_file(path, "" if path.is_file() else "engine.profile")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(str(path), "", f"expected a mapping at top level, got {type(raw).__name__}")
    coeffs = raw.get("coefficients", {})
    if coeffs is None:
        coeffs = {}
    if not isinstance(coeffs, dict):
        raise InputError(str(path), "coefficients", "expected a mapping of coefficient: seconds")
    unknown = set(coeffs) - set(COEFFICIENTS)
    if unknown:
        raise InputError(str(path), "coefficients", f"unknown coefficient(s) {sorted(map(str, unknown))}")
    kw = {k: float(_number(v, str(path), f"coefficients.{k}")) for k, v in coeffs.items()}
    model = raw.get("model", {})
    if model is None:
        model = {}
    if not isinstance(model, dict):
        raise InputError(str(path), "model", "expected a mapping")
    for k in ("kv_bytes_per_token", "weight_bytes"):
        if k in model:
            v = _number(model[k], str(path), f"model.{k}", integer=True)
            if v > 1e15:
                raise InputError(str(path), f"model.{k}", f"{v:g} bytes is not a model size")
            kw[k] = int(v)
    if kw.get("kv_bytes_per_token", 1) < 1:
        raise InputError(str(path), "model.kv_bytes_per_token", "must be >= 1")
    tp = raw.get("tp")
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 4096):
        raise InputError(str(path), "tp", f"tensor-parallel degree must be a whole number from 1 to 4096, got {tp!r}")
    fe = raw.get("frontend") or {}
    if not isinstance(fe, dict):
        raise InputError(str(path), "frontend", "expected a mapping (latency_s, per_prompt_token_s)")
    unknown = set(fe) - {"latency_s", "per_prompt_token_s", "per_stream_s", "note"}
    if unknown:
        raise InputError(str(path), "frontend", f"unknown key(s) {sorted(map(str, unknown))}")
    for key, attr in (("latency_s", "frontend_s"), ("per_prompt_token_s", "frontend_per_token_s"),
                      ("per_stream_s", "frontend_per_stream_s")):
        if key in fe:
            v = float(_number(fe[key], str(path), f"frontend.{key}"))
            if v > 60:
                raise InputError(str(path), f"frontend.{key}", f"{v:g} s is not a front-end latency")
            kw[attr] = v
    cm = CostModel(**kw, meta={k: v for k, v in raw.items() if k != "coefficients"})
    if not (cm.step_time(1, 1, 0, 0) > 0 and cm.step_time(0, 0, 1, 0) > 0):
        raise InputError(str(path), "coefficients", "a step of one prompt token or one decode takes no time "
                                                    "(all of overhead_s, weights_s, linear_per_token_s and the "
                                                    "per-token terms are 0)")
    return cm


def scenario_profile(sc, name: str, field: str) -> CostModel:
    """A profile named by a scenario; a bad name is the scenario file's error, not the profile folder's."""
    from .errors import InputError
    src = getattr(sc, "_source", "<scenario>")
    try:
        return load_profile(name)
    except InputError as exc:
        if exc.field == "engine.profile":  # no such profile: the scenario's field is what is wrong
            raise InputError(src, field, f"{exc.reason}: {name!r}") from None
        # the profile file itself is bad: name it and the field in it, and which scenario field pointed there
        raise InputError(exc.file, exc.field, f"{exc.reason} ({field} of {src})") from None


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
