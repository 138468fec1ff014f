"""The twin's core: HTTP calls in, tickets out.

A ticket is one request in flight as the HTTP side sees it: the world's Request, the token times
the engine emitted for it, and an asyncio.Event that wakes its handler whenever something changed.
Everything runs on the event loop's thread, so the world, tickets and metrics need no locks.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from .clock import RealTimeDriver
from .dialects import iso
from .live import LiveWorld
from .metrics import TwinMetrics
from .tenancy import HTTPProblem, Tenancy, identity
from .usage import UsageStore

log = logging.getLogger("servesim.twin")
KEEP_FINISHED = 10_000  # finished tickets kept for GET /requests/{id}


CANCELLED = "client disconnected"  # error of a request whose client hung up (outcome `timeout`, HTTP 499)


class Ticket:
    """`delivery` is None while a handler still owes the client its answer, then "sent" or
    "cancelled"; `held` is True while the world has finished the request but its record, metrics
    and usage wait for that verdict (a client that hangs up before the last byte is not served)."""
    __slots__ = ("id", "req", "call", "model", "created", "created_iso", "times", "event", "done", "wall0",
                 "delivery", "held", "natural")

    def __init__(self, twin, req, call):
        self.id = uuid.uuid4().hex
        self.req, self.call, self.model = req, call, req.model
        self.wall0 = twin.wall0
        ts = self.wall(req.arrival)
        self.created, self.created_iso = int(ts), iso(ts)
        self.times: list = []
        self.event = asyncio.Event()
        self.done = False
        self.delivery = None if call.api != "queue" else "sent"  # queue jobs are polled, not delivered
        self.held = False
        self.natural = False  # the request's output length is its natural end, not a cap (see finish_reason)

    def wall(self, t):
        return None if t is None else round(self.wall0 + t, 6)

    @property
    def generated(self) -> int:
        return len(self.times)

    def finish_reason(self) -> str:
        """"stop" when the answer ended at its natural length below every cap, "length" when a cap
        (the client's max_tokens, the model's max_max_tokens, a degradation level's cap) cut it.
        The natural length is the body's max_tokens when the X-Requested-Max-Tokens hint asks for more
        (the stress tester sends a scenario request's output length that way, with ignore_eos), or
        the model's default_max_tokens when the body sets no maximum."""
        r = self.req
        return "stop" if self.natural and len(self.times) >= r.output else "length"

    def usage(self) -> dict:
        p, n = self.req.prompt, len(self.times)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    async def changed(self) -> None:
        self.event.clear()
        await self.event.wait()


class Twin:
    def __init__(self, sc, usage_db: Path | None = None, out: Path | None = None, plots: bool = False,
                 default_user: str | None = None):
        self.world = LiveWorld(sc)
        self.sc = self.world.sc
        self.driver = RealTimeDriver(self.world.env)
        self.tenancy = Tenancy(self.world, default_user)
        self.metrics = TwinMetrics(self.world)
        self.run_id = uuid.uuid4().hex[:12]
        self.usage = UsageStore(usage_db, self.run_id) if usage_db is not None else None
        self.out, self.plots = out, plots
        self.live: dict = {}  # rid -> ticket, until finished
        self.recent: OrderedDict = OrderedDict()  # public id -> ticket
        self.next_rid = 0
        self.wall0 = 0.0  # Unix time of simulated t=0
        self.stopped = False  # no new requests
        self.closed = False  # report written, usage store closed
        self.summary: dict | None = None
        e = self.sc.engine
        self.hash_prompts = bool(e.prefix_caching)  # engines reuse equal prompt prefixes only then
        w = self.world
        w.token_listener = self._tokens
        w.on_start = self._started
        w.on_finish = self._finished
        w.status_of = http_status
        w.decide = self._decide
        self.held: dict = {}  # rid -> ticket whose record waits for its delivery verdict
        from .prom import max_model_len
        self.max_model_len = max_model_len(self.sc, self.world.replicas)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """On the running event loop: open the usage store, start the world and its clock."""
        if self.usage is not None:
            self.usage.open()
        self.driver.start()
        self.wall0 = time.time() - self.driver.now()
        self.world.begin()

    def shut_in_flight(self, reason: str = "server shut down") -> None:
        """Freeze the world and finish every request still open (records keep them, handlers send
        their error tails)."""
        if self.driver.loop is None:
            return
        self.driver.halt()
        self.world.abandon(reason)

    def begin_shutdown(self) -> None:
        """Refuse new requests and end open ones, so their handlers finish before the server closes."""
        if not self.stopped:
            self.stopped = True
            self.shut_in_flight()

    async def stop(self) -> dict | None:
        """After the HTTP side closed: stop the clock, write the report folder, close the usage store."""
        if self.driver.loop is None or self.closed:
            return self.summary
        self.closed = True
        self.begin_shutdown()
        await self.driver.stop()
        for t in list(self.held.values()):  # handlers are gone: what they had not confirmed was not delivered
            self.delivered(t, False)
        if self.out is not None:
            loop = asyncio.get_running_loop()
            self.summary = await loop.run_in_executor(None, self.write_report, Path(self.out))
        if self.usage is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.usage.close)
        self.world.rows.close()
        return self.summary

    def write_report(self, out: Path) -> dict:
        from ..metrics import summarize
        from ..report import write_report
        from ..run import engine_summary
        from ..world import Result
        w = self.world
        pool = w.pool.status(events=True) if w.pool is not None else None
        res = Result(self.sc, list(w.rows), w._itl(), w.series, [r.engine.stats() for r in w.replicas], w.env.now, pool)
        extra = {"engine": engine_summary(res), "twin": {"clock_steps": self.driver.steps,
                                                         "clock_max_lag_s": round(self.driver.max_lag, 6)}}
        if pool is not None:
            extra["model_pool"] = pool
        def summary(df):  # the warm-up counts from the first request, not from the server's start
            first = float(df["arrival_s"].min()) if len(df) else 0.0
            return summarize(df, self.sc, res.itl, res.series, "twin", extra, origin=first)
        return write_report(out, self.sc, res.rows, summary, self.plots, title="sim serve")

    # ---------------------------------------------------------------- requests
    def submit(self, call, headers, body: dict, prompt_hint: int | None = None, requested_max: int | None = None) -> Ticket:
        if self.stopped:
            raise HTTPProblem(503, "server is shutting down", "unavailable")
        if self.driver.failed is not None:
            raise HTTPProblem(500, f"simulated world failed: {self.driver.failed!r}", "server_error")
        model = self.tenancy.model_name(call.model)
        ident = identity(headers, body)
        ci = self.tenancy.resolve(ident, model)
        w = self.world
        now = self.driver.advance()
        prompt = prompt_hint if prompt_hint is not None else call.counted_tokens
        mspec = self.tenancy.models[w.names[ci][3]]
        mx = call.max_tokens if call.max_tokens is not None else mspec.default_max_tokens
        req = w.make_request(self.next_rid, ci, now, prompt, mx, requested_max or mx, self._hashes(call, ci))
        self.next_rid += 1
        req.stream = call.stream
        if ident.priority is not None:
            req.priority = ident.priority
        t = Ticket(self, req, call)
        t.natural = call.max_tokens is None or (requested_max is not None and requested_max > call.max_tokens)
        self.live[req.rid] = t
        self.recent[t.id] = t
        while len(self.recent) > KEEP_FINISHED and next(iter(self.recent.values())).done:
            self.recent.popitem(last=False)
        if self.usage is not None:
            self.usage.created(t, self.run_id)
        try:
            w.submit(req)
        except Exception as exc:  # noqa: BLE001 - a bug must not keep the request's queue slot
            log.exception("request %s failed entering the world", t.id)
            w.fail(req, f"internal error: {type(exc).__name__}: {exc}")
            raise HTTPProblem(500, f"internal error: {type(exc).__name__}", "server_error") from None
        self.driver.advance()
        self.driver.wake()
        return t

    def abort(self, t: Ticket, reason: str = CANCELLED) -> None:
        if t.done or t.req.outcome is not None:
            return
        self.driver.advance()
        self.world.abort(t.req, reason)
        self.driver.advance()
        self.driver.wake()

    def delivered(self, t: Ticket, ok: bool) -> None:
        """The handler's verdict: the whole answer was written (`ok`), or the client went away first.
        A request the world finished but the client did not get is recorded as a cancellation: outcome
        `timeout`, error "client disconnected", HTTP 499 (records.py has no outcome of its own for it;
        this is what a hang-up before the world finished gives, and what `stress run` records for a
        client-side timeout)."""
        if t.delivery is not None:
            return
        t.delivery = "sent" if ok else "cancelled"
        if not t.done:
            if not ok:
                self.abort(t)
            return
        if not t.held:
            return
        t.held = False
        self.held.pop(t.req.rid, None)
        r = t.req
        if not ok and r.outcome == "ok":
            r.outcome, r.error, r.http_status = "timeout", CANCELLED, 499
        self.world.record(r)
        self._account(t)

    def _hashes(self, call, ci):
        """Chained ids of the prompt's full blocks of words, so equal prefixes share ids (prefix caching)."""
        if not self.hash_prompts or not call.words:
            return None
        hb = int(self.world.stream.hash_block[ci])
        words = call.words
        out, prev = [], b""
        for i in range(0, len(words) - hb + 1, hb):
            prev = hashlib.blake2b(prev + " ".join(words[i:i + hb]).encode(), digest_size=8).digest()
            out.append(int.from_bytes(prev, "big") >> 2)
        return tuple(out) or None

    # ---------------------------------------------------------------- world hooks
    def _tokens(self, reqs, ends) -> None:
        live = self.live
        ends = [float(e) for e in ends]
        for r in reqs:
            t = live.get(r.rid)
            if t is not None:
                t.times.extend(ends)
                t.event.set()

    def _started(self, req) -> None:
        t = self.live.get(req.rid)
        if t is not None and self.usage is not None:
            self.usage.started(t)

    def _decide(self, req, outcome: str) -> tuple[str, bool]:
        """Asked by the world as it finishes `req`: the outcome to record, and whether to hold the
        record until the handler says the answer reached the client."""
        t = self.live.get(req.rid)
        if t is None or outcome != "ok":
            return outcome, False
        if t.delivery == "cancelled":  # the client left while the engine was finishing it
            req.error = CANCELLED
            return "timeout", False
        return outcome, t.delivery is None

    def _finished(self, req) -> None:
        t = self.live.pop(req.rid, None)
        if t is None:
            self.metrics.observe(req)
            return
        t.done = True
        t.event.set()
        if self.world.holding:
            t.held = True
            self.held[req.rid] = t
            return
        self._account(t)

    def _account(self, t: Ticket) -> None:
        r = t.req
        self.metrics.observe(r, t.finish_reason() if r.outcome == "ok" else None, t.times)
        if self.usage is not None:
            self.usage.finished(t)

    # ---------------------------------------------------------------- views
    def retry_after(self, req) -> float:
        """Seconds until the bucket or quota window that refused `req` admits again."""
        gw = self.world.gateway
        now = self.world.env.now
        if req.outcome == "rejected_quota":
            q = gw.quotas.get(req.project)
            return (q.k + 1) * q.window - now if q is not None else 1.0
        waits = [b.retry_after() for b in (gw.global_bucket, gw.user_buckets.get(req.user), gw.project_buckets.get(req.project))
                 if b is not None and b.tokens < 1.0]
        return max(waits) if waits else 1.0

    def gauges(self) -> dict:
        w = self.world
        qs = w.queue_status()
        reps = w.replicas
        return {
            "queue_depth": (qs["queued"], "Requests admitted and waiting for their first prefill."),
            "running": (qs["running"], "Requests in a running batch."),
            "inflight": (len(self.live), "Open requests (queued, running, or held by a model pool)."),
            "degradation_level": (qs["degradation_index"] or 0, "Index of the gateway degradation level in force."),
            "kv_util": (float(sum(r.engine.kv_util() for r in reps) / len(reps)) if reps else 0.0, "Mean KV-cache use."),
            "clock_max_lag_seconds": (self.driver.max_lag, "Worst lateness of a simulated event on the wall clock."),
            "uptime_seconds": (self.driver.now() if self.driver.loop else 0.0, "Seconds since the server started."),
        }


def http_status(o: str, req) -> int:
    """HTTP status a client sees for a request that ends with outcome `o`."""
    if o == "ok":
        return 200
    if o in ("rejected_rate_limited", "rejected_quota"):
        return 429
    if o in ("rejected_queue_full", "rejected_degraded"):
        return 503
    if o == "http_error":
        return req.http_status or 400
    if o == "timeout":
        return 499 if req.error == CANCELLED else 504
    return 500


PROBLEMS = {  # outcome -> (error type, message)
    "rejected_rate_limited": ("rate_limit_exceeded", "rate limit reached, retry later"),
    "rejected_quota": ("quota_exceeded", "project token quota exhausted for this window"),
    "rejected_queue_full": ("queue_full", "server queue is full"),
    "rejected_degraded": ("degraded", "shed by the gateway's degradation level"),
    "timeout": ("timeout", "request timed out"),
}


def problem_for(twin: Twin, req) -> HTTPProblem:
    o = req.outcome
    status = req.http_status or http_status(o, req)
    type_, msg = PROBLEMS.get(o, ("invalid_request_error" if status < 500 else "server_error", req.error or o))
    if req.error and o != "http_error":
        msg = f"{msg} ({req.error})"
    if req.level and o == "rejected_degraded":
        msg = f"{msg}: level {req.level}"
    headers = {}
    if status == 429 or o == "rejected_queue_full":
        ra = twin.retry_after(req) if status == 429 else 1.0
        headers = {"Retry-After": str(max(1, math.ceil(ra))), "retry-after-ms": str(max(1, math.ceil(ra * 1000)))}
    code = "model_not_found" if status == 404 else type_
    return HTTPProblem(status, msg, type_, code=code, headers=headers)
