"""Where the points of `sim sweep` and `sim capacity` run: in this process, in local worker processes, or as
Ray tasks on a cluster.

Every point is one `sim run` of the scenario with its overrides, written into a scratch folder on whichever
machine runs it; the files come back to the caller as bytes and are written under the output folder here, so a
Ray cluster whose nodes share no disk with the driver gives the same folder, byte for byte, as a sequential run.
A Ray node must have servesim installed and the scenario (and its trace files) at the same path.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .errors import InputError

EXECUTORS = ("process", "ray")


def run_point(task: tuple) -> tuple[dict, dict]:
    """(scenario, sets, seed, plots) -> (summary, {relative file path: bytes}) of one `sim run`."""
    scenario, sets, seed, plots = task
    from .run import run_scenario
    from .scenario import load_scenario
    sc = load_scenario(scenario, sets, seed)
    with tempfile.TemporaryDirectory(prefix="servesim_point_") as tmp:
        summary, _ = run_scenario(sc, Path(tmp), plots=plots)
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return summary, files


def write_files(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


class Executor:
    """`map(tasks)` runs run_point on each task and returns the results in task order."""

    def __init__(self, kind: str = "process", jobs: int = 1, address: str | None = None):
        if kind not in EXECUTORS:
            raise InputError("--executor", kind, f"expected one of {', '.join(EXECUTORS)}")
        if address is not None and kind != "ray":
            raise InputError("--address", address, "only with --executor ray")
        self.kind, self.jobs, self.address = kind, jobs, address
        self._pool = None
        self._remote = None
        self._ray_started = False

    def __enter__(self):
        if self.kind == "ray":
            try:
                import ray
            except ImportError:
                raise InputError("--executor", "ray", "ray is not installed (pip install 'servesim[ray]')") from None
            if not ray.is_initialized():
                env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
                kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env)
                try:
                    if self.address:
                        ray.init(address=self.address, **kw)
                    else:
                        ray.init(num_cpus=self.jobs if self.jobs > 1 else None, **kw)  # --jobs 1: every CPU
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise InputError("--address", self.address or "local", f"cannot start or join Ray: {exc}") from None
                self._ray_started = True
            self._remote = ray.remote(num_cpus=1)(run_point)
        elif self.jobs > 1:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
        if self._ray_started:
            import ray
            ray.shutdown()

    def map(self, tasks: list) -> list:
        if not tasks:
            return []
        if self._remote is not None:
            import ray
            return ray.get([self._remote.remote(t) for t in tasks])
        if self._pool is not None:
            return list(self._pool.map(run_point, tasks))
        return [run_point(t) for t in tasks]
