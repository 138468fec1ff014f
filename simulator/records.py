"""The one per-request record schema, written by `sim run`, `stress run` and `sim serve` alike.

A Request is a plain object (no SimPy process of its own) that the world moves from stage to
stage; when it ends, whatever the outcome, it becomes one row of requests.csv.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

OUTCOMES = ("ok", "rejected_queue_full", "rejected_rate_limited", "rejected_quota", "rejected_degraded",
            "timeout", "http_error", "connection_error", "stream_error", "not_sent")

# (column, type) — the contract. Times are seconds; for the simulator they are relative to t=0,
# for the stress tester relative to the run start on a monotonic clock.
COLUMNS: tuple[tuple[str, type], ...] = (
    ("request_id", int), ("class_name", str), ("user", str), ("project", str), ("model", str),
    ("tier", str), ("priority", int), ("stream", int),
    ("scheduled_s", float), ("arrival_s", float), ("outcome", str), ("error", str), ("degradation_level", str),
    ("prompt_tokens", int), ("requested_max_tokens", int), ("applied_max_tokens", int), ("output_tokens", int),
    ("queue_wait_s", float), ("ttft_s", float), ("tpot_s", float), ("itl_mean_s", float), ("itl_max_s", float),
    ("e2e_s", float), ("end_s", float), ("replica", int), ("batch_size", int),
    ("prefix_hit_tokens", int), ("preemptions", int), ("http_status", int), ("cost", float),
)
COLUMN_NAMES = tuple(c for c, _ in COLUMNS)


class Request:
    """A request in flight. Times are absolute (simulation clock); records turn them into latencies."""

    __slots__ = (
        "rid", "cls", "class_name", "user", "project", "model", "tier", "priority", "stream",
        "arrival", "scheduled", "prompt", "output", "requested_max", "applied_max", "timeout", "deadline",
        "prefix_hashes", "level", "outcome", "error", "replica", "batch_size", "start", "first_token",
        "last_token", "end", "generated", "itl_max", "prefilled", "cached", "preemptions", "blocks", "http_status",
        "done", "sched_key", "seq", "cost",
        # engine-private state of the continuous engine (set at enqueue, not here: __init__ is on the hot path)
        "computed", "prefill_to", "dec_base", "dec_since", "units",
    )

    def __init__(self, rid, cls, arrival, prompt, output, requested_max, timeout, prefix_hashes=None):
        self.rid = rid
        self.cls = cls  # TrafficClass index
        self.arrival = arrival
        self.scheduled = arrival
        self.prompt = prompt
        self.output = output  # tokens the request would generate if not capped (ignore_eos length)
        self.requested_max = requested_max
        self.applied_max = requested_max
        self.timeout = timeout
        self.deadline = arrival + timeout
        self.prefix_hashes = prefix_hashes
        self.level = ""
        self.outcome = None
        self.error = ""
        self.replica = -1
        self.batch_size = 0
        self.start = None  # first prefill began
        self.first_token = None
        self.last_token = None
        self.end = None
        self.generated = 0
        self.itl_max = 0.0
        self.prefilled = 0  # prompt (+ recomputed) tokens prefilled so far
        self.cached = 0  # prompt tokens served from the prefix cache
        self.preemptions = 0
        self.blocks = 0
        self.http_status = 0
        self.done = None  # SimPy event for closed-loop users only
        self.cost = 0.0

    @property
    def target(self) -> int:
        """Tokens this request will generate: its natural length, capped by the applied max_tokens."""
        return self.output if self.output < self.applied_max else self.applied_max


def _f_any(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(round(x, 9)) if isinstance(x, float) else x


def row(req: Request, names: dict) -> list:
    """A request -> a CSV row. `names` holds per-class strings (class, user, project, model, tier)."""
    ok = req.outcome == "ok"
    e2e = (req.end - req.arrival) if (ok and req.end is not None) else None
    tpot = None
    if not req.stream:
        # a non-streaming client receives every token with the final response (METRICS.md: "received")
        ttft = e2e
    else:
        ttft = (req.first_token - req.arrival) if req.first_token is not None else None
        if ok and req.generated > 1 and ttft is not None:
            tpot = (req.last_token - req.first_token) / (req.generated - 1)
    wait = (req.start - req.arrival) if req.start is not None else None
    c = names[req.cls] if names else (req.class_name, req.user, req.project, req.model, req.tier)
    arrival = req.arrival
    sched = req.scheduled
    # repr(round(x, 9)) for times and cost, "" for None/NaN. Fast path (runs once per simulated request): for
    # a plain float with 1e-4 <= |x| < 1e6 or zero, "%.9f" rounds exactly as round(x, 9) does and, with
    # trailing zeros dropped, is that value's repr (at most 15 significant digits); repr switches to
    # exponent notation below 1e-4, so everything else takes _f_any.
    ar, wa, tt, tp, im, e2, en, co = [
        (s + "0" if (s := f"{x:.9f}".rstrip("0"))[-1] == "." else s)
        if x.__class__ is float and (1e-4 <= x < 1e6 or -1e6 < x <= -1e-4 or x == 0.0) else _f_any(x)
        for x in (arrival, wait, ttft if ok else None, tpot, req.itl_max if tpot is not None else None,
                  e2e, req.end, req.cost)]
    sc = ar if sched == arrival else _f_any(sched)  # the simulator's requests arrive when scheduled
    return [
        req.rid, c[0], c[1], c[2], c[3], c[4], req.priority, int(req.stream),
        sc, ar, req.outcome, req.error, req.level,
        req.prompt, req.requested_max, req.applied_max, req.generated,
        wa, tt, tp, tp, im, e2, en, req.replica, req.batch_size, req.cached, req.preemptions, req.http_status, co,
    ]


def write_csv(path: Path, rows: list[list]) -> None:
    rows = sorted(rows, key=lambda r: r[0])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLUMN_NAMES)
        w.writerows(rows)


def read_csv(path: Path):
    """Records as a DataFrame with the schema's dtypes; a clear error for a file of another schema."""
    import pandas as pd
    from .errors import InputError
    text_cols = {c: str for c in ("class_name", "user", "project", "model", "tier", "outcome", "error", "degradation_level")}
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values={c: [""] for c, t in COLUMNS if t is not str},
                         dtype=text_cols)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise InputError(str(path), "", f"cannot read records CSV: {exc}") from None
    return check_columns(df, path)


def check_columns(df, path):
    """`df` if it has every record column, else the file's one-line error (CSV and Parquet readers alike)."""
    from .errors import InputError
    missing = [c for c in COLUMN_NAMES if c not in df.columns]
    if missing:
        raise InputError(str(path), "columns", f"not a servesim records file, missing {missing[:5]}")
    return df
