"""Property-based fuzz of every input reader (hypothesis): random mutations of the shipped scenarios, of their
YAML text, of --set overrides, of traces, length files and profiles. Each example must end in a Scenario (or
parsed data) or an InputError, nothing else, within a wall-clock alarm and an address-space cap: a hang or a
blow-up fails loudly, it cannot pass. Each test prints how many examples it tried and how they ended.

Budget: about a minute in all on a CI runner (FUZZ_SCALE=N multiplies the example counts)."""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import resource
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.costmodel import load_profile
from simulator.errors import InputError
from simulator.scenario import Scenario, load_scenario, resolve_path
from simulator.traces import read_azure, read_empirical, read_mooncake

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
TRACES = ROOT / "tests" / "data" / "traces"
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLE_S = 20  # wall-clock alarm per example (the slowest legitimate example takes well under 1 s)
MEM_HEADROOM = 2 << 30  # address space an example may add to the test process
FAST = dict(database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


def n(k: int) -> int:
    return max(1, int(k * SCALE))


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded():
    """SIGALRM after EXAMPLE_S seconds and a soft RLIMIT_AS a little above what the process uses now."""
    def alarm(*_):
        raise Hang(f"example ran over {EXAMPLE_S} s")
    old = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = vm + MEM_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, vm + MEM_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old)


class Tally:
    """Examples tried and how they ended; printed when the test ends (shown without -s)."""

    def __init__(self, name):
        self.name, self.c = name, Counter()

    def __call__(self, fn, *a, **kw):
        with bounded():
            try:
                out = fn(*a, **kw)
            except InputError as exc:
                line = exc.line()
                assert "\n" not in line and line.startswith("error: "), line
                self.c["refused (InputError)"] += 1
                return None
        self.c["accepted"] += 1
        return out

    def report(self, capsys):
        total = sum(self.c.values())
        with capsys.disabled():
            print(f"\n[fuzz] {self.name}: {total} tried, {total} passed "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(self.c.items()))})")


_uniq = itertools.count()


def _absolute_paths(d: dict, src: Path) -> dict:
    for c in d.get("workload", {}).get("classes", []):
        for key in ("arrival", "prompt_tokens", "output_tokens"):
            spec = c.get(key)
            if isinstance(spec, dict) and "path" in spec:
                spec["path"] = str(resolve_path(spec["path"], src))
    return d


BASES = [_absolute_paths(yaml.safe_load(p.read_text()), p) for p in SCENARIOS]
TEXTS = [p.read_text() for p in SCENARIOS]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


NAMES = ["poisson", "constant", "gamma", "onoff", "piecewise", "closed_loop", "trace", "fixed", "uniform", "lognormal",
         "exponential", "empirical", "single", "dynamic_batching", "continuous", "llamacpp", "default", "azure",
         "mooncake", "../escape", "/tmp/abs", "a/b", "", " ", "x" * 300, "é", "\x00", "fifo", "priority", "sjf"]
VALUES = st.one_of(
    st.integers(min_value=-(10 ** 20), max_value=10 ** 20),
    st.sampled_from([0, 1, -1, 2, 7, 2 ** 31, 2 ** 63, 10 ** 9, 10 ** 15, 10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 1e300, 1e-9, 1e-3, 0.5, 1.5, 1e9, 1e12, float("inf"), float("nan")]),
    st.sampled_from(NAMES), st.text(max_size=12), st.none(), st.booleans(),
    st.lists(st.integers(-3, 10 ** 6), max_size=3),
    st.lists(st.tuples(st.floats(0, 1e7), st.floats(0, 1e7)), max_size=4),
    st.dictionaries(st.sampled_from(["type", "rate", "value", "users", "mean", "x"]), st.integers(-3, 10 ** 7), max_size=3),
)
MUTATION = st.tuples(st.sampled_from(["set", "set", "scale", "scale", "delete", "dup", "unknown_key"]),
                     st.floats(0, 1, exclude_max=True), VALUES)


def _mutate(d: dict, muts) -> dict:
    d = copy.deepcopy(d)
    for op, where, value in muts:
        paths = [p for p in _paths(d) if p and p[0] != "limits"]
        if not paths:
            break
        path = paths[int(where * len(paths))]
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "set":
            parent[key] = value
        elif op == "scale":  # a plausible value made 10^k times bigger or smaller: probes the limits
            v = parent[key]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(value, int):
                k = value % 25 - 12
                parent[key] = type(v)(v * 10 ** k) if isinstance(v, float) or k >= 0 else max(1, v // 10 ** -k)
        elif op == "delete":
            del parent[key]
        elif op == "dup" and isinstance(parent[key], list) and parent[key]:
            parent[key].append(copy.deepcopy(parent[key][0]))
        elif op == "unknown_key" and isinstance(parent[key], dict):
            parent[key]["surprise"] = value
    return d


def _write(tmp: Path, name: str, content) -> Path:
    p = tmp / f"{next(_uniq)}_{name}"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        p.write_text(yaml.safe_dump(content, allow_unicode=True))
    return p


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------ scenario loader
T_LOAD = Tally("scenario loader, mutated shipped scenarios")


@settings(max_examples=n(400), **FAST)
@given(base=st.sampled_from(range(len(BASES))), muts=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_scenario_mutations(tmp, base, muts):
    d = _mutate(BASES[base], muts)
    out = T_LOAD(load_scenario, _write(tmp, "s.yaml", d))
    assert out is None or isinstance(out, Scenario)


def test_fuzz_scenario_mutations_report(capsys):
    T_LOAD.report(capsys)


T_TEXT = Tally("scenario loader, mutated YAML text")
NASTY = st.sampled_from(["[", "]", "{", "}", ":", "- ", "\n", "  ", "&a ", "*a", "!!python/object ", "!!binary ",
                         "<<: ", "? ", "'", '"', "#", "%YAML 1.1\n", "---\n", "...\n", "\t", "\ufeff", "é", "1e400",
                         ".inf", ".nan", "~", "0x10", "0o7", "2001-01-01", "duration_s: 5\n", "name: x\n"])


@settings(max_examples=n(250), **FAST)
@given(base=st.sampled_from(range(len(TEXTS))),
       edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 6), st.one_of(NASTY, st.text(max_size=4))),
                      min_size=1, max_size=5))
def test_fuzz_scenario_text(tmp, base, edits):
    text = TEXTS[base]
    for where, cut, ins in edits:
        i = int(where * len(text))
        text = text[:i] + ins + text[i + cut:]
    text = text.replace("../tests/data", str(ROOT / "tests" / "data"))
    out = T_TEXT(load_scenario, _write(tmp, "s.yaml", text))
    assert out is None or isinstance(out, Scenario)


def test_fuzz_scenario_text_report(capsys):
    T_TEXT.report(capsys)


# ------------------------------------------------------------------ --set overrides
T_SET = Tally("--set overrides")
SEG = st.one_of(st.sampled_from(["name", "seed", "duration_s", "num_requests", "workload", "classes", "arrival",
                                 "rate", "engine", "type", "cluster", "replicas", "limits", "requests", "x", ""]),
                st.integers(-2, 5).map(lambda i: f"[{i}]"), st.sampled_from(["[", "]", "[x]", "[0", ".", "=", "[99999999999999999999]"]))
SET_VALUE = st.one_of(st.sampled_from(["1", "-1", "1e15", "10000000000000000", ".inf", ".nan", "[", "{a: 1, a: 2}",
                                       "[" * 100 + "]" * 100, "poisson", "../x", "/abs", "null", "~", "{}", "[]",
                                       "{type: closed_loop, users: 1000000000}", "&a [*a]", "!!python/name:os.system"]),
                      st.text(max_size=10))


def _dotted(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


REAL = st.tuples(st.floats(0, 1, exclude_max=True), VALUES)  # a real path, a random value


@settings(max_examples=n(300), **FAST)
@given(base=st.sampled_from(range(len(SCENARIOS))),
       sets=st.lists(st.one_of(st.tuples(st.lists(SEG, min_size=1, max_size=5), SET_VALUE), REAL), min_size=1, max_size=3),
       seed=st.one_of(st.none(), st.integers(-5, 2 ** 70)))
def test_fuzz_set_overrides(base, sets, seed):
    items = []
    for segs, value in sets:
        if isinstance(segs, float):  # a path the scenario has, and a value of any type written as YAML
            paths = [p for p in _paths(BASES[base]) if p]
            path = _dotted(paths[int(segs * len(paths))])
            value = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).removesuffix("\n...\n").strip()
        else:
            path = ""
            for s in segs:
                path += s if s.startswith("[") or not path else f".{s}"
        items.append(f"{path}={value}")
    out = T_SET(load_scenario, SCENARIOS[base], items, seed)
    assert out is None or isinstance(out, Scenario)


def test_fuzz_set_overrides_report(capsys):
    T_SET.report(capsys)


# ------------------------------------------------------------------ traces, length files, profiles
T_TRACE = Tally("trace readers (Azure CSV, Mooncake JSONL), raw and mutated")
AZ_LINES = (TRACES / "azure_code_head2000.csv").read_bytes().splitlines(keepends=True)[:40]
MC_LINES = (TRACES / "mooncake_conv_head1000.jsonl").read_bytes().splitlines(keepends=True)[:20]
BYTES_NASTY = st.sampled_from([b"\xff", b"\x00", b"\xfe\xff", b",", b"\n", b"\r", b'"', b"Infinity", b"NaN", b"1e400",
                               b"-1", b"2.5", b"9" * 30, b"{", b"}", b"[", b"true", b"null", b"2023-13-45 25:61:61"])


@settings(max_examples=n(300), **FAST)
@given(fmt=st.sampled_from(["azure", "mooncake"]), keep=st.integers(1, 40),
       edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 8), st.one_of(BYTES_NASTY, st.binary(max_size=6))),
                      max_size=6))
def test_fuzz_trace_readers(tmp, fmt, keep, edits):
    data = b"".join((AZ_LINES if fmt == "azure" else MC_LINES)[:keep])
    for where, cut, ins in edits:
        i = int(where * len(data))
        data = data[:i] + ins + data[i + cut:]
    path = str(_write(tmp, "trace", data))
    out = T_TRACE(read_azure if fmt == "azure" else read_mooncake, path)
    if out is not None:  # what a reader returns is usable: sorted finite times, whole non-negative counts
        assert len(out.t) == len(out.prompt) == len(out.output) > 0
        assert all(x >= 0 for x in out.prompt) and all(x >= 0 for x in out.output)
        assert list(out.t) == sorted(out.t) and all(x == x and x != float("inf") for x in out.t)


def test_fuzz_trace_readers_report(capsys):
    T_TRACE.report(capsys)


T_LEN = Tally("length files (sample column, histogram)")
CELL = st.one_of(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000), st.floats(0, 1),
                 st.integers(-5, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from(["", "x", "1e400", "inf", "-0", "2.5", '"', "\xe9"]))


@settings(max_examples=n(200), **FAST)
@given(hist=st.booleans(), rows=st.lists(st.tuples(CELL, CELL, CELL), min_size=0, max_size=6),
       raw=st.one_of(st.just(b""), st.just(b""), st.binary(max_size=8)))
def test_fuzz_length_files(tmp, hist, rows, raw):
    if hist:
        text = "field,bin_lo_incl,bin_hi_excl,prob\n" + "".join(f"f,{a},{b},{c}\n" for a, b, c in rows)
    else:
        text = "tokens\n" + "".join(f"{a}\n" for a, _, _ in rows)
    path = str(_write(tmp, "len.csv", text.encode("utf-8", "surrogatepass") + raw))
    out = T_LEN(read_empirical, path, None, "f" if hist else None)
    if out is not None:
        vals, p = out
        assert len(vals) > 0 and (vals >= 1).all()
        assert p is None or (abs(p.sum() - 1) < 1e-9 and (p >= 0).all())


def test_fuzz_length_files_report(capsys):
    T_LEN.report(capsys)


T_PROF = Tally("cost profiles")
BASE_PROFILE = yaml.safe_load((ROOT / "simulator" / "profiles" / "default.yaml").read_text())


@settings(max_examples=n(200), **FAST)
@given(muts=st.lists(MUTATION, min_size=1, max_size=3))
def test_fuzz_profiles(tmp, muts):
    path = str(_write(tmp, "prof.yaml", _mutate(BASE_PROFILE, muts)))
    out = T_PROF(load_profile, path)
    if out is not None:  # an accepted profile gives finite, non-negative, positive-floor step times
        t = out.step_time(100, 1e4, 4, 4000)
        assert t == t and t > 0 and t != float("inf")


def test_fuzz_profiles_report(capsys):
    T_PROF.report(capsys)


# ------------------------------------------------------------------ accepted means buildable (and runnable)
T_BUILD = Tally("accepted scenarios build and run (small limits)")
SMALL = {"requests": 3000, "arrival_draws": 300_000, "horizon_s": 3600, "users": 128, "replicas": 8, "gpus": 16,
         "kv_blocks": 2_000_000, "slots": 64, "tokens": 70_000, "trace_rows": 3000}


@settings(max_examples=n(120), **FAST)
@given(base=st.sampled_from(range(len(BASES))), muts=st.lists(MUTATION, min_size=1, max_size=3))
def test_fuzz_accepted_scenarios_run(tmp, base, muts):
    from simulator.world import World
    d = _mutate(BASES[base], muts)
    if isinstance(d, dict):
        d["limits"] = SMALL
    sc = T_BUILD(load_scenario, _write(tmp, "s.yaml", d))
    if sc is not None:  # what load_scenario accepts, the simulator builds and runs to the end (or refuses)
        T_BUILD.c["accepted"] -= 1
        T_BUILD(lambda: World(sc).run())


def test_fuzz_accepted_scenarios_run_report(capsys):
    T_BUILD.report(capsys)


# ------------------------------------------------------------------ vLLM bench serve results
T_BENCH = Tally("vLLM bench serve results (sim import vllm-bench)")
BENCH = {"date": "20260120-101010", "backend": "openai-chat", "model_id": "m", "request_rate": 2.0, "burstiness": 1.0,
         "max_concurrency": None, "duration": 1.0, "input_lens": [10, 20, 7], "output_lens": [3, 2, 0],
         "ttfts": [0.02, 0.03, 0.0], "itls": [[0.005, 0.006], [0.005], []], "latencies": [0.031, 0.035, 0.0],
         "start_times": [100.0, 100.5, 100.7], "queue_times": [0.0, 0.0, 0.0], "errors": ["", "", "Bad Request"],
         "generated_texts": ["a b", "c", ""]}


@settings(max_examples=n(200), **FAST)
@given(muts=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_vllm_bench_results(tmp, muts):
    from simulator.import_vllm_bench import write_run_folder
    from simulator.runfolder import load_run_folder
    path = _write(tmp, "bench.json", json.dumps(_mutate(BENCH, muts)))
    out = tmp / f"{next(_uniq)}_run"
    if T_BENCH(write_run_folder, path, out, plots=False) is not None:  # what is accepted is a readable run folder
        try:
            run = load_run_folder(out)
        except InputError as exc:  # e.g. errors only: refused as a stress run folder would be
            assert "\n" not in exc.line()
        else:
            assert len(run.requests) >= 1 and (out / "tokens.parquet").is_file()


def test_fuzz_vllm_bench_results_report(capsys):
    T_BENCH.report(capsys)


def test_fuzz_counts_are_real():
    """The fuzz ran what it says (a guard against a strategy that silently generates nothing)."""
    for t in (T_LOAD, T_TEXT, T_SET, T_TRACE, T_LEN, T_PROF, T_BUILD, T_BENCH):
        assert sum(t.c.values()) >= 1, t.name
    assert json.dumps({t.name: dict(t.c) for t in (T_LOAD, T_SET)})

