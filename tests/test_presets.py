"""Engine presets (simulator/presets.py): a real server's defaults by version; the scenario's own fields win."""
from __future__ import annotations

import subprocess
import sys

from simulator.scenario import scenario_from_dict

BASE = {"name": "p", "seed": 1, "num_requests": 5,
        "workload": {"classes": [{"name": "c", "arrival": {"type": "poisson", "rate": 5}}]}}


def engine(**e):
    return scenario_from_dict({**BASE, "engine": e}).engine


def test_vllm_preset_and_overrides():
    e = engine(preset="vllm-0.26")
    assert (e.type, e.max_num_seqs, e.max_num_batched_tokens, e.prefix_caching) == ("continuous", 1024, 8192, True)
    assert engine(preset="vllm-0.26", max_num_seqs=64).max_num_seqs == 64
    small = engine(preset="vllm-0.26-small-gpu")
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (256, 2048)
    assert e.async_scheduling and small.async_scheduling and not engine(preset="vllm-0.26", async_scheduling=False).async_scheduling
    assert engine().max_num_seqs == 256 and engine().prefix_caching is False  # no preset: the schema defaults
    assert engine().async_scheduling is False


def test_llama_server_preset_follows_its_slot_rule():
    auto = engine(preset="llama-server")
    assert (auto.type, auto.n_parallel, auto.kv_unified, auto.n_ubatch) == ("llamacpp", 4, True, 512)
    explicit = engine(preset="llama-server", n_parallel=16)
    assert (explicit.n_parallel, explicit.kv_unified) == (16, False)
    assert engine(preset="llama-server", n_parallel=16, kv_unified=True).kv_unified is True


def test_unknown_preset_is_a_one_line_error(tmp_path):
    import yaml
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**BASE, "engine": {"preset": "vllm-9"}}))
    r = subprocess.run([sys.executable, "-m", "simulator.cli", "validate", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "engine.preset" in r.stderr and r.stderr.count("\n") == 1, r.stderr
