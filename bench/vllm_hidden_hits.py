"""The prefix-cache hits vLLM did not report in the `vllm-0.26-h200-llama3-8b` data set, reconstructed per request.

That data set was measured with a random model whose tokenizer lost most of its word strings on loading
(tests/data/real/README.md): a prompt `r<request id><salt> the the ...` became BOS, `r`, one token per digit
(three of the ten digits the unknown token) and the filler, so requests whose digit strings agree once those
digits are blanked share the whole prompt, and vLLM's prefix cache served it. Only one run
(`extra/cached_tokens_poisson_r16`, vLLM with --enable-prompt-tokens-details) reports the hits; this script

1. finds the blanked digits from that run: every set of digits is tried, a request being served the longest
   earlier-sent prompt of its digit pattern, in whole blocks, at most its length minus one token (vLLM's
   prefix cache: whole blocks, the last prompt token always computed);
2. prints how many of that run's requests the best set predicts exactly;
3. writes `prefix_cached.csv` (request_id, prefix_cached_tokens) into every other run folder of the data set,
   which the run-folder reader merges where client.csv has no counts (simulator/runfolder.py).

    python bench/vllm_hidden_hits.py [DATASET] [--check]     # --check: print, write nothing
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.runfolder import PREFIX_CACHED, load_run_folder  # noqa: E402

DEFAULT = ROOT / "tests" / "data" / "real" / "vllm-0.26-h200-llama3-8b"


def hits(run, blanked: set, block: int) -> np.ndarray:
    """Reconstructed prefix_cached_tokens of every request of `run` (0 for those without a server count)."""
    df = run.requests
    salt = str(json.loads((run.path / "summary.json").read_text())["stress"]["prompt_salt"])
    length = pd.to_numeric(df["prompt_tokens_server"], errors="coerce").to_numpy(float)
    order = np.argsort(df["arrival_s"].to_numpy(float), kind="stable")
    longest: dict = {}  # digit pattern -> longest prompt sent so far
    out = np.zeros(len(df), dtype=np.int64)
    for i in order:
        if not np.isfinite(length[i]) or not np.isfinite(df["arrival_s"].iat[i]):
            continue
        key = "".join("_" if ch in blanked else ch for ch in f"{int(df['request_id'].iat[i])}{salt}")
        before = longest.get(key, 0)
        if before:
            shared = min(length[i] - 1, before)
            out[i] = int(shared // block) * block
        longest[key] = max(before, length[i])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--check", action="store_true", help="print the figures, write nothing")
    a = ap.parse_args(argv)
    runs = [load_run_folder(p.parent) for p in sorted(a.dataset.glob("*/*/summary.json"))]
    known = [r for r in runs if not (r.path / PREFIX_CACHED).is_file() and "prefix_cached_tokens" in r.requests.columns
             and r.requests["prefix_cached_tokens"].notna().any()]
    if not known:
        print(f"{a.dataset}: no run reports prefix_cached_tokens to find the blanked digits from", file=sys.stderr)
        return 2
    block = int(runs[0].facts.get("block_size") or 16)
    best = None
    for bits in range(1 << 10):
        blanked = {str(d) for d in range(10) if bits >> d & 1}
        exact = total = 0
        for r in known:
            got = r.requests["prefix_cached_tokens"].fillna(0).to_numpy(np.int64)
            exact += int((hits(r, blanked, block) == got).sum())
            total += len(got)
        if best is None or exact > best[0]:
            best = (exact, total, blanked)
    exact, total, blanked = best
    print(f"blanked digits {sorted(blanked)}: {exact} of {total} requests of {', '.join(r.name for r in known)} "
          f"predicted exactly")
    known_paths = {r.path for r in known}
    for r in runs:
        if r.path in known_paths:
            continue
        h = hits(r, blanked, block)
        share = h.sum() / np.nansum(pd.to_numeric(r.requests["prompt_tokens_server"], errors="coerce"))
        print(f"{r.path.parent.name}/{r.name}: {int((h > 0).sum())} of {len(h)} requests hit, "
              f"{100 * share:.1f} % of prompt tokens")
        if not a.check:
            pd.DataFrame({"request_id": r.requests["request_id"].astype(np.int64), "prefix_cached_tokens": h}) \
                .to_csv(r.path / PREFIX_CACHED, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
