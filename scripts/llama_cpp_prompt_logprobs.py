#!/usr/bin/env python3
"""Each prompt token's log-probability given the tokens before it, by
llama.cpp: the reference for the server's `echo` with `logprobs`
(`crates/server/tests/server.rs`, `prompt_logprobs_match_llama_cpp`).

For each text: llama.cpp's token ids (BOS, special-token text parsed), then
for every position after the first the log-softmax of llama.cpp's logits at
the position before, at the prompt's token, and its 5 best tokens there.
Then for `gemma3 classify` (crates/cli/tests/classify.rs): for each prompt
and label, the sum of the label's tokens' log-probabilities after the
prompt (the label tokenized alone, after the prompt's ids).

    .venv-llamacpp/bin/python scripts/llama_cpp_prompt_logprobs.py MODEL.gguf > crates/server/tests/data/prompt_logprobs.json

(llama-cpp-python 0.3.36 from PyPI, built as scripts/bench-vs-llamacpp.sh
builds it; logits_all, flash attention off, 2 threads.)
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

TEXTS = [
    "The capital of France is Paris.",
    "Review: The food was cold and the waiter was rude.\nSentiment: negative",
    "<start_of_turn>user\nI lost my card.<end_of_turn>\n<start_of_turn>model\nIntent: card_lost",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    # Longer than the server's prompt chunk (128 tokens): scored across steps.
    " ".join(f"Item {i}: the {w} costs {i * 3} euros." for i, w in enumerate(["apple", "pear", "plum", "fig"] * 6)),
]


CLASSIFY = [
    ("Review: The food was cold and the waiter was rude.\nSentiment:", [" positive", " negative"]),
    ("Review: Lovely staff, great pasta.\nSentiment:", [" positive", " negative"]),
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Berlin"]),
    ("I lost my card yesterday. Intent:", [" card_lost", " balance", " transfer money"]),
]


def main():
    llm = Llama(sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, verbose=False, flash_attn=False)
    cases = []
    for text in TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logp = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
        positions = []
        for i in range(1, len(ids)):
            row = logp[i - 1]
            best = np.argsort(-row)[:5]
            positions.append(
                {
                    "id": ids[i],
                    "logprob": float(row[ids[i]]),
                    "top": [[int(t), float(row[t])] for t in best],
                }
            )
        cases.append({"text": text, "ids": ids, "positions": positions})
    classify = []
    for prompt, labels in CLASSIFY:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        scores = {}
        for label in labels:
            tail = llm.tokenize(label.encode(), add_bos=False, special=False)
            llm.reset()
            llm.eval(ids + tail)
            logits = np.array(llm.scores[: len(ids) + len(tail)], dtype=np.float64)
            total = 0.0
            for k, t in enumerate(tail):
                row = logits[len(ids) + k - 1]
                m = row.max()
                total += row[t] - (m + np.log(np.exp(row - m).sum()))
            scores[label] = float(total)
        classify.append({"prompt": prompt, "scores": scores})
    out = {"provenance": __doc__.strip().splitlines()[0], "cases": cases, "classify": classify}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
