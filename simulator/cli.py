"""The `sim` command. Bad input exits 2 with one line naming file, field and reason."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="servesim: predict LLM-serving latency, goodput and rejections.")
console = Console(stderr=True)


def friendly(fn):
    """One-line errors, never a traceback, for bad input."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as exc:
            print(exc.line(), file=sys.stderr)
            raise typer.Exit(2)
    return wrapper


def default_out(name: str) -> Path:
    """reports/<name>; the scenario schema refuses names with separators or '..', and this checks again."""
    out = Path("reports") / name
    if out.parent != Path("reports") or name in ("", ".", ".."):
        raise InputError(name, "name", "not a plain name: the default report folder would be outside reports/")
    return out


def check_out_dir(out: Path) -> None:
    """Refuse an unusable report folder before simulating, without creating anything yet."""
    if out.exists() and not out.is_dir():
        raise InputError(str(out), "--out", "exists and is not a folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(str(out), "--out", f"{parent} is not a folder")


@app.command()
@friendly
def run(scenario: Path = typer.Argument(..., help="scenario YAML"),
        out: Optional[Path] = typer.Option(None, "--out", help="report folder (default reports/<name>)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field: path=value (YAML value)"),
        no_plots: bool = typer.Option(False, "--no-plots", help="skip PNG plots"),
        fmt: str = typer.Option("csv", "--format", help="requests file: csv (requests.csv) or parquet (requests.parquet)"),
        quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Simulate SCENARIO and write requests.csv (or .parquet), summary.json, report.md and plots."""
    from .report import terminal_table
    from .run import run_scenario
    from .scenario import load_scenario
    sc = load_scenario(scenario, set_, seed)
    if fmt not in ("csv", "parquet"):
        raise InputError(str(scenario), "--format", f"expected csv or parquet, got {fmt!r}")
    out = out or default_out(sc.name)
    check_out_dir(out)
    progress_cb, bar = None, None
    if not quiet and sc.duration_s:
        from rich.progress import Progress
        bar = Progress(console=console, transient=True)
        task = bar.add_task(f"simulating {sc.name}", total=sc.duration_s)
        bar.start()

        def progress_cb(t, n):
            bar.update(task, completed=min(t, sc.duration_s), description=f"simulating {sc.name}: {n} done")
    try:
        summary, _ = run_scenario(sc, out, plots=not no_plots, progress=progress_cb, fmt=fmt)
    finally:
        if bar is not None:
            bar.stop()
    if not quiet:
        terminal_table(summary, Console())
    print(f"report: {out}/report.md")


@app.command()
@friendly
def validate(scenario: Path = typer.Argument(...),
             set_: Optional[List[str]] = typer.Option(None, "--set")):
    """Check a scenario without running it."""
    from .scenario import load_scenario
    from .world import World
    sc = load_scenario(scenario, set_)  # schema, limits, data files and profiles: the checks `sim run` makes
    world = World(sc)  # the request stream, engines and model pool, built as `sim run` builds them (not run)
    stream, closed = world.stream, world.closed
    print(f"ok: {scenario}: {sc.name}, {len(sc.workload.classes)} class(es), {len(stream)} open-loop requests"
          + (f", {len(closed)} closed-loop class(es)" if closed else ""))


@app.command()
@friendly
def profiles():
    """List the cost-model profiles and their fit error against their source data."""
    from rich.table import Table
    from .costmodel import list_profiles, load_profile
    try:
        from .profile_sources import fit_report
        fits = {r["profile"]: r for r in fit_report()}
    except ImportError:
        fits = {}
    from rich import box
    t = Table(title="cost-model profiles (fit error vs their source data)", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
              pad_edge=False)
    t.add_column("profile", no_wrap=True)  # the whole name: it is what engine.profile takes
    t.add_column("gpu", no_wrap=True)
    for col in ("points", "MAPE %", "max %"):
        t.add_column(col, justify="right", no_wrap=True)
    for name in list_profiles():
        m = load_profile(name).meta
        f = fits.get(name, {})
        t.add_row(name, str((m.get("gpu") or {}).get("name", "")), 
                  str(f.get("points", "")), f"{f['mape_pct']:.1f}" if "mape_pct" in f else "",
                  f"{f['max_abs_pct']:.1f}" if "max_abs_pct" in f else "")
    Console().print(t)


@app.command()
@friendly
def sweep(scenario: Path = typer.Argument(..., help="scenario YAML"),
          grid: Optional[List[str]] = typer.Option(
              None, "--grid", "-g", help="an axis: path=v1,v2,... or path=[v1, v2] (YAML values); repeatable, "
                                         "points are the Cartesian product"),
          out: Optional[Path] = typer.Option(None, "--out", help="output folder (default reports/sweep_<name>)"),
          seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed (all points)"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field at every point: path=value"),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="points simulated at once (processes)"),
          plots: bool = typer.Option(False, "--plots", help="also draw each point's PNG plots"),
          executor: str = typer.Option("process", "--executor", help="process (local, --jobs at once) or ray "
                                                                       "(each point a Ray task)"),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: start a "
                                                                          "local one with --jobs CPUs)"),
          quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Run SCENARIO at every point of a grid of overrides; write sweep.csv, sweep.md, pareto.png and one report per point."""
    from .scenario import load_scenario
    from .sweep import sweep as run_sweep, terminal_table as sweep_table
    sc = load_scenario(scenario, set_, seed)
    out = out or default_out(f"sweep_{sc.name}")
    check_out_dir(out)

    def progress(k, n):
        if not quiet:
            console.print(f"point {k}/{n} done")
    axes, rows = run_sweep(scenario, grid or [], out, set_, seed, jobs, plots, progress, executor, address)
    if not quiet:
        sweep_table(sc.name, axes, rows, Console())
    print(f"sweep: {out}/sweep.md")


def _register_optional():
    """Commands whose modules land separately (compare, serve, calibrate, capacity, replay, import)."""
    for mod in ("compare_cli", "serve_cli", "calibrate_cli", "capacity_cli", "replay_cli", "import_cli"):
        try:
            __import__(f"simulator.{mod}")
        except ImportError as exc:
            if exc.name != f"simulator.{mod}":
                raise


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    from simulator.cli import app as _app  # under -m this file is __main__; the optional commands joined simulator.cli's app
    _app()
