#!/usr/bin/env python3
"""llama.cpp's logits along the reference greedy paths, to measure how far llama.cpp itself is
from the exact logits (scripts/exact_reference.py): the accuracy budget an engine with 8-bit
activations and an f16 KV cache is held to in crates/cli/tests/logits.rs.

Needs llama-cpp-python 0.3.36 (bundled llama.cpp 0c1e570); here it lives in /opt/llamaref/venv:

    /opt/llamaref/venv/bin/python scripts/llama_cpp_path_logits.py [--model MODEL.gguf]

For each of reference.json's 10 greedy prompts it evaluates the prompt followed by llama.cpp's
first 31 greedy tokens in one batch with logits at every position (flash attention off,
2 threads) and records, at every position, llama.cpp's logits for the exact reference's top-5
tokens (crates/cli/tests/data/exact_logits.json must exist: run exact_reference.py first).
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "crates/cli/tests/data"


def main() -> None:
    ap = argparse.ArgumentParser()
    default_model = os.environ.get("GEMMA3_MODEL") or str(
        Path.home() / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    )
    ap.add_argument("--model", default=default_model)
    args = ap.parse_args()
    ref = json.loads((DATA / "reference.json").read_text())
    exact = json.loads((DATA / "exact_logits.json").read_text())
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )
    cases = []
    for g, e in zip(ref["greedy32"], exact["cases"]):
        assert g["prompt"] == e["prompt"]
        ids = g["prompt_ids"] + g["ids"][:-1]
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        n_prompt = len(g["prompt_ids"])
        steps = []
        for s, step in enumerate(e["greedy_steps"]):
            row = scores[n_prompt - 1 + s]
            steps.append([[t, round(float(row[t]), 4)] for t, _ in step["top5"]])
        cases.append({"prompt": g["prompt"], "at_exact_top5": steps})
        print(repr(g["prompt"][:40]), len(ids), "positions")
    out = {
        "provenance": {
            "generator": "scripts/llama_cpp_path_logits.py",
            "command": "/opt/llamaref/venv/bin/python scripts/llama_cpp_path_logits.py",
            "producer": f"llama-cpp-python {llama_cpp.__version__} (bundled llama.cpp 0c1e570), "
            "one batch per sequence with logits_all, flash attention off, 2 threads",
            "model_sha256": ref["model_sha256"],
        },
        "cases": cases,
    }
    (DATA / "llama_cpp_path_logits.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", DATA / "llama_cpp_path_logits.json")


if __name__ == "__main__":
    main()
