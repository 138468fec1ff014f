"""One kind of user-facing input error: file, field path, reason — printed on one line, exit code 2."""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_PART = 300  # characters of a file name, field or reason kept in the line


def one_line(text: str, cap: int = MAX_PART) -> str:
    """Control characters (newlines included) become one space; very long parts are shortened."""
    s = _CONTROL.sub(" ", str(text)).strip()
    return s if len(s) <= cap else s[: cap - 3] + "..."


class InputError(Exception):
    def __init__(self, file: str, field: str, reason: str):
        self.file, self.field, self.reason = str(file), str(field), str(reason)
        super().__init__(self.line())

    def line(self) -> str:
        file, field, reason = one_line(self.file), one_line(self.field), one_line(self.reason, 2 * MAX_PART)
        where = f"{file}: {field}" if field else file
        return f"error: {where}: {reason}"
