"""Response framing of each API the twin speaks, built from a ticket (one request in flight).

One encoder object per request: streaming ones pre-render the constant parts of a token chunk
once, so each token costs one bytes concatenation. Token i is a short word (" w" after the first):
the twin has no model, only timing.
"""
from __future__ import annotations

import json
import time

WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "sed", "do", "tempor", "ut", "labore", "et", "magna",
         "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud", "ullamco")
_FIRST = [json.dumps(w).encode() for w in WORDS]
_REST = [json.dumps(" " + w).encode() for w in WORDS]


def token_json(i: int) -> bytes:
    return (_REST if i else _FIRST)[i % len(WORDS)]


def text(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def _dumps(o) -> bytes:
    return json.dumps(o, separators=(",", ":")).encode()


def _ns(s) -> int:
    return int(round(max(s or 0.0, 0.0) * 1e9))


def openai_error(status: int, message: str, type_: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code if code is not None else status}}


class Encoder:
    content_type = "text/event-stream"

    def __init__(self, t):
        self.t = t

    def head(self) -> bytes:
        return b""

    def chunk(self, i: int, j: int) -> bytes:
        raise NotImplementedError

    def tail(self) -> bytes:
        return b""

    def fail(self, status: int, message: str, type_: str) -> bytes:
        return b"data: " + _dumps(openai_error(status, message, type_)) + b"\n\n"

    def whole(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def error_body(status: int, message: str, type_: str, code=None, param=None) -> dict:
        return openai_error(status, message, type_, code, param)


class _SSE(Encoder):
    """OpenAI-style `data: {...}` chunks with constant head and tail around the token."""
    pre = post = b""

    def chunk(self, i, j):
        pre, post = self.pre, self.post
        return b"".join(pre + token_json(k) + post for k in range(i, j))


class OpenAIChat(_SSE):
    obj, prefix = "chat.completion.chunk", "chatcmpl-"

    def __init__(self, t):
        super().__init__(t)
        self.base = {"id": self.prefix + t.id, "object": self.obj, "created": t.created, "model": t.model}
        b = _dumps(self.base)[:-1]
        self.pre = b"data: " + b + b',"choices":[{"index":0,"delta":{"content":'
        self.post = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def head(self):
        return b"data: " + _dumps({**self.base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                               "logprobs": None, "finish_reason": None}]}) + b"\n\n"

    def _final_choice(self):
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": self.t.finish_reason()}

    def tail(self):
        out = b"data: " + _dumps({**self.base, "choices": [self._final_choice()]}) + b"\n\n"
        if self.t.call.include_usage:
            out += b"data: " + _dumps({**self.base, "choices": [], "usage": self.t.usage()}) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def whole(self):
        return {"id": self.prefix + self.t.id, "object": "chat.completion", "created": self.t.created, "model": self.t.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text(self.t.generated)},
                             "logprobs": None, "finish_reason": self.t.finish_reason()}],
                "usage": self.t.usage()}


class OpenAICompletions(OpenAIChat):
    obj, prefix = "text_completion", "cmpl-"

    def __init__(self, t):
        super().__init__(t)
        self.pre = b"data: " + _dumps(self.base)[:-1] + b',"choices":[{"index":0,"text":'
        self.post = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def head(self):
        return b""

    def _final_choice(self):
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": self.t.finish_reason()}

    def whole(self):
        return {"id": self.prefix + self.t.id, "object": "text_completion", "created": self.t.created, "model": self.t.model,
                "choices": [{"index": 0, "text": text(self.t.generated), "logprobs": None,
                             "finish_reason": self.t.finish_reason()}],
                "usage": self.t.usage()}


class OllamaChat(Encoder):
    content_type = "application/x-ndjson"
    field = "message"

    def __init__(self, t):
        super().__init__(t)
        head = _dumps({"model": t.model, "created_at": t.created_iso})[:-1]
        if self.field == "message":
            self.pre = head + b',"message":{"role":"assistant","content":'
            self.post = b'},"done":false}\n'
        else:
            self.pre = head + b',"response":'
            self.post = b',"done":false}\n'

    def chunk(self, i, j):
        return b"".join(self.pre + token_json(k) + self.post for k in range(i, j))

    def _body(self, content: str) -> dict:
        t, r = self.t, self.t.req
        ttft = (r.first_token - r.arrival) if r.first_token is not None else 0.0
        decode = (r.last_token - r.first_token) if r.first_token is not None else 0.0
        body = {"model": t.model, "created_at": t.created_iso}
        body[self.field] = {"role": "assistant", "content": content} if self.field == "message" else content
        body.update({"done": True, "done_reason": self.t.finish_reason(), "total_duration": _ns((r.end or r.arrival) - r.arrival),
                     "load_duration": 0, "prompt_eval_count": r.prompt, "prompt_eval_duration": _ns(ttft),
                     "eval_count": r.generated, "eval_duration": _ns(decode)})
        return body

    def tail(self):
        return _dumps(self._body("")) + b"\n"

    def fail(self, status, message, type_):
        return _dumps({"error": message}) + b"\n"

    def whole(self):
        return self._body(text(self.t.generated))

    @staticmethod
    def error_body(status, message, type_, code=None, param=None):
        return {"error": message}  # Ollama's own shape: a string


class OllamaGenerate(OllamaChat):
    field = "response"


class LlamaCpp(_SSE):
    def __init__(self, t):
        super().__init__(t)
        self.pre = b'data: {"index":0,"content":'
        self.post = b',"stop":false}\n\n'

    def _final(self, content: str) -> dict:
        r = self.t.req
        prompt_ms = ((r.first_token - r.arrival) * 1000) if r.first_token is not None else 0.0
        pred_ms = ((r.last_token - r.first_token) * 1000) if r.first_token is not None else 0.0
        n = r.generated
        return {"index": 0, "content": content, "stop": True, "model": self.t.model, "tokens_predicted": n,
                "tokens_evaluated": r.prompt, "truncated": False,
                "stop_type": "eos" if self.t.finish_reason() == "stop" else "limit",
                "timings": {"prompt_n": r.prompt, "prompt_ms": round(prompt_ms, 3),
                            "predicted_n": n, "predicted_ms": round(pred_ms, 3),
                            "predicted_per_token_ms": round(pred_ms / (n - 1), 3) if n > 1 else None,
                            "predicted_per_second": round((n - 1) * 1000 / pred_ms, 3) if n > 1 and pred_ms > 0 else None}}

    def tail(self):
        return b"data: " + _dumps(self._final("")) + b"\n\n"

    def whole(self):
        return self._final(text(self.t.generated))


class Responses(Encoder):
    """OpenAI's Responses API. A stream is the event sequence the openai SDK's `responses.stream()`
    checks: created, in_progress, output_item.added, content_part.added, output_text.delta...,
    output_text.done, content_part.done, output_item.done, then completed (or `incomplete` with
    reason max_output_tokens when a cap cut the answer, as OpenAI does), each with its sequence_number."""

    def __init__(self, t):
        super().__init__(t)
        self.rid, self.item = "resp_" + t.id, "msg_" + t.id
        self.pre = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","item_id":"'
                    + self.item.encode() + b'","output_index":0,"content_index":0,"logprobs":[],"sequence_number":')
        self.seq = -1

    def _event(self, name: str, payload: dict) -> bytes:
        self.seq += 1
        return b"event: " + name.encode() + b"\ndata: " + _dumps({"type": name, "sequence_number": self.seq, **payload}) + b"\n\n"

    def _part(self, content: str) -> dict:
        return {"type": "output_text", "text": content, "annotations": [], "logprobs": []}

    def _message(self, status: str, content: str | None) -> dict:
        return {"id": self.item, "type": "message", "role": "assistant", "status": status,
                "content": [] if content is None else [self._part(content)]}

    def _status(self) -> str:
        return "completed" if self.t.finish_reason() == "stop" else "incomplete"

    def _response(self, status: str, content: str | None, usage: bool) -> dict:
        t = self.t
        u = t.usage()
        return {"id": self.rid, "object": "response", "created_at": t.created, "status": status, "model": t.model,
                "output": [] if content is None else [self._message("completed", content)],
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": None, "metadata": {}, "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
                "temperature": 1.0, "top_p": 1.0, "max_output_tokens": t.call.max_tokens, "previous_response_id": None,
                "text": {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": t.req.cached,
                                                                                "cache_write_tokens": 0},
                          "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": u["total_tokens"]} if usage else None}

    def head(self):
        r = self._response("in_progress", None, False)
        where = {"output_index": 0, "item_id": self.item, "content_index": 0}
        return (self._event("response.created", {"response": r}) + self._event("response.in_progress", {"response": r})
                + self._event("response.output_item.added", {"output_index": 0, "item": self._message("in_progress", None)})
                + self._event("response.content_part.added", {**where, "part": self._part("")}))

    def chunk(self, i, j):
        parts = []
        for k in range(i, j):
            self.seq += 1
            parts.append(self.pre + str(self.seq).encode() + b',"delta":' + token_json(k) + b"}\n\n")
        return b"".join(parts)

    def tail(self):
        full = text(self.t.generated)
        where = {"output_index": 0, "item_id": self.item, "content_index": 0}
        st = self._status()
        return (self._event("response.output_text.done", {**where, "text": full, "logprobs": []})
                + self._event("response.content_part.done", {**where, "part": self._part(full)})
                + self._event("response.output_item.done", {"output_index": 0, "item": self._message("completed", full)})
                + self._event(f"response.{st}", {"response": self._response(st, full, True)}))

    def fail(self, status, message, type_):
        r = self._response("failed", None, False)
        r["error"] = {"code": type_, "message": message}
        return self._event("response.failed", {"response": r})

    def whole(self):
        return self._response(self._status(), text(self.t.generated), True)


ENCODERS = {"openai-chat": OpenAIChat, "openai-completions": OpenAICompletions, "ollama-chat": OllamaChat,
            "ollama-generate": OllamaGenerate, "llamacpp": LlamaCpp, "responses": Responses, "queue": Encoder}


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1e6):06d}Z"
