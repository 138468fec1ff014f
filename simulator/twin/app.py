"""HTTP routes of the twin server (aiohttp): generation here, information routes in info.py.

Generation endpoints share one path: parse the body (400 naming the field), submit to the world
(the gateway answers at once: 429/503/404), then stream the tokens as the engine emits them or wait
for the whole answer. A client that hangs up before its whole answer is written is a cancellation
(Twin.delivered), whether the world was still working on it or had just finished it.
"""
from __future__ import annotations

import asyncio
from bisect import bisect_right

from aiohttp import web

from . import info
from . import usage as uq
from .bodies import PARSERS, hints
from .clock import EARLY
from .dialects import ENCODERS, text
from .service import Ticket, Twin, problem_for
from .tenancy import HTTPProblem
from .usage import status_of
from .web_common import BODY_TIMEOUT, BODY_TIMEOUT_S, MAX_BODY, READING, TWIN, errors, read_json  # noqa: F401

# A request the world timed out at its class's timeout_s is one whose client gives up then: a real
# server would not answer it either, so the twin stays silent this long (the client hangs up first
# and records its own timeout, as the simulator does) before it ends the response with an error.
CLIENT_GRACE_S = 1.0


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
    r.add_get("/v1/models", info.models)
    r.add_get("/v1/models/{id}", info.model)
    r.add_get("/api/tags", info.ollama_tags)
    r.add_get("/api/ps", info.ollama_ps)
    r.add_post("/api/show", info.ollama_show)
    r.add_get("/api/version", info.ollama_version)
    r.add_get("/health", info.health)
    r.add_get("/metrics", info.metrics)
    r.add_get("/queue/status", info.queue_status)
    r.add_get("/records", info.records)
    r.add_get("/usage/summary", info.usage_summary)
    r.add_get("/usage/project/{id}", info.usage_scoped("project"))
    r.add_get("/usage/user/{id}", info.usage_scoped("user"))
    r.add_get("/usage/recent", info.usage_recent)
    r.add_get("/v1/admin/models", info.admin_models)
    r.add_post("/v1/admin/models", info.admin_action)
    r.add_post("/v1/admin/models/{model}/{action}", info.admin_action)
    return app
