"""llama-server's slots when a measured run begins, for `sim replay` (engine.slot_order, engine.slot_tokens).

A llama-server run inherits two things from what the server ran before it, and both move its timings:
- which slots are the least recently used: llama-server gives a request the least recently used idle slot
  (tools/server/server-context.cpp get_available_slot), and with one KV stream per slot, which slots decode
  together decides the forward passes (engines/llamacpp_batch.py);
- what the slots hold that the host prompt cache lacks: at every task launch llama-server copies each idle
  slot holding tokens to its prompt cache (`cache_idle_slots`, on by default with --cache-ram 8192 MiB), and
  the loop stalls meanwhile, so the first request of a run waits for the slots the run before left.

The recency comes from the run itself (client.csv server_slot): every slot a run has used is more recent than
those it has not, so the order in which its requests first got each slot is the order the slots had before.
What the slots hold comes from the run measured before it on the same server (`sim replay --after PREV`, or
the line before the run's in a `run_order.txt` beside it or one folder up, which `stress probe` writes):
a slot holds uncached tokens at the end of a run when its last request was released after the run's last
task launch, taken as the last send (llama-server launches a request on arrival while a slot is free; past
saturation launches come later, so this counts a few more slots as unsaved). Measured on an H200
(tests/data/real/llamacpp-h200-llama3-8b-f16, 15 runs back to back): the first request's TTFT was within
15 % of the copy this predicts (the profile's slot_save_s per token) in 14 runs, 0.8 s to 3.7 s.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError
from .runfolder import RunFolder, load_run_folder

RUN_ORDER = "run_order.txt"  # run folders (relative to the file) in the order they met one server
MAX_ORDER_BYTES = 1 << 20


def predecessor(run: RunFolder) -> RunFolder | None:
    """The run measured just before `run` on the same server, from a run_order.txt in the run's folder's
    parent or the one above it; None when no such file lists it, or it ran first."""
    here = run.path.resolve()
    for root in (here.parent, here.parent.parent):
        f = root / RUN_ORDER
        if not f.is_file():
            continue
        if f.stat().st_size > MAX_ORDER_BYTES:
            raise InputError(str(f), "", f"over {MAX_ORDER_BYTES >> 10} KiB: not a list of run folders")
        names = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
        paths = [(root / n).resolve() for n in names]
        if here not in paths:
            continue
        k = paths.index(here)
        if k == 0:
            return None
        if not paths[k - 1].is_dir():
            raise InputError(str(f), names[k - 1], "listed before the run, but no such run folder")
        return load_run_folder(paths[k - 1])
    return None


def slot_order(run: RunFolder, n_slots: int | None) -> list | None:
    """The slots' least-recently-used order when the run began, oldest first: the order in which its requests
    (by send) first got each slot, then the slots it never got."""
    df = run.requests
    if not n_slots or "server_slot" not in df.columns:
        return None
    s = pd.to_numeric(df.sort_values("arrival_s", kind="stable")["server_slot"], errors="coerce").dropna()
    s = s[(s >= 0) & (s < n_slots)].astype(np.int64)
    if s.empty:
        return None
    first = list(dict.fromkeys(s.tolist()))
    return first + [k for k in range(n_slots) if k not in set(first)]


def inherited_tokens(prev: RunFolder, n_slots: int) -> list | None:
    """Tokens each slot holds at the end of `prev` that the host prompt cache lacks (index: slot id): the
    prompt and output of its last request, when that ended after prev's last send; else 0."""
    df = prev.requests
    need = {"server_slot", "end_s", "prompt_tokens_server", "output_tokens_server"}
    if not need <= set(df.columns):
        return None
    slot = pd.to_numeric(df["server_slot"], errors="coerce")
    df = df[slot.notna() & (slot >= 0) & (slot < n_slots)].assign(slot=slot.astype("Int64"))
    if df.empty:
        return None
    last_launch = float(df["arrival_s"].max())
    out = [0] * n_slots
    for s, g in df.sort_values("arrival_s", kind="stable").groupby("slot"):
        r = g.iloc[-1]
        if np.isfinite(r["end_s"]) and r["end_s"] > last_launch:
            out[int(s)] = int(np.nan_to_num(r["prompt_tokens_server"]) + np.nan_to_num(r["output_tokens_server"]))
    return out


def slot_overrides(run: RunFolder, used: dict, user: list, after: RunFolder | None) -> list:
    """engine.slot_order (and engine.slot_tokens with `after`) for a llama-server run; `used` records them.
    Left out when the user sets the slots (engine.n_parallel or the fields themselves)."""
    n = used.get("total_slots")
    if any(k in ("engine.n_parallel", "engine.slot_order", "engine.slot_tokens") for k, _ in user):
        return []
    out = []
    order = slot_order(run, n)
    if order:
        out.append(("engine.slot_order", order))
        used["slot_order"] = f"{len(order)} slots, from the order the run's requests first got them"
    held = inherited_tokens(after, n) if after is not None and n else None
    if held is not None:
        out.append(("engine.slot_tokens", held))
        used["slot_tokens"] = (f"{sum(held)} tokens in {sum(1 for h in held if h)} slots not in the prompt cache, "
                               f"left by {after.name}")
    return out
