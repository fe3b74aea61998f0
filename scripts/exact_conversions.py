#!/usr/bin/env python3
"""Exact (float64) logits of llama.cpp's conversions of the model at its top-5 tokens, added to
crates/cli/tests/data/llama_cpp_conversions.json: the yardstick that tells which engine's
rounding moved a logit (crates/cli/tests/conversions.rs).

Run after `scripts/llama_cpp_conversions.py --keep DIR`, with the Python `gguf` package (the
same forward pass as scripts/exact_reference.py, whose `Gemma3` class it uses: weights
dequantized by `gguf.quants.dequantize`, no activation rounding, no f16 KV cache):

    python3 scripts/exact_conversions.py DIR

For each format and prompt it records, at every prompt position, the exact logits of llama.cpp's
top-5 tokens (`exact_at_top5`) and the exact top-5 (`exact_top5`), after checking that the file in
DIR is the one llama.cpp ran (the sha256 of its tensor data).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exact_reference import Gemma3  # noqa: E402
from llama_cpp_conversions import DATA, data_section_sha256  # noqa: E402


def main() -> None:
    d = Path(sys.argv[1])
    path = DATA / "llama_cpp_conversions.json"
    ref = json.loads(path.read_text())
    for name, f in ref["formats"].items():
        model = d / f"gemma-3-270m-{name.lower()}.gguf"
        assert data_section_sha256(model) == f["data_sha256"], f"{model} is not the file llama.cpp ran"
        g = Gemma3(model)
        for case in f["cases"]:
            logits = g.logits(case["prompt_ids"])
            case["exact_at_top5"] = [
                [round(float(row[t]), 4) for t, _ in top5] for row, top5 in zip(logits, case["prompt_top5"])
            ]
            case["exact_top5"] = [
                [[int(t), round(float(row[t]), 4)] for t in np.argsort(-row, kind="stable")[:5]] for row in logits
            ]
            print(name, repr(case["prompt"][:40]))
    ref["provenance"]["exact"] = (
        "scripts/exact_conversions.py: float64 forward pass of scripts/exact_reference.py "
        "(Python gguf package) over the same files"
    )
    path.write_text(json.dumps(ref, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
