"""`sim sweep`: one scenario over a grid of overrides (capacity, batching, policy...), one report per
point and a table of the headline numbers of every point, overall and per class.

    sim sweep scenarios/burst_load.yaml --grid cluster.replicas=1,2,3 --grid scheduler.policy=fifo,priority_aging

A grid axis is `path=v1,v2,...` (each value read as YAML, as `--set` reads it) or `path=[v1, v2]` (a YAML
list, for values that hold commas). Points are the Cartesian product, in the order the axes are given;
each runs the scenario with the same seed, so points differ only by their overrides.
"""
from __future__ import annotations

import csv
import itertools
import re
from pathlib import Path

import yaml

from .errors import InputError
from .executors import Executor, write_files

METRICS = ("ttft", "tpot", "e2e", "queue_wait")
STATS = ("p50", "p95", "p99")


def parse_grid(scenario: Path, items: list[str]) -> list[tuple[str, list[str]]]:
    """[(path, [value text, ...]), ...]; values stay text so each point is a plain `--set path=value`."""
    axes, seen = [], set()
    for item in items:
        path, sep, values = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise InputError(str(scenario), f"--grid {item}", "expected path=v1,v2,...")
        if path in seen:
            raise InputError(str(scenario), f"--grid {item}", f"{path} is already an axis")
        seen.add(path)
        text = values.strip()
        if text.startswith("["):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InputError(str(scenario), f"--grid {path}", f"not a YAML list: {getattr(exc, 'problem', exc)}") from None
            if not isinstance(parsed, list):
                raise InputError(str(scenario), f"--grid {path}", "not a YAML list")
            vals = [yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for v in parsed]
        else:
            vals = [v.strip() for v in text.split(",")]
        if not vals or any(v == "" for v in vals):
            raise InputError(str(scenario), f"--grid {path}", "an empty value")
        if len(set(vals)) != len(vals):
            raise InputError(str(scenario), f"--grid {path}", "a value given twice")
        axes.append((path, vals))
    if not axes:
        raise InputError(str(scenario), "--grid", "give at least one axis: --grid path=v1,v2")
    return axes


def points(axes) -> list[dict]:
    return [dict(zip((p for p, _ in axes), combo)) for combo in itertools.product(*(v for _, v in axes))]


def slug(i: int, point: dict) -> str:
    text = "_".join(f"{p.split('.')[-1]}-{v}" for p, v in point.items())
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:80]


def check_points(scenario: Path, base_sets: list[str], seed, grid: list[dict]) -> None:
    """Every point's scenario must load before any runs: a bad value fails at once, naming its axis."""
    from .scenario import load_scenario
    for point in grid:
        load_scenario(scenario, base_sets + [f"{p}={v}" for p, v in point.items()], seed)


def rows_of(point: dict, summary: dict, extra: dict | None = None) -> list[dict]:
    """The table rows of one point: overall first, then each class."""
    out = []
    scopes = [("overall", summary["latency"], summary["requests"]["outcomes"], summary["requests"]["generated"])]
    for cls, d in summary["latency_by_class"].items():
        scopes.append((cls, d, summary["outcomes_by_class"].get(cls, {}), d["generated"]))
    for scope, lat, outcomes, generated in scopes:
        row = {**point, "scope": scope, "generated": generated, "ok": outcomes.get("ok", 0),
               "rejected": sum(v for k, v in outcomes.items() if k.startswith("rejected")),
               "timeout": outcomes.get("timeout", 0)}
        for m in METRICS:
            for s in STATS:
                row[f"{m}_{s}_s"] = lat.get(m, {}).get(s)
        if scope == "overall":
            row.update(requests_per_s=summary["throughput"]["requests_per_s"],
                       output_tokens_per_s=summary["throughput"]["output_tokens_per_s"],
                       goodput_per_s=summary["goodput"]["requests_per_s"],
                       slo_attainment=summary["goodput"]["slo_attainment"], **(extra or {}))
        out.append(row)
    return out


def sweep(scenario: Path, grid_items: list[str], out: Path, base_sets: list[str] | None = None, seed=None,
          jobs: int = 1, plots: bool = False, progress=None, executor: str = "process",
          address: str | None = None) -> tuple[list[str], list[dict]]:
    """Runs every point; returns (axis paths, table rows) and writes sweep.csv and sweep.md into `out`.
    The points run through `executor` (sequentially, `jobs` processes, or Ray tasks); the files are the same."""
    base_sets = list(base_sets or [])
    axes = parse_grid(scenario, grid_items)
    grid = points(axes)
    check_points(scenario, base_sets, seed, grid)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(str(scenario), base_sets + [f"{p}={v}" for p, v in point.items()], seed, plots) for point in grid]
    rows: list[dict] = []
    with Executor(executor, jobs, address) as ex:
        step = 1 if ex.kind == "process" and jobs == 1 else len(tasks)
        results = []
        for k in range(0, len(tasks), step):
            results += ex.map(tasks[k:k + step])
            if progress is not None:
                progress(len(results), len(tasks))
    from .scenario import load_scenario
    from .slo import all_met, evaluate, scenario_targets, streamed_classes
    sc = load_scenario(scenario, base_sets, seed)
    targets, streamed = scenario_targets(sc), streamed_classes(sc)
    for i, (point, (summary, files)) in enumerate(zip(grid, results)):
        write_files(out / "points" / slug(i, point), files)
        ttft = [d["ttft"].get("p95") for c, d in summary["latency_by_class"].items() if streamed.get(c, True)]
        ttft = [v for v in ttft if v is not None]
        extra = {"ttft_p95_streamed_s": max(ttft) if ttft else None,
                 "slo_feasible": all_met(evaluate(summary, targets, streamed)), "slo_ttft_s": sc.slo.ttft_s}
        for r in rows_of(point, summary, extra):
            rows.append({"point": i, "folder": f"points/{slug(i, point)}", **r})
    write_table(out, axes, rows)
    from .sweep_plots import pareto_plot
    pareto_plot(out, [p for p, _ in axes], rows)
    return [p for p, _ in axes], rows


def _cols(axes, rows):
    first = ["point", *(p for p, _ in axes), "scope"]
    rest = [c for c in rows[0] if c not in first and c != "folder"] if rows else []
    extra = [c for r in rows for c in r if c not in first and c not in rest and c != "folder"]
    return first + rest + list(dict.fromkeys(extra)) + ["folder"]


def write_table(out: Path, axes, rows: list[dict]) -> None:
    cols = _cols(axes, rows)
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    (out / "sweep.md").write_text(markdown(axes, rows))


def _ms(x) -> str:
    return "–" if x is None else f"{x * 1000:.0f}" if x >= 1 else f"{x * 1000:.1f}"


def markdown(axes, rows: list[dict]) -> str:
    names = [p for p, _ in axes]
    head = names + ["ok / generated", "rejected", "timeout", "TTFT p95 streamed", "TPOT p95", "E2E p95",
                    "wait p95", "req/s", "goodput/s", "SLO attainment", "meets SLO"]
    lines = ["# sim sweep", "", "Overall per point. Latencies in ms, only `ok` requests enter them; TTFT p95 is that "
             "of the worst streamed class (a non-streamed response's TTFT is its whole response time, so classes "
             "are not pooled). *meets SLO*: every class's p95 within the scenario's `slo` and at most 1 % shed. "
             "Per-class rows are in `sweep.csv`; each point's full report is in its folder.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(names) + "---:|" * (len(head) - len(names))]
    for r in rows:
        if r["scope"] != "overall":
            continue
        att = r["slo_attainment"]
        cells = [str(r[p]) for p in names] + [
            f"{r['ok']} / {r['generated']}", str(r["rejected"]), str(r["timeout"]), _ms(r.get("ttft_p95_streamed_s")),
            _ms(r["tpot_p95_s"]), _ms(r["e2e_p95_s"]), _ms(r["queue_wait_p95_s"]), f"{r['requests_per_s']:.2f}",
            f"{r['goodput_per_s']:.2f}", "–" if att is None else f"{att * 100:.1f} %",
            "yes" if r.get("slo_feasible") else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![throughput vs TTFT p95](pareto.png)"]
    return "\n".join(lines) + "\n"


def terminal_table(name: str, axes: list[str], rows: list[dict], console) -> None:
    """The overall row of every point, in at most 80 columns, units in the headers."""
    from rich import box
    from rich.table import Table
    t = Table(title=f"sweep of {name} (overall; TTFT: worst streamed class)", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for a in axes:
        t.add_column(a.split(".")[-1], no_wrap=True)
    for col in ("ok/gen", "TTFT\np95 ms", "TPOT\np95 ms", "E2E\np95 s", "goodput\nreq/s", "SLO\nmet"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r["scope"] == "overall":
            e2e = r["e2e_p95_s"]
            t.add_row(*(str(r[a]) for a in axes), f"{r['ok']}/{r['generated']}", _ms(r.get("ttft_p95_streamed_s")),
                      _ms(r["tpot_p95_s"]), "–" if e2e is None else f"{e2e:.2f}", f"{r['goodput_per_s']:.2f}",
                      "yes" if r.get("slo_feasible") else "no")
    console.print(t)
