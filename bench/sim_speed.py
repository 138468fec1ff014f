"""How fast the simulator runs: simulated requests per wall-second, engine steps per second, simulated
seconds per wall-second and peak memory, at low, moderate and saturating load, for 1 and 8 replicas of
the `continuous` engine (default profile) on Azure-conversation lengths (prompt and output tokens drawn
from the first 2,000 requests of the Azure LLM 2023 conversation trace in tests/data/traces).

Each case runs in a fresh Python process so its peak RSS is its own. Wall time covers building the world
(drawing the request stream; its share is printed as `build s`) and simulating it; --report adds writing requests.csv and summary.json (no plots).

    python bench/sim_speed.py                 # 200,000 requests per case
    python bench/sim_speed.py --quick         # 20,000 requests per case
    python bench/sim_speed.py --requests 1000000 --replicas 8 --load moderate
    python bench/sim_speed.py --no-fast-forward --quick   # the same, one SimPy event per engine step
    python bench/sim_speed.py --spine --quick   # every request refused by the gateway's rate limit: what the
                                                # path without any engine work costs (arrival, gateway, record)

Loads are per replica: low 2 req/s, moderate 6 req/s (the replica runs ~40 sequences at once), saturating
14 req/s (more than a replica serves: the gateway's queue cap of 256 per replica refuses the excess).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "tests" / "data" / "traces" / "azure_conv_head2000.csv"
LOADS = {"low": 2.0, "moderate": 6.0, "saturating": 14.0}


def scenario(load: str, replicas: int, requests: int, fast_forward: bool, spine: bool = False) -> dict:
    rate = LOADS[load] * replicas
    gateway = {"max_queue": 256 * replicas}
    if spine:
        gateway["rate_limit"] = {"rate": 1e-3, "burst": 1}  # one request admitted, the rest answered 429
    return {
        "name": f"bench_{load}_{replicas}", "seed": 1, "num_requests": requests,
        "workload": {"classes": [{
            "name": "conv", "arrival": {"type": "poisson", "rate": rate},
            "prompt_tokens": {"type": "empirical", "path": str(LENGTHS), "column": "ContextTokens"},
            "output_tokens": {"type": "empirical", "path": str(LENGTHS), "column": "GeneratedTokens"},
            "timeout_s": 600}]},
        "gateway": gateway,
        "engine": {"type": "continuous", "profile": "default", "max_num_seqs": 256,
                   "max_num_batched_tokens": 8192, "fast_forward": fast_forward},
        "cluster": {"replicas": replicas, "router": "least_outstanding"},
    }


def one(spec: dict, report: str | None) -> dict:
    """Runs in the child process."""
    import pandas  # noqa: F401  (a one-off import the length reader needs; not simulation work)
    from simulator.scenario import scenario_from_dict
    from simulator.world import World
    sc = scenario_from_dict(spec)
    t0 = time.perf_counter()
    world = World(sc)
    t1 = time.perf_counter()
    res = world.run()
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "build_s": t1 - t0}
    if report:
        from simulator.metrics import summarize
        from simulator.report import write_report
        from simulator.run import engine_summary
        t1 = time.perf_counter()
        write_report(Path(report), sc, res.rows,
                     lambda df: summarize(df, sc, res.itl, res.series, "sim", {"engine": engine_summary(res)}), plots=False)
        out["report_s"] = time.perf_counter() - t1
    outcomes: dict = {}
    for row in res.rows:
        outcomes[row[10]] = outcomes.get(row[10], 0) + 1
    steps = sum(s["steps"] for s in res.engine_stats)
    busy = sum(s["busy_s"] for s in res.engine_stats)
    seqs = sum(k * v for s in res.engine_stats for k, v in s["batch_sizes"].items())
    out.update(requests=len(res.rows), ok=outcomes.get("ok", 0), outcomes=outcomes, steps=steps,
               sim_s=res.sim_time, mean_batch=seqs / max(steps, 1),
               busy_share=busy / max(res.sim_time * len(res.engine_stats), 1e-9),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000, help="requests per case")
    ap.add_argument("--quick", action="store_true", help="20,000 requests per case")
    ap.add_argument("--load", choices=sorted(LOADS), action="append", help="only these loads (repeatable)")
    ap.add_argument("--replicas", type=int, action="append", help="only these replica counts (default 1 and 8)")
    ap.add_argument("--no-fast-forward", action="store_true", help="one SimPy timeout per engine step")
    ap.add_argument("--spine", action="store_true", help="the gateway refuses every request (no engine work)")
    ap.add_argument("--report", action="store_true", help="also write requests.csv + summary.json (timed apart)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec, report = json.loads(a.child)
        print(json.dumps(one(spec, report)))
        return
    n = 20_000 if a.quick else a.requests
    loads = a.load or list(LOADS)
    reps = a.replicas or [1, 8]
    print(f"continuous engine, default profile, Azure-conversation lengths, {n:,} requests per case, "
          f"fast-forward {'off' if a.no_fast_forward else 'on'}")
    head = (f"{'replicas':>8} {'load':>10} {'req/s in':>8} {'wall s':>7} {'sim req/s':>10} {'steps/s':>10} "
            f"{'sim s/wall s':>12} {'mean batch':>10} {'ok %':>5} {'build s':>7} {'peak MB':>8}")
    if a.report:
        head += f" {'report s':>8}"
    print(head)
    for r in reps:
        for load in loads:
            spec = scenario(load, r, n, not a.no_fast_forward, a.spine)
            report = f"/tmp/sim_speed_{load}_{r}" if a.report else None
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([spec, report])],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(proc.returncode)
            o = json.loads(proc.stdout.strip().splitlines()[-1])
            w = o["wall_s"]
            line = (f"{r:>8} {load:>10} {LOADS[load] * r:>8.0f} {w:>7.2f} {o['requests'] / w:>10,.0f} "
                    f"{o['steps'] / w:>10,.0f} {o['sim_s'] / w:>12,.0f} {o['mean_batch']:>10.1f} "
                    f"{100 * o['ok'] / o['requests']:>5.1f} {o['build_s']:>7.2f} {o['peak_rss_mb']:>8.0f}")
            if a.report:
                line += f" {o['report_s']:>8.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
