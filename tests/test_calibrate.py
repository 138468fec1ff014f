"""`sim calibrate`: observed steps -> profile YAML that load_profile reads back, and one-line errors for bad CSVs."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from simulator import calibrate_cli
from simulator.cli import app
from simulator.costmodel import COEFFICIENTS, CostModel, load_profile

TRUE = CostModel(overhead_s=0.004, prefill_overhead_s=0.015, weights_s=0.02, linear_per_token_s=6e-5,
                 prefill_attn_s=1.5e-9, decode_ctx_s=4e-8, decode_seq_s=1.5e-4)
HEADER = "prefill_tokens,prefill_attn,n_decode,decode_ctx,time_s"


def _steps(seed: int, n: int = 300) -> pd.DataFrame:
    """Whole-prompt prefills, pure decodes and chunked-prefill + decode steps, as an engine logs them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            p = int(rng.integers(16, 4096))
            rows.append((p, p * p, 0, 0))
        elif kind == 1:
            b = int(rng.integers(1, 256))
            rows.append((0, 0, b, b * int(rng.integers(64, 4096))))
        else:
            b, chunk, ctx = (int(x) for x in (rng.integers(1, 64), rng.integers(16, 512), rng.integers(0, 2000)))
            rows.append((chunk, chunk * (ctx + chunk), b, b * int(rng.integers(64, 3000))))
    df = pd.DataFrame(rows, columns=["prefill_tokens", "prefill_attn", "n_decode", "decode_ctx"]).astype(float)
    df["time_s"] = TRUE.step_times(df.prefill_tokens, df.prefill_attn, df.n_decode, df.decode_ctx)
    return df


def _run(*args):
    return CliRunner().invoke(app, ["calibrate", *map(str, args)])


def _predict(model: CostModel, df: pd.DataFrame) -> np.ndarray:
    return model.step_times(df.prefill_tokens, df.prefill_attn, df.n_decode, df.decode_ctx)


def test_round_trip_predicts_within_one_percent(tmp_path):
    csv = tmp_path / "steps.csv"
    _steps(1).to_csv(csv, index=False)
    out = tmp_path / "prof" / "mine.yaml"
    r = _run(csv, "--name", "mine", "--out", out, "--engine", "vllm 0.6", "--gpu", "H100-80GB", "--tp", 2,
             "--model", "llama-3-8b", "--kv-bytes-per-token", 131072, "--weight-bytes", 16060000000)
    assert r.exit_code == 0, r.output
    assert "prefill_overhead_s" in r.stdout and "MAPE %" in r.stdout and str(out) in r.stdout

    m = load_profile(str(out))
    held_out = _steps(2, 150)  # shapes the fit never saw
    for df in (_steps(1), held_out):
        assert np.abs(_predict(m, df) / df.time_s - 1).max() < 0.01
    for c in COEFFICIENTS:
        assert getattr(m, c) == pytest.approx(getattr(TRUE, c), rel=0.02), c
    assert (m.kv_bytes_per_token, m.weight_bytes) == (131072, 16060000000)

    doc = yaml.safe_load(out.read_text())
    assert (doc["name"], doc["engine"], doc["gpu"]["name"], doc["tp"], doc["model"]["name"]) == \
        ("mine", "vllm 0.6", "H100-80GB", 2, "llama-3-8b")
    assert doc["source"]["sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert doc["source"]["rows"] == 300 and doc["fit"]["points"] == 300
    assert doc["fit"]["mape_pct"] < 0.1
    assert set(doc["fit"]["by_step_kind"]) == {"prefill", "decode", "mixed"}


def test_noisy_steps_and_extra_columns(tmp_path):
    """A live log carries extra columns and jitter; the fit still lands near the truth."""
    df = _steps(3)
    df["time_s"] *= np.random.default_rng(4).lognormal(0, 0.03, len(df))
    df["timestamp"] = np.arange(len(df)) * 0.05
    df["weight"] = 1.0
    csv = tmp_path / "noisy.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "noisy.yaml"
    r = _run(csv, "--name", "noisy", "--out", out)
    assert r.exit_code == 0, r.output
    m = load_profile(str(out))
    clean = _steps(5, 150)
    assert np.abs(_predict(m, clean) / clean.time_s - 1).mean() < 0.02
    assert "weighted rows" in yaml.safe_load(out.read_text())["fit"]["method"]


def test_decode_only_steps_with_a_fixed_term(tmp_path):
    """Terms the steps cannot inform are held (prefill_overhead_s) or taken from --fix, and the YAML says so."""
    df = _steps(6)
    df = df[df.prefill_tokens == 0]
    csv = tmp_path / "decode.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "decode.yaml"
    r = _run(csv, "--name", "decode", "--out", out, "--fix", "prefill_attn_s=7.5e-10")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(out.read_text())
    assert doc["coefficients"]["prefill_attn_s"] == 7.5e-10
    assert doc["coefficients"]["prefill_overhead_s"] == 0.0
    assert doc["fit"]["fixed"] == {"prefill_attn_s": 7.5e-10}
    assert "prefill_overhead_s" in doc["fit"]["held_at_zero"]
    assert np.abs(_predict(load_profile(str(out)), df) / df.time_s - 1).max() < 0.01


def test_default_out_is_the_current_folder_and_never_overwrites(tmp_path, monkeypatch):
    """`sim calibrate STEPS.csv`, as the README writes it: the name is the file's stem, the profile lands in
    the current folder, never in the installed package's profile folder."""
    package = tmp_path / "package_profiles"
    package.mkdir()
    monkeypatch.setattr(calibrate_cli, "PROFILE_DIR", package)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    csv = tmp_path / "lab-a.csv"
    _steps(1, 60).to_csv(csv, index=False)
    r = _run(csv)
    assert r.exit_code == 0, r.output
    assert (work / "lab-a.yaml").exists() and "engine.profile: lab-a.yaml" in r.stdout
    assert not list(package.iterdir())
    assert yaml.safe_load((work / "lab-a.yaml").read_text())["name"] == "lab-a"
    before = (work / "lab-a.yaml").read_text()
    r = _run(csv)
    assert r.exit_code == 2 and "exists" in r.stderr and "--force" in r.stderr
    assert (work / "lab-a.yaml").read_text() == before
    assert _run(csv, "--force").exit_code == 0
    assert _run(csv, "--name", "lab-b").exit_code == 0 and (work / "lab-b.yaml").exists()


BAD = [
    ("missing_col", "prefill_tokens,prefill_attn,n_decode,time_s\n1,1,0,0.01\n", "header", "decode_ctx"),
    ("non_numeric", f"{HEADER}\n10,100,0,0,0.02\n10,abc,0,0,0.02\n", "line 3, column prefill_attn",
     "not a number: 'abc'"),
    ("negative_time", f"{HEADER}\n10,100,0,0,0.02\n0,0,4,400,-0.01\n", "line 3, column time_s", "must be > 0"),
    ("zero_time", f"{HEADER}\n0,0,4,400,0\n", "line 2, column time_s", "must be > 0"),
    ("negative_feature", f"{HEADER}\n0,0,-4,400,0.01\n", "line 2, column n_decode", "must be >= 0"),
    ("nan", f"{HEADER}\n0,0,4,nan,0.01\n", "line 2, column decode_ctx", "not a finite number"),
    ("short_row", f"{HEADER}\n0,0,4,0.01\n", "line 2", "4 fields, header has 5"),
    ("no_tokens", f"{HEADER}\n0,0,0,0,0.01\n", "line 2", "prefill_tokens > 0 or n_decode > 0"),
    ("header_only", f"{HEADER}\n", "", "no data rows"),
    ("empty", "", "header", "empty file"),
]


@pytest.mark.parametrize("name,text,where,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_csv_is_one_line_exit_2(tmp_path, name, text, where, reason):
    csv = tmp_path / f"{name}.csv"
    csv.write_text(text)
    out = tmp_path / "never.yaml"
    r = _run(csv, "--name", "x", "--out", out)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {csv}: {where}"), lines
    assert reason in lines[0]
    assert not out.exists()


def test_bad_arguments_exit_2(tmp_path):
    csv = tmp_path / "steps.csv"
    _steps(1, 30).to_csv(csv, index=False)
    r = _run(tmp_path / "nope.csv", "--name", "x", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2 and "nope.csv" in r.stderr and "no such file" in r.stderr
    r = _run(csv, "--name", "x", "--out", tmp_path / "x.yaml", "--fix", "bogus_s=1")
    assert r.exit_code == 2 and "--fix" in r.stderr and "overhead_s" in r.stderr
    r = _run(csv, "--name", "x", "--out", tmp_path / "x.yaml", "--fix", "overhead_s=-1")
    assert r.exit_code == 2 and ">= 0" in r.stderr
    r = _run(csv, "--name", "../escape", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2 and "--name" in r.stderr
    assert not (tmp_path / "x.yaml").exists()
