"""`sim capacity`: the searched answer agrees with a brute-force sweep of the same probes within the stated
precision; the files say what the terminal says; bad targets are one-line errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simulator.capacity import rate_sets
from simulator.cli import app
from simulator.executors import run_point
from simulator.scenario import load_scenario
from simulator.slo import all_met, evaluate, parse_targets, streamed_classes, with_default_shed

ROOT = Path(__file__).resolve().parents[1]
BURST = ROOT / "scenarios" / "burst_load.yaml"
SHORT = ["duration_s=20"]  # a third of the scenario: CI time
SLOS = ["ttft.p95=0.5s", "tpot.p95=50ms"]


def _met(sets, targets, streamed) -> bool:
    summary, _ = run_point((str(BURST), sets, None, False))
    return all_met(evaluate(summary, targets, streamed))


def _capacity(tmp_path, *args, name="cap", sets=SHORT):
    out = tmp_path / name
    r = CliRunner().invoke(app, ["capacity", str(BURST), "--out", str(out), "-q",
                                 *(a for s in sets for a in ("--set", s)), *(a for s in SLOS for a in ("--slo", s)),
                                 *args])
    return r, out


def test_rate_answer_matches_a_brute_force_sweep(tmp_path):
    """The whole 60 s burst_load: shorter runs sample its gamma(cv=3) batch arrivals too thinly, and their
    api p95 TTFT goes up and down across the knee (20 s: met at 0.425, missed at 0.45, met at 0.5)."""
    precision = 0.05
    r, out = _capacity(tmp_path, "--rate-scale", "--precision", str(precision), sets=[])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "capacity.json").read_text())
    ans = res["configs"][0]
    a = ans["rate_x"]
    lo, hi = ans["bracket"]
    assert a == lo and hi is not None and hi <= lo * (1 + precision) + 1e-12
    assert f"{ans['offered_per_s']:.3g} req/s" in r.output  # the one-sentence answer

    sc = load_scenario(BURST)
    targets = with_default_shed(parse_targets(SLOS))
    streamed = streamed_classes(sc)
    step = 0.025
    grid = [round(float(x), 6) for x in np.arange(0.3, 0.6 + 1e-9, step)]
    met = [_met(rate_sets(sc, x), targets, streamed) for x in grid]
    k = met.index(False)  # the brute-force answer: the largest grid rate below the first miss
    assert 0 < k and not any(met[k:]), f"the grid must bracket one knee: {dict(zip(grid, met))}"
    brute = grid[k - 1]
    assert abs(a - brute) <= max(a * precision, step) + 1e-9, (a, brute)

    with open(out / "capacity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == ans["probes"]
    at = [row for row in rows if float(row["rate_x"]) == a]
    assert at and at[0]["met"] == "True"  # the answer is a rate at which every SLO was met
    assert any(row["met"] == "False" and float(row["rate_x"]) == hi for row in rows)
    assert (out / "capacity.png").stat().st_size > 10_000
    assert "![capacity](capacity.png)" in (out / "capacity.md").read_text()


def test_more_probes_per_round_agree_within_the_precision(tmp_path):
    """--probes 3 (a quadrisection, 3 probes a round) finds the same knee as bisection within the precision,
    in fewer rounds, and its files do not depend on the number of workers."""
    precision = 0.05
    r1, one = _capacity(tmp_path, "--precision", str(precision), sets=[], name="bisect")
    r3, three = _capacity(tmp_path, "--precision", str(precision), "--probes", "3", "--jobs", "2", sets=[],
                          name="quad")
    assert r1.exit_code == 0 and r3.exit_code == 0, r1.output + r3.output
    a1 = json.loads((one / "capacity.json").read_text())["configs"][0]
    a3 = json.loads((three / "capacity.json").read_text())["configs"][0]
    lo, hi = a3["bracket"]
    assert hi <= lo * (1 + precision) + 1e-12
    assert abs(a3["rate_x"] - a1["rate_x"]) <= precision * max(a1["rate_x"], a3["rate_x"]) + 1e-12
    r3b, again = _capacity(tmp_path, "--precision", str(precision), "--probes", "3", sets=[], name="quad1")
    assert r3b.exit_code == 0
    for f in ("capacity.csv", "capacity.json", "capacity.md"):
        assert (three / f).read_bytes() == (again / f).read_bytes()


def test_fewest_replicas_matches_every_count(tmp_path):
    r, out = _capacity(tmp_path, "--vary", "cluster.replicas=2..6", "--set", "scheduler.policy=fifo")
    assert r.exit_code == 0, r.output
    ans = json.loads((out / "capacity.json").read_text())["configs"][0]["value"]
    sc = load_scenario(BURST, SHORT)
    targets = with_default_shed(parse_targets(SLOS))
    met = {n: _met(SHORT + ["scheduler.policy=fifo", f"cluster.replicas={n}"], targets, streamed_classes(sc))
           for n in range(2, 7)}
    brute = next((n for n in range(2, 7) if all(met[m] for m in range(n, 7))), None)
    assert 2 < brute < 6, met  # an answer inside the range, so the bisection is tested
    assert ans == brute, (ans, met)
    assert f"needs cluster.replicas={ans}" in r.output


def test_grid_configurations_are_searched_alike_whatever_the_jobs(tmp_path):
    args = ["--grid", "scheduler.policy=fifo,priority_aging", "--precision", "0.1"]
    r1, one = _capacity(tmp_path, *args, name="one")
    r2, two = _capacity(tmp_path, *args, "--jobs", "2", name="two")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.suffix != ".png")
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.suffix != ".png")
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    res = json.loads((one / "capacity.json").read_text())
    assert [c["point"] for c in res["configs"]] == [{"scheduler.policy": "fifo"}, {"scheduler.policy": "priority_aging"}]
    assert r1.output.count("meets") == 2


@pytest.mark.parametrize("slo, why", [
    ("ttft.p95", "expected [CLASS:]METRIC.STAT=LIMIT"),
    ("ttft.p97=1s", "unknown metric"),
    ("nosuch:ttft.p95=1s", "unknown class 'nosuch'"),
    ("ttft.p95=fast", "not a limit"),
    ("shed=200%", "between 0 and 100"),
])
def test_bad_targets_are_one_line_errors(tmp_path, slo, why):
    proc = subprocess.run([sys.executable, "-m", "simulator.cli", "capacity", str(BURST), "--slo", slo,
                           "--out", str(tmp_path / "x"), "-q"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
