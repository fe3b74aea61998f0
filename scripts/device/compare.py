#!/usr/bin/env python3
"""gemma3 with AMX tiles, gemma3 without (GEMMA3_NO_AMX=1) and llama.cpp
(scripts/device/llama_mini_bench.c), run alternately on one model: medians
and ratios. Standard library only (lent machines have no packages).

    compare.py GEMMA3 LLAMA_MINI_BENCH MODEL [-t 1,2,4] [-p 64,512] [-n 128] [-r 5]
"""
import argparse, json, os, statistics, subprocess


def bench(bin_, model, test, n, threads, extra_env):
    """One `gemma3 bench` run with `extra_env` set: (tokens/s, kernel table),
    or (None, its last line of error) if it failed."""
    env = dict(os.environ)
    env.update(extra_env)
    args = [bin_, "bench", "-m", model, "-t", str(threads), "-r", "1", "--json"]
    args += ["-p", str(n), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(n)]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
    try:
        line = json.loads(r.stdout.strip().splitlines()[-1])
        return line["median_tps"], line.get("kernels", "")
    except (IndexError, ValueError, KeyError):
        return None, "no JSON result line in its output"


def tests_of(p, n):
    """The -p and -n lists as (pp|tg, length) pairs, zeros left out."""
    return [("pp", int(x)) for x in p.split(",") if int(x)] + [("tg", int(x)) for x in n.split(",") if int(x)]


def gemma3(bin_, model, test, n, threads, amx):
    v, kernels = bench(bin_, model, test, n, threads, {} if amx else {"GEMMA3_NO_AMX": "1"})
    if v is None:
        raise SystemExit(f"gemma3 bench failed: {kernels}")
    return v, kernels


def llama(bin_, model, test, n, threads):
    out = subprocess.run([bin_, model, str(threads), test, str(n), "0", "1"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gemma3")
    ap.add_argument("llama")
    ap.add_argument("model")
    ap.add_argument("-t", default="1,2,4")
    ap.add_argument("-p", default="64,512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-r", type=int, default=5)
    a = ap.parse_args()
    tests = tests_of(a.p, a.n)
    rows = []
    for threads in [int(x) for x in a.t.split(",")]:
        for test, n in tests:
            amx, plain, ll, kernels = [], [], [], ""
            for _ in range(a.r):
                v, kernels = gemma3(a.gemma3, a.model, test, n, threads, True)
                amx.append(v)
                plain.append(gemma3(a.gemma3, a.model, test, n, threads, False)[0])
                ll.append(llama(a.llama, a.model, test, n, threads))
            m = [statistics.median(x) for x in (amx, plain, ll)]
            rows.append(dict(test=f"{test}{n}", threads=threads, gemma3=round(m[0], 1), gemma3_no_amx=round(m[1], 1),
                             llama_cpp=round(m[2], 1), ratio=round(m[0] / m[2], 2), amx_gain=round(m[0] / m[1], 2),
                             kernels=kernels))
            print(f"{test}{n:<4} t={threads:<2} gemma3 {m[0]:7.1f} [{kernels}]  without AMX {m[1]:7.1f}  "
                  f"llama.cpp {m[2]:7.1f}  ratio {m[0] / m[2]:4.2f}x  AMX gain {m[0] / m[1]:4.2f}x  "
                  f"(ranges {min(amx):.0f}-{max(amx):.0f}, {min(plain):.0f}-{max(plain):.0f}, "
                  f"{min(ll):.0f}-{max(ll):.0f}; n={a.r})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
