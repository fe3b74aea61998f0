#!/usr/bin/env python3
"""llama.cpp's greedy replies with an adapter `gemma3 finetune` trained: the reference for
crates/cli/tests/finetune.rs's check that the inference pass runs a real fine-tune as llama.cpp
does (the other adapters in its tests are random).

    .venv-llamacpp/bin/python scripts/llama_cpp_trained_lora.py MODEL.gguf ADAPTER.gguf \\
        PROMPTS.jsonl OUT.json

PROMPTS.jsonl: lines of {"prompt": ...} (what `gemma3 finetune` trained on, e.g. the held-out
lines of scripts/finetune-intents.py). For each prompt, with the adapter at scale 1: its token ids
(BOS first, special tokens parsed), then greedy tokens one at a time, as llama-cli generates, up
to EOS or 16, with the gap between llama.cpp's two best logits at each step.

(llama-cpp-python 0.3.36 from PyPI, built as scripts/bench-vs-llamacpp.sh builds it; flash
attention off, 2 threads.)
"""

import json
import os
import sys

import llama_cpp
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_cpp_lora import greedy  # noqa: E402

MAX_TOKENS = 16


def main():
    model, adapter, prompts, out = sys.argv[1:5]
    llm = Llama(model, lora_path=adapter, n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                flash_attn=False)
    eos = llm.token_eos()
    cases = []
    for line in open(prompts):
        if not line.strip():
            continue
        prompt = json.loads(line)["prompt"]
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens, margins = greedy(llm, ids, MAX_TOKENS, stop=eos)
        text = llm.detokenize([t for t in tokens if t != eos]).decode("utf-8", "replace")
        cases.append({"prompt": prompt, "ids": ids, "greedy": tokens, "greedy_margins": margins, "text": text})
    json.dump({
        "producer": f"scripts/llama_cpp_trained_lora.py, llama-cpp-python {llama_cpp.__version__}, flash attention off, 2 threads",
        "adapter": adapter.rsplit("/", 1)[-1],
        "eos": eos,
        "cases": cases,
    }, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
