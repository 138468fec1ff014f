"""`sim compare`: the side-by-side numbers are the reports' own, tolerances gate with exit 1, bad input exits 2."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.compare import Cell, compare_runs, parse_tolerance
from simulator.errors import InputError
from simulator.run import run_scenario
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "burst_load.yaml"
runner = CliRunner()


def _run(out: Path, *sets: str, seed: int | None = None) -> Path:
    sc = load_scenario(SCENARIO, ["duration_s=20", *sets], seed)
    run_scenario(sc, out, plots=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    return {
        "a": _run(d / "seed42"),
        "a_again": _run(d / "seed42_again"),
        "b": _run(d / "seed7", seed=7),
        "fifo": _run(d / "fifo", "scheduler.policy=fifo"),
        "priority": _run(d / "priority", "scheduler.policy=priority"),
    }


def cli(*args):
    return runner.invoke(app, ["compare", *map(str, args)])


def table(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


def test_self_compare_has_zero_differences_and_passes_exact_gate(runs, tmp_path):
    out = tmp_path / "self"
    r = cli(runs["a"], runs["a"], "--out", out, "-t", "all=0", "-q")
    assert r.exit_code == 0, r.output
    d = table(out)
    assert d["passed"] and d["violations"] == []
    assert d["scopes"] == ["overall", "api", "batch", "vip_chat"]
    cells = [c for s in d["table"].values() for c in s.values()]
    assert d["checked"] == len(cells) > 50
    assert all(c["diff"] in (0, None) and c["a"] == c["b"] for c in cells)
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "cdf_ttft.png", "cdf_e2e.png", "cdf_tpot.png"}
    assert "PASSED" in (out / "compare.md").read_text()
    # a rerun of the same scenario and seed is the same run (determinism seen through compare)
    r = cli(runs["a"], runs["a_again"], "--out", tmp_path / "rerun", "-t", "all=0", "-q", "--no-plots")
    assert r.exit_code == 0, r.output


def test_values_are_the_reports_own_numbers(runs, tmp_path):
    cmp = compare_runs(runs["a"], runs["b"], tmp_path / "ab", plots=False)
    sa = json.loads((runs["a"] / "summary.json").read_text())
    sb = json.loads((runs["b"] / "summary.json").read_text())
    c = cmp.cell("overall", "ttft.p95")
    # overall TTFT is the streamed requests' (burst_load's batch class is not streamed: its TTFT is the whole
    # response, and pooling it would mix two quantities)
    assert set(sa["latency_by_stream"]) == {"streamed", "non_streamed"}
    streamed = (sa["latency_by_stream"]["streamed"]["ttft"]["p95"], sb["latency_by_stream"]["streamed"]["ttft"]["p95"])
    assert (c.a, c.b) == streamed and c.a != sa["latency"]["ttft"]["p95"]
    assert any(n.startswith("overall ttft: over streamed requests only") for n in cmp.notes)
    c = cmp.cell("overall", "e2e.p95")
    assert (c.a, c.b) == (sa["latency"]["e2e"]["p95"], sb["latency"]["e2e"]["p95"])
    assert c.diff == pytest.approx(c.b - c.a) and c.rel == pytest.approx((c.b - c.a) / c.a)
    assert cmp.cell("overall", "itl.p99").a == sa["latency"]["itl"]["p99"]
    assert cmp.cell("overall", "itl.p99") is not None and cmp.cell("api", "itl.p99") is None  # ITL overall only
    assert cmp.cell("vip_chat", "e2e.p50").b == sb["latency_by_class"]["vip_chat"]["e2e"]["p50"]
    assert cmp.cell("overall", "throughput.output_tokens_per_s").a == sa["throughput"]["output_tokens_per_s"]
    for o, n in sb["requests"]["outcomes"].items():
        assert cmp.cell("overall", f"outcomes.{o}").b == n
    # per-class throughput adds up to the summary's overall figure
    per_class = sum(cmp.cell(k, "throughput.requests_per_s").a for k in ("api", "batch", "vip_chat"))
    assert per_class == pytest.approx(sa["throughput"]["requests_per_s"], abs=1e-5)
    assert any(c.diff for c in cmp.cells), "two seeds must differ somewhere"


def test_two_seeds_gate_exceeded_and_within(runs, tmp_path):
    r = cli(runs["a"], runs["b"], "--out", tmp_path / "x", "-q", "--no-plots", "-t", "ttft.p95=1%", "-t", "outcomes=0")
    assert r.exit_code == 1
    lines = [x for x in r.stderr.splitlines() if x.startswith("violation:")]
    assert lines and all(("ttft.p95" in x or "outcomes." in x) for x in lines)
    assert "overall ttft.p95" in r.stderr and "FAILED" in r.stderr
    assert len(lines) == len(table(tmp_path / "x")["violations"])
    r = cli(runs["a"], runs["b"], "--out", tmp_path / "y", "-q", "--no-plots", "-t", "ttft.p95=1000%", "-t", "e2e.p99=60s")
    assert r.exit_code == 0, r.output
    assert "tolerances: passed" in r.stdout


def test_scheduler_policies_differ_in_the_expected_direction(runs, tmp_path):
    cmp = compare_runs(runs["fifo"], runs["priority"], tmp_path / "pol", plots=False)
    vip, batch = cmp.cell("vip_chat", "ttft.p95"), cmp.cell("batch", "ttft.p95")
    assert vip.diff < 0 and vip.rel < -0.2  # strict priority serves the high tier first
    assert batch.diff > 0  # ... at the batch tier's expense
    # one-sided gates: "+" only fails on increases, "-" only on decreases
    ok = compare_runs(runs["fifo"], runs["priority"], tolerances=["vip_chat:ttft.p95=+0%"])
    assert ok.ok and ok.checked == 1
    bad = compare_runs(runs["fifo"], runs["priority"], tolerances=["vip_chat:ttft.p95=-0%", "batch:ttft.p95=-0%"])
    assert len(bad.violations) == 1 and bad.violations[0].startswith("vip_chat ttft.p95")


def test_most_specific_tolerance_wins(runs):
    cmp = compare_runs(runs["fifo"], runs["priority"], tolerances=["all=0", "ttft=1e9%", "batch:ttft.p95=0"])
    bad_ttft = [v for v in cmp.violations if " ttft." in v]
    assert [v.split(":")[0] for v in bad_ttft] == ["batch ttft.p95"]
    assert any(" e2e." in v for v in cmp.violations)  # all=0 still governs the rest
    # on a tie the later spec wins
    assert compare_runs(runs["fifo"], runs["priority"], tolerances=["ttft=0", "ttft=1e9%"]).ok
    assert not compare_runs(runs["fifo"], runs["priority"], tolerances=["ttft=1e9%", "ttft=0"]).ok


def test_tolerance_arithmetic():
    c = Cell("overall", "ttft.p95", 0.100, 0.105)
    assert not parse_tolerance("ttft.p95=5%").exceeded(c)  # at the limit is within
    assert parse_tolerance("ttft.p95=4.9%").exceeded(c)
    assert parse_tolerance("ttft.p95=4ms").exceeded(c) and not parse_tolerance("ttft.p95=0.006s").exceeded(c)
    assert not parse_tolerance("ttft.p95=-0%").exceeded(c)  # only decreases are checked
    z = Cell("overall", "outcomes.timeout", 0.0, 2.0)
    assert math.isinf(z.rel) and parse_tolerance("outcomes=50%").exceeded(z)
    assert not parse_tolerance("outcomes=2").exceeded(z) and parse_tolerance("outcomes.timeout=1").exceeded(z)
    assert parse_tolerance("throughput.rps=1").stat == "requests_per_s"
    assert parse_tolerance("wait.p99=1%").family == "queue_wait"


def _client_view(src: Path, dst: Path) -> Path:
    """A report as a client (stress run) writes it: no queue wait is observable."""
    shutil.copytree(src, dst)
    s = json.loads((dst / "summary.json").read_text())
    s["latency"]["queue_wait"] = {"count": 0}
    for d in s["latency_by_class"].values():
        d["queue_wait"] = {"count": 0}
    s["source"] = "stress"
    (dst / "summary.json").write_text(json.dumps(s))
    return dst


def test_metric_missing_on_one_side(runs, tmp_path):
    b = _client_view(runs["a"], tmp_path / "client")
    cmp = compare_runs(runs["a"], b, tolerances=["all=0"])
    assert cmp.ok and cmp.cell("overall", "queue_wait.p95") is None
    assert any(n.startswith("queue_wait: not observed in client") for n in cmp.notes)
    # an explicit gate on what cannot be compared fails instead of passing silently
    cmp = compare_runs(runs["a"], b, tolerances=["queue_wait.p95=10%"])
    assert cmp.violations == ["queue_wait.p95=10%: queue_wait not observed in both runs, cannot check"]


@pytest.mark.parametrize("spec, reason", [
    ("ttft.p97=5%", "unknown statistic 'p97'"),
    ("latency=5%", "unknown metric 'latency'"),
    ("ttft.p95=fast", "expected [SCOPE:]METRIC[.STAT]=VALUE"),
    ("outcomes=1s", "applies to latencies only"),
    ("outcomes.lost=0", "unknown outcome 'lost'"),
    ("nosuch:ttft=5%", "unknown class 'nosuch'"),
    ("api:itl=5%", "ITL is compared overall only"),
])
def test_bad_tolerance_exits_2_with_one_line(runs, tmp_path, spec, reason):
    r = cli(runs["a"], runs["a"], "--out", tmp_path / "o", "-q", "-t", spec)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --tolerance: {spec}: ") and reason in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_bad_folders_exit_2_naming_file_and_field(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(runs["a"], empty, "-q")
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: {empty}/requests.csv: file not found (expected a report folder from sim run, stress run or sim serve)")
    broken = shutil.copytree(runs["a"], tmp_path / "broken")
    (broken / "summary.json").write_text("{not json")
    r = cli(runs["a"], broken, "-q")
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {broken}/summary.json: not valid JSON")
    (broken / "summary.json").write_text(json.dumps({"latency": {}}))
    with pytest.raises(InputError, match="latency_by_class: missing"):
        compare_runs(runs["a"], broken)
    (broken / "summary.json").write_text((runs["a"] / "summary.json").read_text())
    (broken / "requests.csv").write_text("a,b\n1,2\n")
    r = cli(runs["a"], broken, "-q")
    assert r.exit_code == 2 and "requests.csv: columns: not a servesim records file" in r.stderr


def test_console_script_one_line_errors(runs, tmp_path):
    """The installed `sim` itself: exit codes and a single stderr line, no traceback."""
    sim = Path(sys.executable).with_name("sim")
    cmd = [str(sim) if sim.exists() else "sim", "compare", str(runs["a"]), str(tmp_path / "missing"), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr == f"error: {tmp_path / 'missing'}: report folder not found\n"
    p = subprocess.run(cmd[:3] + [str(runs["b"]), "-q", "--no-plots", "-t", "e2e.p99=1ms"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert all(x.startswith(("violation: ", "tolerances: FAILED")) for x in p.stderr.splitlines())
    # default output folder is named after both runs, under ./reports
    assert (tmp_path / "reports" / "compare_seed42_vs_seed7" / "compare.json").is_file()
