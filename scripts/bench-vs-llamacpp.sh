#!/usr/bin/env bash
# Side-by-side speed of gemma3 and llama.cpp on the same GGUF, threads and
# prompt, run alternately so that drift on a shared machine hits both.
#
#   scripts/bench-vs-llamacpp.sh [-p 512] [-n 128] [-t 1,2] [-r 5] [-d 0] [-m MODEL]
#
# llama.cpp comes from the llama-cpp-python package (PyPI), built from source
# into .venv-llamacpp on first use (about 6 minutes on 2 cores). Its AMX
# kernels crash on this machine, so AMX is disabled in its build flags.
#
# With GEMMA3_KERNELS=avx2 (gemma3 on its AVX2 table, as on a CPU without
# AVX-512), llama.cpp is built for AVX2 alone, into .venv-llamacpp-avx2.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${GEMMA3_KERNELS:-}" == avx2 ]]; then
  VENV=${LLAMACPP_VENV:-.venv-llamacpp-avx2}
  FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  VENV=${LLAMACPP_VENV:-.venv-llamacpp}
  FLAGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 into $VENV (once)…" >&2
  python3 -m venv "$VENV"
  CMAKE_ARGS="$FLAGS" "$VENV/bin/pip" install --quiet --no-cache-dir llama-cpp-python==0.3.36
fi
cargo build --release --quiet -p gemma3-cli
exec "$VENV/bin/python" scripts/bench_vs_llamacpp.py --gemma3 target/release/gemma3 "$@"
