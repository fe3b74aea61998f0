#!/usr/bin/env python3
"""Reference embeddings for `gemma3 embed` and the server's /v1/embeddings: llama.cpp's, and the
exact (float64) ones of scripts/exact_reference.py, for a few texts and the mean and last poolings.

llama.cpp's: llama-cpp-python 0.3.36 (bundled llama.cpp 0c1e570) with `embedding=True` and
`pooling_type` mean or last (what `llama-server --embeddings --pooling mean|last` and
`llama-embedding --pooling` compute: the final hidden states after the output norm, pooled),
flash attention off, 2 threads, each text in one batch. The vectors are stored as pooled, not
normalized. The exact ones pool the float64 forward pass's hidden states the same way (mean:
every position, BOS included; last: the last position).

Needs llama-cpp-python and the `gguf` package (the venv scripts/bench-vs-llamacpp.sh builds, with
`pip install gguf`):

    .venv-llamacpp/bin/python scripts/llama_cpp_embeddings.py [--model MODEL.gguf]

Writes crates/cli/tests/data/embeddings.json.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "crates/cli/tests/data"
sys.path.insert(0, str(ROOT / "scripts"))
from exact_reference import Gemma3  # noqa: E402

POOLINGS = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}


def texts() -> list[str]:
    gpl = (DATA / "GPL-3.txt").read_text()
    return [
        "I want to transfer money to my savings account",
        "What is the weather like in Paris tomorrow?",
        "Hello",
        "Order a large pepperoni pizza for delivery at 7pm, and add a bottle of cola.",
        # About 700 tokens: past the 512-token sliding window.
        gpl[:3000],
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    default_model = os.environ.get("GEMMA3_MODEL") or str(
        Path.home() / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    )
    ap.add_argument("--model", default=default_model)
    args = ap.parse_args()
    items = texts()
    out = {
        "producer": (
            f"scripts/llama_cpp_embeddings.py: llama-cpp-python {llama_cpp.__version__} "
            f"(embedding=True, pooling_type mean/last, flash_attn off, 2 threads), and the exact "
            f"float64 pass of scripts/exact_reference.py (numpy {np.__version__}, Python "
            f"{platform.python_version()})"
        ),
        "texts": items,
        "token_ids": [],
        "llama_cpp": {p: [] for p in POOLINGS},
        "exact": {p: [] for p in POOLINGS},
    }
    for name, pooling in POOLINGS.items():
        llm = llama_cpp.Llama(
            model_path=args.model,
            embedding=True,
            pooling_type=pooling,
            n_ctx=1024,
            n_batch=1024,
            n_ubatch=1024,
            flash_attn=False,
            n_threads=2,
            verbose=False,
        )
        for t in items:
            v = llm.embed(t, normalize=False)
            out["llama_cpp"][name].append([float(f"{x:.7g}") for x in v])
        if not out["token_ids"]:
            out["token_ids"] = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in items]
    exact = Gemma3(Path(args.model))
    for ids in out["token_ids"]:
        h = exact.hidden(ids)
        for name, v in (("mean", h.mean(axis=0)), ("last", h[-1])):
            out["exact"][name].append([float(f"{x:.9g}") for x in v])
    (DATA / "embeddings.json").write_text(json.dumps(out) + "\n")
    print(f"wrote {DATA / 'embeddings.json'}: {len(items)} texts", file=sys.stderr)


if __name__ == "__main__":
    main()
