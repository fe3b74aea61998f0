#!/usr/bin/env python3
"""LoRA adapters for Gemma 3 270M and llama.cpp's logits with them: the
reference for `--lora` / `--lora-scaled` (crates/cli/tests/lora.rs).

Writes two adapters in llama.cpp's GGUF LoRA format (the one
`convert_lora_to_gguf.py` writes from a PEFT adapter: `general.type`
"adapter", `adapter.type` "lora", `adapter.lora.alpha`, and per adapted
matrix `blk.N.<name>.weight.lora_a` (ggml shape [n_in, rank]) and `.lora_b`
([rank, n_out])), made of seeded random numbers:

- `a.gguf`: rank 4, alpha 8 (so a scale of 2 per unit of the user's), every
  matrix (q k v o gate up down) of layers 0, 5 (global), 9 and 17 (global,
  the last), in F16;
- `b.gguf`: rank 2, no alpha (the user's scale as it is), q, v and down of
  every layer, A in F32 and B in BF16, plus a plain norm tensor
  (`blk.0.attn_norm.weight`, not a pair), which llama.cpp skips.

Then, with llama.cpp on the model, for each set of adapters (none; a; b;
a at 0.5 with b at 1.5) and each prompt: its five best logits at every
prompt position (one batch, logits at all positions), and 12 greedy tokens
generated one at a time with llama.cpp's gap between its two best logits
at each step.

And the exact logits with the same adapters (`exact`): scripts/exact_reference.py's
float64 pass over the weights as the `gguf` package dequantizes them, each
adapted matrix W replaced by W + scale · alpha / rank · B·A (the adapters
dequantized by `gguf` too), over the prompt and llama.cpp's greedy tokens:
at every position, the exact logits of llama.cpp's top 5 there (at the
prompt positions), of llama.cpp's greedy token (after the prompt) and of
the exact top 5.

    .venv-llamacpp/bin/python scripts/llama_cpp_lora.py MODEL.gguf crates/cli/tests/data/lora

(llama-cpp-python 0.3.36 from PyPI, built as scripts/bench-vs-llamacpp.sh
builds it; flash attention off, 2 threads; gguf 0.x and numpy from the same
venv.)
"""

import ctypes
import json
import os
import sys

import gguf
import numpy as np
import llama_cpp
from gguf.quants import dequantize
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_reference import Gemma3  # noqa: E402

D_MODEL, D_FF, Q_DIM, KV_DIM, LAYERS = 640, 2048, 1024, 256, 18
# name -> (n_in, n_out)
SHAPES = {
    "attn_q": (D_MODEL, Q_DIM),
    "attn_k": (D_MODEL, KV_DIM),
    "attn_v": (D_MODEL, KV_DIM),
    "attn_output": (Q_DIM, D_MODEL),
    "ffn_gate": (D_MODEL, D_FF),
    "ffn_up": (D_MODEL, D_FF),
    "ffn_down": (D_FF, D_MODEL),
}

PROMPTS = [
    "The capital of France is",
    "Review: The food was cold and the waiter was rude.\nSentiment:",
    "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n",
]
GREEDY = 12


def prompt_case(llm, prompt):
    """llama.cpp on `prompt` as it is set up now: its ids, its five best logits at every prompt
    position (one batch, logits at all positions), and GREEDY tokens generated one at a time with
    the gap between its two best logits at each step."""
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    top5 = []
    for row in logits:
        best = np.argsort(-row)[:5]
        top5.append([[int(t), float(row[t])] for t in best])
    tokens, margins = greedy(llm, ids, GREEDY)
    return {
        "prompt": prompt,
        "ids": ids,
        "prompt_top5": top5,
        "greedy": tokens,
        "greedy_margins": margins,
    }


def exact_rows(exact, case):
    """The exact logits along a case's path (its prompt and llama.cpp's greedy tokens), at every
    position those of the exact top 5, of llama.cpp's top 5 there (prompt positions) and of
    llama.cpp's greedy token (after the prompt)."""
    logits = exact.logits(case["ids"] + case["greedy"][:-1])
    rows = []
    for i, row in enumerate(logits):
        want = [int(t) for t in np.argsort(-row)[:5]]
        if i < len(case["ids"]):
            want += [t for t, _ in case["prompt_top5"][i]]
        if i >= len(case["ids"]) - 1:
            want.append(case["greedy"][i - len(case["ids"]) + 1])
        ids = list(dict.fromkeys(want))
        rows.append([[t, float(row[t])] for t in ids])
    return rows


def greedy(llm, ids, n, stop=None):
    """`n` greedy tokens after `ids`, one at a time as llama-cli generates (up to and
    including `stop` if given), and the gap between llama.cpp's two best logits at each."""
    llm.reset()
    llm.eval(ids)
    row = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    tokens, margins = [], []
    for _ in range(n):
        order = np.argsort(-row)
        t = int(order[0])
        tokens.append(t)
        margins.append(float(row[order[0]] - row[order[1]]))
        if t == stop:
            break
        llm.eval([t])
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    return tokens, margins


def write_adapter(path, rank, alpha, targets, a_type, b_type, seed, b_sigma, extra_norm=False):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    w.add_name(os.path.basename(path))

    def put(name, arr, ty):
        if ty == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif ty == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif ty == "BF16":
            # Round to nearest even, then keep the top 16 bits.
            bits = arr.astype(np.float32).view(np.uint32)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            raw = bits.astype(np.uint16)
            # (Given as bytes: the writer reads the shape of a raw tensor in bytes.)
            w.add_tensor(name, raw.view(np.uint8).reshape(arr.shape[0], -1),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            raise ValueError(ty)

    for layer, names in targets:
        for name in names:
            n_in, n_out = SHAPES[name]
            a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
            b = rng.standard_normal((n_out, rank)) * b_sigma
            base = f"blk.{layer}.{name}.weight"
            put(base + ".lora_a", a, a_type)
            put(base + ".lora_b", b, b_type)
    if extra_norm:
        put("blk.0.attn_norm.weight", rng.standard_normal(D_MODEL), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    a_path, b_path = os.path.join(out, "a.gguf"), os.path.join(out, "b.gguf")
    write_adapter(a_path, 4, 8.0, [(l, list(SHAPES)) for l in (0, 5, 9, 17)], "F16", "F16", 1, 0.1)
    write_adapter(b_path, 2, None, [(l, ["attn_q", "attn_v", "ffn_down"]) for l in range(LAYERS)],
                  "F32", "BF16", 2, 0.12, extra_norm=True)

    llm = Llama(model, n_ctx=512, n_threads=2, logits_all=True, verbose=False, flash_attn=False)
    adapters = {
        name: llama_cpp.llama_adapter_lora_init(llm._model.model, p.encode())
        for name, p in (("a", a_path), ("b", b_path))
    }
    assert all(adapters.values()), "llama.cpp refused an adapter"
    configs = [[], [["a", 1.0]], [["b", 1.0]], [["a", 0.5], ["b", 1.5]]]
    cases = []
    for config in configs:
        n = len(config)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[adapters[a] for a, _ in config])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in config])
        assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, n, scales) == 0
        for prompt in PROMPTS:
            cases.append({"adapters": config, **prompt_case(llm, prompt)})
    exact = Gemma3(model)
    adapter_files = {"a": a_path, "b": b_path}
    for case in cases:
        # The adapted matrices, merged in float64; the others as dequantized.
        for name in [k for k in exact.cache if k.startswith("blk.")]:
            del exact.cache[name]
        for adapter, scale in case["adapters"]:
            r = gguf.GGUFReader(adapter_files[adapter])
            alpha_field = r.fields.get("adapter.lora.alpha")
            alpha = float(alpha_field.contents()) if alpha_field else 0.0
            t = {x.name: x for x in r.tensors}
            for name in t:
                if not name.endswith(".lora_a"):
                    continue
                base = name[: -len(".lora_a")]
                a, b = t[name], t[base + ".lora_b"]
                am = dequantize(a.data, a.tensor_type).astype(np.float64).reshape([int(s) for s in reversed(a.shape)])
                bm = dequantize(b.data, b.tensor_type).astype(np.float64).reshape([int(s) for s in reversed(b.shape)])
                rank = am.shape[0]
                s = scale * alpha / rank if alpha else scale
                exact.cache[base] = exact.w(base) + s * (bm @ am)
        case["exact"] = exact_rows(exact, case)

    json.dump({
        "producer": f"scripts/llama_cpp_lora.py, llama-cpp-python {llama_cpp.__version__}, flash attention off, 2 threads",
        "adapters": {"a": "a.gguf", "b": "b.gguf"},
        "cases": cases,
    }, sys.stdout if out == "-" else open(os.path.join(out, "llama_cpp_lora.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
