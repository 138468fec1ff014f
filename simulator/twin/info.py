"""The twin's information, usage and admin routes: models (OpenAI and Ollama views), /health,
/metrics (JSON, or Prometheus text), /queue/status, /records, /usage/*, /v1/admin/models."""
from __future__ import annotations

import io
import json

from aiohttp import web

from . import usage as uq
from .bodies import bad
from .dialects import iso
from .tenancy import HTTPProblem
from .web_common import TWIN, read_json

OLLAMA_VERSION = "0.6.0"  # the Ollama API level the twin speaks (/api/version)


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
