#!/bin/bash
# Device: wait for llama_build.sh, start llama-server on 127.0.0.1:8001 (16 slots of 8,192 tokens).
# EXTRA="--kv-unified" for the one-KV-buffer variant.
for i in $(seq 1 540); do grep -q BUILD-OK /tmp/build.log && break; grep -q "Error" /tmp/build.log && break; sleep 1; done
tail -3 /tmp/build.log; cat /tmp/gguf.log
pkill -f llama-server; sleep 1
(setsid nohup /tmp/lc/build/bin/llama-server -m /tmp/m8b.gguf -ngl 99 -c 131072 --parallel 16 -fa on --metrics \
  --host 127.0.0.1 --port 8001 --no-webui $EXTRA > /tmp/llamacpp.log 2>&1 < /dev/null &)
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8001/health >/dev/null && { echo "ready after $i s"; break; }; sleep 1; done
grep -iE "n_ctx|slots|CUDA|error" /tmp/llamacpp.log | head -10
