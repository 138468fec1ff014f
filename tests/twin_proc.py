"""`sim serve` as a subprocess on a free 127.0.0.1 port, ready once /health answers (bounded poll).

    with serve(scenario_path, tmp_path) as srv:
        srv.url, srv.db, srv.proc   # base URL, usage DB path, the Popen

Stopped with SIGINT on leaving (SIGKILL after STOP_S); `srv.kill()` kills it at once (no shutdown).
Scenario files come from test_twin.scenario (a flat cost model: every engine step `step` seconds).
"""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from twin_server import stop_process

START_S = 30.0
STOP_S = 20.0


def until(check, what: str, timeout: float = 20.0):
    """Poll `check()` until it returns something true (bounded)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what} (last: {got!r})")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc, url, db, log):
        self.proc, self.url, self.db, self.log = proc, url, db, log

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(STOP_S)

    def output(self) -> str:
        return Path(self.log).read_text(errors="replace")


@contextmanager
def serve(scenario_path, tmp: Path, *args: str, db: Path | None = None, out: Path | None = None,
          nofile: int | None = None):
    """`nofile`: the server's open-file limit (soft and hard), as on a machine with few descriptors."""
    port = free_port()
    db = db or tmp / "usage.db"
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-c", "from simulator.cli import app; app()", "serve", str(scenario_path), "--host", "127.0.0.1",
           "--port", str(port), "--usage-db", str(db), "--no-plots", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    with open(log, "w") as fh:
        pre = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=pre)
    srv = Served(proc, f"http://127.0.0.1:{port}", db, log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sim serve exited {proc.returncode}: {srv.output()[-2000:]}")
            try:
                if httpx.get(srv.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim serve not healthy within {START_S} s: {srv.output()[-2000:]}")
            time.sleep(0.05)
        yield srv
    finally:
        stop_process(proc, STOP_S)
