"""The H100 profiles measured first-hand (bench/gpu_steps.py): `llama3-8b_h100_tp1_hf` (HF transformers
eager) and `llama3-8b_h100_tp1_graph` (decode steps replayed as CUDA graphs, GPU-bound eager prefills).
Each shipped YAML is the fit of its shipped steps and reproduces them within its stated error, and the
steps are the medians of the raw runs kept beside them."""
from __future__ import annotations

import csv
import hashlib
import statistics
from pathlib import Path

import numpy as np
import pytest

from simulator.calibrate_cli import calibrate, read_steps, step_kind
from simulator.costmodel import COEFFICIENTS, load_profile
from simulator.fitting import error_stats, evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "simulator/profiles/data/h100_hf_llama3-8b-shape"
STEPS = DATA / "steps.csv"
NAME = "llama3-8b_h100_tp1_hf"
RUNS = [DATA / "runs" / f"run{i}_steps.csv" for i in (1, 2, 3)]
GRAPH_STEPS = DATA / "steps_graph.csv"
GRAPH = "llama3-8b_h100_tp1_graph"
GRAPH_RUNS = [DATA / "runs" / f"run{i}_graph_decode.csv" for i in (4, 5)]
STEPS_OF = {NAME: STEPS, GRAPH: GRAPH_STEPS}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _key(r):
    return r["kind"], int(r["batch"]), int(r["prompt_len"]), int(r["context_len"])


@pytest.fixture(scope="module")
def profile():
    return load_profile(NAME)


@pytest.mark.parametrize("name", sorted(STEPS_OF))
def test_profile_describes_the_measured_setup(name):
    profile, steps = load_profile(name), STEPS_OF[name]
    meta = profile.meta
    assert meta["name"] == name and meta["gpu"]["name"] == "H100-80GB" and meta["tp"] == 1
    # 2 (K and V) * 32 layers * 8 KV heads * 128 head dim * 2 bytes (bf16)
    assert profile.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert 15.9e9 < profile.weight_bytes < 16.2e9  # 8.03 B parameters in bf16
    assert meta["source"]["dataset"] == "observed_steps"
    assert (ROOT / meta["source"]["file"]).resolve() == steps.resolve()
    assert meta["source"]["sha256"] == hashlib.sha256(steps.read_bytes()).hexdigest()
    assert meta["source"]["rows"] == len(_rows(steps))


@pytest.mark.parametrize("name", sorted(STEPS_OF))
def test_profile_reproduces_measured_steps_within_stated_error(name):
    profile, steps = load_profile(name), STEPS_OF[name]
    df = read_steps(steps)
    ev = evaluate(profile, df)
    stated = profile.meta["fit"]
    got = error_stats(ev)
    assert got["points"] == stated["points"]
    assert got["mape_pct"] <= stated["mape_pct"] + 0.01
    assert got["max_abs_pct"] <= stated["max_abs_pct"] + 0.01
    kinds = step_kind(df)
    for kind, s in stated["by_step_kind"].items():
        k = error_stats(ev[kinds == kind])
        assert k["mape_pct"] <= s["mape_pct"] + 0.01 and k["max_abs_pct"] <= s["max_abs_pct"] + 0.01, kind
    # The stated error is not vacuous: GPU-bound prefills (>= 1024 tokens, stable to ~1 % across passes)
    # are all within 20 %, and the fit is far better than a flat mean.
    big = ev[df["prefill_tokens"] >= 1024]
    assert len(big) >= 20 and big["error_pct"].abs().max() < 20
    flat = 100 * np.abs(df["time_s"].mean() - df["time_s"]) / df["time_s"]
    assert got["mape_pct"] < flat.mean() / 3


@pytest.mark.parametrize("name", sorted(STEPS_OF))
def test_profile_is_the_fit_of_the_shipped_steps(name):
    """Refitting the CSV reproduces the YAML's predictions and error, so neither was edited without the
    other. Coefficients themselves are not compared: the data cannot separate some of them (e.g. the
    per-step overhead from the weight-read term), so two fits can differ there with the same error."""
    profile = load_profile(name)
    _, refit, fit_meta = calibrate(STEPS_OF[name], name, gpu="H100-80GB", tp=1, model="llama-3-8b",
                                   kv_bytes_per_token=131072, weight_bytes=profile.weight_bytes)
    df = read_steps(STEPS_OF[name])
    shipped, again = evaluate(profile, df), evaluate(refit, df)
    np.testing.assert_allclose(again["predicted_s"].to_numpy(), shipped["predicted_s"].to_numpy(), rtol=2e-2)
    assert fit_meta["mape_pct"] == pytest.approx(profile.meta["fit"]["mape_pct"], abs=0.05)


def test_headline_steps(profile):
    """Eager HF: decode is CPU-launch bound (flat ~25 ms to 256 x 1024), prefill compute-bound past ~1k tokens."""
    measured = {_key(r): float(r["time_s"]) for r in _rows(STEPS)}
    for n, c in ((1, 1024), (64, 1024), (256, 1024)):
        t = measured[("decode", n, 0, c)]
        assert 0.015 < t < 0.045
        assert profile.decode_time(n, n * c) == pytest.approx(t, rel=0.35)
    for b, p in ((1, 4096), (4, 1024), (2, 8192)):
        t = measured[("prefill", b, p, 0)]
        assert profile.prefill_time([p] * b) == pytest.approx(t, rel=0.10)
    # 16k prefill tokens cost ~20x one decode step: the gap the simulator's schedulers trade on.
    assert measured[("prefill", 16, 1024, 0)] / measured[("decode", 1, 0, 1024)] > 10


def test_steps_are_the_median_of_the_raw_runs():
    """steps.csv = `bench/gpu_steps.py --merge runs/run1..3`: each row's time is the median of every
    pass median of every run, and no run's configuration was dropped."""
    merged = {_key(r): r for r in _rows(STEPS)}
    expected = {}
    for path in RUNS:
        for r in _rows(path):
            meds = ([float(m) for m in r["pass_medians_ms"].split(";")] if r.get("pass_medians_ms")
                    else [float(r["time_s"]) * 1e3])
            expected.setdefault(_key(r), []).extend(meds)
    assert set(merged) == set(expected)
    for key, meds in expected.items():
        row = merged[key]
        assert [float(m) for m in row["pass_medians_ms"].split(";")] == pytest.approx(meds, abs=0.006), key
        assert float(row["time_s"]) * 1e3 == pytest.approx(statistics.median(meds), rel=1e-4, abs=0.006), key
        assert int(row["passes"]) == len(meds)
        assert row["gpu"] == "NVIDIA H100 80GB HBM3" and row["layers"] == "32"


def test_graph_steps_are_the_graph_runs_and_the_gpu_bound_eager_prefills():
    """steps_graph.csv = `--merge runs/run4_graph_decode.csv runs/run5_graph_decode.csv steps.csv --kinds
    decode_graph,prefill,chunk --min-prefill-tokens 1024`: graph decode rows are the median of both runs,
    prefill and chunk rows are the eager ones of >= 1024 tokens, unchanged."""
    rows = {_key(r): r for r in _rows(GRAPH_STEPS)}
    expected = {}
    for path in GRAPH_RUNS:
        for r in _rows(path):
            expected.setdefault(_key(r), []).append(float(r["time_s"]) * 1e3)
    eager = {_key(r): r for r in _rows(STEPS) if r["kind"] in ("prefill", "chunk") and int(r["prefill_tokens"]) >= 1024}
    assert set(rows) == set(expected) | set(eager) and len(expected) == 66 and len(eager) >= 20
    for key, meds in expected.items():
        assert key[0] == "decode_graph" and len(meds) == 2
        assert float(rows[key]["time_s"]) * 1e3 == pytest.approx(statistics.median(meds), rel=1e-4, abs=0.006), key
        assert abs(meds[0] - meds[1]) / min(meds) < 0.02, key  # replayed graphs: the two runs agree within 2 %
    for key, r in eager.items():
        assert rows[key]["time_s"] == r["time_s"], key


def test_graph_decode_is_gpu_bound():
    """Without launch gaps a decode step reads the weights once and the KV cache: ~9 ms at batch 1 (a third
    of eager HF), growing with the context read, as in vLLM/SGLang; the profile follows within 5 %."""
    graph, eager = load_profile(GRAPH), load_profile(NAME)
    measured = {_key(r): float(r["time_s"]) for r in _rows(GRAPH_STEPS)}
    eager_measured = {_key(r): float(r["time_s"]) for r in _rows(STEPS)}
    one = measured[("decode_graph", 1, 0, 1024)]
    assert 0.006 < one < 0.012 and one < 0.5 * eager_measured[("decode", 1, 0, 1024)]
    assert measured[("decode_graph", 64, 0, 4096)] > 1.5 * measured[("decode_graph", 64, 0, 512)]
    for n, c in ((1, 1024), (64, 1024), (256, 1024), (32, 4096)):
        assert graph.decode_time(n, n * c) == pytest.approx(measured[("decode_graph", n, 0, c)], rel=0.05), (n, c)
    # the context term is the KV read: bytes per token over the H100's ~3 TB/s of HBM, within a factor 2
    assert 0.5 < graph.decode_ctx_s * 3.0e12 / graph.kv_bytes_per_token < 2.0
    assert graph.prefill_time([4096]) == pytest.approx(eager.prefill_time([4096]), rel=0.10)
