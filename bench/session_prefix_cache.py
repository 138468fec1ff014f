"""Estimate the prefix-cache hits of a measured session whose runs repeated each other's prompt text.

Until stress run salted its prompts per run, every run numbered its requests from 0 and a prompt was
"r<id> the the ...": request k of one run began with the same text as request k of every earlier run, so a
server with a prefix cache (vLLM's automatic prefix caching: full blocks of `block_size` tokens, hashed with
their prefix, evicted least recently used; vllm/v1/core/kv_cache_utils.py, block_pool.py) served the shared
head of a prompt from the cache. This replays the session's requests in order through such a cache and
writes each request's cached prompt tokens into its run's client.csv (`prefix_cached_tokens`), which
`sim calibrate` and `sim replay` subtract from the prompt the engine computed.

    python bench/session_prefix_cache.py RUN_DIR [RUN_DIR ...] --blocks 56080 --block-size 16

RUN_DIRs in the order they ran. Approximation: requests of one run enter in send order, outputs fill blocks
of their own (a random model's tokens match nothing), and blocks in use are not protected from eviction.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import pandas as pd


def estimate(folders, blocks: int, block_size: int) -> dict:
    lru: OrderedDict = OrderedDict()
    out, uniq = {}, 0
    for f in folders:
        req = pd.read_csv(Path(f) / "requests.csv")
        cli = pd.read_csv(Path(f) / "client.csv")
        m = req.merge(cli, on="request_id", how="left").sort_values("arrival_s", kind="stable")
        m = m[m["arrival_s"].notna()]
        hits = {}
        for rid, words, p_srv, ok, gen in zip(m["request_id"], m["prompt_tokens"], m["prompt_tokens_server"],
                                              m["outcome"] == "ok", m["output_tokens"]):
            p = int(p_srv) if pd.notna(p_srv) and p_srv > 0 else int(words)
            text = (int(rid), int(words))  # the prompt text is fixed by the request id and its word count
            full = p // block_size
            h = 0
            # block j of "r<id> the the ..." is the same text for every prompt of that id at least (j+1) blocks long
            while h < full and (text[0], h) in lru:
                h += 1
            cached = min(h * block_size, p - 1)  # the last prompt token is always computed
            hits[int(rid)] = cached
            for j in range(full):
                key = (text[0], j)
                lru[key] = True
                lru.move_to_end(key)
            for _ in range((p % block_size + int(gen if ok and pd.notna(gen) else 0)) // block_size):
                uniq += 1
                lru[("out", uniq)] = True
            while len(lru) > blocks:
                lru.popitem(last=False)
        out[str(f)] = hits
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--blocks", type=int, required=True, help="the server's KV blocks (server.json num_gpu_blocks)")
    ap.add_argument("--block-size", type=int, default=16)
    a = ap.parse_args()
    est = estimate(a.runs, a.blocks, a.block_size)
    for f, hits in est.items():
        path = Path(f) / "client.csv"
        cli = pd.read_csv(path)
        cli["prefix_cached_tokens"] = cli["request_id"].map(hits).fillna(0).astype(int)
        cli.to_csv(path, index=False)
        req = pd.read_csv(Path(f) / "requests.csv").merge(cli, on="request_id")
        share = cli["prefix_cached_tokens"].sum() / max(1, req["prompt_tokens_server"].fillna(req["prompt_tokens"]).sum())
        print(f"{Path(f).name}: {share:.1%} of prompt tokens estimated cached")


if __name__ == "__main__":
    main()
