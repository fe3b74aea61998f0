#!/usr/bin/env python3
"""The reference for `gemma3 cvector-generate` (crates/cli/tests/cvector.rs): the control vector
llama-cvector-generator's method makes from pairs of prompts, computed from llama.cpp's tokens and
the exact float64 hidden states.

For each pair (line i of POSITIVE and of NEGATIVE, empty lines skipped, llama.cpp's escapes
processed): llama.cpp's tokens (BOS added, special-token text parsed), the shorter padded with the
last token llama.cpp gives for " " (no BOS), as llama-cvector-generator pads them. Then the output
of every layer but the last (scripts/exact_reference.py's float64 pass over the weights as the
`gguf` package dequantizes them) for both, their difference, and its rows that are not all zero
(|x| <= 1e-6 everywhere: the BOS and the positions where the two prompts still agree). Over all
pairs, for each layer il (0 to n_layers - 2), written as direction.{il + 1}:

- `mean`: the rows' mean, scaled to length 1 (llama.cpp's `--method mean`);
- `pca`: the top eigenvector of DᵀD (D the rows, uncentred, as llama.cpp's power iteration
  converges to), from numpy's `eigh`, signed so that the rows' mean projects positively on it
  (llama.cpp's sign is left to chance), with `pca_gap` = λ2 / λ1 (how fast power iteration
  converges) and `pca_share` = λ1 / trace.

    .venv-llamacpp/bin/python scripts/cvector_reference.py MODEL.gguf POSITIVE NEGATIVE OUT.json

And the same two directions from llama.cpp's own hidden states (`llama_cpp_mean`, `llama_cpp_pca`):
its `l_out-N` tensors read through the eval callback, as llama-cvector-generator reads them (one
decode per prompt from an empty cache, flash attention off, 2 threads), so that a test can hold our
directions to llama.cpp's distance from the exact ones.

(llama-cpp-python 0.3.36, bundled llama.cpp 0c1e570; gguf and numpy in the same venv.)
"""

import ctypes
import json
import os
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_reference import Gemma3  # noqa: E402


def process_escapes(s):
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ and \\xHH."""
    out, i, b = bytearray(), 0, s.encode()
    simple = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("'"): 39, ord('"'): 34, ord("\\"): 92}
    while i < len(b):
        if b[i] == 92 and i + 1 < len(b):
            c = b[i + 1]
            if c in simple:
                out.append(simple[c])
                i += 2
                continue
            if c == ord("x") and i + 3 < len(b):
                try:
                    out.append(int(b[i + 2 : i + 4].decode(), 16))
                    i += 4
                    continue
                except ValueError:
                    pass
        out.append(b[i])
        i += 1
    return out.decode("utf-8", "replace")


def prompts(path):
    with open(path, encoding="utf-8") as f:
        return [process_escapes(line) for line in f.read().split("\n") if line]


class LlamaLayers:
    """llama.cpp's `l_out-N` (each layer's output, n_tokens rows) for a prompt, through the
    scheduler's eval callback, as llama-cvector-generator reads them."""

    def __init__(self, model, n_layers):
        lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
        g = ctypes.CDLL(lib)
        g.ggml_get_name.restype = ctypes.c_char_p
        g.ggml_get_name.argtypes = [ctypes.c_void_p]
        g.ggml_nbytes.restype = ctypes.c_size_t
        g.ggml_nbytes.argtypes = [ctypes.c_void_p]
        g.ggml_nrows.restype = ctypes.c_int64
        g.ggml_nrows.argtypes = [ctypes.c_void_p]
        g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.g, self.n_layers, self.seen, self.n_tokens = g, n_layers, {}, 0

        def cb(t, ask, _user):
            name = g.ggml_get_name(t).decode()
            if not name.startswith("l_out-"):
                return False if ask else True
            if ask:
                return True
            if g.ggml_nrows(t) == self.n_tokens:
                buf = np.empty(g.ggml_nbytes(t) // 4, dtype=np.float32)
                g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
                self.seen[int(name.split("-")[1])] = buf.reshape(self.n_tokens, -1).astype(np.float64)
            return True

        self.cb = llama_cpp.ggml_backend_sched_eval_callback(cb)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(model.encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 512, 512
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = 0  # disabled
        cp.cb_eval = self.cb
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)

    def outputs(self, ids):
        """Layers 0 .. n_layers - 2's outputs, each n_tokens x n_embd."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.seen, self.n_tokens = {}, len(ids)
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(ids))) == 0
        return [self.seen[il] for il in range(self.n_layers - 1)]


def directions(rows):
    """(mean, pca, λ2/λ1, λ1/trace) of each layer's difference rows, as the docstring says."""
    mean, pca, gap, share = [], [], [], []
    for r in rows:
        m = np.array(r, dtype=np.float64)
        mu = m.mean(axis=0)
        mean.append(mu / np.linalg.norm(mu))
        w, v = np.linalg.eigh(m.T @ m)
        top = v[:, -1]
        if top @ mu < 0:
            top = -top
        pca.append(top)
        gap.append(float(w[-2] / w[-1]))
        share.append(float(w[-1] / w.sum()))
    return mean, pca, gap, share


def main():
    model, pos_path, neg_path, out = sys.argv[1:5]
    pos, neg = prompts(pos_path), prompts(neg_path)
    assert len(pos) == len(neg) and pos
    llm = Llama(model, vocab_only=True, verbose=False)
    pad = llm.tokenize(b" ", add_bos=False, special=False)[-1]
    exact = Gemma3(model)
    n_layers = exact.n_layers
    rows = [[] for _ in range(n_layers - 1)]
    llama = LlamaLayers(model, n_layers)
    llama_rows = [[] for _ in range(n_layers - 1)]
    pairs = []
    for p, n in zip(pos, neg):
        tp = llm.tokenize(p.encode(), add_bos=True, special=True)
        tn = llm.tokenize(n.encode(), add_bos=True, special=True)
        length = max(len(tp), len(tn))
        tp += [pad] * (length - len(tp))
        tn += [pad] * (length - len(tn))
        pairs.append({"positive": tp, "negative": tn})
        outs = []
        for ids in (tp, tn):
            exact.layer_outs = []
            exact.hidden(ids)
            outs.append(exact.layer_outs)
        exact.layer_outs = None
        lp, ln = llama.outputs(tp), llama.outputs(tn)
        for il in range(n_layers - 1):
            diff = outs[0][il] - outs[1][il]
            rows[il].extend(r for r in diff if np.any(np.abs(r) > 1e-6))
            diff = lp[il] - ln[il]
            llama_rows[il].extend(r for r in diff if np.any(np.abs(r) > 1e-6))
        print(f"pair {len(pairs)}: {length} tokens", file=sys.stderr)
    mean, pca, gap, share = directions(rows)
    llama_mean, llama_pca, _, _ = directions(llama_rows)
    assert [len(r) for r in llama_rows] == [len(r) for r in rows]
    for name, ours, ref in [("mean", llama_mean, mean), ("pca", llama_pca, pca)]:
        cos = [float(a @ b) for a, b in zip(ours, ref)]
        print(f"llama.cpp's {name} vs exact: lowest cosine {min(cos):.6f}", file=sys.stderr)
    fmt = lambda vs: [[float(f"{x:.8g}") for x in v] for v in vs]
    with open(out, "w") as f:
        json.dump(
            {
                "producer": f"scripts/cvector_reference.py (llama-cpp-python {llama_cpp.__version__} tokens, "
                "exact float64 hidden states)",
                "pad": pad,
                "pairs": pairs,
                "rows": [len(r) for r in rows],
                "mean": fmt(mean),
                "pca": fmt(pca),
                "pca_gap": gap,
                "pca_share": share,
                "llama_cpp_mean": fmt(llama_mean),
                "llama_cpp_pca": fmt(llama_pca),
            },
            f,
        )
        f.write("\n")


if __name__ == "__main__":
    main()
