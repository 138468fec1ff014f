"""`stress run`: plan -> one or N sending processes -> merged records -> the simulator's report writer.

With --workers N the open-loop schedule is dealt round-robin to N processes, each with its own event
loop and connection pool, all sending against one start time on the system-wide monotonic clock
(time.perf_counter is CLOCK_MONOTONIC on Linux, shared by all processes). Closed-loop users live in
worker 0. Children ignore SIGINT and stop on the SIGTERM their parent forwards, so one Ctrl-C gives
one grace period whether it reached the whole process group or the parent alone.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from time import perf_counter

import numpy as np

from simulator.metrics import summarize
from simulator.records import COLUMN_NAMES
from simulator.report import write_report
from simulator.runfolder import CLIENT_COLUMNS, OPTIONAL_CLIENT, TOKEN_PARTS, merge_token_parts

from .client import Job
from .facts import probe
from .runner import SPIN_S, Options, Part, Runner, to_part
from .schedule import Plan, build_plan, not_sent

LAG_LIMIT_S = 0.010  # flag the run above this p99 schedule lag
RATE_SHARE = 0.90  # ... or below this share of the requested rate
READY_TIMEOUT_S = 60.0
ERROR_COL = COLUMN_NAMES.index("error")


# ------------------------------------------------------------------ accuracy
def accuracy(lag_pairs: np.ndarray, opts: Options, workers: int, parts: list, n_rows: int, n_scheduled: int) -> dict:
    """Schedule lag and requested vs achieved rate over the open-loop requests that were sent, and
    time to first byte (headers in) of ok requests, next to TTFT in the latency section."""
    out = {"api": opts.api, "base_url": opts.base_url, "workers": workers, "concurrency": opts.concurrency,
           "spin_ms": (SPIN_S if opts.spin_s is None else opts.spin_s) * 1e3,
           "retry": opts.retry, "scheduled_open_loop": n_scheduled, "records": n_rows,
           "sent_open_loop": int(len(lag_pairs)),
           "stop_reason": next((p.stop_reason for p in parts if p.stop_reason), "")}
    for k in ("retries", "usage_reported", "usage_differs_from_chunks", "usage_exceeds_max_tokens",
              "output_length_differs", "stale_connection_resends"):
        out[k] = int(sum(p.counters.get(k, 0) for p in parts))
    notes = []
    for p in parts:
        for n in p.notes or ():
            if n not in notes:
                notes.append(n)
    out["notes"] = notes
    ttfb = np.frombuffer(b"".join(p.ttfb for p in parts), dtype=np.float64)
    if ttfb.size:
        q = np.percentile(ttfb, [50, 90, 99])
        out["ttfb_ms"] = {"count": int(ttfb.size), "p50": round(float(q[0]) * 1e3, 4), "p90": round(float(q[1]) * 1e3, 4),
                          "p99": round(float(q[2]) * 1e3, 4)}
    warnings = []
    if len(lag_pairs):
        sched, sent = lag_pairs[:, 0], lag_pairs[:, 1]
        lag = sent - sched
        p50, p99 = np.percentile(lag, [50, 99])
        out["lag_ms"] = {"mean": round(float(lag.mean()) * 1e3, 4), "p50": round(float(p50) * 1e3, 4),
                         "p99": round(float(p99) * 1e3, 4), "max": round(float(lag.max()) * 1e3, 4)}
        if p99 > LAG_LIMIT_S:
            warnings.append(f"schedule lag p99 {p99 * 1e3:.1f} ms > {LAG_LIMIT_S * 1e3:.0f} ms")
        if len(lag) > 1:
            span_req = sched.max() - sched.min()
            span_got = sent.max() - sent.min()
            req = (len(lag) - 1) / span_req if span_req > 0 else None
            got = (len(lag) - 1) / span_got if span_got > 0 else None
            out["requested_rate"] = None if req is None else round(float(req), 3)
            out["achieved_rate"] = None if got is None else round(float(got), 3)
            if req and got is not None and got < RATE_SHARE * req:
                warnings.append(f"achieved rate {got:.1f}/s < {RATE_SHARE:.0%} of requested {req:.1f}/s")
    out["flagged"] = bool(warnings)
    out["warnings"] = warnings
    out["thresholds"] = {"lag_p99_ms": LAG_LIMIT_S * 1e3, "rate_share": RATE_SHARE}
    return out


# ------------------------------------------------------------------ processes
def _child(plan: Plan, opts: Options, k: int, n: int, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    early: list = []  # a stop forwarded before this worker's event loop listens for it
    signal.signal(signal.SIGTERM, lambda *_: early.append(1))
    runner = None
    try:
        last = [0.0]

        def progress(sent, done, final):
            now = perf_counter()
            if final or now - last[0] >= 0.2:
                last[0] = now
                conn.send(("progress", k, sent, done))
        runner = Runner(plan, opts, range(k, len(plan), n), closed=(k == 0), progress=progress, worker=k)

        def start():  # called with the loop and session up, so the common start finds every worker ready
            conn.send(("ready", k))
            t0 = conn.recv()
            if early:
                runner.request_stop("interrupted (SIGTERM)")
            return t0
        part = runner.run(start, signals=(signal.SIGTERM,))
        conn.send(("part", k, part))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records the loss
        try:
            conn.send(("error", k, f"{type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


def run_workers(plan: Plan, opts: Options, n: int, log=print) -> list[Part]:
    ctx = mp.get_context("fork")  # the parent runs no event loop or threads yet: forking is safe and fast
    conns, procs = [], []
    state = {"signals": 0, "name": ""}
    prev = {}

    parent = os.getpid()

    def forward(signum, _frame):
        if os.getpid() != parent:  # a child between fork and setting its own handlers
            return
        state["signals"] += 1
        state["name"] = state["name"] or signal.Signals(signum).name
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
    for s in (signal.SIGINT, signal.SIGTERM):
        prev[s] = signal.signal(s, forward)
    for k in range(n):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_child, args=(plan, opts, k, n, b), daemon=True)
        p.start()
        b.close()
        conns.append(a)
        procs.append(p)
    parts: dict[int, Part] = {}
    errors: dict[int, str] = {}
    progress = {k: (0, 0) for k in range(n)}
    try:
        ready = set()
        deadline = perf_counter() + READY_TIMEOUT_S
        while len(ready) < n and perf_counter() < deadline:
            for c in mp_wait([conns[k] for k in range(n) if k not in ready and k not in errors], timeout=1.0):
                k = conns.index(c)
                msg = _recv(c)
                if msg is None or msg[0] == "error":
                    errors[k] = msg[2] if msg else "worker exited"
                else:
                    ready.add(k)
            if len(ready) + len(errors) == n:
                break
        t0 = perf_counter() + 0.05
        for k in ready:
            conns[k].send(t0)
        open_ = set(ready)
        while open_:
            for c in mp_wait([conns[k] for k in open_], timeout=0.25):
                k = conns.index(c)
                msg = _recv(c)
                if msg is None:
                    errors[k] = "worker exited without its records"
                    open_.discard(k)
                elif msg[0] == "progress":
                    progress[k] = (msg[2], msg[3])
                elif msg[0] == "part":
                    parts[k] = msg[2]
                    open_.discard(k)
                else:
                    errors[k] = msg[2]
                    open_.discard(k)
            if opts.progress_file:
                _write_progress(opts.progress_file, sum(s for s, _ in progress.values()),
                                sum(d for _, d in progress.values()), len(plan), False)
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if state["name"]:  # the children saw the forwarded SIGTERM; the user sent this one
        for p in parts.values():
            if p.stop_reason.startswith("interrupted"):
                old, p.stop_reason = p.stop_reason, f"interrupted ({state['name']})"
                for r in p.rows:
                    if r[ERROR_COL] == old:  # not_sent rows name the stop
                        r[ERROR_COL] = p.stop_reason
    out = []
    for k in range(n):
        if k in parts:
            out.append(parts[k])
        else:
            # a worker that died took no records with it: its share is still accounted for
            why = f"worker {k} failed: {errors.get(k, 'no answer')}"
            log(f"error: {why}", file=sys.stderr)
            jobs = [not_sent(plan, i, why, Job) for i in range(k, len(plan), n)]
            out.append(to_part(plan, jobs, b"", 0, why))
    return out


def _recv(c):
    try:
        return c.recv()
    except (EOFError, OSError):
        return None


def _write_progress(path, sent, done, scheduled, final):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"sent": sent, "done": done, "scheduled": scheduled, "final": final}, fh)
    os.replace(tmp, path)


# ------------------------------------------------------------------ the command's body
def run_stress(sc, opts: Options, out: Path, workers: int = 1, plots: bool = True, log=print,
               stopped_early: str | None = None) -> dict:
    """Facts about the server, the run, then the run folder: requests.csv and the report (as `sim run`),
    client.csv, tokens.parquet (per-chunk arrivals, kept on disk while running) and server.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(TOKEN_PARTS):  # a previous run's leftovers would mix with this one's
        old.unlink()
    plan = build_plan(sc)
    none = {"kind": "unknown", "facts": {}, "raw": {}}
    stopped = [stopped_early] if stopped_early else []
    if not stopped:
        with start_up() as stopped:  # a signal before the first send still ends in a report: all not_sent
            facts_start = probe(opts.base_url, opts.model) if opts.probe else none
    if stopped:
        why = f"interrupted ({stopped[0]}) during start-up"
        part = to_part(plan, [not_sent(plan, i, why, Job) for i in range(len(plan))], b"", 0, why)
        return _report(sc, opts, out, [part], none, none, 1, len(plan), plots, log, "")
    opts = dataclasses.replace(opts, record_dir=str(out), server_kind=facts_start["kind"])
    if opts.prompt_salt is None:  # a run never meets an earlier run's prompts in a prefix cache
        opts = dataclasses.replace(opts, prompt_salt=int.from_bytes(os.urandom(3), "big") % 100000)
    served = [m.get("id") for m in facts_start["raw"].get("models") or [] if m.get("id")]
    wanted = {c.model for c in plan.classes}
    model_note = ""
    if opts.model is None and served and not wanted & set(served):
        # the scenario's model names are not this server's: send the one it serves (vLLM --served-model-name)
        opts = dataclasses.replace(opts, model=served[0])
        model_note = (f"the server serves {served[:4]} and none of the scenario's models {sorted(wanted)}: "
                      f"sent model {served[0]!r} (choose with --model)")
    if opts.spin_s is None and workers >= (os.cpu_count() or 1):
        opts = dataclasses.replace(opts, spin_s=0.0)
    if workers > 1:
        parts = run_workers(plan, opts, workers, log)
    else:
        parts = [Runner(plan, opts).run()]
    with start_up() as stopped:  # a second signal while asking the server again: skip the end facts
        facts_end = probe(opts.base_url, opts.model) if opts.probe and not _interrupted(parts) else none
    if stopped:
        facts_end = none
    return _report(sc, opts, out, parts, facts_start, facts_end, workers, len(plan), plots, log, model_note)


def _interrupted(parts) -> bool:
    return any(p.stop_reason.startswith("interrupted") for p in parts)


class start_up:
    """SIGINT/SIGTERM while no event loop listens (start-up, the end facts) stop that phase only: the
    context yields a list that holds the signal's name once one came."""

    def __enter__(self):
        self.got, self.prev = [], {}

        def on(signum, _frame):
            self.got.append(signal.Signals(signum).name)
            raise KeyboardInterrupt
        for sg in (signal.SIGINT, signal.SIGTERM):
            try:
                self.prev[sg] = signal.signal(sg, on)
            except ValueError:  # not the main thread: the caller owns signals
                pass
        return self.got

    def __exit__(self, exc_type, exc, tb):
        for sg, h in self.prev.items():
            signal.signal(sg, h)
        return exc_type is KeyboardInterrupt and bool(self.got)


def _report(sc, opts, out, parts, facts_start, facts_end, workers, n_plan, plots, log, model_note) -> dict:
    rows = [r for p in parts for r in p.rows]
    rows.sort(key=lambda r: r[0])
    lag = np.frombuffer(b"".join(p.lag for p in parts), dtype=np.float64).reshape(-1, 2)
    gaps = np.frombuffer(b"".join(p.itl for p in parts), dtype=np.float64)
    acc = accuracy(lag, opts, workers, parts, len(rows), n_plan)
    acc["prompt_salt"] = opts.prompt_salt
    if model_note:
        acc["notes"].insert(0, model_note)
    samples = sorted(x for p in parts for x in (p.samples or ()))
    server = {"kind": facts_start["kind"], "facts": {**facts_end["facts"], **facts_start["facts"]},  # start wins
              "start": facts_start["raw"], "end": facts_end["raw"],
              "samples": [{"t_s": t, "running": r, "waiting": w} for t, r, w in samples]}
    acc["server"] = {"kind": server["kind"], "facts": server["facts"], "gauge_samples": len(samples)}
    write_client_csv(out / "client.csv", sorted(c for p in parts for c in (p.client_rows or ())))
    merge_token_parts(out)
    (out / "server.json").write_text(json.dumps(server, indent=1, sort_keys=True, default=str) + "\n")
    summary = write_report(out, sc, rows,
                           lambda df: summarize(df, sc, (gaps, np.ones(gaps.size)), None, "stress", {"stress": acc}),
                           plots, title="stress run")
    for w in acc["warnings"]:
        log(f"warning: {w}: the offered load is below the scenario's; see summary.json stress", file=sys.stderr)
    for n in acc["notes"]:
        log(f"note: {n}", file=sys.stderr)
    if opts.progress_file:
        _write_progress(opts.progress_file, len(rows), len(rows), n_plan, True)
    return summary


def write_client_csv(path: Path, rows: list) -> None:
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CLIENT_COLUMNS + OPTIONAL_CLIENT)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
