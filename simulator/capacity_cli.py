"""Registers `sim capacity` on the `sim` app (the search itself is simulator/capacity.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .cli import app, check_out_dir, console, default_out, friendly
from .errors import InputError


@app.command("capacity")
@friendly
def capacity_cmd(
        scenario: Path = typer.Argument(..., help="scenario YAML"),
        slo: Optional[List[str]] = typer.Option(None, "--slo", help="a target [CLASS:]METRIC.STAT=LIMIT, e.g. "
                                                "ttft.p95=0.5s, tpot.p95=50ms, e2e.p99=20s, shed=1% (repeatable)"),
        rate_scale: bool = typer.Option(False, "--rate-scale", help="search the highest factor on every class's "
                                        "arrival rate that meets every SLO (the default)"),
        vary: Optional[str] = typer.Option(None, "--vary", help="search the smallest integer PATH=LO..HI that meets "
                                           "every SLO, e.g. cluster.replicas=1..16"),
        grid: Optional[List[str]] = typer.Option(None, "--grid", "-g", help="configurations: path=v1,v2,... as in "
                                                 "sim sweep; each is searched"),
        precision: float = typer.Option(0.02, "--precision", help="rate search: stop when the bracket's upper end "
                                        "is within this share of its lower end (0.02 = 2 %)"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default reports/capacity_<name>)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed (all probes)"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field at every probe: path=value"),
        probes: int = typer.Option(1, "--probes", min=1, max=64, help="points tried per search round (1: bisection; "
                                   "N: N at once, an (N+1)-section; set it to the workers at hand)"),
        jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="probes simulated at once"),
        executor: str = typer.Option("process", "--executor", help="process or ray (each probe a Ray task)"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join"),
        quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Find the highest sustainable request rate (--rate-scale) or the fewest replicas (--vary) that meet every SLO."""
    from .capacity import capacity, sentence, terminal
    from .scenario import load_scenario
    from .slo import parse_targets, with_default_shed
    sc = load_scenario(scenario, set_, seed)
    if rate_scale and vary:
        raise InputError(str(scenario), "--vary", "give --rate-scale or --vary, not both")
    if not 0 < precision < 1:
        raise InputError(str(scenario), "--precision", f"must be between 0 and 1 (0.02 = 2 %), got {precision:g}")
    if not slo:
        raise InputError(str(scenario), "--slo", "give at least one target, e.g. --slo ttft.p95=0.5s")
    targets = with_default_shed(parse_targets(slo, "--slo", [c.name for c in sc.workload.classes]))
    out = out or default_out(f"capacity_{sc.name}")
    check_out_dir(out)

    def progress(k, done, n):
        if not quiet:
            console.print(f"{k} probes run, {done}/{n} configurations answered")
    result, configs = capacity(scenario, targets, out, grid, set_, seed, vary, precision, jobs, executor, address,
                               progress, probes)
    if not quiet:
        terminal(result, configs, targets, result["mode"], Console(width=80))
    for i in range(len(result["configs"])):
        print(sentence(result, i))
    print(f"capacity: {out}/capacity.md")
