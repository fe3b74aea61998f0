#!/usr/bin/env python3
"""llama.cpp's own conversions of the model to other file types, and llama.cpp's perplexity on
them: how the "other quantizations" tables (docs/performance.md) and the README's perplexities
were made.

Needs llama-cpp-python 0.3.36 (bundled llama.cpp 0c1e570; here in /opt/llamaref/venv):

    /opt/llamaref/venv/bin/python scripts/llama_cpp_quants.py --out DIR IQ2_XXS Q2_K_S ...
    /opt/llamaref/venv/bin/python scripts/llama_cpp_quants.py --ppl TEXT DIR/g-iq2_xxs.gguf

The first form writes DIR/g-f16.gguf (llama.cpp's F16 conversion of the Q4_K_M file: every
matrix dequantized, so the other types are made from the same weights) unless it is there, then
DIR/g-<type>.gguf for each llama.cpp file type named (`llama_model_quantize`, 2 threads). The
types llama.cpp refuses to make without an importance matrix (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
IQ2_S, IQ2_M, Q2_K_S) get a stand-in one of all ones: the same tensor types as a real imatrix
file, with worse quality (higher perplexity). The second form prints llama.cpp's perplexity by
llama-perplexity's method (chunks of 512 tokens, each starting with BOS, the second half of each
scored), which reproduces llama-perplexity's 13.9247 on the Q4_K_M file and GPL-3.txt; compare
with `gemma3 ppl -m FILE TEXT`. Speed: `scripts/bench-vs-llamacpp.sh -m FILE`.
"""

import argparse
import ctypes
import os
import sys
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp_conversions import gguf_header  # noqa: E402

# llama.h enum llama_ftype
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28,
    "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S"}
DEFAULT_MODEL = Path.home() / ".cache" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"


def matrices(path: Path):
    """(name, row length) of every 2-D tensor, from the GGUF header."""
    tensors, _ = gguf_header(path.read_bytes())
    return [(name, int(dims[0])) for name, dims in tensors if len(dims) == 2]

def quantize(src: Path, dst: Path, ftype: str) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype]
    p.allow_requantize = True
    p.nthread = 2
    keep = []
    if ftype in NEEDS_IMATRIX:
        mats = matrices(src)
        D = llama_cpp.llama_model_imatrix_data
        arr = (D * (len(mats) + 1))()
        for i, (name, n) in enumerate(mats):
            ones = (ctypes.c_float * n)(*([1.0] * n))
            keep.append(ones)
            arr[i].name = name.encode()
            arr[i].data = ctypes.cast(ones, ctypes.POINTER(ctypes.c_float))
            arr[i].size = n
        arr[len(mats)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(D))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llama_model_quantize {ftype} failed ({rc})")
    print(dst)


def perplexity(model: Path, text: Path) -> float:
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=512, n_batch=512, logits_all=True, flash_attn=False,
        n_threads=2, verbose=False,
    )
    toks = llm.tokenize(text.read_bytes(), add_bos=True, special=False)
    n_ctx, nll, count = 512, 0.0, 0
    for c in range(len(toks) // n_ctx):
        chunk = toks[c * n_ctx : (c + 1) * n_ctx]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:n_ctx], dtype=np.float64)
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i]
            m = row.max()
            nll += m + np.log(np.exp(row - m).sum()) - row[chunk[i + 1]]
            count += 1
    return float(np.exp(nll / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="directory for the converted files")
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("GEMMA3_MODEL", DEFAULT_MODEL)))
    ap.add_argument("--ppl", type=Path, metavar="TEXT", help="print llama.cpp's perplexity of FILES on TEXT")
    ap.add_argument("names", nargs="+", help="file types (with --out) or model files (with --ppl)")
    a = ap.parse_args()
    if a.ppl:
        for f in a.names:
            print(f"{f}: llama.cpp perplexity {perplexity(Path(f), a.ppl):.4f}")
        return
    if not a.out:
        ap.error("--out DIR (or --ppl TEXT)")
    a.out.mkdir(parents=True, exist_ok=True)
    f16 = a.out / "g-f16.gguf"
    if not f16.exists():
        quantize(a.model, f16, "F16")
    for t in a.names:
        if t not in FTYPES:
            ap.error(f"unknown file type {t} (one of {', '.join(FTYPES)})")
        quantize(f16, a.out / f"g-{t.lower()}.gguf", t)


if __name__ == "__main__":
    main()
