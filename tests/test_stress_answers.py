"""What `stress run` keeps from real servers' answers: per-chunk token times (tokens.parquet), the server's
facts (server.json), its own token counts (client.csv), and answers that are wrong or merely different —
extension fields refused, streams without [DONE], merged chunks, malformed or absurd usage, endless lines."""
from __future__ import annotations

import numpy as np
import pytest

from simulator.records import read_csv
from simulator.runfolder import TOKEN_DTYPE, read_client, read_server, read_tokens, token_part
from simulator.scenario import scenario_from_dict
from stress_tester.run import run_stress
from stress_tester.runner import Options

import faulty_server


def small(n=6, api_stream=True):
    return {"name": "answers", "seed": 9, "num_requests": n,
            "workload": {"classes": [
                {"name": "chat", "arrival": {"type": "constant", "rate": 50}, "timeout_s": 5, "stream": api_stream,
                 "prompt_tokens": {"type": "fixed", "value": 12}, "output_tokens": {"type": "uniform", "low": 4, "high": 12}}]}}


def stress(url, out, n=6, stream=True, **kw):
    sc = scenario_from_dict(small(n, stream))
    return run_stress(sc, Options(base_url=url, grace=1.0, **kw), out, plots=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def server():
    with faulty_server.running() as url:
        yield url


def test_tokens_file_holds_every_chunk(server, tmp_path):
    s = stress(f"{server}/slow", tmp_path)
    df = read_csv(tmp_path / "requests.csv")
    tok = read_tokens(tmp_path)
    assert s["requests"]["outcomes"] == {"ok": 6}
    assert not list(tmp_path.glob("tokens-*.bin"))  # merged into tokens.parquet
    per = tok.groupby("request_id").agg(n=("n_tokens", "sum"), first=("t_s", "min"), last=("t_s", "max"))
    per = per.join(df.set_index("request_id"))
    assert (per.n == per.output_tokens).all()
    # the same clock as requests.csv: first chunk = send + TTFT, last = send + E2E
    assert np.allclose(per["first"], per.arrival_s + per.ttft_s, atol=1e-6)
    assert np.allclose(per["last"], per.arrival_s + per.e2e_s, atol=1e-6)
    c = read_client(tmp_path)
    assert (c.output_tokens_server.to_numpy() == df.output_tokens.to_numpy()).all()
    assert (c.chunks == df.output_tokens).all() and (c.finish_reason == "length").all()


def test_whole_answers_are_one_row_each(server, tmp_path):
    stress(f"{server}/ok", tmp_path, stream=False)
    tok, df = read_tokens(tmp_path), read_csv(tmp_path / "requests.csv")
    assert len(tok) == len(df) == 6 and (tok.n_tokens.to_numpy() == df.output_tokens.to_numpy()).all()


def test_token_parts_survive_a_crash(tmp_path):
    """A part file cut mid-record (a kill during a write) still reads, minus the torn record."""
    rec = np.zeros(3, dtype=TOKEN_DTYPE)
    rec["request_id"], rec["t_s"], rec["n_tokens"] = [1, 1, 2], [0.5, 0.6, 0.7], [1, 2, 1]
    token_part(tmp_path, 0).write_bytes(rec.tobytes() + rec.tobytes()[:7])
    tok = read_tokens(tmp_path)
    assert tok.n_tokens.tolist() == [1, 2, 1] and tok.t_s.tolist() == [0.5, 0.6, 0.7]


def test_vllm_facts_and_merged_chunks(server, tmp_path):
    """vLLM is recognised from /metrics; its cache config lands in server.json; chunks of 3 tokens are
    counted exactly through per-chunk usage, and ITL gets the gap once and two zero gaps per chunk."""
    s = stress(f"{server}/vllm", tmp_path)
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"ok": 6}, df.error.tolist()
    srv = read_server(tmp_path)
    assert srv["kind"] == "vllm"
    assert srv["facts"]["block_size"] == 16 and srv["facts"]["num_gpu_blocks"] == 27000
    assert srv["facts"]["max_model_len"] == 8192
    assert srv["samples"] and srv["samples"][0]["running"] == 2 and srv["samples"][0]["waiting"] == 1
    assert s["stress"]["server"]["kind"] == "vllm"
    tok = read_tokens(tmp_path)
    assert tok.groupby("request_id").n_tokens.sum().tolist() == df.output_tokens.tolist()
    assert (df.output_tokens == df.applied_max_tokens).all() and tok.n_tokens.max() == 3
    assert s["stress"]["usage_differs_from_chunks"] == 0
    assert s["latency"]["itl"]["count"] == int((df.output_tokens - 1).sum())


def test_refused_extensions_fall_back_once(server, tmp_path):
    """transformers serve: 422 on ignore_eos/min_tokens, then streams that end without [DONE]."""
    s = stress(f"{server}/strict", tmp_path)
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"ok": 6}, df.error.tolist()
    notes = s["stress"]["notes"]
    assert len(notes) == 1 and "ignore_eos" in notes[0] and "422" in notes[0]
    # the server stopped at half the length (its end-of-sequence): counted, not an error
    assert (df.output_tokens == df.applied_max_tokens // 2).all()
    assert s["stress"]["output_length_differs"] == 6
    assert "refused" in (tmp_path / "report.md").read_text()


def test_no_done_without_finish_is_still_an_error(server, tmp_path):
    s = stress(f"{server}/short", tmp_path)
    assert s["requests"]["outcomes"] == {"stream_error": 6}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("mode,why", [("badusage", "malformed usage.completion_tokens"),
                                      ("absurd", "99999 output tokens for max_tokens")])
def test_malformed_usage_is_a_recorded_error(server, tmp_path, mode, why, stream):
    s = stress(f"{server}/{mode}", tmp_path, stream=stream)
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"stream_error": 6}
    assert df.error.str.contains(why).all(), df.error.tolist()
    assert (tmp_path / "summary.json").exists() and (tmp_path / "report.md").exists()


def test_endless_line_is_cut_in_bounded_time(server, tmp_path):
    import time
    t = time.perf_counter()
    s = stress(f"{server}/longline", tmp_path, n=2)
    assert time.perf_counter() - t < 20
    df = read_csv(tmp_path / "requests.csv")
    assert s["requests"]["outcomes"] == {"stream_error": 2}
    assert df.error.str.contains("without a newline").all()
