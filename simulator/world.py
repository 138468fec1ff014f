"""The SimPy world: arrivals -> gateway -> router -> scheduler -> engine -> record.

Requests are plain objects moved by a few long-lived processes and event callbacks (arrivals,
closed-loop users, a timeout reaper, a 1 s monitor, one engine loop per replica): a process per
request would cap the simulator's speed.
"""
from __future__ import annotations

import gc
import heapq
from dataclasses import dataclass, field

import numpy as np
import simpy
from simpy.events import NORMAL, URGENT

from .costmodel import scenario_profile
from .engines import ENGINES
from .gateway import Gateway
from .records import Request, row
from .routers import ROUTERS
from .scenario import Scenario
from .schedulers import SCHEDULERS
from .workload import build_stream


ITL_CHUNK = 65_536  # pending pooled-gap entries before they are packed into arrays


class _Tick:
    """The least SimPy's Environment.step() needs of an event: callbacks, and _ok."""

    __slots__ = ("_ok", "callbacks")

    def __init__(self):
        self.callbacks = None
        self._ok = True


@dataclass
class Replica:
    index: int
    model: str
    engine: object = None


@dataclass
class Result:
    scenario: Scenario
    rows: list
    itl: tuple  # (gap values, weights) pooled over all requests
    series: dict  # 1 s time series
    engine_stats: list = field(default_factory=list)
    sim_time: float = 0.0
    pool: dict | None = None  # model pool state and load/unload events (multi-model scenarios)


class World:
    def __init__(self, sc: Scenario, progress=None, stream=None):
        """`stream`: (Stream, closed-loop sources) to use instead of the scenario's own (`sim replay`)."""
        self.sc = sc
        self.env = simpy.Environment()
        self.cost = scenario_profile(sc, sc.engine.profile, "engine.profile")
        fe = (self.cost.frontend_s, self.cost.frontend_per_token_s, self.cost.frontend_per_stream_s)
        self.frontend = fe if any(x > 0 for x in fe) else None
        self.gateway = Gateway(sc)
        self.router = ROUTERS[sc.cluster.router]()
        self.stream, self.closed = stream if stream is not None else build_stream(sc)
        self.progress = progress
        self.token_listener = None
        self.rows: list = []
        self.itl_vals: list = []  # pending pooled gaps and their weights, as added
        self.itl_w: list = []
        self.itl_chunks: list = []  # earlier ones, as pairs of arrays (16 bytes a gap instead of ~40)
        self.queued = 0
        self.inflight = 0
        self.live: dict = {}
        self.arrivals_done = False
        self.all_done = self.env.event()
        self.arrivals_finished = self.env.event()
        self.deadlines: list = []
        self.reaper_kick = None
        self.reaper_target = float("inf")
        self._build_classes()
        self._build_replicas()
        self.series = {k: [] for k in ("t", "queued", "running", "level", "kv_util", "outstanding")}

    # ------------------------------------------------------------------ setup
    def _build_classes(self):
        sc = self.sc
        self.names, self.cinfo = [], []
        for c in sc.workload.classes:
            u = sc.user(c.user)
            p = sc.project(u.project)
            m = sc.model(c.model)
            prio = p.priority if p.priority is not None else c.effective_priority
            self.names.append((c.name, u.id, p.id, m.name, c.tier))
            self.cinfo.append((prio, c.stream, c.timeout_s, m.cost_per_1k_prompt / 1000, m.cost_per_1k_output / 1000))

    def _build_replicas(self):
        sc = self.sc
        sched = SCHEDULERS[sc.scheduler.policy]
        engine_cls = ENGINES[sc.engine.type]
        self.replicas: list[Replica] = []
        if sc.cluster.model_pool:
            from .modelpool import build_pool  # multi-model gateways only
            self.replicas, self.pool = build_pool(self, sc, engine_cls, sched)
        else:
            self.pool = None
            for i in range(sc.cluster.replicas):
                rep = Replica(i, "*")
                rep.engine = engine_cls(self, i, sc.engine, self.cost, sched(sc.scheduler))
                self.replicas.append(rep)
        self.by_model: dict = {}

    def candidates(self, model: str):
        reps = self.by_model.get(model)
        if reps is None:
            reps = [r for r in self.replicas if r.model in ("*", model)]
            self.by_model[model] = reps
        return reps

    # ------------------------------------------------------------------ request path
    def make_request(self, rid, ci, t, prompt, output, max_tokens, hashes):
        prio, stream, timeout, _, _ = self.cinfo[ci]
        req = Request(rid, ci, t, prompt, output, max_tokens, timeout, hashes)
        req.class_name, req.user, req.project, req.model, req.tier = self.names[ci]
        req.priority, req.stream = prio, stream
        return req

    def submit(self, req: Request) -> None:
        now = self.env._now  # (env.now is a property: a Python call; this runs per request)
        self.inflight += 1
        rejected = self.gateway.admit(req, now, self.queued)
        if rejected is not None:
            self.finish(req, rejected, now)
            return
        if self.pool is not None:
            rep = self.pool.route(req, now)
            if rep is None:
                return  # the pool queued it until a replica of its model is up
        else:
            rep = self.router.pick(req, self.candidates(req.model))
        self.dispatch(req, rep)

    def dispatch(self, req: Request, rep: Replica) -> None:
        req.replica = rep.index
        self.hold(req)
        if self.frontend:  # the server's front end before its scheduler (a calibrated profile's frontend)
            fe_s, fe_tok, fe_stream = self.frontend
            delay = fe_s + fe_tok * req.prompt
            if fe_stream:
                delay += fe_stream * rep.engine.streaming()
            ev = self.env.timeout(delay)
            ev.callbacks.append(lambda _, r=req, e=rep.engine: e.enqueue(r) if r.outcome is None else None)
            return
        rep.engine.enqueue(req)

    def hold(self, req: Request) -> None:
        """An admitted request now waits (in an engine's queue, or the model pool's per-model queue):
        it counts as queued for the gateway, and the reaper times it out at its deadline."""
        self.queued += 1
        self.live[req.rid] = req
        if req.deadline < self.reaper_target:
            self._kick_reaper(req.deadline)
        heapq.heappush(self.deadlines, (req.deadline, req.rid))

    def started(self, req: Request, now: float) -> None:
        """An engine took `req` from its queue (first time only)."""
        self.queued -= 1
        if req.start is None:
            req.start = now

    def finish(self, req: Request, outcome: str, t: float) -> None:
        req.outcome = outcome
        req.end = t
        if req.replica >= 0 or req.rid in self.live:  # admitted: dispatched, or held by the model pool
            self.gateway.release(req, t)
            self.live.pop(req.rid, None)
        _, _, _, cp, co = self.cinfo[req.cls]
        req.cost = req.prompt * cp + req.generated * co
        self.rows.append(row(req, self.names))
        if req.done is not None:
            req.done.succeed()
        self.inflight -= 1
        if self.inflight == 0 and self.arrivals_done and not self.all_done.triggered:
            self.all_done.succeed()
        if self.pool is not None:
            self.pool.on_finish(req, t)  # frees room on a replica, may dispatch a held request

    def emit(self, reqs, ends) -> None:
        """Tokens just generated: each request in `reqs` got one token at each absolute time in `ends`.
        Only the twin server listens (it streams them out); the simulator needs no per-token work."""
        if self.token_listener is not None:
            self.token_listener(reqs, ends)

    def add_itl(self, gaps, weight: int) -> None:
        """Pool inter-token gaps: `gaps` (a float or an array) each observed by `weight` requests."""
        self.itl_vals.append(gaps)
        self.itl_w.append(weight)
        if len(self.itl_vals) >= ITL_CHUNK:  # step by step (the twin server), one entry per step: keep it compact
            self.itl_chunks.append(self._pool())
            self.itl_vals, self.itl_w = [], []

    # ------------------------------------------------------------------ processes
    def arrivals(self):
        """Open-loop arrivals. Not a SimPy process: a process costs a generator resume per request, so
        this is one reused event whose callback submits what is due and schedules itself for the next
        arrival. It mirrors the process it replaced event for event (an urgent start at t=0 like a
        process's initialisation, each wait scheduled right after the previous submit, an event that
        succeeds at the end), so SimPy orders everything exactly as before. Returns that end event."""
        s = self.stream
        env = self.env
        ts, cls, pr, out, mx = s.t.tolist(), s.cls.tolist(), s.prompt.tolist(), s.output.tolist(), s.max_tokens.tolist()
        hashes = s.hashes
        make, submit = self.make_request, self.submit
        n = len(ts)
        ids = s.ids.tolist() if getattr(s, "ids", None) is not None else range(n)  # replayed runs keep their ids
        done = env.event()
        tick = _Tick()
        nxt = [0]
        schedule = env.schedule

        def run(i):
            while i < n:
                t = ts[i]
                if t > env._now:
                    nxt[0] = i
                    tick.callbacks = [resume]
                    schedule(tick, NORMAL, t - env._now)
                    return
                submit(make(ids[i], cls[i], t, pr[i], out[i], mx[i], hashes[i]))
                i += 1
            done.succeed()

        def resume(_):  # request nxt[0] is due (env.now may differ from its time by rounding: as before)
            i = nxt[0]
            submit(make(ids[i], cls[i], ts[i], pr[i], out[i], mx[i], hashes[i]))
            run(i + 1)

        tick.callbacks = [lambda _: run(0)]
        schedule(tick, URGENT)
        return done

    def closed_user(self, ci: int, u: int, base_id: int, counter: list):
        sc = self.sc
        c = sc.workload.classes[ci]
        a = c.arrival
        src = self.closed[ci]
        rng = np.random.default_rng([sc.seed, ci, u])
        horizon = sc.duration_s if sc.duration_s is not None else float("inf")
        limit = sc.num_requests if sc.num_requests is not None else float("inf")
        env = self.env
        while env.now < horizon and counter[0] < limit:
            counter[0] += 1
            p, o, m, h = src.next()
            req = self.make_request(base_id + counter[0] - 1, ci, env.now, p, o, m, h)
            req.done = env.event()
            self.submit(req)
            yield req.done
            think = a.think_time_s if a.think == "fixed" else rng.exponential(a.think_time_s) if a.think_time_s else 0.0
            if think > 0:
                yield env.timeout(think)
            elif req.outcome != "ok":
                yield env.timeout(1e-3)  # a rejected user retries, but not in zero time

    def _kick_reaper(self, deadline):
        self.reaper_target = deadline
        if self.reaper_kick is not None and not self.reaper_kick.triggered:
            self.reaper_kick.succeed()

    def reaper(self):
        """Client timeouts of still-queued requests, at their deadline (the client hangs up)."""
        env, dl, live = self.env, self.deadlines, self.live
        while True:
            while dl and dl[0][0] <= env.now:
                _, rid = heapq.heappop(dl)
                req = live.get(rid)
                if req is not None and req.start is None and req.outcome is None:
                    self.queued -= 1
                    self.finish(req, "timeout", env.now)
                    if req.replica >= 0:  # its engine may keep queue totals or wait for its queue's head to change
                        self.replicas[req.replica].engine.dropped(req)
            while dl and (dl[0][1] not in live or live[dl[0][1]].start is not None):
                heapq.heappop(dl)  # already running: its engine handles its deadline
            self.reaper_target = dl[0][0] if dl else float("inf")
            self.reaper_kick = env.event()
            if dl:
                yield env.timeout(self.reaper_target - env.now) | self.reaper_kick
            else:
                yield self.reaper_kick

    def monitor(self):
        env, s = self.env, self.series
        while True:
            s["t"].append(env.now)
            s["queued"].append(self.queued)
            s["running"].append(sum(len(r.engine.running) for r in self.replicas))
            s["outstanding"].append(self.inflight)
            s["level"].append(self.gateway.level_at(self.queued))
            reps = self.replicas  # a plain mean: np.mean costs ~10 us, once a simulated second per run
            s["kv_util"].append(sum([r.engine.kv_util() for r in reps]) / len(reps) if reps else 0.0)
            if self.progress is not None:
                self.progress(env.now, len(self.rows))
            yield env.timeout(1.0)

    def sources(self) -> list:
        """Start the arrival processes; returns the events that end with them."""
        procs = []
        if len(self.stream):
            procs.append(self.arrivals())
        counter = [0]
        base = len(self.stream)
        for ci in self.closed:
            for u in range(self.sc.workload.classes[ci].arrival.users):
                procs.append(self.env.process(self.closed_user(ci, u, base + ci * 10_000_000, counter)))
        return procs

    def _arrivals_then_done(self):
        procs = self.sources()
        if procs:
            yield simpy.AllOf(self.env, procs)
        self.arrivals_done = True
        self.arrivals_finished.succeed()
        if self.inflight == 0 and not self.all_done.triggered:
            self.all_done.succeed()

    # ------------------------------------------------------------------ run
    def run(self) -> Result:
        env = self.env
        env.process(self._arrivals_then_done())
        env.process(self.reaper())
        env.process(self.monitor())
        # The simulation makes no garbage cycles (a run of 20,000 requests leaves ~30 unreachable objects),
        # but it allocates millions of objects that stay alive (requests, records, heap entries), so the
        # cyclic collector's passes over them are pure cost (~10 % of a long run): it is off meanwhile.
        gc_was = gc.isenabled()
        gc.disable()
        try:
            self._run_until(self.all_done | self._deadline())
        finally:
            if gc_was:
                gc.enable()
        for rep in self.replicas:  # engines that keep per-request state lazily bring it up to date
            rep.engine.settle()
        self.abandon("simulation ended (drain_s)")
        if self.progress is not None:
            self.progress(env.now, len(self.rows))
        return Result(self.sc, self.rows, self._itl(), self.series,
                      [r.engine.stats() for r in self.replicas], env.now,
                      self.pool.status(events=True) if self.pool is not None else None)

    def _run_until(self, until):
        """env.run(until=until) with Environment.step() inlined (a method call and a try block per
        event add up over ~4 events per request); the same events in the same order."""
        env = self.env
        if type(env) is not simpy.Environment:
            env.run(until=until)
            return
        stop: list = []
        until.callbacks.append(stop.append)
        q = env._queue
        pop = heapq.heappop
        while not stop:
            if not q:
                raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {until}')
            env._now, _, _, event = pop(q)
            callbacks, event.callbacks = event.callbacks, None
            for callback in callbacks:
                callback(event)
            if not event._ok and not hasattr(event, "_defused"):
                exc = type(event._value)(*event._value.args)  # as step(): a failed event nobody handled
                exc.__cause__ = event._value
                raise exc

    def _deadline(self):
        def stopper():
            yield self.arrivals_finished
            yield self.env.timeout(self.sc.drain_s)
        return self.env.process(stopper())

    def abandon(self, reason: str) -> None:
        """End every admitted request still open as a timeout now (the run, or the twin server, stops)."""
        now = self.env.now
        for req in sorted(self.live.values(), key=lambda r: r.rid):
            if req.outcome is None:
                req.error = reason
                if req.start is None:  # counted as queued by hold()
                    self.queued -= 1
                self.finish(req, "timeout", now)

    def _pool(self):
        vals, ws = [], []
        for g, w in zip(self.itl_vals, self.itl_w):
            g = np.atleast_1d(np.asarray(g, dtype=float))
            vals.append(g)
            ws.append(np.full(g.size, w, dtype=np.int64))
        return np.concatenate(vals), np.concatenate(ws)

    def _itl(self):
        parts = self.itl_chunks + ([self._pool()] if self.itl_vals else [])
        if not parts:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([v for v, _ in parts]), np.concatenate([w for _, w in parts])


def simulate(sc: Scenario, progress=None) -> Result:
    return World(sc, progress).run()
