"""`stress run`: every dialect against servers that speak it (the twin server and tests/faulty_server.py),
the same request stream as `sim run`, agreement with the simulator through the twin, stopping
(SIGINT, --max-duration), --workers, the concurrency cap, closed-loop users and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from simulator.records import read_csv
from simulator.run import run_scenario
from simulator.scenario import load_scenario, scenario_from_dict
from stress_tester.dialects import DIALECTS
from stress_tester.prompts import prompt_text
from stress_tester.run import run_stress
from stress_tester.runner import Options

import faulty_server
from twin_server import twin_server

HERE = Path(__file__).parent

APIS = list(DIALECTS)
ENGINE = {"type": "dynamic_batching", "max_batch_size": 8, "batch_timeout_s": 0.005}


def write(tmp: Path, name: str, data: dict) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def small(n=8, timeout=5.0) -> dict:
    return {"name": "small", "seed": 5, "num_requests": n, "engine": ENGINE,
            "workload": {"classes": [
                {"name": "chat", "arrival": {"type": "constant", "rate": 40}, "timeout_s": timeout,
                 "prompt_tokens": {"type": "uniform", "low": 10, "high": 60},
                 "output_tokens": {"type": "uniform", "low": 3, "high": 12}},
                {"name": "batch", "arrival": {"type": "constant", "rate": 20}, "stream": False, "timeout_s": timeout,
                 "prompt_tokens": {"type": "fixed", "value": 30}, "output_tokens": {"type": "fixed", "value": 6}}]}}


def stress(sc, url, out, workers=1, **kw):
    return run_stress(sc, Options(base_url=url, grace=1.0, **kw), out, workers=workers, plots=False,
                      log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def reference():
    """tests/faulty_server.py: strict about request bodies, exact about lengths."""
    with faulty_server.running() as url:
        yield url


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("twin"), "small", small())
    with twin_server(path) as url:
        yield url, path


# ------------------------------------------------------------------ dialects
@pytest.mark.parametrize("no_stream", [False, True], ids=["stream", "whole"])
@pytest.mark.parametrize("api", APIS)
def test_dialect_against_twin(twin, tmp_path, api, no_stream):
    url, path = twin
    sc = load_scenario(path)
    s = stress(sc, url, tmp_path, api=api, no_stream=no_stream)
    df = read_csv(tmp_path / "requests.csv")
    assert len(df) == 8 and s["requests"]["outcomes"] == {"ok": 8}, df.error.tolist()
    # the twin generates exactly the requested length; the client counted (or was told) all of it
    assert (df.output_tokens == df.applied_max_tokens).all()
    assert (df.ttft_s > 0).all() and (df.e2e_s >= df.ttft_s).all()
    assert (df.http_status == 200).all() or (api == "queue" and df.http_status.isin([200, 202]).all())
    streamed = df[df.stream == 1]
    if not no_stream and api != "queue":
        # a stream's tokens arrive over time: decode time shows between first and last token
        assert (streamed.e2e_s - streamed.ttft_s > 0).all()


@pytest.mark.parametrize("api", APIS)
def test_dialect_against_reference_server(reference, tmp_path, api):
    """The reference server rejects requests whose length knob, tenant headers or usage option is
    missing, and answers with exactly the requested number of tokens, one per event, 5 ms apart."""
    sc = scenario_from_dict(small(n=6))
    s = stress(sc, f"{reference}/slow", tmp_path, api=api)
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"ok": 6}, df.error.tolist()
    assert (df.output_tokens == df.applied_max_tokens).all()
    if api != "queue":
        itl = s["latency"]["itl"]
        assert itl["count"] == int((df.loc[df.stream == 1, "output_tokens"] - 1).sum())
        assert 0.004 <= itl["p50"] <= 0.05  # the server's 5 ms token gap, seen from the client
        assert s["stress"]["usage_differs_from_chunks"] == 0


def test_usage_missing_falls_back_to_counted_tokens(reference, tmp_path):
    sc = scenario_from_dict(small(n=6))
    s = stress(sc, f"{reference}/nousage", tmp_path)
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"ok": 6}
    assert (df.output_tokens == df.applied_max_tokens).all()  # counted from stream chunks / answer text
    assert s["stress"]["usage_reported"] == 0


def test_no_extensions_omits_vllm_fields(reference, tmp_path):
    # the reference server insists on ignore_eos for OpenAI bodies: without it, every request is a 400
    sc = scenario_from_dict(small(n=4))
    stress(sc, f"{reference}/ok", tmp_path, extensions=False)
    df = read_csv(tmp_path / "requests.csv")
    assert set(df.outcome) == {"http_error"} and (df.http_status == 400).all()
    assert df.error.str.contains("ignore_eos").all()


# ------------------------------------------------------------------ same stream, same numbers
def test_replays_the_simulators_stream(reference, tmp_path):
    data = small(n=12)
    data["workload"]["classes"][0]["arrival"] = {"type": "poisson", "rate": 60}
    data["workload"]["classes"][1]["max_tokens"] = 4
    sc = scenario_from_dict(data)
    run_scenario(sc, tmp_path / "sim", plots=False)
    stress(sc, f"{reference}/ok", tmp_path / "stress")
    a = read_csv(tmp_path / "sim" / "requests.csv")
    b = read_csv(tmp_path / "stress" / "requests.csv")
    cols = ["request_id", "class_name", "user", "project", "model", "tier", "priority", "stream", "prompt_tokens",
            "requested_max_tokens"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert np.allclose(a.scheduled_s, b.scheduled_s)
    lag = b.arrival_s - b.scheduled_s
    assert (lag >= 0).all() and (lag < 0.5).all()
    # the length asked of the server is the simulator's natural length cut at max_tokens
    assert (b.applied_max_tokens == a.output_tokens).all()


def test_prompts_have_the_wanted_word_count():
    for n in (1, 2, 17, 500):
        assert len(prompt_text(n, 12345).split()) == n
    a = prompt_text(300, 1, (7, 8), 128).split()
    b = prompt_text(300, 2, (7, 8), 128).split()
    c = prompt_text(300, 3, (9,), 128).split()
    assert len(a) == 300 and a[:128] == b[:128] and a[128] != b[128]  # shared prefix, then each its own
    assert a[:1] != c[:1]


SIM_TOLERANCE = (0.25, 0.015)  # relative, absolute seconds: a percentile agrees within either


def test_stress_against_twin_agrees_with_sim(tmp_path):
    """Outcome of each request equal, and latency percentiles within 25 % or 15 ms of the simulator's
    prediction. The scenario is light (latencies of hundreds of ms on one replica, batches of 4) so
    client and server timing noise (a few ms here) is small against what is compared; ITL is
    compared at its median, its tail being exactly that noise."""
    path = write(tmp_path, "cmp", {
        "name": "stress_vs_sim", "seed": 7, "num_requests": 30, "engine": {**ENGINE, "max_batch_size": 4,
                                                                          "batch_timeout_s": 0.01},
        "tenants": {"users": [{"id": "alice", "project": "app"}, {"id": "bob", "project": "capped"}],
                    "projects": [{"id": "app"}, {"id": "capped", "token_quota": 1500, "quota_window_s": 600}],
                    "models": [{"name": "default"}]},
        "workload": {"classes": [
            {"name": "chat", "user": "alice", "arrival": {"type": "constant", "rate": 8}, "timeout_s": 10,
             "prompt_tokens": {"type": "uniform", "low": 100, "high": 400},
             "output_tokens": {"type": "uniform", "low": 10, "high": 30}},
            {"name": "capped", "user": "bob", "arrival": {"type": "constant", "rate": 4}, "timeout_s": 10,
             "prompt_tokens": {"type": "uniform", "low": 100, "high": 400},
             "output_tokens": {"type": "uniform", "low": 10, "high": 30}}]}})
    sc = load_scenario(path)
    sim, _ = run_scenario(sc, tmp_path / "sim", plots=False)
    with twin_server(path, process=True) as url:  # its own interpreter: no GIL shared with the client
        live = stress(sc, url, tmp_path / "stress")
    a = read_csv(tmp_path / "sim" / "requests.csv")
    b = read_csv(tmp_path / "stress" / "requests.csv")
    assert list(a.request_id) == list(b.request_id)
    assert list(a.outcome) == list(b.outcome)
    assert sim["outcomes_by_class"] == live["outcomes_by_class"]
    assert live["outcomes_by_class"]["capped"].get("rejected_quota", 0) > 0  # the quota really bit
    rel, floor = SIM_TOLERANCE
    for metric in ("ttft", "tpot", "e2e"):
        for p in ("p50", "p90", "p99"):
            x, y = sim["latency"][metric][p], live["latency"][metric][p]
            assert abs(x - y) <= max(rel * x, floor), (metric, p, x, y)
    x, y = sim["latency"]["itl"]["p50"], live["latency"]["itl"]["p50"]
    assert abs(x - y) <= max(rel * x, floor), ("itl", x, y)
    assert live["source"] == "stress" and live["stress"]["sent_open_loop"] == len(b)


# ------------------------------------------------------------------ stopping
def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-c", "from stress_tester.cli import app; app()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


@pytest.mark.parametrize("workers,sig", [(1, signal.SIGINT), (2, signal.SIGTERM)], ids=["sigint", "sigterm-workers"])
def test_signal_leaves_a_complete_partial_report(reference, tmp_path, workers, sig):
    """SIGTERM goes to the parent alone: it forwards the stop to its sending processes."""
    path = write(tmp_path, "long", {"name": "long", "seed": 1, "num_requests": 400, "workload": {"classes": [
        {"name": "c", "arrival": {"type": "poisson", "rate": 40}, "timeout_s": 5,
         "prompt_tokens": {"type": "fixed", "value": 10}, "output_tokens": {"type": "fixed", "value": 40}}]}})
    prog = tmp_path / "progress.json"
    out = tmp_path / "out"
    proc = _cli("run", path, "--base-url", f"{reference}/slow", "--out", out, "--progress-file", prog,
                "--grace", "0.05", "--no-plots", "-q", "--workers", workers)
    try:
        deadline = time.monotonic() + 60
        sent = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                sent = json.loads(prog.read_text())["sent"]
            except (OSError, ValueError, KeyError):
                sent = 0
            if sent >= 20:
                break
            time.sleep(0.05)
        assert sent >= 20, "stress run did not start sending"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "partial" in err
    df = read_csv(out / "requests.csv")
    assert sorted(df.request_id) == list(range(400))  # every scheduled request, once
    counts = df.outcome.value_counts().to_dict()
    assert counts.get("ok", 0) >= 1 and counts.get("not_sent", 0) > 100
    assert set(counts) <= {"ok", "not_sent", "stream_error"}
    cut = df[df.outcome == "stream_error"]
    assert (cut.error == "cancelled at shutdown").all()  # 40 tokens at 5 ms outlast the 50 ms grace
    assert df.loc[df.outcome == "not_sent", "arrival_s"].isna().all()
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"]["generated"] == 400 and s["stress"]["stop_reason"] == f"interrupted ({sig.name})"
    assert (df.loc[df.outcome == "not_sent", "error"] == f"interrupted ({sig.name})").all()
    assert (out / "report.md").exists()


def test_max_duration_stops_sending(reference, tmp_path):
    data = small(n=200)
    sc = scenario_from_dict(data)
    t = time.monotonic()
    s = stress(sc, f"{reference}/ok", tmp_path, max_duration=0.5)
    assert time.monotonic() - t < 10
    df = read_csv(tmp_path / "requests.csv")
    assert len(df) == 200 and s["requests"]["generated"] == 200
    sent = df[df.outcome != "not_sent"]
    assert (sent.scheduled_s < 0.5).all() and (df.loc[df.outcome == "not_sent", "scheduled_s"] >= 0.5).all()
    assert set(sent.outcome) == {"ok"}
    assert s["stress"]["stop_reason"].startswith("--max-duration")


def test_drain_bounds_the_wait_for_stalled_requests(reference, tmp_path):
    data = small(n=4, timeout=600)
    data["drain_s"] = 0.3
    sc = scenario_from_dict(data)
    t = time.monotonic()
    stress(sc, f"{reference}/stall", tmp_path)
    assert time.monotonic() - t < 10
    df = read_csv(tmp_path / "requests.csv")
    # ended as the simulator ends requests still running at drain_s
    assert set(df.outcome) == {"timeout"} and (df.error == "drain_s reached").all()


# ------------------------------------------------------------------ load shapes
def test_workers_merge_every_record(reference, tmp_path):
    sc = scenario_from_dict({**small(n=60), "workload": {"classes": [
        {"name": "c", "arrival": {"type": "constant", "rate": 200}, "timeout_s": 5,
         "prompt_tokens": {"type": "fixed", "value": 10}, "output_tokens": {"type": "fixed", "value": 4}}]}})
    s = stress(sc, f"{reference}/ok", tmp_path, workers=2)
    df = read_csv(tmp_path / "requests.csv")
    assert list(df.request_id) == list(range(60)) and set(df.outcome) == {"ok"}
    assert s["stress"]["workers"] == 2 and s["stress"]["sent_open_loop"] == 60
    # one start time for both processes: sends keep to the shared schedule
    assert (df.arrival_s - df.scheduled_s).between(0, 0.25).all()
    assert s["stress"]["achieved_rate"] == pytest.approx(200, rel=0.1)


def test_concurrency_cap_and_lag_flag(reference, tmp_path):
    sc = scenario_from_dict({"name": "capped", "num_requests": 10, "workload": {"classes": [
        {"name": "c", "arrival": {"type": "constant", "rate": 100}, "timeout_s": 5,
         "prompt_tokens": {"type": "fixed", "value": 10}, "output_tokens": {"type": "fixed", "value": 6}}]}})
    s = stress(sc, f"{reference}/slow", tmp_path, concurrency=1)
    df = read_csv(tmp_path / "requests.csv").sort_values("arrival_s")
    assert set(df.outcome) == {"ok"}
    # one at a time: each request is sent after the previous one ended
    assert (df.arrival_s.to_numpy()[1:] >= df.end_s.to_numpy()[:-1] - 1e-6).all()
    # 6 tokens 5 ms apart take ~30 ms, arrivals come every 10 ms: sends fall behind and the run says so
    st = s["stress"]
    assert st["flagged"] and st["lag_ms"]["p99"] > 10 and st["warnings"]


def test_closed_loop_users(reference, tmp_path):
    sc = scenario_from_dict({"name": "closed", "num_requests": 9, "workload": {"classes": [
        {"name": "c", "arrival": {"type": "closed_loop", "users": 3, "think_time_s": 0.01, "think": "fixed"},
         "timeout_s": 5, "prompt_tokens": {"type": "fixed", "value": 10}, "output_tokens": {"type": "fixed", "value": 3}}]}})
    s = stress(sc, f"{reference}/ok", tmp_path)
    df = read_csv(tmp_path / "requests.csv")
    sim = read_csv(run_scenario(sc, tmp_path / "sim", plots=False) and tmp_path / "sim" / "requests.csv")
    assert len(df) == 9 and set(df.outcome) == {"ok"}
    assert list(df.request_id) == list(sim.request_id)  # the world's numbering of closed-loop requests
    assert s["stress"]["sent_open_loop"] == 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needle", [
    (["--base-url", "127.0.0.1:8000"], "--base-url: 127.0.0.1:8000: expected http"),
    (["--base-url", "ftp://127.0.0.1"], "--base-url"),
    (["--base-url", "http://127.0.0.1:99999"], "bad port"),
    (["--base-url", "http://127.0.0.1:8000", "--api", "grpc"], "unknown API"),
    (["--base-url", "http://127.0.0.1:8000", "--set", "workload.classes[0].arrival.rate=-1"],
     "workload.classes[0].arrival.rate"),
    (["--base-url", "http://127.0.0.1:8000", "--out", "FILE"], "exists and is not a folder"),
    (["--base-url", "http://127.0.0.1:8000", "--prompt-word", 'say "hi"'], "--prompt-word"),
    (["--base-url", "http://127.0.0.1:8000", "--prompt-word", ""], "expected 1 to 16 characters"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    from typer.testing import CliRunner

    from stress_tester.cli import app
    path = write(tmp_path, "s", small(n=2))
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, ["run", str(path), *args])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "o").exists()  # nothing was sent, nothing half-written


def test_missing_scenario_file(tmp_path):
    proc = _cli("run", tmp_path / "nope.yaml", "--base-url", "http://127.0.0.1:8000")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "file not found" in err and "Traceback" not in err


def test_cli_writes_the_report(reference, tmp_path):
    path = write(tmp_path, "s", small(n=4))
    proc = _cli("run", path, "--base-url", f"{reference}/ok", "--api", "llamacpp", "--out", tmp_path / "o", "--no-plots")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "report:" in out and "schedule lag" in err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["source"] == "stress" and s["requests"]["outcomes"] == {"ok": 4}
    assert "## Stress" in (tmp_path / "o" / "report.md").read_text()


def test_signal_during_start_up_leaves_a_report_of_unsent_requests(tmp_path):
    """The server's facts are asked before the first send; a server that accepts and never answers keeps
    stress run there, and a signal then still ends in a report in which every request is accounted for."""
    import socket
    path = write(tmp_path, "s", small(n=12))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.settimeout(60)
    port = lsock.getsockname()[1]
    out = tmp_path / "out"
    proc = _cli("run", path, "--base-url", f"http://127.0.0.1:{port}", "--out", out, "--no-plots", "-q")
    try:
        conn, _ = lsock.accept()  # stress run is asking for /metrics: it is in its start-up
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        lsock.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    df = read_csv(out / "requests.csv")
    assert sorted(df.request_id) == list(range(12)) and (df.outcome == "not_sent").all()
    assert (df.error == "interrupted (SIGINT) during start-up").all()
    assert (out / "summary.json").exists() and (out / "report.md").exists()


@pytest.mark.parametrize("args,needle", [
    (["--users", "1,x"], "--users"),
    (["--rates", "0"], "values must be > 0"),
    (["--api", "grpc"], "unknown API"),
    (["--set", "workload.classes[0].arrival.users=0"], "users"),
])
def test_probe_bad_input_is_one_line(tmp_path, args, needle):
    """Every probe scenario is checked before the first request is sent."""
    from typer.testing import CliRunner

    from stress_tester.cli import app
    result = CliRunner().invoke(app, ["probe", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_the_servers_prefix_cache_counters_give_the_runs_hits(tmp_path):
    """vLLM's vllm:prefix_cache_queries/_hits counters (the twin keeps them as vLLM V1 does), read before and
    after a run, say what its prefix cache served even when no response says it per request."""
    from simulator.runfolder import load_run_folder
    from stress_tester.facts import probe
    d = {"name": "shared", "seed": 4, "num_requests": 24,
         "engine": {"type": "continuous", "prefix_caching": True, "block_size": 16, "max_num_seqs": 16},
         "workload": {"classes": [{"name": "c", "arrival": {"type": "poisson", "rate": 30}, "timeout_s": 20,
                                   "prefix": {"groups": 2, "tokens": 256, "share": 1.0, "block_tokens": 64},
                                   "prompt_tokens": {"type": "uniform", "low": 300, "high": 600},
                                   "output_tokens": {"type": "fixed", "value": 4}}]}}
    path = write(tmp_path, "shared", d)
    with twin_server(path) as url:
        before = probe(url)["raw"]["prefix_cache"]
        stress(load_scenario(path), url, tmp_path / "run")
        after = probe(url)["raw"]["prefix_cache"]
    pc = load_run_folder(tmp_path / "run").prefix_cache()
    assert pc["queried_tokens"] == after["queries"] - before["queries"] and pc["hit_tokens"] == after["hits"] - before["hits"]
    df = pd.read_csv(tmp_path / "run" / "client.csv")
    assert pc["queried_tokens"] == df.prompt_tokens_server.sum()  # every prompt looked up once (no preemption)
    # 2 groups of 256 shared tokens in 64-token units: every request after its group's first hits 256
    assert pc["hit_tokens"] == 256 * (24 - 2) and 0 < pc["hit_pct"] < 100


def test_the_servers_histograms_say_what_it_saw_of_the_run(tmp_path):
    """vLLM's histograms (the twin keeps them as vLLM V1 does), read before and after a run: their difference
    counts the run's requests and prompt tokens as the client sent them."""
    from simulator.runfolder import load_run_folder
    d = {"name": "hist", "seed": 5, "num_requests": 30,
         "engine": {"type": "continuous", "max_num_seqs": 8},
         "workload": {"classes": [{"name": "c", "arrival": {"type": "poisson", "rate": 40}, "timeout_s": 20,
                                   "prompt_tokens": {"type": "uniform", "low": 20, "high": 300},
                                   "output_tokens": {"type": "uniform", "low": 2, "high": 9}}]}}
    path = write(tmp_path, "hist", d)
    with twin_server(path) as url:
        stress(load_scenario(path), url, tmp_path / "warm")  # the counters start from something
        stress(load_scenario(path), url, tmp_path / "run")
    h = load_run_folder(tmp_path / "run").server_histograms()
    ok = pd.read_csv(tmp_path / "run" / "client.csv").merge(pd.read_csv(tmp_path / "run" / "requests.csv"),
                                                            on="request_id").query("outcome == 'ok'")
    assert len(ok) == 30
    p = h["vllm:request_prompt_tokens"]
    assert p["count"] == 30 and p["sum"] == ok.prompt_tokens_server.sum()
    assert p["buckets"]["+Inf"] == 30
    e2e = h["vllm:e2e_request_latency_seconds"]
    assert e2e["count"] == 30 and 0 < e2e["mean"]
    assert h["vllm:request_queue_time_seconds"]["mean"] <= e2e["mean"]
