#!/usr/bin/env python3
"""gemma3's defaults against settings that are unmeasured on this CPU, run
alternately in separate processes on one model: medians and each variant's
ratio to the defaults. Standard library only (lent machines have no packages).

    variants.py GEMMA3 MODEL [-t 1,2] [-p 512] [-n 64] [-r 5] [-v LABEL:VAR=VAL,VAR=VAL ...]

The default variants are the ones no Intel CPU has been measured with:
- `no-amx`: AMX tiles off (`GEMMA3_NO_AMX=1`), the baseline of the next two
  on a CPU with AMX, whose default table uses its tiles for prompts;
- `pairs`: the prompt kernels that take two groups of 16 rows a pass (the
  Zen 5's default; `x86::pairs_pay` gives them to AMD family 26 only);
- `one-group`: the table that takes one group a pass (naming a table turns
  AMX off too);
- `prefetch4k`: the one-token kernels' software prefetch 4 KB ahead (on by
  default on a Zen 5 only; `GEMMA3_PREFETCH`).
A variant that names a table this CPU lacks fails its runs and is reported
as such. Results never change with these settings; only the speed does.
"""
import argparse, json, statistics

from compare import bench, tests_of  # (the same directory)

DEFAULT_VARIANTS = [
    "no-amx:GEMMA3_NO_AMX=1",
    "pairs:GEMMA3_KERNELS=avx512-vnni-gfni-pairs",
    "one-group:GEMMA3_KERNELS=avx512-vnni-gfni",
    "prefetch4k:GEMMA3_PREFETCH=4096",
]


def parse_variant(spec):
    """LABEL:VAR=VAL,VAR=VAL -> (label, {VAR: VAL})."""
    label, sep, rest = spec.partition(":")
    if not sep or not label:
        raise SystemExit(f"variant {spec!r}: expected LABEL:VAR=VAL[,VAR=VAL]")
    env = {}
    for kv in rest.split(","):
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise SystemExit(f"variant {spec!r}: {kv!r} is not VAR=VAL")
        env[k] = v
    return label, env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gemma3")
    ap.add_argument("model")
    ap.add_argument("-t", default="1,2")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="64")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-v", action="append", help="LABEL:VAR=VAL[,VAR=VAL] (repeatable)")
    a = ap.parse_args()
    if a.r < 1:
        raise SystemExit("-r must be at least 1")
    variants = [("default", {})] + [parse_variant(s) for s in (a.v or DEFAULT_VARIANTS)]
    tests = tests_of(a.p, a.n)
    rows = []
    for threads in [int(x) for x in a.t.split(",")]:
        for test, n in tests:
            runs = {label: [] for label, _ in variants}
            names, errors = {}, {}
            for _ in range(a.r):
                for label, env in variants:
                    if label in errors:
                        continue
                    v, name = bench(a.gemma3, a.model, test, n, threads, env)
                    if v is None:
                        errors[label] = name
                    else:
                        runs[label].append(v)
                        names[label] = name
            base = statistics.median(runs["default"]) if runs["default"] else None
            for label, _ in variants:
                if label in errors:
                    print(f"{test}{n:<4} t={threads:<2} {label:12s} failed: {errors[label]}", flush=True)
                    continue
                m = statistics.median(runs[label])
                ratio = m / base if base else float("nan")
                rows.append(dict(test=f"{test}{n}", threads=threads, variant=label, tps=round(m, 1),
                                 vs_default=round(ratio, 3), kernels=names[label]))
                print(f"{test}{n:<4} t={threads:<2} {label:12s} {m:7.1f} tok/s  x{ratio:5.3f} of default  "
                      f"[{names[label]}]  (range {min(runs[label]):.0f}-{max(runs[label]):.0f}, n={len(runs[label])})",
                      flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
