"""report.md answers before it lists: a verdict per class, the bottleneck, utilisation and saturation, compact
rounded tables with units, raw numbers only in summary.json, streamed and non-streamed TTFT never pooled; a
client's report draws no plot of what a client cannot see."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator.metrics import summarize
from simulator.plots import BATCH, LOAD, PLOTS
from simulator.records import read_csv
from simulator.report import markdown
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, out: Path, *args) -> tuple[str, dict, str, Path]:
    proc = subprocess.run([sys.executable, "-m", "simulator.cli", "run", str(ROOT / "scenarios" / f"{name}.yaml"),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return (out / "report.md").read_text(), json.loads((out / "summary.json").read_text()), proc.stdout, out


@pytest.fixture(scope="module")
def burst(tmp_path_factory):
    return _run("burst_load", tmp_path_factory.mktemp("burst"))


def test_burst_load_report_opens_with_a_verdict(burst):
    md, s, _, _ = burst
    lines = md.splitlines()
    assert lines[2] == "## Verdict"
    verdict = md.split("## Outcomes")[0]
    for cls in s["latency_by_class"]:
        assert f"**{cls}**" in verdict
    # what the data say: api misses its TTFT (p95 above the scenario's 2 s), vip_chat meets everything
    api_ttft = s["latency_by_class"]["api"]["ttft"]["p95"]
    assert api_ttft > s["goodput"]["slo"]["ttft_s"]
    assert re.search(r"❌ \*\*api\*\*: TTFT p95 [\d.]+ s > 2\.00 s", verdict)
    assert "✅ **vip_chat**: met" in verdict
    assert "**batch** (non-streamed)" in verdict and "batch**: TTFT" not in verdict
    assert "Bottleneck: queueing" in verdict and "**saturated**" in verdict
    busy = s["engine"]["busy_share"]
    assert f"engines busy {busy * 100:.0f} %" in verdict


def test_report_is_compact_and_rounded(burst):
    md, s, stdout, _ = burst
    assert "```" not in md and "{'" not in md and '{"' not in md  # no JSON, no Python dicts
    assert not re.search(r"\d\.\d{5,}", md), "unrounded numbers belong in summary.json"
    assert len(md.splitlines()) < 100
    # every table cell with a latency says its unit
    table = md.split("## Latency per class")[1].split("##")[0]
    assert re.search(r"\| api \| yes \| \d+ / \d+ \| [\d.]+ (ms|s) /", table)
    for line in stdout.splitlines():
        assert len(line) <= 80, line
    assert "ms" in stdout and "req/s" in stdout and stdout.count("verdict:") == 1


def test_streamed_and_non_streamed_ttft_are_never_pooled(burst):
    md, s, _, _ = burst
    by = s["latency_by_stream"]
    assert by["streamed"]["classes"] == ["api", "vip_chat"] and by["non_streamed"]["classes"] == ["batch"]
    assert by["streamed"]["ttft"]["count"] + by["non_streamed"]["ttft"]["count"] == s["latency"]["ttft"]["count"]
    streamed_p95 = by["streamed"]["ttft"]["p95"]
    assert streamed_p95 < s["latency"]["ttft"]["p95"]  # the pooled figure is dragged up by whole responses
    assert "streamed (api, vip_chat): ttft" in md and "non-streamed (batch): ttft" in md
    assert "all classes" not in md.lower()


def test_not_saturated_when_busy_engines_do_not_queue(tmp_path):
    md, s, _, _ = _run("normal_load", tmp_path / "n", "--no-plots")
    verdict = md.split("## Outcomes")[0]
    wait = s["latency_by_stream"]["streamed"]["queue_wait"]["p95"]
    ttft = s["latency_by_stream"]["streamed"]["ttft"]["p95"]
    assert s["engine"]["busy_share"] > 0.95 and wait < 0.5 * ttft
    assert "**saturated**" not in verdict and "not saturated" in verdict
    assert "**SLOs met by every class**" in verdict and "## Plots" not in md


def _as_client_saw_it(folder: Path) -> pd.DataFrame:
    """The records as a client records them: no queue wait, no batch size, no replica."""
    df = read_csv(folder / "requests.csv")
    return df.assign(queue_wait_s=np.nan, batch_size=0, replica=-1)


def test_a_client_report_draws_only_what_a_client_sees(burst, tmp_path):
    src = burst[3]
    sc = load_scenario(ROOT / "scenarios" / "burst_load.yaml")
    df = _as_client_saw_it(src)
    s = summarize(df, sc, None, None, "stress", {"stress": {"api": "openai-chat", "workers": 1}})
    from simulator.plots import write_plots
    drawn = write_plots(tmp_path, df, s)
    assert BATCH not in drawn and not (tmp_path / BATCH).exists()  # no empty histogram
    assert set(drawn) == set(PLOTS) - {BATCH}
    md = markdown(s, "stress run", drawn)
    assert "batch_size_hist" not in md and "not observable" in md
    assert "utilisation: not observable from the client" in md
    assert f"![{LOAD}]({LOAD})" in md


def test_never_sent_after_max_duration_are_not_misses(burst, tmp_path):
    src = burst[3]
    sc = load_scenario(ROOT / "scenarios" / "burst_load.yaml")
    df = read_csv(src / "requests.csv")
    late = df["arrival_s"] >= 30
    cut = df.copy()
    cut.loc[late, ["outcome", "error"]] = ["not_sent", "--max-duration 30 s reached"]
    s = summarize(cut, sc)
    sent = int((~late).sum())
    assert s["requests"]["generated"] == len(df)  # every record is still there
    assert s["goodput"]["denominator"] == sent and s["goodput"]["excluded_not_sent_max_duration"] == int(late.sum())
    assert s["goodput"]["slo_attainment"] == pytest.approx(s["goodput"]["met"] / sent, abs=1e-6)
    # an interrupted run's unsent requests were offered and not served: they still count as misses
    cut.loc[late, "error"] = "interrupted (SIGINT)"
    s2 = summarize(cut, sc)
    assert s2["goodput"]["denominator"] == len(df) and "excluded_not_sent_max_duration" not in s2["goodput"]
    assert s2["goodput"]["slo_attainment"] < s["goodput"]["slo_attainment"]
    assert "never sent; they are left out of SLO attainment" in markdown(s, "stress run", [])


def test_no_empty_plot_when_nothing_completed(burst, tmp_path):
    sc = load_scenario(ROOT / "scenarios" / "burst_load.yaml")
    df = _as_client_saw_it(burst[3])
    failed = df.assign(outcome="connection_error", error="refused", ttft_s=np.nan, e2e_s=np.nan, tpot_s=np.nan,
                       end_s=np.nan, output_tokens=0)
    s = summarize(failed, sc, None, None, "stress", {"stress": {"api": "openai-chat", "workers": 1}})
    from simulator.plots import OUTCOMES, write_plots
    drawn = write_plots(tmp_path, failed, s)
    assert drawn == [OUTCOMES] and sorted(p.name for p in tmp_path.glob("*.png")) == [OUTCOMES]
    md = markdown(s, "stress run", drawn)
    assert "**SLOs missed by 3 of 3 classes**" in md and "failed (HTTP, connection or stream errors)" in md
