"""Every bad input ends in one line on stderr naming the file, the field path and the reason, and
exit code 2 — for `sim run` and `sim validate` alike, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from simulator.cli import app

DATA = Path(__file__).parent / "data"
BASE = {"name": "bad", "duration_s": 2, "engine": {"type": "dynamic_batching"},
        "workload": {"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 2}}]}}


def arrival(**a):
    return {**BASE, "workload": {"classes": [{"name": "a", "arrival": a}]}}


def trace(fmt, path):
    return {**BASE, "workload": {"classes": [{"name": "a", "arrival": {"type": "trace", "format": fmt, "path": str(path)},
                                              "prompt_tokens": {"type": "trace"}, "output_tokens": {"type": "trace"}}]}}


# (case, scenario content (dict or raw text), extra CLI args, file named, field and reason in the line)
CASES = [
    ("unknown_key", arrival(type="poisson", rate=2, burstiness=3), [], "scenario.yaml",
     "workload.classes[0].arrival.burstiness", "unknown key"),
    ("unknown_top_key", {**BASE, "replica": 2}, [], "scenario.yaml", "replica", "unknown key"),
    ("warmup_covers_run", {**BASE, "warmup_s": 2}, [], "scenario.yaml", "warmup_s", "not below duration_s"),
    ("wrong_type", arrival(type="poisson", rate="fast"), [], "scenario.yaml",
     "workload.classes[0].arrival.rate", "valid number"),
    ("negative_rate", arrival(type="poisson", rate=-2), [], "scenario.yaml",
     "workload.classes[0].arrival.rate", "greater than 0"),
    ("unknown_arrival", arrival(type="poison", rate=2), [], "scenario.yaml",
     "workload.classes[0].arrival", "unknown type 'poison'"),
    ("unknown_user", {**BASE, "workload": {"classes": [{"name": "a", "user": "eve", "arrival": {"type": "poisson", "rate": 1}}]}},
     [], "scenario.yaml", "workload.classes[0].user", "unknown user 'eve'"),
    ("levels_without_max_queue", {**BASE, "gateway": {"degradation": [{"name": "n", "above": 0}]}}, [], "scenario.yaml",
     "gateway.degradation", "needs max_queue"),
    ("no_stop_condition", {k: v for k, v in BASE.items() if k != "duration_s"}, [], "scenario.yaml", "",
     "stop condition"),
    ("missing_trace", trace("azure", "no_such_trace.csv"), [], "scenario.yaml",
     "workload.classes[0].arrival.path", "file not found: no_such_trace.csv"),
    ("azure_bad_row", trace("azure", DATA / "bad_azure_rows.csv"), [], "bad_azure_rows.csv",
     "line 3: ContextTokens", "not an integer: 'many'"),
    ("mooncake_bad_json", trace("mooncake", DATA / "bad_mooncake_rows.jsonl"), [], "bad_mooncake_rows.jsonl",
     "line 2", "not valid JSON"),
    ("mooncake_bad_timestamp", trace("mooncake", DATA / "bad_mooncake_stamp.jsonl"), [], "bad_mooncake_stamp.jsonl",
     "line 2: timestamp", "non-negative number"),
    ("azure_wrong_header", trace("azure", DATA / "wl_lengths.csv"), [], "wl_lengths.csv", "line 1", "expected Azure LLM header"),
    ("not_yaml", "name: x\nduration_s: [5\n", [], "scenario.yaml", "line 3", "not valid YAML"),
    ("not_a_mapping", "- just\n- a list\n", [], "scenario.yaml", "", "expected a mapping"),
    ("set_without_equals", BASE, ["--set", "seed"], "scenario.yaml", "--set seed", "expected path=value"),
    ("set_unknown_path", BASE, ["--set", "workload.classes[4].name=x"], "scenario.yaml",
     "workload.classes[4].name", "--set path does not exist"),
    ("set_bad_index", BASE, ["--set", "workload.classes[x].name=x"], "scenario.yaml",
     "workload.classes[x].name", "malformed"),
    ("set_bad_yaml", BASE, ["--set", "duration_s=[1"], "scenario.yaml", "duration_s", "not valid YAML"),
    ("set_bad_value", BASE, ["--set", "scheduler.policy=lifo"], "scenario.yaml", "scheduler.policy", "'fifo'"),
    ("set_negative", BASE, ["--set", "workload.classes[0].arrival.rate=-1"], "scenario.yaml",
     "workload.classes[0].arrival.rate", "greater than 0"),
    ("set_negative_seed", BASE, ["--set", "seed=-1"], "scenario.yaml", "seed", "greater than or equal to 0"),
    ("unknown_profile", {**BASE, "engine": {"type": "single", "profile": "no-such-gpu"}}, [], "scenario.yaml",
     "engine.profile", "no such profile"),
]


def write(tmp_path, content) -> Path:
    p = tmp_path / "scenario.yaml"
    p.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return p


def check_one_line(result, file, field, reason):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and file in err and reason in err, err
    if field:
        assert f": {field}: " in err, err


@pytest.mark.parametrize("cmd", ["validate", "run"])
@pytest.mark.parametrize("case,content,args,file,field,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, cmd, case, content, args, file, field, reason):
    path = write(tmp_path, content)
    extra = ["--out", str(tmp_path / "out"), "-q", "--no-plots"] if cmd == "run" else []
    result = CliRunner().invoke(app, [cmd, str(path), *args, *extra])
    check_one_line(result, file, field, reason)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_nonexistent_scenario(tmp_path):
    for cmd in ("validate", "run"):
        result = CliRunner().invoke(app, [cmd, str(tmp_path / "nope.yaml")])
        check_one_line(result, "nope.yaml", "", "file not found")


def test_bad_seed_and_out_options(tmp_path):
    path = write(tmp_path, BASE)
    result = CliRunner().invoke(app, ["run", str(path), "--seed", "-3", "-q", "--out", str(tmp_path / "o")])
    check_one_line(result, "scenario.yaml", "seed", "greater than or equal to 0")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out, reason in ((blocker, "exists and is not a folder"), (blocker / "sub", "is not a folder")):
        result = CliRunner().invoke(app, ["run", str(path), "-q", "--out", str(out)])
        check_one_line(result, str(out), "--out", reason)


def test_good_input_passes_validate(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, BASE))])
    assert result.exit_code == 0 and result.stdout.startswith("ok: ")


def test_console_script_prints_no_traceback(tmp_path):
    """The real process: exit status 2 and a single stderr line, with the rich traceback handler in place."""
    path = write(tmp_path, trace("mooncake", DATA / "bad_mooncake_stamp.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "simulator.cli", "run", str(path), "-q"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {DATA / 'bad_mooncake_stamp.jsonl'}: line 2: timestamp: expected a non-negative number of ms, got 'soon'"]
    assert proc.stdout == ""
