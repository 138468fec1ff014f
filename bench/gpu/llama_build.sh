#!/bin/bash
# Device: unpack llama.cpp's source, build a CUDA llama-server (sm_90, ~5.5 min) and the random GGUF, in the
# background; llama_up.sh waits for both.
mkdir -p /tmp/lc && cat .whl/llamacpp.tgz.part-* /tmp/parts/llamacpp.tgz.part-* 2>/dev/null | tar xz -C /tmp/lc || exit 1
R=$PWD
(cd /tmp/lc && setsid nohup bash -c "cmake -S vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server -j16 && echo BUILD-OK" > /tmp/build.log 2>&1 < /dev/null &)
(cd /tmp && PYTHONPATH=/tmp/lc/vendor/llama.cpp/gguf-py setsid nohup python3 "$R/bench/gpu/make_random_gguf.py" /tmp/m8b.gguf \
  --embd 4096 --layers 32 --heads 32 --kv-heads 8 --ff 14336 --ctx 8192 --extra-vocab 128000 --f16 > /tmp/gguf.log 2>&1 < /dev/null &)
sleep 2; tail -2 /tmp/build.log
