"""`sim import vllm-bench FILE.json --out RUN_DIR`: a vLLM `bench serve --save-result --save-detailed` result
as a run folder (simulator/runfolder.py), so `sim calibrate` and `sim replay` read it like a `stress run`.

What the writer puts in the file (read in vllm-project/vllm, not copied): `vllm/benchmarks/serve.py`,
`benchmark()` builds the result dict and `main_async()` adds the setup and drops the per-request lists
unless `--save-detailed`; the per-request values come from `RequestFuncOutput` in
`vllm/benchmarks/lib/endpoint_request_func.py` (`async_request_openai_completions` and the chat variant),
read at commits 009e6d4a1cd6 and 02cfb534df56 (2026). Older files come from `benchmarks/benchmark_serving.py`
(same keys, fewer of them; `--append-result` puts several results in one file, refused here). Per request, in the
order the requests were issued, all times in seconds:

- `ttfts`        first streamed chunk − send (0.0 for a failed request);
- `itls`         list of gaps between consecutive chunks that carried choices (a chunk may carry several tokens);
- `input_lens`   prompt tokens (the server's usage.prompt_tokens where it reported them);
- `output_lens`  output tokens (usage.completion_tokens, else a tokenizer count of the text; 0 when failed);
- `errors`       "" when ok, else the HTTP reason (outcome http_error), "Never received a valid chunk..."
                 (stream_error) or a Python traceback (timeout when its last line names a Timeout, else
                 connection_error);
- `start_times`  send time on the client's `time.perf_counter()` clock — only since vLLM PR #32667
                 (January 2026); `latencies` (last chunk − send) and `queue_times` (wait for the
                 `--max-concurrency` semaphore before the send) are recent too.
Setup keys: `date`, `backend`, `model_id`, `tokenizer_id`, `num_prompts`, `request_rate` (a number or "inf"),
`burstiness`, `max_concurrency`, `ramp_up_*`, `duration`.

The run folder: send offsets from `start_times` (origin = the first scheduled send, i.e. send − queue
time); TTFT as in the file; chunk arrivals = send + ttft + cumsum(itls) (tokens.parquet, one token per
chunk, the tokens usage counted beyond the chunks on the chunks after the longest gaps: _tokens_per_chunk);
E2E = ttft + sum(itls) (vLLM's own `latency`); TPOT = (E2E − TTFT)/(output − 1), vLLM's and METRICS.md's.
`request_rate` inf with `--max-concurrency C` is a closed loop of C users without think time (the
semaphore); any other setting is open loop at the measured sends (with a finite rate and
`--max-concurrency`, a request's wait for the semaphore is kept as scheduled_s = send − queue time, but
the replay sends at the measured send and does not model that wait).

**Without `start_times`** (files from vLLM before PR #32667) the send times are only recoverable where the
client's schedule is deterministic: `request_rate` inf sends everything at once, or, with
`--max-concurrency C`, request i when the earliest of the C in flight ends (FIFO semaphore), which the
latencies give (ttft + sum(itls); 0 for a request that failed before any chunk); the folder says
`send_times: reconstructed`. What is lost is the client's time between a response's last chunk and the next
send (the usage chunk, `[DONE]`, its own bookkeeping): on the vLLM H200 probe at 64 streams the
reconstructed sends are a median 9 ms, at most 16 ms off. Good enough for `sim replay` (latencies of
seconds), not for `sim calibrate`, which tells engine steps apart by the alignment of token arrivals across
requests to ~2 ms, so simulator/tracefit.py refuses such a folder. A finite `request_rate` drew its gaps from
numpy with a seed the file does not record: such a file is refused, since a Poisson stream drawn here would
not be the one the server saw, and calibrating or replaying against it would measure a different run.
"""
from __future__ import annotations

import atexit
import csv
import heapq
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError, one_line
from .limits import Limits
from .safeio import decode_utf8, env_limit, read_bytes

REQUIRED = ("ttfts", "itls", "input_lens", "output_lens")
OPTIONAL = ("start_times", "latencies", "queue_times", "errors")
CLASS = "bench"
LIMIT = "SERVESIM_MAX_BENCH_BYTES"
MAX_TOKENS = 10_000_000  # a prompt or output; the scenario limit `tokens` (simulator/limits.py) is the same
MAX_TIME_S = 1e6  # one latency or gap (the client gives up after 6 h)
MAX_CLOCK_S = 1e12  # a perf_counter() reading
CLIENT_TIMEOUT_S = 6 * 3600.0  # the benchmark client's aiohttp timeout (endpoint_request_func.py AIOHTTP_TIMEOUT)


# ------------------------------------------------------------------ reading and checking
def read_result(path: str | Path) -> dict:
    """The result object of FILE, size-capped and checked; every problem one InputError (file, key, reason)."""
    path = Path(path)
    cap = env_limit(LIMIT)
    text = decode_utf8(read_bytes(path, cap, "", f"raise ${LIMIT} if this input is legitimate"), str(path))
    dec = json.JSONDecoder()
    try:
        obj, end = dec.raw_decode(text, len(text) - len(text.lstrip()))
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(str(path), "", "not valid JSON: nested too deeply") from None
    if text[end:].strip():
        raise InputError(str(path), "", "more than one JSON value: results appended with --append-result; "
                                        "split it into one file per result")
    if not isinstance(obj, dict):
        raise InputError(str(path), "", f"expected a JSON object (vllm bench serve --save-result), got {type(obj).__name__}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        bench = any(k in obj for k in ("completed", "request_throughput", "backend", "num_prompts"))
        hint = "" if len(missing) < len(REQUIRED) else " (the file was saved without --save-detailed)" if bench else \
            " (not a vllm bench serve result: none of its keys)"
        raise InputError(str(path), missing[0], f"missing: per-request {', '.join(missing)} are needed{hint}")
    n = _list(obj, "ttfts", path)
    if n == 0:
        raise InputError(str(path), "ttfts", "no requests in the result")
    for k in (*REQUIRED, *OPTIONAL):
        if (k in REQUIRED or obj.get(k) is not None) and _list(obj, k, path) != n:
            raise InputError(str(path), k, f"{len(obj[k])} entries, ttfts has {n} (one per request)")
    out = {"n": n, "ttfts": _numbers(obj, "ttfts", path), "input_lens": _numbers(obj, "input_lens", path, whole=True),
           "output_lens": _numbers(obj, "output_lens", path, whole=True), "itls": _itls(obj, path)}
    if obj.get("start_times") is not None:
        out["start_times"] = _numbers(obj, "start_times", path, signed=True)
    for k in ("latencies", "queue_times"):
        if obj.get(k) is not None:
            out[k] = _numbers(obj, k, path)
    errs = obj.get("errors")
    if errs is not None:
        for i, e in enumerate(errs):
            if e is not None and not isinstance(e, str):
                raise InputError(str(path), f"errors[{i}]", f"expected a string, got {type(e).__name__}")
        out["errors"] = ["" if e is None else e for e in errs]
    out["setup"] = _setup(obj, path)
    return out


def _list(obj, key, path) -> int:
    v = obj[key]
    if not isinstance(v, list):
        raise InputError(str(path), key, f"expected a list (one entry per request), got {type(v).__name__}")
    return len(v)


def _num(v, where, path, whole=False, signed=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(str(path), where, f"not a number: {one_line(json.dumps(v), 40)}")
    if not math.isfinite(v):
        raise InputError(str(path), where, f"not a finite number: {v}")
    if v < 0 and not signed:
        raise InputError(str(path), where, f"negative: {v}")
    if whole and v != int(v):
        raise InputError(str(path), where, f"not a whole number of tokens: {v}")
    cap = MAX_TOKENS if whole else MAX_CLOCK_S if signed else MAX_TIME_S
    if abs(v) > cap:
        raise InputError(str(path), where, f"{v:g} is over {cap:g} ({'tokens in one request' if whole else 'seconds'})")
    return float(v)


def _numbers(obj, key, path, whole=False, signed=False) -> np.ndarray:
    return np.array([_num(v, f"{key}[{i}]", path, whole, signed) for i, v in enumerate(obj[key])], dtype=float)


def _itls(obj, path) -> list:
    out = []
    for i, g in enumerate(obj["itls"]):
        if not isinstance(g, list):
            raise InputError(str(path), f"itls[{i}]", f"expected a list of gaps, got {type(g).__name__}")
        out.append(np.array([_num(v, f"itls[{i}][{j}]", path) for j, v in enumerate(g)], dtype=float))
    return out


def _setup(obj, path) -> dict:
    def num_or_inf(key, default):
        v = obj.get(key, default)
        if v is None:
            return default
        if isinstance(v, str) and v.strip().lower() in ("inf", "infinity"):
            return math.inf
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
            raise InputError(str(path), key, f"expected a number > 0 or \"inf\", got {one_line(json.dumps(v), 40)}")
        return float(v)
    mc = obj.get("max_concurrency")
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise InputError(str(path), "max_concurrency", f"expected a whole number >= 1 or null, got {one_line(json.dumps(mc), 40)}")
    s = {"request_rate": num_or_inf("request_rate", math.inf), "burstiness": num_or_inf("burstiness", 1.0),
         "max_concurrency": mc, "ramp_up_strategy": obj.get("ramp_up_strategy")}
    for k in ("date", "backend", "endpoint_type", "label", "model_id", "tokenizer_id", "num_prompts", "duration",
              "ramp_up_start_rps", "ramp_up_end_rps"):
        v = obj.get(k)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            s[k] = one_line(v, 200) if isinstance(v, str) else v
    return s


# ------------------------------------------------------------------ per-request facts
def _outcome(err: str) -> tuple[str, str]:
    """vLLM's error text -> (outcome, one-line error): a traceback names the exception in its last line."""
    if not err:
        return "ok", ""
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [err]
    msg = one_line(last[0], 200)
    if "Traceback" not in err:
        return ("stream_error" if "Never received a valid chunk" in err else "http_error"), msg
    return ("timeout" if "Timeout" in msg else "connection_error"), msg


def _send_times(r: dict, file: str, e2e: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(scheduled, sent) on the run clock (0 = the first scheduled send) and how they were obtained."""
    s = r["setup"]
    if "start_times" in r:
        sent = r["start_times"]
        sched = sent - r.get("queue_times", np.zeros_like(sent))
        origin = float(sched.min())
        return sched - origin, sent - origin, "measured (start_times)"
    if math.isfinite(s["request_rate"]) or s["ramp_up_strategy"]:
        raise InputError(file, "start_times", "missing (vLLM bench serve writes them since PR #32667, January 2026): "
                         f"this run's sends followed request_rate {s['request_rate']:g} with random gaps the file does "
                         "not record, so its request stream cannot be recovered for replay or calibration; re-run with "
                         "a newer vLLM, or with --request-rate inf --max-concurrency C (sends follow from the latencies)")
    c = s["max_concurrency"] or r["n"]
    lat = r.get("latencies", e2e)
    sent = np.zeros(r["n"])
    inflight: list[float] = []
    for i in range(r["n"]):  # asyncio.Semaphore wakes waiters in order: request i takes the first slot freed
        t = heapq.heappop(inflight) if len(inflight) >= c else 0.0
        sent[i] = t
        heapq.heappush(inflight, t + float(lat[i]))
    how = ("reconstructed: no start_times; request_rate inf, all sent at once" if c >= r["n"] else
           f"reconstructed: no start_times; request_rate inf with max_concurrency {c}: each send when the first of "
           "the requests in flight ended (vLLM's client semaphore)")
    return sent.copy(), sent, how


def _tokens_per_chunk(gaps: np.ndarray, total: int) -> np.ndarray:
    """One token per chunk; tokens counted beyond the chunks go to the chunks after the longest gaps (a
    chunk carries several tokens when the server's output of more than one engine step was sent at once,
    so it came late): in the vLLM runs of tests/data/real 55 % of the multi-token chunks follow the longest
    gaps of their request, 1.7 % are the last chunk. Gaps and E2E do not depend on this; only which steps
    `sim calibrate` sees as merged does."""
    n = np.ones(gaps.size + 1, dtype=np.int32)
    extra = total - n.size
    if extra <= 0:
        return n
    if not gaps.size:
        n[0] += extra
        return n
    each, rest = divmod(extra, gaps.size)
    n[1:] += each
    n[1 + np.argsort(-gaps, kind="stable")[:rest]] += 1
    return n


# ------------------------------------------------------------------ the run folder
def scenario_dict(name: str, r: dict, span: float) -> dict:
    s, n = r["setup"], r["n"]
    rate, b = s["request_rate"], s["burstiness"]
    if not math.isfinite(rate):
        if s["ramp_up_strategy"] and s.get("ramp_up_end_rps"):
            lo, hi = float(s.get("ramp_up_start_rps") or 0.0), float(s["ramp_up_end_rps"])
            arrival = {"type": "piecewise", "points": [[0.0, lo], [max(span, 1e-3), hi]]}
        elif s["max_concurrency"] and s["max_concurrency"] < n:
            arrival = {"type": "closed_loop", "users": int(s["max_concurrency"]), "think_time_s": 0.0, "think": "fixed"}
        else:
            arrival = {"type": "constant", "rate": round(n / max(span, 1e-3), 6)}
    elif b == 1.0:
        arrival = {"type": "poisson", "rate": rate}
    elif not math.isfinite(b):
        arrival = {"type": "constant", "rate": rate}
    else:  # vLLM's gamma gaps: shape = burstiness, so cv = 1 / sqrt(burstiness)
        arrival = {"type": "gamma", "rate": rate, "cv": min(1e3, max(1e-3, 1.0 / math.sqrt(b)))}
    p, o = r["input_lens"], r["output_lens"]
    return {"name": name, "description": f"imported from vLLM bench serve ({s.get('date', 'undated')}, "
                                         f"model {s.get('model_id', '?')}): replay it, do not rerun it",
            "seed": 0, "num_requests": n, "duration_s": max(round(span, 3), 1e-3), "warmup_s": 0.0,
            # the gateway caps max_tokens at max_max_tokens: never below what the server generated
            "tenants": {"models": [{"name": "default", "max_max_tokens": int(max(4096, o.max()))}]},
            "workload": {"classes": [{
                "name": CLASS, "arrival": arrival, "stream": True, "timeout_s": CLIENT_TIMEOUT_S,
                "prompt_tokens": {"type": "lognormal", "mean": max(1.0, float(p.mean())), "min": 1,
                                  "max": int(max(1, p.max()))},
                "output_tokens": {"type": "lognormal", "mean": max(1.0, float(o.mean())), "min": 1,
                                  "max": int(max(1, o.max()))}}]}}


def _fmt(x) -> object:
    return "" if x is None else repr(round(float(x), 9))


def build(path: str | Path, kind: str = "vllm") -> dict:
    """Everything the run folder holds, from the checked file: rows, client rows, token arrivals, scenario, server."""
    path = Path(path)
    r = read_result(path)
    n, ttft, itls = r["n"], r["ttfts"], r["itls"]
    errors = r.get("errors") or ["" if t > 0 else "Never received a valid chunk (ttfts 0.0; the file has no errors list)"
                                 for t in ttft]
    outcomes = [_outcome(e) for e in errors]
    ok = np.array([o == "ok" for o, _ in outcomes])
    e2e = ttft + np.array([g.sum() for g in itls])
    chunks = np.array([len(g) + 1 for g in itls])
    out_tok = np.where(ok & (r["output_lens"] < 1), chunks, r["output_lens"]).astype(np.int64)
    sched, sent, how = _send_times(r, str(path), e2e)
    horizon = Limits().horizon_s  # what a scenario may span (and the report's 1 s bins are bounded by)
    if float(np.max(sent + e2e)) > horizon:
        raise InputError(str(path), "start_times" if "start_times" in r else "ttfts",
                         f"the run spans {float(np.max(sent + e2e)):,.0f} s, over the {horizon:,.0f} s a scenario may "
                         "(limits.horizon_s)")
    rows, client, tok_rid, tok_t, tok_n, gaps = [], [], [], [], [], []
    for i in range(n):
        outcome, err = outcomes[i]
        streamed = ttft[i] > 0 or len(itls[i]) > 0
        ttft_s = e2e_s = tpot = itl_max = None
        if outcome == "ok":
            ttft_s, e2e_s = ttft[i], e2e[i]
            if out_tok[i] > 1:
                tpot = (e2e_s - ttft_s) / (out_tok[i] - 1)
                itl_max = float(itls[i].max()) if len(itls[i]) else 0.0
            extra = int(max(0, out_tok[i] - chunks[i]))
            gaps.append(itls[i])
            if extra:
                gaps.append(np.zeros(extra))
        if streamed:
            times = sent[i] + ttft[i] + np.r_[0.0, np.cumsum(itls[i])]
            nt = _tokens_per_chunk(itls[i], int(out_tok[i]) if outcome == "ok" else times.size)
            tok_rid.append(np.full(times.size, i, dtype=np.int64))
            tok_t.append(times)
            tok_n.append(nt)
        end = sent[i] + e2e_s if e2e_s is not None else None
        mx = int(out_tok[i]) if outcome == "ok" else ""
        rows.append([i, CLASS, "default", "default", "default", "standard", 1, 1, _fmt(sched[i]), _fmt(sent[i]), outcome,
                     err, "", int(r["input_lens"][i]), mx, mx, int(out_tok[i]) if outcome == "ok" else 0,
                     "", _fmt(ttft_s), _fmt(tpot), _fmt(tpot), _fmt(itl_max), _fmt(e2e_s), _fmt(end), -1, 0, 0, 0,
                     200 if outcome in ("ok", "stream_error") else "", 0.0])
        client.append([i, -1, "", int(r["output_lens"][i]) if outcome == "ok" else "", "",
                       int(chunks[i]) if streamed else 0])
    s = r["setup"]
    span = float(np.nanmax(np.where(ok, sent + e2e, sent))) if n else 0.0
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "vllm-bench"
    facts = {k: s[k] for k in ("model_id", "backend") if k in s}
    server = {"kind": kind, "source": "vllm-bench", "source_file": str(path.resolve()), "send_times": how,
              "facts": facts, "bench": {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf")
                                        for k, v in s.items()}, "samples": []}
    tokens = (np.concatenate(tok_rid), np.concatenate(tok_t), np.concatenate(tok_n)) if tok_rid else \
        (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int32))
    return {"rows": rows, "client": client, "tokens": tokens, "gaps": np.concatenate(gaps) if gaps else np.zeros(0),
            "scenario": scenario_dict(name, r, span), "server": server, "name": name, "n": n, "ok": int(ok.sum())}


def write_run_folder(path: str | Path, out: str | Path, kind: str = "vllm", plots: bool = True) -> dict:
    """Convert FILE into the run folder OUT (requests.csv, client.csv, tokens.parquet, server.json,
    scenario.yaml, summary.json, report.md). Returns what was built, less the bulky parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .metrics import summarize
    from .report import write_report
    from .runfolder import CLIENT_COLUMNS, TOKEN_DTYPE
    from .scenario import scenario_from_dict
    b = build(path, kind)
    out = Path(out)
    sc = scenario_from_dict(b["scenario"], f"{path} (as scenario)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "client.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CLIENT_COLUMNS)
        w.writerows(b["client"])
    rid, t, n = b["tokens"]
    pq.write_table(pa.table({"request_id": rid, "t_s": t, "n_tokens": n},
                            schema=pa.schema([(k, pa.from_numpy_dtype(TOKEN_DTYPE[k])) for k in TOKEN_DTYPE.names])),
                   out / "tokens.parquet", compression="zstd")
    (out / "server.json").write_text(json.dumps(b["server"], indent=1, sort_keys=True) + "\n")
    gaps = b["gaps"]
    extra = {"imported": {"source": "vllm-bench", "file": b["server"]["source_file"], "send_times": b["server"]["send_times"]}}
    write_report(out, sc, b["rows"], lambda df: summarize(df, sc, (gaps, np.ones(gaps.size)), None, "vllm-bench", extra),
                 plots, title="vllm bench serve (imported)")
    return {k: b[k] for k in ("name", "n", "ok")} | {"send_times": b["server"]["send_times"]}


_TEMP: list[str] = []


def as_run_folder(path: str | Path) -> Path:
    """FILE converted into a temporary run folder named after it (removed when the process ends)."""
    base = tempfile.mkdtemp(prefix="servesim-vllm-bench-")
    if not _TEMP:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMP])
    _TEMP.append(base)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-._") or "vllm-bench"
    folder = Path(base) / stem
    write_run_folder(path, folder, plots=False)
    return folder
