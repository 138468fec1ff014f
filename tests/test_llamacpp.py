"""The llama.cpp engine: slot limits, n_batch chunking mixed with decodes, waiting for a slot,
context errors, prompt-cache reuse, and fast-forward that changes nothing in the records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.records import read_csv, write_csv
from simulator.scenario import load_scenario, scenario_from_dict
from simulator.world import World

ROOT = Path(__file__).resolve().parents[1]


def scenario(classes, engine=None, **top):
    d = {"name": "t", "seed": 3, "workload": {"classes": classes},
         "engine": {"type": "llamacpp", "n_parallel": 3, "n_ctx": 6144, "n_batch": 256, **(engine or {})}}
    d.update(top)
    return scenario_from_dict(d)


def run(sc, tmp_path, name="r", trace=True):
    w = World(sc)
    for r in w.replicas:
        r.engine.trace = [] if trace else None
    res = w.run()
    path = tmp_path / f"{name}.csv"
    write_csv(path, res.rows)
    return w, res, read_csv(path), path


def burst(n=40, rate=40.0, prompt=None, output=None, **kw):
    return {"name": "burst", "arrival": {"type": "poisson", "rate": rate},
            "prompt_tokens": prompt or {"type": "uniform", "low": 200, "high": 1500},
            "output_tokens": output or {"type": "uniform", "low": 5, "high": 60}, **kw}


def test_slots_and_batch_limits_hold_every_step(tmp_path):
    sc = scenario([burst()], num_requests=40)
    w, res, df, _ = run(sc, tmp_path)
    eng = w.replicas[0].engine
    tr = np.array([row[2:] for row in eng.trace])  # steps, busy slots, n_decode, prompt tokens
    assert (df.outcome == "ok").all()
    assert tr[:, 1].max() == 3  # all slots were used ...
    assert (tr[:, 1] <= 3).all()  # ... and never more
    assert (tr[:, 3] <= 256).all() and tr[:, 3].max() == 256  # prompts were chunked at n_batch
    mixed = tr[tr[:, 3] > 0]
    assert (mixed[:, 2] + mixed[:, 3] <= 256).all()  # decodes take their share of the batch first
    assert ((mixed[:, 2] > 0) & (mixed[:, 3] > 0)).any()  # prompt chunks ride along with decodes
    # intervals a request holds a slot: at most n_parallel overlap at any instant
    start = (df.arrival_s + df.queue_wait_s).to_numpy()
    end = df.end_s.to_numpy()
    for t in start + 1e-6:  # just after each start (a slot freed and retaken at one instant counts once)
        assert ((start <= t) & (end > t)).sum() <= 3
    assert eng.stats()["slots"]["max_busy"] == 3


def test_waiting_request_starts_when_a_slot_frees(tmp_path):
    fixed = {"type": "fixed", "value": 300}
    sc = scenario([burst(prompt=fixed, output={"type": "fixed", "value": 40}) | {"arrival": {"type": "constant", "rate": 1000}}],
                  engine={"n_parallel": 2}, num_requests=6)
    _, _, df, _ = run(sc, tmp_path)
    df = df.sort_values("request_id")
    start = (df.arrival_s + df.queue_wait_s).to_numpy()
    end = df.end_s.to_numpy()
    assert (df.queue_wait_s.iloc[:2] < 0.05).all()  # at most the step in progress
    for k in range(2, 6):  # each later request takes the slot freed by request k-2 at that instant
        assert start[k] == pytest.approx(end[k - 2], abs=1e-8)
        assert df.queue_wait_s.iloc[k] > 0.1


def test_prompt_longer_than_slot_context_is_refused_and_long_generation_stops_at_context(tmp_path):
    classes = [
        {"name": "too_long", "arrival": {"type": "constant", "rate": 2},
         "prompt_tokens": {"type": "fixed", "value": 1500}, "output_tokens": {"type": "fixed", "value": 10}},
        {"name": "fits", "arrival": {"type": "constant", "rate": 2},
         "prompt_tokens": {"type": "fixed", "value": 1000}, "output_tokens": {"type": "fixed", "value": 100}},
    ]
    sc = scenario(classes, engine={"n_parallel": 4, "n_ctx": 4096, "n_batch": 512}, num_requests=6)
    w, _, df, _ = run(sc, tmp_path)
    bad = df[df.class_name == "too_long"]
    assert len(bad) == 3 and (bad.outcome == "http_error").all() and (bad.http_status == 400).all()
    assert bad.error.str.contains(r"request \(1500 tokens\) exceeds the available context size \(1024 tokens\)").all()
    good = df[df.class_name == "fits"]
    assert (good.outcome == "ok").all()
    assert (good.output_tokens == 1024 - 1000).all()  # llama-server stops when the slot's context is full
    assert w.replicas[0].engine.stats()["slots"]["truncated_at_context"] == 3


def test_prompt_cache_reuses_a_slots_previous_prefix(tmp_path):
    cls = burst(rate=3.0, prompt={"type": "fixed", "value": 100},
                prefix={"groups": 2, "tokens": 1024, "block_tokens": 64})
    base = scenario([cls], num_requests=30, engine={"n_batch": 512})
    cached = scenario([cls], num_requests=30, engine={"n_batch": 512, "prefix_caching": True})
    w0, _, d0, _ = run(base, tmp_path, "a")
    w1, _, d1, _ = run(cached, tmp_path, "b")
    assert (d0.prefix_hit_tokens == 0).all()
    hits = d1.prefix_hit_tokens
    assert hits.max() == 1024 and (hits % 64 == 0).all() and (hits < d1.prompt_tokens).all()
    assert (hits > 0).sum() >= 20  # two groups over three slots: most requests find their prefix

    def prompt_tokens(w):
        return sum(k * p for _, _, k, _, _, p in w.replicas[0].engine.trace)  # p is 0 in multi-step runs
    assert prompt_tokens(w0) - prompt_tokens(w1) == hits.sum()  # exactly the cached tokens are skipped
    assert d1.ttft_s.mean() < d0.ttft_s.mean()


SCENARIOS = {
    "shipped": lambda: load_scenario(ROOT / "scenarios" / "llamacpp_slots.yaml"),
    "deadlines_and_cache": lambda: scenario(
        [burst(rate=2.0, output={"type": "lognormal", "mean": 200, "sigma": 0.8}, timeout_s=5.0,
               prefix={"groups": 3, "tokens": 512, "share": 0.7, "block_tokens": 128}),
         {"name": "trickle", "arrival": {"type": "poisson", "rate": 0.7}, "priority": 0,
          "prompt_tokens": {"type": "fixed", "value": 3000}, "output_tokens": {"type": "fixed", "value": 50}}],
        engine={"n_parallel": 4, "n_ctx": 8192, "n_batch": 384, "prefix_caching": True},
        scheduler={"policy": "priority"}, duration_s=40),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fast_forward_gives_identical_records(tmp_path, name):
    sc = SCENARIOS[name]()
    slow = sc.model_copy(update={"engine": sc.engine.model_copy(update={"fast_forward": False})})
    w1, r1, d1, p1 = run(sc, tmp_path, "ff")
    w2, r2, d2, p2 = run(slow, tmp_path, "step")
    assert p1.read_bytes() == p2.read_bytes()
    if name == "deadlines_and_cache":  # client timeouts cut fast-forward runs; refusals free slots at once
        assert {"ok", "timeout", "http_error"} <= set(d1.outcome)
    steps1 = sum(r.engine.steps for r in w1.replicas)
    waits1 = sum(len(r.engine.trace) for r in w1.replicas)
    assert steps1 == sum(r.engine.steps for r in w2.replicas)
    assert waits1 < steps1 / 3  # fast-forward really folded decode steps
    v1, c1 = r1.itl
    v2, c2 = r2.itl
    assert np.isclose(np.repeat(v1, c1).sum(), np.repeat(v2, c2).sum())


@pytest.mark.parametrize("order,picks", [(None, [3, 2, 1, 0, 3, 2]), ([2, 0], [3, 1, 2, 0, 3, 1]),
                                         ([1, 3, 0, 2], [1, 3, 0, 2, 1, 3])])
def test_slot_order_is_the_state_the_run_begins_in(order, picks):
    """Sequential requests take never-used slots first (highest id first, as llama-server's `<=` scan), then
    the slots used before the run, least recently used first, then the least recently released."""
    one = {"name": "one", "arrival": {"type": "closed_loop", "users": 1, "think_time_s": 0.0, "think": "fixed"},
           "prompt_tokens": {"type": "fixed", "value": 300}, "output_tokens": {"type": "fixed", "value": 4}}
    sc = scenario([one], {"n_parallel": 4, "n_ctx": 8192, "slot_order": order}, num_requests=6)
    w = World(sc)
    eng, got = w.replicas[0].engine, []
    pick = eng._pick_slot
    eng._pick_slot = lambda req: got.append(pick(req)[0]) or pick(req)
    w.run()
    assert got == picks


@pytest.mark.parametrize("order,needle", [([0, 0], "appears twice"), ([4], "not one of n_parallel=4")])
def test_bad_slot_order_is_refused_in_one_line(tmp_path, order, needle):
    import yaml
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "workload": {"classes": [burst()]},
                                 "engine": {"type": "llamacpp", "n_parallel": 4, "slot_order": order}}))
    from simulator.errors import InputError
    with pytest.raises(InputError) as e:
        load_scenario(p)
    assert needle in str(e.value) and "slot_order" in str(e.value) and "\n" not in str(e.value)
