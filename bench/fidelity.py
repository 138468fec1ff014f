"""How close the simulator comes to real servers: every held-out run of every data set replayed with the
data set's profile (`sim replay`), and per engine the median and the largest absolute % error of
p50/p95 TTFT, TPOT and E2E over those runs.

A data set is a folder holding `profile.yaml` (the cost profile to replay with) and `heldout/<run>/`
run folders (what `stress run` writes). An optional `replay.yaml` in the data set sets the engine and
overrides (`engine: llamacpp`, `set: ["engine.max_num_seqs=256"]`); without it the engine follows the
server that was measured (server.json kind: vllm -> continuous, llamacpp -> llamacpp; otherwise the
run's own scenario). Only held-out runs are replayed: the calibration never saw them.

    python bench/fidelity.py                          # every data set under tests/data/real/
    python bench/fidelity.py --data DIR [--data DIR]  # data sets under DIR (or DIR itself is one)
    python bench/fidelity.py --runs                   # also each run's signed errors
    python bench/fidelity.py --json out.json          # the figures as JSON too

Replays (report folders with fidelity.md) go under --out (default reports/bench_fidelity).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.errors import InputError  # noqa: E402
from simulator.fidelity import fidelity  # noqa: E402
from simulator.replay import ENGINE_OF_KIND, replay  # noqa: E402
from simulator.runfolder import load_run_folder  # noqa: E402

METRICS = ("ttft.p50", "ttft.p95", "tpot.p50", "tpot.p95", "e2e.p50", "e2e.p95")


def datasets(roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        if (root / "profile.yaml").is_file() and (root / "heldout").is_dir():
            out.append(root)
        elif root.is_dir():
            out += sorted(d for d in root.iterdir() if (d / "profile.yaml").is_file() and (d / "heldout").is_dir())
    return out


def replay_dataset(ds: Path, out: Path, plots: bool) -> list[dict]:
    cfg = {}
    if (ds / "replay.yaml").is_file():
        cfg = yaml.safe_load((ds / "replay.yaml").read_text()) or {}
        if not isinstance(cfg, dict) or set(cfg) - {"engine", "set"}:
            raise InputError(str(ds / "replay.yaml"), "", "expected a mapping with keys engine and/or set")
    rows = []
    for run_dir in sorted(p for p in (ds / "heldout").iterdir() if p.is_dir()):
        run = load_run_folder(run_dir)
        engine = cfg.get("engine") or ENGINE_OF_KIND.get(run.kind)
        dest = out / ds.name / run_dir.name
        _, plan = replay(run, dest, engine, str((ds / "profile.yaml").resolve()), list(cfg.get("set") or []), plots=plots)
        rep = fidelity(run, dest, dest, plots=plots, info=plan.info)
        m = rep["table"]["overall"]["metrics"]
        rows.append({"dataset": ds.name, "run": run_dir.name, "engine": plan.info["engine"], "server": run.kind,
                     "errors_pct": {k: m[k]["error_pct"] for k in METRICS if k in m},
                     "ok": rep["table"]["overall"]["counts"], "folder": str(dest)})
    return rows


def summarize(rows: list[dict]) -> dict:
    """{engine: {metric: {"runs", "median_abs_pct", "max_abs_pct"}}}."""
    out = {}
    for eng in sorted({r["engine"] for r in rows}):
        sel = [r for r in rows if r["engine"] == eng]
        out[eng] = {}
        for k in METRICS:
            v = np.array([abs(r["errors_pct"][k]) for r in sel if r["errors_pct"].get(k) is not None], dtype=float)
            out[eng][k] = {"runs": int(v.size), "median_abs_pct": round(float(np.median(v)), 2) if v.size else None,
                           "max_abs_pct": round(float(v.max()), 2) if v.size else None}
    return out


def _f(x):
    return "–" if x is None else f"{x:.1f}"


def print_tables(rows: list[dict], summary: dict, per_run: bool) -> None:
    print("| engine | metric | runs | median abs error % | max abs error % |")
    print("|---|---|---:|---:|---:|")
    for eng, d in summary.items():
        for k, v in d.items():
            print(f"| {eng} | {k} | {v['runs']} | {_f(v['median_abs_pct'])} | {_f(v['max_abs_pct'])} |")
    if per_run:
        print()
        print("| data set | run | engine | " + " | ".join(METRICS) + " |")
        print("|---|---|---|" + "---:|" * len(METRICS))
        for r in rows:
            e = r["errors_pct"]
            print(f"| {r['dataset']} | {r['run']} | {r['engine']} | "
                  + " | ".join("–" if e.get(k) is None else f"{e[k]:+.1f}" for k in METRICS) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", type=Path, help="a folder of data sets, or one data set (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_fidelity")
    ap.add_argument("--runs", action="store_true", help="also print each run's signed errors")
    ap.add_argument("--plots", action="store_true", help="draw each replay's plots")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    a = ap.parse_args(argv)
    roots = a.data or [ROOT / "tests" / "data" / "real"]
    try:
        found = datasets(roots)
        if not found:
            raise InputError(", ".join(map(str, roots)), "", "no data set (a folder with profile.yaml and heldout/<run>/)")
        rows = [r for ds in found for r in replay_dataset(ds, a.out, a.plots)]
        if not rows:
            raise InputError(", ".join(map(str, found)), "heldout", "no held-out run folder")
    except InputError as exc:
        print(exc.line(), file=sys.stderr)
        return 2
    summary = summarize(rows)
    print_tables(rows, summary, a.runs)
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
