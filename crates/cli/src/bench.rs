//! `gemma3 bench`: prompt processing (pp) and generation (tg) speed like
//! llama-bench, with medians and spread over repetitions, plus the
//! memory-bandwidth bound for generation on this machine.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_model::{Batch, ForwardState, KvCache, Model};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Path of a GGUF model file (default: $GEMMA3_MODEL, else the cached default model).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub lora: gemma3_server::LoraArgs,
    #[command(flatten)]
    pub control: gemma3_server::ControlArgs,
    /// Prompt lengths to process (comma-separated; 0 to skip).
    #[arg(short = 'p', long, value_delimiter = ',', default_value = "512")]
    pub prompt: Vec<usize>,
    /// Tokens to generate (comma-separated; 0 to skip).
    #[arg(
        short = 'n',
        long = "gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub gen: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// Tokens already in the context before each test (e.g. 512, 16000).
    #[arg(
        short = 'd',
        long = "ctx-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// One JSON object per result line.
    #[arg(long)]
    pub json: bool,
    /// Skip the unmeasured warm-up run before each test's repetitions.
    #[arg(long)]
    pub no_warmup: bool,
}

#[derive(Serialize)]
struct BenchResult {
    test: String,
    threads: usize,
    depth: usize,
    tokens: usize,
    reps: usize,
    median_tps: f64,
    min_tps: f64,
    max_tps: f64,
    /// Generation only: weights + KV bytes read per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_token: Option<u64>,
    /// Generation only: measured read bandwidth, GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    read_gbps: Option<f64>,
    /// Generation only: bandwidth-bound tokens/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_tps: Option<f64>,
    kernels: &'static str,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Read bandwidth with the current pool's threads: sum a 512 MiB buffer, best of 3 for
/// each way of reading it. The buffer is on 2 MB pages where the OS allows, as the packed
/// weights are. Each thread reads its parts (16 MB: on one Zen 5 thread, parts of 1 MB
/// read 1–4% slower) as one ascending stream, or as two (the lower
/// and upper half of each part side by side, 64 bytes at a time), as the AVX2 kernels read
/// one token's weights: a Zen 3 core reads two streams faster than one. The loop is
/// `ops::read_sum`, with 64-byte loads where the kernels have AVX-512 (the portable loop
/// read 10–15% slower on one Zen 5 thread, which had put generation above 100% of "the
/// bound").
fn read_bandwidth() -> f64 {
    let mut buf = vec![0u8; 512 << 20];
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64).to_le_bytes());
    }
    gemma3_kernels::packed::collapse_huge_pages(&buf);
    let mut best = 0.0f64;
    for streams in [1usize, 2, 1, 2, 1, 2] {
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(16 << 20)
            .map(|c| gemma3_kernels::ops::read_sum(c, streams))
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(buf.len() as f64 / dt / 1e9);
    }
    best
}

/// Deterministic, ordinary token ids: a fixed LCG over ids 1000..200 000 of
/// a Gemma vocabulary (no special tokens), or over all of a small one.
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let (lo, hi) = if vocab > 2000 {
        (1000, vocab.min(200_000))
    } else {
        (0, vocab.max(1))
    };
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (lo + (x >> 33) as usize % (hi - lo)) as u32
        })
        .collect()
}

/// Fill the cache with `depth` tokens (not timed).
fn prefill(model: &Model, cache: &mut KvCache, st: &mut ForwardState, depth: usize) -> Result<()> {
    if depth > 0 {
        let b = Batch::for_sequence(&tokens(depth, model.config.vocab_size), 0, false);
        model.forward(&b, std::slice::from_mut(cache), st)?;
    }
    Ok(())
}

pub fn run(a: BenchArgs, threads: Option<Vec<usize>>) -> Result<()> {
    // The arguments first: a mistake is named before the model loads.
    if a.reps == 0 || a.reps > 1000 {
        bail!("--reps must be between 1 and 1000");
    }
    for &t in threads.iter().flatten() {
        crate::check_threads(t)?;
    }
    if a.prompt.iter().chain(&a.gen).all(|&n| n == 0) {
        bail!("nothing to measure: every -p and -n length is 0");
    }
    let (loras, control) = (a.lora.specs()?, a.control.spec()?);
    let path = crate::model_path::resolve(a.model.clone(), true)?;
    let mut model = Model::open(&path).with_context(|| format!("loading {}", path.display()))?;
    gemma3_engine::apply_loras(&mut model, &loras)?;
    gemma3_engine::apply_control(&mut model, &control)?;
    // Measure the steady state that `gemma3_engine::load` reaches in the
    // background a moment after loading.
    for m in model.packed_mappings() {
        m.collapse_huge_pages();
    }
    let threads = threads.unwrap_or_else(|| {
        vec![std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)]
    });
    let kernels = gemma3_kernels::simd::best().name;
    let vocab = model.config.vocab_size;
    // Every test's context fits, checked before the first one runs.
    let ctx_len = model.config.ctx_len;
    for &depth in &a.depth {
        for &p in a.prompt.iter().filter(|&&p| p > 0) {
            if depth.checked_add(p).is_none_or(|c| c > ctx_len) {
                bail!("depth {depth} + prompt {p} exceeds the context of {ctx_len}");
            }
        }
        for &g in a.gen.iter().filter(|&&g| g > 0) {
            // Positions depth..depth + g: the last one is depth + g − 1.
            if depth.checked_add(g).is_none_or(|c| c > ctx_len) {
                bail!("depth {depth} + {g} generated tokens exceed the context of {ctx_len}");
            }
        }
    }
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
        pool.install(|| -> Result<()> {
            let bw = if a.gen.iter().any(|&g| g > 0) {
                read_bandwidth()
            } else {
                0.0
            };
            for &depth in &a.depth {
                for &p in &a.prompt {
                    if p == 0 {
                        continue;
                    }
                    let ctx = depth + p;
                    let mut cache = KvCache::try_new(&model.config, ctx)?;
                    let mut st = ForwardState::new();
                    let toks = tokens(p, vocab);
                    let mut tps = Vec::new();
                    // Warm-up, as llama-bench runs one (up to 32 prompt
                    // tokens there): here the whole prompt, unmeasured,
                    // because our buffers grow on first use where llama.cpp
                    // sizes its own when it creates the context.
                    if !a.no_warmup {
                        prefill(&model, &mut cache, &mut st, depth)?;
                        let b = Batch::for_sequence(&toks, depth, false);
                        model.forward(&b, std::slice::from_mut(&mut cache), &mut st)?;
                    }
                    for _ in 0..a.reps {
                        prefill(&model, &mut cache, &mut st, depth)?;
                        let b = Batch::for_sequence(&toks, depth, false);
                        let t0 = Instant::now();
                        model.forward(&b, std::slice::from_mut(&mut cache), &mut st)?;
                        tps.push(p as f64 / t0.elapsed().as_secs_f64());
                    }
                    report(
                        &a,
                        BenchResult::new(format!("pp{p}"), t, depth, p, &mut tps, kernels),
                    )?;
                }
                for &g in &a.gen {
                    if g == 0 {
                        continue;
                    }
                    // Positions 0..depth + g (checked against the context above).
                    let ctx = depth + g;
                    let mut cache = KvCache::try_new(&model.config, ctx)?;
                    let mut st = ForwardState::new();
                    let mut tps = Vec::new();
                    // Warm-up, as llama-bench's: one generated token, unmeasured.
                    if !a.no_warmup {
                        let mut b = Batch::default();
                        b.push(2, 0, 0, true);
                        model.forward(&b, std::slice::from_mut(&mut cache), &mut st)?;
                    }
                    for _ in 0..a.reps {
                        prefill(&model, &mut cache, &mut st, depth)?;
                        let mut b = Batch::default();
                        let mut tok = 2u32; // BOS, then the model's own greedy choices
                        let t0 = Instant::now();
                        for i in 0..g {
                            b.clear();
                            b.push(tok, depth + i, 0, true);
                            let logits =
                                model.forward(&b, std::slice::from_mut(&mut cache), &mut st)?;
                            tok = gemma3_engine::sampler::argmax(logits);
                        }
                        tps.push(g as f64 / t0.elapsed().as_secs_f64());
                    }
                    // The cache read at the run's middle position: K and V in f16
                    // for every position on global layers, the window's on the others.
                    let per_position = model.config.kv_dim() as u64 * 2 * 2;
                    let global = model.layers.iter().filter(|l| l.is_global).count() as u64;
                    let local = model.layers.len() as u64 - global;
                    let middle = depth + g / 2;
                    let kv_bytes = per_position
                        * (global * middle as u64
                            + local * middle.min(model.config.sliding_window) as u64);
                    let bytes = model.bytes_per_token() + kv_bytes;
                    let mut r = BenchResult::new(format!("tg{g}"), t, depth, g, &mut tps, kernels);
                    r.bytes_per_token = Some(bytes);
                    r.read_gbps = Some(bw);
                    r.bound_tps = Some(bw * 1e9 / bytes as f64);
                    report(&a, r)?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

impl BenchResult {
    fn new(
        test: String,
        threads: usize,
        depth: usize,
        tokens: usize,
        tps: &mut [f64],
        kernels: &'static str,
    ) -> Self {
        let min = tps.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = tps.iter().cloned().fold(0.0, f64::max);
        BenchResult {
            test,
            threads,
            depth,
            tokens,
            reps: tps.len(),
            median_tps: median(tps),
            min_tps: min,
            max_tps: max,
            bytes_per_token: None,
            read_gbps: None,
            bound_tps: None,
            kernels,
        }
    }
}

fn report(a: &BenchArgs, r: BenchResult) -> Result<()> {
    if a.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        let depth = if r.depth > 0 {
            format!(" @ d{}", r.depth)
        } else {
            String::new()
        };
        let mut line = format!(
            "{:>8}{:<9} t={:<2} {:>9.1} tok/s (min {:.1}, max {:.1}, n={}) [{}]",
            r.test, depth, r.threads, r.median_tps, r.min_tps, r.max_tps, r.reps, r.kernels
        );
        if let (Some(b), Some(bw), Some(bound)) = (r.bytes_per_token, r.read_gbps, r.bound_tps) {
            line += &format!(
                "  | {:.1} MB/token, read {:.1} GB/s → bound {:.1} tok/s, {:.0}% of it",
                b as f64 / 1e6,
                bw,
                bound,
                100.0 * r.median_tps / bound
            );
        }
        outln!("{line}")?;
    }
    Ok(())
}
