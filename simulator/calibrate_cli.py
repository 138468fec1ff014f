"""Registers `sim calibrate` on the `sim` app: fit a cost-model profile from a CSV of observed steps.

The CSV is what a live-server calibration run writes: one row per engine step with the
CostModel features and the measured time, so a profile fitted here drives the simulator the
same way the public-data profiles do.
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path
from typing import List, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from .cli import app, friendly
from .costmodel import COEFFICIENTS, PROFILE_DIR, CostModel
from .errors import InputError
from .fitting import FEATURES, error_stats, evaluate, fit, profile_yaml, rounded

REQUIRED = (*FEATURES, "time_s")
OPTIONAL = ("weight",)  # relative weight of a row, e.g. 1/repeats of one configuration
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def read_steps(path: Path) -> pd.DataFrame:
    """The observed-step table, checked row by row so a bad value is reported by line and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "", "no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "", f"cannot read: {exc}") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise InputError(path, "header", f"empty file; expected columns {', '.join(REQUIRED)}")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(path, "header", f"missing column(s) {', '.join(missing)} "
                                         f"(expected {', '.join(REQUIRED)}; optional {', '.join(OPTIONAL)})")
    dupes = sorted({h for h in header if header.count(h) > 1 and h in (*REQUIRED, *OPTIONAL)})
    if dupes:
        raise InputError(path, "header", f"duplicate column(s) {', '.join(dupes)}")
    wanted = [c for c in (*REQUIRED, *OPTIONAL) if c in header]
    index = {c: header.index(c) for c in wanted}
    rows = []
    for fields in reader:
        line = reader.line_num
        if not fields or not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise InputError(path, f"line {line}", f"{len(fields)} fields, header has {len(header)}")
        row = []
        for c in wanted:
            raw = fields[index[c]].strip()
            try:
                v = float(raw)
            except ValueError:
                raise InputError(path, f"line {line}, column {c}", f"not a number: {raw!r}") from None
            if not math.isfinite(v):
                raise InputError(path, f"line {line}, column {c}", f"not a finite number: {raw!r}")
            if c in ("time_s", "weight") and v <= 0:
                raise InputError(path, f"line {line}, column {c}", f"must be > 0, got {raw}")
            if v < 0:
                raise InputError(path, f"line {line}, column {c}", f"must be >= 0, got {raw}")
            row.append(v)
        if row[wanted.index("prefill_tokens")] == 0 and row[wanted.index("n_decode")] == 0:
            raise InputError(path, f"line {line}", "a step needs prefill_tokens > 0 or n_decode > 0")
        rows.append(row)
    if not rows:
        raise InputError(path, "", "no data rows after the header")
    return pd.DataFrame(rows, columns=wanted)


def parse_fixed(items: Optional[List[str]]) -> dict:
    fixed = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in COEFFICIENTS:
            raise InputError("--fix", item, f"expected NAME=SECONDS with NAME one of {', '.join(COEFFICIENTS)}")
        try:
            v = float(value)
        except ValueError:
            raise InputError("--fix", item, f"not a number: {value.strip()!r}") from None
        if not math.isfinite(v) or v < 0:
            raise InputError("--fix", item, "must be a finite number >= 0")
        fixed[name] = v
    return fixed


def step_kind(df: pd.DataFrame) -> pd.Series:
    pf, dec = df["prefill_tokens"] > 0, df["n_decode"] > 0
    return pd.Series(["mixed" if p and d else "prefill" if p else "decode" for p, d in zip(pf, dec)],
                     index=df.index)


def calibrate(steps_csv: Path, name: str, engine: str = "calibrated from observed steps", gpu: str | None = None,
              tp: int | None = None, model: str | None = None, kv_bytes_per_token: int | None = None,
              weight_bytes: int | None = None, fixed: dict | None = None) -> tuple[str, CostModel, dict]:
    """Fit STEPS_CSV and return (profile YAML text, the rounded model as written, fit metadata)."""
    steps_csv = Path(steps_csv)
    df = read_steps(steps_csv)
    model_info = {"name": model or "unknown"}
    if kv_bytes_per_token is not None:
        model_info["kv_bytes_per_token"] = int(kv_bytes_per_token)
    if weight_bytes is not None:
        model_info["weight_bytes"] = int(weight_bytes)
    base = CostModel(**{k: model_info[k] for k in ("kv_bytes_per_token", "weight_bytes") if k in model_info})
    fitted, stats = fit(df, fixed=fixed, base=base)
    written = rounded(fitted)
    ev = evaluate(written, df)
    fit_meta = {**error_stats(ev), "method": stats["method"]}
    kinds = step_kind(df)
    fit_meta["by_step_kind"] = {k: error_stats(ev[kinds == k]) for k in ("prefill", "decode", "mixed")
                                if (kinds == k).any()}
    if fixed:
        fit_meta["fixed"] = dict(fixed)
    if stats.get("held_at_zero"):
        fit_meta["held_at_zero"] = stats["held_at_zero"]
    unused = [c for c, col in (("prefill_attn_s", "prefill_attn"), ("decode_ctx_s", "decode_ctx"),
                               ("decode_seq_s", "n_decode")) if c not in (fixed or {}) and not (df[col] > 0).any()]
    if unused:
        fit_meta["not_exercised"] = unused  # no row has the feature, so 0 is a default, not a measurement
    if "kv_bytes_per_token" not in model_info or "weight_bytes" not in model_info:
        fit_meta["note"] = ("model.kv_bytes_per_token / weight_bytes not given: the CostModel defaults apply "
                            "when engines size the KV cache")
    source = {"dataset": "observed_steps", "file": str(steps_csv),
              "sha256": hashlib.sha256(steps_csv.read_bytes()).hexdigest(), "rows": int(len(df))}
    provenance = {"name": name, "engine": engine, "version": 1}
    if gpu:
        provenance["gpu"] = {"name": gpu}
    if tp is not None:
        provenance["tp"] = int(tp)
    provenance["source"] = source
    header = f"# Fitted by `sim calibrate {steps_csv.name} --name {name}`; refit rather than edit.\n"
    return header + profile_yaml(written, provenance, fit_meta, model_info), written, fit_meta


def fit_table(model: CostModel, fit_meta: dict) -> tuple[Table, Table]:
    coeffs = Table(title="fitted coefficients")
    coeffs.add_column("coefficient")
    coeffs.add_column("value", justify="right")
    coeffs.add_column("")
    why = {c: "fitted" for c in COEFFICIENTS}
    why.update({c: "not exercised by any row" for c in fit_meta.get("not_exercised") or []})
    why.update({c: f"held at 0: {r}" for c, r in (fit_meta.get("held_at_zero") or {}).items()})
    why.update({c: "fixed (--fix)" for c in fit_meta.get("fixed") or {}})
    for c in COEFFICIENTS:
        coeffs.add_row(c, f"{getattr(model, c):.4g}", why[c])
    errors = Table(title="fit error vs measured")
    for col in ("steps", "points", "MAPE %", "max %"):
        errors.add_column(col, justify="right" if col != "steps" else "left")
    for kind, s in (fit_meta.get("by_step_kind") or {}).items():
        errors.add_row(kind, str(s["points"]), f"{s['mape_pct']:.2f}", f"{s['max_abs_pct']:.2f}")
    errors.add_row("all", str(fit_meta["points"]), f"{fit_meta['mape_pct']:.2f}", f"{fit_meta['max_abs_pct']:.2f}")
    return coeffs, errors


@app.command("calibrate")
@friendly
def calibrate_cmd(steps: List[Path] = typer.Argument(..., help="CSV of observed steps (prefill_tokens, prefill_attn, "
                                                         "n_decode, decode_ctx, time_s [, weight]), or stress run "
                                                         "folders / vLLM bench serve --save-detailed JSON files "
                                                         "(trace-only calibration)"),
                  name: Optional[str] = typer.Option(None, "--name", help="profile name (default: the CSV's file "
                                                     "name without .csv)"),
                  out: Optional[Path] = typer.Option(None, "--out", help="profile YAML to write (default ./NAME.yaml "
                                                     "in the current folder; use the path as engine.profile)"),
                  engine: str = typer.Option("calibrated from observed steps", "--engine", help="engine description"),
                  gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU name, e.g. H100-80GB"),
                  tp: Optional[int] = typer.Option(None, "--tp", min=1, help="tensor-parallel degree"),
                  model: Optional[str] = typer.Option(None, "--model", help="model name"),
                  kv_bytes_per_token: Optional[int] = typer.Option(None, "--kv-bytes-per-token", min=1,
                                                                   help="KV bytes per token (whole TP group)"),
                  weight_bytes: Optional[int] = typer.Option(None, "--weight-bytes", min=1, help="model weight bytes"),
                  fix: Optional[List[str]] = typer.Option(None, "--fix", help="hold a coefficient: NAME=SECONDS "
                                                          "(repeatable), for terms the steps do not exercise"),
                  force: bool = typer.Option(False, "--force", help="overwrite an existing profile file"),
                  sim_engine: str = typer.Option("continuous", "--sim-engine",
                                                 help="run folders: the simulator engine the profile is for "
                                                      "(continuous = vLLM-like, llamacpp)"),
                  no_refine: bool = typer.Option(False, "--no-refine", help="run folders: skip the replay "
                                                 "refinement (a step scale and the front end fitted to the "
                                                 "open-loop calibration runs' percentiles)"),
                  budget: Optional[int] = typer.Option(None, "--token-budget", min=16,
                                                       help="run folders: the server's tokens per step (vLLM "
                                                            "max_num_batched_tokens, default 8192; llama.cpp "
                                                            "n_batch, default 2048)")):
    """Fit a cost-model profile from observed engine steps, or from stress run folders; write it and print the fit."""
    if steps and all(Path(p).is_dir() or Path(p).suffix.lower() == ".json" for p in steps):
        info = {"name": model or "unknown", **({"kv_bytes_per_token": kv_bytes_per_token} if kv_bytes_per_token else {}),
                **({"weight_bytes": weight_bytes} if weight_bytes else {})}
        return _calibrate_runs(steps, name, out, sim_engine, budget, force, info, gpu, not no_refine)
    if len(steps) != 1:
        raise InputError(str(steps[1]), "", "give one STEPS.csv, or only run folders")
    steps = steps[0]
    name, path = _name_and_out(name, Path(steps).stem, out, force)
    text, written, fit_meta = calibrate(steps, name, engine, gpu, tp, model, kv_bytes_per_token, weight_bytes,
                                        parse_fixed(fix))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console = Console()
    for t in fit_table(written, fit_meta):
        console.print(t)
    use = name if path.resolve() == (PROFILE_DIR / f"{name}.yaml").resolve() else str(path)
    print(f"profile: {path} (engine.profile: {use})")



def _name_and_out(name, default_from: str, out, force: bool) -> tuple[str, Path]:
    """The profile's name (default: `default_from` made a file name) and the file to write (default
    ./NAME.yaml, never into the installed package unless --out says so), both checked before any fit."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", default_from).strip("-._") or "calibrated"
        if not name[0].isalnum():
            name = "p" + name
    if not _NAME.fullmatch(name):
        raise InputError("--name", name, "use letters, digits, '.', '_' and '-' (it becomes a file name)")
    path = out or Path(f"{name}.yaml")
    if path.exists() and not force:
        raise InputError(path, "--out", "exists; pass --force to overwrite or choose another --out")
    return name, path


def _calibrate_runs(folders, name, out, sim_engine, budget, force, info, gpu, refine=True):
    from .calibrate_runs import calibrate_runs
    name, path = _name_and_out(name, Path(folders[0]).resolve().parent.name, out, force)
    text, model, report = calibrate_runs(folders, sim_engine, name, budget, info, gpu, refine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    fit_meta = report["fit"]
    console = Console()
    for t in fit_table(model, fit_meta):
        console.print(t)
    fe = report["frontend_fit"]
    print(f"front end: {report['frontend_s'] * 1e3:.2f} ms before the scheduler (from {fe['requests']} requests "
          f"sent to an idle server, median |error| {fe['median_abs_ms']} ms)")
    _hidden_note(report.get("hidden_hits") or {})
    if fit_meta.get("kv_unified"):
        print("the steps fit one KV buffer shared by all slots (llama-server --kv-unified) better than one per slot: "
              "replay with --set engine.kv_unified=true")
    print(f"steps reconstructed: {sum(r['steps'] for r in report['runs'])} from {len(folders)} runs; "
          f"{fit_meta['trimmed_rows']} left out as > 35 % off, {fit_meta['cached_prefill_steps']} as prefix-cache hits")
    print(f"profile: {path} (engine.profile: {path})")


def _hidden_note(hits: dict) -> None:
    """One line when vLLM's prefix cache served prompt tokens the client cannot attribute to requests."""
    from .calibrate_runs import HIDDEN_HIT_PCT
    unknown = [k for k, v in hits.items() if v is None]
    high = {k: v for k, v in hits.items() if v is not None and v > HIDDEN_HIT_PCT}
    if not unknown and not high:
        return
    what = (f"served {', '.join(f'{v:g} %' for v in list(high.values())[:3])} of the prompt tokens of "
            f"{', '.join(list(high)[:3])}{' ...' if len(high) > 3 else ''} (its counters)" if high else
            f"may have served prompt tokens of {len(unknown)} run(s) (no per-request counts, no counters read)")
    print(f"vLLM's prefix cache {what} without saying for which requests: busy steps' prefill is priced from "
          "the idle sweep; vLLM started with --enable-prompt-tokens-details says it per request")
