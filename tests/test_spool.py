"""The twin server keeps finished records in a temporary CSV, not in memory: what it reads back must write
out byte for byte as the rows it was given."""
from __future__ import annotations

from simulator.records import write_csv
from simulator.scenario import scenario_from_dict
from simulator.twin.spool import RecordSpool
from simulator.world import simulate


def test_spooled_rows_write_the_same_requests_csv(tmp_path):
    sc = scenario_from_dict({
        "name": "spool", "seed": 2, "num_requests": 200,
        "gateway": {"rate_limit": {"rate": 20, "burst": 5}},
        "workload": {"classes": [{"name": "a", "arrival": {"type": "poisson", "rate": 40}, "timeout_s": 2},
                                 {"name": "b", "stream": False, "arrival": {"type": "poisson", "rate": 10}}]}})
    rows = list(simulate(sc).rows)
    odd = list(rows[0])
    odd[0], odd[11], odd[1] = 10**9, 'refused: "quoted", with commas,\nand a line break', "class, with comma"
    rows.append(odd)
    assert {r[10] for r in rows} >= {"ok", "rejected_rate_limited"}
    spool = RecordSpool()
    for r in rows[:150]:
        spool.append(r)
    first = list(spool)  # reading back in the middle must not disturb later appends
    for r in rows[150:]:
        spool.append(r)
    assert len(spool) == len(rows) and len(first) == 150
    back = list(spool)
    assert [r[0] for r in back] == [r[0] for r in rows] and all(isinstance(r[0], int) for r in back)
    write_csv(tmp_path / "mem.csv", rows)
    write_csv(tmp_path / "spool.csv", back)
    assert (tmp_path / "spool.csv").read_bytes() == (tmp_path / "mem.csv").read_bytes()
    spool.close()
