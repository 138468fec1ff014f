"""Reading untrusted input files in bounded time and memory: a size cap before anything is parsed,
strict UTF-8 (with a clear word for UTF-16, Latin-1 and binary files), and YAML read by a SafeLoader
that refuses duplicate keys, deep nesting, huge alias expansions and huge strings.

The caps on what is read before a scenario is parsed cannot come from the scenario itself, so they
are environment variables (README, "Scenario format", "Limits"):

    SERVESIM_MAX_YAML_BYTES   1 MiB     a scenario or profile file (and one --set value)
    SERVESIM_MAX_YAML_DEPTH   32        nested mappings/lists
    SERVESIM_MAX_YAML_NODES   200,000   values after anchors/aliases are expanded
    SERVESIM_MAX_STRING       10,000    characters in one string value
    SERVESIM_MAX_BENCH_BYTES  256 MiB   a vLLM bench serve result JSON (sim import vllm-bench)
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

DEFAULTS = {"SERVESIM_MAX_YAML_BYTES": 1 << 20, "SERVESIM_MAX_YAML_DEPTH": 32,
            "SERVESIM_MAX_YAML_NODES": 200_000, "SERVESIM_MAX_STRING": 10_000,
            "SERVESIM_MAX_BENCH_BYTES": 256 << 20}


def env_limit(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return DEFAULTS[name]
    try:
        v = int(raw.replace("_", ""))
    except ValueError:
        raise InputError(f"${name}", "", f"not a whole number: {raw!r}") from None
    if v < 1:
        raise InputError(f"${name}", "", f"must be >= 1, got {v}")
    return v


def _raise_hint(name: str) -> str:
    return f"raise ${name} if this input is legitimate"


def read_bytes(path: str | Path, max_bytes: int, field: str = "", limit_name: str = "") -> bytes:
    """A regular file's bytes, refused (one line) when missing, a folder, not a plain file, or over max_bytes."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(str(p), field, "file not found") from None
    except OSError as exc:
        raise InputError(str(p), field, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(str(p), field, "is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(str(p), field, "not a regular file (a device, pipe or socket cannot be read as input)")
    hint = f" ({limit_name})" if limit_name else ""
    if st.st_size > max_bytes:
        raise InputError(str(p), field, f"file is {st.st_size:,} bytes, over the limit of {max_bytes:,} bytes{hint}")
    try:
        with open(p, "rb") as fh:
            data = fh.read(min(max_bytes, st.st_size) + 1)  # a file that grows past its size is read only so far
    except OSError as exc:
        raise InputError(str(p), field, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes or len(data) > st.st_size:  # grew while read
        raise InputError(str(p), field, f"file grew while being read (over {min(max_bytes, st.st_size):,} bytes)")
    return data


def decode_utf8(data: bytes, file: str, field: str = "") -> str:
    """Strict UTF-8 (a BOM is dropped); otherwise one line saying what the file looks like and where."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(file, field, "file is UTF-16 encoded; save it as UTF-8")
    if b"\x00" in data[:65536]:
        raise InputError(file, field, "binary file (NUL bytes), not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(file, f"line {line}" if not field else f"{field}: line {line}",
                         f"not UTF-8 text (byte 0x{data[exc.start]:02x}; Latin-1 or binary?); save it as UTF-8") from None


def read_text(path: str | Path, max_bytes: int, field: str = "", limit_name: str = "") -> str:
    return decode_utf8(read_bytes(path, max_bytes, field, limit_name), str(path), field)


# ------------------------------------------------------------------ YAML
class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key is not a plain value",
                                                        key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", UniqueKeyLoader.construct_yaml_map)


def _yaml_error(exc: yaml.YAMLError, file: str, where: str) -> InputError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f"line {mark.line + 1}" if mark is not None else ""
    field = ": ".join(x for x in (where, line) if x)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return InputError(file, field, f"not valid YAML: {problem}")


def _check_depth(text: str, file: str, where: str) -> None:
    """Nesting depth from the event stream (iterative), before the recursive composer sees the text."""
    max_depth = env_limit("SERVESIM_MAX_YAML_DEPTH")
    depth = 0
    try:
        loader = UniqueKeyLoader(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, where) from None
    try:
        while loader.check_event():
            ev = loader.get_event()
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > max_depth:
                    m = ev.start_mark
                    raise InputError(file, ": ".join(x for x in (where, f"line {m.line + 1}") if x),
                                     f"nested deeper than {max_depth} levels ({_raise_hint('SERVESIM_MAX_YAML_DEPTH')})")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, where) from None
    finally:
        loader.dispose()


def check_tree(data: Any, file: str, where: str = "") -> None:
    """Depth, expanded size and string lengths of parsed data (aliases count as often as they are used)."""
    max_depth, max_nodes = env_limit("SERVESIM_MAX_YAML_DEPTH"), env_limit("SERVESIM_MAX_YAML_NODES")
    max_str = env_limit("SERVESIM_MAX_STRING")
    stack, nodes = [(data, 0, where)], 0
    while stack:
        obj, depth, path = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InputError(file, where, f"more than {max_nodes:,} values once anchors/aliases are expanded "
                                          f"({_raise_hint('SERVESIM_MAX_YAML_NODES')})")
        if isinstance(obj, (dict, list, tuple)) and depth >= max_depth:
            raise InputError(file, path, f"nested deeper than {max_depth} levels ({_raise_hint('SERVESIM_MAX_YAML_DEPTH')})")
        if isinstance(obj, (str, bytes)):
            if len(obj) > max_str:
                raise InputError(file, path, f"a string of {len(obj):,} characters, over the limit of {max_str:,} "
                                             f"({_raise_hint('SERVESIM_MAX_STRING')})")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, depth + 1, path))
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                stack.append((v, depth + 1, f"{path}[{i}]"))


def load_yaml(text: str, file: str, where: str = "") -> Any:
    """Parse YAML text with every cap; errors name the file, `where` (e.g. a --set path) and the line."""
    _check_depth(text, file, where)
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, where) from None
    except RecursionError:
        raise InputError(file, where, "nested too deeply") from None
    check_tree(data, file, where)
    return data


def load_yaml_file(path: str | Path, field: str = "") -> Any:
    """A YAML file (scenario or profile) read within SERVESIM_MAX_YAML_BYTES and parsed with load_yaml."""
    text = read_text(path, env_limit("SERVESIM_MAX_YAML_BYTES"), field, "raise $SERVESIM_MAX_YAML_BYTES "
                     "if this input is legitimate")
    return load_yaml(text, str(path), field)
