"""Starting and stopping the twin server: in the foreground (`sim serve`) or on a running loop (tests).

Connections are bounded in time and number: one that sends no complete request head within
the idle timeout (IDLE_TIMEOUT_S, `--idle-timeout`) of opening or of its last answer is closed,
which covers idle and half-sent connections alike (aiohttp's keep-alive timer, armed at accept); a
request body must arrive within the same time after its head (else 408); and past MAX_CONNECTIONS open connections each new one closes the oldest that
has no request in progress, so a flood of idle sockets can never lock out /health.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sqlite3
from pathlib import Path

from aiohttp import web

from ..errors import InputError
from .app import READING, build_app
from .service import Twin

log = logging.getLogger("servesim.twin")
IDLE_TIMEOUT_S = 15.0
MAX_CONNECTIONS = 1000
# asyncio accepts up to `backlog` connections in one go before any of them reaches the guard below,
# so that many descriptors are kept spare (with 64 more for SQLite and files): running out at
# accept() stops the listener for a second each time.
BACKLOG = 512
SPARE_FDS = 64 + BACKLOG


def connection_cap(want: int = MAX_CONNECTIONS) -> int:
    """`want`, or fewer when the process may not open that many files: the soft limit is raised
    towards want + SPARE_FDS where the hard limit allows, and SPARE_FDS descriptors stay spare."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = want + SPARE_FDS
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return want
    if soft == resource.RLIM_INFINITY:
        return want
    if soft - SPARE_FDS >= 16:
        return min(want, soft - SPARE_FDS)
    return max(8, min(want, (soft - 64) // 2))  # too few files to keep a whole accept batch spare


def guard_connections(server, cap: int, reading: set) -> None:
    """Wrap aiohttp's low-level server so that past `cap` open connections a new one evicts the
    oldest idle one (no request in progress), else the oldest still sending its request body
    (`reading`), or is itself closed when every connection is being answered."""
    made = server.connection_made

    def connection_made(handler, transport):
        made(handler, transport)
        conns = server._connections
        if len(conns) <= cap:
            return
        # (closed connections leave the dict only once their task ends: skip those already closing)
        victim = next((h for h, tr in conns.items()
                       if not h._request_in_progress and h is not handler and not tr.is_closing()), None)
        if victim is None:
            victim = next((h for h, tr in conns.items() if tr in reading and h is not handler and not tr.is_closing()),
                          handler)
        tr = conns.get(victim)
        if tr is not None:
            tr.close()
    server.connection_made = connection_made


class TwinServer:
    def __init__(self, sc, host: str = "127.0.0.1", port: int = 8000, usage_db: Path | None = None,
                 out: Path | None = None, plots: bool = False, source: str = "<scenario>",
                 default_user: str | None = None, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_connections: int | None = None):
        self.sc, self.host, self.port = sc, host, port
        self.default_user, self.idle_timeout_s = default_user, idle_timeout_s
        self.max_connections = max_connections
        self.usage_db, self.out, self.plots, self.source = usage_db, out, plots, source
        self.twin: Twin | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen and start the world's clock; returns the base URL (the bound port when port is 0)."""
        try:
            self.twin = twin = Twin(self.sc, self.usage_db, self.out, self.plots, self.default_user)
        except ValueError as exc:
            raise InputError(self.source, "--default-user", str(exc)) from None
        try:
            twin.start()
        except (sqlite3.Error, OSError) as exc:
            raise InputError(self.source, "--usage-db", f"cannot open {self.usage_db}: {exc}") from None
        # handler_cancellation: a client that hangs up cancels its handler, which aborts its request
        # keepalive_timeout: aiohttp arms it when a connection opens and after each answer, and closes
        # the connection if no complete request head has come by then (idle or half-sent alike)
        self.runner = web.AppRunner(build_app(twin, self.idle_timeout_s), handler_cancellation=True, shutdown_timeout=5.0, access_log=None,
                                    keepalive_timeout=self.idle_timeout_s,
                                    lingering_time=min(self.idle_timeout_s, 2.0))  # unread body after an answer
        await self.runner.setup()
        guard_connections(self.runner.server, connection_cap(self.max_connections or MAX_CONNECTIONS),
                          self.runner.app[READING])
        site = web.TCPSite(self.runner, self.host, self.port, backlog=BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            await twin.stop()
            raise InputError(self.source, "--port", f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        host, port = self.runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> dict | None:
        """End open requests, stop listening, then write the report folder (when --out) and close the usage store."""
        if self.twin is None:
            return None
        self.twin.begin_shutdown()
        await asyncio.sleep(0)  # let handlers of the requests just ended write their last chunk
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        return await self.twin.stop()


def serve_forever(server: TwinServer, on_ready=print) -> dict | None:
    """Run until SIGINT/SIGTERM; then shut down cleanly (partial report, usage flushed)."""
    async def main():
        await server.start()
        on_ready(server.url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            return await server.stop()
    return asyncio.run(main())
