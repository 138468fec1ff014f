"""Request bodies of each API -> one `Call`, or a 400 naming the field.

Prompt tokens are counted as whitespace-separated words (the stress tester's synthetic prompts are
one token per word), token-id lists count one per id, and an `X-Prompt-Tokens` header overrides
both. Output length is the requested maximum (max_tokens, max_completion_tokens, n_predict,
options.num_predict, max_output_tokens, max_new_tokens), else the model's default_max_tokens:
the twin always behaves as if `ignore_eos` were set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tenancy import HTTPProblem

# Largest token count or priority a request may carry: far beyond any model, and well inside SQLite's
# and numpy's 64-bit integers (2**63 in max_tokens once killed the usage writer and leaked queue slots).
MAX_INT = 2**31 - 1


@dataclass
class Call:
    api: str
    model: object
    words: list = field(default_factory=list)  # prompt text split into words (token stand-ins)
    token_ids: int = 0  # prompts sent as token ids: their count
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def counted_tokens(self) -> int:
        return max(1, len(self.words) + self.token_ids)


def bad(msg: str, param: str | None = None) -> HTTPProblem:
    return HTTPProblem(400, msg, param=param)


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{key} must be a boolean", key)
    return v


def _positive(obj: dict, key: str, where: str, unlimited: tuple = ()) -> int | None:
    """A positive integer field; values in `unlimited` (llama.cpp/Ollama's -1) mean 'model default'."""
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{where} must be an integer", where)
    if v in unlimited:
        return None
    if not 0 < v <= MAX_INT:
        raise bad(f"{where} must be an integer in 1..{MAX_INT}", where)
    return v


def _first(*vals):
    return next((v for v in vals if v is not None), None)


def _content_words(content, where: str) -> list:
    if content is None:
        return []
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                out += part.split()
            elif isinstance(part, dict):
                t = part.get("text")
                if t is not None and not isinstance(t, str):
                    raise bad(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
                out += (t or "").split()
            else:
                raise bad(f"{where}[{j}] must be a string or an object", f"{where}[{j}]")
        return out
    raise bad(f"{where} must be a string or a list of parts", where)


def _messages(body: dict, key: str = "messages") -> list:
    msgs = body.get(key)
    if msgs is None:
        raise bad(f"missing '{key}'", key)
    if not isinstance(msgs, list) or not msgs:
        raise bad(f"'{key}' must be a non-empty list", key)
    words = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"{key}[{i}] must be an object", f"{key}[{i}]")
        if not isinstance(m.get("role"), str):
            raise bad(f"{key}[{i}].role must be a string", f"{key}[{i}].role")
        words += _content_words(m.get("content"), f"{key}[{i}].content")
    return words


def _prompt(body: dict, key: str = "prompt") -> tuple[list, int]:
    """A prompt as text, as a list of token ids, or as a one-element list of either."""
    p = body.get(key)
    if p is None:
        raise bad(f"missing '{key}'", key)
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # OpenAI allows a batch of prompts; one is all the twin takes
    if isinstance(p, str):
        if not p.strip():
            raise bad(f"'{key}' is empty", key)
        return p.split(), 0
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [], len(p)
    raise bad(f"'{key}' must be a non-empty string or a list of token ids (one prompt per request)", key)


def _openai_common(body: dict, call: Call) -> Call:
    n = body.get("n", 1)
    if n != 1:
        raise bad("only n=1 is supported", "n")
    call.max_tokens = _first(_positive(body, "max_completion_tokens", "max_completion_tokens"),
                             _positive(body, "max_tokens", "max_tokens"))
    call.stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("stream_options must be an object", "stream_options")
        call.include_usage = _bool(so, "include_usage", False)
    return call


def openai_chat(body: dict) -> Call:
    return _openai_common(body, Call("openai-chat", body.get("model"), words=_messages(body)))


def openai_completions(body: dict) -> Call:
    words, ids = _prompt(body)
    return _openai_common(body, Call("openai-completions", body.get("model"), words=words, token_ids=ids))


def _ollama_options(body: dict) -> int | None:
    opts = body.get("options")
    if opts is None:
        return None
    if not isinstance(opts, dict):
        raise bad("options must be an object", "options")
    return _positive(opts, "num_predict", "options.num_predict", unlimited=(-1, -2))


def ollama_chat(body: dict) -> Call:
    return Call("ollama-chat", body.get("model"), words=_messages(body),
                max_tokens=_ollama_options(body), stream=_bool(body, "stream", True))


def ollama_generate(body: dict) -> Call:
    words, ids = _prompt(body)
    return Call("ollama-generate", body.get("model"), words=words, token_ids=ids,
                max_tokens=_ollama_options(body), stream=_bool(body, "stream", True))


def llamacpp(body: dict) -> Call:
    words, ids = _prompt(body)
    return Call("llamacpp", body.get("model"), words=words, token_ids=ids,
                max_tokens=_positive(body, "n_predict", "n_predict", unlimited=(-1, -2)),
                stream=_bool(body, "stream", False))


def responses(body: dict) -> Call:
    inp = body.get("input")
    if inp is None:
        raise bad("missing 'input'", "input")
    if isinstance(inp, str):
        if not inp.strip():
            raise bad("'input' is empty", "input")
        words = inp.split()
    elif isinstance(inp, list) and inp:
        words = []
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise bad(f"input[{i}] must be an object", f"input[{i}]")
            words += _content_words(item.get("content"), f"input[{i}].content")
    else:
        raise bad("'input' must be a string or a non-empty list of items", "input")
    return Call("responses", body.get("model"), words=words,
                max_tokens=_positive(body, "max_output_tokens", "max_output_tokens"),
                stream=_bool(body, "stream", False))


def queue(body: dict) -> Call:
    words, ids = (_messages(body), 0) if "messages" in body else _prompt(body)
    mx = _first(_positive(body, "max_tokens", "max_tokens"), _positive(body, "max_new_tokens", "max_new_tokens"))
    return Call("queue", body.get("model"), words=words, token_ids=ids, max_tokens=mx)


PARSERS = {"openai-chat": openai_chat, "openai-completions": openai_completions, "ollama-chat": ollama_chat,
           "ollama-generate": ollama_generate, "llamacpp": llamacpp, "responses": responses, "queue": queue}


def _header_int(headers, name: str) -> int | None:
    v = headers.get(name)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 0 < n <= 10_000_000:
        raise bad(f"{name} must be a positive integer", name)
    return n


def hints(headers) -> tuple[int | None, int | None]:
    """Client hints only the twin reads (the stress tester sends them; real servers ignore them):
    X-Prompt-Tokens, the exact prompt length; X-Requested-Max-Tokens, the max_tokens the scenario's
    request asked for when the body carries its natural output length instead. With both, the
    gateway caps and the quota reservation see what the simulator's gateway sees."""
    return _header_int(headers, "X-Prompt-Tokens"), _header_int(headers, "X-Requested-Max-Tokens")
