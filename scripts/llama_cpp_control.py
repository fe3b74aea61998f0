#!/usr/bin/env python3
"""Control vectors for Gemma 3 270M and llama.cpp's logits with them: the
reference for `--control-vector`, `--control-vector-scaled` and
`--control-vector-layer-range` (crates/cli/tests/control.rs).

Writes two control vectors in llama.cpp's format (the one
llama-cvector-generator and repeng write: 1-D F32 tensors `direction.N`,
N >= 1 the layer whose output takes it; `controlvector.model_hint` and
`controlvector.layer_count` as metadata, which llama.cpp does not read),
made of seeded normal numbers:

- `a.gguf`: every layer from 1 to 17, standard deviation 0.5 an entry;
- `b.gguf`: layers 3, 8 and 14 (standard deviation 1), and a direction.18,
  for a layer this model lacks, which llama.cpp leaves out.

Then, with llama.cpp on the model (the vectors summed times their strengths
as llama.cpp's common loader sums them, and given to
`llama_set_adapter_cvec` with the layer range), for each case (none; a; b;
a at -1.5 with b at 2 on layers 4 to 12) and each prompt: its five best
logits at every prompt position (one batch, logits at all positions), and
12 greedy tokens generated one at a time with llama.cpp's gap between its
two best logits at each step.

And the exact logits with the same vectors (`exact`): scripts/exact_reference.py's
float64 pass over the weights as the `gguf` package dequantizes them, each
layer's direction added to its output, over the prompt and llama.cpp's greedy
tokens: at every position, the exact logits of llama.cpp's top 5 there (at the
prompt positions), of llama.cpp's greedy token (after the prompt) and of the
exact top 5.

    .venv-llamacpp/bin/python scripts/llama_cpp_control.py MODEL.gguf crates/cli/tests/data/control

(llama-cpp-python 0.3.36 from PyPI, built as scripts/bench-vs-llamacpp.sh
builds it; flash attention off, 2 threads; gguf and numpy in the same venv.)
"""

import ctypes
import json
import os
import sys

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_reference import Gemma3  # noqa: E402
from llama_cpp_lora import PROMPTS, exact_rows, prompt_case  # noqa: E402

D_MODEL, LAYERS = 640, 18


def write_vector(path, layers, sigma, seed):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "gemma3")
    w.add_int32("controlvector.layer_count", len(layers))
    for layer in layers:
        w.add_tensor(f"direction.{layer}", (rng.standard_normal(D_MODEL) * sigma).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def directions(path):
    """layer -> direction, as float32, from a control vector file."""
    r = gguf.GGUFReader(path)
    return {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32) for t in r.tensors}


def summed(files, config):
    """llama.cpp's common loader: each file's directions times its strength, summed per layer
    (layer N at offset (N - 1) * n_embd, zeros where none)."""
    out = {}
    for name, strength in config:
        for layer, v in directions(files[name]).items():
            out[layer] = out.get(layer, np.zeros(D_MODEL, dtype=np.float32)) + v * np.float32(strength)
    return out


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    files = {"a": os.path.join(out, "a.gguf"), "b": os.path.join(out, "b.gguf")}
    write_vector(files["a"], range(1, LAYERS), 0.5, 11)
    write_vector(files["b"], [3, 8, 14, 18], 1.0, 12)

    llm = Llama(model, n_ctx=512, n_threads=2, logits_all=True, verbose=False, flash_attn=False)
    # (vectors, first layer, last layer)
    configs = [([], None), ([["a", 1.0]], None), ([["b", 1.0]], None), ([["a", -1.5], ["b", 2.0]], [4, 12])]
    cases = []
    for config, layer_range in configs:
        dirs = summed(files, config)
        first, last = layer_range or [1, LAYERS]
        if dirs:
            data = np.zeros(max(dirs) * D_MODEL, dtype=np.float32)
            for layer, v in dirs.items():
                data[(layer - 1) * D_MODEL : layer * D_MODEL] = v
            buf = (ctypes.c_float * len(data))(*data.tolist())
            assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, buf, len(data), D_MODEL, first, last) == 0
        else:
            assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, D_MODEL, -1, -1) == 0
        for prompt in PROMPTS:
            cases.append({"vectors": config, "layer_range": layer_range, **prompt_case(llm, prompt)})
    exact = Gemma3(model)
    for case in cases:
        first, last = case["layer_range"] or [1, LAYERS]
        # (As llama.cpp: layer 0 and layers beyond the model's never take one.)
        exact.control = {
            layer: v.astype(np.float64)
            for layer, v in summed(files, case["vectors"]).items()
            if first <= layer <= last and layer < LAYERS
        }
        case["exact"] = exact_rows(exact, case)

    json.dump({
        "producer": f"scripts/llama_cpp_control.py, llama-cpp-python {llama_cpp.__version__}, flash attention off, 2 threads",
        "vectors": {"a": "a.gguf", "b": "b.gguf"},
        "cases": cases,
    }, open(os.path.join(out, "llama_cpp_control.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
