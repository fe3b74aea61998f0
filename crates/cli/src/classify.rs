//! `gemma3 classify`: each text's label, the one the model finds likeliest
//! after it. A label's score is the sum of its tokens' log-probabilities
//! given the prompt and the label's tokens before them (how
//! lm-evaluation-harness scores a multiple-choice answer, and what the
//! server's `echo` with `logprobs` reports token by token).

use anyhow::{Context, Result};
use clap::Args;
use gemma3_engine::Session;

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// A label (repeatable; at least two). Its text follows the prompt as
    /// written: " positive" after "Sentiment:" starts with its space.
    #[arg(short, long = "label", value_name = "TEXT", required = true)]
    labels: Vec<String>,
    /// The prompt around each text, with `{text}` where the text goes
    /// (default: the text alone). Special-token text is parsed and BOS comes
    /// first, as a completion's prompt.
    #[arg(short, long, default_value = "{text}")]
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
    if !a.template.contains("{text}") {
        anyhow::bail!("--template must contain {{text}}, where each text goes");
    }
    let texts = a.input.read()?;
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let (model, tok) =
        gemma3_engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    // A label's tokens as they follow the prompt: its text alone, no BOS,
    // special-token text not parsed.
    let labels: Vec<Vec<u32>> = (a.labels.iter())
        .map(|l| tok.encode(l, false, false))
        .collect();
    let longest = labels.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = Session::try_new(&model, model.config.ctx_len)?;
    for (text, name) in &texts {
        let prompt = gemma3_engine::encode_prompt(&tok, &a.template.replace("{text}", text));
        if prompt.len() + longest > session.ctx() {
            anyhow::bail!(
                "{name} with its prompt and longest label has {} tokens, more than the model's context of {}",
                prompt.len() + longest,
                session.ctx()
            );
        }
        let mut scores = Vec::with_capacity(labels.len());
        for label in &labels {
            let mut logits = session.eval_prompt(&prompt, false)?.0.to_vec();
            let mut score = 0.0f64;
            for (k, &t) in label.iter().enumerate() {
                let lse = gemma3_engine::sampler::logsumexp(&logits);
                score += f64::from(logits[t as usize] - lse);
                if k + 1 < label.len() {
                    logits = session.step(t)?.to_vec();
                }
            }
            scores.push(score);
        }
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
