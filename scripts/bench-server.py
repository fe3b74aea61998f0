#!/usr/bin/env python3
"""Aggregate generation throughput of an OpenAI-compatible server under
1, 4 and 16 concurrent clients (a benchmark, not a test).

Each client thread sends `--requests` non-streamed /v1/completions requests
one after another (greedy, `--tokens` new tokens each, a different prompt per
request) with plain http.client; the figure is the sum of
usage.completion_tokens over the wall time of the whole round.

    gemma3 serve --port 8080 --parallel 16 &
    python3 scripts/bench-server.py --url http://127.0.0.1:8080 --clients 1,4,16 --tokens 64

Works against llama.cpp's servers too, e.g. llama-cpp-python's
    python -m llama_cpp.server --model M --n_threads 2 --port P
(which needs its [server] extra: fastapi, uvicorn, sse-starlette, ...).
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

SUBJECTS = [
    "a lighthouse keeper", "a lost robot", "the last dragon", "a clockmaker", "two rival chefs",
    "a talking cat", "a shipwreck", "a mountain village", "an old map", "a desert caravan",
    "a haunted library", "a space station", "a river pirate", "a forgotten king", "a young inventor",
    "a winter festival", "a secret garden", "a broken violin", "a travelling circus", "a night train",
]


def one_request(url, path, body, headers):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        r = conn.getresponse()
        data = r.read()
        dt = time.perf_counter() - t0
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
    v = json.loads(data)
    return v["usage"]["completion_tokens"], dt


def run_round(args, clients):
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    results, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c):
        barrier.wait()
        for r in range(args.requests):
            i = c * args.requests + r
            body = {
                "prompt": f"Here is a short story about {SUBJECTS[i % len(SUBJECTS)]} (number {i}). Once upon a time",
                "max_tokens": args.tokens,
                "temperature": 0,
            }
            if args.model:
                body["model"] = args.model
            try:
                n, dt = one_request(args.url, "/v1/completions", body, headers)
                with lock:
                    results.append((n, dt))
            except Exception as e:  # noqa: BLE001 - report and go on
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    lat = [dt for _, dt in results]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_median_s": statistics.median(lat) if lat else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--requests", type=int, default=1, help="requests per client per round")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="'model' field to send (some servers want it)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per round")
    args = ap.parse_args()

    # Warm up (page in the weights, first-request costs).
    run_round(argparse.Namespace(**{**vars(args), "requests": 1, "tokens": 4}), 1)
    print(f"server {args.url}, {args.tokens} tokens per request, {args.requests} request(s) per client")
    for c in [int(x) for x in args.clients.split(",") if x]:
        r = run_round(args, c)
        if args.json:
            print(json.dumps(r))
            continue
        err = f", {r['errors']} errors (first: {r['first_error']})" if r["errors"] else ""
        print(
            f"{c:>3} clients: {r['tokens']:>5} tokens in {r['wall_s']:6.2f} s = {r['tokens_per_s']:7.1f} tokens/s"
            f" (median request {r['latency_median_s'] or 0:.2f} s){err}"
        )


if __name__ == "__main__":
    main()
