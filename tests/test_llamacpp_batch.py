"""How llama.cpp cuts a batch into forward passes (simulator/engines/llamacpp_batch.py), and what that
explains in the measured H200 llama-server steps (tests/data/real/llamacpp-h200-llama3-8b-f16)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.engines.llamacpp_batch import pass_shape, passes

REAL = Path(__file__).parent / "data" / "real" / "llamacpp-h200-llama3-8b-f16"


@pytest.mark.parametrize("dec,pre,n", [
    ([0, 1, 2, 3], [], 1),            # consecutive slots: one ubatch
    ([0, 1, 2, 5, 7], [], 3),         # {0,1,2} {5} {7}
    ([15], [], 1),
    ([3], [(4, 2048)], 1),            # the prompt's slot follows: one ubatch carries the decode
    ([5], [(4, 100)], 1),             # the prompt's slot precedes: its tokens come after every decode token
    ([2, 7], [(0, 300), (3, 50)], 2),  # {2,3} then {7}; prompt-only ubatches are not decode passes
])
def test_split_kv_streams(dec, pre, n):
    assert passes(dec, pre, 512, unified=False) == n


def test_unified_kv_is_one_pass_for_decodes():
    assert passes([0, 2, 4, 6, 8], [], 512, unified=True) == 1
    assert passes([0, 2], [(5, 3000)], 512, unified=True) == 1


def test_pass_count_explains_measured_steps():
    """Held-out llama-server steps (never calibrated on): decode-only steps of one batch size take longer
    the more forward passes their busy slots need (measured: ~8 ms per extra pass), and the profile, which
    prices each extra pass, predicts them better than the same profile without that price."""
    import pandas as pd
    from simulator.costmodel import load_profile
    from simulator.fitting import evaluate
    from simulator.runfolder import load_run_folder
    from simulator.tracefit import reconstruct
    dec = []
    for run in ("heldout_poisson_r1.5", "heldout_poisson_r2.5", "heldout_poisson_r4"):
        st = reconstruct(load_run_folder(REAL / "heldout" / run), 2048, ubatch=(512, False)).steps
        dec.append(st[(st.prefill_tokens == 0) & (st.save_tokens == 0)])
    dec = pd.concat(dec, ignore_index=True)
    g = dec.groupby(["n_decode", "extra_passes"]).time_s.agg(["count", "median"])
    g = g[g["count"] >= 10].reset_index()
    compared = 0
    for n, grp in g.groupby("n_decode"):
        if len(grp) >= 2:
            compared += 1
            m = grp.sort_values("extra_passes")["median"].to_numpy()
            assert (np.diff(m) > 0).all(), grp  # more passes, longer steps
    assert compared >= 4, g
    prof = load_profile(str(REAL / "profile.yaml"))
    with_pass = np.median(np.abs(evaluate(prof, dec)["error_pct"]))
    without = np.median(np.abs(evaluate(prof, dec.assign(extra_passes=0))["error_pct"]))
    assert with_pass < 15 and with_pass < 0.5 * without, (with_pass, without)


@pytest.mark.parametrize("dec,pre,unified,shape", [
    ([0], [], False, (1, 0)),                 # one token: a CUDA graph
    ([0, 1, 2, 3], [], False, (1, 1)),
    ([0, 2], [], False, (2, 0)),              # two one-token passes, both graphs
    ([0, 1, 5], [], False, (2, 1)),           # {0,1} launched kernel by kernel, {5} a graph
    ([3], [(4, 2048)], False, (1, 1)),        # the decode shares its pass with prompt tokens
    ([0], [], True, (1, 0)),
    ([0], [(3, 100)], True, (1, 1)),
    ([], [(3, 100)], True, (1, 0)),           # prompt only: no decode pass
])
def test_passes_of_more_than_one_token(dec, pre, unified, shape):
    assert pass_shape(dec, pre, 512, unified) == shape


def test_a_pass_of_one_token_is_cheaper_than_its_share_of_a_larger_one():
    """What batched_pass_s prices, in the measured steps (probe and held-out runs alike): one slot decodes in
    ~5.3 ms (5.4 on the server before), two slots in one pass take longer than two one-token passes would take
    in their share; and the profile fitted with the term predicts decode steps better than with it held at 0."""
    import pandas as pd
    from simulator.costmodel import load_profile
    from simulator.fitting import evaluate
    from simulator.runfolder import load_run_folder
    from simulator.tracefit import reconstruct
    dec = []
    for run in ("heldout_poisson_r1.5", "heldout_poisson_r2.5", "heldout_poisson_r4"):
        st = reconstruct(load_run_folder(REAL / "heldout" / run), 2048, ubatch=(512, False)).steps
        dec.append(st[(st.prefill_tokens == 0) & (st.save_tokens == 0)])
    dec = pd.concat(dec, ignore_index=True)
    sweep = []
    for run in ("probe_decode_c4_p256", "probe_decode_c4_p2048", "probe_decode_c8_p256", "probe_decode_c8_p2048",
                "probe_poisson_r1", "probe_poisson_r2", "probe_poisson_r3"):
        st = reconstruct(load_run_folder(REAL / "probe" / run), 2048, ubatch=(512, False)).steps
        sweep.append(st[(st.prefill_tokens == 0) & (st.save_tokens == 0)])
    sweep = pd.concat(sweep, ignore_index=True)
    one = sweep[(sweep.n_decode == 1)].time_s.median()
    two_one_pass = sweep[(sweep.n_decode == 2) & (sweep.extra_passes == 0)].time_s.median()
    four = sweep[sweep.n_decode == 4].groupby("extra_passes").time_s.median()
    # 4 slots: each extra pass costs less than the one before (the first pass of >1 token after the first
    # loses the most; measured 6.5 / 5.4 / 2.6 ms on the 2026-12-02 18:09 server, 2x and more on the one before)
    inc = np.diff(four.loc[[0, 1, 2, 3]].to_numpy())
    assert inc[0] > inc[1] > inc[2] > 0, four
    assert two_one_pass > 1.4 * one, (one, two_one_pass)
    prof = load_profile(str(REAL / "profile.yaml"))
    assert prof.batched_pass_s > 0
    with_term = np.median(np.abs(evaluate(prof, dec)["error_pct"]))
    without = np.median(np.abs(evaluate(prof, dec.assign(batched_passes=0))["error_pct"]))
    assert with_term < 8 and with_term < 0.5 * without, (with_term, without)
