"""Engine presets: a real server's defaults, by the version they mirror (`engine: {preset: NAME}` in a
scenario; fields the scenario sets win).

- `vllm-0.26`: vLLM 0.26.0's OpenAI API server on a GPU of 70 GiB or more other than an A100 (H100, H200,
  MI300X): max_num_seqs 1024, max_num_batched_tokens 8192 (vllm/engine/arg_utils.py
  _set_default_max_num_seqs_and_batched_tokens_args, UsageContext.OPENAI_API_SERVER); chunked prefill and
  prefix caching on, KV blocks of 16 tokens, gpu_memory_utilization 0.9 (the V1 engine's defaults, as its
  start-up log prints them: "Chunked prefill is enabled with max_num_batched_tokens=8192"); async scheduling
  on (vllm/config/vllm.py turns it on unless a feature in use cannot run with it; the engine core's batch
  queue of two, vllm/v1/engine/core.py step_with_batch_queue).
- `vllm-0.26-small-gpu`: the same server on smaller GPUs or an A100: max_num_seqs 256, max_num_batched_tokens
  2048 (same function).
- `llama-server`: llama.cpp's server (the tree vendored in llama-cpp-python 0.3.36): n_batch 2048 and n_ubatch
  512 as common/common.h sets them; `--parallel` auto means 4 slots sharing one
  unified KV buffer (tools/server/server.cpp: "n_parallel is set to auto, using n_parallel = 4 and
  kv_unified = true"), while an explicit slot count keeps one KV stream per slot (common.h kv_unified =
  false): a scenario that sets `n_parallel` gets kv_unified false unless it says otherwise. Idle slots are
  saved to the host prompt cache at each launch (common.h cache_idle_slots = true, cache_ram_mib 8192).
"""
from __future__ import annotations

PRESETS = {
    "vllm-0.26": {"type": "continuous", "max_num_seqs": 1024, "max_num_batched_tokens": 8192,
                  "chunked_prefill": True, "prefix_caching": True, "block_size": 16, "gpu_memory_utilization": 0.9,
                  "async_scheduling": True},
    "vllm-0.26-small-gpu": {"type": "continuous", "max_num_seqs": 256, "max_num_batched_tokens": 2048,
                            "chunked_prefill": True, "prefix_caching": True, "block_size": 16,
                            "gpu_memory_utilization": 0.9, "async_scheduling": True},
    "llama-server": {"type": "llamacpp", "n_batch": 2048, "n_ubatch": 512, "cache_idle_slots": True},
}


def apply_preset(d):
    """The engine mapping with its preset's values under the ones it sets itself."""
    if not isinstance(d, dict) or d.get("preset") is None:
        return d
    name = d["preset"]
    if name not in PRESETS:
        return d  # the field's Literal type names the known ones in its error
    out = dict(PRESETS[name])
    if name == "llama-server":
        explicit = "n_parallel" in d
        out.update({"n_parallel": 4, "kv_unified": not explicit})
    out.update(d)
    return out
