#!/usr/bin/env python3
"""Generate the kernel fixtures in crates/kernels/tests/data/ with the Python `gguf` package.

The reference here is gguf-py (`gguf.quants.dequantize` / `gguf.quants.quantize`), an
implementation of the ggml block formats independent of ours. Nothing in this script calls
gemma3-rs code.

Usage (needs numpy and gguf==0.19.0; the model for the real-row fixtures):

    python3 scripts/make_kernel_fixtures.py [MODEL.gguf]

MODEL defaults to $GEMMA3_MODEL, else ~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf (sha256
a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818). The output is
deterministic: running it again rewrites identical files.

Written files (all little-endian):
  manifest.json         one entry per fixture (format, rows, cols, files, where it came from)
  <name>.raw            the rows' bytes in their block format
  <name>.f32            gguf-py's dequantization of those bytes (rows x cols f32)
  quantize_input.f32    synthetic input 0.1 + 2cos(i) (f32; ggml test-quantize-fns data)
  quantize_<fmt>.raw    gguf-py's quantization of that input
"""

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kernels" / "tests" / "data"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SEED = 20250101

# Real rows: one tensor per type present in the Q4_K_M file (layer 0).
REAL = [
    ("Q8_0", "blk.0.attn_v.weight"),
    ("Q5_0", "blk.0.attn_q.weight"),
    ("Q4_K", "blk.0.attn_output.weight"),
    ("Q6_K", "blk.0.ffn_down.weight"),
]

# name -> (ggml type, block elements, block bytes, [(offset, "d"|"dmin")] f16 scale fields)
FORMATS = {
    "Q8_0": (T.Q8_0, 32, 34, [0]),
    "Q4_0": (T.Q4_0, 32, 18, [0]),
    "Q5_0": (T.Q5_0, 32, 22, [0]),
    "Q4_K": (T.Q4_K, 256, 144, [0, 2]),
    "Q5_K": (T.Q5_K, 256, 176, [0, 2]),
    "Q6_K": (T.Q6_K, 256, 210, [208]),
    "F16": (T.F16, 1, 2, []),
    "BF16": (T.BF16, 1, 2, []),
    # Appended (so the random draws of the formats above stay as they were): d and m.
    "Q4_1": (T.Q4_1, 32, 20, [0, 2]),
    "Q5_1": (T.Q5_1, 32, 24, [0, 2]),
    "IQ4_NL": (T.IQ4_NL, 32, 18, [0]),
    "IQ4_XS": (T.IQ4_XS, 256, 136, [0]),
    "Q3_K": (T.Q3_K, 256, 110, [108]),
    # Appended again (Q2_K and the lattice formats). IQ1_M has no f16 field: its d is spread
    # over the top nibbles of its 4 scale words (see random_rows).
    "Q2_K": (T.Q2_K, 256, 84, [80, 82]),
    "IQ2_XXS": (T.IQ2_XXS, 256, 66, [0]),
    "IQ2_XS": (T.IQ2_XS, 256, 74, [0]),
    "IQ2_S": (T.IQ2_S, 256, 82, [0]),
    "IQ3_XXS": (T.IQ3_XXS, 256, 98, [0]),
    "IQ3_S": (T.IQ3_S, 256, 110, [0]),
    "IQ1_S": (T.IQ1_S, 256, 50, [0]),
    "IQ1_M": (T.IQ1_M, 256, 56, []),
    # And the ternary formats (one f16 d at the end).
    "TQ1_0": (T.TQ1_0, 256, 54, [52]),
    "TQ2_0": (T.TQ2_0, 256, 66, [64]),
}
# Blocks per row where 3 is too few: the lattice formats' fixtures draw grid entries at
# random, 32 or 64 per block, so 2 rows of 16 blocks reach most of each table (all of
# IQ2_XXS's and IQ3_XXS's 256 entries, and most of the 512-2048 of the others).
BLOCKS = {f: 16 for f in ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]}


def model_path() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    if os.environ.get("GEMMA3_MODEL"):
        return Path(os.environ["GEMMA3_MODEL"])
    return Path.home() / ".cache" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(name: str, data: bytes) -> None:
    (OUT / name).write_bytes(data)


def gguf_dequant(raw: np.ndarray, qtype: T, rows: int, cols: int) -> np.ndarray:
    out = dequantize(raw.reshape(rows, -1), qtype).astype(np.float32).reshape(rows, cols)
    assert np.all(np.isfinite(out)), "dequantized values must be finite"
    return out


def random_rows(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with sane f16 scales (finite, so no NaN/Inf can appear)."""
    qtype, bs, bb, scale_offsets = FORMATS[fmt]
    if fmt == "F16":
        v = rng.uniform(-2.0, 2.0, size=rows * cols).astype(np.float16)
        return v.view(np.uint8).copy()
    if fmt == "BF16":
        v = rng.uniform(-2.0, 2.0, size=rows * cols).astype(np.float32)
        return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).copy()
    nblocks = rows * cols // bs
    blocks = rng.integers(0, 256, size=(nblocks, bb), dtype=np.uint8)
    # Legacy formats: d in [0.01, 0.1]. K-quants multiply d by 6/8-bit sub-block scales, so a
    # smaller d in [0.001, 0.005] keeps the weights O(1..40) like the legacy ones.
    lo, hi = (0.01, 0.1) if bs == 32 else (0.001, 0.005)
    for off in scale_offsets:
        d = rng.uniform(lo, hi, size=nblocks).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(nblocks, 2)
    if fmt == "IQ1_M":
        # d's nibble i is the top nibble of scale word i (bytes 48 + 2i, 49 + 2i).
        d = rng.uniform(lo, hi, size=nblocks).astype(np.float16).view(np.uint16)
        for i in range(4):
            nib = ((d >> (4 * i)) & 0xF).astype(np.uint8)
            blocks[:, 49 + 2 * i] = (blocks[:, 49 + 2 * i] & 0x0F) | (nib << 4)
    return blocks.reshape(-1)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = model_path()
    digest = sha256(path)
    if digest != MODEL_SHA256:
        sys.exit(f"{path} has sha256 {digest}, expected {MODEL_SHA256}")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    entries = []

    # 1. Two real rows of one tensor per type in the file.
    for fmt, tname in REAL:
        t = tensors[tname]
        qtype = FORMATS[fmt][0]
        assert t.tensor_type == qtype, (tname, t.tensor_type)
        cols = int(t.shape[0])  # gguf-py shape: innermost (row length) first
        raw = np.asarray(t.data[:2]).reshape(-1).copy()  # (rows, row_bytes) uint8
        deq = gguf_dequant(raw, qtype, 2, cols)
        name = f"real_{fmt.lower()}"
        write(name + ".raw", raw.tobytes())
        write(name + ".f32", deq.astype("<f4").tobytes())
        entries.append(
            {
                "name": name,
                "format": fmt,
                "rows": 2,
                "cols": cols,
                "raw": name + ".raw",
                "f32": name + ".f32",
                "source": f"{tname} rows 0..2 of the model file (sha256 {MODEL_SHA256})",
            }
        )

    # 2. Random blocks of every supported block format (and F16/BF16), odd block counts.
    rng = np.random.default_rng(SEED)
    for fmt, (qtype, bs, bb, _) in FORMATS.items():
        cols = bs * BLOCKS[fmt] if fmt in BLOCKS else {32: 32 * 5, 256: 256 * 3, 1: 160}[bs]
        raw = random_rows(fmt, 2, cols, rng)
        deq = gguf_dequant(raw, qtype, 2, cols)
        name = f"random_{fmt.lower()}"
        write(name + ".raw", raw.tobytes())
        write(name + ".f32", deq.astype("<f4").tobytes())
        entries.append(
            {
                "name": name,
                "format": fmt,
                "rows": 2,
                "cols": cols,
                "raw": name + ".raw",
                "f32": name + ".f32",
                "source": f"random bytes, numpy default_rng({SEED}), f16 scale fields set finite",
            }
        )

    # 3. gguf-py's quantizers (bit-exact ports of ggml's quantize_row_*_ref; F16 is numpy's
    #    round-to-nearest-even, BF16 ggml_compute_fp32_to_bf16) on ggml's synthetic test data
    #    0.1 + 2cos(i), 33 blocks (an odd count).
    quant = []
    n = 32 * 33
    x = (np.float32(0.1) + np.float32(2.0) * np.cos(np.arange(n, dtype=np.float32))).astype(np.float32)
    write("quantize_input.f32", x.astype("<f4").tobytes())
    for fmt in ["Q8_0", "Q4_0", "Q5_0", "F16", "BF16"]:
        q = quantize(x.reshape(1, n), FORMATS[fmt][0]).reshape(-1).view(np.uint8)
        write(f"quantize_{fmt.lower()}.raw", q.tobytes())
        quant.append(
            {
                "format": fmt,
                "n": n,
                "input": "quantize_input.f32",
                "raw": f"quantize_{fmt.lower()}.raw",
            }
        )

    manifest = {
        "provenance": {
            "generator": "scripts/make_kernel_fixtures.py",
            "command": "python3 scripts/make_kernel_fixtures.py",
            "reference": "gguf.quants.dequantize / gguf.quants.quantize (Python gguf package)",
            "gguf_version": "0.19.0",
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "model_sha256": MODEL_SHA256,
            "seed": SEED,
        },
        "dequantize": entries,
        "quantize": quant,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(entries)} dequantization fixtures and {len(quant)} quantization fixtures to {OUT}")


if __name__ == "__main__":
    main()
