"""Start the twin server (`sim serve`) on a free 127.0.0.1 port for a test, and stop it afterwards.

    from twin_server import twin_server

    with twin_server("scenarios/burst_load.yaml", gateway__max_queue=4) as base_url:
        ...  # real HTTP against base_url, e.g. f"{base_url}/v1/chat/completions"

Keyword overrides are scenario `--set` paths with "__" for "." (values are Python objects, sent as
YAML): `engine__type="single"` is `--set engine.type=single`. Other options:

- usage_db: SQLite file (default: a fresh temporary file, so tests never touch reports/usage.db);
- out: report folder written when the server stops (requests.csv, summary.json, report.md; no plots);
- seed, set_ (a list of "path=value" strings, as on the command line);
- process: False (default) runs the server on its own event loop in a daemon thread of the test
  process (starts in well under a second); True runs `sim serve` as a subprocess (its own
  interpreter, so a load-generating client in the test does not share the GIL with it; needed to
  send it signals) and stops it with SIGINT, so the report on shutdown is the real CLI's.

Leaving the block shuts the server down: open requests end (as timeouts), the usage store is
flushed, and with `out` the report folder exists once the block has exited.
"""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import yaml

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def _set_args(set_, overrides) -> list[str]:
    args = list(set_ or [])
    for k, v in overrides.items():
        args.append(f"{k.replace('__', '.')}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return args


@contextmanager
def twin_server(scenario_path, *, usage_db=None, out=None, seed=None, set_=None, process=False, **overrides):
    sets = _set_args(set_, overrides)
    with tempfile.TemporaryDirectory(prefix="twin-") as tmp:
        db = Path(usage_db) if usage_db is not None else Path(tmp) / "usage.db"
        runner = _process if process else _thread
        with runner(Path(scenario_path), db, out, seed, sets) as url:
            yield url


@contextmanager
def _thread(path, db, out, seed, sets):
    from simulator.scenario import load_scenario
    from simulator.twin import TwinServer
    sc = load_scenario(path, sets, seed)
    loop = asyncio.new_event_loop()
    server = TwinServer(sc, "127.0.0.1", 0, db, Path(out) if out is not None else None, plots=False, source=str(path))
    ready = threading.Event()
    failure: list = []

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()  # until stop() below asks it to end
        loop.run_until_complete(server.stop())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    th = threading.Thread(target=run, name="twin-server", daemon=True)
    th.start()
    if not ready.wait(START_TIMEOUT_S):
        raise TimeoutError("twin server did not start")
    if failure:
        raise failure[0]
    try:
        yield server.url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(STOP_TIMEOUT_S)
        if th.is_alive():
            raise TimeoutError("twin server did not stop")


@contextmanager
def _process(path, db, out, seed, sets):
    cmd = [sys.executable, "-c", "from simulator.cli import app; app()", "serve", str(path),
           "--host", "127.0.0.1", "--port", "0", "--usage-db", str(db), "--no-plots"]
    if out is not None:
        cmd += ["--out", str(out)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    err_tail: deque = deque(maxlen=50)  # drained, so a chatty server never blocks on a full pipe
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [err_tail.append(x) for x in proc.stderr], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            line = ""
        if "listening on " not in line:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
            raise RuntimeError(f"sim serve did not start: {line.strip()} {''.join(err_tail).strip()[-2000:]}")
        url = line.split("listening on ", 1)[1].split()[0]
        yield url
    finally:
        stop_process(proc, STOP_TIMEOUT_S)


def stop_process(proc, timeout: float) -> None:
    """SIGINT (the server's own shutdown: report, usage flush), SIGKILL if it is not gone within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
