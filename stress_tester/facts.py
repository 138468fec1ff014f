"""What the server says about itself: read at the start and end of a run, and its queue gauges sampled
about once a second while it runs, into `server.json` and the report.

Where each server says it:
- vLLM: `/metrics` (Prometheus text): `vllm:cache_config_info` labels (block_size, num_gpu_blocks, ...),
  `vllm:num_requests_running` / `vllm:num_requests_waiting` gauges, the prefix-cache counters
  `vllm:prefix_cache_queries_total` / `_hits_total` (tokens; the twin has them too), and its histograms
  (`vllm:request_queue_time_seconds`, `vllm:time_to_first_token_seconds`, `vllm:iteration_tokens_total`, ...:
  the server's own view of each request and engine step, kept as sums, counts and buckets); `/v1/models`
  gives `max_model_len`.
- llama.cpp `llama-server`: `/props` (total_slots, default_generation_settings.n_ctx = per-slot context),
  `/slots` (one entry per slot, `is_processing`, and the tokens a slot holds and its last task: a run inherits them), `/metrics` when started with --metrics
  (`llamacpp:requests_processing`, `llamacpp:requests_deferred`).
- Ollama: `/api/version`, `/api/ps` (loaded models, context length), `/api/show`.
- the twin (`sim serve`): `/health`, `/queue/status`.
Every read is bounded in time and size; a server that answers none of them is `unknown`, never an error.
"""
from __future__ import annotations

import asyncio
import json
import re
from time import perf_counter

import aiohttp
import httpx

MAX_BODY = 4 << 20
TIMEOUT_S = 3.0
_GAUGE = re.compile(rb"^(vllm:num_requests_(?:running|waiting)|llamacpp:requests_(?:processing|deferred))(?:\{[^}]*\})?\s+([0-9.eE+-]+)",
                    re.M)


def _get(client: httpx.Client, url: str, headers: dict | None = None):
    """(status, text) or (None, error) — at most MAX_BODY bytes."""
    try:
        with client.stream("GET", url, headers=headers) as r:
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > MAX_BODY:
                    break
            return r.status_code, bytes(buf[:MAX_BODY]).decode("utf-8", "replace")
    except (httpx.HTTPError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _json(text):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _labels(line: str) -> dict:
    m = re.search(r"\{(.*)\}", line)
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))) if m else {}


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and abs(f) < 2 ** 53 else f


def parse_vllm_metrics(text: str) -> dict:
    facts = {}
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            lab = _labels(line)
            for k in ("block_size", "num_gpu_blocks", "num_cpu_blocks", "enable_prefix_caching", "cache_dtype",
                      "gpu_memory_utilization"):
                if k in lab:
                    facts[k] = _num(lab[k])
        m = re.match(r"vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+(\S+)", line)
        if m:
            facts[f"num_requests_{m.group(1)}"] = _num(m.group(2))
    return facts


_PREFIX = re.compile(r"^vllm:prefix_cache_(queries|hits)(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def prefix_cache_counters(text: str) -> dict | None:
    """vLLM's prefix-cache counters, in prompt tokens, summed over its engines: {"queries", "hits"} (V1:
    vllm:prefix_cache_queries_total counts the tokens looked up when a request is scheduled,
    vllm:prefix_cache_hits_total those the cache served); None when the server exposes neither."""
    got = {"queries": 0.0, "hits": 0.0}
    seen = False
    for m in _PREFIX.finditer(text):
        try:
            got[m.group(1)] += float(m.group(2))
            seen = True
        except ValueError:
            pass
    return {k: _num(v) for k, v in got.items()} if seen else None


_HIST = re.compile(r"^(vllm:[A-Za-z0-9_:]+?)_(sum|count|bucket)(\{[^}]*\})?\s+(\S+)\s*$", re.M)
_LE = re.compile(r'le="([^"]*)"')
MAX_FAMILIES, MAX_BUCKETS = 64, 64


def histograms(text: str) -> dict:
    """vLLM's Prometheus histograms, summed over label sets: {family: {"sum", "count", "buckets": {le:
    cumulative count}}}. Start and end of a run differ by what the run did (simulator/runfolder.py
    `server_histograms`): e.g. vllm:iteration_tokens_total's count is the number of engine steps."""
    out: dict = {}
    for m in _HIST.finditer(text):
        name, part, labels, val = m.groups()
        try:
            v = float(val)
        except ValueError:
            continue
        if v != v:  # NaN
            continue
        h = out.get(name)
        if h is None:
            if len(out) >= MAX_FAMILIES:
                continue
            h = out[name] = {"sum": 0.0, "count": 0.0, "buckets": {}}
        if part == "bucket":
            le = _LE.search(labels or "")
            if le and (le.group(1) in h["buckets"] or len(h["buckets"]) < MAX_BUCKETS):
                h["buckets"][le.group(1)] = h["buckets"].get(le.group(1), 0.0) + v
        else:
            h[part] += v
    return {k: {"sum": _num(h["sum"]), "count": _num(h["count"]),
                "buckets": {le: _num(n) for le, n in h["buckets"].items()}} for k, h in out.items()}


def gauges(text: bytes | str) -> tuple:
    """(running, waiting) from a /metrics text, or (None, None)."""
    if isinstance(text, str):
        text = text.encode()
    vals = {m.group(1): float(m.group(2)) for m in _GAUGE.finditer(text)}
    run = vals.get(b"vllm:num_requests_running", vals.get(b"llamacpp:requests_processing"))
    wait = vals.get(b"vllm:num_requests_waiting", vals.get(b"llamacpp:requests_deferred"))
    return (None if run is None else int(run)), (None if wait is None else int(wait))


def probe(base_url: str, model: str | None = None, timeout: float = TIMEOUT_S) -> dict:
    """{"kind", "facts", "raw"}: which server this is and what it says about itself."""
    base = base_url.rstrip("/")
    raw, facts, kind = {}, {}, "unknown"
    with httpx.Client(timeout=timeout, follow_redirects=False) as c:
        # the twin first: it also speaks vLLM's /metrics (with Accept: text/plain) and Ollama's /api/version
        st, text = _get(c, base + "/health")
        h = _json(text) if st in (200, 503) else None
        if isinstance(h, dict) and "sim_time_s" in h:
            kind = "twin"
            raw["health"] = h
        st, text = _get(c, base + "/metrics", {"Accept": "text/plain"})
        if st == 200 and "vllm:" in text and kind in ("unknown", "twin"):
            if kind == "unknown":
                kind = "vllm"
                facts.update(parse_vllm_metrics(text))
                raw["metrics_vllm"] = {k: v for k, v in facts.items()}
            pc = prefix_cache_counters(text)
            if pc is not None:
                raw["prefix_cache"] = pc  # a run's hits: end minus start (simulator/runfolder.py)
            hist = histograms(text)
            if hist:
                raw["histograms"] = hist
        elif st == 200 and "llamacpp:" in text:
            kind = "llamacpp"
            run, wait = gauges(text)
            raw["metrics_llamacpp"] = {"requests_processing": run, "requests_deferred": wait}
        if kind in ("unknown", "llamacpp"):
            st, text = _get(c, base + "/props")
            props = _json(text) if st == 200 else None
            if isinstance(props, dict) and "total_slots" in props:
                kind = "llamacpp"
                raw["props"] = {k: props.get(k) for k in ("total_slots", "model_path", "build_info", "n_ctx")
                                if k in props}
                gen = props.get("default_generation_settings") or {}
                facts["total_slots"] = props.get("total_slots")
                n_ctx = gen.get("n_ctx", props.get("n_ctx"))
                if n_ctx is not None:
                    facts["n_ctx_per_slot"] = n_ctx
                st, text = _get(c, base + "/slots")
                slots = _json(text) if st == 200 else None
                if isinstance(slots, list):
                    raw["slots"] = [{k: s.get(k) for k in ("id", "n_ctx", "is_processing", "speculative", "id_task", "n_prompt_tokens")}
                                    for s in slots if isinstance(s, dict)][:256]
                    facts["slots_endpoint"] = True
                    if slots and isinstance(slots[0], dict) and "n_ctx" in slots[0]:
                        facts["n_ctx_per_slot"] = slots[0]["n_ctx"]
        if kind == "unknown":
            st, text = _get(c, base + "/api/version")
            v = _json(text) if st == 200 else None
            if isinstance(v, dict) and "version" in v:
                kind = "ollama"
                raw["version"] = v
                st, text = _get(c, base + "/api/ps")
                ps = _json(text) if st == 200 else None
                if isinstance(ps, dict):
                    raw["ps"] = ps
                    for m in ps.get("models") or []:
                        if isinstance(m, dict) and m.get("context_length"):
                            facts["context_length"] = m["context_length"]
                if model:
                    try:
                        r = c.post(base + "/api/show", json={"model": model})
                        show = r.json() if r.status_code == 200 else None
                    except (httpx.HTTPError, ValueError, OSError):
                        show = None
                    if isinstance(show, dict):
                        raw["show"] = {k: show.get(k) for k in ("details", "model_info", "parameters") if k in show}
        st, text = _get(c, base + "/v1/models")
        models = _json(text) if st == 200 else None
        if isinstance(models, dict) and isinstance(models.get("data"), list):
            raw["models"] = [{k: m.get(k) for k in ("id", "max_model_len", "owned_by") if k in m}
                             for m in models["data"][:64] if isinstance(m, dict)]
            lens = [m.get("max_model_len") for m in models["data"] if isinstance(m, dict) and m.get("max_model_len")]
            if lens:
                facts["max_model_len"] = lens[0]
            if kind == "unknown":
                kind = "openai"
    return {"kind": kind, "facts": facts, "raw": raw}


async def sample(session, base_url: str, kind: str, t0: float, out: list, stop, period: float = 1.0):
    """Append (t_s, running, waiting) about every `period` seconds until `stop` is set: vLLM and
    llama.cpp /metrics gauges, else llama.cpp /slots (running only), else the twin's /queue/status."""
    base = base_url.rstrip("/")
    if kind in ("vllm", "llamacpp"):
        url = base + "/metrics"
    elif kind == "twin":
        url = base + "/queue/status"
    else:
        return
    slots_url = base + "/slots" if kind == "llamacpp" else None
    tmo = aiohttp.ClientTimeout(total=min(period, 2.0))
    nxt = perf_counter()
    while not stop.is_set():
        t = perf_counter() - t0
        run = wait = None
        try:
            async with session.get(url, timeout=tmo) as r:
                body = await r.content.read(MAX_BODY) if r.status == 200 else b""
            if kind == "twin":
                q = _json(body)
                if isinstance(q, dict):
                    run, wait = _twin_counts(q)
            else:
                run, wait = gauges(body)
                if run is None and slots_url:
                    async with session.get(slots_url, timeout=tmo) as r:
                        s = _json(await r.content.read(MAX_BODY)) if r.status == 200 else None
                    if isinstance(s, list):
                        run = sum(1 for x in s if isinstance(x, dict) and x.get("is_processing"))
        except Exception:  # noqa: BLE001 - a missed sample (timeout, refused, bad body), not a failed run
            pass
        if run is not None or wait is not None:
            out.append((round(t, 6), run, wait))
        nxt += period
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, nxt - perf_counter()))
        except asyncio.TimeoutError:
            pass


def _twin_counts(q: dict):
    run = wait = None
    for k in ("running", "num_running", "in_engine"):
        if isinstance(q.get(k), int):
            run = q[k]
            break
    for k in ("waiting", "queued", "num_waiting", "queue_depth", "depth"):
        if isinstance(q.get(k), int):
            wait = q[k]
            break
    return run, wait
