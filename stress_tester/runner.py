"""The load loop: open-loop sends at absolute times from one fixed start, closed-loop users, an
optional concurrency cap, and an orderly stop (signal, --max-duration, drain) after which every
scheduled request has an outcome.

Open-loop timing: each send waits for t0 + scheduled on the monotonic clock, never for a relative
delay after the previous send, so lateness does not accumulate. The wait is a coarse asyncio sleep
(whose timer wakes up to 1 ms late: epoll counts milliseconds) to within 1.5 ms, then a spin that
keeps yielding to the event loop so responses are still read. Requests already late are fired
together, then the loop yields once. Spinning costs a CPU: with more sending processes than CPUs it
is turned off and sends are up to ~1 ms late instead.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
from array import array
from dataclasses import dataclass
from time import perf_counter

import aiohttp
import numpy as np

from simulator.records import row
from simulator.runfolder import token_part

from .client import Client, Job
from .dialects import DIALECTS
from .facts import sample
from .schedule import Plan, closed_base, not_sent, sent_length

SPIN_S = 0.0015  # default; 0 when sending processes would outnumber the CPUs (see run.py)


@dataclass
class Options:
    base_url: str
    api: str = "openai-chat"
    model: str | None = None
    concurrency: int | None = None
    max_duration: float | None = None
    grace: float = 5.0
    retry: bool = False
    max_retries: int = 3
    no_stream: bool = False
    extensions: bool = True
    poll_s: float = 0.02
    progress_file: str | None = None
    record_dir: str | None = None  # where tokens-<worker>.bin goes (the run folder); None: not kept
    server_kind: str = "unknown"  # from facts.probe: vLLM gets continuous usage stats
    sample_s: float = 1.0  # server gauge sampling period (worker 0 only)
    probe: bool = True  # ask the server about itself at start and end (server.json)
    prompt_word: str = " the"  # one token of the server's tokenizer (prompts.py)
    prompt_salt: int | None = None  # in every prompt marker; None: a new one per run, -1: none (prompts.py)
    spin_s: float | None = None  # None: SPIN_S, or 0 when workers >= CPUs (spinning would steal their time)


@dataclass
class Part:
    """What one process measured, in plain data (it crosses a process boundary with --workers)."""
    rows: list  # simulator.records rows
    lag: bytes  # float64 pairs (scheduled, sent) of the open-loop requests sent
    ttfb: bytes  # float64 time to first byte (status line and headers) of ok requests
    itl: bytes  # float64 pooled inter-token gaps of ok requests
    counters: dict
    stop_reason: str
    client_rows: list = None  # one tuple per sent request, in CLIENT_COLUMNS + OPTIONAL_CLIENT order (runfolder.py)
    notes: list = None
    samples: list = None  # (t_s, running, waiting) of the server's gauges


def to_part(plan: Plan, jobs: list, itl: bytes, retries: int, stop_reason: str, client=None, samples=None) -> Part:
    names = plan.names()
    classes = plan.classes
    n_open = len(plan)
    rows, lag, ttfb, crows = [], array("d"), array("d"), []
    usage_given = mismatch = 0
    for j in jobs:
        info = classes[j.cls]
        j.cost = j.prompt * info.cost_prompt + j.generated * info.cost_output
        rows.append(row(j, names))
        usage = getattr(j, "usage", None)
        if j.arrival is not None:
            crows.append((j.rid, getattr(j, "closed_user", -1), getattr(j, "usage_prompt", None), usage,
                          getattr(j, "finish", ""), getattr(j, "chunks", None), getattr(j, "usage_cached", None),
                          getattr(j, "slot", None)))
        if j.rid < n_open and j.arrival is not None:
            lag.append(j.scheduled)
            lag.append(j.arrival)
        if j.outcome == "ok":
            if j.first_byte is not None:
                ttfb.append(j.first_byte - j.arrival)
            if isinstance(usage, int):
                usage_given += 1
                mismatch += j.stream and usage != j.tokens_n
    counters = {"retries": retries, "usage_reported": usage_given, "usage_differs_from_chunks": int(mismatch)}
    if client is not None:
        counters.update(client.counts)
        counters["stale_connection_resends"] = client.stale_resends
    return Part(rows, lag.tobytes(), ttfb.tobytes(), itl, counters, stop_reason, crows,
                list(client.notes) if client is not None else [], list(samples or []))


def new_job(rid, ci, info, scheduled, prompt, output, max_tokens, hashes) -> Job:
    job = Job(rid, ci, scheduled, prompt, output, max_tokens, info.timeout, hashes)
    job.priority, job.stream = info.priority, info.stream
    job.applied_max = sent_length(output, max_tokens)
    job.usage = job.usage_prompt = job.usage_cached = job.slot = job.chunks = job.retry_after = job.first_byte = job.cum = job.plain_retry = None
    job.tokens_n = 0
    job.stale_conn = False
    job.finish = ""
    job.closed_user = -1
    job.complete = False
    job.retries = 0
    job.arrival = None  # set when sent; None marks never sent
    return job


class Runner:
    def __init__(self, plan: Plan, opts: Options, indices=None, closed: bool = True, progress=None, worker: int = 0):
        self.plan, self.opts = plan, opts
        self.worker = worker
        self.samples: list = []
        self.indices = list(range(len(plan))) if indices is None else list(indices)
        self.with_closed = closed
        self.progress = progress  # callable(sent, done) or None; else opts.progress_file
        self.jobs: list = []
        self.inflight: set = set()
        self.pos = 0  # next position in self.indices not yet fired
        self.done = 0
        self.stop_reason = ""
        self.cancel_note = ""  # outcome of requests cut in flight: stream_error, or timeout at drain_s
        self.cancel_why = "cancelled at shutdown"

    # ------------------------------------------------------------------ public
    def run(self, t0=None, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> Part:
        """t0: the start on the perf_counter clock, or a callable that blocks until it is known (a worker
        asks its parent once its session is ready), or None for "now"."""
        # A full garbage collection walks every object of the process (pandas alone brings ~10^5) and
        # stalls the loop for milliseconds: freeze what exists now and leave only the young generations
        # to the collector while sending. The little cyclic garbage of failed requests that reaches the
        # old generation waits for the collection at the end.
        thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
        try:
            return asyncio.run(self.main(t0, signals))
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            gc.collect()

    async def main(self, t0, signals) -> Part:
        loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        try:
            for s in signals:
                loop.add_signal_handler(s, self.on_signal, s)
        except (ValueError, RuntimeError):  # not the main thread: the caller owns stopping
            signals = ()
        dialect = DIALECTS[self.opts.api]()
        dialect.extensions = self.opts.extensions
        dialect.continuous_usage = self.opts.server_kind == "vllm"
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False)
        try:
            async with aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent",)) as session:
                if t0 is None:
                    t0 = perf_counter() + 0.02
                elif callable(t0):
                    t0 = t0()
                self.t0 = t0
                self.client = Client(session, self.opts.base_url, dialect, self.plan, t0, model=self.opts.model,
                                     no_stream=self.opts.no_stream, retry=self.opts.retry,
                                     max_retries=self.opts.max_retries, poll_s=self.opts.poll_s,
                                     word=self.opts.prompt_word,
                                     salt="" if self.opts.prompt_salt in (None, -1) else f"n{self.opts.prompt_salt}")
                if self.opts.record_dir:
                    self.client.tokens.open(token_part(self.opts.record_dir, self.worker))
                self.sem = asyncio.Semaphore(self.opts.concurrency) if self.opts.concurrency else None
                try:
                    await self.drive()
                finally:
                    self.client.tokens.close()
        finally:
            for s in signals:
                loop.remove_signal_handler(s)
        for k in range(self.pos, len(self.indices)):
            self.jobs.append(not_sent(self.plan, self.indices[k], self.stop_reason or "not sent", Job))
        return to_part(self.plan, self.jobs, self.client.itl.tobytes(), self.client.retries, self.stop_reason,
                       self.client, self.samples)

    def on_signal(self, s):
        name = signal.Signals(s).name
        if self.stop.is_set():  # a second signal: no more grace
            self.cancel_all(f"cancelled at shutdown ({name} again)")
            return
        self.request_stop(f"interrupted ({name})")

    def max_duration_reason(self) -> str:
        return f"--max-duration {self.opts.max_duration:g} s reached"

    def request_stop(self, reason: str):
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    # ------------------------------------------------------------------ phases
    async def drive(self):
        opts, plan = self.opts, self.plan
        senders = [asyncio.create_task(self.dispatch())]
        if self.with_closed:
            counter = [0]
            for ci in plan.closed:
                for u in range(plan.sc.workload.classes[ci].arrival.users):
                    senders.append(asyncio.create_task(self.closed_user(ci, u, counter)))
        aux = [asyncio.create_task(self.report_progress()), asyncio.create_task(self.flush_tokens())]
        sampling = asyncio.Event()
        if self.worker == 0 and opts.sample_s > 0:
            aux.append(asyncio.create_task(sample(self.client.session, opts.base_url, opts.server_kind, self.t0,
                                                  self.samples, sampling, opts.sample_s)))
        if opts.max_duration is not None:
            aux.append(asyncio.create_task(self.deadline(opts.max_duration, self.max_duration_reason())))
        stop_wait = asyncio.create_task(self.stop.wait())
        sending = asyncio.gather(*senders)
        await asyncio.wait([sending, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if sending.done() and not sending.cancelled() and sending.exception() is not None:
            exc = sending.exception()  # a bug of ours: stop as for a signal and keep what was measured
            self.request_stop(f"internal error: {type(exc).__name__}: {exc}")
        if self.stop.is_set():
            for t in senders:
                t.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            await self.wait_inflight(opts.grace, None)
            self.cancel_all("cancelled at shutdown")
        else:
            # scenario's arrivals are over: in-flight requests may run to their timeouts, bounded by drain_s
            # like the simulator, and a signal now still cuts the wait to the grace period
            await self.wait_inflight(plan.sc.drain_s, stop_wait)
            if self.inflight and self.stop.is_set():
                await self.wait_inflight(opts.grace, None)
            if not self.stop.is_set():
                self.cancel_note = "timeout"  # as the simulator ends requests still running at drain_s
            self.cancel_all("drain_s reached" if not self.stop.is_set() else "cancelled at shutdown")
        await asyncio.gather(*list(self.inflight), return_exceptions=True)
        sampling.set()
        stop_wait.cancel()
        for t in aux:
            t.cancel()
        await asyncio.gather(stop_wait, *aux, return_exceptions=True)
        self.write_progress(final=True)

    async def wait_inflight(self, limit: float, interrupt):
        end = perf_counter() + limit
        while self.inflight:
            left = end - perf_counter()
            if left <= 0:
                return
            waits = set(self.inflight)
            if interrupt is not None:
                waits.add(interrupt)
            done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if interrupt is not None and interrupt in done:
                return

    def cancel_all(self, why: str):
        self.cancel_why = why
        for t in list(self.inflight):
            t.cancel()

    async def flush_tokens(self):
        while True:
            await asyncio.sleep(0.5)
            self.client.tokens.flush()

    async def deadline(self, seconds, reason):
        await asyncio.sleep(max(0.0, self.t0 + seconds - perf_counter()))
        self.request_stop(reason)

    # ------------------------------------------------------------------ senders
    async def dispatch(self):
        plan, idx = self.plan, self.indices
        ts, cls, pr, out, mx, hs = plan.t, plan.cls, plan.prompt, plan.output, plan.max_tokens, plan.hashes
        classes = plan.classes
        t0 = self.t0
        stop = self.stop
        horizon = self.opts.max_duration if self.opts.max_duration is not None else float("inf")
        create, fire, track = asyncio.get_running_loop().create_task, self.fire, self.track
        n = len(idx)
        k = self.pos
        sleep = asyncio.sleep
        spin = SPIN_S if self.opts.spin_s is None else self.opts.spin_s
        while k < n:
            i = idx[k]
            target = ts[i]
            if target >= horizon:  # the rest is past --max-duration: stop when it is reached
                await sleep(max(0.0, t0 + horizon - perf_counter()))
                self.request_stop(self.max_duration_reason())
                break
            wait = t0 + target - perf_counter()
            if wait > spin:
                await sleep(wait - spin)
                continue
            if wait > 0:
                await sleep(0)
                continue
            if stop.is_set():
                break
            # due (or late): fire every due request, then yield once
            now = perf_counter() - t0
            while True:
                ci = cls[i]
                job = new_job(i, ci, classes[ci], target, pr[i], out[i], mx[i], hs[i])
                self.jobs.append(job)
                track(create(fire(job)))
                k += 1
                self.pos = k
                if k >= n:
                    break
                i = idx[k]
                target = ts[i]
                if target > now or target >= horizon:
                    break
            await sleep(0)

    def track(self, task):
        self.inflight.add(task)
        task.add_done_callback(self.untrack)

    def untrack(self, task):
        self.inflight.discard(task)
        self.done += 1

    async def fire(self, job: Job):
        sem = self.sem
        try:
            if sem is not None:
                async with sem:
                    await self.client.send(job)
            else:
                await self.client.send(job)
        except asyncio.CancelledError:
            if job.arrival is None:  # still waiting for a concurrency slot
                job.outcome, job.error = "not_sent", self.stop_reason or "not sent"
            elif job.outcome is None:
                job.outcome = self.cancel_note or "stream_error"
                job.error = self.cancel_why
                job.end = perf_counter() - self.t0
                job.generated = job.tokens_n or 0

    async def closed_user(self, ci: int, u: int, counter: list):
        sc = self.plan.sc
        a = sc.workload.classes[ci].arrival
        src = self.plan.closed[ci]
        info = self.plan.classes[ci]
        rng = np.random.default_rng([sc.seed, ci, u])
        horizon = sc.duration_s if sc.duration_s is not None else float("inf")
        if self.opts.max_duration is not None:
            horizon = min(horizon, self.opts.max_duration)
        limit = sc.num_requests if sc.num_requests is not None else float("inf")
        base = closed_base(self.plan, ci)
        await asyncio.sleep(max(0.0, self.t0 - perf_counter()))  # users start with the run, not before it
        while perf_counter() - self.t0 < horizon and counter[0] < limit and not self.stop.is_set():
            counter[0] += 1
            p, o, m, h = src.next()
            now = perf_counter() - self.t0
            job = new_job(base + counter[0] - 1, ci, info, now, p, o, m, h)
            job.closed_user = u
            self.jobs.append(job)
            task = asyncio.create_task(self.fire(job))
            self.track(task)
            await asyncio.shield(task)
            think = a.think_time_s if a.think == "fixed" else rng.exponential(a.think_time_s) if a.think_time_s else 0.0
            if think > 0:
                await asyncio.sleep(think)
            elif job.outcome != "ok":
                await asyncio.sleep(1e-3)  # a rejected user retries, but not in zero time

    # ------------------------------------------------------------------ progress
    async def report_progress(self):
        while True:
            self.write_progress()
            await asyncio.sleep(0.2)

    def write_progress(self, final: bool = False):
        sent = len(self.jobs)
        if self.progress is not None:
            self.progress(sent, self.done, final)
            return
        path = self.opts.progress_file
        if path:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump({"sent": sent, "done": self.done, "scheduled": len(self.indices), "final": final}, fh)
            os.replace(tmp, path)
