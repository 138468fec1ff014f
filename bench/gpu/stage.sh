#!/bin/bash
# Device: keep one carried part in /tmp/parts (the machine stays warm 30 s between calls: send them back to
# back). The first call (PART=vllm.tar.part-aa) also installs .whl/extra and starts building the random model.
PART=$1
mkdir -p /tmp/parts && cp ".whl/$PART" /tmp/parts/ && ls -la /tmp/parts | tail -3
if [ "$PART" = vllm.tar.part-aa ]; then
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/extra/*.whl || exit 1
  R=$PWD; (cd /tmp && setsid nohup python3 "$R/bench/gpu/make_random_hf_llama.py" /tmp/m 8b > /tmp/mk.log 2>&1 < /dev/null &)
fi
tail -2 /tmp/mk.log 2>/dev/null; true
