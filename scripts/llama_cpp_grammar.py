#!/usr/bin/env python3
"""Greedy generation under GBNF grammars by llama.cpp, the reference for
`crates/cli/tests/grammar.rs`.

For each case: llama.cpp's prompt ids (BOS, special-token text parsed), then
the tokens llama.cpp's grammar sampler and greedy choice pick, up to and
including the end-of-generation token when the grammar lets the text end,
with llama.cpp's raw logits at every step (its 20 best, and the chosen
token's), so that a test can tell a near-tie from a real disagreement.

    .venv-llamacpp/bin/python scripts/llama_cpp_grammar.py MODEL.gguf > crates/cli/tests/data/grammar.json

(llama-cpp-python 0.3.36 from PyPI, built as scripts/bench-vs-llamacpp.sh
builds it; flash attention off, 2 threads.)
"""

import json
import sys

import numpy as np
from llama_cpp import Llama, LlamaGrammar, llama_cpp

CASES = [
    {
        "name": "sentiment label",
        "prompt": "Review: The food was cold and the waiter was rude.\nSentiment (positive or negative):",
        "grammar": 'root ::= " positive" | " negative"',
        "max_tokens": 8,
    },
    {
        "name": "list of numbers",
        "prompt": "The first five prime numbers are",
        "grammar": 'root ::= " " num ("," " "? num){0,6} "."\nnum ::= [0-9]+',
        "max_tokens": 32,
    },
    {
        "name": "json-like record",
        "prompt": "Extract the person as JSON.\nText: Alice Smith is 30 years old and lives in Paris.\nJSON:",
        "grammar": "\n".join(
            [
                'root ::= " {" ws "\\"name\\": " str "," ws "\\"age\\": " int "," ws "\\"city\\": " str ws "}"',
                'str ::= "\\"" [^"\\\\\\n]{1,40} "\\""',
                "int ::= [1-9] [0-9]{0,2}",
                'ws ::= " "?',
            ]
        ),
        "max_tokens": 48,
    },
    {
        "name": "yes or no with a reason",
        "prompt": "Question: Is the sun a star?\nAnswer (yes or no, then a short reason):",
        "grammar": 'root ::= " " ("Yes" | "No") ("." | ",") " " [A-Za-z ,\']{1,60} "."',
        "max_tokens": 40,
    },
    {
        "name": "chat turn, one word",
        "prompt": "<start_of_turn>user\nName a primary color in one word.<end_of_turn>\n<start_of_turn>model\n",
        "grammar": "root ::= [A-Z] [a-z]+",
        "max_tokens": 8,
    },
    {
        "name": "anything but a digit",
        "prompt": "My favourite animal is",
        "grammar": "root ::= [^0-9\\n]{1,30} \"\\n\"",
        "max_tokens": 32,
    },
]


def main() -> None:
    path = sys.argv[1]
    llm = Llama(
        model_path=path,
        n_ctx=512,
        n_threads=2,
        logits_all=True,
        flash_attn=False,
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for case in CASES:
        ids = llm.tokenize(case["prompt"].encode(), add_bos=True, special=True)
        grammar = LlamaGrammar.from_string(case["grammar"], verbose=False)
        llm.reset()
        steps = []
        for tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0, grammar=grammar, reset=True):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top = np.argsort(-row, kind="stable")[:20]
            eog = bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
            steps.append(
                {
                    "token": int(tok),
                    "logit": float(row[tok]),
                    "top20": [[int(i), float(row[i])] for i in top],
                    "end": eog,
                }
            )
            if eog or len(steps) >= case["max_tokens"]:
                break
        gen = [s["token"] for s in steps if not s["end"]]
        out.append(
            {
                **case,
                "prompt_ids": ids,
                "steps": steps,
                "text": llm.detokenize(gen).decode("utf-8", errors="replace"),
            }
        )
        print(f"{case['name']}: {out[-1]['text']!r} ({len(steps)} steps)", file=sys.stderr)
    json.dump(
        {
            "producer": "scripts/llama_cpp_grammar.py, llama-cpp-python 0.3.36 (llama.cpp 0c1e570), flash attention off, 2 threads",
            "model_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "cases": out,
        },
        sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main()
