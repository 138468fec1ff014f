"""The hot path: one HTTP exchange per request on a shared aiohttp session, timed on the monotonic clock.

Every time kept on a request is seconds since the run start (time.perf_counter() - t0). A read from
the socket is stamped once and every token in it gets that stamp, since they arrived together.
Whatever goes wrong (status, transport, stream shape) ends as one outcome and a one-line error on
the request; nothing here raises past `send` except cancellation, which the runner owns.
"""
from __future__ import annotations

import asyncio
import json
from array import array
from time import perf_counter

import aiohttp

from yarl import URL

from simulator.records import OUTCOMES, Request

from .dialects import EXTENSION_FIELDS, Queue, StreamError
from .prompts import prompt_text
from .tokens import TokenLog

try:  # optional: about 3x faster on the per-token parse, same errors (its JSONDecodeError is a ValueError)
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
PROMPT_MARK, LENGTH_MARK = "@@prompt@@", 987654321  # no real length or prompt contains these
LENGTH_TEXT = str(LENGTH_MARK)
_REJECTIONS = ("rejected_quota", "rejected_degraded", "rejected_queue_full", "rejected_rate_limited")
MAX_LINE = 8 << 20  # one SSE/NDJSON line; a server that sends more without a newline is malformed


class Job(Request):
    """A record under way, with what only a client sees."""
    __slots__ = ("usage", "usage_prompt", "usage_cached", "chunks", "tokens_n", "complete", "retries", "retry_after", "first_byte",
                 "finish", "cum", "closed_user", "plain_retry", "stale_conn", "slot")


def classify(status: int, text: str) -> str:
    """An error status (and its body) -> outcome. A gateway may name its reason in the body; the
    twin server does, with the simulator's outcome names."""
    if status in (429, 503):
        low = text.lower()
        for o in _REJECTIONS:
            if o in low:
                return o
        if status == 429:
            return "rejected_quota" if "quota" in low else "rejected_rate_limited"
        return "rejected_degraded" if "degrad" in low else "rejected_queue_full"
    return "http_error"


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: the caller's default wait applies


class Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, dialect, plan, t0: float, *,
                 model: str | None = None, no_stream: bool = False, retry: bool = False, max_retries: int = 3,
                 poll_s: float = 0.02, word: str = " the", salt: str = ""):
        self.session, self.dialect, self.plan, self.t0 = session, dialect, plan, t0
        self.base = base_url.rstrip("/")
        self.url = URL(self.base + dialect.path)  # parsed once: aiohttp skips parsing a URL object
        self.model, self.no_stream, self.word, self.salt = model, no_stream, word, salt
        self.retry, self.max_retries, self.poll_s = retry, max_retries, poll_s
        self.itl = array("d")  # pooled inter-token gaps of ok requests
        self.timeouts = [aiohttp.ClientTimeout(total=c.timeout) for c in plan.classes]
        self.sse = dialect.framing == "sse"
        self.retries = 0
        self.templates: dict = {}
        self.tokens = TokenLog()  # per-chunk arrivals (request, time, tokens), flushed to disk by the runner
        self.notes: list = []  # said once in the report (e.g. extension fields turned off)
        self.counts = {"usage_exceeds_max_tokens": 0, "output_length_differs": 0}
        self.stale_resends = 0  # requests sent again after a reused connection turned out closed

    # ------------------------------------------------------------------ one request
    def template(self, ci: int, stream: bool) -> str:
        """The class's request body as JSON with marks for the prompt and the length: serializing once
        per class and substituting per request costs a tenth of json.dumps on the hot path. Safe because
        synthetic prompts are plain ASCII words and digits, which JSON needs no escapes for."""
        info = self.plan.classes[ci]
        t = json.dumps(self.dialect.body(self.model or info.model, PROMPT_MARK, LENGTH_MARK, stream, info.user))
        self.templates[(ci, stream)] = t
        return t

    def prepare(self, job: Job):
        info = self.plan.classes[job.cls]
        text = prompt_text(job.prompt, job.rid, job.prefix_hashes, info.prefix_tokens, self.word, self.salt)
        stream = info.stream and not self.no_stream
        job.stream = stream  # as sent (--no-stream overrides the class)
        job.cum = 0 if stream and self.dialect.extensions and self.dialect.continuous_usage else None
        t = self.templates.get((job.cls, stream)) or self.template(job.cls, stream)
        body = t.replace(PROMPT_MARK, text).replace(LENGTH_TEXT, str(job.applied_max)).encode()
        h = info.headers.copy()
        h["X-Prompt-Tokens"] = str(job.prompt)
        h["X-Requested-Max-Tokens"] = str(job.requested_max)
        h["X-Request-Id"] = str(job.rid)
        return body, h, stream

    async def send(self, job: Job) -> None:
        """All attempts of one request; job.arrival is the first send."""
        body, h, stream = self.prepare(job)
        job.arrival = perf_counter() - self.t0
        exchange = self.queue_exchange if isinstance(self.dialect, Queue) else self.exchange
        stale = 0
        while True:
            await exchange(job, body, h, stream)
            if job.outcome == "connection_error" and job.stale_conn and stale < 2:
                # a kept-alive connection the server had closed (llama-server drops idle ones while busy): the
                # request never reached it, so it goes again at once on another connection
                stale += 1
                self.stale_resends += 1
                self.reset(job)
                job.arrival = perf_counter() - self.t0
                continue
            if job.plain_retry:  # the server refused vLLM's extension fields: the same request without them
                job.plain_retry = False  # once
                self.reset(job)
                body, h, stream = self.prepare(job)
                job.arrival = perf_counter() - self.t0
                continue
            if not (self.retry and job.outcome in ("rejected_rate_limited", "rejected_queue_full")
                    and job.retries < self.max_retries):
                return
            wait = job.retry_after if job.retry_after is not None else 0.5 * 2 ** job.retries
            now = perf_counter() - self.t0
            if now + wait >= job.arrival + job.timeout:
                return  # the answer would come after the client gave up anyway
            await asyncio.sleep(wait)
            job.retries += 1
            self.retries += 1
            self.reset(job)

    @staticmethod
    def reset(job: Job) -> None:
        job.outcome, job.error, job.http_status, job.retry_after = None, "", 0, None
        job.stale_conn = False
        job.usage = job.usage_prompt = job.usage_cached = job.slot = None
        job.finish = ""

    def left(self, job: Job) -> float:
        """Time the client still waits for this request: timeout_s counts from the first send, retries included."""
        return max(1e-3, job.arrival + job.timeout - (perf_counter() - self.t0))

    async def exchange(self, job: Job, body: bytes, h: dict, stream: bool) -> None:
        t0 = self.t0
        try:
            tmo = self.timeouts[job.cls] if not job.retries else aiohttp.ClientTimeout(total=self.left(job))
            async with self.session.post(self.url, data=body, headers=h, timeout=tmo, allow_redirects=False) as resp:
                job.first_byte = perf_counter() - t0  # the status line and headers are in
                job.http_status = st = resp.status
                if st >= 300:
                    await self.reject(job, resp)
                    return
                if stream:
                    await self.read_stream(job, resp)
                else:
                    raw = await resp.read()
                    now = perf_counter() - t0
                    o = _loads(raw)
                    if not isinstance(o, dict):
                        raise StreamError("answer is not a JSON object")
                    job.chunks = 1
                    job.tokens_n = self.dialect.whole(o, job)  # usage if reported, else an estimate from the text
                    job.first_token = job.last_token = now
                    self.tokens.add(job.rid, now, job.tokens_n)
            self.complete(job)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.failed(job, exc)

    async def read_stream(self, job: Job, resp) -> None:
        """Lines are cut only where a newline arrived, and each byte is joined into a line once: linear
        in the stream's size however the server splits it. A chunk of k tokens after a gap g adds the gap
        g and k - 1 zero gaps to ITL (its tokens arrived together), so gaps sum to E2E - TTFT."""
        t0, ev, sse = self.t0, self.dialect.event, self.sse
        log = self.tokens
        rid = job.rid
        gaps = []
        pending: list = []
        plen = 0
        last = None
        mx = 0.0
        chunks = ntok = 0

        def got(n, now):  # n tokens in at `now`: their gaps, the token log
            nonlocal last, mx, ntok
            if last is None:
                job.first_token = now
            else:
                g = now - last
                gaps.append(g)
                if g > mx:
                    mx = g
            if n > 1:
                gaps.extend([0.0] * (n - 1))
            last = now
            ntok += n
            log.add(rid, now, n)

        def take(obj, now):
            nonlocal chunks
            n = ev(obj, job)
            if n:
                got(n, now)
                chunks += 1
        try:
            async for data in resp.content.iter_any():
                if b"\n" not in data:
                    pending.append(data)
                    plen += len(data)
                    if plen > MAX_LINE:
                        raise StreamError(f"a line of over {MAX_LINE} bytes without a newline")
                    continue
                now = perf_counter() - t0
                if pending:
                    pending.append(data)
                    data = b"".join(pending)
                    pending.clear()
                lines = data.split(b"\n")
                tail = lines.pop()
                plen = len(tail)
                if tail:
                    pending.append(tail)
                    if plen > MAX_LINE:
                        raise StreamError(f"a line of over {MAX_LINE} bytes without a newline")
                for ln in lines:
                    if sse:
                        if not ln.startswith(b"data:"):
                            continue  # blank separators, `event:` names (repeated in the data), comments
                        ln = ln[5:].strip()
                        if ln == b"[DONE]":
                            job.complete = True
                            continue
                    elif not ln.strip():
                        continue
                    take(_loads(ln), now)
            if pending and not sse:  # NDJSON whose last line has no newline
                ln = b"".join(pending)
                if ln.strip():
                    take(_loads(ln), perf_counter() - t0)
        finally:  # what arrived before a failure still counts as received
            job.chunks, job.tokens_n, job.last_token, job.itl_max = chunks, ntok, last, mx
        if not job.complete and (job.finish or job.usage is not None):
            job.complete = True  # a clean end after a finish_reason or usage, without `data: [DONE]` (transformers serve)
        if not job.complete:
            raise StreamError(f"stream ended before completion after {ntok} token(s)")
        u = job.usage
        if u is not None and ntok < u <= job.applied_max:
            # tokens the server counted but never showed as text (empty-text tokens, a final chunk of several):
            # they had arrived by the last event, so they take its time (zero gaps after it)
            got(u - ntok, perf_counter() - t0)
            job.last_token, job.tokens_n = last, ntok
        if gaps:
            self.itl.fromlist(gaps)

    async def queue_exchange(self, job: Job, body: bytes, h: dict, stream: bool) -> None:
        d, t0, poll = self.dialect, self.t0, self.poll_s
        sess = self.session
        try:
            async with asyncio.timeout(self.left(job)):
                async with sess.post(self.url, data=body, headers=h, allow_redirects=False) as resp:
                    job.first_byte = perf_counter() - t0
                    job.http_status = resp.status
                    if resp.status >= 300:
                        await self.reject(job, resp)
                        return
                    o = _loads(await resp.read())
                if not isinstance(o, dict):
                    raise StreamError("queue answer is not a JSON object")
                url = self.base + d.status_path.format(id=d.request_id(o))
                state = d.state(o)
                while state == "pending":
                    if job.first_token is None and d.progress(o) > 0:
                        job.first_token = perf_counter() - t0
                    await asyncio.sleep(poll)
                    async with sess.get(url, headers=h, allow_redirects=False) as resp:
                        job.http_status = resp.status  # the last answer's: 200 once done, 202 only if never polled
                        if resp.status >= 300:
                            await self.reject(job, resp)
                            return
                        o = _loads(await resp.read())
                    if not isinstance(o, dict):
                        raise StreamError("queue status is not a JSON object")
                    state = d.state(o)
                now = perf_counter() - t0
                if state == "failed":
                    out = o.get("outcome")
                    job.outcome = out if out in OUTCOMES and out != "ok" else "http_error"
                    job.error = one_line(f"queue: {o.get('status')}: {o.get('error', '')}")
                    job.end = now
                    return
                job.usage = d.progress(o)
                job.chunks = 1
                job.tokens_n = job.usage
                job.complete = True
                if job.first_token is None:
                    job.first_token = now
                job.last_token = now
            self.complete(job)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.failed(job, exc)

    # ------------------------------------------------------------------ endings
    def complete(self, job: Job) -> None:
        u = job.usage
        if u is not None and u > job.applied_max:
            self.counts["usage_exceeds_max_tokens"] += 1
            raise StreamError(f"server reports {u} output tokens for max_tokens {job.applied_max}")
        job.generated = u if u is not None else (job.tokens_n or 0)
        if job.generated != job.applied_max:
            self.counts["output_length_differs"] += 1
        if job.last_token is None:  # a complete answer without any text: its end is its only token time
            job.first_token = job.last_token = perf_counter() - self.t0
        job.end = job.last_token
        job.outcome = "ok"

    async def reject(self, job: Job, resp) -> None:
        try:
            text = (await resp.content.read(4096)).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the status alone decides
            text = ""
        job.end = perf_counter() - self.t0
        job.outcome = classify(resp.status, text)
        job.error = one_line(f"HTTP {resp.status}: {text}")
        job.retry_after = retry_after(resp.headers.get("Retry-After"))
        if resp.status in (400, 422) and job.plain_retry is None:
            self.refused_fields(job, resp.status, text)

    def refused_fields(self, job: Job, status: int, text: str) -> None:
        """A 400/422 naming vLLM's extension fields: turn them off for the rest of the run (said once in
        the report) and send this request again without them (once)."""
        d = self.dialect
        named = [f for f in EXTENSION_FIELDS if f in text]
        if not named:
            return
        if d.extensions:
            if named == ["continuous_usage_stats"]:
                if not d.continuous_usage:
                    return
                d.continuous_usage, what = False, "stream_options.continuous_usage_stats"
            else:
                d.extensions, what = False, "ignore_eos/min_tokens"
            self.templates.clear()
            self.notes.append(f"the server refused {what} (HTTP {status}: {one_line(text, 120)}); sent without "
                              f"them from request {job.rid} on" + ("" if d.extensions else
                              ": output lengths are the server's choice up to max_tokens (output_length_differs)"))
        job.plain_retry = True

    def failed(self, job: Job, exc: BaseException) -> None:
        job.end = perf_counter() - self.t0
        job.generated = job.tokens_n or 0
        mid = job.http_status and 200 <= job.http_status < 300
        if isinstance(exc, TimeoutError):  # aiohttp's own timeouts derive from it too
            job.outcome, job.error = "timeout", f"no complete answer within timeout_s={job.timeout:g}"
        elif isinstance(exc, (StreamError, ValueError, AttributeError, TypeError, KeyError, IndexError)):
            job.outcome, job.error = "stream_error", one_line(f"malformed answer: {exc}")
        elif isinstance(exc, aiohttp.ClientPayloadError):
            job.outcome, job.error = "stream_error", one_line(f"stream cut: {exc}")
        elif isinstance(exc, aiohttp.ClientResponseError):  # not HTTP at all, or broken HTTP
            job.outcome, job.error = "http_error", one_line(f"malformed HTTP response: {exc.message}")
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            job.stale_conn = not job.http_status and isinstance(
                exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)) and not isinstance(
                exc, aiohttp.ClientConnectorError)
            job.outcome = "stream_error" if mid else "connection_error"
            job.error = one_line(f"{'connection lost mid-stream' if mid else 'connection failed'}: "
                                 f"{type(exc).__name__}: {exc}")
        else:
            job.outcome, job.error = "stream_error", one_line(f"unexpected {type(exc).__name__}: {exc}")
