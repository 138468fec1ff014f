"""HTTP routes of the twin server (aiohttp).

Generation endpoints share one path: parse the body (400 naming the field), submit to the world
(the gateway answers at once: 429/503/404), then stream the tokens as the engine emits them or wait
for the whole answer. A client that hangs up mid-request is a client timeout in the world.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
from bisect import bisect_right

from aiohttp import web

from . import usage as uq
from .bodies import PARSERS, bad, hints
from .clock import EARLY
from .dialects import ENCODERS, Encoder, OllamaChat, iso, text
from .service import Ticket, Twin, problem_for
from .tenancy import HTTPProblem
from .usage import status_of

MAX_BODY = 1 << 20  # bytes; larger bodies get 413
BODY_TIMEOUT_S = 10.0  # a request's body must arrive within this after its headers
# A request the world timed out at its class's timeout_s is one whose client gives up then: a real
# server would not answer it either, so the twin stays silent this long (the client hangs up first
# and records its own timeout, as the simulator does) before it ends the response with an error.
CLIENT_GRACE_S = 1.0
TWIN = web.AppKey("twin", Twin)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
READING = web.AppKey("reading", set)  # transports of requests whose body is still arriving
log = logging.getLogger("servesim.twin")
OLLAMA_VERSION = "0.6.0"  # the Ollama API level the twin speaks (/api/version)


def problem_response(request: web.Request, p: HTTPProblem) -> web.Response:
    shape = OllamaChat if request.path.startswith("/api/") else Encoder
    body = shape.error_body(p.status, p.message, p.type, p.code, p.param)
    resp = web.json_response(body, status=p.status, headers=p.headers)
    if p.headers.get("Connection") == "close":
        resp.force_close()  # and no lingering read of a body that is not coming
    return resp


_TYPES = {400: "invalid_request_error", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def errors(request, handler):
    try:
        return await handler(request)
    except HTTPProblem as p:
        return problem_response(request, p)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = e.text or e.reason
        if e.status in (404, 405):
            msg = f"{e.reason}: {request.method} {request.path}"
        return problem_response(request, HTTPProblem(e.status, msg, _TYPES.get(e.status, "error")))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: a JSON 500 (logged), and the server goes on
        log.exception("%s %s failed", request.method, request.path)
        return problem_response(request, HTTPProblem(500, f"internal error: {type(exc).__name__}", "server_error"))


async def read_json(request) -> dict:
    limit = request.app[BODY_TIMEOUT]
    reading, tr = request.app[READING], request.transport
    reading.add(tr)  # evictable like an idle connection while its body trickles in (server.guard_connections)
    try:  # aiohttp raises 413 past client_max_size; a body sent too slowly (or never) is a 408
        raw = await asyncio.wait_for(request.read(), limit)
    except asyncio.TimeoutError:
        raise HTTPProblem(408, f"request body not received within {limit:g} s", "request_timeout",
                          headers={"Connection": "close"}) from None
    finally:
        reading.discard(tr)
    if not raw.strip():
        raise bad("request body is empty")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad(f"invalid JSON body: {exc}") from None
    except RecursionError:  # "[[[[..." a few thousand deep: the decoder's recursion, not our stack, gives up
        raise bad("invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


# ---------------------------------------------------------------- generation
async def _wait_done(t: Ticket) -> None:
    while not t.done:
        await t.changed()


async def _client_timeout(twin: Twin, t: Ticket) -> None:
    r = t.req
    if r.outcome == "timeout" and not r.error and not twin.stopped:  # the world's deadline, not a hang-up
        await asyncio.sleep(CLIENT_GRACE_S)


async def _stream(request, twin: Twin, t: Ticket, enc) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": enc.content_type, "Cache-Control": "no-cache",
                                       "X-Request-Id": t.id})
    await resp.prepare(request)
    head = enc.head()
    if head:
        await resp.write(head)
    clock, times, sent = twin.driver, t.times, 0
    while True:
        n = len(times)
        if sent < n:
            now = clock.now()
            k = bisect_right(times, now + EARLY, sent, n)
            if k == sent:  # an engine told us of tokens ahead of time: hold them until then
                await asyncio.sleep(times[sent] - now)
                continue
            await resp.write(enc.chunk(sent, k))
            sent = k
            continue
        if t.done:
            break
        await t.changed()
    if t.req.outcome == "ok":
        await resp.write(enc.tail())
    else:
        await _client_timeout(twin, t)
        p = problem_for(twin, t.req)
        await resp.write(enc.fail(p.status, p.message, p.type))
    await resp.write_eof()
    return resp


def generation(api: str):
    parse, encoder = PARSERS[api], ENCODERS[api]

    async def handler(request: web.Request):
        twin = request.app[TWIN]
        body = await read_json(request)
        call = parse(body)
        t = twin.submit(call, request.headers, body, *hints(request.headers))
        sent = False  # the whole answer (or the error the world decided) reached the socket
        try:
            if t.done and t.req.outcome != "ok":
                sent = True
                raise problem_for(twin, t.req)
            if api == "queue":
                return web.json_response(job_view(t), status=202, headers={"X-Request-Id": t.id})
            enc = encoder(t)
            if call.stream:
                resp = await _stream(request, twin, t, enc)
                sent = True
                return resp
            await _wait_done(t)
            if t.req.outcome != "ok":
                await _client_timeout(twin, t)
                sent = True
                raise problem_for(twin, t.req)
            resp = web.json_response(enc.whole(), headers={"X-Request-Id": t.id})
            await resp.prepare(request)  # written here, not after return: a hang-up now is a cancellation
            await resp.write_eof()
            sent = True
            return resp
        finally:
            twin.delivered(t, sent)  # a client gone before its answer: free the world's resources, record it cancelled
    return handler


def job_view(t: Ticket) -> dict:
    r = t.req
    st = status_of(r)
    return {"request_id": t.id, "id": t.id, "status": st, "model": r.model, "user": r.user, "project": r.project,
            "class": r.class_name, "priority": r.priority, "outcome": r.outcome, "error": r.error or None,
            "http_status": r.http_status or None, "prompt_tokens": r.prompt, "requested_max_tokens": r.requested_max,
            "max_tokens": r.applied_max,
            "output_tokens": t.generated, "output": text(t.generated),
            "created_at": t.wall(r.arrival), "started_at": t.wall(r.start),
            "first_token_at": t.wall(t.times[0]) if t.times else None,
            "completed_at": t.wall(r.end) if r.outcome is not None else None,
            "usage": t.usage()}


async def get_request(request):
    twin = request.app[TWIN]
    rid = request.match_info["id"]
    for pre in ("chatcmpl-", "cmpl-", "resp_"):
        rid = rid.removeprefix(pre)
    t = twin.recent.get(rid)
    if t is not None:
        return web.json_response(job_view(t))
    if twin.usage is not None:
        row = await twin.usage.read(uq.one(rid))
        if row is not None:  # from an earlier run or evicted: lifecycle only, no output text
            return web.json_response({"request_id": row["id"], "id": row["id"], **{k: row[k] for k in (
                "status", "model", "user", "project", "outcome", "error", "http_status", "prompt_tokens", "max_tokens",
                "output_tokens", "created_at", "started_at", "first_token_at")}, "completed_at": row["finished_at"],
                "class": row["class_name"]})
    raise HTTPProblem(404, f"no request {rid!r}", "not_found")


# ---------------------------------------------------------------- information
def _model_card(twin, m) -> dict:
    return {"id": m.name, "object": "model", "created": int(twin.wall0), "owned_by": "servesim", "root": m.name,
            "parent": None, "max_model_len": twin.max_model_len, "enabled": m.enabled}


async def models(request):
    twin = request.app[TWIN]
    return web.json_response({"object": "list", "data": [_model_card(twin, m) for m in twin.sc.tenants.models]})


async def model(request):
    twin = request.app[TWIN]
    name = request.match_info["id"]
    m = twin.tenancy.models.get(name)
    if m is None:
        raise HTTPProblem(404, f"model {name!r} does not exist", "invalid_request_error", "model", "model_not_found")
    return web.json_response(_model_card(twin, m))


def _ollama_model(twin, m) -> dict:
    return {"name": m.name, "model": m.name, "modified_at": iso(twin.wall0), "size": 0, "digest": "servesim-" + m.name,
            "details": {"parent_model": "", "format": "servesim", "family": "servesim", "families": ["servesim"],
                        "parameter_size": "", "quantization_level": ""}}


async def ollama_tags(request):
    twin = request.app[TWIN]
    return web.json_response({"models": [_ollama_model(twin, m) for m in twin.sc.tenants.models if m.enabled]})


async def ollama_ps(request):
    """Models 'in memory': a model pool's loaded ones, else every enabled model."""
    twin = request.app[TWIN]
    pool = getattr(twin.world, "pool", None)
    names = None
    if pool is not None:
        twin.driver.advance()
        names = {k for k, v in pool.status()["models"].items() if v["replicas"]["loaded"]}
    out = []
    for m in twin.sc.tenants.models:
        if m.enabled and (names is None or m.name in names):
            d = _ollama_model(twin, m)
            d.update({"expires_at": "2318-01-01T00:00:00Z", "size_vram": 0, "context_length": twin.max_model_len})
            out.append(d)
    return web.json_response({"models": out})


async def ollama_show(request):
    twin = request.app[TWIN]
    body = await read_json(request)
    name = body.get("model", body.get("name"))
    if not isinstance(name, str):
        raise bad("missing 'model'", "model")
    m = twin.tenancy.models.get(name)
    if m is None:
        raise HTTPProblem(404, f"model '{name}' not found", "not_found")
    info = {"general.architecture": "servesim", "servesim.context_length": twin.max_model_len,
            "servesim.default_max_tokens": m.default_max_tokens}
    return web.json_response({"modelfile": f"FROM {m.name}\n", "parameters": f"num_predict {m.default_max_tokens}",
                              "template": "{{ .Prompt }}", "details": _ollama_model(twin, m)["details"],
                              "model_info": info, "capabilities": ["completion"], "modified_at": iso(twin.wall0)})


async def ollama_version(request):
    return web.json_response({"version": OLLAMA_VERSION})


async def health(request):
    twin = request.app[TWIN]
    d = twin.driver
    failed = d.failed is not None
    body = {"status": "failed" if failed else ("stopping" if twin.stopped else "ok"), "scenario": twin.sc.name,
            "uptime_s": round(d.now(), 6), "sim_time_s": round(twin.world.env.now, 6),
            "clock_max_lag_s": round(d.max_lag, 6), "clock_steps": d.steps, "open_requests": len(twin.live),
            "default_user": twin.tenancy.default_user,
            "usage_db": str(twin.usage.path) if twin.usage is not None else None}
    if failed:
        body["error"] = repr(d.failed)
    if twin.usage is not None:
        body.update(twin.usage.health())  # a dead writer is restarted here and its reason shown
    return web.json_response(body, status=503 if failed else 200)


def _wants_prometheus(request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in ("prometheus", "json"):
            raise bad("format must be 'prometheus' or 'json'", "format")
        return fmt == "prometheus"
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept or "openmetrics" in accept


async def metrics(request):
    twin = request.app[TWIN]
    twin.driver.advance()
    g = twin.gauges()
    if _wants_prometheus(request):
        return web.Response(body=twin.metrics.prometheus(g),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return web.json_response(twin.metrics.as_dict(g))


async def queue_status(request):
    twin = request.app[TWIN]
    twin.driver.advance()
    return web.json_response({"scenario": twin.sc.name, "scheduler": twin.sc.scheduler.policy,
                              **twin.world.queue_status()})


async def records(request):
    twin = request.app[TWIN]
    buf = io.StringIO()
    write_csv_to(buf, twin.world.rows)
    return web.Response(text=buf.getvalue(), content_type="text/csv")


def write_csv_to(fh, rows) -> None:
    import csv
    from ..records import COLUMN_NAMES
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(COLUMN_NAMES)
    w.writerows(sorted(rows, key=lambda r: r[0]))


# ---------------------------------------------------------------- usage
def _store(request):
    twin = request.app[TWIN]
    if twin.usage is None:
        raise HTTPProblem(404, "usage store disabled (start with --usage-db)", "not_found")
    return twin.usage


async def usage_summary(request):
    return web.json_response(await _store(request).read(uq.summary))


def usage_scoped(scope: str):
    async def handler(request):
        key = request.match_info["id"]
        out = await _store(request).read(uq.scoped(scope, key))
        if out is None:
            raise HTTPProblem(404, f"no usage for {scope} {key!r}", "not_found")
        return web.json_response(out)
    return handler


async def usage_recent(request):
    store = _store(request)
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise bad("limit must be an integer in 1..1000", "limit")
    return web.json_response({"requests": await store.read(uq.recent(limit))})


# ---------------------------------------------------------------- model pool admin
def _pool(request):
    twin = request.app[TWIN]
    pool = getattr(twin.world, "pool", None)
    if pool is None:
        raise HTTPProblem(404, "not a model-pool scenario (cluster.model_pool is empty)", "not_found")
    return twin, pool


def _jsonable(o):
    return json.loads(json.dumps(o, default=str))


async def admin_models(request):
    twin, pool = _pool(request)
    twin.driver.advance()
    return web.json_response(_jsonable(pool.status()))


async def admin_action(request):
    twin, pool = _pool(request)
    if "model" in request.match_info:
        model, action = request.match_info["model"], request.match_info["action"]
    else:
        body = await read_json(request)
        model, action = body.get("model"), body.get("action")
    if action not in ("load", "unload"):
        raise bad("action must be 'load' or 'unload'", "action")
    if model not in twin.tenancy.models:
        raise HTTPProblem(404, f"model {model!r} does not exist", "not_found", "model", "model_not_found")
    twin.driver.advance()
    try:
        result = getattr(pool, action)(model)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise HTTPProblem(409, f"cannot {action} {model!r}: {exc}", "conflict") from None
    twin.driver.advance()
    twin.driver.wake()
    return web.json_response(_jsonable({"model": model, "action": action, "result": result, "status": pool.status()}))


# ---------------------------------------------------------------- the app
def build_app(twin: Twin, body_timeout_s: float = BODY_TIMEOUT_S) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors])
    app[TWIN] = twin
    app[BODY_TIMEOUT] = body_timeout_s
    app[READING] = set()
    r = app.router
    for path, api in (("/v1/chat/completions", "openai-chat"), ("/v1/completions", "openai-completions"),
                      ("/v1/responses", "responses"), ("/api/chat", "ollama-chat"), ("/api/generate", "ollama-generate"),
                      ("/completion", "llamacpp"), ("/generate", "queue")):
        r.add_post(path, generation(api))
    r.add_get("/requests/{id}", get_request)
    r.add_get("/v1/models", models)
    r.add_get("/v1/models/{id}", model)
    r.add_get("/api/tags", ollama_tags)
    r.add_get("/api/ps", ollama_ps)
    r.add_post("/api/show", ollama_show)
    r.add_get("/api/version", ollama_version)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/queue/status", queue_status)
    r.add_get("/records", records)
    r.add_get("/usage/summary", usage_summary)
    r.add_get("/usage/project/{id}", usage_scoped("project"))
    r.add_get("/usage/user/{id}", usage_scoped("user"))
    r.add_get("/usage/recent", usage_recent)
    r.add_get("/v1/admin/models", admin_models)
    r.add_post("/v1/admin/models", admin_action)
    r.add_post("/v1/admin/models/{model}/{action}", admin_action)
    return app
