#!/bin/bash
# Device: unpack the parts, install vLLM into /tmp/site, start its OpenAI server on 127.0.0.1:8000 (~2-4 min).
set -o pipefail
cat /tmp/mk.log
cat /tmp/parts/vllm.tar.part-* | tar x -C /tmp || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/vllm_wheels312/*.whl 2>&1 \
  | grep -v "^WARNING: Target" | tail -5
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
python3 -c "import vllm, simpy, orjson; print('vllm', vllm.__version__)" || exit 1
python3 -c "from transformers import AutoTokenizer as T; print(T.from_pretrained('/tmp/m')('r415987 the the')['input_ids'])" || exit 1
# --enable-prompt-tokens-details: each response says how many prompt tokens the prefix cache served
(cd /tmp && setsid nohup python3 -m vllm.entrypoints.openai.api_server --model /tmp/m --served-model-name m \
  --dtype bfloat16 --max-model-len 8192 --gpu-memory-utilization 0.90 --enable-prompt-tokens-details \
  --host 127.0.0.1 --port 8000 > /tmp/vllm.log 2>&1 < /dev/null &)
for i in $(seq 1 500); do
  curl -sf http://127.0.0.1:8000/health >/dev/null && { echo "ready after $i s"; break; }
  pgrep -f vllm.entrypoints >/dev/null || { echo "vLLM exited"; tail -20 /tmp/vllm.log; exit 1; }
  sleep 1
done
grep -iE "kv cache|GPU blocks|concurrency|max_num|error" /tmp/vllm.log | head -20
tail -3 /tmp/vllm.log
