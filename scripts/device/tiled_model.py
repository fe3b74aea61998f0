#!/usr/bin/env python3
"""A stand-in for a GGUF model that compresses to a few MB: the same header
(metadata, vocabulary, tensor list) and the same tensor sizes and types, but
each tensor's data is its first whole rows within 128 KiB repeated (the real
rows, repeated).

What it is for: measuring speed on a machine that cannot hold the real file
(the lent GPU machines take 64 MiB per command). The work per token of both
gemma3 and llama.cpp depends on the shapes and types, not on the values, so
the stand-in runs at the real model's speed; its outputs are meaningless, but
finite: the repeats keep whole rows, so every block keeps its own scales. (A
unit cut at 128 KiB exactly split blocks, whose scales then came from other
bytes, some of them f16 infinities or NaNs: the forward pass gave NaN
logits, and the scalar twin test compared NaNs' bits.)

    python3 scripts/device/tiled_model.py MODEL.gguf OUT.gguf.xz

Needs the `gguf` package (pip install gguf) to list the tensors.
"""
import lzma
import sys

import gguf

# Within xz's 8 MiB dictionary, so each repeat costs a few bytes. Smaller
# units (16 KiB) made the data too regular: gemma3's prompt speed fell 7%
# and llama.cpp's generation 15% against the real file.
REPEAT = 128 << 10


def main(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    data = bytearray(open(src, "rb").read())
    for t in reader.tensors:
        start, n = int(t.data_offset), int(t.n_bytes)
        # Rows are the tensor's outermost dimension (ne[1] for a matrix).
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        row = n // rows
        size = max(row, REPEAT // row * row)
        unit = bytes(data[start : start + min(n, size)])
        whole = (unit * (n // len(unit) + 1))[:n]
        data[start : start + n] = whole
    with lzma.open(dst, "wb", preset=6) as f:
        f.write(data)
    print(f"{dst}: {len(reader.tensors)} tensors tiled, {len(data) / 1e6:.1f} MB uncompressed")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
