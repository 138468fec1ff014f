"""What every route of the twin shares: the app keys, JSON errors in the caller's API shape (a
middleware that also turns a bug into a logged JSON 500), and reading a JSON body within bounds
(size: 413, time: 408, nesting: 400)."""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from .bodies import bad
from .dialects import Encoder, OllamaChat
from .service import Twin
from .tenancy import HTTPProblem
from .usage import UsageUnavailable

MAX_BODY = 1 << 20  # bytes; larger bodies get 413
BODY_TIMEOUT_S = 10.0  # a request's body must arrive within this after its headers
TWIN = web.AppKey("twin", Twin)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
READING = web.AppKey("reading", set)  # transports of requests whose body is still arriving
log = logging.getLogger("servesim.twin")


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
    except UsageUnavailable as exc:
        return problem_response(request, HTTPProblem(503, str(exc), "unavailable"))
    except Exception as exc:  # noqa: BLE001 - a bug: a JSON 500 (logged), and the server goes on
        log.exception("%s %s failed", request.method, request.path)
        return problem_response(request, HTTPProblem(500, f"internal error: {type(exc).__name__}", "server_error"))


async def read_json(request) -> dict:
    limit = request.app[BODY_TIMEOUT]
    reading, tr = request.app[READING], request.transport
    reading.add(tr)  # evictable like an idle connection while its body trickles in (server.guard_connections)
    try:  # aiohttp raises 413 past client_max_size; a body sent too slowly (or never) is a 408
        # (a body already here, the usual case, skips the timer task: a tenth of the request's cost)
        raw = await (request.read() if request.content.is_eof() else asyncio.wait_for(request.read(), limit))
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
