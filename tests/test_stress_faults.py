"""`stress run` against a server that misbehaves in every way tests/faulty_server.py knows: each fault
ends as its outcome, nothing crashes, and every scheduled request has exactly one row."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from simulator.scenario import scenario_from_dict
from stress_tester.run import run_stress
from stress_tester.runner import Options

import faulty_server

HERE = Path(__file__).parent
N = 6  # requests per run: 4 streamed, 2 whole answers


@pytest.fixture(scope="module")
def faulty():
    with faulty_server.running() as url:
        yield url


def scenario(timeout=0.4, n=N):
    return scenario_from_dict({
        "name": "faults", "seed": 3, "num_requests": n,
        "workload": {"classes": [
            {"name": "stream", "arrival": {"type": "constant", "rate": 40}, "timeout_s": timeout,
             "prompt_tokens": {"type": "fixed", "value": 12}, "output_tokens": {"type": "uniform", "low": 4, "high": 8}},
            {"name": "whole", "arrival": {"type": "constant", "rate": 20}, "timeout_s": timeout, "stream": False,
             "prompt_tokens": {"type": "fixed", "value": 12}, "output_tokens": {"type": "fixed", "value": 5}}]}})


def run(url, tmp_path, api="openai-chat", **kw):
    out = tmp_path / "out"
    summary = run_stress(scenario(**{k: kw.pop(k) for k in ("timeout", "n") if k in kw}),
                         Options(base_url=url, api=api, grace=1.0, **kw), out, plots=False, log=lambda *a, **k: None)
    return summary, pd.read_csv(out / "requests.csv", keep_default_na=False)


# mode -> (outcome of streamed requests, outcome of whole answers, error text expected in the streamed rows)
FAULTS = {
    "reset": ("connection_error", "connection_error", "connection"),
    "stall": ("timeout", "timeout", "timeout_s=0.4"),
    "stallmid": ("timeout", "ok", "timeout_s=0.4"),
    "malformed": ("stream_error", "ok", "malformed"),
    "cut": ("stream_error", "ok", "stream cut"),
    "short": ("stream_error", "ok", "before completion"),
    "garbage": ("http_error", "http_error", "malformed HTTP"),
    "500": ("http_error", "http_error", "HTTP 500"),
    "404": ("http_error", "http_error", "HTTP 404"),
    "503": ("rejected_queue_full", "rejected_queue_full", "HTTP 503"),
    "429": ("rejected_rate_limited", "rejected_rate_limited", "HTTP 429"),
}


@pytest.mark.parametrize("mode", list(FAULTS))
def test_fault_gives_its_outcome(faulty, tmp_path, mode):
    want_stream, want_whole, text = FAULTS[mode]
    summary, df = run(f"{faulty}/{mode}", tmp_path)
    assert len(df) == N and sorted(df.request_id) == list(range(N))  # no request lost
    assert set(df.loc[df.stream == 1, "outcome"]) == {want_stream}
    assert set(df.loc[df.stream == 0, "outcome"]) == {want_whole}
    assert df.loc[df.stream == 1, "error"].str.contains(text, regex=False).all(), df.error.tolist()
    assert summary["requests"]["generated"] == N
    assert summary["stress"]["sent_open_loop"] == N
    if want_stream == "ok":
        return
    failed = df[df.outcome != "ok"]
    assert (failed.ttft_s == "").all() and (failed.e2e_s == "").all()  # failures stay out of latency statistics
    assert (failed.arrival_s != "").all()  # but they were sent, and when is kept


def test_cut_stream_keeps_tokens_received(faulty, tmp_path):
    _, df = run(f"{faulty}/cut", tmp_path)
    # the server sends a role chunk and one token before the cut: one token was received
    assert (df.loc[df.stream == 1, "output_tokens"] == 1).all()


def test_429_without_retry_is_a_rejection(faulty, tmp_path):
    summary, df = run(f"{faulty}/429once-a", tmp_path)
    assert set(df.outcome) == {"rejected_rate_limited"}
    assert summary["stress"]["retries"] == 0


def test_retry_honours_retry_after_then_succeeds(faulty, tmp_path):
    summary, df = run(f"{faulty}/429once-b", tmp_path, retry=True)
    assert set(df.outcome) == {"ok"}
    assert summary["stress"]["retries"] == N
    # every request waited out the server's Retry-After (0.05 s) before its answer
    assert (df.e2e_s.astype(float) >= 0.05).all()
    assert (df.output_tokens == df.applied_max_tokens).all()


def test_retry_is_bounded(faulty, tmp_path):
    summary, df = run(f"{faulty}/429", tmp_path, retry=True, max_retries=2, timeout=2.0)
    assert set(df.outcome) == {"rejected_rate_limited"}
    assert summary["stress"]["retries"] == 2 * N


def test_retries_stop_at_the_requests_timeout(faulty, tmp_path):
    summary, df = run(f"{faulty}/429", tmp_path, retry=True, max_retries=20, timeout=0.3)
    # each request ends with its last 429, or, when an attempt was still under way at its deadline (a loaded
    # machine), as a timeout at that deadline
    late = df[df.outcome == "timeout"]
    assert set(df.outcome) <= {"rejected_rate_limited", "timeout"} and (df.outcome == "rejected_rate_limited").any()
    assert ((late.end_s.astype(float) - late.arrival_s.astype(float)) >= 0.3 - 1e-3).all()
    assert 0 < summary["stress"]["retries"] < 20 * N  # ~5 waits of 0.05 s fit in 0.3 s, not 20
    assert ((df.end_s.astype(float) - df.arrival_s.astype(float)) <= 0.3 + 0.1).all()


def test_connection_refused(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    summary, df = run(f"http://127.0.0.1:{port}", tmp_path)
    assert set(df.outcome) == {"connection_error"} and len(df) == N
    assert summary["throughput"]["requests_per_s"] == 0


@pytest.mark.parametrize("api", ["ollama-chat", "llamacpp", "responses", "openai-completions"])
def test_faults_in_other_framings(faulty, tmp_path, api):
    for mode, want in (("malformed", "stream_error"), ("cut", "stream_error"), ("short", "stream_error")):
        _, df = run(f"{faulty}/{mode}", tmp_path, api=api)
        assert set(df.loc[df.stream == 1, "outcome"]) == {want}, (api, mode, df.error.tolist())


def test_queue_api_faults(faulty, tmp_path):
    _, df = run(f"{faulty}/503", tmp_path, api="queue")
    assert set(df.outcome) == {"rejected_queue_full"}
    _, df = run(f"{faulty}/stall", tmp_path, api="queue")
    assert set(df.outcome) == {"timeout"}
