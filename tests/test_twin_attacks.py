"""The twin server (`sim serve`, a subprocess) attacked over real HTTP and raw sockets: integers
beyond SQLite's range, requests that used to fail with a 500 and keep their queue slot, deeply
nested JSON, idle / half-sent / slow-body connections, clients that hang up (before and after the
world finished their request), a SIGKILL with requests in flight; and the usage writer's recovery."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import resource
import socket
import sqlite3
import time

import httpx
import pytest

from simulator.twin import usage as usage_mod
from simulator.twin.usage import KILLED, UsageStore, UsageUnavailable
from test_twin import scenario
from twin_proc import serve, until

BOUND_S = 20.0
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}


def records(url) -> list[dict]:
    return list(csv.DictReader(io.StringIO(httpx.get(url + "/records").text)))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """priority_aging on the continuous engine: the path where a 10**400 priority once raised after
    the gateway had admitted the request (a 500 that kept its queue slot)."""
    tmp = tmp_path_factory.mktemp("twin_attacks")
    sc = scenario(tmp, 0.002, name="attacks", gateway={"max_queue": 5}, scheduler={"policy": "priority_aging"},
                  engine={"type": "continuous", "max_num_seqs": 4, "num_blocks": 4096})
    with serve(sc, tmp) as s:
        yield s


BIG = [2**63, 10**400, 2**31]
INT_CASES = (
    [("/v1/chat/completions", {**CHAT, "max_tokens": v}, {}, "max_tokens") for v in BIG]
    + [("/v1/chat/completions", {**CHAT, "max_tokens": v}, {}, "max_tokens") for v in (-1, 0, 1.5, "7", True)]
    + [("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**63}, {}, "max_completion_tokens"),
       ("/v1/completions", {"model": "m1", "prompt": "a", "max_tokens": 2**64}, {}, "max_tokens"),
       ("/v1/responses", {"model": "m1", "input": "a", "max_output_tokens": 2**63}, {}, "max_output_tokens"),
       ("/api/chat", {"model": "m1", "messages": CHAT["messages"], "options": {"num_predict": 2**63}}, {},
        "options.num_predict"),
       ("/completion", {"prompt": "a", "n_predict": 10**400}, {}, "n_predict"),
       ("/generate", {"prompt": "a", "max_new_tokens": 2**63}, {}, "max_new_tokens")]
    + [("/v1/chat/completions", CHAT, {"X-Priority": str(v)}, "X-Priority") for v in BIG + [-1]]
    + [("/v1/chat/completions", CHAT, {"X-Priority": v}, "X-Priority") for v in ("1.5", "abc", "1e999", "0x10")]
    + [("/v1/chat/completions", {**CHAT, "priority": 10**400}, {}, "priority"),
       ("/v1/chat/completions", {**CHAT, "metadata": {"priority": 2**63}}, {}, "priority"),
       ("/v1/chat/completions", {**CHAT, "priority": 1e300}, {}, "priority"),
       ("/v1/chat/completions", CHAT, {"X-Prompt-Tokens": str(2**63)}, "X-Prompt-Tokens"),
       ("/v1/chat/completions", CHAT, {"X-Requested-Max-Tokens": str(10**400)}, "X-Requested-Max-Tokens")])


def test_out_of_range_integers_get_400_and_the_usage_writer_lives(srv):
    url = srv.url
    out = []
    with httpx.Client(timeout=BOUND_S) as c:
        for path, body, headers, _ in INT_CASES:
            r = c.post(url + path, content=json.dumps(body), headers={"Content-Type": "application/json", **headers})
            out.append((r.status_code, r.text))
        ok = c.post(url + "/v1/chat/completions", json=CHAT, headers={"X-Priority": str(2**31 - 1)})
        health = c.get(url + "/health").json()
        recent = c.get(url + "/usage/recent?limit=5", timeout=5.0)
    for (path, body, headers, field), (status, text) in zip(INT_CASES, out):
        assert status == 400, (path, field, text[:200])
        assert field in text, (field, text[:200])  # the message names the field
    assert ok.status_code == 200  # the largest priority allowed still works
    assert health["usage_error"] is None and health["usage_writer"] == "running" and health["usage_writer_restarts"] == 0
    assert recent.status_code == 200 and recent.json()["requests"][0]["priority"] == 2**31 - 1


def test_failed_requests_never_keep_a_queue_slot(srv):
    """150 requests that once failed with a 500 after admission (and so locked out every client of
    a 5-slot queue) now fail before it; the queue is empty after them and 10 normal requests pass."""
    url = srv.url

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as c:
            bad = await asyncio.gather(*[c.post("/v1/chat/completions", json={**CHAT, "priority": 10**400 + i})
                                         for i in range(150)])
            qs = (await c.get("/queue/status")).json()
            good = await asyncio.gather(*[c.post("/v1/chat/completions", json=CHAT) for _ in range(5)])
            more = [await c.post("/v1/chat/completions", json=CHAT) for _ in range(5)]
            after = (await c.get("/queue/status")).json()
            return bad, qs, good + more, after
    bad, qs, good, after = asyncio.run(go())
    assert {r.status_code for r in bad} == {400}
    assert qs["queued"] == 0 and qs["inflight"] == 0
    assert [r.status_code for r in good] == [200] * 10
    assert after["queued"] == 0 and after["inflight"] == 0


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"model": "m1", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    b'{"model": "m1", "messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
], ids=["array", "object", "in-messages", "in-content"])
def test_deeply_nested_json_gets_400(srv, raw):
    r = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=BOUND_S)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text[:200]
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------- connections
def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    s.settimeout(BOUND_S)
    return s


def _closed_by_server(s: socket.socket, seen: dict) -> bytes | None:
    """Everything the server sent before it closed the connection, or None while it is still open
    (what arrived so far is kept in `seen`)."""
    s.setblocking(False)
    key = s.fileno()
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return seen.get(key) or b"<closed>"
            seen[key] = seen.get(key, b"") + chunk
    except BlockingIOError:
        return None
    except OSError:  # reset
        return seen.get(key) or b"<reset>"


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
SLOW_BODY = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"model\": ")


def _all_closed(socks, seen):
    got = {i: _closed_by_server(x, seen) for i, x in enumerate(socks)}
    return got if all(v is not None for v in got.values()) else None


@pytest.mark.parametrize("kind", ["idle", "half-sent head", "slow body"])
def test_idle_and_half_sent_connections_never_lock_out_health(tmp_path, kind):
    """300 attacker sockets of one kind against a server allowed 120 connections: /health answers
    at once while they are open (bound 3 s) (new connections evict the oldest idle ones); after the
    1 s idle timeout the server has closed every one of them; the server then serves as before."""
    with serve(scenario(tmp_path), tmp_path, "--idle-timeout", "1", "--max-connections", "120") as s:
        port = int(s.url.rsplit(":", 1)[1])
        socks = []
        for _ in range(300):
            x = _connect(port)
            if kind != "idle":
                x.sendall(HEAD if kind == "half-sent head" else SLOW_BODY)
            socks.append(x)
        t0 = time.monotonic()
        h = httpx.get(s.url + "/health", timeout=5.0)
        health_s = time.monotonic() - t0
        assert h.status_code == 200 and health_s < 3.0
        until(lambda: _all_closed(socks, {}), "every attacker socket to be closed", timeout=15.0)
        for x in socks:
            x.close()
        assert httpx.post(s.url + "/v1/chat/completions", json=CHAT, timeout=BOUND_S).status_code == 200


def test_idle_sockets_beyond_the_file_limit_never_lock_out_health(tmp_path):
    """The issue's attack: a server allowed 1,024 open files and 1,100 idle sockets. Without a cap,
    accept() runs out of descriptors and /health goes unanswered; with it (448 connections here,
    a whole accept batch of descriptors kept spare) /health answers at once (bound 3 s: a busy machine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"this test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1300), hard), hard))
    try:
        with serve(scenario(tmp_path), tmp_path, nofile=1024) as s:
            port = int(s.url.rsplit(":", 1)[1])
            socks = [_connect(port) for _ in range(1100)]
            t0 = time.monotonic()
            h = httpx.get(s.url + "/health", timeout=5.0)
            health_s = time.monotonic() - t0
            r = httpx.post(s.url + "/v1/chat/completions", json=CHAT, timeout=BOUND_S)
            open_now = sum(1 for x in socks if _closed_by_server(x, {}) is None)
            for x in socks:
                x.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert h.status_code == 200 and health_s < 3.0 and r.status_code == 200  # before: no answer in 10 s
    assert open_now <= 448  # the oldest idle ones were closed to make room


def test_slow_body_gets_408(tmp_path):
    with serve(scenario(tmp_path), tmp_path, "--idle-timeout", "1") as s:
        port = int(s.url.rsplit(":", 1)[1])
        socks = [_connect(port) for _ in range(20)]
        for x in socks:
            x.sendall(SLOW_BODY)
        t0 = time.monotonic()
        seen: dict = {}
        got = until(lambda: _all_closed(socks, seen), "the slow bodies to be answered", timeout=15.0)
        took = time.monotonic() - t0
        for x in socks:
            x.close()
    assert all(v.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1 s" in v for v in got.values()), got
    assert took < 5.0


# ---------------------------------------------------------------- cancellations
def _usage_row(url, rid):
    return until(lambda: next((r for r in httpx.get(url + "/usage/recent?limit=50").json()["requests"]
                               if r["id"] == rid and r["status"] != "running" and r["status"] != "queued"), None),
                 f"usage row of {rid}")


def test_client_hangups_are_cancelled_in_records_metrics_and_usage(tmp_path):
    """A stream closed after two chunks, a non-streaming request whose client gives up, and a stream
    whose client stops reading until the world has finished the request and then hangs up: all
    three are cancellations (outcome timeout, error "client disconnected", HTTP 499; usage status
    cancelled; vLLM's finished_reason abort), never ok."""
    sc = scenario(tmp_path, 0.0001, tenants={
        "users": [{"id": "alice", "project": "lab", "tier": "high"}], "projects": [{"id": "lab"}],
        "models": [{"name": "m1", "default_max_tokens": 8, "max_max_tokens": 40000}]},
        workload={"classes": [{"name": "chat", "user": "alice", "model": "m1", "arrival": {"type": "poisson", "rate": 1}}]})
    with serve(sc, tmp_path) as s:
        url = s.url
        ids = []
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "max_tokens": 30000, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            ids.append(r.headers["X-Request-Id"])
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 30000}, timeout=0.3)
        ids.append(httpx.get(url + "/usage/recent?limit=1").json()["requests"][0]["id"])
        # the slow reader: a tiny receive window, nothing read until the world is done with it
        port = int(url.rsplit(":", 1)[1])
        sk = socket.socket()
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sk.connect(("127.0.0.1", port))
        body = json.dumps({**CHAT, "max_tokens": 30000, "stream": True}).encode()
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        until(lambda: httpx.get(url + "/health").json()["open_requests"] == 0 and
              len(httpx.get(url + "/usage/recent?limit=5").json()["requests"]) == 3, "the world to finish the slow read")
        head = sk.recv(4096)
        sk.close()
        rid = head.split(b"X-Request-Id: ", 1)[1].split(b"\r\n", 1)[0].decode()
        ids.append(rid)
        rows = until(lambda: (lambda rs: rs if len(rs) == 3 else None)(records(url)), "three records")
        usage = [_usage_row(url, i) for i in ids]
        prom = httpx.get(url + "/metrics", headers={"Accept": "text/plain"}).text
        js = httpx.get(url + "/metrics").json()
    for row in rows:
        assert (row["outcome"], row["error"], row["http_status"]) == ("timeout", "client disconnected", "499"), row
    assert int(rows[2]["output_tokens"]) == 30000  # the world did generate all of it; the client did not take it
    assert [u["status"] for u in usage] == ["cancelled"] * 3
    assert js["requests"]["by_outcome"] == {"timeout": 3}
    assert 'vllm:request_success_total{engine="0",finished_reason="abort",model_name="m1"} 3.0' in prom
    assert "finished_reason=\"stop\"" not in prom and "finished_reason=\"length\"" not in prom


# ---------------------------------------------------------------- restarts
def test_requests_in_flight_at_sigkill_are_closed_out_on_restart(tmp_path):
    sc = scenario(tmp_path, 0.02, engine={"max_batch_size": 2})
    db = tmp_path / "usage.db"
    with serve(sc, tmp_path, db=db) as s, httpx.Client(timeout=BOUND_S) as c:
        streams = []
        for _ in range(3):  # the first runs alone (static batches, no batch timeout); two wait for the next batch
            req = c.build_request("POST", s.url + "/v1/chat/completions", headers={"X-User": "bob"},
                                  json={**CHAT, "max_tokens": 1000, "stream": True})
            streams.append(c.send(req, stream=True))
        until(lambda: (lambda q: (q["running"], q["queued"]) == (1, 2))(httpx.get(s.url + "/queue/status").json()),
              "one running, two queued")
        # the usage writer commits within a wake-up: wait until the DB shows all three open
        def open_rows():
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall()
        until(lambda: dict(open_rows()) == {"queued": 2, "running": 1}, "three open rows on disk")
        s.kill()
        for st in streams:
            try:
                st.close()
            except httpx.HTTPError:
                pass
    with serve(sc, tmp_path, db=db) as s:
        health = httpx.get(s.url + "/health").json()
        recent = httpx.get(s.url + "/usage/recent?limit=10").json()["requests"]
        bob = httpx.get(s.url + "/usage/user/bob").json()
        again = httpx.post(s.url + "/v1/chat/completions", json=CHAT, headers={"X-User": "bob"}).status_code
    assert health["usage_closed_at_start"] == 3
    assert sorted((r["status"], r["outcome"], r["error"]) for r in recent) == [("failed", "timeout", KILLED)] * 3
    assert bob["in_flight"] == 0 and bob["totals"]["requests"] == 3 and bob["totals"]["failed"] == 3
    assert again == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_usage_writer_failures_show_and_a_dead_writer_restarts(tmp_path, monkeypatch):
    """The store itself (its thread, a real SQLite file): a write that raises is counted and named
    while the writer goes on; a writer killed outright is restarted by the next write or health
    check, with the reason kept, and answers reads again."""
    store = UsageStore(tmp_path / "u.db", run="r1")
    store.open()
    try:
        store._put(("INSERT INTO usage (scope, key, model, requests) VALUES (?, ?, ?, ?)", ("user", "a", "m", 2**63)))

        async def read(fn):
            return await asyncio.wait_for(store.read(fn), 5.0)
        assert asyncio.run(read(lambda c: c.execute("SELECT COUNT(*) FROM usage").fetchone()[0])) == 0
        h = store.health()
        assert h["usage_writer"] == "running" and h["usage_failed_writes"] == 1 and "OverflowError" in h["usage_error"]

        def die(conn):
            raise SystemExit("killed")  # not an Exception: the writer's per-item guard lets it through
        monkeypatch.setattr(usage_mod, "READ_TIMEOUT_S", 1.0)
        with pytest.raises(UsageUnavailable):  # the dead writer never answers: the read gives up, bounded
            asyncio.run(read(die))
        h = store.health()  # notices (if the next write has not already), restarts
        assert h["usage_writer"] == "running" and h["usage_writer_restarts"] == 1 and "SystemExit" in h["usage_error"]
        assert asyncio.run(read(lambda c: c.execute("SELECT 42").fetchone()[0])) == 42
    finally:
        store.close()


def test_a_request_that_fails_inside_the_world_gets_a_json_500_and_frees_its_slot(tmp_path):
    """A scenario whose class priority (10**400, which scenario validation accepts) makes the
    priority_aging scheduler raise after the gateway admitted the request: the client gets a JSON
    500, the request its record (http_error, 500), and its queue slot back; 150 of them in a 5-slot
    queue leave room for the next clients (they used to keep their slots: every later client got 503)."""
    sc = scenario(tmp_path, 0.002, gateway={"max_queue": 5}, scheduler={"policy": "priority_aging"},
                  engine={"type": "continuous", "max_num_seqs": 4, "num_blocks": 4096})
    text = sc.read_text().replace("name: bulk", "name: bulk\n    priority: " + str(10**400))
    sc.write_text(text)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as c:
            bad = await asyncio.gather(*[c.post("/v1/chat/completions", json=CHAT, headers={"X-Class": "bulk"})
                                         for _ in range(150)])
            qs = (await c.get("/queue/status")).json()
            good = [await c.post("/v1/chat/completions", json=CHAT, headers={"X-Class": "api"}) for _ in range(10)]
            return bad, qs, good
    with serve(sc, tmp_path) as s:
        bad, qs, good = asyncio.run(go(s.url))
        rows = records(s.url)
        health = httpx.get(s.url + "/health").json()
    assert {r.status_code for r in bad} == {500}
    assert all(r.json()["error"]["type"] == "server_error" for r in bad)
    assert qs["queued"] == 0 and qs["inflight"] == 0
    assert [r.status_code for r in good] == [200] * 10
    failed = [r for r in rows if r["class_name"] == "bulk"]
    assert len(failed) == 150 and {(r["outcome"], r["http_status"]) for r in failed} == {("http_error", "500")}
    assert health["status"] == "ok" and health["open_requests"] == 0
