"""The scenario's world with HTTP requests as its arrivals.

`LiveWorld` is the simulator's `World` minus its arrival processes: every request comes from the
server, enters through the same gateway, router, scheduler and engine, and reports back through
three hooks (started, each token, finished) that the server turns into HTTP responses, metrics and
usage rows. Engines step one iteration per event (fast-forward off) so each token is known by the
time its step ends on the wall clock.
"""
from __future__ import annotations

import heapq

import numpy as np

from ..records import row
from ..world import World
from .spool import RecordSpool


class LiveWorld(World):
    def __init__(self, sc):
        sc = sc.model_copy(deep=True)
        sc.engine.fast_forward = False
        super().__init__(sc)
        self.rows = RecordSpool()  # finished records go to disk: a server may run for days
        self.on_start = None
        self.on_finish = None
        self.status_of = None  # outcome, req -> HTTP status, stored in the record
        self.decide = None  # req, outcome -> (outcome, hold the record until the answer is delivered)
        self.holding = False  # set while finish() holds back the record of the request it ends
    def _build_replicas(self):
        # Engines keep a reference to the per-class tokens-per-prefix-id array, so it is sized here,
        # before they exist, for every class the server may derive. Twin requests carry ids computed
        # from their text in blocks of this many words; a class whose stream had no ids (1 token per
        # id) gets the engine's block size instead, or long prompts would carry thousands of ids.
        sc = self.sc
        hb = self.stream.hash_block
        n = len(sc.workload.classes)
        cap = n * (1 + len(sc.tenants.users) * len(sc.tenants.models))
        grown = np.full(cap, sc.engine.block_size, dtype=hb.dtype)
        grown[:n] = np.where(hb <= 1, sc.engine.block_size, hb)
        self.stream.hash_block = grown
        super()._build_replicas()

    def begin(self) -> None:
        """Start the world's background processes; arrivals are the server's business."""
        self.env.process(self.reaper())
        self.env.process(self.monitor())

    def started(self, req, now):
        super().started(req, now)
        if self.on_start is not None:
            self.on_start(req)

    def finish(self, req, outcome, t):
        hold = False
        if self.decide is not None:
            outcome, hold = self.decide(req, outcome)
        if self.status_of is not None and not req.http_status:
            req.http_status = self.status_of(outcome, req)
        if hold:  # World.finish appends the row: hold back this request's, the server records it once delivered
            rows, self.rows = self.rows, _HoldRow(self.rows, req.rid)
            try:
                super().finish(req, outcome, t)
            finally:
                self.rows = rows
        else:
            super().finish(req, outcome, t)
        self.holding = hold
        try:
            if self.on_finish is not None:
                self.on_finish(req)
        finally:
            self.holding = False

    def record(self, req) -> None:
        """The record of a request whose row finish() held back (outcome possibly amended since)."""
        self.rows.append(row(req, self.names))

    def fail(self, req, error: str) -> None:
        """`req` raised on its way in: finish it as a 500 at once and give back what it held (its
        queue slot above all), as the reaper does for a request that times out in a queue."""
        if req.outcome is not None:
            return
        req.error, req.http_status = error, 500
        held = req.rid in self.live and req.start is None
        if held:
            self.queued -= 1
        self.finish(req, "http_error", self.env.now)
        if held and req.replica >= 0:
            try:
                self.replicas[req.replica].engine.dropped(req)
            except Exception:  # noqa: BLE001 - the engine never counted it
                pass

    def abort(self, req, reason: str) -> None:
        """The client hung up: as a client timeout in the simulator, at this instant.

        A queued request is left to the reaper and a running one to its engine, which already handle
        deadlines, so queue counts, KV blocks and quota refunds are released the usual way."""
        if req.outcome is not None:
            return
        req.error = reason
        now = self.env.now
        req.deadline = now
        if req.start is None:  # in an engine's queue or held by a model pool: the reaper's case
            heapq.heappush(self.deadlines, (now, req.rid))
            self._kick_reaper(now)

    def add_class(self, names: tuple, info: tuple, like: int) -> int:
        """A class for a (user, model) pairing the scenario does not list; returns its index."""
        idx = len(self.names)
        self.names.append(names)
        self.cinfo.append(info)
        self.stream.hash_block[idx] = self.stream.hash_block[like]  # sized for this in _build_replicas
        return idx

    def queue_status(self) -> dict:
        gw = self.gateway
        index = gw.level_at(self.queued)
        lvl = gw.levels[index] if gw.levels else None
        actions = []
        if lvl is not None:
            if lvl.max_tokens_cap is not None:
                actions.append(f"max_tokens_cap={lvl.max_tokens_cap}")
            actions += [f"reject_tier={t}" for t in lvl.reject_tiers]
            actions += [f"reject_class={c}" for c in lvl.reject_classes]
        return {
            "queued": self.queued,
            "running": sum(len(r.engine.running) for r in self.replicas),
            "inflight": self.inflight,
            "max_queue": gw.max_queue,
            "queue_usage": round(self.queued / gw.max_queue, 6) if gw.max_queue else None,
            "degradation_level": lvl.name if lvl is not None else None,
            "degradation_index": index if lvl is not None else None,
            "active_actions": actions,
            "replicas": [{"index": r.index, "model": r.model, "queued": len(r.engine.queue),
                          "running": len(r.engine.running), "kv_util": round(float(r.engine.kv_util()), 6)}
                         for r in self.replicas],
        }


class _HoldRow:
    """Stands in for the record spool during one finish(): drops the row of request `rid` (it is
    written later, by record()) and passes any other through."""

    def __init__(self, rows, rid):
        self.rows, self.rid = rows, rid

    def append(self, r) -> None:
        if r[0] != self.rid:
            self.rows.append(r)

    def __len__(self) -> int:
        return len(self.rows)
