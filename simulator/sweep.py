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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from .errors import InputError

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


def _run_point(args) -> dict:
    """One point in a worker process: load with the overrides, simulate, write its report folder."""
    scenario, sets, seed, out, plots = args
    from .run import run_scenario
    from .scenario import load_scenario
    sc = load_scenario(scenario, sets, seed)
    summary, _ = run_scenario(sc, out, plots=plots)
    return summary


def check_points(scenario: Path, base_sets: list[str], seed, grid: list[dict]) -> None:
    """Every point's scenario must load before any runs: a bad value fails at once, naming its axis."""
    from .scenario import load_scenario
    for point in grid:
        load_scenario(scenario, base_sets + [f"{p}={v}" for p, v in point.items()], seed)


def rows_of(point: dict, summary: dict) -> list[dict]:
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
                       slo_attainment=summary["goodput"]["slo_attainment"])
        out.append(row)
    return out


def sweep(scenario: Path, grid_items: list[str], out: Path, base_sets: list[str] | None = None, seed=None,
          jobs: int = 1, plots: bool = False, progress=None) -> tuple[list[str], list[dict]]:
    """Runs every point; returns (axis paths, table rows) and writes sweep.csv and sweep.md into `out`."""
    base_sets = list(base_sets or [])
    axes = parse_grid(scenario, grid_items)
    grid = points(axes)
    check_points(scenario, base_sets, seed, grid)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(scenario, base_sets + [f"{p}={v}" for p, v in point.items()], seed, out / "points" / slug(i, point), plots)
             for i, point in enumerate(grid)]
    rows: list[dict] = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            summaries = list(pool.map(_run_point, tasks))
    else:
        summaries = []
        for k, t in enumerate(tasks):
            summaries.append(_run_point(t))
            if progress is not None:
                progress(k + 1, len(tasks))
    for i, (point, summary) in enumerate(zip(grid, summaries)):
        for r in rows_of(point, summary):
            rows.append({"point": i, "folder": f"points/{slug(i, point)}", **r})
    write_table(out, axes, rows)
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
    return "–" if x is None else f"{x * 1000:.1f}"


def markdown(axes, rows: list[dict]) -> str:
    names = [p for p, _ in axes]
    head = names + ["ok / generated", "rejected", "timeout", "TTFT p50", "TTFT p95", "TTFT p99", "TPOT p95",
                    "E2E p95", "wait p95", "goodput/s", "SLO attainment"]
    lines = ["# sim sweep", "", "Overall per point (latencies in ms; only `ok` requests enter them). Per-class rows "
             "are in `sweep.csv`; each point's full report is in its folder.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(names) + "---:|" * (len(head) - len(names))]
    for r in rows:
        if r["scope"] != "overall":
            continue
        cells = [str(r[p]) for p in names] + [
            f"{r['ok']} / {r['generated']}", str(r["rejected"]), str(r["timeout"]), _ms(r["ttft_p50_s"]),
            _ms(r["ttft_p95_s"]), _ms(r["ttft_p99_s"]), _ms(r["tpot_p95_s"]), _ms(r["e2e_p95_s"]),
            _ms(r["queue_wait_p95_s"]), str(r["goodput_per_s"]), str(r["slo_attainment"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
