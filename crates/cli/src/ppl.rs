//! `gemma3 ppl`: perplexity exactly as llama-perplexity computes it —
//! tokenize the whole file with BOS, cut it into non-overlapping chunks of
//! `ctx` tokens, set each chunk's first token to BOS, score the second half
//! of each chunk (position i predicts token i+1), print a running value per
//! chunk and the final `PPL = …`.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_model::{Batch, ForwardState, KvCache};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Args)]
pub struct PplArgs {
    /// Path of a GGUF model file (default: $GEMMA3_MODEL, else the cached default model).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub lora: gemma3_server::LoraArgs,
    #[command(flatten)]
    pub control: gemma3_server::ControlArgs,
    /// Tokens per chunk.
    #[arg(short = 'c', long, default_value_t = 512)]
    pub ctx: usize,
    /// Most chunks to score (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Tokens per forward call (logits are kept for at most this many at once).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    pub file: PathBuf,
}

/// Mean negative log-likelihood terms for a chunk: log-softmax in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

/// The most text `ppl` reads: far more than any test set (wikitext-2's is
/// 1.3 MB; 64 MiB is some 16 million tokens, hours of scoring), and a
/// bound for a file that never ends, such as /dev/zero. Tokenizing takes
/// about 44 bytes of memory a byte of text (32 MiB of one letter: 1.4 GB).
const MAX_TEXT_BYTES: u64 = 64 << 20;

fn read_text(path: &std::path::Path) -> Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        bail!("the text is longer than {} MiB", MAX_TEXT_BYTES >> 20);
    }
    String::from_utf8(bytes).context("the text is not UTF-8")
}

pub fn run(a: PplArgs) -> Result<()> {
    // The arguments first: a mistake is named before the model loads.
    if a.chunks == Some(0) {
        bail!("--chunks must be at least 1 (leave it out to score every chunk)");
    }
    if a.batch == 0 || a.batch > 4096 {
        bail!("--batch must be between 1 and 4096, got {}", a.batch);
    }
    let path = crate::model_path::resolve(a.model.clone(), true)?;
    let (model, tok) = crate::load(&path, &a.lora, &a.control)?;
    if model.config.ctx_len < 4 {
        bail!(
            "the model's context of {} tokens is too short to measure perplexity (4 at least)",
            model.config.ctx_len
        );
    }
    if a.ctx < 4 || a.ctx > model.config.ctx_len {
        bail!(
            "--ctx must be between 4 and {}, got {}",
            model.config.ctx_len,
            a.ctx
        );
    }
    let text = read_text(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let tokens = tok.encode(&text, true, false);
    let available = tokens.len() / a.ctx;
    if available == 0 {
        bail!(
            "{} has {} tokens (BOS included), fewer than one chunk of {} (--ctx)",
            a.file.display(),
            tokens.len(),
            a.ctx
        );
    }
    let n_chunks = a.chunks.map_or(available, |c| c.min(available));
    eprintln!(
        "{} tokens, {} chunks of {} (scoring the second half of each)",
        tokens.len(),
        n_chunks,
        a.ctx
    );
    let bos = tok.specials().bos;
    let mut cache = KvCache::try_new(&model.config, a.ctx)?;
    let mut st = ForwardState::new();
    let first = a.ctx / 2;
    let vocab = model.config.vocab_size;
    let (mut total, mut count) = (0.0f64, 0usize);
    let t0 = std::time::Instant::now();
    for c in 0..n_chunks {
        let mut chunk = tokens[c * a.ctx..(c + 1) * a.ctx].to_vec();
        chunk[0] = bos;
        let mut start = 0;
        while start < a.ctx {
            let end = (start + a.batch).min(a.ctx);
            let mut batch = Batch::default();
            for (p, &t) in chunk.iter().enumerate().take(end).skip(start) {
                // Position p's logits predict token p+1, scored for first <= p < ctx-1.
                batch.push(t, p, 0, p >= first && p + 1 < a.ctx);
            }
            let logits = model.forward(&batch, std::slice::from_mut(&mut cache), &mut st)?;
            for (j, p) in (start..end)
                .filter(|&p| p >= first && p + 1 < a.ctx)
                .enumerate()
            {
                total += nll(&logits[j * vocab..(j + 1) * vocab], chunk[p + 1]);
                count += 1;
            }
            start = end;
        }
        if !total.is_finite() {
            bail!("chunk {}: {}", c + 1, gemma3_engine::session::NON_FINITE);
        }
        write!(
            std::io::stdout(),
            "[{}]{:.4},",
            c + 1,
            (total / count as f64).exp()
        )?;
        std::io::stdout().flush()?;
    }
    outln!()?;
    eprintln!(
        "{:.1} s, {:.1} tokens/s",
        t0.elapsed().as_secs_f64(),
        (n_chunks * a.ctx) as f64 / t0.elapsed().as_secs_f64()
    );
    outln!("PPL = {:.4}", (total / count as f64).exp())?;
    Ok(())
}
