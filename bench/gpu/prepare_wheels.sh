#!/bin/bash
# On the CPU machine: vLLM 0.26.0's wheels for the GPU machine (Python 3.12, its own torch 2.11.0), as 44 MiB
# parts in .whl/ (ignored), plus the project's needs its image lacks (.whl/extra). ~410 MiB, 10 parts.
#   bash bench/gpu/prepare_wheels.sh          (PY312=/path/to/python3.12 if python3.12 is not on PATH)
set -euo pipefail
PY=${PY312:-python3.12}  # pip judges environment markers by its own Python: it must be 3.12
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=/tmp/vllm_wheels312
python3 "$ROOT/bench/gpu/make_dummy_wheels.py" /tmp/dummy 2.11.0 2.11.0 0.26.0
PLAT=""
for n in 31 29 28 27 26 25 24 23 22 21 20 19 18 17; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
$PY -m pip download vllm==0.26.0 --python-version 3.12 $PLAT --platform manylinux2014_x86_64 \
    --platform linux_x86_64 --only-binary=:all: --find-links /tmp/dummy -d $W
# what the GPU image already has (.library/device/KINDS.md) or vLLM serves this model without
cd $W
rm -f torch-*dummy* torchaudio-*dummy* torchvision-*dummy* triton-* transformers-* aiohttp-* prometheus_client-* \
      tokenspeed_triton-* nvidia_cutlass_dsl* nvidia_nvvm-* nvidia_cuda_nvrtc-* nvidia_cuda_nvcc-* \
      nvidia_cuda_nvdisasm-* nvidia_cuda_cccl-* nvidia_cuda_runtime-* nvidia_cuda_crt-* tilelang-* \
      [Pp]y[Nn]v[Vv]ideo[Cc]odec-* z3_solver-* torchcodec-* opencv_python_headless-* llvmlite-* numba-* \
      hf_xet-* grpcio-* pillow-* uvloop-* huggingface_hub-*
# huggingface_hub: the image's transformers wants <2.0 and has its own (1.33); pip resolves 2.x since 2026-12
cd /tmp && tar cf vllm.tar vllm_wheels312
mkdir -p "$ROOT/.whl/extra" && rm -f "$ROOT"/.whl/vllm.tar.part-*
split -b 44m vllm.tar "$ROOT/.whl/vllm.tar.part-"
$PY -m pip download simpy orjson --no-deps --python-version 3.12 $PLAT --platform manylinux2014_x86_64 \
    --only-binary=:all: -d "$ROOT/.whl/extra"
grep -qx ".whl/" "$ROOT/.git/info/exclude" || echo ".whl/" >> "$ROOT/.git/info/exclude"
ls -la "$ROOT/.whl" "$ROOT/.whl/extra"
