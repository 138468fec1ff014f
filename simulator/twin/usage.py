"""Request lifecycle and per-user / per-project usage in SQLite, kept across restarts.

One thread owns the connection. The event loop only enqueues: writes are batched into one
transaction per wake-up of the thread, so streaming never waits on the disk; reads travel through
the same queue, so they see every write made before them.

A write that fails (any exception, not only sqlite3's) is counted and shown in /health as
`usage_error`; the writer goes on with the next one. Should the thread die all the same, the next
write or read notices, records why in `usage_error` and starts a new one on the same queue, so
nothing queued is lost and /usage/* keeps answering. Rows a killed server left queued or running
are closed out when the store next opens (`closed_at_start`).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("servesim.twin")
READ_TIMEOUT_S = 10.0
KILLED = "server stopped before the request finished (closed out at the next start)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, run TEXT, api TEXT, user TEXT, project TEXT, model TEXT, class_name TEXT,
    priority INTEGER, status TEXT, outcome TEXT, http_status INTEGER, error TEXT,
    created_at REAL, started_at REAL, first_token_at REAL, finished_at REAL,
    prompt_tokens INTEGER, max_tokens INTEGER, output_tokens INTEGER DEFAULT 0, cost REAL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created_at);
CREATE INDEX IF NOT EXISTS requests_user ON requests(user);
CREATE INDEX IF NOT EXISTS requests_project ON requests(project);
CREATE TABLE IF NOT EXISTS usage (
    scope TEXT, key TEXT, model TEXT, requests INTEGER, completed INTEGER, rejected INTEGER, failed INTEGER,
    prompt_tokens INTEGER, output_tokens INTEGER, cost REAL, last_at REAL,
    PRIMARY KEY (scope, key, model)
);
"""

_UPSERT = """
INSERT INTO usage VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(scope, key, model) DO UPDATE SET
    requests = requests + 1, completed = completed + excluded.completed, rejected = rejected + excluded.rejected,
    failed = failed + excluded.failed, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    output_tokens = output_tokens + excluded.output_tokens, cost = cost + excluded.cost, last_at = excluded.last_at
"""

TOTALS = ("requests", "completed", "rejected", "failed", "prompt_tokens", "output_tokens", "cost")


class UsageUnavailable(RuntimeError):
    """A read the store could not answer in time (the server answers 503)."""


def status_of(req) -> str:
    o = req.outcome
    if o is None:
        return "queued" if req.start is None else "running"
    if o == "ok":
        return "completed"
    if o.startswith("rejected_"):
        return "rejected"
    if o == "timeout" and req.error == "client disconnected":
        return "cancelled"
    return "failed"


class UsageStore:
    def __init__(self, path: Path, run: str = ""):
        self.path = Path(path)
        self.run = run
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.error: str | None = None  # the last failure, as text
        self.failed_writes = 0
        self.restarts = 0
        self.closed_at_start = 0
        self._closing = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def open(self) -> None:
        """Create the file and schema now, so a bad path fails at start-up, not at the first request;
        close out rows an earlier server left open (killed before it could finish them)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
        self.closed_at_start = close_out(conn, self.run, time.time())
        conn.commit()
        if self.closed_at_start:
            log.warning("usage db %s: %d requests of an earlier run were still open; closed out as timeouts",
                        self.path, self.closed_at_start)
        self._spawn(conn)

    def _spawn(self, conn) -> None:
        self.thread = threading.Thread(target=self._run, args=(conn,), name="twin-usage", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        """True when the writer runs; a dead one is restarted here (and the reason kept in `error`)."""
        th = self.thread
        if th is None or self._closing:
            return False
        if th.is_alive():
            return True
        with self._lock:
            if self.thread is th and not self._closing:
                self.restarts += 1
                log.error("usage writer died (%s); restarting it (restart %d)", self.error, self.restarts)
                self._spawn(self._connect())
        return self.thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            self.alive()
            self._closing = True
            self.q.put(None)
            self.thread.join(timeout)
            self.thread = None

    def _put(self, item) -> None:
        self.q.put(item)
        if not self.thread.is_alive():
            self.alive()

    def health(self) -> dict:
        return {"usage_writer": "running" if self.alive() else "stopped", "usage_error": self.error,
                "usage_failed_writes": self.failed_writes, "usage_writer_restarts": self.restarts,
                "usage_closed_at_start": self.closed_at_start}

    # ---------------------------------------------------------------- writes (fire and forget)
    def created(self, t, run: str) -> None:
        r = t.req
        self._put(("INSERT OR REPLACE INTO requests (id, run, api, user, project, model, class_name, priority, status,"
                    " created_at, prompt_tokens, max_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (t.id, run, t.call.api, r.user, r.project, r.model, r.class_name, r.priority, t.wall(r.arrival),
                     r.prompt, r.requested_max)))

    def started(self, t) -> None:
        self._put(("UPDATE requests SET status = 'running', started_at = ? WHERE id = ?", (t.wall(t.req.start), t.id)))

    def finished(self, t) -> None:
        r = t.req
        st = status_of(r)
        fin = t.wall(r.end)
        self._put(("UPDATE requests SET status = ?, outcome = ?, http_status = ?, error = ?, first_token_at = ?,"
                    " finished_at = ?, output_tokens = ?, cost = ? WHERE id = ?",
                    (st, r.outcome, r.http_status, r.error, t.wall(r.first_token), fin, r.generated, r.cost, t.id)))
        # prompt tokens are billed once prefill began; rejected requests cost what their record says
        prompt = r.prompt if r.start is not None else 0
        flags = (int(st == "completed"), int(st == "rejected"), int(st in ("failed", "cancelled")))
        for scope, key in (("user", r.user), ("project", r.project)):
            self._put((_UPSERT, (scope, key, r.model, *flags, prompt, r.generated, r.cost, fin)))

    # ---------------------------------------------------------------- reads
    async def read(self, fn):
        """Run `fn(conn)` on the store's thread after every write queued so far; returns its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._put((fn, (loop, fut)))
        try:  # a writer that died holding this read never answers it: give up rather than hang the caller
            return await asyncio.wait_for(fut, READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UsageUnavailable(f"usage store did not answer within {READ_TIMEOUT_S:g} s"
                                   f" ({self.error or 'writer busy'})") from None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            self._loop(conn)
        except BaseException as e:  # noqa: BLE001 - the next write or read restarts the writer
            self.error = f"usage writer died: {type(e).__name__}: {e}"
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            raise

    def _loop(self, conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row
        stop = False
        while not stop:
            batch = [self.q.get()]
            while True:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    stop = True
                    continue
                what, arg = item
                if callable(what):
                    loop, fut = arg
                    try:
                        res, exc = what(conn), None
                    except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
                        res, exc = None, e
                    loop.call_soon_threadsafe(_settle, fut, res, exc)
                else:
                    try:
                        conn.execute(what, arg)
                    except Exception as e:  # noqa: BLE001 - keep serving; /health reports it
                        self.failed_writes += 1
                        self.error = f"usage write failed: {type(e).__name__}: {e}"
            try:
                conn.commit()
            except sqlite3.Error as e:
                self.failed_writes += 1
                self.error = f"usage commit failed: {type(e).__name__}: {e}"
        conn.close()


def _settle(fut, res, exc):
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)


def close_out(conn, run: str, now: float) -> int:
    """Requests another run left queued or running (its server was killed): failed, as timeouts, and
    counted in the usage totals as failures with the prompt billed where prefill had begun."""
    rows = conn.execute("SELECT id, user, project, model, started_at, prompt_tokens, output_tokens, cost FROM requests "
                        "WHERE status IN ('queued', 'running') AND run IS NOT ?", (run,)).fetchall()
    for rid, user, project, model, started, prompt, out, cost in rows:
        conn.execute("UPDATE requests SET status = 'failed', outcome = 'timeout', error = ?, finished_at = ? WHERE id = ?",
                     (KILLED, now, rid))
        billed = prompt if started is not None else 0
        for scope, key in (("user", user), ("project", project)):
            conn.execute(_UPSERT, (scope, key, model, 0, 0, 1, billed or 0, out or 0, cost or 0.0, now))
    return len(rows)


# ---------------------------------------------------------------- queries (run on the store's thread)
def _totals(rows) -> dict:
    tot = {k: 0 for k in TOTALS}
    for r in rows:
        for k in TOTALS:
            tot[k] += r[k]
    tot["cost"] = round(tot["cost"], 9)
    return tot


def summary(conn) -> dict:
    rows = conn.execute("SELECT * FROM usage ORDER BY scope, key, model").fetchall()
    users = [r for r in rows if r["scope"] == "user"]
    out = {"totals": _totals(users), "by_user": {}, "by_project": {}, "by_model": {}}
    for r in rows:
        bucket = out["by_user" if r["scope"] == "user" else "by_project"].setdefault(r["key"], [])
        bucket.append(r)
    for scope in ("by_user", "by_project"):
        out[scope] = {k: _totals(v) for k, v in out[scope].items()}
    models: dict = {}
    for r in users:
        models.setdefault(r["model"], []).append(r)
    out["by_model"] = {k: _totals(v) for k, v in models.items()}
    out["statuses"] = {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status ORDER BY status")}
    return out


def scoped(scope: str, key: str):
    def q(conn):
        rows = conn.execute("SELECT * FROM usage WHERE scope = ? AND key = ? ORDER BY model", (scope, key)).fetchall()
        col = "user" if scope == "user" else "project"
        inflight = conn.execute(f"SELECT COUNT(*) FROM requests WHERE {col} = ? AND status IN ('queued', 'running')",
                                (key,)).fetchone()[0]
        if not rows and not inflight:
            return None
        out = {scope: key, "totals": _totals(rows), "in_flight": inflight, "by_model": {r["model"]: _totals([r]) for r in rows}}
        if scope == "project":
            users = conn.execute("SELECT user, COUNT(*), SUM(output_tokens), SUM(cost) FROM requests WHERE project = ? "
                                 "GROUP BY user ORDER BY user", (key,)).fetchall()
            out["by_user"] = {u[0]: {"requests": u[1], "output_tokens": u[2] or 0, "cost": round(u[3] or 0.0, 9)} for u in users}
        return out
    return q


def recent(limit: int):
    def q(conn):
        rows = conn.execute("SELECT * FROM requests ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]
    return q


def one(rid: str):
    def q(conn):
        r = conn.execute("SELECT * FROM requests WHERE id = ?", (rid,)).fetchone()
        return dict(r) if r is not None else None
    return q
