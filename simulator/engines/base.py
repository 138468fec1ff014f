"""What every engine shares: its queue, its idle wake-up, and taking live requests off the queue."""
from __future__ import annotations


class EngineBase:
    def __init__(self, world, index, cfg, cost, queue):
        self.world, self.index, self.cfg, self.cost, self.queue = world, index, cfg, cost, queue
        self.env = world.env
        self.running: list = []
        self.wakeup = None
        self.steps = 0
        self.busy_s = 0.0
        self.batch_sizes: dict[int, int] = {}
        self._start()

    # called by the world
    def enqueue(self, req) -> None:
        self.queue.push(req)
        w = self.wakeup
        if w is not None and not w.triggered:
            w.succeed()

    def outstanding(self) -> int:
        return len(self.queue) + len(self.running)

    def streaming(self) -> int:
        """Responses being streamed now (the front end's per-stream work, CostModel.frontend_per_stream_s)."""
        return sum(1 for r in self.running if r.stream and r.generated > 0)

    def kv_load(self) -> float:
        return 0.0

    def kv_util(self) -> float:
        return 0.0

    def dropped(self, req) -> None:
        """The reaper timed out `req` while it was still queued here (engines with queue totals adjust)."""

    def settle(self) -> None:
        """The run is over: bring lazily kept per-request state up to date before leftovers are recorded."""

    def stats(self) -> dict:
        return {"replica": self.index, "steps": self.steps, "busy_s": self.busy_s,
                "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    # used by loops
    def _start(self):
        """Start the engine's loop (a SimPy process unless the engine drives itself by callbacks)."""
        self.proc = self.env.process(self.loop())

    def idle(self):
        self.wakeup = self.env.event()
        return self.wakeup

    def take(self):
        """Next queued request that is still wanted (the reaper may have timed some out)."""
        q = self.queue
        while len(q):
            req = q.pop()
            if req.outcome is None:
                self.world.started(req, self.env.now)
                return req
        return None

    def has_waiting(self) -> bool:
        q = self.queue
        while len(q):
            if q.peek().outcome is None:
                return True
            q.pop()
        return False

    def loop(self):  # pragma: no cover - each engine defines it
        raise NotImplementedError
        yield
