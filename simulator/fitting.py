"""Fit CostModel coefficients to a table of observed steps, and write profile YAML.

Input is one row per observed step (or batched phase) with the columns in FEATURES plus
`time_s`; an optional `weight` column lets callers stop repeated measurements of one
configuration from dominating. Nothing here knows where the rows came from, so public
datasets and live-server calibration share it.

Residuals are relative, so a 30 ms decode step and a 3 s prefill count alike. The
`max(weights_s, linear_per_token_s * tokens)` roofline is not smooth, so the fit first fixes
the knee k = weights_s / linear_per_token_s on a grid; for a fixed knee the model is linear
in the other coefficients (prefill_overhead_s multiplies a 0/1 "step holds prefill" column) and
non-negative least squares gives the global optimum. The best knee is then polished jointly
with bounded least_squares.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import least_squares, nnls

from .costmodel import COEFFICIENTS, CostModel

FEATURES = ("prefill_tokens", "prefill_attn", "n_decode", "decode_ctx")
# Coefficients that enter linearly once the knee is fixed, with the feature each multiplies.
_LINEAR = {"overhead_s": lambda df: np.ones(len(df)),
           "prefill_overhead_s": lambda df: (df["prefill_tokens"].to_numpy(float) > 0).astype(float),
           "prefill_attn_s": lambda df: df["prefill_attn"].to_numpy(float),
           "decode_ctx_s": lambda df: df["decode_ctx"].to_numpy(float),
           "decode_seq_s": lambda df: df["n_decode"].to_numpy(float),
           "ubatch_s": lambda df: _extra_passes(df),
           "batched_pass_s": lambda df: _optional(df, "batched_passes"),
           "slot_save_s": lambda df: _save_tokens(df)}
# A coefficient whose term is below this fraction of every observed step is noise from the
# optimiser (e.g. 1e-22 s), not a measurement, and is written as 0.
_NEGLIGIBLE = 1e-6


def _optional(df: pd.DataFrame, column: str) -> np.ndarray:
    """An optional feature column, zeros where the table has none."""
    return df[column].to_numpy(float) if column in df.columns else np.zeros(len(df))


def _extra_passes(df: pd.DataFrame) -> np.ndarray:
    """Forward passes beyond the first per step (llama.cpp with known slots)."""
    return _optional(df, "extra_passes")


def _save_tokens(df: pd.DataFrame) -> np.ndarray:
    """Tokens of idle slots saved to llama-server's prompt cache before the step; their copy stalls the
    server loop, so it lies inside the measured interval but outside step_time."""
    return _optional(df, "save_tokens")


def measured_interval(model: CostModel, df: pd.DataFrame) -> np.ndarray:
    """What one row's time_s covers: the step, and any prompt-cache save that stalled the loop before it."""
    t = model.step_times(df["prefill_tokens"], df["prefill_attn"], df["n_decode"], df["decode_ctx"],
                         1 + _extra_passes(df), _optional(df, "batched_passes"))
    return t + model.slot_save_s * _save_tokens(df) if model.slot_save_s else t


def _check(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in (*FEATURES, "time_s") if c not in df.columns]
    if missing:
        raise ValueError(f"observed-step table lacks column(s) {missing}")
    if len(df) == 0:
        raise ValueError("observed-step table is empty")
    if (df["time_s"] <= 0).any():
        raise ValueError("time_s must be positive (relative residuals divide by it)")
    return df


def predict(coeffs: dict, df: pd.DataFrame) -> np.ndarray:
    return measured_interval(CostModel(**coeffs), df)


def evaluate(cost_model: CostModel, df: pd.DataFrame) -> pd.DataFrame:
    """The table with `predicted_s` and signed `error_pct` (100 * (predicted - measured) / measured)."""
    out = _check(df).copy()
    out["predicted_s"] = measured_interval(cost_model, df)
    out["error_pct"] = 100.0 * (out["predicted_s"] - out["time_s"]) / out["time_s"]
    return out


def error_stats(evaluated: pd.DataFrame) -> dict:
    """Unweighted over rows, so the numbers read as 'typical error per observed step'."""
    err = evaluated["error_pct"].abs()
    return {"points": int(len(err)), "mape_pct": round(float(err.mean()), 2),
            "max_abs_pct": round(float(err.max()), 2)}


def _knee_grid(tokens: np.ndarray) -> np.ndarray:
    """Knees worth trying: none (k=0), observed token counts, and a log grid past both ends.

    Observed counts are where the optimum knee tends to sit; they are thinned to quantiles so
    a live-server table with thousands of distinct batch sizes stays cheap."""
    pos = np.unique(tokens[tokens > 0])
    if len(pos) == 0:
        return np.array([0.0])
    if len(pos) > 300:
        pos = np.quantile(pos, np.linspace(0, 1, 300))
    return np.unique(np.concatenate([[0.0], pos, np.geomspace(pos.min() / 2, pos.max() * 2, 200)]))


def _solve_for_knee(k, df, y, sw, fixed):
    """Best non-negative coefficients with the knee held at k (rows pre-scaled to relative error)."""
    tokens = (df["prefill_tokens"] + df["n_decode"]).to_numpy(float)
    known = np.zeros(len(df))
    for name, feature in _LINEAR.items():
        if name in fixed:
            known += fixed[name] * feature(df)
    cols, names = [], []
    w_fixed, l_fixed = "weights_s" in fixed, "linear_per_token_s" in fixed
    roof = np.maximum(k, tokens) if k is not None else None  # both fixed: no knee to try
    if w_fixed and l_fixed:
        known += np.maximum(fixed["weights_s"], fixed["linear_per_token_s"] * tokens)
    elif w_fixed:  # l = w / k, so the whole roofline term is known for this knee
        known += fixed["weights_s"] * roof / k
    elif l_fixed:
        known += fixed["linear_per_token_s"] * roof
    else:
        cols.append(roof), names.append("linear_per_token_s")
    for name, feature in _LINEAR.items():
        if name not in fixed:
            cols.append(feature(df))
            names.append(name)
    scale = sw / y
    coeffs = dict(fixed)
    if cols:
        a = np.column_stack(cols) * scale[:, None]
        norms = np.linalg.norm(a, axis=0)
        norms[norms == 0] = 1.0
        x, _ = nnls(a / norms, (y - known) * scale, maxiter=50 * a.shape[1])
        coeffs.update(zip(names, x / norms))
    if not w_fixed and not l_fixed:
        coeffs["weights_s"] = coeffs["linear_per_token_s"] * k
    elif w_fixed and not l_fixed:
        coeffs["linear_per_token_s"] = fixed["weights_s"] / k
    elif l_fixed and not w_fixed:
        coeffs["weights_s"] = fixed["linear_per_token_s"] * k
    return coeffs


def _cost(coeffs, df, y, sw) -> float:
    return float(np.sum((sw * (predict(coeffs, df) - y) / y) ** 2))


def _polish(coeffs, df, y, sw, fixed):
    """Joint bounded refinement of the free coefficients, each scaled to O(1)."""
    free = [c for c in COEFFICIENTS if c not in fixed]
    if not free:
        return coeffs
    x0 = np.array([coeffs[c] for c in free])
    scale = np.where(x0 > 0, x0, 1e-12)

    def resid(u):
        return sw * (predict({**fixed, **dict(zip(free, u * scale))}, df) - y) / y

    res = least_squares(resid, x0 / scale, bounds=(0, np.inf), method="trf", x_scale="jac")
    out = {**fixed, **dict(zip(free, res.x * scale))}
    return out if _cost(out, df, y, sw) < _cost(coeffs, df, y, sw) else coeffs


def _drop_negligible(coeffs, df, y, fixed):
    out = dict(coeffs)
    for name, feature in _LINEAR.items():
        if name not in fixed and out[name] > 0 and np.max(out[name] * feature(df) / y) < _NEGLIGIBLE:
            out[name] = 0.0
    return out


def _unidentifiable(df: pd.DataFrame, fixed: dict) -> dict:
    """Coefficients the table cannot inform, held at 0 with the reason.

    prefill_overhead_s is only separable from overhead_s when the table has steps both with
    and without prefill tokens; otherwise the shared constant stays in overhead_s, which
    every step pays (the honest reading of a table that cannot tell the two apart)."""
    held = {}
    if "ubatch_s" not in fixed and not (_extra_passes(df) > 0).any():
        held["ubatch_s"] = "no step ran as more than one forward pass"
    if "batched_pass_s" not in fixed and not (_optional(df, "batched_passes") > 0).any():
        held["batched_pass_s"] = "no step's passes were known to hold more than one token (llama.cpp slots)"
    if "slot_save_s" not in fixed and not (_save_tokens(df) > 0).any():
        held["slot_save_s"] = "no step followed a save of idle slots to a prompt cache"
    if "prefill_overhead_s" in fixed:
        return held
    has_prefill = df["prefill_tokens"].to_numpy(float) > 0
    if has_prefill.all():
        held["prefill_overhead_s"] = "every step holds prefill tokens, so it cannot be told from overhead_s"
    elif not has_prefill.any():
        held["prefill_overhead_s"] = "no step holds prefill tokens"
    return held


def fit(df: pd.DataFrame, fixed: dict | None = None, base: CostModel | None = None) -> tuple[CostModel, dict]:
    """Fit the coefficients not in `fixed` (all >= 0). Returns (CostModel, stats).

    `base` supplies the non-coefficient fields (KV bytes, weight bytes, meta) of the result.
    Coefficients the table cannot inform are held at 0 and listed in stats["held_at_zero"].
    """
    df = _check(df).reset_index(drop=True)
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    unknown = set(fixed) - set(COEFFICIENTS)
    if unknown:
        raise ValueError(f"unknown coefficient(s) {sorted(unknown)}")
    auto_held = _unidentifiable(df, fixed)
    fixed.update({k: 0.0 for k in auto_held})
    y = df["time_s"].to_numpy(float)
    sw = np.sqrt(df["weight"].to_numpy(float)) if "weight" in df.columns else np.ones(len(df))
    tokens = (df["prefill_tokens"] + df["n_decode"]).to_numpy(float)
    knees = [None] if {"weights_s", "linear_per_token_s"} <= set(fixed) else _knee_grid(tokens)
    if "weights_s" in fixed and knees[0] is not None:
        knees = [k for k in knees if k > 0]  # a fixed weights_s needs a finite linear_per_token_s
    best = min((_solve_for_knee(k, df, y, sw, fixed) for k in knees), key=lambda c: _cost(c, df, y, sw))
    best = _drop_negligible(_polish(best, df, y, sw, fixed), df, y, fixed)
    base = base or CostModel()
    model = CostModel(**{**{k: getattr(base, k) for k in ("kv_bytes_per_token", "weight_bytes")},
                         **{c: float(best[c]) for c in COEFFICIENTS}}, meta=dict(base.meta))
    stats = error_stats(evaluate(model, df))
    stats["method"] = ("scipy nnls over a grid of roofline knees, then bounded least_squares; "
                       "relative residuals" + ("; weighted rows" if "weight" in df.columns else ""))
    if fixed:
        stats["fitted"] = [c for c in COEFFICIENTS if c not in fixed]
    if auto_held:
        stats["held_at_zero"] = auto_held
    return model, stats


def rounded(model: CostModel, sig: int = 4) -> CostModel:
    """Coefficients cut to `sig` significant digits, as written to YAML (so stated errors match the file)."""
    kw = {c: float(f"{getattr(model, c):.{sig}g}") for c in COEFFICIENTS}
    return CostModel(**kw, kv_bytes_per_token=model.kv_bytes_per_token, weight_bytes=model.weight_bytes,
                     meta=dict(model.meta))


def profile_yaml(model: CostModel, provenance: dict, fit: dict, model_info: dict) -> str:
    """Profile file text: provenance keys first (name, engine, version, gpu, tp, source, ...),
    then model, fit and coefficients, in the order load_profile's readers expect to see them."""
    doc = {k: provenance[k] for k in ("name", "engine", "version") if k in provenance}
    doc["model"] = dict(model_info)
    doc.update({k: v for k, v in provenance.items() if k not in doc})
    doc["fit"] = dict(fit)
    doc["coefficients"] = {c: float(f"{getattr(model, c):.4g}") for c in COEFFICIENTS}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
