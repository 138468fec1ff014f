"""A measured run folder (what `stress run` writes), read for `sim replay` and `sim calibrate`.

    requests.csv    the record schema of simulator/records.py (times in seconds from the run start)
    client.csv      optional: request_id, closed_user, prompt_tokens_server, output_tokens_server,
                    finish_reason, chunks
    tokens.parquet  optional: request_id, t_s, n_tokens (one row per received stream chunk)
    server.json     optional: {"kind", "facts", "start", "end", "samples": [{"t_s", "running", "waiting"}]}
    scenario.yaml   the resolved scenario the run used
    summary.json    the run's summary

Every problem is one InputError naming the file, the field and the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from .errors import InputError
from .records import read_csv
from .scenario import Scenario, parse_overrides, scenario_from_dict, set_path

SERVER_KINDS = ("vllm", "llamacpp", "ollama", "twin", "openai", "unknown")
CLIENT_COLUMNS = ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server", "finish_reason", "chunks")


@dataclass
class RunFolder:
    path: Path
    requests: pd.DataFrame  # requests.csv, with client.csv's columns merged in when present
    has_client: bool
    server: dict  # server.json, or {"kind": "unknown", "facts": {}, "samples": []}
    scenario_data: dict  # scenario.yaml as loaded (before overrides)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def kind(self) -> str:
        return str(self.server.get("kind") or "unknown")

    @property
    def facts(self) -> dict:
        return self.server.get("facts") or {}

    @property
    def samples(self) -> pd.DataFrame:
        s = self.server.get("samples") or []
        return pd.DataFrame(s, columns=["t_s", "running", "waiting"]) if s else pd.DataFrame(columns=["t_s", "running", "waiting"])

    def scenario(self, overrides: list[tuple[str, object]] | None = None) -> Scenario:
        """The run's scenario with overrides ((path, value) pairs, applied in order)."""
        data = json.loads(json.dumps(self.scenario_data))  # a deep copy of plain YAML data
        src = str(self.path / "scenario.yaml")
        for k, v in overrides or []:
            try:
                set_path(data, k, v)
            except (IndexError, KeyError, TypeError):
                raise InputError(src, k, "--set path does not exist") from None
            except ValueError:
                raise InputError(src, k, "--set path is malformed (list indices are written [0])") from None
        return scenario_from_dict(data, src)


def parse_sets(items: list[str] | None, folder: Path) -> list[tuple[str, object]]:
    return parse_overrides(items, str(folder / "scenario.yaml"))


def load_run_folder(folder: str | Path) -> RunFolder:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(str(folder), "", "run folder not found")
    if not folder.is_dir():
        raise InputError(str(folder), "", "not a folder (expected a run folder from stress run)")
    req_path = folder / "requests.csv"
    if not req_path.is_file():
        raise InputError(str(folder), "requests.csv", "missing (a run folder from stress run holds requests.csv)")
    df = read_csv(req_path)
    if len(df) == 0:
        raise InputError(str(req_path), "", "no requests in the run")
    sent = df["arrival_s"].notna()
    if not sent.any():
        raise InputError(str(req_path), "arrival_s", "no request of the run was sent (all not_sent)")
    if not (df["outcome"] == "ok").any():
        counts = ", ".join(f"{k} {v}" for k, v in df["outcome"].value_counts().sort_index().items())
        raise InputError(str(req_path), "outcome", f"no ok request, nothing to compare (errors only: {counts})")
    bad = df.loc[sent & df["arrival_s"].lt(0), "request_id"]
    if len(bad):
        raise InputError(str(req_path), "arrival_s", f"negative send time (request {int(bad.iloc[0])})")
    has_client = (folder / "client.csv").is_file()
    if has_client:
        df = _merge_client(folder / "client.csv", df)
    server = _read_server(folder / "server.json")
    sc_path = folder / "scenario.yaml"
    if not sc_path.is_file():
        raise InputError(str(folder), "scenario.yaml", "missing (the resolved scenario of the run)")
    try:
        data = yaml.safe_load(sc_path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(str(sc_path), "", f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InputError(str(sc_path), "", "expected a mapping at top level")
    return RunFolder(folder, df, has_client, server, data)


def _merge_client(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    try:
        c = pd.read_csv(path, keep_default_na=False, na_values={k: [""] for k in CLIENT_COLUMNS if k != "finish_reason"},
                        dtype={"finish_reason": str})
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise InputError(str(path), "", f"cannot read client CSV: {exc}") from None
    missing = [k for k in ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server") if k not in c.columns]
    if missing:
        raise InputError(str(path), "columns", f"missing {missing}")
    for k in ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server"):
        if not pd.api.types.is_numeric_dtype(c[k]):
            raise InputError(str(path), k, "not a number in every row")
    if c["request_id"].duplicated().any():
        raise InputError(str(path), "request_id", f"request {int(c.loc[c.request_id.duplicated(), 'request_id'].iloc[0])} listed twice")
    keep = [k for k in CLIENT_COLUMNS if k in c.columns]
    return df.merge(c[keep], on="request_id", how="left", validate="one_to_one")


def _read_server(path: Path) -> dict:
    empty = {"kind": "unknown", "facts": {}, "samples": []}
    if not path.is_file():
        return empty
    try:
        s = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(str(path), "", f"not valid JSON: {exc}") from None
    if not isinstance(s, dict):
        raise InputError(str(path), "", "expected a JSON object")
    if s.get("kind", "unknown") not in SERVER_KINDS:
        raise InputError(str(path), "kind", f"unknown server kind {s.get('kind')!r} (known: {', '.join(SERVER_KINDS)})")
    if not isinstance(s.get("facts", {}) or {}, dict):
        raise InputError(str(path), "facts", "expected an object")
    samples = s.get("samples") or []
    if not isinstance(samples, list):
        raise InputError(str(path), "samples", "expected a list")
    for i, x in enumerate(samples):
        if not isinstance(x, dict) or not isinstance(x.get("t_s"), (int, float)):
            raise InputError(str(path), f"samples[{i}].t_s", "missing or not a number")
        for k in ("running", "waiting"):
            if x.get(k) is not None and not isinstance(x.get(k), (int, float)):
                raise InputError(str(path), f"samples[{i}].{k}", "not a number or null")
    return {**empty, **s, "facts": s.get("facts") or {}, "samples": samples}
