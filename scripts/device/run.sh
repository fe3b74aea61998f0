#!/usr/bin/env bash
# On a lent machine, from what scripts/device/stage.sh put in .device/: the
# kernel tests (bit-exact on that CPU's kernel tables, AMX tiles included
# where it has them) and the whole forward pass against the scalar kernels
# on the stand-in model, the packed kernels' rates at the layer shapes, and
# gemma3 (with and without AMX) against llama.cpp on the stand-in model;
# then gemma3's defaults against the settings no Intel CPU has been measured
# with (scripts/device/variants.py: AMX off, the pair kernels, the one-group
# ones, the one-token kernels' prefetch), within 5 minutes. VARIANTS=0 skips
# those; VARIANTS=only runs the tests and them alone.
#
#   scripts/device/run.sh [THREADS (1,2)] [REPS (5)] [KERNEL-BENCH FILTER]
#
# The benchmarks run pinned (taskset) to CPUs 0 and 1, the kernel rates to
# CPU 0: the issue's machine has 2 cores. On one lent 16-core Xeon,
# unpinned, gemma3's pp512 on one thread ran at 815 tok/s in one call and
# 547 in the next; on a second one, pinned, the pp512 runs stayed within 8%
# of their medians.
set -uo pipefail
cd "$(dirname "$0")/../.."
# stage.sh left the executables and libraries xz-compressed: unpacked here
# into the same layout (llama_mini_bench finds its libraries at ../lib).
D=/tmp/device
python3 - <<'PY' || { echo "unpacking .device failed (was it carried?)" >&2; exit 1; }
import lzma, os, pathlib, shutil
shutil.rmtree("/tmp/device", ignore_errors=True)
for src in pathlib.Path(".device").glob("*/*.xz"):
    dst = pathlib.Path("/tmp/device") / src.parent.name / src.name[:-3]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(src) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    os.chmod(dst, 0o755)
PY
THREADS=${1:-1,2}
REPS=${2:-5}
FILTER=${3:-'^(attn|ffn).*packed avx512-vnni-gfni(-pairs|-amx)?/(64|512)$'}
# The kernel tests find their fixtures under the path they were built at.
mkdir -p /work && { [ -e /work/main ] || ln -s "$PWD" /work/main; }
lscpu | grep -E "^Model name|^CPU\(s\)"
echo "amx flags: $(grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"

python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.device/tiled.gguf.xz'), open('/tmp/tiled.gguf', 'wb'))"
# scalar_twin compares the whole forward pass (a 35-token prompt: tiles and
# a remainder) on the scalar kernels and on the fastest table, bit for bit.
export GEMMA3_MODEL=/tmp/tiled.gguf

echo "== kernel tests, and the forward pass on the stand-in model"
for t in "$D"/tests/*; do
  printf '%-20s %s\n' "$(basename "$t")" "$(timeout 300 "$t" 2>&1 | grep -E 'test result|panicked' | head -3 | tr '\n' ' ')"
done

variants() {
  echo "== settings unmeasured on this CPU, against the defaults (stand-in model, 5 rounds)"
  timeout 300 taskset -c 0,1 python3 scripts/device/variants.py "$D/bin/gemma3" /tmp/tiled.gguf -t "$THREADS" -p 512 -n 64 -r 5
}
if [ "${VARIANTS:-1}" = only ]; then
  variants
  exit 0
fi

echo "== packed kernels, 1 thread (G multiply-adds/s, median of criterion's range)"
RAYON_NUM_THREADS=1 timeout 300 taskset -c 0 "$D/bin/kernel-bench" --bench "$FILTER" --warm-up-time 0.2 \
  --measurement-time 0.7 --noplot --discard-baseline 2>&1 |
  python3 -c '
import re, sys
name = None
for line in sys.stdin:
    if re.match(r"^\S.*/\d+$", line.strip()) and not line.startswith("Benchmarking"):
        name = line.strip()
    m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+)", line)
    if m and name:
        print(f"{name:70s} {m.group(1)} {m.group(2)}")
        name = None'

echo "== end to end on the stand-in model"
taskset -c 0,1 python3 scripts/device/compare.py "$D/bin/gemma3" "$D/bin/llama_mini_bench" /tmp/tiled.gguf -t "$THREADS" -r "$REPS"

if [ "${VARIANTS:-1}" != 0 ]; then
  variants
fi
