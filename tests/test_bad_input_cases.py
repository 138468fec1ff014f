"""Issue 11's cases, each through the real CLI process: `python -m simulator.cli validate|run` with a wall-clock
timeout and an address-space cap, must exit 2 with exactly one stderr line naming the file, the field and the
reason, and no traceback. Cases that used to pass `validate` and hang or run out of memory in `run` are run
both ways: validate and run share one check."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "tests" / "data" / "traces"
MEM_CAP = 3 << 30  # bytes of address space for one CLI process
TIMEOUT = 90  # s, one CLI process (a hang fails the test, it cannot pass)


def base(**over):
    sc = {"name": "bad", "duration_s": 2, "engine": {"type": "dynamic_batching"},
          "workload": {"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 2}}]}}
    sc.update(over)
    return sc


def cls(**c):
    return base(workload={"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 2}, **c}]})


def trace_sc(fmt, path, **arr):
    return cls(arrival={"type": "trace", "format": fmt, "path": str(path), **arr},
               prompt_tokens={"type": "trace"}, output_tokens={"type": "trace"})


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "simulator.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, preexec_fn=_cap,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def w(tmp: Path, name: str, content) -> Path:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content)
    else:
        p.write_text(yaml.safe_dump(content))
    return p


def jl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# Each case: tmp folder -> (scenario path, extra args, env, file named, field named, reason substring)
def c_rate_inf(t):
    return w(t, "s.yaml", cls(arrival={"type": "poisson", "rate": float("inf")})), "s.yaml", "workload.classes[0].arrival.rate", "finite number"


def c_rate_1e12(t):
    return w(t, "s.yaml", cls(arrival={"type": "poisson", "rate": 1e12})), "s.yaml", "duration_s", "limits.requests"


def c_duration_inf(t):
    return w(t, "s.yaml", base(duration_s=float("inf"))), "s.yaml", "duration_s", "finite number"


def c_duration_1e15(t):
    return w(t, "s.yaml", base(duration_s=1e15)), "s.yaml", "duration_s", "limits.horizon_s"


def c_num_requests_1e15(t):
    sc = base(num_requests=10 ** 15)
    del sc["duration_s"]
    return w(t, "s.yaml", sc), "s.yaml", "num_requests", "(to draw 1,000,000,000,000,000 requests at 2/s) is over limits.horizon_s"


def c_onoff_on_rate_inf(t):
    return (w(t, "s.yaml", cls(arrival={"type": "onoff", "on_rate": float("inf"), "on_s": 1, "off_s": 1})), "s.yaml",
            "workload.classes[0].arrival.on_rate", "finite number")


def c_closed_loop_1e9_users(t):
    return (w(t, "s.yaml", cls(arrival={"type": "closed_loop", "users": 10 ** 9})), "s.yaml", "workload.classes",
            "limits.users")


def c_replicas_1e7(t):
    return w(t, "s.yaml", base(cluster={"replicas": 10 ** 7})), "s.yaml", "cluster.replicas", "limits.replicas"


def c_block_size_1e9(t):
    return (w(t, "s.yaml", base(engine={"type": "continuous", "block_size": 10 ** 9})), "s.yaml", "engine.block_size",
            "limits.block_size")


def c_n_parallel_1e9(t):
    return (w(t, "s.yaml", base(engine={"type": "llamacpp", "n_parallel": 10 ** 9})), "s.yaml", "engine.n_parallel",
            "limits.slots")


def c_trace_8000_years(t):
    tr = w(t, "tr.jsonl", jl([{"timestamp": 0, "input_length": 10, "output_length": 5},
                              {"timestamp": 8000 * 365 * 86400 * 1000, "input_length": 10, "output_length": 5}]))
    return w(t, "s.yaml", trace_sc("mooncake", tr)), "tr.jsonl", "workload.classes[0].arrival", "limits.horizon_s"


def c_scenario_50mb(t):
    p = t / "s.yaml"
    with open(p, "w") as fh:
        fh.write(yaml.safe_dump(base()))
        fh.write(("# padding " + "x" * 90 + "\n") * 20_000)  # 2 MB: over the 1 MiB cap, read no further
    return p, "s.yaml", "", "over the limit of 1,048,576"


def c_binary_scenario(t):
    return w(t, "s.yaml", bytes(range(256)) * 8), "s.yaml", "", "binary file"


def c_latin1_scenario(t):
    text = yaml.safe_dump(base(), allow_unicode=True) + "description: café au lait\n"
    return w(t, "s.yaml", text.encode("latin-1")), "s.yaml", "line", "not UTF-8"


def c_utf16_scenario(t):
    return w(t, "s.yaml", yaml.safe_dump(base()).encode("utf-16")), "s.yaml", "", "UTF-16"


def c_directory_scenario(t):
    d = t / "adir.yaml"
    d.mkdir()
    return d, "adir.yaml", "", "is a folder"


def c_directory_trace(t):
    d = t / "tdir"
    d.mkdir()
    return w(t, "s.yaml", trace_sc("azure", d)), "s.yaml", "workload.classes[0].arrival.path", "is a folder"


def c_deep_yaml(t):
    return w(t, "s.yaml", "name: x\nduration_s: 1\nworkload: " + "[" * 20000 + "]" * 20000 + "\n"), "s.yaml", "line 3", "nested deeper than 32"


def c_trace_non_utf8(t):
    tr = w(t, "tr.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,\xff5\n")
    return w(t, "s.yaml", trace_sc("azure", tr)), "tr.csv", "line 2", "not UTF-8"


def c_broken_profile(t):
    pr = w(t, "prof.yaml", "coefficients: {overhead_s: [1\n")
    return w(t, "s.yaml", base(engine={"type": "single", "profile": str(pr)})), "prof.yaml", "line 2", "not valid YAML"


def _hist(t, probs):
    rows = "".join(f"input_tokens,{100 * (i + 1)},{100 * (i + 1) + 1},{p}\n" for i, p in enumerate(probs))
    h = w(t, "h.csv", "field,bin_lo_incl,bin_hi_excl,prob\n" + rows)
    return w(t, "s.yaml", cls(prompt_tokens={"type": "empirical", "path": str(h), "field": "input_tokens"}))


def c_hist_zero_probs(t):
    return _hist(t, [0, 0]), "h.csv", "prob", "sum to 0"


def c_hist_negative_probs(t):
    return _hist(t, [0.5, -0.5]), "h.csv", "line 3: prob", "cannot be negative"


def c_hist_text_probs(t):
    return _hist(t, ["half", 0.5]), "h.csv", "line 2: prob", "not a finite number"


def c_gamma_cv_tiny(t):
    return (w(t, "s.yaml", cls(arrival={"type": "gamma", "rate": 2, "cv": 1e-300})), "s.yaml",
            "workload.classes[0].arrival.cv", "greater than or equal to 0.001")


def c_duplicate_users(t):
    sc = base(tenants={"users": [{"id": "u", "project": "default"}, {"id": "u", "project": "default"}],
                       "projects": [{"id": "default"}]})
    return w(t, "s.yaml", sc), "s.yaml", "tenants.users[1].id", "duplicate id 'u'"


def c_duplicate_projects(t):
    return w(t, "s.yaml", base(tenants={"projects": [{"id": "default"}, {"id": "default"}]})), "s.yaml", "tenants.projects[1].id", "duplicate id"


def c_duplicate_models(t):
    return w(t, "s.yaml", base(tenants={"models": [{"name": "default"}, {"name": "default"}]})), "s.yaml", "tenants.models[1].name", "duplicate name"


def c_duplicate_yaml_key(t):
    return w(t, "s.yaml", "name: x\nduration_s: 2\nduration_s: 3\nworkload: {classes: []}\n"), "s.yaml", "line 3", "duplicate key 'duration_s' (first on line 2)"


def c_lognormal_min_over_max(t):
    return (w(t, "s.yaml", cls(prompt_tokens={"type": "lognormal", "mean": 100, "min": 500, "max": 10})), "s.yaml",
            "workload.classes[0].prompt_tokens.min", "above max")


def c_negative_profile_coefficient(t):
    pr = w(t, "prof.yaml", {"coefficients": {"overhead_s": 0.002, "weights_s": 0.01, "decode_seq_s": -0.2}})
    return (w(t, "s.yaml", base(engine={"type": "single", "profile": str(pr)})), "prof.yaml", "coefficients.decode_seq_s",
            "must be a finite number >= 0, got -0.2 (engine.profile of ")


def c_infinity_trace_timestamp(t):
    tr = w(t, "tr.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 5}\n'
                          '{"timestamp": Infinity, "input_length": 5, "output_length": 5}\n')
    return w(t, "s.yaml", trace_sc("mooncake", tr)), "tr.jsonl", "line 2", "Infinity"


def c_fractional_tokens_mooncake(t):
    tr = w(t, "tr.jsonl", jl([{"timestamp": 0, "input_length": 5.5, "output_length": 5}]))
    return w(t, "s.yaml", trace_sc("mooncake", tr)), "tr.jsonl", "line 1: input_length", "not a whole number"


def c_fractional_tokens_azure(t):
    tr = w(t, "tr.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,2.5\n")
    return w(t, "s.yaml", trace_sc("azure", tr)), "tr.csv", "line 2: GeneratedTokens", "not an integer: '2.5'"


def c_fractional_tokens_lengths(t):
    lf = w(t, "len.csv", "tokens\n10\n12.5\n")
    return (w(t, "s.yaml", cls(output_tokens={"type": "empirical", "path": str(lf)})), "len.csv", "line 3: tokens",
            "not a whole number")


def c_fractional_tokens_scenario(t):
    return (w(t, "s.yaml", cls(prompt_tokens={"type": "fixed", "value": 2.5})), "s.yaml",
            "workload.classes[0].prompt_tokens.value", "fractional part")


def c_name_absolute(t):
    return w(t, "s.yaml", base(name=str(t / "elsewhere"))), "s.yaml", "name", "not a plain name"


def c_name_dotdot(t):
    return w(t, "s.yaml", base(name="../../escape")), "s.yaml", "name", "not a plain name"


# ---- beyond the issue's list: the same families
def c_nan_value(t):
    return w(t, "s.yaml", cls(timeout_s=float("nan"))), "s.yaml", "workload.classes[0].timeout_s", "finite number"


def c_alias_bomb(t):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    return w(t, "s.yaml", "\n".join(lines) + "\nname: x\n"), "s.yaml", "", "anchors/aliases are expanded"


def c_huge_string(t):
    return w(t, "s.yaml", base(description="y" * 50_000)), "s.yaml", "description", "over the limit of 10,000"


def c_set_deep(t):
    return w(t, "s.yaml", base()), ["--set", "description=" + "[" * 5000 + "]" * 5000], "s.yaml", "description", "nested deeper"


def c_set_duplicate_key(t):
    return w(t, "s.yaml", base()), ["--set", "slo={ttft_s: 1, ttft_s: 2}"], "s.yaml", "slo", "duplicate key 'ttft_s'"


def c_set_huge_duration(t):
    return w(t, "s.yaml", base()), ["--set", "duration_s=1e15"], "s.yaml", "duration_s", "limits.horizon_s"


def c_profile_is_folder(t):
    d = t / "prof.yaml"
    d.mkdir()
    return w(t, "s.yaml", base(engine={"type": "single", "profile": str(d)})), "prof.yaml", "engine.profile", "is a folder"


def c_profile_text_coefficient(t):
    pr = w(t, "prof.yaml", {"coefficients": {"overhead_s": "fast"}})
    return w(t, "s.yaml", base(engine={"type": "single", "profile": str(pr)})), "prof.yaml", "coefficients.overhead_s", "not a number: 'fast'"


def c_profile_zero_step(t):
    pr = w(t, "prof.yaml", {"coefficients": {k: 0.0 for k in ("overhead_s", "weights_s", "linear_per_token_s",
                                                               "decode_ctx_s", "decode_seq_s", "prefill_attn_s")}})
    return w(t, "s.yaml", base(engine={"type": "single", "profile": str(pr)})), "prof.yaml", "coefficients", "takes no time"


def c_piecewise_draws(t):
    arr = {"type": "piecewise", "points": [[0, 0], [1, 1e9], [1.000001, 0], [3600, 0]]}
    return w(t, "s.yaml", cls(arrival=arr)), "s.yaml", "workload.classes[0].arrival", "limits.arrival_draws"


def c_trace_rows_limit(t):
    sc = trace_sc("azure", TRACES / "azure_code_head2000.csv")
    sc["limits"] = {"trace_rows": 100}
    return w(t, "s.yaml", sc), "azure_code_head2000.csv", "", "limits.trace_rows = 100"


def c_file_bytes_limit(t):
    sc = trace_sc("mooncake", TRACES / "mooncake_conv_head1000.jsonl")
    sc["limits"] = {"file_bytes": 1000}
    return w(t, "s.yaml", sc), "mooncake_conv_head1000.jsonl", "", "limits.file_bytes"


def c_tokens_limit(t):
    return (w(t, "s.yaml", cls(prompt_tokens={"type": "fixed", "value": 10 ** 9})), "s.yaml",
            "workload.classes[0].prompt_tokens.value", "limits.tokens")


def c_count_bounded_horizon(t):
    sc = cls(arrival={"type": "poisson", "rate": 1e-9})
    del sc["duration_s"]
    sc["num_requests"] = 100
    return w(t, "s.yaml", sc), "s.yaml", "num_requests", "limits.horizon_s"


def c_derived_kv_blocks(t):
    return (w(t, "s.yaml", base(engine={"type": "continuous", "gpu_memory_gb": 1e12, "block_size": 1})), "s.yaml",
            "engine.gpu_memory_gb", "limits.kv_blocks")


def c_step_budget_of_one_token(t):
    sc = cls(prompt_tokens={"type": "fixed", "value": 100_000})
    sc["duration_s"] = 600
    sc["engine"] = {"type": "continuous", "max_num_seqs": 1, "max_num_batched_tokens": 1}
    return w(t, "s.yaml", sc), "s.yaml", "workload.classes", "limits.engine_steps"


def c_sequence_period(t):
    return (w(t, "s.yaml", cls(output_tokens={"type": "sequence", "values": [1, 2, 3], "repeat": 10 ** 12})), "s.yaml",
            "workload.classes[0].output_tokens.repeat", "limits.requests")


def c_prefix_blocks(t):
    sc = cls(prefix={"groups": 4, "tokens": 1_000_000, "block_tokens": 16})
    sc["duration_s"] = 3600
    return w(t, "s.yaml", sc), "s.yaml", "workload.classes[0].prefix", "limits.prefix_blocks"


def c_drain_huge(t):
    return w(t, "s.yaml", base(drain_s=1e15)), "s.yaml", "drain_s", "limits.horizon_s"


def c_trace_timestamp_overflow(t):
    tr = w(t, "tr.jsonl", '{"timestamp": 1e400, "input_length": 5, "output_length": 5}\n')
    return w(t, "s.yaml", trace_sc("mooncake", tr)), "tr.jsonl", "line 1: timestamp", "non-negative number"


def c_azure_timestamp_fraction_overflow(t):  # found by the fuzz: "0." + "1e400..." parsed as a float is inf
    tr = w(t, "tr.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1e400,10,5\n")
    return w(t, "s.yaml", trace_sc("azure", tr)), "tr.csv", "line 2: TIMESTAMP", "not a timestamp"


def c_bad_limits_section(t):
    return w(t, "s.yaml", base(limits={"requests": -1})), "s.yaml", "limits.requests", "greater than 0"


def c_yaml_bytes_env(t):
    return w(t, "s.yaml", base()), [], {"SERVESIM_MAX_YAML_BYTES": "10"}, "s.yaml", "", "over the limit of 10 bytes"


# cases that used to pass `validate` (or never got that far) and hang or blow up in `run`: both commands
RUN_TOO = {"rate_1e12", "duration_1e15", "num_requests_1e15", "closed_loop_1e9_users", "replicas_1e7",
           "block_size_1e9", "n_parallel_1e9", "trace_8000_years", "scenario_50mb", "name_absolute",
           "negative_profile_coefficient", "gamma_cv_tiny", "derived_kv_blocks", "piecewise_draws",
           "step_budget_of_one_token", "sequence_period", "prefix_blocks"}
CASES = {k[2:]: v for k, v in sorted(globals().items()) if k.startswith("c_")}
PARAMS = [(n, cmd) for n in CASES for cmd in (("validate", "run") if n in RUN_TOO else ("validate",))]


@pytest.mark.parametrize("case,cmd", PARAMS, ids=[f"{n}-{c}" for n, c in PARAMS])
def test_issue_case_one_line(tmp_path, case, cmd):
    got = CASES[case](tmp_path)
    path, rest = got[0], list(got[1:])
    args = rest.pop(0) if isinstance(rest[0], list) else []
    env = rest.pop(0) if isinstance(rest[0], dict) else None
    file, field, reason = rest
    extra = ["--out", tmp_path / "out", "-q", "--no-plots"] if cmd == "run" else []
    proc = cli(cmd, path, *args, *extra, cwd=tmp_path, env=env)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("error: ") and file in err and reason in err, err
    if field:
        assert f": {field}" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()
    assert not (tmp_path / "elsewhere").exists()


def test_raising_a_limit_lets_a_scenario_through(tmp_path):
    """The limits are ceilings, not rules: the message's remedy works."""
    sc = base(duration_s=1e6, workload={"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 1e-3}}]})
    p = w(tmp_path, "s.yaml", sc)
    proc = cli("validate", p, cwd=tmp_path)
    assert proc.returncode == 2 and "limits.horizon_s" in proc.stderr
    sc["limits"] = {"horizon_s": 2e6}
    proc = cli("validate", w(tmp_path, "s.yaml", sc), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr
    sc = trace_sc("azure", TRACES / "azure_code_head2000.csv", limit=50)
    del sc["duration_s"]
    sc["limits"] = {"trace_rows": 2000}
    proc = cli("validate", w(tmp_path, "s.yaml", sc), cwd=tmp_path)
    assert proc.returncode == 0 and "50 open-loop requests" in proc.stdout, proc.stderr


def test_default_report_folder_stays_under_reports(tmp_path):
    proc = cli("run", w(tmp_path, "s.yaml", base(name="plain-name_1.0")), "-q", "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file())
    assert set(written) == {"reports", "s.yaml"}
    assert (tmp_path / "reports" / "plain-name_1.0" / "requests.csv").is_file()
