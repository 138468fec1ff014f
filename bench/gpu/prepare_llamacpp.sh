#!/bin/bash
# On the CPU machine: llama.cpp's source as llama-cpp-python 0.3.36 vendors it, as 44 MiB parts in .whl/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
python3 -m pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d /tmp/lcp
tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp
tar czf /tmp/llamacpp.tgz -C /tmp/llama_cpp_python-0.3.36 vendor/llama.cpp
mkdir -p "$ROOT/.whl" && rm -f "$ROOT"/.whl/llamacpp.tgz.part-*
split -b 44m /tmp/llamacpp.tgz "$ROOT/.whl/llamacpp.tgz.part-"
grep -qx ".whl/" "$ROOT/.git/info/exclude" || echo ".whl/" >> "$ROOT/.git/info/exclude"
ls -la "$ROOT/.whl"
