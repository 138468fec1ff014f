"""The README's commands, run as it writes them: the CI gate gates (a real regression fails it with exit 1,
an unchanged candidate passes), `sim calibrate STEPS.csv` works without options and writes into the current
folder, the capacity example answers in one sentence, the load_run snippet runs."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
EXE = {"sim": [sys.executable, "-m", "simulator.cli"], "stress": [sys.executable, "-m", "stress_tester.cli"]}


def block(heading: str, lang: str = "bash") -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def commands(text: str) -> list[list[str]]:
    """Shell lines (continuations joined, comments dropped) as argv lists, `sim`/`stress` run from this checkout."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            argv = shlex.split(line)
            out.append(EXE.get(argv[0], [argv[0]]) + argv[1:])
    return out


def run(argv, cwd):
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_the_ci_gate_fails_a_regression_and_passes_no_change(tmp_path):
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    cmds = commands(block("### CI gate"))
    assert len(cmds) == 3 and "scheduler.policy=fifo" in cmds[1]
    base, cand, gate = cmds
    for c in (base, cand):
        r = run(c, tmp_path)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "reports/baseline/requests.csv").read_bytes() != (tmp_path / "reports/candidate/requests.csv").read_bytes()
    r = run(gate, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "violation: vip_chat ttft.p99" in r.stderr + r.stdout
    # the same gate with the baseline as its own candidate passes: it is the regression that fails it
    same = [a.replace("reports/candidate", "reports/baseline") for a in gate]
    r = run(same, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_calibrate_as_the_readme_writes_it(tmp_path):
    usage = re.search(r"\| `sim calibrate (STEPS\.csv)[^`]*` \|", README)
    assert usage, "the commands table documents sim calibrate STEPS.csv"
    assert "`sim calibrate STEPS.csv`" in README
    rng = np.random.default_rng(1)
    n = 80
    df = pd.DataFrame({"prefill_tokens": rng.integers(0, 2048, n), "n_decode": rng.integers(0, 64, n)})
    df.loc[(df.prefill_tokens == 0) & (df.n_decode == 0), "n_decode"] = 1
    df["prefill_attn"] = df.prefill_tokens ** 2
    df["decode_ctx"] = df.n_decode * 900
    df["time_s"] = 0.008 + 2e-5 * df.prefill_tokens + 1e-10 * df.prefill_attn + 5e-8 * df.decode_ctx + 1e-4 * df.n_decode
    df.to_csv(tmp_path / "STEPS.csv", index=False)
    before = sorted(p.name for p in (ROOT / "simulator" / "profiles").iterdir())
    r = run(EXE["sim"] + ["calibrate", "STEPS.csv"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "STEPS.yaml").is_file() and "engine.profile: STEPS.yaml" in r.stdout
    assert sorted(p.name for p in (ROOT / "simulator" / "profiles").iterdir()) == before


def test_the_capacity_example_answers_in_one_sentence(tmp_path):
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    cmds = commands(block("### Capacity search"))
    r = run(cmds[0], tmp_path)
    assert r.returncode == 0, r.stderr
    said = re.search(r"burst_load meets .* up to ([\d.]+) req/s offered", r.stdout)
    documented = re.search(r"# (burst_load meets .*)", block("### Capacity search")).group(1)
    assert said and said.group(0) in documented  # the README shows what the command says
    assert (tmp_path / "reports/capacity_burst_load/capacity.png").is_file()


def test_the_load_run_snippet_runs(tmp_path):
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    r = run(EXE["sim"] + ["run", "scenarios/burst_load.yaml", "-q", "--no-plots", "--format", "parquet"], tmp_path)
    assert r.returncode == 0, r.stderr
    code = block("A run folder in pandas:", "python") + "\nprint(run.requests.shape, len(run.ok), run.summary['requests']['ok'])\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shape, ok, ok_summary = re.search(r"\((\d+), \d+\) (\d+) (\d+)", r.stdout).groups()
    assert ok == ok_summary and int(shape) > int(ok)
    assert (tmp_path / "reports/burst_load/requests.parquet").is_file()
    assert not (tmp_path / "reports/burst_load/requests.csv").exists()
