"""`stress run` against a REAL llama.cpp server (tools/server, from the `xllamacpp` wheel) on 127.0.0.1,
serving a tiny random Llama that the test writes (tests/realservers.py). One server serves the file.

Every dialect llama.cpp speaks (OpenAI chat and completions, native /completion, Responses), streamed
and whole: every request ends ok, each output has the length asked for (ignore_eos, or n_predict on
/completion), the tokens the tester counted add up to what the server says it generated (/metrics
`llamacpp:tokens_predicted_total`), the prompts are the token counts the scenario drew, and the
timings are ordered (send < first token <= last token). Streamed token chunks are not tokens here:
the tiny model's byte tokens that end mid-UTF-8 and its unused tokens stream as no text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from simulator.records import read_csv

from realservers import LlamaServer, get_json, get_text, make_tiny_gguf, metric

PARALLEL, CTX = 4, 2048
N = 20
APIS = ("openai-chat", "openai-completions", "llamacpp", "responses")
RUNS: list[dict] = []  # one line per stress run, printed at the end of the session (pytest -s)


def scenario(tmp: Path, n: int = N, seed: int = 11) -> Path:
    d = {"name": "real-llamacpp", "seed": seed, "num_requests": n,
         "workload": {"classes": [
             {"name": "chat", "arrival": {"type": "poisson", "rate": 25}, "timeout_s": 20,
              "prompt_tokens": {"type": "uniform", "low": 8, "high": 64},
              "output_tokens": {"type": "uniform", "low": 2, "high": 24}}]}}
    p = tmp / "real.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp")
    t0 = time.monotonic()
    model = make_tiny_gguf(tmp / "tiny.gguf")
    gguf_s = time.monotonic() - t0
    with LlamaServer(model, parallel=PARALLEL, ctx=CTX) as srv:
        srv.gguf_s = gguf_s
        yield srv
    if RUNS:
        print(f"\nllama-server: model written in {gguf_s:.3f} s ({model.stat().st_size} B), "
              f"healthy {srv.start_s:.3f} s after spawn")
        for r in RUNS:
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))


def counters(url: str) -> dict:
    t = get_text(url + "/metrics")
    return {k: metric(t, "llamacpp:" + k) for k in ("tokens_predicted_total", "prompt_tokens_total",
                                                    "prompt_tokens_cached_total")}


def stress_cli(url: str, api: str, path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stress_tester.cli", "run", str(path), "--base-url", url, "--api", api,
           "--out", str(out), "--no-plots", "-q", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())


def counters_reach(url: str, before: dict, want_out: int, deadline_s: float = 5.0) -> dict:
    """Server counters once its generated-token count has moved by `want_out` (bounded poll: a slot's
    numbers are folded into /metrics as it is released, around the time its last bytes go out)."""
    end = time.monotonic() + deadline_s
    while True:
        c = counters(url)
        if c["tokens_predicted_total"] - before["tokens_predicted_total"] >= want_out or time.monotonic() > end:
            return c
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", APIS)
def test_stress_run_against_llama_server(llama, tmp_path, api, stream):
    path = scenario(tmp_path)
    before = counters(llama.url)
    r = stress_cli(llama.url, api, path, tmp_path / "out", *([] if stream else ["--no-stream"]))
    assert r.returncode == 0, r.stderr[-3000:]
    df = read_csv(tmp_path / "out" / "requests.csv")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(df) == N
    assert s["requests"]["outcomes"] == {"ok": N}, df.error.tolist()
    assert (df.stream == int(stream)).all()
    # lengths: the server was told the drawn length and cannot stop earlier (ignore_eos / the model's EOS row)
    assert (df.output_tokens == df.requested_max_tokens).all(), df[["requested_max_tokens", "output_tokens"]]
    after = counters_reach(llama.url, before, int(df.output_tokens.sum()))
    # the server's own count of what it generated for this run = the sum of the recorded lengths
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] == df.output_tokens.sum()
    prompt = (after["prompt_tokens_total"] + after["prompt_tokens_cached_total"]
              - before["prompt_tokens_total"] - before["prompt_tokens_cached_total"])
    if api in ("openai-completions", "llamacpp"):
        # raw prompts: BOS, the word-start piece, the marker "r<id>" (one token a character), then
        # one " the" per further token: the synthetic prompt is the drawn count plus its marker
        marker = df.request_id.astype(str).str.len() + 1
        assert prompt == (df.prompt_tokens + marker + 1).sum()
    else:  # a chat template wraps each prompt: the same per request, so at least the drawn counts
        assert prompt >= df.prompt_tokens.sum() + N
    # timings: send < first token <= last token; a whole answer's tokens all arrive at once
    assert (df.ttft_s > 0).all() and (df.ttft_s <= df.e2e_s + 1e-9).all()
    assert np.allclose(df.arrival_s + df.e2e_s, df.end_s)
    if stream:
        # TPOT is 0 where a whole stream came in one socket read (this model makes a token in ~0.1 ms)
        tpot = df.tpot_s[df.output_tokens > 1]
        assert (tpot >= 0).all() and (tpot > 0).any()
    else:
        assert np.allclose(df.ttft_s, df.e2e_s)
    st = s["stress"]
    RUNS.append({"api": api, "stream": stream, "ok": s["requests"]["outcomes"].get("ok", 0),
                 "tokens": int(df.output_tokens.sum()),
                 "server_tokens": int(after["tokens_predicted_total"] - before["tokens_predicted_total"]),
                 "lag_p50_ms": st["lag_ms"]["p50"], "lag_p99_ms": st["lag_ms"]["p99"],
                 "ttft_p50_ms": round(float(df.ttft_s.median()) * 1e3, 2),
                 "e2e_p50_ms": round(float(df.e2e_s.median()) * 1e3, 2)})


def test_server_facts_the_test_relies_on(llama):
    """What the server says about itself (the numbers `stress run` records from /props and /slots)."""
    props = get_json(llama.url + "/props")
    assert props["total_slots"] == PARALLEL
    assert props["default_generation_settings"]["n_ctx"] == CTX // PARALLEL
    slots = get_json(llama.url + "/slots")
    assert len(slots) == PARALLEL and {s["n_ctx"] for s in slots} == {CTX // PARALLEL}
    assert get_json(llama.url + "/v1/models")["data"][0]["meta"]["n_ctx"] == CTX // PARALLEL
