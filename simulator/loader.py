"""`simulator.load_run(path)`: a report folder (sim, stress or twin) as pandas data.

    import simulator
    run = simulator.load_run("reports/burst_load")      # the folder, or its requests.csv / .parquet / summary.json
    run.requests.groupby("class_name")["ttft_s"].quantile(0.95)
    run.summary["goodput"]["slo_attainment"]

`requests` has one row per request (the schema of simulator/records.py, its dtypes), read from requests.parquet
when the folder has one (`sim run --format parquet`), else from requests.csv; `summary` is summary.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import InputError
from .records import check_columns, read_csv

FILES = ("requests.parquet", "requests.csv", "summary.json")


@dataclass
class Run:
    path: Path
    requests: pd.DataFrame
    summary: dict

    @property
    def ok(self) -> pd.DataFrame:
        """The completed requests, the only ones in latency statistics."""
        return self.requests[self.requests["outcome"] == "ok"]


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise InputError(str(path), "", f"cannot read records Parquet: {exc}") from None
    return check_columns(df, path)


def load_run(path) -> Run:
    p = Path(path)
    folder = p.parent if p.is_file() or p.name in FILES else p
    if not folder.is_dir():
        raise InputError(str(path), "", "no such report folder")
    if (folder / "requests.parquet").exists():
        df = read_parquet(folder / "requests.parquet")
    elif (folder / "requests.csv").exists():
        df = read_csv(folder / "requests.csv")
    else:
        raise InputError(str(folder), "", "no requests.parquet or requests.csv: not a report folder")
    summary_path = folder / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    except json.JSONDecodeError as exc:
        raise InputError(str(summary_path), f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from None
    return Run(folder, df, summary)
