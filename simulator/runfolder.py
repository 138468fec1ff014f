"""A run folder's measured side files, as `stress run` writes them (README, "Run folders"):

- `requests.csv`   the one record schema (simulator/records.py), one row per request;
- `client.csv`     what only a client sees per request: closed-loop user, the server's own token counts
                   (usage), finish reason, stream chunks;
- `tokens.parquet` one row per received chunk of output: request_id, t_s (run clock, as requests.csv),
                   n_tokens (tokens it carried). While a run is under way (or after a crash) the same
                   rows sit in `tokens-<worker>.bin` parts of fixed 20-byte records, read here as well;
- `server.json`    what the server said about itself (kind, facts, raw answers, gauges sampled at ~1 s).

The readers are shared by `sim calibrate`, `sim replay` and the tests, so the format has one definition.
`load_run_folder` reads a whole folder for `sim replay` (requests.csv with client.csv merged in, server.json,
scenario.yaml), every problem one InputError naming the file, the field and the reason. Given a `.json` file
instead, it reads it as a vLLM `bench serve --save-detailed` result, converted into a temporary run folder
(simulator/import_vllm_bench.py), so `sim calibrate` and `sim replay` take those files as they are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import InputError
from .records import read_csv
from .scenario import Scenario, parse_overrides, scenario_from_dict, set_path

TOKEN_DTYPE = np.dtype([("request_id", "<i8"), ("t_s", "<f8"), ("n_tokens", "<i4")])
TOKEN_PARTS = "tokens-*.bin"
SERVER_KINDS = ("vllm", "llamacpp", "ollama", "twin", "openai", "unknown")
CLIENT_COLUMNS = ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server", "finish_reason", "chunks")
# optional: prompt tokens the server served from its prefix cache, where it says so (vLLM's and OpenAI's
# usage.prompt_tokens_details.cached_tokens, llama.cpp's timings.cache_n); the engine computed the rest;
# and the server slot that ran the request, where the server says (llama-server's `id_slot`, which is also the
# sequence id of its tokens in every batch: tools/server/server-context.cpp)
OPTIONAL_CLIENT = ("prefix_cached_tokens", "server_slot")


def token_part(folder: Path, worker: int) -> Path:
    return Path(folder) / f"tokens-{worker}.bin"


def read_token_part(path: Path) -> np.ndarray:
    """A part file; a record cut short by a crash mid-write is dropped."""
    raw = Path(path).read_bytes()
    whole = len(raw) - len(raw) % TOKEN_DTYPE.itemsize
    return np.frombuffer(raw[:whole], dtype=TOKEN_DTYPE)


def merge_token_parts(folder: Path, rows_per_group: int = 1 << 20) -> Path | None:
    """tokens-*.bin -> tokens.parquet (row groups of bounded size, so memory stays bounded), parts removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = Path(folder)
    parts = sorted(folder.glob(TOKEN_PARTS))
    if not parts:
        return None
    out = folder / "tokens.parquet"
    tmp = folder / "tokens.parquet.tmp"
    schema = pa.schema([("request_id", pa.int64()), ("t_s", pa.float64()), ("n_tokens", pa.int32())])
    step = rows_per_group * TOKEN_DTYPE.itemsize
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for p in parts:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                for off in range(0, size - size % TOKEN_DTYPE.itemsize, step):
                    a = np.frombuffer(fh.read(step), dtype=np.uint8)
                    a = a[:len(a) - len(a) % TOKEN_DTYPE.itemsize].view(TOKEN_DTYPE)
                    w.write_table(pa.table({k: a[k] for k in TOKEN_DTYPE.names}, schema=schema))
    tmp.replace(out)
    for p in parts:
        p.unlink()
    return out


def read_tokens(folder: Path) -> pd.DataFrame:
    """Per-chunk token arrivals of a run folder (parquet, else leftover parts), sorted by (request, time)."""
    folder = Path(folder)
    pq_path = folder / "tokens.parquet"
    if pq_path.exists():
        import pyarrow.parquet as pq
        try:
            df = pq.read_table(pq_path).to_pandas()
        except Exception as exc:  # noqa: BLE001 - any damage is the file's error
            raise InputError(str(pq_path), "", f"not a readable Parquet file: {type(exc).__name__}: {exc}") from None
        missing = [c for c in TOKEN_DTYPE.names if c not in df.columns]
        if missing:
            raise InputError(str(pq_path), "", f"missing column(s) {missing}")
    else:
        parts = [read_token_part(p) for p in sorted(folder.glob(TOKEN_PARTS))]
        if not parts:
            raise InputError(str(folder), "tokens.parquet", "no per-token times in this run folder "
                             "(stress run writes them for streamed requests)")
        df = pd.DataFrame(np.concatenate(parts))
    df = df[list(TOKEN_DTYPE.names)].astype({"request_id": "int64", "t_s": "float64", "n_tokens": "int32"})
    return df.sort_values(["request_id", "t_s"], kind="stable").reset_index(drop=True)


def read_client(folder: Path) -> pd.DataFrame | None:
    path = Path(folder) / "client.csv"
    if not path.exists():
        return None
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(str(path), "", f"not a readable CSV: {exc}") from None
    missing = [c for c in CLIENT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(str(path), "", f"missing column(s) {missing}")
    return df


def read_server(folder: Path) -> dict:
    path = Path(folder) / "server.json"
    if not path.exists():
        return {"kind": "unknown", "facts": {}, "samples": []}
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(str(path), "", f"not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise InputError(str(path), "", "expected a JSON object")
    d.setdefault("kind", "unknown")
    d.setdefault("facts", {})
    d.setdefault("samples", [])
    return d


@dataclass
class RunFolder:
    path: Path
    requests: pd.DataFrame  # requests.csv, with client.csv's columns merged in when present
    has_client: bool
    server: dict  # server.json, or {"kind": "unknown", "facts": {}, "samples": []}
    scenario_data: dict  # scenario.yaml as loaded (before overrides)
    origin: Path | None = None  # the file the folder was converted from (a vLLM bench result), if any

    @property
    def label(self) -> str:
        """What the user gave: the folder, or the file it was converted from."""
        return str(self.origin or self.path)

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

    def prefix_cache(self) -> dict | None:
        """What the server's prefix cache did during the run, from its counters read at the start and the end
        (server.json start/end `prefix_cache`, vLLM's vllm:prefix_cache_queries/_hits): {"queried_tokens",
        "hit_tokens", "hit_pct"}, or None when the server did not say."""
        a, b = ((s.get("prefix_cache") if isinstance(s, dict) else None) for s in (self.server.get("start"),
                                                                                   self.server.get("end")))
        if not isinstance(a, dict) or not isinstance(b, dict):
            return None
        try:
            q = float(b["queries"]) - float(a["queries"])
            h = float(b["hits"]) - float(a["hits"])
        except (KeyError, TypeError, ValueError):
            return None
        if not q > 0 or h < 0:  # nothing looked up, or a restarted server (counters back at 0)
            return None
        return {"queried_tokens": int(q), "hit_tokens": int(h), "hit_pct": round(100 * h / q, 2)}

    def server_histograms(self) -> dict:
        """What the server's own histograms counted during the run (server.json start/end `histograms`, vLLM's
        /metrics): {family: {"count", "sum", "mean", "buckets": {le: cumulative count}}}, end minus start, for
        the families both reads have and the run added to; {} when the server said nothing."""
        a, b = ((s.get("histograms") if isinstance(s, dict) else None) for s in (self.server.get("start"),
                                                                                 self.server.get("end")))
        if not isinstance(a, dict) or not isinstance(b, dict):
            return {}
        out = {}
        for name, hb in b.items():
            ha = a.get(name)
            try:
                n = float(hb["count"]) - float(ha["count"])
                tot = float(hb["sum"]) - float(ha["sum"])
                buckets = {le: float(c) - float(ha["buckets"].get(le, 0)) for le, c in hb["buckets"].items()}
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if n > 0 and tot >= 0:  # a counter that went back: a restarted server
                out[name] = {"count": int(n), "sum": tot, "mean": tot / n, "buckets": buckets}
        return out

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
    if folder.suffix.lower() == ".json" and not folder.is_dir():
        from .import_vllm_bench import as_run_folder  # imported here: that module writes this format
        run = load_run_folder(as_run_folder(folder))
        run.origin = folder
        return run
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
    bad = df.loc[sent & ~np.isfinite(df["arrival_s"].to_numpy(dtype=float)), "request_id"]
    if len(bad):
        raise InputError(str(req_path), "arrival_s", f"not a finite time (request {int(bad.iloc[0])})")
    client = read_client(folder)
    has_client = client is not None
    if has_client:
        df = _merge_client(folder / "client.csv", client, df)
    df = _merge_cached(folder / PREFIX_CACHED, df)
    server = _check_server(folder / "server.json", read_server(folder))
    sc_path = folder / "scenario.yaml"
    if not sc_path.is_file():
        raise InputError(str(folder), "scenario.yaml", "missing (the resolved scenario of the run)")
    try:
        data = yaml.safe_load(sc_path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(str(sc_path), "", f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InputError(str(sc_path), "", "expected a mapping at top level")
    if not (folder / "summary.json").is_file():
        raise InputError(str(folder), "summary.json", "missing (the run's summary, which stress run writes)")
    return RunFolder(folder, df, has_client, server, data)


PREFIX_CACHED = "prefix_cached.csv"
MAX_CACHED_BYTES = 64 << 20


def _merge_cached(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Per-request prefix-cache hits known from elsewhere than the responses (`request_id`,
    `prefix_cached_tokens`: a server log, a reconstruction), for a run whose client.csv lacks them."""
    if not path.is_file() or ("prefix_cached_tokens" in df.columns and df["prefix_cached_tokens"].notna().any()):
        return df
    if path.stat().st_size > MAX_CACHED_BYTES:
        raise InputError(str(path), "", f"over {MAX_CACHED_BYTES >> 20} MiB")
    try:
        c = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(str(path), "", f"not a readable CSV: {exc}") from None
    for k in ("request_id", "prefix_cached_tokens"):
        if k not in c.columns:
            raise InputError(str(path), k, "missing column")
        if not pd.api.types.is_numeric_dtype(c[k]) or c[k].isna().any() or (c[k] < 0).any():
            raise InputError(str(path), k, "not a number >= 0 in every row")
    if c["request_id"].duplicated().any():
        raise InputError(str(path), "request_id", "a request listed twice")
    c = c[["request_id", "prefix_cached_tokens"]].astype({"request_id": "int64"})
    return df.drop(columns=["prefix_cached_tokens"], errors="ignore").merge(c, on="request_id", how="left")


def _merge_client(path: Path, c: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    for k in ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server"):
        if not pd.api.types.is_numeric_dtype(c[k]):
            raise InputError(str(path), k, "not a number in every row")
    if c["request_id"].isna().any():
        raise InputError(str(path), "request_id", "a row without a request id")
    if c["request_id"].duplicated().any():
        raise InputError(str(path), "request_id", f"request {int(c.loc[c.request_id.duplicated(), 'request_id'].iloc[0])} listed twice")
    extra = [k for k in OPTIONAL_CLIENT if k in c.columns]
    for k in extra:
        if not pd.api.types.is_numeric_dtype(c[k]) and not c[k].isna().all():
            raise InputError(str(path), k, "not a number in every row")
    c = c[list(CLIENT_COLUMNS) + extra].astype({"request_id": "int64"})
    return df.merge(c, on="request_id", how="left", validate="one_to_one")


def _check_server(path: Path, s: dict) -> dict:
    if s.get("kind") not in SERVER_KINDS:
        raise InputError(str(path), "kind", f"unknown server kind {s.get('kind')!r} (known: {', '.join(SERVER_KINDS)})")
    if not isinstance(s.get("facts") or {}, dict):
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
    return {**s, "facts": s.get("facts") or {}, "samples": samples}
