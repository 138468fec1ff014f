"""The pooled ITL counts only gaps a client sees: those inside streamed responses (METRICS.md; the stress
tester records gaps of streamed requests only). A non-streaming request's tokens all arrive with its response."""
from __future__ import annotations

import pytest

from simulator.records import COLUMN_NAMES
from simulator.scenario import scenario_from_dict
from simulator.world import simulate

COL = {c: i for i, c in enumerate(COLUMN_NAMES)}
ENGINES = {
    "continuous": {"type": "continuous", "max_num_seqs": 16, "max_num_batched_tokens": 2048, "profile": "default"},
    "continuous_step": {"type": "continuous", "max_num_seqs": 16, "max_num_batched_tokens": 2048, "profile": "default",
                        "fast_forward": False},
    "dynamic_batching": {"type": "dynamic_batching", "max_batch_size": 8, "batch_timeout_s": 0.01, "profile": "default"},
    "llamacpp": {"type": "llamacpp", "n_parallel": 4, "n_ctx": 8192, "n_batch": 512, "profile": "default"},
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_itl_pools_only_streamed_requests(engine):
    cls = {"arrival": {"type": "poisson", "rate": 6.0}, "prompt_tokens": {"type": "uniform", "low": 50, "high": 400},
           "output_tokens": {"type": "uniform", "low": 1, "high": 60}, "timeout_s": 600}
    sc = scenario_from_dict({
        "name": f"itl_{engine}", "seed": 5, "num_requests": 300,
        "workload": {"classes": [{"name": "chat", **cls}, {"name": "batch", "stream": False, **cls}]},
        "engine": ENGINES[engine]})
    res = simulate(sc)
    rows = res.rows
    assert {r[COL["outcome"]] for r in rows} == {"ok"}
    streamed = sum(r[COL["output_tokens"]] - 1 for r in rows if r[COL["stream"]] == 1)
    whole = sum(r[COL["output_tokens"]] - 1 for r in rows if r[COL["stream"]] == 0)
    assert streamed > 0 and whole > 0
    assert res.itl[1].sum() == streamed  # one gap per streamed token after the first, none for the others
    assert res.itl[0].min() > 0


def test_pooled_gaps_are_the_same_when_packed_into_chunks(monkeypatch):
    """Step by step (as the twin server runs) every engine step adds an entry; packing them into arrays
    every ITL_CHUNK entries keeps memory flat and must not change the pooled gaps or their order."""
    import numpy as np
    import simulator.world as world
    d = {"name": "chunks", "seed": 4, "num_requests": 300,
         "engine": {"type": "continuous", "fast_forward": False, "profile": "default"},
         "workload": {"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 8}}]}}
    whole = simulate(scenario_from_dict(d)).itl
    monkeypatch.setattr(world, "ITL_CHUNK", 7)
    packed = simulate(scenario_from_dict(d)).itl
    assert whole[0].size > 1000
    assert np.array_equal(whole[0], packed[0]) and np.array_equal(whole[1], packed[1])
