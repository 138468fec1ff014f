"""`sim capacity`: the highest request rate, or the fewest replicas, at which a scenario meets every SLO.

    sim capacity scenarios/burst_load.yaml --slo ttft.p95=0.5s --slo tpot.p95=50ms --rate-scale
    sim capacity scenarios/burst_load.yaml --slo ttft.p95=0.5s --vary cluster.replicas=1..16

`--rate-scale` multiplies every class's arrival rate by a factor x (poisson/constant/gamma `rate`, onoff
`on_rate`/`off_rate`, piecewise knots; a trace's `time_scale` is divided by x) and searches x: starting at 1,
it doubles (or halves) until the SLOs flip, then bisects the bracket [met, missed] until its upper end is within
`precision` of its lower end; the answer is the lower end, a rate at which every SLO was met. `--vary
PATH=LO..HI` bisects an integer setting for the smallest value that meets every SLO. Both assume that more
load never helps and more capacity never hurts (the table shows every probe, so a violation is visible).

Each probe is one `sim run` with the same seed; every configuration of `--grid` is searched at once, `--probes`
points per configuration per round (1: bisection; N: N doublings, or an (N+1)-section of the bracket), so the
probes of a round run in parallel (`--jobs`, `--executor ray`) and the answer depends on `--probes`, never on
how many workers ran it.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .errors import InputError
from .executors import Executor, write_files
from .slo import all_met, evaluate, streamed_classes
from .sweep import parse_grid, points, slug

MAX_STEPS = 12  # doublings or halvings while bracketing: x in [1/4096, 4096]


def rate_sets(sc, x: float) -> list[str]:
    """--set overrides that scale every class's arrival rate by x."""
    out = []
    for i, c in enumerate(sc.workload.classes):
        a, p = c.arrival, f"workload.classes[{i}].arrival"
        if a.type in ("poisson", "constant", "gamma"):
            out.append(f"{p}.rate={a.rate * x!r}")
        elif a.type == "onoff":
            out += [f"{p}.on_rate={a.on_rate * x!r}", f"{p}.off_rate={a.off_rate * x!r}"]
        elif a.type == "piecewise":
            out.append(f"{p}.points={json.dumps([[t, r * x] for t, r in a.points])}")
        elif a.type == "trace":
            out.append(f"{p}.time_scale={a.time_scale / x!r}")
        else:
            raise InputError(getattr(sc, "_source", sc.name), f"workload.classes[{i}].arrival",
                             f"a {a.type} class has no rate to scale; use --vary {p}.users=LO..HI")
    return out


def base_rate(sc) -> float:
    """The scenario's offered open-loop request rate (requests/s): its generated requests over its span."""
    from .workload import build_stream
    stream, _ = build_stream(sc)
    n = len(stream)
    span = sc.duration_s if sc.duration_s else (float(stream.t.max()) if n else 0.0) or 1.0
    return n / span


def parse_vary(text: str, where: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\[\]]+)\s*=\s*(\d+)\s*\.\.\s*(\d+)\s*", text or "")
    if not m:
        raise InputError(where, f"--vary {text}", "expected path=LO..HI with integers, e.g. cluster.replicas=1..16")
    lo, hi = int(m.group(2)), int(m.group(3))
    if lo > hi:
        raise InputError(where, f"--vary {text}", f"LO {lo} is above HI {hi}")
    return m.group(1), lo, hi


def _split(xs: list, mets: list[bool]):
    """(largest x met below the first miss, first x missed) of increasing xs; None where there is none."""
    k = next((i for i, m in enumerate(mets) if not m), len(xs))
    return (xs[k - 1] if k else None), (xs[k] if k < len(xs) else None)


def rate_search(precision: float, probes: int = 1, start: float = 1.0):
    """A generator: yields the next xs to try (increasing), is sent whether each met every SLO, returns
    (answer, bracket). With probes=1 it doubles or halves from `start` until the SLOs flip, then bisects; with
    probes=N each round tries N points at once (N doublings, or the N inner points of an (N+1)-section), so a
    round's probes run in parallel. The answer depends on N, never on how many workers ran the probes.
    answer None: missed even at the smallest x tried."""
    (met,) = yield [start]
    lo, hi = (start, None) if met else (None, start)
    steps = 0
    while (lo is None or hi is None) and steps < MAX_STEPS:
        n = min(probes, MAX_STEPS - steps)
        steps += n
        if hi is None:  # every x so far met: go up
            xs = [lo * 2 ** j for j in range(1, n + 1)]
            below, above = _split(xs, (yield xs))
            lo, hi = below or lo, above
        else:  # every x so far missed: go down
            xs = [hi / 2 ** j for j in range(n, 0, -1)]
            below, above = _split(xs, (yield xs))
            lo, hi = below, above or hi
    if lo is None or hi is None:
        return lo, (lo, hi)  # no upper bound found within MAX_STEPS doublings, or none met
    while hi > lo * (1 + precision):
        xs = [lo + (hi - lo) * i / (probes + 1) for i in range(1, probes + 1)]
        below, above = _split(xs, (yield xs))
        lo, hi = below or lo, above or hi
    return lo, (lo, hi)


def int_search(lo: int, hi: int, probes: int = 1):
    """Smallest v in [lo, hi] that meets every SLO (None if even hi misses); hi is tried first, then the
    bracket (bad, good] is cut at `probes` inner points per round (bisection with 1)."""
    (met,) = yield [hi]
    if not met:
        return None, (hi, None)
    good, bad = hi, lo - 1
    while good - bad > 1:
        xs = sorted({bad + max(1, round((good - bad) * i / (probes + 1))) for i in range(1, probes + 1)} - {good})
        mets = yield xs
        first = next((i for i, m in enumerate(mets) if m), None)  # more capacity never hurts: F..F T..T
        if first is None:
            bad = xs[-1]
        else:
            good, bad = xs[first], (xs[first - 1] if first else bad)
    return good, (bad if bad >= lo else None, good)


class Config:
    """One configuration of the grid and the state of its search."""

    def __init__(self, index: int, point: dict, gen):
        self.index, self.point, self.gen = index, point, gen
        self.probes: list[dict] = []
        self.answer, self.bracket, self.done, self.rounds = None, None, False, 0
        self.next_xs = next(gen)

    def feed(self, mets: list[bool]) -> None:
        self.rounds += 1
        try:
            self.next_xs = self.gen.send(mets)
        except StopIteration as stop:
            self.answer, self.bracket = stop.value
            self.done = True


def capacity(scenario: Path, targets, out: Path, grid_items: list[str] | None = None, base_sets=None, seed=None,
             vary: str | None = None, precision: float = 0.02, jobs: int = 1, executor: str = "process",
             address: str | None = None, progress=None, probes: int = 1) -> tuple[dict, list]:
    """Runs the searches, returns (result, configurations with their probes) and writes capacity.csv, capacity.md, capacity.json and capacity.png into `out`."""
    from .scenario import load_scenario
    base_sets = list(base_sets or [])
    where = str(scenario)
    axes = parse_grid(scenario, grid_items) if grid_items else []
    grid = points(axes) if axes else [{}]
    base = load_scenario(scenario, base_sets, seed)
    streamed = streamed_classes(base)
    mode = "vary" if vary else "rate"
    if mode == "vary":
        path, lo, hi = parse_vary(vary, where)
        if path in {p for p, _ in axes}:
            raise InputError(where, f"--vary {vary}", f"{path} is also a --grid axis")
    configs = []
    for i, point in enumerate(grid):
        sets = base_sets + [f"{p}={v}" for p, v in point.items()]
        sc = load_scenario(scenario, sets, seed)  # a bad grid value fails here, before anything runs
        if mode == "rate":
            rate_sets(sc, 1.0)
            c = Config(i, point, rate_search(precision, probes))
            c.rate = base_rate(sc)
        else:
            load_scenario(scenario, sets + [f"{path}={hi}"], seed)
            c = Config(i, point, int_search(lo, hi, probes))
            c.rate = base_rate(sc)
        c.sets, c.sc = sets, sc
        configs.append(c)
    out.mkdir(parents=True, exist_ok=True)
    k = 0
    with Executor(executor, jobs, address) as ex:
        while not all(c.done for c in configs):
            active = [c for c in configs if not c.done]
            tasks, owners = [], []
            for c in active:
                for x in c.next_xs:
                    extra = rate_sets(c.sc, x) if mode == "rate" else [f"{path}={x}"]
                    tasks.append((str(scenario), c.sets + extra, seed, False))
                    owners.append((c, x))
            mets = {}
            for (c, x), (summary, files) in zip(owners, ex.map(tasks)):
                res = evaluate(summary, targets, streamed)
                folder = f"points/{slug(k, {**c.point, ('rate_x' if mode == 'rate' else path): x})}"
                write_files(out / folder, files)
                c.probes.append(probe_row(c, x, mode, summary, res, folder))
                k += 1
                mets.setdefault(id(c), []).append(all_met(res))
            for c in active:
                c.feed(mets[id(c)])
            if progress is not None:
                progress(k, sum(c.done for c in configs), len(configs))
    result = {"scenario": base.name, "mode": mode, "precision": precision if mode == "rate" else None, "probes": probes,
              "vary": path if mode == "vary" else None, "targets": [t.text() for t in targets],
              "axes": [p for p, _ in axes], "configs": [config_result(c, mode) for c in configs]}
    write_outputs(out, result, configs, targets, mode)
    return result, configs


def probe_row(c: Config, x, mode: str, summary: dict, res: dict, folder: str) -> dict:
    row = {**c.point}
    if mode == "rate":
        row.update(rate_x=x, offered_per_s=round(c.rate * x, 6))
    else:
        row.update(value=x, offered_per_s=round(c.rate, 6))
    row.update(met=all_met(res), ok=summary["requests"]["ok"], generated=summary["requests"]["generated"],
               throughput_per_s=summary["throughput"]["requests_per_s"], goodput_per_s=summary["goodput"]["requests_per_s"],
               slo_attainment=summary["goodput"]["slo_attainment"])
    for name, r in res.items():
        row[f"{name}"] = r["value"]
        row[f"{name}:class"] = r["class"]
    row["folder"] = folder
    return row


def config_result(c: Config, mode: str) -> dict:
    d = {"point": c.point, "probes": len(c.probes), "rounds": c.rounds, "bracket": list(c.bracket)}
    if mode == "rate":
        d.update(rate_x=c.answer, offered_per_s=None if c.answer is None else round(c.rate * c.answer, 6),
                 base_offered_per_s=round(c.rate, 6))
    else:
        d.update(value=c.answer, offered_per_s=round(c.rate, 6))
    return d


def sentence(result: dict, i: int) -> str:
    """The answer for one configuration in one sentence."""
    c = result["configs"][i]
    who = result["scenario"] + (" with " + ", ".join(f"{p}={v}" for p, v in c["point"].items()) if c["point"] else "")
    slos = ", ".join(result["targets"])
    if result["mode"] == "rate":
        if c["rate_x"] is None:
            return f"{who} misses {slos} even at {c['bracket'][1]:g}× its traffic."
        if c["bracket"][1] is None:
            return (f"{who} meets {slos} up to at least {c['offered_per_s']:.3g} req/s ({c['rate_x']:g}× its "
                    f"traffic); no rate tried missed them.")
        return (f"{who} meets {slos} up to {c['offered_per_s']:.3g} req/s offered ({c['rate_x']:.3g}× its "
                f"{c['base_offered_per_s']:.3g} req/s, within {result['precision'] * 100:g} %).")
    if c["value"] is None:
        return f"{who} misses {slos} at {c['offered_per_s']:.3g} req/s even with {result['vary']}={c['bracket'][0]}."
    return f"{who} needs {result['vary']}={c['value']} to meet {slos} at {c['offered_per_s']:.3g} req/s."


def write_outputs(out: Path, result: dict, configs, targets, mode: str) -> None:
    rows = [r for c in configs for r in sorted(c.probes, key=lambda r: r["rate_x" if mode == "rate" else "value"])]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "capacity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    (out / "capacity.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "capacity.md").write_text(markdown(result, configs, targets, mode))
    from .sweep_plots import capacity_plot
    capacity_plot(out / "capacity.png", result, configs, targets, mode)


def _cell(t, v) -> str:
    if v is None:
        return "–"
    return f"{v * 100:.1f} %" if t.metric == "shed" else f"{v * 1000:.0f}"


def markdown(result: dict, configs, targets, mode: str) -> str:
    L = [f"# sim capacity: {result['scenario']}", ""]
    L += [sentence(result, i) for i in range(len(configs))]
    key = "rate ×" if mode == "rate" else result["vary"]
    L += ["", f"SLOs: {', '.join(result['targets'])} (TTFT and TPOT for streamed classes; the worst class is shown). "
          "Every probe, in order of the searched value; latencies in ms.", ""]
    head = [*result["axes"], key, "offered req/s", "met", *(t.name for t in targets), "ok / generated", "goodput req/s"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(result["axes"]) + "---:|" * 3 + "---:|" * len(targets) + "---:|---:|"]
    for c in configs:
        for r in sorted(c.probes, key=lambda r: r["rate_x" if mode == "rate" else "value"]):
            x = r["rate_x" if mode == "rate" else "value"]
            L.append("| " + " | ".join([*(str(r[a]) for a in result["axes"]), f"{x:.4g}", f"{r['offered_per_s']:.3g}",
                                        "yes" if r["met"] else "**no**", *(_cell(t, r[t.name]) for t in targets),
                                        f"{r['ok']} / {r['generated']}", f"{r['goodput_per_s']:.3g}"]) + " |")
    L += ["", "![capacity](capacity.png)", "", "Each probe's report folder is under `points/`."]
    return "\n".join(L) + "\n"


def terminal(result: dict, configs, targets, mode: str, console) -> None:
    from rich import box
    from rich.table import Table
    t = Table(title=f"capacity of {result['scenario']} (SLO values at the answer)", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for a in result["axes"]:
        t.add_column(a.split(".")[-1], overflow="fold")
    t.add_column("answer req/s" if mode == "rate" else f"fewest {result['vary'].split('.')[-1]}", justify="right")
    if mode == "rate":
        t.add_column("× traffic", justify="right")
    t.add_column("probes", justify="right")
    for tg in targets[:3]:
        t.add_column(tg.name + (" %" if tg.metric == "shed" else " ms"), justify="right", overflow="fold")
    for c, d in zip(configs, result["configs"]):
        ans_x = d["rate_x"] if mode == "rate" else d["value"]
        best = next((r for r in c.probes if r["rate_x" if mode == "rate" else "value"] == ans_x), None)
        cells = [str(v) for v in c.point.values()]
        if mode == "rate":
            cells += ["–" if ans_x is None else f"{d['offered_per_s']:.3g}", "–" if ans_x is None else f"{ans_x:.3g}"]
        else:
            cells += ["–" if ans_x is None else str(ans_x)]
        cells.append(str(d["probes"]))
        cells += [("–" if best is None else _cell(tg, best[tg.name]).replace(" %", "")) for tg in targets[:3]]
        t.add_row(*cells)
    console.print(t)
