"""Summary statistics helpers (METRICS.md): what they compute must be exactly numpy's definitions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simulator.metrics import group_percentile, timeseries


@pytest.mark.parametrize("q", [0, 50, 90, 95, 99, 100])
def test_group_percentile_is_numpys_percentile_of_each_group(q):
    rng = np.random.default_rng(q)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        groups = rng.integers(0, int(rng.integers(1, 150)), n)
        # continuous values, many ties, and a heavy tail
        values = (rng.exponential(0.3, n), rng.integers(0, 4, n).astype(float), rng.lognormal(0, 2, n))[trial % 3]
        gs, out = group_percentile(groups, values, q)
        assert gs == sorted(set(groups.tolist()))
        for g, x in zip(gs, out):
            assert x == float(np.percentile(values[groups == g], q))  # bit for bit, not approximately


def test_group_percentile_of_nothing():
    assert group_percentile(np.zeros(0, dtype=int), np.zeros(0), 95) == ([], [])


def test_timeseries_ttft_p95_per_second():
    rng = np.random.default_rng(3)
    n = 5000
    end = np.sort(rng.uniform(0, 300, n))
    ttft = rng.exponential(0.2, n)
    df = pd.DataFrame({"arrival_s": end - 1.0, "end_s": end, "ttft_s": ttft, "output_tokens": 10,
                       "outcome": np.where(rng.random(n) < 0.9, "ok", "timeout")})
    ts = timeseries(df, None)
    ok = df[df.outcome == "ok"]
    sec = (ok.end_s // 1).astype(int).to_numpy()
    assert len(ts["ttft_p95"]) == len(ts["t"]) == 300
    for b, got in enumerate(ts["ttft_p95"]):
        sel = ok.ttft_s.to_numpy()[sec == b]
        assert got == (round(float(np.percentile(sel, 95)), 6) if sel.size else None)


def test_warmup_counts_from_the_origin():
    """The simulator's warm-up counts from t=0; the twin server's from its first request (its clock starts with
    the server): with origin 5 and warmup_s 2, requests arriving before 7 s are left out."""
    from simulator.metrics import summarize
    from simulator.scenario import scenario_from_dict
    sc = scenario_from_dict({"name": "w", "duration_s": 20, "warmup_s": 2,
                             "workload": {"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 1}}]}})
    arr = np.arange(5.0, 15.0)
    df = pd.DataFrame({"arrival_s": arr, "end_s": arr + 0.5, "outcome": "ok", "class_name": "a", "priority": 1,
                       "user": "u", "project": "p", "stream": 1, "prompt_tokens": 10, "output_tokens": 5,
                       "queue_wait_s": 0.1, "ttft_s": 0.2, "tpot_s": 0.05, "e2e_s": 0.5, "batch_size": 1, "cost": 0.0})
    plain = summarize(df, sc)
    assert plain["window"]["excluded_warmup"] == 0 and "warmup_from_s" not in plain["window"]
    twin = summarize(df, sc, origin=5.0)
    assert twin["window"]["excluded_warmup"] == 2 and twin["window"]["warmup_from_s"] == 5.0
    assert twin["requests"]["generated"] == 8 and twin["window"]["start_s"] == 7.0
