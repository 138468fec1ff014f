"""The twin's /metrics as a Prometheus scraper reads it: vLLM's metric names, labels and bucket
layouts (parsed with prometheus_client's own text parser), with counts equal to what the clients
(the openai SDK) received; and the default tenant of requests that carry no identity."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_twin import scenario
from twin_proc import serve, until

BOUND_S = 20.0
MSGS = [{"role": "user", "content": "one two three four five"}]  # 5 prompt tokens
# vLLM's bucket upper bounds (vllm/v1/metrics/loggers.py), written out independently of the twin's copy
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0, 7680.0]


def scrape(url) -> dict:
    """{sample name: [(labels, value)]} and {family name: type} from the Prometheus text."""
    r = httpx.get(url + "/metrics", headers={"Accept": "text/plain;version=0.0.4"}, timeout=BOUND_S)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    samples, types = {}, {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return {"samples": samples, "types": types}


def one(m, name, **labels):
    got = [v for lab, v in m["samples"].get(name, []) if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(got) == 1, (name, labels, m["samples"].get(name))
    return got[0]


def total(m, name, **labels):
    return sum(v for lab, v in m["samples"].get(name, []) if all(lab.get(k) == v2 for k, v2 in labels.items()))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twin_metrics")
    sc = scenario(tmp, 0.002, name="metrics", engine={"type": "continuous", "max_num_seqs": 1, "num_blocks": 512,
                                                      "block_size": 16})
    with serve(sc, tmp) as s:
        yield s


def test_vllm_metrics_count_what_clients_received(srv):
    url = srv.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=BOUND_S)
    got = []  # (prompt, completion, finish_reason) as the clients saw them
    with httpx.Client(timeout=BOUND_S) as c:
        # a long stream holds the only sequence slot: the next request waits
        long = c.send(c.build_request("POST", url + "/v1/chat/completions",
                                      json={"model": "m1", "messages": MSGS, "max_tokens": 1000, "stream": True}),
                      stream=True)
        lines = long.iter_lines()
        next(lines), next(lines)
        busy = scrape(url)
        waiter: list = []
        th = threading.Thread(target=lambda: waiter.append(
            client.chat.completions.create(model="m1", messages=MSGS, max_tokens=2)))
        th.start()
        waiting = until(lambda: (lambda m: m if one(m, "vllm:num_requests_waiting", engine="0") == 1 else None)(
            scrape(url)), "a waiting request")
        long.close()  # the client hangs up: an abort
        th.join(BOUND_S)
    w = waiter[0]
    got.append((w.usage.prompt_tokens, w.usage.completion_tokens, w.choices[0].finish_reason))
    for _ in range(3):
        r = client.chat.completions.create(model="m1", messages=MSGS, max_tokens=4)
        got.append((r.usage.prompt_tokens, r.usage.completion_tokens, r.choices[0].finish_reason))
    for _ in range(2):
        r = client.chat.completions.create(model="m1", messages=MSGS, max_tokens=3,
                                           extra_headers={"X-Requested-Max-Tokens": "30"})
        got.append((r.usage.prompt_tokens, r.usage.completion_tokens, r.choices[0].finish_reason))
    for ch in client.completions.create(model="m1", prompt="a b c", stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            got.append((ch.usage.prompt_tokens, ch.usage.completion_tokens, "stop"))
    rows = until(lambda: (lambda rs: rs if len(rs) == 8 else None)(
        httpx.get(url + "/records").text.strip().split("\n")[1:]), "eight records")
    cancelled = [r.split(",") for r in rows if ",timeout,client disconnected," in r]
    assert len(cancelled) == 1
    from simulator.records import COLUMN_NAMES
    crow = dict(zip(COLUMN_NAMES, cancelled[0]))
    m = scrape(url)
    client.close()

    # the scheduler gauges saw the long stream run and the next request wait
    assert one(busy, "vllm:num_requests_running", model_name="m1", engine="0") == 1
    assert one(waiting, "vllm:num_requests_running", engine="0") == 1
    assert one(m, "vllm:num_requests_running", engine="0") == 0 and one(m, "vllm:num_requests_waiting", engine="0") == 0
    assert 0 < one(busy, "vllm:kv_cache_usage_perc", engine="0") <= 1 and one(m, "vllm:kv_cache_usage_perc") == 0
    # what finished, and why, as the clients were told
    reasons = [g[2] for g in got]
    assert reasons.count("length") == 4 and reasons.count("stop") == 3
    assert one(m, "vllm:request_success_total", model_name="m1", finished_reason="length") == 4
    assert one(m, "vllm:request_success_total", model_name="m1", finished_reason="stop") == 3
    assert one(m, "vllm:request_success_total", model_name="m1", finished_reason="abort") == 1
    # tokens: what the clients' usage said, plus what the engine made for the request that was hung up on
    assert one(m, "vllm:generation_tokens_total", model_name="m1") == sum(g[1] for g in got) + int(crow["output_tokens"])
    assert one(m, "vllm:prompt_tokens_total", model_name="m1") == sum(g[0] for g in got) + int(crow["prompt_tokens"])
    ok = len(got)
    assert one(m, "vllm:time_to_first_token_seconds_count") == ok + 1  # the aborted one had its first token
    assert one(m, "vllm:e2e_request_latency_seconds_count") == ok
    assert one(m, "vllm:request_queue_time_seconds_count") == ok
    assert one(m, "vllm:time_per_output_token_seconds_count") == sum(1 for g in got if g[1] > 1)
    assert one(m, "vllm:inter_token_latency_seconds_count") == sum(g[1] - 1 for g in got)
    assert one(m, "vllm:request_generation_tokens_sum") == sum(g[1] for g in got)
    # vLLM's types and bucket layouts
    for fam, kind in (("vllm:num_requests_running", "gauge"), ("vllm:request_success", "counter"),
                      ("vllm:generation_tokens", "counter"), ("vllm:time_to_first_token_seconds", "histogram"),
                      ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:cache_config_info", "gauge")):
        assert m["types"][fam] == kind, fam
    for name, bounds in (("vllm:time_to_first_token_seconds", VLLM_TTFT), ("vllm:time_per_output_token_seconds", VLLM_TPOT),
                         ("vllm:inter_token_latency_seconds", VLLM_TPOT), ("vllm:e2e_request_latency_seconds", VLLM_LATENCY),
                         ("vllm:request_queue_time_seconds", VLLM_LATENCY)):
        les = [float(lab["le"]) for lab, _ in m["samples"][name + "_bucket"]]
        counts = [v for _, v in m["samples"][name + "_bucket"]]
        assert les == bounds + [float("inf")], name
        assert counts == sorted(counts) and counts[-1] == one(m, name + "_count"), name
    # the cache layout a client (the stress tester) reads
    (info, v), = m["samples"]["vllm:cache_config_info"]
    assert v == 1 and info["block_size"] == "16" and info["num_gpu_blocks"] == "512" and info["engine"] == "0"
    # the project's own metrics are still there, and the JSON view agrees
    js = httpx.get(url + "/metrics").json()
    assert js["requests"]["by_outcome"] == {"ok": ok, "timeout": 1}
    assert total(m, "servesim_requests_total") == ok + 1 and total(m, "servesim_requests_total", outcome="ok") == ok


def test_models_report_the_context_length(srv):
    m = httpx.get(srv.url + "/v1/models/m1").json()
    assert m["max_model_len"] == 512 * 16


# ---------------------------------------------------------------- the default tenant
def test_default_user_flag_names_the_tenant_of_anonymous_requests(tmp_path):
    sc = scenario(tmp_path)
    with serve(sc, tmp_path, "--default-user", "bob") as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m1", "messages": MSGS, "max_tokens": 1})
        job = httpx.get(f"{s.url}/requests/{r.headers['X-Request-Id']}").json()
        ident = httpx.post(s.url + "/v1/chat/completions", json={"model": "m1", "messages": MSGS, "max_tokens": 1},
                           headers={"X-User": "etl"})
        job2 = httpx.get(f"{s.url}/requests/{ident.headers['X-Request-Id']}").json()
        health = httpx.get(s.url + "/health").json()
        banner = s.output()
    assert (job["user"], job["class"], job["project"]) == ("bob", "api", "lab")
    assert (job2["user"], job2["class"]) == ("etl", "bulk")  # headers still win
    assert health["default_user"] == "bob" and "requests without identity headers are user 'bob'" in banner
    with serve(sc, tmp_path) as s:
        assert httpx.get(s.url + "/health").json()["default_user"] == "alice"  # the scenario's first user, announced
        assert "are user 'alice'" in s.output()
    bad = subprocess.run([sys.executable, "-c", "from simulator.cli import app; app()", "serve", str(sc),
                          "--port", "0", "--usage-db", str(tmp_path / "x.db"), "--default-user", "mallory"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--default-user" in bad.stderr and "mallory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_stress_tester_recognises_the_twin(srv):
    """`stress run` asks a server what it is; the twin also answers vLLM's and Ollama's questions
    now, and must still be recognised as the twin (its gauges come from /queue/status)."""
    from stress_tester.facts import probe
    r = probe(srv.url, "m1")
    assert r["kind"] == "twin" and r["raw"]["health"]["scenario"] == "metrics"
    assert r["facts"]["max_model_len"] == 512 * 16
