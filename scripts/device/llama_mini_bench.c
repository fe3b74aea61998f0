// llama.cpp's side of scripts/bench_vs_llamacpp.py, in C, for machines
// without Python packages: the same decodes through the same C API.
//
//   llama_mini_bench MODEL THREADS pp|tg N DEPTH REPS
//
// pp = one batch of N prompt tokens (in batches of 512) after DEPTH tokens;
// tg = N single-token decodes after DEPTH tokens. Prints one tokens/s figure
// per repetition. Build: gcc -O2 llama_mini_bench.c -I INCLUDE -L LIB -lllama
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)level, (void)text, (void)user;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void decode(struct llama_context *ctx, const llama_token *toks, int n, int pos0, int logits_last) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i];
        b.pos[i] = pos0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = logits_last && i == n - 1;
    }
    b.n_tokens = n;
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    if (rc != 0) {
        fprintf(stderr, "llama_decode returned %d\n", rc);
        exit(1);
    }
}

static void fill(struct llama_context *ctx, const llama_token *toks, int n, int pos0, int logits_last) {
    for (int i = 0; i < n; i += 512)
        decode(ctx, toks + i, n - i < 512 ? n - i : 512, pos0 + i, logits_last);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s MODEL THREADS pp|tg N DEPTH REPS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]), n = atoi(argv[4]), depth = atoi(argv[5]), reps = atoi(argv[6]);
    int pp = strcmp(argv[3], "pp") == 0;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = depth + n + 8;
    cp.n_batch = cp.n_ctx > 512 ? cp.n_ctx : 512;
    cp.n_ubatch = 512;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    llama_token *toks = malloc(sizeof(llama_token) * (depth + n + 1));
    srand(0);
    for (int i = 0; i < depth + n; i++) toks[i] = 1000 + rand() % 199000;
    for (int r = 0; r < reps; r++) {
        llama_memory_clear(llama_get_memory(ctx), true);
        if (depth) fill(ctx, toks, depth, 0, 0);
        double t0 = now();
        if (pp) {
            fill(ctx, toks + depth, n, depth, 1);
        } else {
            llama_token tok = 2;
            for (int i = 0; i < n; i++) decode(ctx, &tok, 1, depth + i, 1);
        }
        printf("%.2f\n", n / (now() - t0));
        fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
