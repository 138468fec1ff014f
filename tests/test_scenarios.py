"""Every shipped scenario validates and runs through `sim run` into a full report folder, and each
multi-tenant scenario tells the story its header promises, checked with numbers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from simulator.cli import app
from simulator.records import COLUMN_NAMES, OUTCOMES
from simulator.report import PLOTS
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
NAMES = [p.stem for p in SCENARIOS]


def sim(*args) -> CliRunner:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Each shipped scenario run once, with plots, as a user would run it."""
    base = tmp_path_factory.mktemp("reports")
    out = {}
    for p in SCENARIOS:
        sim("run", p, "--out", base / p.stem, "-q")
        out[p.stem] = base / p.stem
    return out


def load(folder: Path):
    return pd.read_csv(folder / "requests.csv", keep_default_na=False, na_values=[""]), json.loads((folder / "summary.json").read_text())


def test_the_required_scenarios_ship():
    required = {"normal_load", "burst_load", "vip_protection", "abusive_user", "mixed_load", "fifo_vs_batching", "priority_mixed"}
    assert required <= set(NAMES)


@pytest.mark.parametrize("path", SCENARIOS, ids=NAMES)
def test_validate_passes(path):
    result = sim("validate", path)
    assert result.stdout.startswith(f"ok: {path}")


@pytest.mark.parametrize("name", NAMES)
def test_run_writes_the_full_report(reports, name):
    folder = reports[name]
    for f in ("requests.csv", "summary.json", "report.md", "scenario.yaml", *PLOTS):
        assert (folder / f).stat().st_size > 0, f
    assert all((folder / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in PLOTS)
    df, s = load(folder)
    assert tuple(df.columns) == COLUMN_NAMES
    assert s["scenario"] == name and len(df) == s["requests"]["generated"] + s["window"]["excluded_warmup"]
    assert df["request_id"].is_unique and len(df) > 25  # the probe scenarios are short designed experiments
    assert s["requests"]["ok"] > 0 and s["latency"]["ttft"]["count"] == s["requests"]["ok"]
    md = (folder / "report.md").read_text()
    assert md.startswith(f"# sim run: {name}") and all(f"]({p})" in md for p in PLOTS)
    # the resolved scenario is itself a valid scenario, identical to the one that ran
    again = load_scenario(folder / "scenario.yaml")
    assert again.model_dump() == load_scenario(ROOT / "scenarios" / f"{name}.yaml").model_dump()


@pytest.mark.parametrize("name", NAMES)
def test_records_are_self_consistent(reports, name):
    """The metric definitions of METRICS.md, checked row by row on every shipped scenario."""
    df, _ = load(reports[name])
    sc = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
    assert set(df["outcome"]) <= set(OUTCOMES)
    ok = df[df["outcome"] == "ok"]
    eps = 1e-6
    assert (ok["queue_wait_s"] >= -eps).all() and (ok["ttft_s"] >= ok["queue_wait_s"] - eps).all()
    assert (ok["e2e_s"] >= ok["ttft_s"] - eps).all()
    assert np.allclose(ok["end_s"], ok["arrival_s"] + ok["e2e_s"], atol=eps)
    multi = ok[(ok["output_tokens"] > 1) & (ok["stream"] == 1)]
    assert np.allclose(multi["tpot_s"], (multi["e2e_s"] - multi["ttft_s"]) / (multi["output_tokens"] - 1), atol=eps)
    whole = ok[ok["stream"] == 0]  # a non-streaming client gets every token with the final response
    assert np.allclose(whole["ttft_s"], whole["e2e_s"], atol=eps) and whole["tpot_s"].isna().all()
    assert (ok["output_tokens"] <= ok["applied_max_tokens"]).all()
    assert (df["applied_max_tokens"] <= df["requested_max_tokens"]).all()
    assert (ok["batch_size"] >= 1).all() and (ok["replica"] >= 0).all()
    timeout = df["class_name"].map({c.name: c.timeout_s for c in sc.workload.classes})
    assert (ok["e2e_s"] <= timeout[ok.index] + eps).all()  # a client that hung up gets no `ok`
    rejected = df[df["outcome"].str.startswith("rejected")]
    assert (rejected["output_tokens"] == 0).all() and rejected["queue_wait_s"].isna().all()
    assert (rejected["replica"] == -1).all() and rejected["ttft_s"].isna().all()


def test_set_overrides_reach_the_run(reports, tmp_path):
    sim("run", ROOT / "scenarios" / "normal_load.yaml", "--out", tmp_path, "-q", "--no-plots", "--seed", "99",
        "--set", "scheduler.policy=sjf", "--set", "cluster.replicas=3")
    resolved = yaml.safe_load((tmp_path / "scenario.yaml").read_text())
    assert resolved["seed"] == 99 and resolved["scheduler"]["policy"] == "sjf" and resolved["cluster"]["replicas"] == 3
    df, _ = load(tmp_path)
    assert set(df["replica"]) == {0, 1, 2}
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------ the stories, in numbers
def outcomes(df, **where):
    for k, v in where.items():
        df = df[df[k] == v]
    return df["outcome"].value_counts().to_dict()


def test_normal_load_refuses_nothing(reports):
    df, s = load(reports["normal_load"])
    assert set(df["outcome"]) == {"ok"}
    assert set(df["degradation_level"]) == {"normal"}
    assert s["goodput"]["slo_attainment"] > 0.9


def test_burst_load_degrades_during_bursts_and_recovers(reports):
    df, s = load(reports["burst_load"])
    n = len(df)
    shares = {k: v / n for k, v in df["outcome"].value_counts().items()}
    assert 0.5 < shares["ok"] < 0.9  # overloaded, but most traffic is served
    assert 0.02 < shares["rejected_rate_limited"] < 0.2 and 0.05 < shares["rejected_degraded"] < 0.35
    assert set(df.loc[df["outcome"] == "rejected_rate_limited", "class_name"]) == {"api"}  # only the bursting user
    assert outcomes(df, class_name="vip_chat") == {"ok": (df["class_name"] == "vip_chat").sum()}
    assert set(df.loc[df["outcome"] == "rejected_degraded", "tier"]) == {"batch", "standard"}
    # the level climbs to critical in bursts and returns to normal between them
    level = s["timeseries"]["level"]
    assert max(level) == 3
    climbs = sum(1 for a, b in zip(level, level[1:]) if a == 0 and b > 0)
    assert climbs >= 3 and level.count(0) > 10
    # levels at admission cap the max_tokens of the requests they admit, as configured
    admitted = df[~df["outcome"].str.startswith("rejected")]
    for lvl, cap in {"soft": 512, "high": 256, "critical": 128}.items():
        at = admitted[admitted["degradation_level"] == lvl]
        assert len(at) > 10 and (at["applied_max_tokens"] <= cap).all()
        assert (at["applied_max_tokens"] == at["requested_max_tokens"].clip(upper=cap)).all()


def test_vip_protection_keeps_vip_latency(reports, tmp_path):
    df, s = load(reports["vip_protection"])
    vip = df[df["class_name"] == "vip_chat"]
    assert set(vip["outcome"]) == {"ok"}
    assert (df.loc[df["outcome"] == "rejected_degraded", "class_name"] != "vip_chat").all()
    assert outcomes(df, class_name="batch").get("rejected_degraded", 0) > 20
    sim("run", ROOT / "scenarios" / "vip_protection.yaml", "--out", tmp_path, "-q", "--no-plots",
        "--set", "scheduler.policy=fifo", "--set", "gateway.degradation=[]")
    bare, _ = load(tmp_path)
    bare_vip = bare[bare["class_name"] == "vip_chat"]
    assert (bare_vip["outcome"] != "ok").sum() > 10  # unprotected, VIP requests are refused at the full queue
    p95, bare_p95 = vip["ttft_s"].quantile(0.95), bare_vip["ttft_s"].quantile(0.95)
    assert p95 < 0.3 * bare_p95, (p95, bare_p95)


def test_abusive_user_is_limited_and_others_are_not(reports, tmp_path):
    df, _ = load(reports["abusive_user"])
    scraper = df[df["user"] == "scraper"]
    polite = df[df["user"] != "scraper"]
    assert set(polite["outcome"]) == {"ok"}
    got = outcomes(scraper)
    assert got["rejected_rate_limited"] > 0.5 * len(scraper) and got["rejected_quota"] > 10
    # replay the project's quota: 15 000 tokens (prompt + max_tokens) per 20 s window; every scraper
    # request past the rate limit is admitted exactly when it still fits in its window's budget
    used: dict = {}
    for r in scraper[scraper["outcome"] != "rejected_rate_limited"].itertuples():
        w, need = int(r.arrival_s // 20), r.prompt_tokens + r.applied_max_tokens
        fits = used.get(w, 0) + need <= 15_000
        assert (r.outcome == "ok") == fits, r
        used[w] = used.get(w, 0) + need * fits
    assert len(used) == 3 and min(used.values()) > 14_000
    sim("run", ROOT / "scenarios" / "abusive_user.yaml", "--out", tmp_path, "-q", "--no-plots",
        "--set", "gateway.user_rate_limit=null", "--set", "gateway.enforce_quota=false")
    bare, _ = load(tmp_path)
    bare_polite = bare[bare["user"] != "scraper"]
    assert polite["ttft_s"].quantile(0.95) < 0.1 * bare_polite["ttft_s"].quantile(0.95)
    assert (bare_polite["outcome"] == "rejected_queue_full").sum() > 20  # unprotected, polite users get 503s


def test_mixed_load_serves_every_class(reports):
    df, s = load(reports["mixed_load"])
    assert set(df["class_name"]) == {"chat", "code", "rag", "agents", "reports"}
    assert set(df["outcome"]) == {"ok"}
    assert all(c["ok"] > 5 for c in s["latency_by_class"].values())
    # the RAG ramp: 2.4 req/s on its plateau (40-80 s), 0.65 req/s on average over its first 10 s
    rag = df[df["class_name"] == "rag"]["arrival_s"]
    assert 1.8 < ((rag > 40) & (rag < 80)).sum() / 40 < 3.0 and (rag < 10).sum() < 15


def test_fifo_vs_batching(reports, tmp_path):
    df, s = load(reports["fifo_vs_batching"])
    sim("run", ROOT / "scenarios" / "fifo_vs_batching.yaml", "--out", tmp_path, "-q", "--no-plots",
        "--set", "engine.type=single")
    single, ss = load(tmp_path)
    assert (single["batch_size"] == 1).all() and df["batch_size"].max() > 4
    assert len(single) == len(df)  # the same request stream
    assert (single["prompt_tokens"].to_numpy() == df["prompt_tokens"].to_numpy()).all()
    assert single["ttft_s"].median() > 10 * df["ttft_s"].median()
    assert s["goodput"]["requests_per_s"] > 5 * ss["goodput"]["requests_per_s"]
    # iteration-level batching does not wait for a running batch to drain
    sim("run", ROOT / "scenarios" / "fifo_vs_batching.yaml", "--out", tmp_path / "c", "-q", "--no-plots",
        "--set", "engine.type=continuous")
    cont, _ = load(tmp_path / "c")
    assert set(cont["outcome"]) == {"ok"} and cont["ttft_s"].median() < 0.5 * df["ttft_s"].median()
