#!/usr/bin/env python3
"""llama.cpp's results on its F16, BF16, Q8_0 and Q4_0 conversions of the model, for
crates/cli/tests/conversions.rs.

Needs llama-cpp-python 0.3.36 (bundled llama.cpp 0c1e570); here it lives in /opt/llamaref/venv:

    /opt/llamaref/venv/bin/python scripts/llama_cpp_conversions.py [--model Q4_K_M.gguf]

For each format it converts the Q4_K_M file with llama.cpp's own quantizer (`llama_model_quantize`
with ftype MOSTLY_F16 / MOSTLY_BF16 / MOSTLY_Q8_0 / MOSTLY_Q4_0 and allow_requantize: every matrix
dequantized to f32 and stored in that format, the token embedding in Q8_0 for the two quantized
ones, the norms left in F32; no importance matrix, so ggml's reference quantizers), records the sha256 of each converted file's tensor-data
section (from the data offset to the end: the test rebuilds the file and checks it holds the same
bytes), and runs llama.cpp on it (flash attention off, 2 threads) for the first 3 and the last of
reference.json's greedy prompts:

- `prompt_top5`: its five best (id, logit) at every prompt position, from one batch with logits at
  every position;
- `greedy`: the 16 tokens it picks by argmax generating one token at a time, with its gap between
  the best and second-best logit at each step (`margin`).

With `--keep DIR` the converted files stay in DIR, for scripts/exact_conversions.py, which adds
the exact logits of the same weights to the output.
"""

import argparse
import ctypes
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

try:
    import llama_cpp
except ImportError:  # exact_conversions.py imports this module for data_section_sha256 only
    llama_cpp = None

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "crates/cli/tests/data"
# LLAMA_FTYPE_MOSTLY_F16, _BF16, _Q8_0, _Q4_0
FTYPES = {"F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2}
STEPS = 16


def gguf_header(b: bytes):
    """The tensor infos of a GGUF v3 file's bytes, as (name, dims) with dims innermost
    first, and the (aligned) offset of its data section."""
    assert b[:4] == b"GGUF" and struct.unpack_from("<I", b, 4)[0] == 3
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    off = 24
    align = 32
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(t, off):
        if t in scalar:
            return off + scalar[t]
        if t == 8:  # string
            (n,) = struct.unpack_from("<Q", b, off)
            return off + 8 + n
        assert t == 9, t  # array
        et, n = struct.unpack_from("<IQ", b, off)
        off += 12
        for _ in range(n):
            off = skip_value(et, off)
        return off

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", b, off)
        key = b[off + 8 : off + 8 + klen].decode()
        off += 8 + klen
        (t,) = struct.unpack_from("<I", b, off)
        off += 4
        if key == "general.alignment":
            (align,) = struct.unpack_from("<I", b, off)
        off = skip_value(t, off)
    tensors = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", b, off)
        name = b[off + 8 : off + 8 + nlen].decode()
        off += 8 + nlen
        (nd,) = struct.unpack_from("<I", b, off)
        tensors.append((name, struct.unpack_from(f"<{nd}Q", b, off + 4)))
        off += 4 + 8 * nd + 4 + 8
    return tensors, (off + align - 1) // align * align


def data_section_sha256(path: Path) -> str:
    """sha256 of a GGUF v3 file from its (aligned) data offset to the end."""
    b = path.read_bytes()
    _, start = gguf_header(b)
    return hashlib.sha256(b[start:]).hexdigest()


def run(model: Path, prompts):
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )
    cases = []
    for g in prompts:
        ids = g["prompt_ids"]
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        top5 = []
        for row in scores:
            best = np.argsort(-row, kind="stable")[:5]
            top5.append([[int(t), round(float(row[t]), 4)] for t in best])
        # Greedy, one token at a time after the prompt batch.
        llm.reset()
        llm.eval(ids)
        out, margins = [], []
        for _ in range(STEPS):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-row, kind="stable")[:2]
            out.append(int(order[0]))
            margins.append(round(float(row[order[0]] - row[order[1]]), 4))
            llm.eval([int(order[0])])
        cases.append(
            {"prompt": g["prompt"], "prompt_ids": ids, "prompt_top5": top5, "greedy": out, "margin": margins}
        )
        print(" ", repr(g["prompt"][:40]), out[:6])
    return cases


def main() -> None:
    ap = argparse.ArgumentParser()
    default_model = os.environ.get("GEMMA3_MODEL") or str(
        Path.home() / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    )
    ap.add_argument("--model", default=default_model)
    ap.add_argument("--keep", help="keep the converted files in this directory (for exact_conversions.py)")
    args = ap.parse_args()
    ref = json.loads((DATA / "reference.json").read_text())
    prompts = ref["greedy32"][:3] + ref["greedy32"][-1:]
    formats = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            os.makedirs(tmp, exist_ok=True)
        for name, ftype in FTYPES.items():
            dst = Path(tmp) / f"gemma-3-270m-{name.lower()}.gguf"
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = ftype
            p.allow_requantize = True
            p.nthread = 2
            rc = llama_cpp.llama_model_quantize(args.model.encode(), str(dst).encode(), ctypes.byref(p))
            assert rc == 0, rc
            print(name, dst.stat().st_size, "bytes")
            formats[name] = {
                "data_sha256": data_section_sha256(dst),
                "cases": run(dst, prompts),
            }
    out = {
        "provenance": {
            "generator": "scripts/llama_cpp_conversions.py",
            "command": "/opt/llamaref/venv/bin/python scripts/llama_cpp_conversions.py --keep DIR",
            "producer": f"llama-cpp-python {llama_cpp.__version__} (bundled llama.cpp 0c1e570): "
            "llama_model_quantize (allow_requantize) from the Q4_K_M file, then evaluation with "
            "flash attention off, 2 threads",
            "source_model_sha256": ref["model_sha256"],
        },
        "formats": formats,
    }
    (DATA / "llama_cpp_conversions.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", DATA / "llama_cpp_conversions.json")


if __name__ == "__main__":
    main()
