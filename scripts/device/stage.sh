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
# As `gemma3`'s cache_dir: an empty variable, or a relative $XDG_CACHE_HOME, counts as unset.
XDG=${XDG_CACHE_HOME:-}
case "$XDG" in /*) ;; *) XDG=$HOME/.cache ;; esac
CACHE=${GEMMA3_CACHE:-$XDG/gemma3}
MODEL=${GEMMA3_MODEL:-$CACHE/gemma-3-270m-q4_k_m.gguf}
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
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "example" not in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])'
}
# Not ggml_budgets and f16_conversions: they check nothing a table chooses
# by CPU that the others miss. (Left out when the executables travelled
# uncompressed and the tree came within 65 KB of the 64 MiB; examples are
# left out too: they are benchmarks, not tests.)
executables cargo test --release -p gemma3-kernels --no-run | while read -r name exe; do
  case $name in ggml_budgets | f16_conversions) ;; *) strip -o "$OUT/tests/$name" "$exe" ;; esac
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

# The executables and libraries travel xz-compressed (about a quarter of their
# size): uncompressed, the kernel tests alone had grown to 32 MB and the
# whole to 76 MiB. run.sh unpacks them with Python's lzma.
find "$OUT/bin" "$OUT/tests" "$OUT/lib" -type f -print0 | xargs -0 xz -T0 -6

# The stand-in is cut with the `gguf` package, installed into the llama.cpp venv if missing.
"$VENV/bin/python" -c 'import gguf' 2>/dev/null || "$VENV/bin/python" -m pip install -q gguf
"$VENV/bin/python" scripts/device/tiled_model.py "$MODEL" "$OUT/tiled.gguf.xz"
# What travels: this folder and the working tree's files that git does not
# ignore (tracked or not), at most 64 MiB. (Every "total" line is summed, in
# case xargs splits the list; a tracked file deleted here counts nothing.)
tree=$({ git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null || true; } |
  awk '$2 == "total" { s += $1 } END { print s + 0 }')
total=$(( $(du -sb "$OUT" | cut -f1) + tree ))
echo "$OUT and the working tree: $((total >> 20)) MiB of the 64 a lent machine takes"
[ "$total" -lt $((64 << 20)) ] || { echo "too large to travel" >&2; exit 1; }
