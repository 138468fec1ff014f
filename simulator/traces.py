"""Readers for public request traces (Azure LLM 2023 CSV, Mooncake FAST'25 JSONL) and length files.

Each returns plain numpy arrays; a malformed row is an InputError naming file, line and reason.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import numpy as np

from .errors import InputError
from .safeio import read_text

MOONCAKE_BLOCK_TOKENS = 512
MAX_COUNT = 10 ** 15  # a token count beyond this is no token count (and would overflow int64 sums)
UNCAPPED = 1 << 62  # the readers' own cap: limits.check_limits caps size and rows before a scenario's files are read


@dataclass(frozen=True)
class TraceData:
    t: np.ndarray  # seconds from the first request
    prompt: np.ndarray
    output: np.ndarray
    hashes: tuple | None = None  # per request tuple of prefix-block ids (Mooncake)
    hash_block: int = MOONCAKE_BLOCK_TOKENS


def _positive_int(value, path: str, line: int, col: str) -> int:
    """A whole, non-negative token count: 12 or "12" (and 12.0); 2.5, "2.5", true, inf are refused."""
    where = f"line {line}: {col}"
    if isinstance(value, bool):
        raise InputError(path, where, f"not an integer: {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InputError(path, where, f"not a whole number of tokens: {value!r}")
        value = int(value)
    try:
        v = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InputError(path, where, f"not an integer: {value!r}") from None
    if v < 0:
        raise InputError(path, where, f"negative value {v}")
    if v > MAX_COUNT:
        raise InputError(path, where, f"{v:.3g} tokens is not a token count")
    return v


def _text(path: str) -> str:
    return read_text(path, UNCAPPED)


@lru_cache(maxsize=8)
def read_azure(path: str) -> TraceData:
    ts, prompts, outputs = [], [], []
    try:
        reader = csv.reader(io.StringIO(_text(path), newline=""))
        header = next(reader, None)
        want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header != want:
            raise InputError(path, "line 1", f"expected Azure LLM header {want}, got {header}")
        for i, rec in enumerate(reader, start=2):
            if len(rec) != 3:
                raise InputError(path, f"line {i}", f"expected 3 columns, got {len(rec)}")
            stamp = rec[0]
            try:
                # the trace has 7 fractional digits; datetime takes at most 6
                head, _, frac = stamp.partition(".")
                if frac and not (frac.isascii() and frac.isdigit()):  # "0." + "5e400" would be a float (inf)
                    raise ValueError(stamp)
                t = datetime.fromisoformat(head).timestamp() + (float("0." + frac) if frac else 0.0)
            except ValueError:
                raise InputError(path, f"line {i}: TIMESTAMP", f"not a timestamp: {stamp!r}") from None
            except (OverflowError, OSError):
                raise InputError(path, f"line {i}: TIMESTAMP", f"timestamp out of range: {stamp!r}") from None
            ts.append(t)
            prompts.append(_positive_int(rec[1], path, i, "ContextTokens"))
            outputs.append(_positive_int(rec[2], path, i, "GeneratedTokens"))
    except csv.Error as exc:
        raise InputError(path, f"line {reader.line_num}", f"not valid CSV: {exc}") from None
    if not ts:
        raise InputError(path, "", "trace has no rows")
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    return TraceData(t[order] - t[order][0], np.asarray(prompts)[order], np.asarray(outputs)[order])


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


@lru_cache(maxsize=8)
def read_mooncake(path: str) -> TraceData:
    ts, prompts, outputs, hashes = [], [], [], []
    text = _text(path).replace("\r\n", "\n").replace("\r", "\n")  # as text-mode reading splits
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {i}", f"not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:
            raise InputError(path, f"line {i}", f"not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InputError(path, f"line {i}", f"expected a JSON object, got {type(obj).__name__}")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in obj:
                raise InputError(path, f"line {i}: {key}", "missing")
        stamp = obj["timestamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not 0 <= stamp < 1e300:
            raise InputError(path, f"line {i}: timestamp", f"expected a non-negative number of ms, got {stamp!r}")
        ts.append(float(stamp) / 1000.0)
        prompts.append(_positive_int(obj["input_length"], path, i, "input_length"))
        outputs.append(_positive_int(obj["output_length"], path, i, "output_length"))
        h = obj.get("hash_ids") or []
        if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in h):
            raise InputError(path, f"line {i}: hash_ids", "expected a list of integers")
        hashes.append(tuple(h))
    if not ts:
        raise InputError(path, "", "trace has no rows")
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    return TraceData(t[order] - t[order][0], np.asarray(prompts)[order], np.asarray(outputs)[order],
                     tuple(hashes[j] for j in order))


def read_trace(fmt: str, path: str) -> TraceData:
    return read_azure(path) if fmt == "azure" else read_mooncake(path)


def _cell(x):
    """A CSV cell as the reader wrote it (numpy scalars as plain Python values)."""
    return x.item() if hasattr(x, "item") else x


@lru_cache(maxsize=16)
def read_empirical(path: str, column: str | None, field: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(values, probabilities) from a CSV column of samples or a histogram file."""
    import pandas as pd
    text = _text(path)
    try:
        df = pd.read_csv(io.StringIO(text))
    except Exception as exc:  # noqa: BLE001  (pandas raises many kinds; each is this file's fault)
        raise InputError(path, "", f"cannot read CSV: {exc}") from None
    if {"field", "bin_lo_incl", "bin_hi_excl", "prob"} <= set(df.columns):
        if field is None:
            raise InputError(path, "field", f"histogram file: name a field (one of {sorted(map(str, df['field'].unique()))})")
        sub = df[df["field"] == field]
        if sub.empty:
            raise InputError(path, "field", f"no rows for field {field!r}")
        cols = {}
        for col in ("bin_lo_incl", "bin_hi_excl", "prob"):
            v = pd.to_numeric(sub[col], errors="coerce").to_numpy(dtype=float)
            bad = ~np.isfinite(v)
            if bad.any():
                line = int(sub.index[bad.argmax()]) + 2
                raise InputError(path, f"line {line}: {col}", f"not a finite number: {_cell(sub[col].iloc[bad.argmax()])!r}")
            cols[col] = v
        lo, hi, p = cols["bin_lo_incl"], cols["bin_hi_excl"], cols["prob"]
        for bad, col, why in ((p < 0, "prob", "a probability cannot be negative"),
                              ((lo < 0) | (lo != np.floor(lo)), "bin_lo_incl", "not a whole, non-negative token count"),
                              ((hi <= lo) | (hi != np.floor(hi)), "bin_hi_excl", "not a whole token count above bin_lo_incl"),
                              (hi > MAX_COUNT, "bin_hi_excl", "not a token count")):
            if bad.any():
                line = int(sub.index[bad.argmax()]) + 2
                raise InputError(path, f"line {line}: {col}", f"{why}: {_cell(sub[col].iloc[bad.argmax()])!r}")
        total = p.sum()
        if not total > 0 or not np.isfinite(total):
            raise InputError(path, "prob", f"probabilities of field {field!r} sum to {total:g}; they need a positive sum")
        mids = np.maximum(1, np.floor((lo + hi - 1) / 2))
        return mids.astype(np.int64), p / total
    col = column or df.columns[0]
    if col not in df.columns:
        raise InputError(path, "column", f"no column {col!r} (have {list(map(str, df.columns))})")
    vals = pd.to_numeric(df[col], errors="coerce")
    if vals.isna().any():
        bad = int(vals.isna().to_numpy().argmax()) + 2
        raise InputError(path, f"line {bad}: {col}", "not a number")
    f = vals.to_numpy(dtype=float)
    for bad, why in ((~np.isfinite(f), "not a finite number"), (f != np.floor(f), "not a whole number of tokens"),
                     (f < 0, "a token count cannot be negative"), (f > MAX_COUNT, "not a token count")):
        if bad.any():
            raise InputError(path, f"line {int(bad.argmax()) + 2}: {col}", f"{why}: {_cell(df[col].iloc[bad.argmax()])!r}")
    v = vals.to_numpy(dtype=np.int64)
    v = v[v > 0]
    if v.size == 0:
        raise InputError(path, col, "no positive values")
    return v, None
