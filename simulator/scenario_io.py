"""Scenario loading helpers: pydantic errors as one line (field path, reason), --set overrides, data paths.

No import of simulator.scenario here (it imports this module)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InputError
from .safeio import load_yaml

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("poisson", "constant", "gamma", "onoff", "piecewise", "closed_loop", "trace",
                      "fixed", "uniform", "lognormal", "exponential", "empirical", "sequence") and out.endswith(("arrival", "tokens")):
            continue  # pydantic's union tag adds nothing for the reader
        else:
            out += f".{part}" if out else str(part)
    return out


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    field = _loc(err["loc"])
    if err["type"] == "value_error" and ": " in msg:
        head, rest = msg.split(": ", 1)
        if " " not in head:  # validators name the offending path relative to their model
            field, msg = (f"{field}.{head}" if field else head), rest
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid" and isinstance(err.get("input"), dict):
        msg = f"unknown type {err['input'].get('type')!r} (expected one of {err['ctx']['expected_tags']})"
    extra = len(exc.errors()) - 1
    return field, msg + (f" (+{extra} more error{'s' if extra > 1 else ''})" if extra else "")


def set_path(data: dict, path: str, value: Any) -> None:
    """Apply one --set a.b[0].c=value override (value parsed as YAML)."""
    parts: list[Any] = []
    for seg in path.split("."):
        while "[" in seg:
            name, rest = seg.split("[", 1)
            if name:
                parts.append(name)
            idx, seg = rest.split("]", 1)
            parts.append(int(idx))
        if seg:
            parts.append(seg)
    if not parts:
        raise KeyError(path)
    cur: Any = data
    for p, nxt in zip(parts, parts[1:] + [None]):
        if not isinstance(cur, list if isinstance(p, int) else dict):
            raise TypeError(f"{p!r} indexes a {type(cur).__name__}")  # e.g. name.x, or a list index on a mapping
        if nxt is None:
            cur[p] = value  # (IndexError for a list index past the end)
        else:
            cur = cur[p] if isinstance(p, int) else cur.setdefault(p, {})


def parse_overrides(items: list[str] | None, file: str) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise InputError(file, f"--set {item}", "expected path=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise InputError(file, f"--set {item}", "empty path before '='")
        try:
            out.append((k.strip(), load_yaml(v, file, k.strip())))
        except InputError as exc:
            raise InputError(file, k.strip(), f"--set value: {exc.reason}") from None
    return out


def resolve_path(p: str, base: Path) -> Path:
    """Data paths are relative to the scenario file, then to the repo root."""
    cand = Path(p)
    if cand.is_absolute():
        return cand
    for root in (base.parent, Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / cand).exists():
            return root / cand
    return base.parent / cand


def _check_files(sc: Scenario, path: Path) -> None:
    for i, c in enumerate(sc.workload.classes):
        for field, spec in (("arrival", c.arrival), ("prompt_tokens", c.prompt_tokens), ("output_tokens", c.output_tokens)):
            p = getattr(spec, "path", None)
            if p is not None:
                rp = resolve_path(p, path)
                if not rp.exists():
                    raise InputError(str(path), f"workload.classes[{i}].{field}.path", f"file not found: {p}")
                if rp.is_dir():
                    raise InputError(str(path), f"workload.classes[{i}].{field}.path", f"is a folder, not a file: {p}")
                object.__setattr__(spec, "path", str(rp))
