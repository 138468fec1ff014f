"""Registers `sim replay` on the `sim` app (imported by simulator.cli)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .cli import app, check_out_dir, friendly
from .errors import InputError


@app.command()
@friendly
def replay(run_dir: Path = typer.Argument(..., help="a run folder written by stress run (requests.csv, scenario.yaml, ...), or a vLLM bench serve --save-detailed JSON file"),
           profile: Optional[str] = typer.Option(None, "--profile", "-p",
                                                 help="cost profile name or YAML path (default: the run scenario's)"),
           engine: Optional[str] = typer.Option(None, "--engine", help="engine type, e.g. continuous or llamacpp "
                                                "(default: the measured server's: vllm -> continuous, llamacpp -> llamacpp, "
                                                "else the run scenario's)"),
           set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field of the run's scenario: path=value"),
           after: Optional[Path] = typer.Option(None, "--after", help="the run measured just before on the same "
                                                "server (llama-server: the slots it left, which the run inherits)"),
           out: Optional[Path] = typer.Option(None, "--out", help="report folder (default reports/<run>-replay)"),
           no_plots: bool = typer.Option(False, "--no-plots", help="skip PNG plots"),
           quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Simulate a measured run's exact request stream; write a report folder and fidelity.md/.json/.png."""
    from .fidelity import fidelity
    from .replay import replay as run_replay
    from .runfolder import load_run_folder
    run = load_run_folder(run_dir)
    out = out or Path("reports") / f"{run.name}-replay"
    check_out_dir(out)
    if out.resolve() == run.path.resolve():
        raise InputError(str(out), "--out", "is the run folder itself (its measured files would be overwritten)")
    prev = load_run_folder(after) if after is not None else None
    _, plan = run_replay(run, out, engine, profile, set_, plots=not no_plots, after=prev)
    report = fidelity(run, out, out, plots=not no_plots, info=plan.info)
    if not quiet:
        _terminal(report, Console())
    print(f"report: {out}/report.md")
    print(f"fidelity: {out}/fidelity.md")


def _terminal(report: dict, console) -> None:
    from rich.table import Table
    d = report["table"]["overall"]
    cm, cs = d["counts"]["measured"], d["counts"]["sim"]
    t = Table(title=f"replay of {report['measured']} (overall; ms): ok {cm['ok']} -> {cs['ok']}, "
                    f"errors {cm['errors']} -> {cs['errors']}", title_justify="left")
    for col in ("metric", "measured", "sim", "error"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for k, v in d["metrics"].items():
        f = (lambda x: "–" if x is None else f"{x:.3f}") if k.startswith("throughput") else \
            (lambda x: "–" if x is None else f"{x * 1000:.2f}")
        t.add_row(k, f(v["measured"]), f(v["sim"]), "–" if v["error_pct"] is None else f"{v['error_pct']:+.1f} %")
    console.print(t)
