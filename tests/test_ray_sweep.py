"""Sweeps and capacity searches on a real local Ray cluster (2 CPUs): every point a Ray task, every output
file byte-identical to the sequential run's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray  # a declared dependency: CI must run these tests, not skip them
from typer.testing import CliRunner

from simulator.cli import app

ROOT = Path(__file__).resolve().parents[1]
BURST = ROOT / "scenarios" / "burst_load.yaml"
GRID = ["--grid", "scheduler.policy=fifo,priority_aging", "--grid", "cluster.replicas=2,3", "--set", "duration_s=15"]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away cluster on this machine only
    env = {"env_vars": {"PYTHONPATH": str(ROOT)}}  # the workers import this checkout's simulator
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    assert ray.cluster_resources().get("CPU") == 2
    yield
    ray.shutdown()


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    different = [k for k in fa if fa[k] != fb[k]]
    assert not different, different


def test_ray_sweep_equals_sequential_byte_for_byte(tmp_path, cluster):
    seq, dist = tmp_path / "seq", tmp_path / "ray"
    r1 = CliRunner().invoke(app, ["sweep", str(BURST), *GRID, "--out", str(seq), "-q"])
    r2 = CliRunner().invoke(app, ["sweep", str(BURST), *GRID, "--out", str(dist), "-q", "--executor", "ray"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert len(list((seq / "points").iterdir())) == 4
    assert (seq / "pareto.png").is_file() and (seq / "points" / "000_policy-fifo_replicas-2" / "requests.csv").is_file()
    _same(seq, dist)


def test_ray_capacity_equals_sequential(tmp_path, cluster):
    args = ["capacity", str(BURST), "--slo", "ttft.p95=0.5s", "--set", "duration_s=15", "--precision", "0.1",
            "--grid", "scheduler.policy=fifo,priority_aging", "-q"]
    r1 = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "seq")])
    r2 = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--executor", "ray"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    _same(tmp_path / "seq", tmp_path / "ray")
    assert r1.output.splitlines()[:-1] == r2.output.splitlines()[:-1]  # the same sentences; the folders differ
