"""API dialects: how to ask each kind of server for a request of a given length, and how to read its answer.

A dialect builds the request body and reads one decoded streamed event (or one whole JSON answer)
into token counts and the server's reported usage. Framing (SSE lines, NDJSON lines), timing and
error classification live in client.py, so these classes stay small and free of I/O.

Output length is forced wherever the API has a knob for it, so the server generates the length the
scenario drew instead of stopping at an end-of-sequence token of the synthetic prompt.
"""
from __future__ import annotations


class StreamError(Exception):
    """The server's stream said something we cannot take as tokens (an error event, a wrong shape)."""


# Fields only vLLM-family servers accept (transformers `serve` answers 422 "Unexpected fields", OpenAI
# proper 400 "Unrecognized request argument"): a 400/422 naming one of them turns them off (client.py).
EXTENSION_FIELDS = ("ignore_eos", "min_tokens", "continuous_usage_stats")


def count(value, what: str):
    """A token count as the server reported it: None when absent, else a non-negative int (bool is not
    one, nor 3.0); anything else is a malformed answer for this request, never a crash later on."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise StreamError(f"malformed {what}: {str(value)[:40]!r}")
    return value


class Dialect:
    name = ""
    path = ""
    framing = "sse"  # or "ndjson"
    # vLLM/SGLang/llama.cpp accept these; OpenAI proper rejects unknown fields, hence --no-extensions
    extensions = True
    # vLLM only: usage on every chunk (stream_options.continuous_usage_stats), so each chunk's token count
    # is exact even when the server merges several tokens into one chunk under load
    continuous_usage = False

    def body(self, model: str, prompt: str, n: int, stream: bool, user: str) -> dict:
        raise NotImplementedError

    def event(self, o: dict, job) -> int:
        """Tokens in one streamed event; sets job.usage / job.finish / job.complete when the event says so."""
        raise NotImplementedError

    def whole(self, o: dict, job) -> int:
        """Tokens in a non-streamed answer (sets job.usage and job.complete)."""
        raise NotImplementedError


def _error(o: dict):
    err = o.get("error")
    if err:
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise StreamError(f"server error in stream: {str(msg)[:160]}")


def _words(text) -> int:
    """Token estimate for a text when the server reports no usage (our prompts' words are one token each)."""
    return len(text.split()) if isinstance(text, str) else 0


class OpenAIChat(Dialect):
    name = "openai-chat"
    path = "/v1/chat/completions"

    def body(self, model, prompt, n, stream, user):
        b = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
             "stream": stream, "user": user}
        if stream:
            b["stream_options"] = {"include_usage": True}
            if self.extensions and self.continuous_usage:
                b["stream_options"]["continuous_usage_stats"] = True
        if self.extensions:
            b["ignore_eos"] = True
            b["min_tokens"] = n
        return b

    def text(self, choice):
        d = choice.get("delta")
        return d.get("content") if d else None

    def _usage(self, u, job):
        if not isinstance(u, dict):
            raise StreamError(f"malformed usage: {str(u)[:40]!r}")
        job.usage = count(u.get("completion_tokens"), "usage.completion_tokens")
        job.usage_prompt = count(u.get("prompt_tokens"), "usage.prompt_tokens")
        details = u.get("prompt_tokens_details")  # vLLM --enable-prompt-tokens-details, OpenAI: prefix-cache hits
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            job.usage_cached = count(details.get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens")

    def event(self, o, job):
        ch = o.get("choices")
        u = o.get("usage")
        n = 0
        if ch:
            c = ch[0]
            if not isinstance(c, dict):
                raise StreamError("choice is not an object")
            if u and job.cum is not None:  # continuous usage: the chunk's tokens, exactly
                before = job.cum
                self._usage(u, job)
                job.cum = job.usage
                n = job.usage - before if job.usage is not None and job.usage > before else 0
            else:
                n = 1 if self.text(c) else 0
                if u:  # usage on the last content chunk (transformers serve, some gateways)
                    self._usage(u, job)
            if c.get("finish_reason"):
                job.finish = str(c["finish_reason"])[:32]
        elif u:
            self._usage(u, job)
        elif "error" in o:
            _error(o)
        return n

    def whole(self, o, job):
        _error(o)
        ch = o.get("choices")
        if not isinstance(ch, list) or not ch or not isinstance(ch[0], dict):
            raise StreamError("answer has no choices")
        u = o.get("usage")
        if u is not None:
            self._usage(u, job)
        job.finish = str(ch[0].get("finish_reason") or "")[:32]
        job.complete = True
        return job.usage if job.usage is not None else _words(self.whole_text(ch[0]))

    def whole_text(self, choice):
        return (choice.get("message") or {}).get("content")


class OpenAICompletions(OpenAIChat):
    name = "openai-completions"
    path = "/v1/completions"

    def body(self, model, prompt, n, stream, user):
        b = super().body(model, prompt, n, stream, user)
        del b["messages"]
        b["prompt"] = prompt
        return b

    def text(self, choice):
        return choice.get("text")

    def whole_text(self, choice):
        return choice.get("text")


class OllamaChat(Dialect):
    name = "ollama-chat"
    path = "/api/chat"
    framing = "ndjson"

    def body(self, model, prompt, n, stream, user):
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream,
                "options": {"num_predict": n}}

    def text(self, o):
        m = o.get("message")
        return m.get("content") if isinstance(m, dict) else None

    def _final(self, o, job):
        job.complete = True
        job.usage = count(o.get("eval_count"), "eval_count")
        job.usage_prompt = count(o.get("prompt_eval_count"), "prompt_eval_count")
        job.finish = str(o.get("done_reason") or "")[:32]

    def event(self, o, job):
        if "error" in o:
            _error(o)
        if o.get("done"):
            self._final(o, job)
        return 1 if self.text(o) else 0

    def whole(self, o, job):
        _error(o)
        if not o.get("done"):
            raise StreamError("answer is not done")
        self._final(o, job)
        return job.usage if job.usage is not None else _words(self.text(o))


class OllamaGenerate(OllamaChat):
    name = "ollama-generate"
    path = "/api/generate"

    def body(self, model, prompt, n, stream, user):
        return {"model": model, "prompt": prompt, "stream": stream, "options": {"num_predict": n}}

    def text(self, o):
        return o.get("response")


class LlamaCpp(Dialect):
    """llama-server's native /completion. Every streamed event is one sampled token, also when its text
    is empty (a byte-fallback or padding token renders as ""), unless it lists its `tokens`; the final
    event (`stop: true`) carries none (tools/server/server.cpp, to_json_non_oaicompat_partial/final)."""
    name = "llamacpp"
    path = "/completion"

    def body(self, model, prompt, n, stream, user):
        b = {"prompt": prompt, "n_predict": n, "stream": stream}
        if self.extensions:
            b["ignore_eos"] = True
        return b

    def _final(self, o, job):
        job.complete = True
        u = o.get("tokens_predicted")
        timings = o.get("timings")
        if u is None and isinstance(timings, dict):
            u = timings.get("predicted_n")
        job.usage = count(u, "tokens_predicted")
        job.usage_prompt = count(o.get("tokens_evaluated"), "tokens_evaluated")
        if isinstance(timings, dict) and timings.get("cache_n") is not None:  # prompt tokens reused from the slot
            job.usage_cached = count(timings.get("cache_n"), "timings.cache_n")
        job.finish = str(o.get("stop_type") or "")[:32]
        slot = o.get("id_slot")  # the slot that ran it: its sequence id in every batch (server-context.cpp)
        if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < 1 << 20:
            job.slot = slot

    def event(self, o, job):
        if "error" in o:
            _error(o)
        toks = o.get("tokens")
        n = len(toks) if isinstance(toks, list) else None
        if o.get("stop"):
            self._final(o, job)
            return n or 0
        if n is not None:
            return n
        return 1 if "content" in o else 0

    def whole(self, o, job):
        _error(o)
        if "content" not in o:
            raise StreamError("answer has no content")
        self._final(o, job)
        return job.usage if job.usage is not None else _words(o.get("content"))


class Responses(Dialect):
    name = "responses"
    path = "/v1/responses"

    def body(self, model, prompt, n, stream, user):
        return {"model": model, "input": prompt, "max_output_tokens": n, "stream": stream, "user": user}

    def _final(self, r, job):
        job.complete = True
        u = (r or {}).get("usage") or {}
        if not isinstance(u, dict):
            raise StreamError(f"malformed usage: {str(u)[:40]!r}")
        job.usage = count(u.get("output_tokens"), "usage.output_tokens")
        job.usage_prompt = count(u.get("input_tokens"), "usage.input_tokens")
        job.finish = str((r or {}).get("status") or "")[:32]

    def event(self, o, job):
        t = o.get("type", "")
        if t == "response.output_text.delta":
            return 1 if o.get("delta") else 0
        if t in ("response.completed", "response.incomplete"):  # incomplete = stopped at max_output_tokens
            self._final(o.get("response"), job)
        elif t in ("response.failed", "error"):
            r = o.get("response") or o
            raise StreamError(f"server error in stream: {str(r.get('error') or r.get('message') or t)[:160]}")
        return 0

    def whole(self, o, job):
        _error(o)
        if o.get("status") not in ("completed", "incomplete"):
            raise StreamError(f"response status {o.get('status')!r}")
        self._final(o, job)
        if job.usage is not None:
            return job.usage
        text = " ".join(c.get("text", "") for item in o.get("output") or [] for c in item.get("content") or [])
        return _words(text)


class Queue(Dialect):
    """A queue-style gateway: POST /generate answers with an id, GET /requests/{id} until final.

    Token times are unobservable here except through polling: the first poll that shows progress (or
    the final answer) stands for the first token, so TTFT is accurate to one poll interval."""
    name = "queue"
    path = "/generate"
    status_path = "/requests/{id}"
    DONE = frozenset(("completed", "complete", "done", "succeeded", "success", "ok", "finished"))
    FAILED = frozenset(("failed", "error", "cancelled", "canceled", "rejected", "timeout", "timed_out", "expired"))

    def body(self, model, prompt, n, stream, user):
        return {"model": model, "prompt": prompt, "max_tokens": n, "user": user}

    @staticmethod
    def request_id(o: dict) -> str:
        rid = o.get("id", o.get("request_id"))
        if rid is None:
            raise StreamError("queue answer has no id")
        return str(rid)

    @staticmethod
    def progress(o: dict) -> int:
        for k in ("output_tokens", "generated_tokens", "tokens_generated", "completion_tokens"):
            v = o.get(k)
            if isinstance(v, int):
                return v
        u = o.get("usage")
        if isinstance(u, dict):
            v = u.get("completion_tokens", u.get("output_tokens"))
            if isinstance(v, int):
                return v
        return 0

    def state(self, o: dict) -> str:
        s = str(o.get("status", o.get("state", ""))).lower()
        return "done" if s in self.DONE else "failed" if s in self.FAILED else "pending"


DIALECTS = {d.name: d for d in (OpenAIChat, OpenAICompletions, OllamaChat, OllamaGenerate, LlamaCpp, Queue, Responses)}
