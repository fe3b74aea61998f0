#!/usr/bin/env python3
"""Embedding throughput: `gemma3 embed -f FILE` against llama-cpp-python's `Llama.embed` on the
same texts (one per line), mean pooling, unit length, the same thread count, run alternately.
Each side's time includes loading the model (gemma3's is about 0.25 s, llama.cpp's about 0.7 s; the
figures printed separate llama.cpp's).

    .venv-llamacpp/bin/python scripts/bench-embeddings.py TEXTS.txt [-t 2] [-r 3] [--gemma3 BIN]

For example the first 1000 utterances of banking77 (../shared/datasets/banking77/train.csv).
"""

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("texts")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--gemma3", default=str(ROOT / "target/release/gemma3"))
    default_model = os.environ.get("GEMMA3_MODEL") or str(
        Path.home() / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    )
    ap.add_argument("--model", default=default_model)
    a = ap.parse_args()
    texts = [l.rstrip("\n") for l in open(a.texts, encoding="utf-8") if l.strip()]
    ours, theirs, theirs_load = [], [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        out = subprocess.run(
            [a.gemma3, "embed", "-t", str(a.threads), "-m", a.model, "-f", a.texts],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ours.append(time.perf_counter() - t0)
        assert len(out.splitlines()) == len(texts)
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=a.model,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=2048,
            n_batch=512,
            n_ubatch=512,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            verbose=False,
        )
        t1 = time.perf_counter()
        assert len(llm.embed(texts, normalize=True)) == len(texts)
        theirs.append(time.perf_counter() - t0)
        theirs_load.append(t1 - t0)
        del llm
    m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
    print(
        f"{len(texts)} texts, {a.threads} threads, medians of {a.reps}: gemma3 embed {m_ours:.2f} s "
        f"({min(ours):.2f}-{max(ours):.2f}), llama-cpp-python {m_theirs:.2f} s "
        f"({min(theirs):.2f}-{max(theirs):.2f}; load {statistics.median(theirs_load):.2f} s): "
        f"{m_theirs / m_ours:.2f}x"
    )


if __name__ == "__main__":
    main()
