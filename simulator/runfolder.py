"""A run folder's measured side files, as `stress run` writes them (README, "Run folders"):

- `requests.csv`   the one record schema (simulator/records.py), one row per request;
- `client.csv`     what only a client sees per request: closed-loop user, the server's own token counts
                   (usage), finish reason, stream chunks;
- `tokens.parquet` one row per received chunk of output: request_id, t_s (run clock, as requests.csv),
                   n_tokens (tokens it carried). While a run is under way (or after a crash) the same
                   rows sit in `tokens-<worker>.bin` parts of fixed 20-byte records, read here as well;
- `server.json`    what the server said about itself (kind, facts, raw answers, gauges sampled at ~1 s).

The readers are shared by `sim calibrate`, `sim replay` and the tests, so the format has one definition.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

TOKEN_DTYPE = np.dtype([("request_id", "<i8"), ("t_s", "<f8"), ("n_tokens", "<i4")])
TOKEN_PARTS = "tokens-*.bin"
CLIENT_COLUMNS = ("request_id", "closed_user", "prompt_tokens_server", "output_tokens_server", "finish_reason", "chunks")


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
