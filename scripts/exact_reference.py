#!/usr/bin/env python3
"""An exact (float64) Gemma 3 forward pass over the dequantized weights of a GGUF file, for
fixture generation: no activation quantization, no f16 KV cache, so its logits are the
mathematically exact ones for these weights, free of any engine's rounding.

Independent of gemma3-rs: weights are dequantized by the Python `gguf` package
(`gguf.quants.dequantize`), the math follows Hugging Face transformers' modeling_gemma3.py with
llama.cpp's GGUF conventions (norm weights already hold 1 + w; tied output head; every 6th layer
global with rope.freq_base, the others local with base 10000 and a sliding window).

Usage:
    python3 scripts/exact_reference.py [--model MODEL.gguf] [--out FILE.json]

Writes, for each of reference.json's 10 greedy prompts, one pass over the prompt followed by
llama.cpp's greedy tokens: at each of the 32 generation steps the exact logit of llama.cpp's
token, the exact top-5 and every token within 1.0 of the best; for the 3 prompts with `prompt_top5_logits`, at every prompt
position the exact logits of llama.cpp's top-5 tokens and the exact top-5.
"""

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class Gemma3:
    def __init__(self, path: Path):
        r = gguf.GGUFReader(path)
        self.f = {k: f for k, f in r.fields.items()}
        self.t = {t.name: t for t in r.tensors}
        g = lambda k: self.f[k].contents()
        self.n_layers = g("gemma3.block_count")
        self.d = g("gemma3.embedding_length")
        self.n_heads = g("gemma3.attention.head_count")
        self.n_kv = g("gemma3.attention.head_count_kv")
        self.hd = g("gemma3.attention.key_length")
        self.eps = g("gemma3.attention.layer_norm_rms_epsilon")
        self.base_global = g("gemma3.rope.freq_base")
        self.base_local = 10000.0
        self.window = g("gemma3.attention.sliding_window")
        self.cache = {}
        # Control vectors: layer -> direction added to that layer's output.
        self.control = {}
        # When a list: each layer's output (after its control vector) is appended to it.
        self.layer_outs = None

    def w(self, name: str) -> np.ndarray:
        if name not in self.cache:
            t = self.t[name]
            x = dequantize(t.data, t.tensor_type).astype(np.float64)
            shape = [int(s) for s in reversed(t.shape)]  # numpy order: (rows, cols)
            self.cache[name] = x.reshape(shape)
        return self.cache[name]

    def rms(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x: np.ndarray, base: float) -> np.ndarray:
        # x: (n, heads, hd); NeoX pairs (i, i + hd/2); theta = pos * base^(-2i/hd)
        n, _, hd = x.shape
        inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        theta = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)

    def logits(self, ids: list[int]) -> np.ndarray:
        emb = self.w("token_embd.weight")
        head = self.w("output.weight") if "output.weight" in self.t else emb
        return self.hidden(ids) @ head.T

    def hidden(self, ids: list[int]) -> np.ndarray:
        """The final hidden states (after the output norm), one row per position."""
        n, d, hd = len(ids), self.d, self.hd
        emb = self.w("token_embd.weight")
        x = emb[ids] * np.sqrt(d)
        group = self.n_heads // self.n_kv
        pos = np.arange(n)
        for l in range(self.n_layers):
            p = lambda s: self.w(f"blk.{l}.{s}.weight")
            is_global = (l + 1) % 6 == 0
            base = self.base_global if is_global else self.base_local
            xn = self.rms(x, p("attn_norm"))
            q = (xn @ p("attn_q").T).reshape(n, self.n_heads, hd)
            k = (xn @ p("attn_k").T).reshape(n, self.n_kv, hd)
            v = (xn @ p("attn_v").T).reshape(n, self.n_kv, hd)
            q = self.rope(self.rms(q, p("attn_q_norm")), base) / np.sqrt(hd)
            k = self.rope(self.rms(k, p("attn_k_norm")), base)
            mask = pos[None, :] <= pos[:, None]
            if not is_global:
                mask &= pos[:, None] - pos[None, :] < self.window
            out = np.empty((n, self.n_heads, hd))
            for h in range(self.n_heads):
                s = q[:, h, :] @ k[:, h // group, :].T
                s = np.where(mask, s, -np.inf)
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                out[:, h, :] = s @ v[:, h // group, :]
            o = out.reshape(n, -1) @ p("attn_output").T
            x = x + self.rms(o, p("post_attention_norm"))
            xn = self.rms(x, p("ffn_norm"))
            gte, up = xn @ p("ffn_gate").T, xn @ p("ffn_up").T
            act = 0.5 * gte * (1 + np.tanh(np.sqrt(2 / np.pi) * (gte + 0.044715 * gte**3))) * up
            o = act @ p("ffn_down").T
            x = x + self.rms(o, p("post_ffw_norm"))
            if l in self.control:
                x = x + self.control[l]
            if self.layer_outs is not None:
                self.layer_outs.append(x.copy())
        return self.rms(x, self.w("output_norm.weight"))


def main() -> None:
    ap = argparse.ArgumentParser()
    default_model = os.environ.get("GEMMA3_MODEL") or str(
        Path.home() / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    )
    ap.add_argument("--model", default=default_model)
    ap.add_argument("--out", default=str(ROOT / "crates/cli/tests/data/exact_logits.json"))
    args = ap.parse_args()
    h = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()
    assert h == MODEL_SHA256, f"model sha256 {h}"
    ref = json.loads((ROOT / "crates/cli/tests/data/reference.json").read_text())
    m = Gemma3(Path(args.model))
    cases = []
    for g in ref["greedy32"]:
        # One pass over the prompt and llama.cpp's first 31 generated tokens: position
        # len(prompt) - 1 + s predicts generated token s.
        ids = g["prompt_ids"] + g["ids"][:-1]
        lg = m.logits(ids)
        n_prompt = len(g["prompt_ids"])
        top5 = lambda row: [[int(t), round(float(row[t]), 4)] for t in np.argsort(-row)[:5]]
        prompt_positions = []
        if "prompt_top5_logits" in g:
            for i, lc in enumerate(g["prompt_top5_logits"]):
                prompt_positions.append(
                    {
                        "top5": top5(lg[i]),
                        "at_llama_cpp_top5": [[int(t), round(float(lg[i][int(t)]), 4)] for t, _ in lc],
                    }
                )
        steps = []
        for s_, tok in enumerate(g["ids"]):
            row = lg[n_prompt - 1 + s_]
            near = np.nonzero(row >= row.max() - 1.0)[0]
            near = near[np.argsort(-row[near])]
            steps.append(
                {
                    "llama_cpp_token": tok,
                    "its_logit": round(float(row[tok]), 4),
                    "top5": top5(row),
                    "within_1": [[int(t), round(float(row[t]), 4)] for t in near],
                }
            )
        cases.append({"prompt": g["prompt"], "prompt_positions": prompt_positions, "greedy_steps": steps})
        print(repr(g["prompt"][:40]), len(ids), "positions")
    out = {
        "provenance": {
            "generator": "scripts/exact_reference.py",
            "command": "python3 scripts/exact_reference.py",
            "method": "float64 forward pass over weights dequantized by gguf.quants.dequantize; "
            "no activation quantization, no KV rounding",
            "gguf_version": "0.19.0",
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "model_sha256": MODEL_SHA256,
        },
        "cases": cases,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
