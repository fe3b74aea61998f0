"""Run gemma3 bench and llama.cpp (via llama-cpp-python) alternately on the
same model, thread count and token counts; print medians and ratios.

llama.cpp is timed through its C API as llama-bench does: pp = one batch of
N prompt tokens from an empty context; tg = N single-token decodes from an
empty context (or after `depth` tokens). Each engine runs each test once
unmeasured before its repetitions, as llama-bench does (gemma3 in every
process it starts, through `gemma3 bench`'s own warm-up)."""
import argparse, ctypes, json, os, random, statistics, subprocess, sys, time
import llama_cpp

def default_model():
    if os.environ.get("GEMMA3_MODEL"):
        return os.environ["GEMMA3_MODEL"]
    # As `gemma3`'s cache_dir: an empty variable, or a relative $XDG_CACHE_HOME, counts as unset.
    xdg = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(xdg):
        xdg = os.path.expanduser("~/.cache")
    base = os.environ.get("GEMMA3_CACHE") or os.path.join(xdg, "gemma3")
    return os.path.join(base, "gemma-3-270m-q4_k_m.gguf")

@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    pass

class LlamaCpp:
    def __init__(self, model, threads, n_ctx, lora=None):
        llama_cpp.llama_log_set(_quiet, None)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(model.encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = max(512, n_ctx)
        cp.n_ubatch = 512
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = 0 if hasattr(cp, "flash_attn_type") else None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        if lora:
            # At scale 1, as `gemma3 bench --lora` applies it.
            self.adapter = llama_cpp.llama_adapter_lora_init(self.model, lora.encode())
            if not self.adapter:
                raise RuntimeError(f"llama.cpp refused the adapter {lora}")
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")

    def clear(self):
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(mem, True)

    def decode(self, toks, pos0, logits_last=True):
        n = len(toks)
        b = llama_cpp.llama_batch_init(n, 0, 1)
        for i, t in enumerate(toks):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (logits_last and i == n - 1) else 0
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, b)
        llama_cpp.llama_batch_free(b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def pp(self, toks, depth_toks):
        self.clear()
        if depth_toks:
            for i in range(0, len(depth_toks), 512):
                self.decode(depth_toks[i:i + 512], i, False)
        t0 = time.perf_counter()
        for i in range(0, len(toks), 512):
            self.decode(toks[i:i + 512], len(depth_toks) + i)
        return len(toks) / (time.perf_counter() - t0)

    def tg(self, n, depth_toks):
        self.clear()
        if depth_toks:
            for i in range(0, len(depth_toks), 512):
                self.decode(depth_toks[i:i + 512], i, False)
        tok = 2
        t0 = time.perf_counter()
        for i in range(n):
            self.decode([tok], len(depth_toks) + i)
            # The token is kept fixed: an argmax over 262144 logits in Python
            # would cost more than the decode itself.
        return n / (time.perf_counter() - t0)

def gemma3(bin_, model, test, n, threads, depth, lora=None):
    args = [bin_, "bench", "-m", model, "-t", str(threads), "-r", "1", "-d", str(depth), "--json"]
    args += ["--lora", lora] if lora else []
    args += ["-p", str(n), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(n)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_tps"]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma3", required=True)
    ap.add_argument("-m", "--model", default=default_model())
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-t", default="1,2")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-d", type=int, default=0)
    ap.add_argument("--lora", help="a LoRA adapter (GGUF) both engines apply at scale 1")
    a = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for threads in [int(x) for x in a.t.split(",")]:
        tests = [("pp", int(x)) for x in a.p.split(",") if int(x) > 0] + [("tg", int(x)) for x in a.n.split(",") if int(x) > 0]
        n_ctx = a.d + max(n for _, n in tests) + 8
        ll = LlamaCpp(a.model, threads, n_ctx, a.lora)
        depth_toks = [rng.randrange(1000, 200000) for _ in range(a.d)]
        for test, n in tests:
            ours, theirs = [], []
            toks = [rng.randrange(1000, 200000) for _ in range(n)]
            # An unmeasured run first, as llama-bench does and as `gemma3
            # bench` does in each of its processes.
            ll.pp(toks, depth_toks) if test == "pp" else ll.tg(n, depth_toks)
            for _ in range(a.r):
                ours.append(gemma3(a.gemma3, a.model, test, n, threads, a.d, a.lora))
                theirs.append(ll.pp(toks, depth_toks) if test == "pp" else ll.tg(n, depth_toks))
            mo, mt = statistics.median(ours), statistics.median(theirs)
            rows.append((f"{test}{n}", threads, a.d, mo, mt))
            print(f"{test}{n:<5} d={a.d:<6} t={threads}  gemma3 {mo:8.1f} tok/s  llama.cpp {mt:8.1f} tok/s  ratio {mo / mt:5.2f}x  "
                  f"(gemma3 {min(ours):.1f}-{max(ours):.1f}, llama.cpp {min(theirs):.1f}-{max(theirs):.1f}, n={a.r})", flush=True)
    print(json.dumps([dict(test=r[0], threads=r[1], depth=r[2], gemma3=round(r[3], 1), llama_cpp=round(r[4], 1), ratio=round(r[3] / r[4], 2)) for r in rows]))

if __name__ == "__main__":
    main()
