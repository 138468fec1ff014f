"""`dynamic_batching` and `single`: fast-forward on and off give byte-identical records (issue 11: 13 of 240
rows of fifo_vs_batching used to differ by 1e-9 s, because a fast-forwarded run of k decode steps ended at
t + sum(times) while k single steps end at ((t + x1) + x2) + ...)."""
from __future__ import annotations

from pathlib import Path

import pytest

from simulator.records import write_csv
from simulator.scenario import load_scenario
from simulator.world import World

ROOT = Path(__file__).resolve().parents[1]


def _run(sc, ff, path):
    sc = sc.model_copy(deep=True)
    sc.engine.fast_forward = ff
    res = World(sc).run()
    write_csv(path, res.rows)
    return path.read_bytes(), res


@pytest.mark.parametrize("name,engine,timeout", [("fifo_vs_batching", "dynamic_batching", None),
                                                 ("fifo_vs_batching", "single", None),
                                                 ("priority_mixed", "dynamic_batching", None),
                                                 ("fifo_vs_batching", "dynamic_batching", 3.0)])
def test_batching_fast_forward_identical(tmp_path, name, engine, timeout):
    sc = load_scenario(ROOT / "scenarios" / f"{name}.yaml", [f"engine.type={engine}"])
    if timeout:  # clients hang up inside fast-forwarded runs: the cut must fall on the same step
        for c in sc.workload.classes:
            c.timeout_s = timeout
    fast, rf = _run(sc, True, tmp_path / "ff.csv")
    slow, rs = _run(sc, False, tmp_path / "step.csv")
    assert fast == slow
    assert [e["steps"] for e in rf.engine_stats] == [e["steps"] for e in rs.engine_stats]
    assert [e["busy_s"] for e in rf.engine_stats] == [e["busy_s"] for e in rs.engine_stats]
    if timeout:
        assert any(r[10] == "timeout" for r in rf.rows)
