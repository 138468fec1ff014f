"""The twin server's records on disk as they finish, so a long-running server's memory does not grow
with every request it ever served (a record is ~1 KB in memory, ~200 bytes here).

`RecordSpool` stands in for the world's `rows` list: `append` writes the row to an anonymous temporary
CSV (a few microseconds, on the event loop's thread, so no lock is needed), iterating reads every row
back (the report at shutdown, GET /records). Rows come back with the request id as an int and every
other field as the text the CSV writer gave it, which writes out the same again.
"""
from __future__ import annotations

import csv
import tempfile


class RecordSpool:
    def __init__(self):
        self.file = tempfile.TemporaryFile("w+", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file, lineterminator="\n")
        self.count = 0

    def append(self, row) -> None:
        self.writer.writerow(row)
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        f = self.file
        f.flush()
        f.seek(0)
        try:
            rows = [[int(r[0]), *r[1:]] for r in csv.reader(f)]
        finally:
            f.seek(0, 2)  # appends go on at the end
        return iter(rows)

    def close(self) -> None:
        self.file.close()
