#!/usr/bin/env bash
# Stage in .device/ (git-ignored, under the 64 MiB a lent machine takes per
# command) what scripts/device/run.sh needs there: the gemma3 binary, the
# kernel test and benchmark executables, llama.cpp's libraries with a small C
# driver (scripts/device/llama_mini_bench.c), and a stand-in model that
# compresses to 17 MB (scripts/device/tiled_model.py). Lent machines have no
# Rust, no Python packages and cannot reach the network.
#
#   scripts/device/stage.sh      then, through the device tool:
#   run(command="scripts/device/run.sh", carry=[".device"])
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.device
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
MODEL=${GEMMA3_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma3/gemma-3-270m-q4_k_m.gguf}
SITE=$(echo "$VENV"/lib/python3*/site-packages)
[ -f "$SITE/include/llama.h" ] || { echo "no llama.cpp in $VENV: run scripts/bench-vs-llamacpp.sh once" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT/bin" "$OUT/tests" "$OUT/lib"

cargo build --release --quiet -p gemma3-cli
strip -o "$OUT/bin/gemma3" target/release/gemma3
executables() {  # the executables a cargo command builds, from its JSON messages
  "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
}
executables cargo test --release -p gemma3-kernels --no-run | while read -r name exe; do
  strip -o "$OUT/tests/$name" "$exe"
done
# The whole forward pass, scalar against the fastest table, bit for bit (run on the stand-in).
executables cargo test --release -p gemma3-cli --test scalar_twin --no-run | while read -r name exe; do
  if [ "$name" = scalar_twin ]; then strip -o "$OUT/tests/$name" "$exe"; fi
done
executables cargo bench -p gemma3-kernels --no-run | while read -r name exe; do
  if [ "$name" = matmul ]; then strip -o "$OUT/bin/kernel-bench" "$exe"; fi
done

cp -L "$SITE"/llama_cpp/lib/lib{llama,ggml,ggml-base,ggml-cpu}.so.0 "$OUT/lib/"
cp -L "$(ldconfig -p | awk '/libgomp.so.1 /{print $NF; exit}')" "$OUT/lib/"
gcc -O2 -Wall -o "$OUT/bin/llama_mini_bench" scripts/device/llama_mini_bench.c \
  -I "$SITE/include" -L "$OUT/lib" -l:libllama.so.0 -Wl,-rpath,'$ORIGIN/../lib'

python3 scripts/device/tiled_model.py "$MODEL" "$OUT/tiled.gguf.xz"
du -sh "$OUT"
