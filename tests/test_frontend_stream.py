"""The front end's wait per streaming response (profile `frontend.per_stream_s`, world.py dispatch): vLLM's
API server is one asyncio loop that handles every stream's output each engine step."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from simulator.costmodel import PROFILE_DIR, load_profile
from simulator.errors import InputError
from simulator.run import run_scenario
from simulator.scenario import scenario_from_dict


def _run(tmp_path, per_stream, tag):
    prof = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text())
    prof["frontend"] = {"latency_s": 0.01, "per_stream_s": per_stream}
    path = tmp_path / f"p{tag}.yaml"
    path.write_text(yaml.safe_dump(prof))
    sc = scenario_from_dict({"name": "fe", "seed": 5, "num_requests": 150, "workload": {"classes": [
        {"name": "c", "arrival": {"type": "poisson", "rate": 20}, "stream": True,
         "prompt_tokens": {"type": "uniform", "low": 50, "high": 400},
         "output_tokens": {"type": "uniform", "low": 20, "high": 120}}]},
        "engine": {"type": "continuous", "profile": str(path)}})
    run_scenario(sc, tmp_path / tag, plots=False)
    return pd.read_csv(tmp_path / tag / "requests.csv").set_index("request_id")


def test_wait_per_streaming_response(tmp_path):
    a, b = _run(tmp_path, 0.0, "none"), _run(tmp_path, 0.002, "busy")
    assert (a.outcome == "ok").all() and (b.outcome == "ok").all()
    # the first request meets an idle server: nothing is streaming, no extra wait
    assert b.ttft_s.iloc[0] == pytest.approx(a.ttft_s.iloc[0], abs=1e-12)
    # later ones wait 2 ms per response in flight: TTFT grows by about that times the streams they meet
    assert b.ttft_s.median() > a.ttft_s.median() + 0.004
    assert b.tpot_s.median() == pytest.approx(a.tpot_s.median(), rel=0.1)  # the wait is before the engine


def test_a_negative_wait_is_refused(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "bad", "coefficients": {"overhead_s": 0.001},
                                 "frontend": {"per_stream_s": -1}}))
    with pytest.raises(InputError, match="frontend.per_stream_s"):
        load_profile(str(p))
