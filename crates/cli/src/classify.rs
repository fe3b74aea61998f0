//! `gemma3 classify`: each text's label, the one the model finds likeliest
//! after it. A label's score is the sum of its tokens' log-probabilities
//! given the prompt and the label's tokens before them (how
//! lm-evaluation-harness scores a multiple-choice answer, and what the
//! server's `echo` with `logprobs` reports token by token).

use anyhow::Result;
use clap::Args;
use gemma3_model::{Batch, ForwardState, KvCache, Model};
use rayon::prelude::*;

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    #[command(flatten)]
    lora: gemma3_server::LoraArgs,
    #[command(flatten)]
    control: gemma3_server::ControlArgs,
    /// A label (repeatable; at least two). Its text follows the prompt as
    /// written: " positive" after "Sentiment:" starts with its space.
    #[arg(short, long = "label", value_name = "TEXT", required = true)]
    labels: Vec<String>,
    /// The prompt around each text, with `{text}` where the text goes
    /// (default: the text alone). Special-token text is parsed and BOS comes
    /// first, as a completion's prompt. (No short flag: `-t` is the
    /// threads, on every command.)
    #[arg(long, default_value = "{text}")]
    template: String,
    /// One JSON object per text: the label and every label's score.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    input: crate::embed::Texts,
}

pub fn run(a: ClassifyArgs) -> Result<()> {
    if a.labels.len() < 2 {
        anyhow::bail!("give at least two labels (--label TEXT, repeated) to choose between");
    }
    if let Some(i) = a.labels.iter().position(String::is_empty) {
        anyhow::bail!("label {} is empty: a label must have text to score", i + 1);
    }
    for (j, l) in a.labels.iter().enumerate() {
        if let Some(i) = a.labels[..j].iter().position(|k| k == l) {
            anyhow::bail!("label {} repeats label {} ({l:?})", j + 1, i + 1);
        }
    }
    if !a.template.contains("{text}") {
        anyhow::bail!("--template must contain {{text}}, where each text goes");
    }
    let texts = a.input.read()?;
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let (model, tok) = crate::load(&path, &a.lora, &a.control)?;
    // A label's tokens as they follow the prompt: its text alone, no BOS,
    // special-token text not parsed.
    let labels: Vec<Vec<u32>> = (a.labels.iter())
        .map(|l| tok.encode(l, false, false))
        .collect();
    let longest = labels.iter().map(Vec::len).max().unwrap_or(0);
    let ctx_len = model.config.ctx_len;
    let mut state = ForwardState::new();
    for (text, name) in &texts {
        let prompt = gemma3_engine::encode_prompt(&tok, &a.template.replace("{text}", text));
        let need = prompt.len() + longest;
        if need > ctx_len {
            anyhow::bail!(
                "{name} with its prompt and longest label has {need} tokens, more than the model's context of {ctx_len}"
            );
        }
        let scores = score_labels(&model, &mut state, &prompt, &labels, need)?;
        let best = (0..scores.len())
            .max_by(|&i, &j| scores[i].total_cmp(&scores[j]))
            .unwrap_or(0);
        if a.json {
            let all: serde_json::Map<String, serde_json::Value> = (a.labels.iter())
                .zip(&scores)
                .map(|(l, s)| (l.clone(), serde_json::json!(s)))
                .collect();
            let line = serde_json::json!({"label": a.labels[best], "scores": all});
            outln!("{line}")?;
        } else {
            outln!("{}", a.labels[best])?;
        }
    }
    Ok(())
}

/// Each label's score after `prompt`: the prompt is read once (cache 0);
/// each label then continues from a copy of its cache (cache j + 1), the
/// labels in one forward pass (a token's result does not depend on the
/// batch it is in), where reading them one after another took 77 passes
/// of a few tokens for banking77's labels. The copies are made for as many
/// labels at a time as half the free memory holds: 150 labels after a
/// 9000-token text had taken 4.7 GB, and a 32 768-token one would take
/// about 16.
fn score_labels(
    model: &Model,
    state: &mut ForwardState,
    prompt: &[u32],
    labels: &[Vec<u32>],
    ctx: usize,
) -> Result<Vec<f64>> {
    let vocab = model.config.vocab_size;
    let mut caches = vec![KvCache::try_new(&model.config, ctx)?];
    let batch = Batch::for_sequence(prompt, 0, false);
    let last = model.forward(&batch, &mut caches, state)?.to_vec();
    // Scores from a broken model's logits (NaN or ±∞: overflow) would rank
    // the labels silently wrong.
    let broken = || anyhow::anyhow!("{}", gemma3_engine::session::NON_FINITE);
    if !gemma3_engine::sampler::all_finite(&last) {
        return Err(broken());
    }
    let lse = gemma3_engine::sampler::logsumexp(&last);
    let mut scores: Vec<f64> = (labels.iter())
        .map(|l| f64::from(last[l[0] as usize] - lse))
        .collect();
    let per_cache = KvCache::bytes_for(&model.config, ctx).max(1);
    let room = gemma3_server::available_memory().map_or(usize::MAX, |b| (b / 2) as usize);
    let group = (room / per_cache).clamp(1, labels.len().max(1));
    for (g, part) in labels.chunks(group).enumerate() {
        // The labels' tokens but their last, each label on its own sequence.
        caches.truncate(1);
        let mut batch = Batch::default();
        for (j, label) in part.iter().enumerate() {
            if label.len() < 2 {
                continue;
            }
            let mut copy = KvCache::try_new(&model.config, ctx)?;
            if !copy.copy_prefix_from(&caches[0], prompt.len(), prompt.len()) {
                anyhow::bail!(
                    "the prompt's cache could not be copied for label {}",
                    g * group + j + 1
                );
            }
            caches.push(copy);
            for (k, &t) in label[..label.len() - 1].iter().enumerate() {
                batch.push(t, prompt.len() + k, caches.len() - 1, true);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let logits = model.forward(&batch, &mut caches, state)?;
        // Each row's log-probability of the label token after it, the rows
        // (a vocabulary each) shared between the threads.
        let targets: Vec<(usize, u32)> = (part.iter().enumerate())
            .flat_map(|(j, l)| l.iter().skip(1).map(move |&t| (g * group + j, t)))
            .collect();
        let logprobs: Vec<Option<f32>> = (logits.par_chunks(vocab).zip(&targets))
            .map(|(r, &(_, t))| {
                gemma3_engine::sampler::all_finite(r).then(|| gemma3_engine::sampler::logprob(r, t))
            })
            .collect();
        let logprobs: Vec<f32> = logprobs
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(broken)?;
        for (&(j, _), lp) in targets.iter().zip(logprobs) {
            scores[j] += f64::from(lp);
        }
    }
    Ok(scores)
}
