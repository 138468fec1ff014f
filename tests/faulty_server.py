"""A small aiohttp server speaking every dialect `stress run` knows, well or badly on request.

The first path segment picks the behaviour, so one server serves every test: a client pointed at
http://127.0.0.1:PORT/MODE sends POST /MODE/v1/chat/completions and so on.

MODE     behaviour
ok       a correct answer of exactly the requested length (streamed when asked), usage reported
slow     as ok, one token every 5 ms
nousage  as ok, without usage
reset    the connection is reset before any answer
stall    headers never come (past any client timeout)
stallmid headers and one token, then silence
malformed  SSE/NDJSON whose second event is not JSON
cut      a few tokens, then the TCP connection is dropped mid-chunk
short    a few tokens, then a clean end without the end-of-stream marker
garbage  bytes that are not HTTP
500 / 503 / 404  that status with a JSON error
429      429 with Retry-After: 0.05, every time
429once  429 with Retry-After: 0.05 on the first attempt of each X-Request-Id, then ok
         (429once-anything: the same with its own attempt counts)
strict   as transformers `serve` (OpenAI chat/completions): 422 "Unexpected fields" for ignore_eos/min_tokens;
         otherwise half the requested length (an end-of-sequence), finish_reason and usage, no `data: [DONE]`
badusage as ok, but usage.completion_tokens is `true`
absurd   as ok, but usage claims 99,999 completion tokens
longline a 9 MB SSE line that never ends
vllm     /vllm/metrics speaks vLLM's Prometheus names (cache_config_info, running/waiting gauges); OpenAI
         streams put 3 tokens in each chunk, with per-chunk usage when continuous_usage_stats is asked for

Requests are validated as strictly as a real server would (length knob, tenant headers), so an `ok`
outcome shows the client built the request right. Run as a script it prints `PORT <n>` and serves.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import time

from aiohttp import web

TOKEN = " the"
HEADERS = ("X-User", "X-Project", "X-Class", "X-Priority", "X-Prompt-Tokens")
attempts: dict[str, int] = {}
queue_jobs: dict[str, dict] = {}


def bad(msg, status=400):
    return web.json_response({"error": {"message": msg, "type": "invalid_request_error"}}, status=status)


def length(api, b):
    """The requested output length, checked the way each server family checks it."""
    if api in ("chat", "completions"):
        n = b.get("max_tokens")
        if b.get("ignore_eos") is not True or b.get("min_tokens") != n:
            return None, "ignore_eos/min_tokens missing"
        if b.get("stream") and (b.get("stream_options") or {}).get("include_usage") is not True:
            return None, "stream_options.include_usage missing"
        if not b.get("user"):
            return None, "user missing"
    elif api in ("ollama_chat", "ollama_generate"):
        n = (b.get("options") or {}).get("num_predict")
    elif api == "llamacpp":
        n = b.get("n_predict")
        if b.get("ignore_eos") is not True:
            return None, "ignore_eos missing"
    elif api == "responses":
        n = b.get("max_output_tokens")
    else:
        n = b.get("max_tokens")
    if not isinstance(n, int) or n < 1:
        return None, "no output length"
    if api in ("chat", "ollama_chat"):
        msgs = b.get("messages")
        if not (isinstance(msgs, list) and msgs and isinstance(msgs[0].get("content"), str)):
            return None, "messages missing"
    elif not isinstance(b.get("input" if api == "responses" else "prompt"), str):
        return None, "prompt missing"
    return n, ""


def events(api, n, usage=True, claim=None):
    """(content-type, list of frames) of a correct stream of n tokens (usage claims `claim` if given)."""
    c = n if claim is None else claim
    if api == "chat":
        frames = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        frames += [{"choices": [{"index": 0, "delta": {"content": TOKEN}, "finish_reason": None}]} for _ in range(n)]
        frames[-1]["choices"][0]["finish_reason"] = "length"
        if usage:
            frames.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": c}})
        return "sse", [b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]
    if api == "completions":
        frames = [{"choices": [{"index": 0, "text": TOKEN, "finish_reason": None}]} for _ in range(n)]
        if usage:
            frames.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": c}})
        return "sse", [b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]
    if api in ("ollama_chat", "ollama_generate"):
        key = (lambda t: {"message": {"role": "assistant", "content": t}}) if api == "ollama_chat" else (lambda t: {"response": t})
        frames = [{"model": "m", **key(TOKEN), "done": False} for _ in range(n)]
        last = {"model": "m", **key(""), "done": True, "done_reason": "length"}
        if usage:
            last["eval_count"] = c
        return "ndjson", [json.dumps(f).encode() + b"\n" for f in frames + [last]]
    if api == "llamacpp":
        frames = [{"content": TOKEN, "stop": False} for _ in range(n)]
        last = {"content": "", "stop": True}
        if usage:
            last["tokens_predicted"] = c
        return "sse", [b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames + [last]]
    if api == "responses":
        out = [(b"response.created", {"type": "response.created", "response": {"status": "in_progress"}})]
        out += [(b"response.output_text.delta", {"type": "response.output_text.delta", "delta": TOKEN}) for _ in range(n)]
        r = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
        if usage:
            r["usage"] = {"input_tokens": 1, "output_tokens": c}
        out.append((b"response.incomplete", {"type": "response.incomplete", "response": r}))
        return "sse", [b"event: " + e + b"\ndata: " + json.dumps(f).encode() + b"\n\n" for e, f in out]
    raise ValueError(api)


def whole(api, n, usage=True, claim=None):
    text = TOKEN * n
    c = n if claim is None else claim
    u = {"prompt_tokens": 1, "completion_tokens": c} if usage else None
    if api == "chat":
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                **({"usage": u} if u else {})}
    if api == "completions":
        return {"choices": [{"index": 0, "text": text, "finish_reason": "length"}], **({"usage": u} if u else {})}
    if api == "ollama_chat":
        return {"model": "m", "message": {"role": "assistant", "content": text}, "done": True, **({"eval_count": c} if usage else {})}
    if api == "ollama_generate":
        return {"model": "m", "response": text, "done": True, **({"eval_count": c} if usage else {})}
    if api == "llamacpp":
        return {"content": text, "stop": True, **({"tokens_predicted": c} if usage else {})}
    if api == "responses":
        return {"status": "incomplete", "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
                **({"usage": {"input_tokens": 1, "output_tokens": c}} if usage else {})}
    raise ValueError(api)


def rst(request):
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.close()


async def handle(request: web.Request, api: str):
    mode = request.match_info["mode"]
    rid = request.headers.get("X-Request-Id", "")
    if mode == "reset":
        rst(request)
        await asyncio.sleep(0.05)
        return web.Response()
    if mode == "garbage":
        request.transport.write(b"this is not HTTP at all\r\n\r\n")
        request.transport.close()
        await asyncio.sleep(0.05)
        return web.Response()
    if mode == "stall":
        await asyncio.sleep(30)
    if mode in ("500", "503", "404"):
        return bad(f"mode {mode}", int(mode))
    key = f"{mode}:{rid}"
    if mode == "429" or (mode.startswith("429once") and attempts.setdefault(key, 0) == 0):
        attempts[key] = attempts.get(key, 0) + 1
        return web.json_response({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "0.05"})
    missing = [h for h in HEADERS if not request.headers.get(h)]
    if missing:
        return bad(f"missing headers {missing}")
    try:
        b = await request.json()
    except json.JSONDecodeError:
        return bad("body is not JSON")
    if mode == "strict" and api in ("chat", "completions"):
        return await strict(request, api, b)
    if mode == "longline":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b"data: " + b"x" * (9 << 20))
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp
    n, why = length(api, b)
    if n is None:
        return bad(why)
    if mode == "vllm" and api in ("chat", "completions") and b.get("stream"):
        return await merged(request, api, b, n)
    usage = mode != "nousage"
    claim = {"badusage": True, "absurd": 99999}.get(mode)
    if api == "queue":
        qid = f"q{len(queue_jobs)}"
        queue_jobs[qid] = {"n": n, "t": time.monotonic(), "mode": mode}
        return web.json_response({"id": qid, "status": "queued"}, status=202)
    stream = b.get("stream", api in ("ollama_chat", "ollama_generate"))
    if not stream:
        return web.json_response(whole(api, n, usage, claim))
    kind, frames = events(api, n, usage, claim)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if kind == "sse" else "application/x-ndjson"})
    await resp.prepare(request)
    data = [f for f in frames if not f.startswith(b"event: response.created")]
    try:
        for i, f in enumerate(data):
            if mode == "malformed" and i == 1:
                f = b"data: {not json\n\n" if kind == "sse" else b"{not json\n"
            if mode in ("cut", "short", "stallmid") and i == 2:
                if mode == "cut":
                    rst(request)
                    return resp
                if mode == "stallmid":
                    await asyncio.sleep(30)
                break
            await resp.write(f)
            if mode == "slow" and i < n:
                await asyncio.sleep(0.005)
        await resp.write_eof()
    except ConnectionResetError:  # the client hung up (as it should on a malformed stream)
        pass
    return resp


def _sse(frames, done=True):
    return [b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames] + ([b"data: [DONE]\n\n"] if done else [])


def _choice(api, text, finish=None):
    c = {"index": 0, "finish_reason": finish}
    if api == "chat":
        c["delta"] = {"content": text}
    else:
        c["text"] = text
    return c


async def _send(request, frames):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for f in frames:
            await resp.write(f)
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp


async def strict(request, api, b):
    extra = sorted(k for k in ("ignore_eos", "min_tokens") if k in b)
    if extra:
        return web.json_response({"detail": f"Unexpected fields {set(extra)}"}, status=422)
    n = max(1, int(b.get("max_tokens") or 16) // 2)
    if not b.get("stream"):
        return web.json_response(whole(api, n) | {"choices": [{"index": 0, "finish_reason": "stop",
                                                              **({"message": {"role": "assistant", "content": TOKEN * n}}
                                                                 if api == "chat" else {"text": TOKEN * n})}]})
    frames = [{"choices": [_choice(api, TOKEN, "stop" if i == n - 1 else None)]} for i in range(n)]
    frames.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})
    return await _send(request, _sse(frames, done=False))


async def merged(request, api, b, n):
    cont = (b.get("stream_options") or {}).get("continuous_usage_stats") is True
    frames, k = [], 0
    while k < n:
        m = min(3, n - k)
        k += m
        f = {"choices": [_choice(api, TOKEN * m, "length" if k == n else None)]}
        if cont:
            f["usage"] = {"prompt_tokens": 1, "completion_tokens": k}
        frames.append(f)
    frames.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})
    return await _send(request, _sse(frames))


VLLM_METRICS = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="0",num_gpu_blocks="27000"} 1.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
"""


async def metrics(request: web.Request):
    if request.match_info["mode"] != "vllm":
        return web.Response(status=404)
    return web.Response(text=VLLM_METRICS, content_type="text/plain")


async def modelz(request: web.Request):
    if request.match_info["mode"] != "vllm":
        return web.Response(status=404)
    return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 8192}]})


async def queue_status(request: web.Request):
    job = queue_jobs.get(request.match_info["qid"])
    if job is None:
        return bad("unknown id", 404)
    done = time.monotonic() - job["t"] > 0.03
    st = {"id": request.match_info["qid"], "status": "completed" if done else "running",
          "output_tokens": job["n"] if done else 1}
    return web.json_response(st)


@contextlib.contextmanager
def running():
    """This server in a subprocess on a free 127.0.0.1 port; yields its base URL."""
    import subprocess
    proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(10)


def make_app() -> web.Application:
    app = web.Application()
    routes = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "ollama_chat": "/api/chat",
              "ollama_generate": "/api/generate", "llamacpp": "/completion", "responses": "/v1/responses",
              "queue": "/generate"}
    for api, path in routes.items():
        app.router.add_post("/{mode}" + path, lambda r, api=api: handle(r, api))
    app.router.add_get("/{mode}/requests/{qid}", queue_status)
    app.router.add_get("/{mode}/metrics", metrics)
    app.router.add_get("/{mode}/v1/models", modelz)
    return app


async def main(port: int = 0):
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
