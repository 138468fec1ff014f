"""Waiting-queue policies. Each is a small queue class registered by name.

All keys are static, so a heap suffices: linear aging (priority falls by one level per aging_s of
waiting) orders requests by priority*aging_s + arrival, since the common `now` term cancels.
"""
from __future__ import annotations

import heapq
from collections import deque

from .registry import Registry

SCHEDULERS = Registry("scheduler")


class _HeapQueue(list):
    """A heap of (key, seq, request). It is the list itself so that len() and truth tests, which the
    engines make several times per request, are the list's own C calls rather than a Python __len__."""

    def __init__(self, cfg=None):
        super().__init__()
        self.seq = 0

    def key(self, req):  # pragma: no cover - overridden
        raise NotImplementedError

    def push(self, req):
        self.seq += 1
        heapq.heappush(self, (self.key(req), self.seq, req))

    def push_front(self, req):
        """Preempted requests go back with their original key (they keep their place)."""
        self.seq += 1
        heapq.heappush(self, (self.key(req), -self.seq, req))

    def pop(self):  # (replaces list.pop: a queue pops its head)
        return heapq.heappop(self)[2]

    def peek(self):
        return self[0][2]

    def __iter__(self):
        return (x[2] for x in sorted(list.__iter__(self)))

    __hash__ = object.__hash__  # a queue is one object, not a value


@SCHEDULERS.register("fifo")
class FIFO(deque):
    """Arrival order. A deque itself, for the same reason as _HeapQueue."""

    def __init__(self, cfg=None):
        super().__init__()

    push = deque.append
    push_front = deque.appendleft
    pop = deque.popleft  # (replaces deque.pop: a queue pops its head)

    def peek(self):
        return self[0]

    __hash__ = object.__hash__


@SCHEDULERS.register("priority")
class Priority(_HeapQueue):
    def key(self, req):
        return (req.priority, req.arrival)


@SCHEDULERS.register("priority_aging")
class PriorityAging(_HeapQueue):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.aging_s = cfg.aging_s

    def key(self, req):
        return req.priority * self.aging_s + req.arrival


@SCHEDULERS.register("sjf")
class ShortestJobFirst(_HeapQueue):
    """Shortest predicted job: prompt plus the applied max_tokens (what a server knows at admission)."""

    def key(self, req):
        return (req.prompt + req.applied_max, req.arrival)
