"""`stress probe`: the calibration experiment a user runs against their own server in minutes, through
`stress run` itself (same client, same run folders), then `sim calibrate` reads the folders.

    DIR/probe_prefill/            concurrency 1, prompts 32..7680 tokens x 3, 4 output tokens
    DIR/probe_decode_c{N}_p{P}/   N closed-loop users, prompt P, 128 output tokens, a few seconds each
    DIR/probe_poisson_r{R}/       Poisson at R req/s, mixed lengths
    DIR/heldout/heldout_poisson_r{R}/   (--heldout-rates) traffic calibration never sees, for `sim replay`

    DIR/run_order.txt             the folders in the order they ran (each run inherits the server's state
                                  from the one before: sim replay and sim calibrate read it)
The probes and their scenarios are in scenarios/probe_*.yaml; every folder is an ordinary stress run.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from simulator.scenario import load_scenario

from .run import run_stress
from .runner import Options
from simulator.slotstate import RUN_ORDER

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def plan(users, contexts, rates, heldout_rates, prompt_max: int | None = None) -> list[tuple[str, str, list]]:
    """(scenario file, folder, --set overrides) of every run, in order."""
    runs = []
    pre = []
    if prompt_max:
        vals = [v for v in (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 7680) if v <= prompt_max]
        pre = [f"workload.classes[0].prompt_tokens.values={vals}"]
    runs.append(("probe_prefill.yaml", "probe_prefill", pre))
    for p in contexts:
        for n in users:
            runs.append(("probe_decode.yaml", f"probe_decode_c{n}_p{p}",
                         [f"workload.classes[0].arrival.users={n}", f"workload.classes[0].prompt_tokens.value={p}"]))
    for r in rates:
        runs.append(("probe_poisson.yaml", f"probe_poisson_r{r:g}", [f"workload.classes[0].arrival.rate={r}"]))
    for r in heldout_rates:
        runs.append(("heldout_poisson.yaml", f"heldout/heldout_poisson_r{r:g}", [f"workload.classes[0].arrival.rate={r}"]))
    return runs


def run_probe(opts: Options, out: Path, users, contexts, rates, heldout_rates, extra_sets=(), prompt_max=None,
              only=None, log=print) -> list[Path]:
    done = []
    runs = plan(users, contexts, rates, heldout_rates, prompt_max)
    scs = []
    for file, folder, sets in runs:  # every run's scenario is checked before the first request is sent
        if only and not any(folder.startswith(o) for o in only):
            continue
        scs.append((load_scenario(SCENARIOS / file, list(sets) + list(extra_sets)), folder))
    for i, (sc, folder) in enumerate(scs, 1):
        dest = Path(out) / folder
        log(f"[{i}/{len(scs)}] {folder}", file=sys.stderr)
        s = run_stress(sc, dataclasses.replace(opts), dest, plots=False, log=log)
        oc = s["requests"]["outcomes"]
        log(f"    {oc}", file=sys.stderr)
        done.append(dest)
        # the order the runs met the server in, appended as each ends: a run inherits the server's state from
        # the one before (llama-server's slots; simulator/slotstate.py), which sim replay and calibrate read
        with open(Path(out) / RUN_ORDER, "a") as f:
            f.write(folder + "\n")
    return done
