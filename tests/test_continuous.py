"""The vLLM-like `continuous` engine: step packing, paged KV, preemption, prefix cache, fast-forward."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from simulator.costmodel import load_profile
from simulator.errors import InputError
from simulator.records import COLUMN_NAMES, COLUMNS, write_csv
from simulator.scenario import load_scenario, scenario_from_dict
from simulator.world import World

ROOT = Path(__file__).resolve().parents[1]
COL = {c: i for i, c in enumerate(COLUMN_NAMES)}
FLOATS = {c for c, t in COLUMNS if t is float}


def record(row) -> dict:
    return {c: (None if row[i] == "" else float(row[i])) if c in FLOATS else row[i] for c, i in COL.items()}


def scenario(classes, engine=None, **top):
    data = {"name": "t", "seed": 1, "workload": {"classes": classes},
            "engine": {"type": "continuous", **(engine or {})}, **top}
    return scenario_from_dict(copy.deepcopy(data))


def run(sc, log=True, check=False):
    """Run a world; returns (records as dicts by request id, engines, result)."""
    w = World(sc)
    engines = [r.engine for r in w.replicas]
    for e in engines:
        if log:
            e.step_log = []
        if check:
            _check_invariants(e)
    res = w.run()
    recs = {row[0]: record(row) for row in res.rows}
    return recs, engines, res


def _check_invariants(e):
    """Wrap the engine's scheduler: before every step, blocks in use must equal what the requests' block
    tables and the shared prefix units account for, and never exceed the cache."""
    orig = e._schedule

    def checked():
        kv, bs = e.kv, e.bs
        private, refs = 0, {}
        for r in e.running.values():
            if r.rid in e.dec:
                blocks = -(-(r.prompt + e.tick - r.dec_base - 1) // bs)
            else:
                blocks = r.blocks
            held = r.units[1] if r.units is not None else []
            private += blocks - len(held) * (r.units[2] if r.units is not None else 0)
            for h in held:
                refs[h] = refs.get(h, 0) + 1
        shared = sum(kv.units[h][1] for h in refs)
        assert kv.used() == private + shared <= kv.num_blocks
        assert all(kv.units[h][0] == n for h, n in refs.items())
        assert all(kv.units[h][0] == 0 for h in kv.lru)
        assert kv.evictable == sum(kv.lru.values())
        return orig()
    e._schedule = checked


def steps(engine):
    """The step log expanded to one entry per step (fast-forward logs a run of decode steps once)."""
    out = []
    for s in engine.step_log:
        out.extend([s] * s["steps"])
    return out


# ---------------------------------------------------------------- step packing
def test_token_budget_and_max_num_seqs_hold_every_step():
    sc = scenario([{"name": "c", "arrival": {"type": "poisson", "rate": 20},
                    "prompt_tokens": {"type": "lognormal", "mean": 600, "sigma": 1.0},
                    "output_tokens": {"type": "lognormal", "mean": 60, "sigma": 0.8}}],
                  {"max_num_seqs": 8, "max_num_batched_tokens": 256}, num_requests=150)
    recs, (e,), _ = run(sc)
    assert all(r["outcome"] == "ok" for r in recs.values())
    log = steps(e)
    assert all(s["prefill_tokens"] + s["decodes"] <= 256 for s in log)
    assert all(s["seqs"] <= 8 and s["running"] <= 8 for s in log)
    # the limits were reached, so the asserts above had something to hold back
    assert any(s["prefill_tokens"] + s["decodes"] == 256 for s in log)
    assert any(s["seqs"] == 8 for s in log)
    # chunked prefill: prompts longer than the budget were split over several steps
    chunks: dict = {}
    for s in e.step_log:
        for rid, ch in s["chunks"]:
            chunks.setdefault(rid, []).append(ch)
    long = [rid for rid, r in recs.items() if r["prompt_tokens"] > 256]
    assert long and all(len(chunks[rid]) > 1 and sum(chunks[rid]) == recs[rid]["prompt_tokens"] for rid in long)


def test_without_chunked_prefill_prompts_go_whole_and_too_long_ones_are_refused():
    sc = scenario([{"name": "c", "arrival": {"type": "poisson", "rate": 10},
                    "prompt_tokens": {"type": "uniform", "low": 100, "high": 1200},
                    "output_tokens": {"type": "fixed", "value": 20}}],
                  {"chunked_prefill": False, "max_num_batched_tokens": 1000, "max_num_seqs": 16}, num_requests=80)
    recs, (e,), _ = run(sc)
    for rid, r in recs.items():
        if r["prompt_tokens"] + 20 > 1000:
            assert r["outcome"] == "http_error" and "max_num_batched_tokens" in r["error"] and r["http_status"] == 400
        else:
            assert r["outcome"] == "ok"
    for s in e.step_log:
        for rid, ch in s["chunks"]:
            assert ch == recs[rid]["prompt_tokens"]  # never split
    assert any(r["outcome"] == "http_error" for r in recs.values())


def test_timing_follows_the_cost_model_for_a_lone_request():
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1},
                    "prompt_tokens": {"type": "fixed", "value": 700},
                    "output_tokens": {"type": "fixed", "value": 50}}], num_requests=1)
    recs, _, res = run(sc)
    cost = load_profile("default")
    prefill = cost.step_time(700, 700 * 700, 0, 0)
    decodes = [cost.step_time(0, 0, 1, 700 + g) for g in range(1, 50)]  # context = prompt + tokens so far
    r = recs[0]
    assert r["ttft_s"] == pytest.approx(prefill, rel=1e-9)
    assert r["e2e_s"] == pytest.approx(prefill + sum(decodes), rel=1e-9)
    assert r["tpot_s"] == pytest.approx(sum(decodes) / 49, rel=1e-9)
    assert r["itl_max_s"] == pytest.approx(max(decodes), rel=1e-9)
    assert r["queue_wait_s"] == 0.0 and r["batch_size"] == 1
    gaps, weights = res.itl
    assert int(weights.sum()) == 49 and float((gaps * weights).sum()) == pytest.approx(sum(decodes), rel=1e-9)


def test_segment_step_times_are_the_cost_models():
    """Fast-forward prices step i of a decode run as A + B*i: that must be the cost model's own step time."""
    for name in ("default", "llama2-70b_h100_tp8_splitwise", "opt-13b_a100_tp1_distserve-vllm"):
        cost = load_profile(name)
        for n, ctx in ((1, 100), (37, 50_000), (256, 400_000)):
            A, B = cost.step_time(0, 0, n, ctx + n), cost.decode_ctx_s * n
            for i in (0, 1, 17, 500):
                assert A + B * i == pytest.approx(cost.step_time(0, 0, n, ctx + n + n * i), rel=1e-12)


# ---------------------------------------------------------------- paged KV cache
def test_kv_blocks_are_derived_from_gpu_memory():
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1}}], num_requests=1)
    e = World(sc).replicas[0].engine
    cost = load_profile("default")
    assert e.kv.num_blocks == math.floor((80 * 0.9 * 1e9 - cost.weight_bytes) / (cost.kv_bytes_per_token * 16))
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1}}],
                  {"profile": "llama2-70b_a100_tp4_splitwise", "block_size": 32}, num_requests=1)
    cost = load_profile("llama2-70b_a100_tp4_splitwise")  # four GPUs hold the weights and the cache
    assert World(sc).replicas[0].engine.kv.num_blocks == math.floor(
        (4 * 80 * 0.9 * 1e9 - cost.weight_bytes) / (cost.kv_bytes_per_token * 32))
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1}}], {"gpu_memory_gb": 16}, num_requests=1)
    with pytest.raises(InputError, match="engine.gpu_memory_gb"):
        World(sc)
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1}}],
                  {"max_num_seqs": 64, "max_num_batched_tokens": 32}, num_requests=1)
    with pytest.raises(InputError, match="max_num_batched_tokens"):
        World(sc)


def test_blocks_never_overcommitted_and_all_freed_at_the_end():
    sc = scenario([{"name": "c", "arrival": {"type": "poisson", "rate": 30},
                    "prompt_tokens": {"type": "lognormal", "mean": 300, "sigma": 0.8, "max": 2000},
                    "output_tokens": {"type": "lognormal", "mean": 150, "sigma": 0.8, "max": 1000},
                    "prefix": {"groups": 3, "tokens": 128, "share": 0.7, "block_tokens": 32},
                    "timeout_s": 8}],
                  {"num_blocks": 300, "block_size": 16, "prefix_caching": True, "max_num_seqs": 32}, num_requests=250)
    recs, (e,), _ = run(sc, check=True)
    kv = e.kv
    assert all(s["used_blocks"] <= 300 for s in e.step_log)
    assert max(s["used_blocks"] for s in e.step_log) == 300  # the cache was full at times
    assert e.preemptions > 0 and any(r["outcome"] == "timeout" for r in recs.values())
    assert not e.running and kv.used() == 0 and kv.free + kv.evictable == 300
    assert all(ent[0] == 0 for ent in kv.units.values())


def test_preemption_exactly_when_blocks_run_out_and_the_preempted_request_finishes():
    # a (32 prompt tokens) prefills in step 1, b (1 ms later) in step 2; 10 blocks of 16 tokens. Before step j
    # a holds 32 + j - 2 tokens and b 32 + j - 3, and each needs a new block when its count is a multiple of
    # 16. The cache is full from step 35 on; before step 50, a (at 80 tokens) needs its 6th block while a and b hold 5 each: no block is free,
    # so b, the newest, is preempted. a finishes at step 100; b then recomputes 32 + 48 tokens and finishes.
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1000},
                    "prompt_tokens": {"type": "fixed", "value": 32},
                    "output_tokens": {"type": "fixed", "value": 100}}],
                  {"num_blocks": 10, "block_size": 16, "fast_forward": False}, num_requests=2)
    recs, (e,), _ = run(sc, check=True)
    log = {s["tick"]: s for s in e.step_log}
    a, b = recs[0], recs[1]
    assert a["outcome"] == b["outcome"] == "ok" and a["output_tokens"] == b["output_tokens"] == 100
    assert a["preemptions"] == 0 and b["preemptions"] == 1 and e.preemptions == 1
    assert all(log[t]["seqs"] == 2 for t in range(2, 50))  # nothing preempted while blocks remained
    assert log[49]["used_blocks"] == 10 and log[49]["free_blocks"] == 0
    # full from step 35 on, but nobody needed a block until step 50: no preemption before that
    assert log[34]["free_blocks"] == 1 and all(log[t]["free_blocks"] == 0 for t in range(35, 50))
    assert all(log[t]["seqs"] == 1 and log[t]["chunks"] == [] for t in range(50, 101))
    assert log[101]["chunks"] == [(1, 32 + 48)]  # recompute: prompt + the 48 tokens b had
    assert b["e2e_s"] > a["e2e_s"] and b["itl_max_s"] > 40 * a["itl_max_s"]  # b's client waited ~50 steps


@pytest.mark.parametrize("policy,victim", [("fifo", "vip"), ("priority", "low"), ("priority_aging", "low")])
@pytest.mark.parametrize("ff", [True, False])
def test_preemption_takes_the_newest_under_fifo_and_the_lowest_ranked_under_priority(policy, victim, ff):
    # low (priority 2) is admitted at t=0, vip (priority 0) ~50 ms later; the 10 blocks run out while both
    # decode. FCFS preempts the newest (vip); a priority scheduler preempts the request it ranks last (low),
    # as vLLM's priority policy does, although low is the older one.
    length = {"prompt_tokens": {"type": "fixed", "value": 32}, "output_tokens": {"type": "fixed", "value": 100}}
    sc = scenario([{"name": "low", "priority": 2, "arrival": {"type": "constant", "rate": 0.01}, **length},
                   {"name": "vip", "priority": 0, **length,
                    "arrival": {"type": "piecewise", "points": [[0, 0], [0.05, 0], [0.0500001, 1e6], [10, 1e6]]}}],
                  {"num_blocks": 10, "block_size": 16, "fast_forward": ff}, num_requests=2,
                  scheduler={"policy": policy})
    recs, (e,), _ = run(sc, check=True)
    by = {r["class_name"]: r for r in recs.values()}
    assert by["low"]["arrival_s"] == 0.0 and by["vip"]["arrival_s"] > 0.05
    assert e.preemptions == 1 and {c: r["preemptions"] for c, r in by.items()} == {
        "low": int(victim == "low"), "vip": int(victim == "vip")}
    assert all(r["outcome"] == "ok" and r["output_tokens"] == 100 for r in recs.values())
    other = "vip" if victim == "low" else "low"
    assert by[victim]["end_s"] > by[other]["end_s"]  # the victim recomputes after the other finishes


def test_priority_preemption_under_load_keeps_blocks_consistent_and_picks_the_lowest_ranked():
    """Many preemptions, prefilling victims among them (chunked prefill, long-prompt queue, prefix cache):
    every victim is a running request the scheduler ranks last, and the block accounting holds each step."""
    sc = scenario([{"name": "vip", "priority": 0, "arrival": {"type": "poisson", "rate": 6},
                    "prompt_tokens": {"type": "lognormal", "mean": 900, "sigma": 0.8, "max": 3000},
                    "output_tokens": {"type": "lognormal", "mean": 150, "sigma": 0.8, "max": 800},
                    "prefix": {"groups": 3, "tokens": 256, "share": 0.5, "block_tokens": 32}, "timeout_s": 30},
                   {"name": "bulk", "priority": 3, "arrival": {"type": "poisson", "rate": 10},
                    "prompt_tokens": {"type": "uniform", "low": 500, "high": 4000},
                    "output_tokens": {"type": "uniform", "low": 20, "high": 400}, "timeout_s": 30}],
                  {"num_blocks": 600, "prefix_caching": True, "max_num_seqs": 32, "max_num_batched_tokens": 1024,
                   "long_prefill_threshold": 2500}, num_requests=400, scheduler={"policy": "priority"})
    w = World(sc)
    (e,) = [r.engine for r in w.replicas]
    _check_invariants(e)
    victims = []
    pick = e._victim

    def watched():
        r = pick()
        key = e.queue.key
        assert key(r) == max(key(x) for x in e.running.values())
        victims.append("decoding" if r.rid in e.dec else "prefilling")
        return r
    e._victim = watched
    res = w.run()
    assert len(victims) == e.preemptions > 20 and {"decoding", "prefilling"} <= set(victims)
    recs = [record(row) for row in res.rows]
    assert {r["outcome"] for r in recs if r["preemptions"]} <= {"ok", "timeout"}
    assert e.kv.used() == 0


def test_a_request_too_large_for_the_cache_gets_http_error():
    sc = scenario([{"name": "small", "arrival": {"type": "constant", "rate": 2},
                    "prompt_tokens": {"type": "fixed", "value": 100}, "output_tokens": {"type": "fixed", "value": 50}},
                   {"name": "huge", "arrival": {"type": "constant", "rate": 2},
                    "prompt_tokens": {"type": "fixed", "value": 1000}, "output_tokens": {"type": "fixed", "value": 100}}],
                  {"num_blocks": 64, "block_size": 16}, num_requests=10)
    recs, (e,), _ = run(sc)
    for r in recs.values():
        if r["class_name"] == "huge":  # 1000 + 100 tokens > 64 * 16 = 1024
            assert r["outcome"] == "http_error" and r["http_status"] == 400
            assert r["error"].startswith("prompt exceeds KV capacity") and r["output_tokens"] == 0
        else:
            assert r["outcome"] == "ok"
    assert e.stats()["kv_cache"]["rejected_too_large"] == 5


def test_client_deadline_ends_a_running_request_at_the_next_boundary_and_frees_it():
    sc = scenario([{"name": "c", "arrival": {"type": "constant", "rate": 1},
                    "prompt_tokens": {"type": "fixed", "value": 500}, "output_tokens": {"type": "fixed", "value": 2000},
                    "timeout_s": 3.0}], {"num_blocks": 1000}, num_requests=3)
    recs, (e,), _ = run(sc)
    cost = load_profile("default")
    longest = cost.step_time(0, 0, 3, 3 * 2600)
    for r in recs.values():
        deadline = r["arrival_s"] + 3.0
        assert r["outcome"] == "timeout" and 0 < r["output_tokens"] < 2000
        assert deadline <= r["end_s"] < deadline + longest
    assert e.kv.used() == 0 and not e.running


# ---------------------------------------------------------------- prefix cache
def test_prefix_hits_reduce_prefill_tokens_by_the_cached_amount():
    cls = [{"name": "c", "arrival": {"type": "poisson", "rate": 2},
            "prompt_tokens": {"type": "fixed", "value": 100}, "output_tokens": {"type": "fixed", "value": 20},
            "prefix": {"groups": 1, "tokens": 512, "share": 1.0, "block_tokens": 64}}]
    recs, (e,), _ = run(scenario(cls, {"prefix_caching": True}, num_requests=30))
    computed: dict = {}
    for s in e.step_log:
        for rid, ch in s["chunks"]:
            computed[rid] = computed.get(rid, 0) + ch
    first = min(recs)
    assert recs[first]["prefix_hit_tokens"] == 0 and computed[first] == 612
    for rid, r in recs.items():
        if rid != first:
            assert r["prefix_hit_tokens"] == 512 and computed[rid] == 612 - 512
    pc = e.stats()["prefix_cache"]
    assert pc["hits"] == 29 and pc["misses"] == 1 and pc["prefill_tokens_saved"] == 29 * 512
    off, _, _ = run(scenario(cls, {"prefix_caching": False}, num_requests=30))
    ttft_on = np.median([r["ttft_s"] for r in recs.values()])
    ttft_off = np.median([r["ttft_s"] for r in off.values()])
    assert ttft_on < 0.5 * ttft_off and all(r["prefix_hit_tokens"] == 0 for r in off.values())


def test_at_least_one_prompt_token_is_computed_and_lru_evicts_unreferenced_units(tmp_path):
    # Mooncake-style ids: a prompt made of exactly two cached 512-token blocks still computes the last one.
    lines = ['{"timestamp": %d, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]}' % (i * 1000)
             for i in range(3)]
    lines.append('{"timestamp": 3000, "input_length": 2048, "output_length": 4, "hash_ids": [7, 8, 9, 10]}')
    lines.append('{"timestamp": 4000, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]}')
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cls = [{"name": "c", "arrival": {"type": "trace", "format": "mooncake", "path": str(path), "limit": 5},
            "prompt_tokens": {"type": "trace"}, "output_tokens": {"type": "trace"}}]
    # 160 blocks of 16 = 2560 tokens: request 3 (2048 + 4 tokens) needs 129 blocks, so the cached [1, 2]
    # units (64 blocks, unreferenced) must make room and the last request misses again
    recs, (e,), _ = run(scenario(cls, {"prefix_caching": True, "num_blocks": 160}), check=True)
    assert [recs[i]["prefix_hit_tokens"] for i in range(5)] == [0, 512, 512, 0, 0]
    assert e.kv.evicted_units >= 1
    recs, (e,), _ = run(scenario(cls, {"prefix_caching": True, "num_blocks": 1000}))
    assert [recs[i]["prefix_hit_tokens"] for i in range(5)] == [0, 512, 512, 0, 512]
    assert e.kv.evicted_units == 0


def test_long_prompts_prefill_one_at_a_time_without_blocking_short_ones():
    sc = scenario([{"name": "short", "arrival": {"type": "poisson", "rate": 10},
                    "prompt_tokens": {"type": "fixed", "value": 200}, "output_tokens": {"type": "fixed", "value": 30}},
                   {"name": "long", "arrival": {"type": "poisson", "rate": 3},
                    "prompt_tokens": {"type": "fixed", "value": 6000}, "output_tokens": {"type": "fixed", "value": 30}}],
                  {"max_num_batched_tokens": 1024, "long_prefill_threshold": 4096}, num_requests=120)
    recs, (e,), _ = run(sc)
    assert all(r["outcome"] == "ok" for r in recs.values())
    is_long = {rid: r["class_name"] == "long" for rid, r in recs.items()}
    mixed = 0
    for s in e.step_log:
        longs = [rid for rid, _ in s["chunks"] if is_long[rid]]
        assert len(longs) <= 1
        if longs and any(not is_long[rid] for rid, _ in s["chunks"]):
            mixed += 1
    assert mixed > 0  # short prompts were admitted while a long one was prefilling
    # a long prompt's chunks are contiguous: the next long prompt starts after the previous one finished
    order = [rid for s in e.step_log for rid, _ in s["chunks"] if is_long[rid]]
    seen, last = set(), None
    for rid in order:
        if rid != last:
            assert rid not in seen
            seen.add(rid)
            last = rid


# ---------------------------------------------------------------- fast-forward
SHIPPED = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml") if "type: continuous" in p.read_text())


def _csv(sc, ff, path):
    sc = sc.model_copy(deep=True)
    sc.engine.fast_forward = ff
    w = World(sc)
    res = w.run()
    write_csv(path, res.rows)
    return path.read_bytes(), res


@pytest.mark.parametrize("name", SHIPPED)
def test_fast_forward_gives_identical_records_on_shipped_scenarios(name, tmp_path):
    sc = load_scenario(ROOT / "scenarios" / name)
    fast, rf = _csv(sc, True, tmp_path / "ff.csv")
    slow, rs = _csv(sc, False, tmp_path / "step.csv")
    assert fast == slow
    assert sum(e["steps"] for e in rf.engine_stats) == sum(e["steps"] for e in rs.engine_stats)
    assert rf.series["kv_util"] == rs.series["kv_util"]
    assert np.array_equal(np.sort(rf.itl[0]), np.sort(rs.itl[0])) and rf.itl[1].sum() == rs.itl[1].sum()


def test_fast_forward_identical_under_preemption_timeouts_and_kv_routing(tmp_path):
    sc = scenario([{"name": "a", "arrival": {"type": "gamma", "rate": 12, "cv": 2},
                    "prompt_tokens": {"type": "lognormal", "mean": 500, "sigma": 1.0, "max": 3000},
                    "output_tokens": {"type": "lognormal", "mean": 200, "sigma": 1.0, "max": 1500},
                    "prefix": {"groups": 4, "tokens": 256, "share": 0.5, "block_tokens": 32}, "timeout_s": 20},
                   {"name": "b", "arrival": {"type": "closed_loop", "users": 6, "think_time_s": 0.5},
                    "prompt_tokens": {"type": "uniform", "low": 2000, "high": 5000},
                    "output_tokens": {"type": "fixed", "value": 64}, "timeout_s": 15}],
                  {"num_blocks": 700, "prefix_caching": True, "max_num_seqs": 48, "max_num_batched_tokens": 1024,
                   "long_prefill_threshold": 2500},
                  num_requests=500, cluster={"replicas": 2, "router": "least_kv"}, scheduler={"policy": "priority"})
    fast, rf = _csv(sc, True, tmp_path / "ff.csv")
    slow, rs = _csv(sc, False, tmp_path / "step.csv")
    assert fast == slow
    outcomes = {row[COL["outcome"]] for row in rf.rows}
    assert {"ok", "timeout"} <= outcomes
    assert sum(s["kv_cache"]["preemptions"] for s in rf.engine_stats) > 0
    assert rf.series["kv_util"] == rs.series["kv_util"]
    # one pooled gap per token after each request's first
    assert rf.itl[1].sum() == sum(max(row[COL["output_tokens"]] - 1, 0) for row in rf.rows)


def test_fast_forward_runs_far_fewer_engine_events():
    sc = scenario([{"name": "c", "arrival": {"type": "poisson", "rate": 4},
                    "prompt_tokens": {"type": "lognormal", "mean": 800}, "output_tokens": {"type": "lognormal", "mean": 250}}],
                  num_requests=300)
    _, (e,), _ = run(sc)
    assert e.steps > 5 * len(e.step_log)  # most decode steps went by in runs, not one by one
    assert max(s["steps"] for s in e.step_log) > 100


# ---------------------------------------------------------------- async scheduling (vLLM's default)
def _boundaries(e):
    """Every step boundary of a run, from a step-by-step log (fast_forward off)."""
    return sorted({s["t0"] for s in e.step_log} | {s["t1"] for s in e.step_log})


@pytest.mark.parametrize("rate", [7.0, 13.0, 29.0])
def test_async_scheduling_admits_an_arrival_one_step_later_than_a_synchronous_loop(rate):
    """vLLM's batch queue of two: a request arriving while step k runs is read when k ends, and step k+1 was
    scheduled already, so its prefill is step k+2; a synchronous scheduler puts it in step k+1. An idle engine
    schedules it at once either way."""
    classes = [{"name": "c", "arrival": {"type": "constant", "rate": rate},
                "prompt_tokens": {"type": "fixed", "value": 300}, "output_tokens": {"type": "fixed", "value": 40}}]
    got = {}
    for lag in (False, True):
        sc = scenario(classes, {"async_scheduling": lag, "fast_forward": False}, num_requests=2)
        recs, (e,), _ = run(sc)
        joined = next(s["t0"] for s in e.step_log if any(rid == 1 for rid, _ in s["chunks"]))
        sent = recs[1]["arrival_s"]
        b = _boundaries(e)
        assert recs[0]["arrival_s"] < sent < recs[0]["arrival_s"] + recs[0]["e2e_s"]  # sent while the first ran
        assert not any(abs(t - sent) < 1e-12 for t in b)  # inside a step, not at a boundary
        got[lag] = (joined, [t for t in b if t > sent], recs)
    (t_sync, after_sync, recs), (t_async, after_async, recs2) = got[False], got[True]
    assert t_sync == pytest.approx(after_sync[0], rel=1e-12)  # the boundary that ends the step it arrived in
    assert t_async == pytest.approx(after_async[1], rel=1e-12)  # the one after
    assert recs2[0]["ttft_s"] == recs[0]["ttft_s"]  # the first request found the engine idle
    assert recs2[1]["ttft_s"] > recs[1]["ttft_s"]


def test_async_scheduling_fast_forward_matches_step_by_step_under_load(tmp_path):
    """Held-back arrivals cut a decode run where they can join: fast-forward on and off give the same records."""
    sc = scenario([{"name": "a", "arrival": {"type": "gamma", "rate": 15, "cv": 2},
                    "prompt_tokens": {"type": "lognormal", "mean": 500, "sigma": 1.0, "max": 3000},
                    "output_tokens": {"type": "lognormal", "mean": 150, "sigma": 1.0, "max": 1000}, "timeout_s": 8}],
                  {"num_blocks": 600, "max_num_seqs": 32, "max_num_batched_tokens": 1024, "async_scheduling": True},
                  num_requests=400)
    fast, rf = _csv(sc, True, tmp_path / "ff.csv")
    slow, _ = _csv(sc, False, tmp_path / "step.csv")
    assert fast == slow
    assert {"ok", "timeout"} <= {row[COL["outcome"]] for row in rf.rows}
