"""The twin server (`sim serve`) over real HTTP on 127.0.0.1: every dialect's framing and token
count, timing against the cost model, gateway rejections as 429/503, client disconnects, bad
bodies, /metrics, /queue/status, usage persistence across a restart, and the CLI."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import re
import socket
import statistics
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from typer.testing import CliRunner

from twin_server import twin_server

BOUND_S = 20.0  # no wait in these tests lasts longer


def flat_profile(tmp: Path, step: float) -> Path:
    """A cost model in which every engine step takes `step` seconds, whatever it holds."""
    p = tmp / f"flat_{step * 1e3:g}ms.yaml"
    p.write_text(yaml.safe_dump({"name": "flat", "coefficients": {
        "overhead_s": 0.0, "weights_s": step, "linear_per_token_s": 0.0, "prefill_attn_s": 0.0,
        "decode_ctx_s": 0.0, "decode_seq_s": 0.0}}))
    return p


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def scenario(tmp: Path, step: float = 0.002, name: str = "twin", **extra) -> Path:
    d = {"name": name, "seed": 1, "duration_s": 60,
         "tenants": {"users": [{"id": "alice", "project": "lab", "tier": "high"},
                               {"id": "bob", "project": "lab", "tier": "standard"},
                               {"id": "etl", "project": "ops", "tier": "batch"}],
                     "projects": [{"id": "lab"}, {"id": "ops"}],
                     "models": [{"name": "m1", "cost_per_1k_prompt": 1.0, "cost_per_1k_output": 2.0,
                                 "default_max_tokens": 8, "max_max_tokens": 1024},
                                {"name": "off", "enabled": False}]},
         "workload": {"classes": [
             {"name": "chat", "user": "alice", "model": "m1", "tier": "high", "arrival": {"type": "poisson", "rate": 1}},
             {"name": "api", "user": "bob", "model": "m1", "arrival": {"type": "poisson", "rate": 1}},
             {"name": "bulk", "user": "etl", "model": "m1", "tier": "batch", "arrival": {"type": "poisson", "rate": 1}}]},
         "engine": {"type": "dynamic_batching", "max_batch_size": 8, "batch_timeout_s": 0.0,
                    "profile": str(flat_profile(tmp, step))}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge(d, extra), sort_keys=False))
    return path


async def until(check, what: str, timeout: float = BOUND_S):
    """Poll an async condition until it holds (bounded): a wait on state, not on a guessed delay."""
    end = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND_S * 2))


async def records(s, url) -> list[dict]:
    async with s.get(f"{url}/records") as r:
        return list(csv.DictReader(io.StringIO(await r.text())))


# ---------------------------------------------------------------- dialects
def _sse_data(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), "SSE stream must end with a blank line"
    out = []
    for block in raw.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(ln.startswith(("data: ", "event: ")) for ln in lines), block
        out += [ln[6:] for ln in lines if ln.startswith("data: ")]
    return out


def tokens_openai(raw: str, field: str) -> tuple[int, dict]:
    data = _sse_data(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    n = 0
    for c in chunks:
        if c["choices"]:
            piece = c["choices"][0]["delta"].get("content") if field == "delta" else c["choices"][0]["text"]
            n += bool(piece)
    fin = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(fin) == 1 and fin[0]["choices"][0]["finish_reason"] == "length"
    return n, chunks[-1]["usage"]


def tokens_ollama(raw: str, field: str) -> tuple[int, dict]:
    lines = [json.loads(x) for x in raw.strip().split("\n")]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    n = sum(1 for x in lines[:-1] if (x["message"]["content"] if field == "message" else x["response"]))
    return n, {"prompt_tokens": lines[-1]["prompt_eval_count"], "completion_tokens": lines[-1]["eval_count"]}


def tokens_llamacpp(raw: str) -> tuple[int, dict]:
    data = [json.loads(d) for d in _sse_data(raw)]
    assert all(not d["stop"] for d in data[:-1]) and data[-1]["stop"] is True
    n = sum(1 for d in data[:-1] if d["content"])
    last = data[-1]
    assert last["timings"]["predicted_n"] == last["tokens_predicted"]
    return n, {"prompt_tokens": last["tokens_evaluated"], "completion_tokens": last["tokens_predicted"]}


def tokens_responses(raw: str) -> tuple[int, dict]:
    blocks = [b for b in raw.split("\n\n") if b]
    events = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: "))) for b in blocks]
    names = [e for e, _ in events]
    # max_output_tokens caps the answer: OpenAI ends such a stream with response.incomplete
    assert names[0] == "response.created" and names[-1] == "response.incomplete"
    assert all(e == d["type"] for e, d in events)
    seqs = [d["sequence_number"] for _, d in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    n = sum(1 for e, d in events if e == "response.output_text.delta" and d["delta"])
    u = events[-1][1]["response"]["usage"]
    return n, {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"]}


PROMPT = "one two three four five six seven"  # 7 words = 7 prompt tokens

DIALECTS = {
    "openai-chat": ("/v1/chat/completions",
                    lambda n, st: {"model": "m1", "messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": PROMPT}],
                                   "max_tokens": n, "stream": st, "stream_options": {"include_usage": True} if st else None},
                    lambda raw: tokens_openai(raw, "delta"),
                    lambda o: (o["choices"][0]["message"]["content"], o["usage"]), 9),
    "openai-completions": ("/v1/completions",
                           lambda n, st: {"model": "m1", "prompt": PROMPT, "max_tokens": n, "stream": st,
                                          "stream_options": {"include_usage": True} if st else None},
                           lambda raw: tokens_openai(raw, "text"),
                           lambda o: (o["choices"][0]["text"], o["usage"]), 7),
    "ollama-chat": ("/api/chat",
                    lambda n, st: {"model": "m1", "messages": [{"role": "user", "content": PROMPT}], "stream": st,
                                   "options": {"num_predict": n}},
                    lambda raw: tokens_ollama(raw, "message"),
                    lambda o: (o["message"]["content"], {"prompt_tokens": o["prompt_eval_count"], "completion_tokens": o["eval_count"]}), 7),
    "ollama-generate": ("/api/generate",
                        lambda n, st: {"model": "m1", "prompt": PROMPT, "stream": st, "options": {"num_predict": n}},
                        lambda raw: tokens_ollama(raw, "response"),
                        lambda o: (o["response"], {"prompt_tokens": o["prompt_eval_count"], "completion_tokens": o["eval_count"]}), 7),
    "llamacpp": ("/completion",
                 lambda n, st: {"prompt": PROMPT, "n_predict": n, "stream": st},
                 tokens_llamacpp,
                 lambda o: (o["content"], {"prompt_tokens": o["tokens_evaluated"], "completion_tokens": o["tokens_predicted"]}), 7),
    "responses": ("/v1/responses",
                  lambda n, st: {"model": "m1", "input": PROMPT, "max_output_tokens": n, "stream": st},
                  tokens_responses,
                  lambda o: (o["output"][0]["content"][0]["text"],
                             {"prompt_tokens": o["usage"]["input_tokens"], "completion_tokens": o["usage"]["output_tokens"]}), 7),
}


@pytest.fixture(scope="module")
def fast_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twin_fast")
    with twin_server(scenario(tmp, 0.002, name="fast")) as url:
        yield url


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", list(DIALECTS))
def test_dialect_framing_and_token_count(fast_url, api, stream):
    path, body, parse_stream, parse_whole, prompt_tokens = DIALECTS[api]
    n = 6 + len(api) % 5  # a different length per dialect

    async def go():
        async with aiohttp.ClientSession() as s:
            b = {k: v for k, v in body(n, stream).items() if v is not None}
            async with s.post(fast_url + path, json=b, headers={"X-User": "bob"}) as r:
                assert r.status == 200, await r.text()
                rid = r.headers["X-Request-Id"]
                if stream:
                    ctype = "application/x-ndjson" if api.startswith("ollama") else "text/event-stream"
                    assert r.headers["Content-Type"].startswith(ctype)
                    got, usage = parse_stream(await r.text())
                else:
                    text, usage = parse_whole(await r.json())
                    got = len(text.split())
            async with s.get(f"{fast_url}/requests/{rid}") as r:
                job = await r.json()
            return got, usage, job
    got, usage, job = run(go())
    assert got == n
    assert usage["completion_tokens"] == n and usage["prompt_tokens"] == prompt_tokens
    assert job["status"] == "completed" and job["output_tokens"] == n
    assert job["user"] == "bob" and job["class"] == "api"  # X-User picked bob's class
    assert job["created_at"] <= job["started_at"] <= job["first_token_at"] <= job["completed_at"]


def test_queue_style_generate_then_poll(fast_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{fast_url}/generate", json={"model": "m1", "prompt": PROMPT, "max_new_tokens": 5},
                              headers={"X-Class": "bulk", "X-Prompt-Tokens": "300", "X-Requested-Max-Tokens": "40"}) as r:
                assert r.status == 202
                first = await r.json()
            assert first["status"] in ("queued", "running")

            async def done():
                async with s.get(f"{fast_url}/requests/{first['request_id']}") as r:
                    j = await r.json()
                    return j if j["status"] == "completed" else None
            final = await until(done, "queued request to complete")
            async with s.get(f"{fast_url}/requests/nope") as r:
                missing = r.status
            return first, final, missing
    first, final, missing = run(go())
    assert final["output_tokens"] == 5 and len(final["output"].split()) == 5
    assert final["prompt_tokens"] == 300  # the X-Prompt-Tokens hint wins over the word count
    assert final["requested_max_tokens"] == 40 and final["max_tokens"] == 40  # hint: the scenario's max_tokens
    assert final["class"] == "bulk" and final["user"] == "etl"
    assert missing == 404


def test_identity_headers_and_metadata_pick_the_class(fast_url):
    async def go():
        out = []
        async with aiohttp.ClientSession() as s:
            for headers, extra in (({"X-Class": "chat", "X-User": "bob"}, {}),  # bob in alice's class: derived
                                   ({"X-Project": "ops"}, {}),
                                   ({}, {"metadata": {"user": "etl", "priority": 7}}),
                                   ({"X-User": "bob", "X-Priority": "4"}, {"user": "alice"}),
                                   ({}, {"user": "someone-else"})):  # OpenAI's free-form user: ignored
                async with s.post(f"{fast_url}/v1/completions", headers=headers,
                                  json={"model": "m1", "prompt": "p", "max_tokens": 1, **extra}) as r:
                    assert r.status == 200, await r.text()
                    rid = r.headers["X-Request-Id"]
                async with s.get(f"{fast_url}/requests/{rid}") as r:
                    j = await r.json()
                out.append((j["class"], j["user"], j["project"], j["priority"]))
        return out
    assert run(go()) == [("chat", "bob", "lab", 1), ("bulk", "etl", "ops", 2), ("bulk", "etl", "ops", 7),
                         ("api", "bob", "lab", 4), ("chat", "alice", "lab", 0)]


def test_models_health_and_unknown_routes(fast_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{fast_url}/v1/models") as r:
                models = await r.json()
            async with s.get(f"{fast_url}/health") as r:
                health = (r.status, await r.json())
            async with s.get(f"{fast_url}/v1/admin/models") as r:
                admin = (r.status, await r.json())
            async with s.get(f"{fast_url}/no/such/path") as r:
                nf = (r.status, await r.json())
            return models, health, admin, nf
    models, health, admin, nf = run(go())
    assert [m["id"] for m in models["data"]] == ["m1", "off"]
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert admin[0] == 404 and "model-pool" in admin[1]["error"]["message"]  # not a model-pool scenario
    assert nf[0] == 404 and "error" in nf[1]


def test_idle_server_sleeps(fast_url):
    """With nothing to do, the clock sleeps until the world's next event (its 1 s monitor) instead
    of spinning: simulated events processed over an idle interval stay in single digits."""
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{fast_url}/health") as r:
                a = await r.json()
            await asyncio.sleep(0.3)  # the idle interval under test, not a wait for a condition
            async with s.get(f"{fast_url}/health") as r:
                b = await r.json()
            return a, b
    a, b = run(go())
    assert b["clock_steps"] - a["clock_steps"] <= 2


# ---------------------------------------------------------------- timing
def test_client_timing_matches_cost_model(tmp_path):
    """Every step takes 20 ms: TTFT = one prefill step, each later token one decode step."""
    step, n = 0.020, 12

    async def go(url):
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            stamps = []
            async with s.post(f"{url}/v1/completions", json={"model": "m1", "prompt": PROMPT, "max_tokens": n,
                                                              "stream": True}) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        if json.loads(line[6:])["choices"][0]["text"]:
                            stamps.append(time.perf_counter())
            return t0, stamps, await records(s, url)
    with twin_server(scenario(tmp_path, step)) as url:
        t0, stamps, rows = run(go(url))
    assert len(stamps) == n
    ttft, e2e = stamps[0] - t0, stamps[-1] - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # the world's own clock: exact
    row = rows[0]
    assert math.isclose(float(row["ttft_s"]), step, abs_tol=1e-6)
    assert math.isclose(float(row["tpot_s"]), step, abs_tol=1e-6)
    assert math.isclose(float(row["e2e_s"]), n * step, abs_tol=1e-6)
    # what the client sees over real HTTP: loose bounds, robust to a busy machine
    assert step * 0.5 <= ttft <= step + 0.1, ttft
    assert step * 0.6 <= statistics.median(gaps) <= step * 1.75, gaps
    assert n * step * 0.8 <= e2e <= n * step + 0.3, e2e


def test_world_timeout_is_silence_and_client_timeout_is_abort(tmp_path):
    """A's class times out at 0.6 s: the twin stops its tokens then and stays silent (its client is
    the one meant to give up) before ending the stream with an error. B's client gives up while B
    waits behind A: B leaves the queue as a timeout."""
    from simulator.twin.app import CLIENT_GRACE_S
    sc = scenario(tmp_path, 0.02, workload={"classes": [
        {"name": "chat", "user": "alice", "model": "m1", "tier": "high", "timeout_s": 0.6, "arrival": {"type": "poisson", "rate": 1}},
        {"name": "api", "user": "bob", "model": "m1", "arrival": {"type": "poisson", "rate": 1}}]})

    async def go(url):
        async with aiohttp.ClientSession() as s:
            stamps = []
            async with s.post(f"{url}/v1/chat/completions", headers={"X-Class": "chat"},
                              json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
                                    "stream": True}) as a:
                await a.content.readline()
                try:
                    async with s.post(f"{url}/v1/chat/completions", headers={"X-Class": "api"},
                                      timeout=aiohttp.ClientTimeout(total=0.15),
                                      json={"model": "m1", "messages": [{"role": "user", "content": "x"}]}) as b:
                        b_status = b.status
                except asyncio.TimeoutError:
                    b_status = "client timeout"
                async for line in a.content:
                    if line.startswith(b"data: {"):
                        stamps.append((time.perf_counter(), json.loads(line[6:])))
            return b_status, stamps, await records(s, url)
    with twin_server(sc) as url:
        b_status, stamps, rows = run(go(url))
    assert b_status == "client timeout"
    tokens = [t for t, o in stamps if "choices" in o and o["choices"][0]["delta"].get("content")]
    end_t, end = stamps[-1]
    assert end["error"]["type"] == "timeout" and len(tokens) == len(stamps) - 1
    assert end_t - tokens[-1] >= 0.8 * CLIENT_GRACE_S
    by = {r["class_name"]: r for r in rows}
    assert by["chat"]["outcome"] == "timeout" and by["chat"]["error"] == "" and by["chat"]["http_status"] == "504"
    assert int(by["chat"]["output_tokens"]) == len(tokens) and 0.6 / 0.02 - 2 <= len(tokens) <= 0.6 / 0.02 + 1
    assert by["api"]["outcome"] == "timeout" and by["api"]["error"] == "client disconnected"
    assert by["api"]["queue_wait_s"] == ""  # left from the queue, never started


def test_continuous_engine_prefix_cache_from_prompt_text(tmp_path):
    """Prefix-block ids come from the prompt's words, so a repeated prompt hits the KV prefix cache
    of the continuous-batching engine; a hang-up frees its sequence."""
    sc = scenario(tmp_path, 0.005, engine={"type": "continuous", "prefix_caching": True, "block_size": 16})
    prompt = " ".join(f"w{j % 7}" for j in range(100))  # 100 tokens: 6 whole blocks of 16

    async def go(url):
        async with aiohttp.ClientSession() as s:
            for p in (prompt, prompt, "other " + prompt):
                async with s.post(f"{url}/v1/completions", json={"model": "m1", "prompt": p, "max_tokens": 5}) as r:
                    assert (await r.json())["usage"]["completion_tokens"] == 5
            r = await s.post(f"{url}/v1/completions", json={"model": "m1", "prompt": "x", "max_tokens": 400, "stream": True})
            await r.content.readline()
            r.close()

            async def aborted():
                rows = await records(s, url)
                return rows if len(rows) == 4 else None
            return await until(aborted, "the hang-up to be recorded")
    with twin_server(sc) as url:
        rows = run(go(url))
    assert [int(r["prefix_hit_tokens"]) for r in rows[:3]] == [0, 96, 0]
    assert rows[3]["outcome"] == "timeout" and rows[3]["error"] == "client disconnected"


# ---------------------------------------------------------------- gateway
def test_rate_limit_and_quota_give_429(tmp_path):
    sc = scenario(tmp_path, tenants={"users": [{"id": "alice", "project": "lab", "tier": "high"},
                                               {"id": "bob", "project": "lab", "tier": "standard",
                                                "rate_limit": {"rate": 0.2, "burst": 2}},
                                               {"id": "etl", "project": "ops", "tier": "batch"}],
                                     "projects": [{"id": "lab"}, {"id": "ops", "token_quota": 40, "quota_window_s": 600}]})

    async def go(url):
        async with aiohttp.ClientSession() as s:
            out = []
            for user, mx in (("bob", 2), ("bob", 2), ("bob", 2), ("etl", 60)):
                async with s.post(f"{url}/v1/chat/completions", headers={"X-User": user},
                                  json={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": mx}) as r:
                    out.append((r.status, dict(r.headers), await r.json()))
            async with s.get(f"{url}/metrics") as r:
                m = await r.json()
            return out, m, await records(s, url)
    with twin_server(sc) as url:
        out, m, rows = run(go(url))
    assert [o[0] for o in out] == [200, 200, 429, 429]
    _, h, body = out[2]
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(h["Retry-After"]) <= 6  # one token of a 0.2/s bucket is at most 5 s away
    assert 0 < int(h["retry-after-ms"]) <= 5000
    _, h, body = out[3]
    assert body["error"]["type"] == "quota_exceeded" and int(h["Retry-After"]) > 0
    assert {r["outcome"] for r in rows} == {"ok", "rejected_rate_limited", "rejected_quota"}
    assert {(r["outcome"], r["http_status"]) for r in rows if r["outcome"] != "ok"} == {
        ("rejected_rate_limited", "429"), ("rejected_quota", "429")}
    rej = {(x["reason"], x["priority"]): x["count"] for x in m["rejections"]}
    assert rej == {("rate_limited", 1): 1, ("quota", 2): 1}


def test_queue_full_degradation_and_disconnect(tmp_path):
    """One replica busy with A; B waits; at half a queue the 'busy' level sheds batch traffic and caps
    max_tokens; a full queue answers 503; A's client hanging up frees the engine for B and D."""
    sc = scenario(tmp_path, 0.02, gateway={"max_queue": 2, "degradation": [
        {"name": "normal", "above": 0.0}, {"name": "busy", "above": 0.5, "max_tokens_cap": 4, "reject_tiers": ["batch"]}]})
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}

    async def go(url):
        async with aiohttp.ClientSession() as s:
            async def qs(cond):
                async def check():
                    async with s.get(f"{url}/queue/status") as r:
                        j = await r.json()
                    return j if cond(j) else None
                return await until(check, "queue state")

            a = await s.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 1000, "stream": True},
                             headers={"X-User": "alice"})
            assert a.status == 200
            await a.content.readline()  # the role chunk: A is in the world
            b = asyncio.create_task(s.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 5},
                                           headers={"X-User": "alice"}))
            busy = await qs(lambda j: j["queued"] == 1)
            async with s.post(f"{url}/v1/chat/completions", json=chat, headers={"X-User": "etl"}) as r:
                shed = (r.status, await r.json())
            d = asyncio.create_task(s.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 50},
                                           headers={"X-User": "bob"}))
            await qs(lambda j: j["queued"] == 2)
            async with s.post(f"{url}/v1/chat/completions", json=chat, headers={"X-User": "bob"}) as r:
                full = (r.status, dict(r.headers), await r.json())
            a.close()  # A's client hangs up mid-stream
            rb, rd = await b, await d
            jb, jd = await rb.json(), await rd.json()
            return busy, shed, full, jb, jd, await records(s, url)
    with twin_server(sc) as url:
        busy, shed, full, jb, jd, rows = run(go(url))
    assert busy["running"] == 1 and busy["degradation_level"] == "busy"
    assert busy["active_actions"] == ["max_tokens_cap=4", "reject_tier=batch"]
    assert shed[0] == 503 and shed[1]["error"]["type"] == "degraded"
    assert full[0] == 503 and full[2]["error"]["type"] == "queue_full" and "Retry-After" in full[1]
    assert jb["usage"]["completion_tokens"] == 5
    assert jd["usage"]["completion_tokens"] == 4  # capped by the 'busy' level
    by = {r["request_id"]: r for r in rows}
    a_row = by["0"]
    assert a_row["outcome"] == "timeout" and a_row["error"] == "client disconnected" and a_row["http_status"] == "499"
    assert 0 < int(a_row["output_tokens"]) < 1000
    assert sorted(r["outcome"] for r in rows) == ["ok", "ok", "rejected_degraded", "rejected_queue_full", "timeout"]


# ---------------------------------------------------------------- bad input
def test_bad_bodies_get_4xx_with_a_message(fast_url):
    chat = f"{fast_url}/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (chat, b"{not json", {}, 400, "invalid JSON"),
        (chat, b"", {}, 400, "empty"),
        (chat, b"[1, 2]", {}, 400, "JSON object"),
        (chat, json.dumps({"model": "m1"}).encode(), {}, 400, "messages"),
        (chat, json.dumps({"model": "m1", "messages": "hi"}).encode(), {}, 400, "messages"),
        (chat, json.dumps({"model": "m1", "messages": msg, "max_tokens": 0}).encode(), {}, 400, "max_tokens"),
        (chat, json.dumps({"model": "m1", "messages": msg, "max_tokens": "5"}).encode(), {}, 400, "max_tokens"),
        (chat, json.dumps({"model": "m1", "messages": msg, "stream": "yes"}).encode(), {}, 400, "stream"),
        (chat, json.dumps({"model": "nope", "messages": msg}).encode(), {}, 404, "nope"),
        (chat, json.dumps({"model": "off", "messages": msg}).encode(), {}, 404, "disabled"),
        (chat, json.dumps({"model": "m1", "messages": msg}).encode(), {"X-User": "mallory"}, 400, "mallory"),
        (chat, json.dumps({"model": "m1", "messages": msg}).encode(), {"X-Priority": "-1"}, 400, "X-Priority"),
        (chat, json.dumps({"model": "m1", "messages": msg}).encode(), {"X-Prompt-Tokens": "many"}, 400, "X-Prompt-Tokens"),
        (f"{fast_url}/completion", json.dumps({"prompt": 5}).encode(), {}, 400, "prompt"),
        (f"{fast_url}/v1/responses", json.dumps({"model": "m1"}).encode(), {}, 400, "input"),
        (chat, b'{"model": "m1", "messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}', {}, 413, ""),
    ]

    async def go():
        out = []
        async with aiohttp.ClientSession() as s:
            for url, data, headers, _, _ in cases:
                async with s.post(url, data=data, headers={"Content-Type": "application/json", **headers}) as r:
                    out.append((r.status, await r.json()))
            async with s.post(f"{fast_url}/api/chat", json={"model": "m1"}) as r:
                out.append((r.status, await r.json()))
            async with s.get(f"{fast_url}/usage/recent?limit=0") as r:
                out.append((r.status, await r.json()))
        return out
    out = run(go())
    for (_, _, _, status, needle), (got, body) in zip(cases, out):
        assert got == status, (needle, body)
        assert needle in body["error"]["message"], body
    assert out[-2][0] == 400 and isinstance(out[-2][1]["error"], str)  # Ollama's error shape
    assert out[-1][0] == 400


# ---------------------------------------------------------------- metrics
PROM_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                       r'(NaN|[+-]?Inf|[+-]?[0-9.]+(e[+-]?[0-9]+)?)$')


def parse_prometheus(text: str) -> dict:
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        assert PROM_LINE.match(line), line
        key, val = line.rsplit(" ", 1)
        samples[key] = float(val)
    return {"samples": samples, "types": types}


def test_metrics_prometheus_text_and_json(fast_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"{fast_url}/v1/completions", json={"model": "m1", "prompt": "a b", "max_tokens": 3}) as r:
                    assert r.status == 200
            async with s.get(f"{fast_url}/metrics", headers={"Accept": "text/plain"}) as r:
                prom = (r.headers["Content-Type"], await r.text())
            async with s.get(f"{fast_url}/metrics?format=prometheus") as r:
                prom2 = await r.text()
            async with s.get(f"{fast_url}/metrics") as r:
                js = await r.json()
            return prom, prom2, js
    (ctype, text), text2, js = run(go())
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    p = parse_prometheus(text)
    parse_prometheus(text2)
    assert p["types"]["servesim_requests_total"] == "counter" and p["types"]["servesim_ttft_seconds"] == "histogram"
    s = p["samples"]
    total = sum(v for k, v in s.items() if k.startswith("servesim_requests_total{"))
    ok = sum(v for k, v in s.items() if k.startswith("servesim_requests_total{") and 'outcome="ok"' in k)
    assert total >= 3 and ok >= 3
    for h in ("ttft", "e2e", "queue_wait", "tpot"):
        buckets = [v for k, v in s.items() if k.startswith(f"servesim_{h}_seconds_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == s[f"servesim_{h}_seconds_count"]
    assert s["servesim_ttft_seconds_count"] == ok
    assert "servesim_queue_depth" in s and "servesim_degradation_level" in s
    assert js["requests"]["by_outcome"]["ok"] == ok and js["gauges"]["queue_depth"] == 0


# ---------------------------------------------------------------- usage and records
def test_usage_persists_across_restart_and_report_on_shutdown(tmp_path):
    sc = scenario(tmp_path)
    db = tmp_path / "usage.db"
    out = tmp_path / "report"
    chat = {"model": "m1", "messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 3}

    async def send(url, user, k):
        async with aiohttp.ClientSession() as s:
            for _ in range(k):
                async with s.post(f"{url}/v1/chat/completions", json=chat, headers={"X-User": user}) as r:
                    assert r.status == 200

    async def read(url):
        async with aiohttp.ClientSession() as s:
            res = {}
            for key, path in (("user", "/usage/user/alice"), ("project", "/usage/project/lab"),
                              ("summary", "/usage/summary"), ("recent", "/usage/recent?limit=2"),
                              ("nobody", "/usage/user/etl")):
                async with s.get(url + path) as r:
                    res[key] = (r.status, await r.json())
            return res

    with twin_server(sc, usage_db=db, out=out) as url:
        run(send(url, "alice", 2))
        run(send(url, "bob", 1))
    rows = list(csv.DictReader(open(out / "requests.csv")))
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 3 and {r["outcome"] for r in rows} == {"ok"}
    assert summary["source"] == "twin" and summary["requests"]["ok"] == 3 and (out / "report.md").exists()
    # the warm-up (none here) counts from the first request: the server's own start is not the load's
    assert summary["window"]["warmup_from_s"] == round(min(float(r["arrival_s"]) for r in rows), 6) > 0

    with twin_server(sc, usage_db=db) as url:
        run(send(url, "alice", 1))
        res = run(read(url))
    st, user = res["user"]
    assert st == 200 and user["totals"]["requests"] == 3 and user["totals"]["completed"] == 3
    assert user["totals"]["output_tokens"] == 9 and user["totals"]["prompt_tokens"] == 12
    assert math.isclose(user["totals"]["cost"], 12 * 1e-3 + 9 * 2e-3)
    st, proj = res["project"]
    assert st == 200 and proj["totals"]["requests"] == 4 and set(proj["by_user"]) == {"alice", "bob"}
    assert res["summary"][1]["totals"]["requests"] == 4 and res["summary"][1]["statuses"] == {"completed": 4}
    recent = res["recent"][1]["requests"]
    assert len(recent) == 2 and recent[0]["created_at"] >= recent[1]["created_at"] and recent[0]["user"] == "alice"
    assert len({r["run"] for r in recent}) == 2  # one row from each server run
    assert res["nobody"][0] == 404


def test_shutdown_ends_open_streams_and_records_them_once(tmp_path):
    out = tmp_path / "rep"
    cm = twin_server(scenario(tmp_path), out=out)
    url = cm.__enter__()

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", json={"model": "m1", "prompt": "p", "max_tokens": 1000,
                                                              "stream": True}) as r:
                await r.content.readline()
                await r.content.readline()  # a first token: the request runs
                stopper = asyncio.get_running_loop().run_in_executor(None, cm.__exit__, None, None, None)
                rest = await r.content.read()
            await stopper
            return rest
    rest = run(go())
    last = [ln for ln in rest.decode().split("\n") if ln.startswith("data: ")][-1]
    assert "server shut down" in json.loads(last[6:])["error"]["message"]
    rows = list(csv.DictReader(open(out / "requests.csv")))
    assert len(rows) == 1 and rows[0]["outcome"] == "timeout" and rows[0]["error"] == "server shut down"
    assert 0 < int(rows[0]["output_tokens"]) < 1000


# ---------------------------------------------------------------- the CLI
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_process_and_sigint_report(tmp_path):
    out = tmp_path / "rep"

    async def go(url):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/health") as r:
                assert (await r.json())["status"] == "ok"
            async with s.post(f"{url}/api/generate", json={"model": "m1", "prompt": "x y", "stream": False,
                                                            "options": {"num_predict": 4}}) as r:
                return (await r.json())["eval_count"]
    with twin_server(scenario(tmp_path), out=out, process=True, engine__max_batch_size=4) as url:
        assert run(go(url)) == 4
    rows = list(csv.DictReader(open(out / "requests.csv")))
    assert [r["outcome"] for r in rows] == ["ok"] and rows[0]["output_tokens"] == "4"
    assert yaml.safe_load((out / "scenario.yaml").read_text())["engine"]["max_batch_size"] == 4


def test_cli_bad_input_exits_2(tmp_path):
    from simulator.cli import app
    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "file not found" in res.output
    sc = scenario(tmp_path)
    res = runner.invoke(app, ["serve", str(sc), "--port", "70000"])
    assert res.exit_code == 2 and "--port" in res.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = runner.invoke(app, ["serve", str(sc), "--port", str(port), "--usage-db", str(tmp_path / "u.db")])
    assert res.exit_code == 2 and "cannot listen" in res.output


# ---------------------------------------------------------------- model pool
def test_model_pool_admin_and_cold_load(tmp_path):
    """One GPU, two llama.cpp models: a request for the cold one evicts the idle one and waits for its
    load; a client that gives up while its request is held by the pool is a timeout; admin load/unload."""
    load_s = 1.0  # b's load: long enough to look at it while it lasts, even on a busy machine
    sc = scenario(tmp_path, 0.005, name="pool",
                  tenants={"models": [{"name": "a"}, {"name": "b"}]},
                  workload={"classes": [{"name": "ca", "user": "alice", "model": "a", "arrival": {"type": "poisson", "rate": 1}},
                                        {"name": "cb", "user": "bob", "model": "b", "arrival": {"type": "poisson", "rate": 1}}]},
                  engine={"type": "llamacpp", "n_parallel": 2, "n_ctx": 4096},
                  cluster={"gpus": 1, "model_pool": [{"model": "a", "preloaded": True, "load_time_s": 0.2},
                                                     {"model": "b", "preloaded": False, "load_time_s": load_s}]})
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    async def go(url):
        async with aiohttp.ClientSession() as s:
            async def admin(path="", method="GET", **kw):
                async with s.request(method, f"{url}/v1/admin/models{path}", **kw) as r:
                    return r.status, await r.json()

            async def state(model, want):
                async def check():
                    st, j = await admin()
                    return j if j["models"][model]["state"] == want else None
                return await until(check, f"{model} {want}")
            res = {"start": await admin()}
            x = await s.post(f"{url}/v1/chat/completions", json={**chat, "model": "b", "stream": True, "max_tokens": 3})
            assert x.status == 200
            res["loading"] = await admin()
            x.close()  # gives up while the pool holds it
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/chat/completions", json={**chat, "model": "b", "max_tokens": 3}) as r:
                res["y"] = (r.status, await r.json(), time.perf_counter() - t0)
            res["busy"] = None
            z = await s.post(f"{url}/v1/chat/completions", json={**chat, "model": "b", "stream": True, "max_tokens": 500})
            await z.content.readline()
            await z.content.readline()  # a first token: z runs on b
            res["busy"] = await admin("/b/unload", "POST")
            z.close()
            await until(lambda: _pool_idle(admin, "b"), "b idle")
            res["unload"] = await admin("/b/unload", "POST")
            res["load"] = await admin(method="POST", json={"model": "a", "action": "load"})
            res["loaded"] = await state("a", "loaded")
            res["bad_action"] = await admin(method="POST", json={"model": "a", "action": "explode"})
            res["bad_model"] = await admin("/zzz/load", "POST")
            res["rows"] = await records(s, url)
            return res
    with twin_server(sc) as url:
        res = run(go(url))
    st, j = res["start"]
    assert st == 200 and j["models"]["a"]["state"] == "loaded" and j["models"]["b"]["state"] == "unloaded"
    assert res["loading"][1]["models"]["b"]["state"] == "loading" and res["loading"][1]["models"]["b"]["queued"] == 1
    st, body, wall = res["y"]
    assert st == 200 and body["usage"]["completion_tokens"] == 3
    assert res["busy"][0] == 409 and "busy" in res["busy"][1]["error"]["message"]
    assert res["unload"][0] == 200 and res["unload"][1]["result"]["state"] == "unloaded"
    assert res["load"][0] == 200 and res["load"][1]["result"]["state"] == "loading"
    assert res["bad_action"][0] == 400 and res["bad_model"][0] == 404
    rows = {r["request_id"]: r for r in res["rows"]}
    assert rows["0"]["outcome"] == "timeout" and rows["0"]["error"] == "client disconnected"
    assert rows["0"]["queue_wait_s"] == ""  # never reached an engine
    assert rows["1"]["outcome"] == "ok" and float(rows["1"]["queue_wait_s"]) > 0.5 * load_s  # waited for the load
    assert rows["2"]["outcome"] == "timeout" and 0 < int(rows["2"]["output_tokens"]) < 500


async def _pool_idle(admin, model):
    st, j = await admin()
    m = j["models"][model]
    return m["inflight"] == 0 and m["queued"] == 0
