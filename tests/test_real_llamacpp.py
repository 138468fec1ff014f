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


class Run:
    """One `stress run` against the session's server, with the server's counters around it."""

    def __init__(self, llama, out: Path, api: str, stream: bool, path: Path):
        self.api, self.stream, self.out = api, stream, out
        self.before = counters(llama.url)
        self.proc = stress_cli(llama.url, api, path, out, *([] if stream else ["--no-stream"]))
        assert self.proc.returncode == 0, self.proc.stderr[-3000:]
        self.df = read_csv(out / "requests.csv")
        self.summary = json.loads((out / "summary.json").read_text())
        self.after = counters_reach(llama.url, self.before, int(self.df.output_tokens.sum()))

    def delta(self, *keys) -> int:
        return int(sum(self.after[k] - self.before[k] for k in keys))


_RUNS: dict = {}


@pytest.fixture
def run(llama, tmp_path_factory, request):
    """run(api, stream): the stress run of the standard scenario, made once per session and dialect."""
    def get(api: str, stream: bool) -> Run:
        key = (api, stream)
        if key not in _RUNS:
            tmp = tmp_path_factory.mktemp(f"{api}-{'stream' if stream else 'whole'}")
            _RUNS[key] = Run(llama, tmp / "out", api, stream, scenario(tmp))
        return _RUNS[key]
    return get


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", APIS)
def test_stress_run_against_llama_server(run, api, stream):
    r = run(api, stream)
    df, s = r.df, r.summary
    assert len(df) == N
    assert s["requests"]["outcomes"] == {"ok": N}, df.error.tolist()
    assert (df.stream == int(stream)).all()
    # lengths: the server was told the drawn length and cannot stop earlier (ignore_eos / the model's EOS row)
    assert (df.output_tokens == df.requested_max_tokens).all(), df[["requested_max_tokens", "output_tokens"]]
    # the server's own count of what it generated for this run = the sum of the recorded lengths
    server_tokens = r.delta("tokens_predicted_total")
    assert server_tokens == df.output_tokens.sum(), (r.before, r.after)
    prompt = r.delta("prompt_tokens_total", "prompt_tokens_cached_total")
    if api in ("openai-completions", "llamacpp"):
        # raw prompts: BOS, the word-start piece, the marker "r<id>n<salt>" (one token a character), then
        # one " the" per further token: the synthetic prompt is the drawn count plus its marker
        salt = s["stress"]["prompt_salt"]
        marker = df.request_id.astype(str).str.len() + 1 + (len(f"n{salt}") if salt not in (None, -1) else 0)
        assert prompt == (df.prompt_tokens + marker + 1).sum(), (r.before, r.after)
    else:  # a chat template wraps each prompt: the same per request, so at least the drawn counts
        assert prompt >= df.prompt_tokens.sum() + N
    # timings: send < first token <= last token; a whole answer's tokens all arrive at once
    assert (df.ttft_s > 0).all() and (df.ttft_s <= df.e2e_s + 1e-9).all()
    assert np.allclose(df.arrival_s + df.e2e_s, df.end_s)
    assert (df.arrival_s >= df.scheduled_s - 1e-9).all()
    if stream:
        # TPOT is 0 where a whole stream came in one socket read (this model makes a token in ~0.1 ms)
        tpot = df.tpot_s[df.output_tokens > 1]
        assert (tpot >= 0).all() and (tpot > 0).any()
    else:
        assert np.allclose(df.ttft_s, df.e2e_s)
    st = s["stress"]
    RUNS.append({"api": api, "stream": stream, "ok": s["requests"]["outcomes"].get("ok", 0),
                 "tokens": int(df.output_tokens.sum()), "server_tokens": server_tokens,
                 "itl_count": s["latency"]["itl"].get("count", 0), "token_gaps": int((df.output_tokens - 1).sum()),
                 "lag_p50_ms": st["lag_ms"]["p50"], "lag_p99_ms": st["lag_ms"]["p99"],
                 "ttft_p50_ms": round(float(df.ttft_s.median()) * 1e3, 2),
                 "e2e_p50_ms": round(float(df.e2e_s.median()) * 1e3, 2)})


def find(o, key: str) -> list:
    """Every value under `key` anywhere in a JSON document."""
    if isinstance(o, dict):
        return [v for k, x in o.items() for v in ([x] if k == key else []) + find(x, key)]
    if isinstance(o, list):
        return [v for x in o for v in find(x, key)]
    return []


@pytest.mark.parametrize("api", APIS)
def test_itl_pools_every_token_gap(run, api):
    r = run(api, True)
    want = int((r.df.output_tokens - 1).clip(lower=0).sum())
    assert r.summary["latency"]["itl"]["count"] == want


FINISH = {"openai-chat": "length", "openai-completions": "length", "llamacpp": "limit", "responses": "completed"}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", APIS)
def test_server_usage_recorded(run, api, stream):
    """client.csv: what the server said of each request; its prompt counts add up to /metrics' own."""
    import pandas as pd
    r = run(api, stream)
    cl = pd.read_csv(r.out / "client.csv").set_index("request_id")
    df = r.df.set_index("request_id")
    assert set(cl.index) == set(df.index)
    assert (cl.output_tokens_server == df.output_tokens).all()
    assert cl.prompt_tokens_server.sum() == r.delta("prompt_tokens_total", "prompt_tokens_cached_total"), \
        (cl.prompt_tokens_server.tolist(), r.before, r.after)
    if api in FINISH and api != "responses":
        assert (cl.finish_reason == FINISH[api]).all(), cl.finish_reason.unique()
    s = r.summary["stress"]
    assert s["usage_reported"] == N and s["output_length_differs"] == 0 and s["usage_exceeds_max_tokens"] == 0
    if api == "llamacpp":  # the native API names the slot that ran each request
        assert cl.server_slot.between(0, PARALLEL - 1).all(), cl.server_slot.tolist()
    else:
        assert cl.server_slot.isna().all()


def tokens_of(r):
    import pandas as pd
    tok = pd.read_parquet(r.out / "tokens.parquet")
    return tok, tok.groupby("request_id"), r.df.set_index("request_id")


@pytest.mark.parametrize("api", APIS)
def test_per_token_times(run, api):
    """tokens.parquet beside requests.csv: request_id, t_s (run clock), n_tokens; one row per token chunk."""
    tok, g, df = tokens_of(run(api, True))
    assert str(tok.request_id.dtype) == "int64" and str(tok.t_s.dtype) == "float64"
    assert str(tok.n_tokens.dtype) == "int32"
    assert set(tok.request_id) <= set(df.index)  # streamed ok requests only (all of them: F4 below)
    df = df.loc[sorted(set(tok.request_id))]
    assert (tok.n_tokens >= 1).all()
    assert g.t_s.apply(lambda t: bool((np.diff(t.to_numpy()) >= 0).all())).all()  # in arrival order
    assert np.allclose(g.t_s.min(), df.arrival_s + df.ttft_s, atol=2e-6)  # same clock as requests.csv
    assert np.allclose(g.t_s.max(), df.end_s, atol=2e-6)
    assert (g.n_tokens.sum() <= df.output_tokens).all()  # llama.cpp streams fewer chunks than tokens


@pytest.mark.parametrize("api", APIS)
def test_per_token_counts_add_up_to_usage(run, api):
    """Every token the server says it generated is in tokens.parquet (per-chunk counts where the server
    gives them, e.g. /completion's `tokens` arrays; the rest with the final usage event)."""
    tok, g, df = tokens_of(run(api, True))
    assert set(tok.request_id) == set(df.index)
    assert (g.n_tokens.sum() == df.output_tokens).all()


@pytest.mark.parametrize("api", APIS)
def test_one_token_outputs_have_their_token_time(llama, tmp_path, api):
    """30 one-token outputs: the token is often a byte that ends mid-UTF-8 or an unused token, so llama.cpp
    streams no text for it, only the final event with usage 1. Its time is that event's (requests.csv
    says so: TTFT = E2E), and tokens.parquet must have it there."""
    import pandas as pd
    d = {"name": "one-token", "seed": 3, "num_requests": 30, "workload": {"classes": [
        {"name": "one", "arrival": {"type": "poisson", "rate": 30}, "timeout_s": 20,
         "prompt_tokens": {"type": "fixed", "value": 10}, "output_tokens": {"type": "fixed", "value": 1}}]}}
    p = tmp_path / "one.yaml"
    p.write_text(yaml.safe_dump(d))
    r = stress_cli(llama.url, api, p, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    df = read_csv(tmp_path / "out" / "requests.csv").set_index("request_id")
    assert (df.outcome == "ok").all() and (df.output_tokens == 1).all()
    tok = pd.read_parquet(tmp_path / "out" / "tokens.parquet").set_index("request_id")
    assert sorted(tok.index) == sorted(df.index)  # one row each
    assert np.allclose(tok.t_s.loc[df.index], df.end_s, atol=2e-6) and (tok.n_tokens == 1).all()


def test_server_facts_recorded(run):
    """server.json and the summary: llama.cpp's /props and /slots as the server said them."""
    r = run("openai-chat", True)
    facts = json.loads((r.out / "server.json").read_text())
    assert facts["kind"] == "llamacpp"
    assert facts["facts"] == r.summary["stress"]["server"]["facts"]
    assert facts["facts"]["total_slots"] == PARALLEL and facts["facts"]["n_ctx_per_slot"] == CTX // PARALLEL
    assert PARALLEL in find(facts, "total_slots")
    assert len(facts["end"]["slots"]) == PARALLEL


def test_short_outputs_at_a_full_context_are_counted(llama, tmp_path):
    """A 500-token prompt in a 512-token slot: llama.cpp generates 9 of the 24 tokens asked and says
    finish_reason "length". Each request is ok (a proper answer) and the run counts the 6 short outputs."""
    d = {"name": "ctx-full", "seed": 3, "num_requests": 6, "workload": {"classes": [
        {"name": "long", "arrival": {"type": "poisson", "rate": 20}, "timeout_s": 20,
         "prompt_tokens": {"type": "fixed", "value": 500}, "output_tokens": {"type": "fixed", "value": 24}}]}}
    p = tmp_path / "ctx.yaml"
    p.write_text(yaml.safe_dump(d))
    r = stress_cli(llama.url, "openai-completions", p, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    df = read_csv(tmp_path / "out" / "requests.csv")
    assert (df.outcome == "ok").all()
    assert (df.output_tokens < df.requested_max_tokens).all()  # what the server did (9 < 24)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["stress"]["output_length_differs"] == 6


def test_two_sending_processes(llama, tmp_path):
    """--workers 2: the same requests split over two processes, one report; the server's count agrees."""
    import pandas as pd
    path = scenario(tmp_path, n=40)
    before = counters(llama.url)
    r = stress_cli(llama.url, "openai-completions", path, tmp_path / "out", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    df = read_csv(tmp_path / "out" / "requests.csv")
    assert sorted(df.request_id) == list(range(40)) and (df.outcome == "ok").all(), df.error.unique()
    assert (df.output_tokens == df.requested_max_tokens).all()
    after = counters_reach(llama.url, before, int(df.output_tokens.sum()))
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] == df.output_tokens.sum()
    tok = pd.read_parquet(tmp_path / "out" / "tokens.parquet")
    assert set(tok.request_id) <= set(df.request_id) and not list((tmp_path / "out").glob("tokens-*.bin"))
    first = tok.groupby("request_id").t_s.min()
    d = df.set_index("request_id").loc[first.index]
    assert np.allclose(first, d.arrival_s + d.ttft_s, atol=2e-6)  # both processes on the run's clock


@pytest.fixture
def overload(llama, tmp_path_factory):
    """200 requests at 100/s into 4 slots (prompts 20-300, outputs 16-100): the server queues, TTFT in seconds.
    One run per session, shared by the tests below."""
    if "overload" not in _RUNS:
        tmp = tmp_path_factory.mktemp("overload")
        d = {"name": "overload", "seed": 4, "num_requests": 200, "workload": {"classes": [
            {"name": "c", "arrival": {"type": "poisson", "rate": 100}, "timeout_s": 60,
             "prompt_tokens": {"type": "uniform", "low": 20, "high": 300},
             "output_tokens": {"type": "uniform", "low": 16, "high": 100}}]}}
        p = tmp / "overload.yaml"
        p.write_text(yaml.safe_dump(d))
        r = stress_cli(llama.url, "llamacpp", p, tmp / "out")
        assert r.returncode == 0, r.stderr[-2000:]
        _RUNS["overload"] = tmp / "out"
    return _RUNS["overload"]


def test_overload_gauges_show_the_slots_and_the_queue(overload):
    """server.json's 1 s samples of llama.cpp's requests_processing / requests_deferred: never more running
    than slots, and a queue that formed while all slots were busy."""
    facts = json.loads((overload / "server.json").read_text())
    smp = [x for x in facts["samples"] if x["t_s"] >= 0]
    assert len(smp) >= 2
    gaps = np.diff([x["t_s"] for x in smp])
    assert (np.abs(gaps - 1.0) < 0.5).all(), gaps  # about every second
    assert all(x["running"] <= PARALLEL for x in smp)
    assert any(x["running"] == PARALLEL and x["waiting"] > 0 for x in smp)
    df = read_csv(overload / "requests.csv")
    assert df.ttft_s.median() > 0.2  # the queue shows in the clients' TTFT


def test_overload_has_no_connection_errors_from_keepalive(overload):
    """The server queues but answers every request: none may be lost to a reused connection it closed."""
    df = read_csv(overload / "requests.csv")
    assert (df.outcome == "ok").all(), df[df.outcome != "ok"].error.unique().tolist()
    assert (df.output_tokens == df.requested_max_tokens).all()


def test_server_facts_the_test_relies_on(llama):
    """What the server says about itself (the numbers `stress run` records from /props and /slots)."""
    props = get_json(llama.url + "/props")
    assert props["total_slots"] == PARALLEL
    assert props["default_generation_settings"]["n_ctx"] == CTX // PARALLEL
    slots = get_json(llama.url + "/slots")
    assert len(slots) == PARALLEL and {s["n_ctx"] for s in slots} == {CTX // PARALLEL}
    assert get_json(llama.url + "/v1/models")["data"][0]["meta"]["n_ctx"] == CTX // PARALLEL


def test_slot_choice_is_the_engines_rule(tmp_path):
    """llama-server's slot choice, which the llamacpp engine mirrors (it decides which slots share a forward
    pass): a fresh server fills never-used slots from the highest id down, then takes the least recently
    released. One closed-loop user, prompts long enough that no slot's cached prefix passes the 10 %
    similarity rule."""
    import pandas as pd
    model = make_tiny_gguf(tmp_path / "slots.gguf")
    d = {"name": "slots", "seed": 2, "num_requests": 7, "workload": {"classes": [
        {"name": "c", "arrival": {"type": "closed_loop", "users": 1, "think_time_s": 0.0, "think": "fixed"},
         "timeout_s": 20, "prompt_tokens": {"type": "fixed", "value": 120},
         "output_tokens": {"type": "fixed", "value": 3}}]}}
    p = tmp_path / "slots.yaml"
    p.write_text(yaml.safe_dump(d))
    with LlamaServer(model, parallel=4, ctx=2048) as srv:
        r = stress_cli(srv.url, "llamacpp", p, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    cl = pd.read_csv(tmp_path / "out" / "client.csv").sort_values("request_id")
    assert cl.server_slot.tolist() == [3, 2, 1, 0, 3, 2, 1], cl.server_slot.tolist()
    # what each slot holds at the end (server.json), which the next run inherits: its last request's tokens
    end = {s["id"]: s for s in json.loads((tmp_path / "out" / "server.json").read_text())["end"]["slots"]}
    last = cl.groupby("server_slot").last()
    for slot, row in last.iterrows():
        held = end[slot]["n_prompt_tokens"]
        assert row.prompt_tokens_server <= held <= row.prompt_tokens_server + row.output_tokens_server, (slot, held)
