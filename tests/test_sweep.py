"""`sim sweep`: every grid point is a `sim run` with its overrides; the table holds their summaries."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from simulator.cli import app

SCENARIO = {
    "name": "sweep_t", "seed": 3, "num_requests": 300,
    "workload": {"classes": [
        {"name": "chat", "arrival": {"type": "poisson", "rate": 30},
         "prompt_tokens": {"type": "uniform", "low": 200, "high": 1500},
         "output_tokens": {"type": "uniform", "low": 20, "high": 200}},
        {"name": "bulk", "tier": "batch", "stream": False, "arrival": {"type": "poisson", "rate": 10},
         "prompt_tokens": {"type": "fixed", "value": 2000}, "output_tokens": {"type": "fixed", "value": 100}}]},
    "engine": {"type": "continuous", "max_num_seqs": 16, "max_num_batched_tokens": 2048, "profile": "default"},
}


def _sweep(tmp_path, *args, name="out"):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / name
    r = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "-q", *args])
    return r, out


def _table(out: Path):
    with open(out / "sweep.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_point_is_a_run_with_its_overrides(tmp_path):
    r, out = _sweep(tmp_path, "--grid", "cluster.replicas=1,2,4", "--grid", "scheduler.policy=[fifo, sjf]")
    assert r.exit_code == 0, r.output
    rows = _table(out)
    assert len(rows) == 6 * 3  # 3 x 2 points, overall + 2 classes each
    overall = [x for x in rows if x["scope"] == "overall"]
    assert [(x["cluster.replicas"], x["scheduler.policy"]) for x in overall] == [
        ("1", "fifo"), ("1", "sjf"), ("2", "fifo"), ("2", "sjf"), ("4", "fifo"), ("4", "sjf")]
    for x in rows:
        folder = out / x["folder"]
        summary = json.loads((folder / "summary.json").read_text())
        sc = yaml.safe_load((folder / "scenario.yaml").read_text())
        assert sc["cluster"]["replicas"] == int(x["cluster.replicas"]) and sc["scheduler"]["policy"] == x["scheduler.policy"]
        lat = summary["latency"] if x["scope"] == "overall" else summary["latency_by_class"][x["scope"]]
        assert float(x["ttft_p95_s"]) == lat["ttft"]["p95"]
        assert int(x["ok"]) == (summary["requests"]["outcomes"] if x["scope"] == "overall"
                                else summary["outcomes_by_class"][x["scope"]]).get("ok", 0)
    # an overloaded replica: more replicas, shorter waits (a result, not an echo of the input)
    fifo = {int(x["cluster.replicas"]): float(x["ttft_p95_s"]) for x in overall if x["scheduler.policy"] == "fifo"}
    assert fifo[1] > fifo[2] > fifo[4]
    assert "| 4 | sjf |" in (out / "sweep.md").read_text()


def test_parallel_points_give_the_same_table(tmp_path):
    a, out_a = _sweep(tmp_path, "--grid", "engine.max_num_seqs=4,8,16", name="a")
    b, out_b = _sweep(tmp_path, "--grid", "engine.max_num_seqs=4,8,16", "-j", "2", name="b")
    assert a.exit_code == b.exit_code == 0, (a.output, b.output)
    assert (out_a / "sweep.csv").read_bytes() == (out_b / "sweep.csv").read_bytes()
    for x in _table(out_a):
        assert (out_a / x["folder"] / "requests.csv").read_bytes() == (out_b / x["folder"] / "requests.csv").read_bytes()


@pytest.mark.parametrize("grid,field,reason", [
    ("cluster.replicas", "--grid cluster.replicas", "expected path=v1,v2"),
    ("cluster.replicas=1,,2", "--grid cluster.replicas", "an empty value"),
    ("cluster.replicas=1,1", "--grid cluster.replicas", "a value given twice"),
    ("cluster.replicaz=1,2", "cluster.replicaz", "unknown key"),
    ("scheduler.policy=fifo,lifo", "scheduler.policy", "Input should be"),
    ("cluster.replicas=[1, 2", "--grid cluster.replicas", "not a YAML list"),
])
def test_bad_grid_is_one_line_exit_2_before_anything_runs(tmp_path, grid, field, reason):
    r, out = _sweep(tmp_path, "--grid", grid)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output
    assert field in lines[0] and reason in lines[0], lines[0]
    assert not (out / "points").exists()


def test_a_sweep_needs_an_axis(tmp_path):
    r, _ = _sweep(tmp_path)
    assert r.exit_code == 2 and "at least one axis" in r.output
