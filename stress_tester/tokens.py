"""Per-chunk token arrivals of one sending process, appended to `tokens-<worker>.bin` in the run folder
about every half second (simulator/runfolder.py defines the 20-byte record), so a crash or a kill keeps
what was measured; `stress run` merges the parts into tokens.parquet at the end."""
from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from simulator.runfolder import TOKEN_DTYPE


class TokenLog:
    __slots__ = ("rid", "t", "n", "fh", "rows")

    def __init__(self):
        self.rid, self.t, self.n = array("q"), array("d"), array("i")
        self.fh = None
        self.rows = 0

    def open(self, path: Path) -> None:
        self.fh = open(path, "ab")

    def add(self, rid: int, t: float, n: int) -> None:
        self.rid.append(rid)
        self.t.append(t)
        self.n.append(n)

    def flush(self) -> None:
        k = len(self.rid)
        if not k:
            return
        if self.fh is not None:
            rec = np.empty(k, dtype=TOKEN_DTYPE)
            rec["request_id"] = np.frombuffer(self.rid, dtype=np.int64)
            rec["t_s"] = np.frombuffer(self.t, dtype=np.float64)
            rec["n_tokens"] = np.frombuffer(self.n, dtype=np.int32)
            self.fh.write(rec.tobytes())
            self.fh.flush()
        self.rows += k
        del self.rid[:], self.t[:], self.n[:]

    def close(self) -> None:
        self.flush()
        if self.fh is not None:
            self.fh.close()
            self.fh = None
