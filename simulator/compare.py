"""`sim compare`: two report folders side by side, with tolerances for CI gates.

A report folder is what `sim run`, `stress run` and the twin server write (requests.csv +
summary.json, one schema). Latency percentiles, ITL and overall throughput are read from
summary.json so the comparison shows exactly the numbers each report states; per-class
throughput and the CDF curves come from requests.csv over the same measured window.

Tolerance specs (`--tolerance`, repeatable):

    [SCOPE:]METRIC[.STAT]=[+|-]VALUE

    SCOPE   overall | a class name; omitted = overall and every class
    METRIC  all | ttft | tpot | itl | e2e | queue_wait | throughput | outcomes
    STAT    p50 | p95 | p99 (latencies); requests_per_s | output_tokens_per_s (throughput);
            an outcome name (outcomes)
    VALUE   10%  relative to RUN_A;  0.05s / 50ms  absolute time;  3  absolute in the metric's unit
            (counts for outcomes, req/s or tok/s for throughput, seconds for latencies)
    +/-     check only increases (+) or only decreases (-); default both

When several specs match one cell the most specific wins (scoped over unscoped, METRIC.STAT over
METRIC over all); on a tie the later spec wins.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import InputError
from .metrics import first_token_latency
from .records import OUTCOMES, read_csv

LAT_METRICS = ("ttft", "tpot", "itl", "e2e", "queue_wait")
STATS = ("p50", "p95", "p99")
THROUGHPUT = ("requests_per_s", "output_tokens_per_s")
THROUGHPUT_ALIASES = {"rps": "requests_per_s", "req_s": "requests_per_s", "tok_s": "output_tokens_per_s",
                      "tokens_per_s": "output_tokens_per_s"}
FAMILIES = LAT_METRICS + ("throughput", "outcomes")
OVERALL = "overall"
CDF_METRICS = ("ttft", "e2e", "tpot")
EPS = 1e-12  # float noise between two printings of the same number must not fail a gate


# ------------------------------------------------------------------ loading
@dataclass
class Run:
    path: Path
    label: str
    summary: dict
    df: pd.DataFrame  # records inside the summary's measured window (warm-up excluded)

    @property
    def classes(self) -> list[str]:
        return sorted(self.summary.get("latency_by_class", {}))

    def observed(self, metric: str) -> bool:
        """Whether the run measured this latency at all (a client cannot see queue wait; a
        non-streaming run has no ITL)."""
        return (self.summary["latency"].get(metric) or {}).get("count", 0) > 0


_REQUIRED = ("latency", "latency_by_class", "requests", "outcomes_by_class", "throughput", "window")


def load_run(folder: str | Path, label: str | None = None) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(str(folder), "", "report folder not found" if not folder.exists() else "not a folder")
    csv_path, js_path = folder / "requests.csv", folder / "summary.json"
    if (folder / "requests.parquet").is_file() and not csv_path.is_file():
        csv_path = folder / "requests.parquet"  # sim run --format parquet
    for p in (csv_path, js_path):
        if not p.is_file():
            raise InputError(str(p), "", "file not found (expected a report folder from sim run, stress run or sim serve)")
    try:
        summary = json.loads(js_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(str(js_path), "", f"not valid JSON: {exc}") from None
    if not isinstance(summary, dict):
        raise InputError(str(js_path), "", "expected a JSON object")
    for key in _REQUIRED:
        if not isinstance(summary.get(key), dict):
            raise InputError(str(js_path), key, "missing or not an object (not a servesim summary)")
    for key in ("duration_s",):
        if not isinstance(summary["window"].get(key), (int, float)):
            raise InputError(str(js_path), f"window.{key}", "missing or not a number")
    if csv_path.suffix == ".parquet":
        from .loader import read_parquet
        df = read_parquet(csv_path)
    else:
        df = read_csv(csv_path)
    warm = summary["window"].get("warmup_s") or 0.0
    if warm > 0:
        df = df[df["arrival_s"] >= warm]
    return Run(folder, label or folder.resolve().name, summary, df)


# ------------------------------------------------------------------ the table
def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _values(run: Run, scope: str, stats: tuple = STATS) -> dict[str, float | None]:
    """metric key ('ttft.p95', 'throughput.requests_per_s', 'outcomes.ok') -> value for one scope."""
    s = run.summary
    out: dict[str, float | None] = {}
    if scope == OVERALL:
        lat, outcomes = s["latency"], s["requests"].get("outcomes", {})
        tp = {k: _num(s["throughput"].get(k)) for k in THROUGHPUT}
    else:
        lat = s["latency_by_class"].get(scope, {})
        outcomes = s["outcomes_by_class"].get(scope, {})
        tp = _class_throughput(run, scope)
    for m in LAT_METRICS:
        if m == "itl" and scope != OVERALL:
            continue  # pooled ITL is a run-wide figure only
        # the run's TTFT over its streamed requests only (a non-streamed TTFT is a whole response)
        d = (first_token_latency(s) if m == "ttft" and scope == OVERALL else lat).get(m) or {}
        for st in stats:
            out[f"{m}.{st}"] = _num(d.get(st))
    for k in THROUGHPUT:
        out[f"throughput.{k}"] = tp.get(k)
    for k, v in outcomes.items():
        out[f"outcomes.{k}"] = float(v)
    return out


def _class_throughput(run: Run, cls: str) -> dict:
    span = run.summary["window"]["duration_s"]
    ok = run.df[(run.df["class_name"] == cls) & (run.df["outcome"] == "ok")]
    if span <= 0:
        return {k: None for k in THROUGHPUT}
    return {"requests_per_s": round(len(ok) / span, 6), "output_tokens_per_s": round(float(ok["output_tokens"].sum()) / span, 6)}


def _outcome_order(names) -> list[str]:
    known = [o for o in OUTCOMES if o in names]
    return known + sorted(set(names) - set(known))


@dataclass
class Cell:
    scope: str
    key: str  # 'ttft.p95'
    a: float | None
    b: float | None

    @property
    def family(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def stat(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def diff(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def rel(self) -> float | None:
        """(B - A) / |A|; inf when A is 0 and B is not (reported as null in JSON)."""
        d = self.diff
        if d is None:
            return None
        if self.a == 0:
            return 0.0 if d == 0 else math.copysign(math.inf, d)
        return d / abs(self.a)

    @property
    def unit(self) -> str:
        return {"throughput": "req/s" if self.stat == "requests_per_s" else "tok/s", "outcomes": "count"}.get(self.family, "s")


# ------------------------------------------------------------------ tolerances
@dataclass
class Tolerance:
    spec: str
    scope: str | None  # None = every scope
    family: str  # 'all' or one of FAMILIES
    stat: str | None
    value: float
    relative: bool
    sign: int  # 0 both ways, +1 increases only, -1 decreases only

    @property
    def rank(self) -> tuple[int, int]:
        return (self.scope is not None, 0 if self.family == "all" else 1 + (self.stat is not None))

    def matches(self, cell: Cell) -> bool:
        if self.scope is not None and self.scope != cell.scope:
            return False
        if self.family == "all":
            return True
        return self.family == cell.family and (self.stat is None or self.stat == cell.stat)

    def exceeded(self, cell: Cell) -> bool:
        d = cell.diff
        if d is None:
            return False
        if self.sign and d * self.sign <= 0:
            return False
        limit = self.value * abs(cell.a) if self.relative else self.value
        return abs(d) > limit + EPS * max(1.0, abs(cell.a))

    def describe(self, cell: Cell) -> str:
        s = {1: "+", -1: "-"}.get(self.sign, "±")
        if self.relative:
            return f"{s}{self.value * 100:g}%"
        return f"{s}{self.value * 1000:g} ms" if cell.unit == "s" else f"{s}{self.value:g} {cell.unit}"


_SPEC = re.compile(r"^(?:(?P<scope>[^:=]+):)?(?P<metric>[A-Za-z0-9_.]+)=(?P<sign>[+-]?)(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)(?P<unit>%|s|ms)?$")


def parse_tolerance(spec: str) -> Tolerance:
    def bad(reason):
        return InputError("--tolerance", spec, reason)
    m = _SPEC.match(spec.strip())
    if not m:
        raise bad("expected [SCOPE:]METRIC[.STAT]=VALUE with VALUE like 10%, 0.05s, 50ms or 3")
    scope = m["scope"].strip() if m["scope"] else None
    family, _, stat = m["metric"].partition(".")
    stat = stat or None
    if family == "wait":
        family = "queue_wait"
    if family not in FAMILIES + ("all",):
        raise bad(f"unknown metric {family!r} (known: all, {', '.join(FAMILIES)})")
    if family == "all" and stat:
        raise bad("'all' takes no .STAT")
    if family in LAT_METRICS and stat is not None and stat not in STATS:
        raise bad(f"unknown statistic {stat!r} for {family} (known: {', '.join(STATS)})")
    if family == "throughput" and stat is not None:
        stat = THROUGHPUT_ALIASES.get(stat, stat)
        if stat not in THROUGHPUT:
            raise bad(f"unknown throughput {stat!r} (known: {', '.join(THROUGHPUT)})")
    if family == "outcomes" and stat is not None and stat not in OUTCOMES:
        raise bad(f"unknown outcome {stat!r} (known: {', '.join(OUTCOMES)})")
    if family == "itl" and scope not in (None, OVERALL):
        raise bad("ITL is compared overall only")
    unit = m["unit"]
    value = float(m["num"])
    if unit in ("s", "ms"):
        if family not in LAT_METRICS:
            raise bad(f"a time tolerance ({unit}) applies to latencies only, not {family}")
        value = value / 1000.0 if unit == "ms" else value
    relative = unit == "%"
    if relative:
        value /= 100.0
    return Tolerance(spec, scope, family, stat, value, relative, {"+": 1, "-": -1}.get(m["sign"], 0))


# ------------------------------------------------------------------ comparison
@dataclass
class Comparison:
    a: Run
    b: Run
    scopes: list[str]
    cells: list[Cell]
    tolerances: list[Tolerance] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def cell(self, scope: str, key: str) -> Cell | None:
        return next((c for c in self.cells if c.scope == scope and c.key == key), None)

    def to_frame(self) -> pd.DataFrame:
        """One row per (scope, metric): A, B, absolute and relative difference (notebooks, ad-hoc use)."""
        return pd.DataFrame([{"scope": c.scope, "metric": c.key, "unit": c.unit, self.a.label: c.a, self.b.label: c.b,
                              "diff": c.diff, "rel_diff": c.rel} for c in self.cells])

    def to_json(self) -> dict:
        def side(r: Run) -> dict:
            s = r.summary
            return {"label": r.label, "path": str(r.path), "scenario": s.get("scenario"), "seed": s.get("seed"),
                    "source": s.get("source"), "generated": s["requests"].get("generated"),
                    "window_s": s["window"].get("duration_s")}
        table: dict = {}
        for c in self.cells:
            rel = c.rel
            table.setdefault(c.scope, {})[c.key] = {
                "a": c.a, "b": c.b, "diff": None if c.diff is None else round(c.diff, 9),
                "rel_diff": None if rel is None or math.isinf(rel) else round(rel, 6), "unit": c.unit}
        return {"a": side(self.a), "b": side(self.b), "scopes": self.scopes, "table": table,
                "tolerances": [t.spec for t in self.tolerances], "checked": self.checked,
                "violations": self.violations, "notes": self.notes, "passed": self.ok}


def compare(a: Run, b: Run, tolerances: list[Tolerance] | None = None) -> Comparison:
    tolerances = list(tolerances or [])
    scopes = [OVERALL] + sorted(set(a.classes) | set(b.classes))
    for t in tolerances:
        if t.scope is not None and t.scope not in scopes:
            raise InputError("--tolerance", t.spec, f"unknown class {t.scope!r} (known: {', '.join(scopes)})")
    notes = []
    # a latency family that one run did not observe at all is left out, not reported as a difference
    skipped = [m for m in LAT_METRICS if not (a.observed(m) and b.observed(m))]
    for m in skipped:
        who = [r.label for r in (a, b) if not r.observed(m)]
        notes.append(f"{m}: not observed in {' and '.join(who)}; left out")
    mixed = [r.label for r in (a, b) if {"streamed", "non_streamed"} <= set(r.summary.get("latency_by_stream") or {})]
    if mixed and "ttft" not in skipped:
        notes.append(f"overall ttft: over streamed requests only ({' and '.join(mixed)} also had non-streamed ones, "
                     "whose TTFT is the whole response; their classes' rows show it)")
    cells = []
    for scope in scopes:
        va, vb = _values(a, scope), _values(b, scope)
        outcome_keys = {k for k in (*va, *vb) if k.startswith("outcomes.")}
        keys = [k for k in va if not k.startswith("outcomes.") and k.split(".")[0] not in skipped]
        keys += [f"outcomes.{o}" for o in _outcome_order([k.split(".", 1)[1] for k in outcome_keys])]
        for k in keys:
            x, y = va.get(k), vb.get(k)
            if k.startswith("outcomes."):  # a class absent from a run, or an outcome it never had: zero of them
                x, y = x or 0.0, y or 0.0
            cells.append(Cell(scope, k, x, y))
    cmp = Comparison(a, b, scopes, cells, tolerances, notes=notes)
    _check(cmp, skipped)
    return cmp


def _check(cmp: Comparison, skipped: list[str]) -> None:
    for t in cmp.tolerances:
        if t.family in skipped:
            # an explicit gate on a metric that cannot be compared must fail, not pass silently
            cmp.violations.append(f"{t.spec}: {t.family} not observed in both runs, cannot check")
    for c in cmp.cells:
        match = [t for t in cmp.tolerances if t.matches(c)]
        if not match:
            continue
        t = max(reversed(match), key=lambda t: t.rank)  # most specific; max keeps the first, i.e. the later spec
        cmp.checked += 1
        if (c.a is None) != (c.b is None):
            # e.g. every request of a class rejected in one run: no latency to compare is itself a change
            cmp.violations.append(f"{c.scope} {c.key}: {cmp.a.label} {_show(c, c.a)} -> {cmp.b.label} {_show(c, c.b)}: "
                                  f"measured in only one run ({t.spec})")
            continue
        if t.exceeded(c):
            rel = c.rel
            rel_s = "n/a" if rel is None else ("inf" if math.isinf(rel) else f"{rel * 100:+.1f}%")
            cmp.violations.append(f"{c.scope} {c.key}: {cmp.a.label} {_show(c, c.a)} -> {cmp.b.label} {_show(c, c.b)} "
                                  f"(diff {_show(c, c.diff, signed=True)}, {rel_s}) exceeds {t.describe(c)} ({t.spec})")


def _show(c: Cell, x, signed: bool = False) -> str:
    if x is None:
        return "–"
    sign = "+" if signed else ""
    if c.unit == "s":
        return f"{x * 1000:{sign}.2f} ms"
    if c.unit == "count":
        return f"{x:{sign}.0f}"
    return f"{x:{sign}.3f} {c.unit}"


# ------------------------------------------------------------------ outputs
_SHORT = {"throughput.requests_per_s": "throughput.rps", "throughput.output_tokens_per_s": "throughput.tok_s"}


def _cell_md(c: Cell, short: bool = False) -> list[str]:
    rel = c.rel
    rel_s = "–" if rel is None else ("∞" if math.isinf(rel) else f"{rel * 100:+.1f} %")
    if c.unit == "s":
        f = lambda x, s="": "–" if x is None else f"{x * 1000:{s}.2f}"  # noqa: E731
        name = f"{c.key} (ms)"
    elif c.unit == "count":
        f = lambda x, s="": "–" if x is None else f"{x:{s}.0f}"  # noqa: E731
        name = c.key
    else:
        f = lambda x, s="": "–" if x is None else f"{x:{s}.3f}"  # noqa: E731
        name = f"{_SHORT.get(c.key, c.key) if short else c.key} ({c.unit})"
    return [name, f(c.a), f(c.b), f(c.diff, "+"), rel_s]


def markdown(cmp: Comparison, plots: list[str]) -> str:
    a, b = cmp.a, cmp.b
    L = [f"# sim compare: {a.label} vs {b.label}", ""]
    L += ["| | A | B |", "|---|---|---|"]
    for k, fn in (("label", lambda r: r.label), ("folder", lambda r: f"`{r.path}`"),
                  ("scenario", lambda r: r.summary.get("scenario")), ("seed", lambda r: r.summary.get("seed")),
                  ("source", lambda r: r.summary.get("source")),
                  ("requests generated", lambda r: r.summary["requests"].get("generated")),
                  ("measured window (s)", lambda r: r.summary["window"].get("duration_s"))):
        L.append(f"| {k} | {fn(a)} | {fn(b)} |")
    L += ["", "Differences are B − A; relative differences are (B − A) / |A|. Latencies in ms; only `ok` "
          "requests enter them.", ""]
    for n in cmp.notes:
        L.append(f"- note: {n}")
    if cmp.tolerances:
        L += ["", "## Tolerance check", "",
              f"{'PASSED' if cmp.ok else 'FAILED'}: {cmp.checked} value(s) checked against "
              + ", ".join(f"`{t.spec}`" for t in cmp.tolerances) + f"; {len(cmp.violations)} violation(s).", ""]
        L += [f"- {v}" for v in cmp.violations]
    for scope in cmp.scopes:
        L += ["", f"## {scope}", "", "| metric | A | B | B − A | rel |", "|---|---:|---:|---:|---:|"]
        for c in cmp.cells:
            if c.scope == scope:
                L.append("| " + " | ".join(_cell_md(c)) + " |")
    if plots:
        L += ["", "## CDFs", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def write_plots(cmp: Comparison, out: Path) -> list[str]:
    from .compare_plots import cdf_plots
    return cdf_plots(cmp, out)


def write(cmp: Comparison, out: str | Path, plots: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = write_plots(cmp, out) if plots else []
    (out / "compare.json").write_text(json.dumps({**cmp.to_json(), "plots": names}, indent=2, sort_keys=True,
                                                 allow_nan=False) + "\n")
    (out / "compare.md").write_text(markdown(cmp, names))
    return out


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None, tolerances: list[str] | None = None,
                 label_a: str | None = None, label_b: str | None = None, plots: bool = True) -> Comparison:
    """The whole `sim compare` minus the terminal: load, compare, check, and write when `out` is given."""
    tols = [parse_tolerance(t) for t in tolerances or []]
    a, b = load_run(run_a, label_a), load_run(run_b, label_b)
    if a.label == b.label:
        b.label = f"{b.label} (B)"
    cmp = compare(a, b, tols)
    if out is not None:
        write(cmp, out, plots)
    return cmp


def default_out(run_a: str | Path, run_b: str | Path) -> Path:
    def slug(p):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p).resolve().name) or "run"
    return Path("reports") / f"compare_{slug(run_a)}_vs_{slug(run_b)}"


def terminal(cmp: Comparison, console) -> None:
    from rich.table import Table
    for scope in cmp.scopes:
        t = Table(title=f"{scope}: {cmp.a.label} (A) vs {cmp.b.label} (B)", title_justify="left")
        for col in ("metric", "A", "B", "B − A", "rel"):
            t.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
        bad = {v.split(":", 1)[0] for v in cmp.violations}
        for c in cmp.cells:
            if c.scope != scope:
                continue
            row = _cell_md(c, short=True)  # the short names are accepted aliases in --tolerance too
            style = "red" if f"{c.scope} {c.key}" in bad else None
            t.add_row(*row, style=style)
        console.print(t)
    for n in cmp.notes:
        console.print(f"note: {n}")
