//! `gemma3 embed`: texts to vectors, as llama.cpp's `llama-embedding` makes
//! them (`--pooling`, `--embd-normalize`), one JSON array per text on stdout.

use anyhow::{Context, Result};
use clap::Args;
use gemma3_engine::Pooling;
use std::path::PathBuf;

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    #[command(flatten)]
    lora: gemma3_server::LoraArgs,
    #[command(flatten)]
    control: gemma3_server::ControlArgs,
    /// How a text's hidden states become one vector: mean (every token's,
    /// BOS included), last (the last token's) or cls (the first token's: BOS,
    /// the same for every text).
    #[arg(long, default_value = "mean", value_parser = str::parse::<Pooling>)]
    pooling: Pooling,
    /// 2: scale each vector to unit length (Euclidean, llama.cpp's default);
    /// -1: leave it as pooled.
    #[arg(long, default_value = "2", allow_hyphen_values = true, value_parser = parse_normalize, action = clap::ArgAction::Set)]
    embd_normalize: bool,
    #[command(flatten)]
    input: Texts,
}

/// Texts given on the command line or read from a file, one per line: what
/// `embed` and `classify` work through.
#[derive(Args)]
pub struct Texts {
    /// Read the texts from FILE ("-": standard input), one per line (blank
    /// lines skipped).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        conflicts_with = "texts"
    )]
    file: Option<PathBuf>,
    /// The texts. Special-token text such as `<start_of_turn>` is parsed, as
    /// llama-embedding and the server read it (`gemma3 tokenize --special`
    /// shows the same tokens, BOS aside).
    #[arg(required_unless_present = "file")]
    texts: Vec<String>,
}

fn parse_normalize(s: &str) -> Result<bool, String> {
    match s {
        "2" => Ok(true),
        "-1" => Ok(false),
        _ => Err(format!(
            "'{s}' is not a normalisation this build has: 2 (unit Euclidean length) or -1 (none)"
        )),
    }
}

/// Most bytes `-f` reads (about 16 million tokens of text, hours of
/// embedding): `-f /dev/zero` must not read until memory runs out.
const MAX_TEXTS_BYTES: u64 = 64 << 20;

/// Most texts `-f` takes: each costs about a hundred bytes besides its
/// own, so 64 MiB of one-letter lines had taken 7.5 GB before the first
/// was embedded.
const MAX_TEXTS: usize = 1 << 20;

impl Texts {
    /// The texts, each with the name its errors give it ("text 2", or "line
    /// 6 of FILE").
    pub fn read(&self) -> Result<Vec<(String, String)>> {
        let Some(path) = &self.file else {
            if let Some(i) = self.texts.iter().position(String::is_empty) {
                anyhow::bail!("text {} is empty: there is nothing to work on", i + 1);
            }
            let named = self.texts.iter().enumerate();
            return Ok(named
                .map(|(i, t)| (t.clone(), format!("text {}", i + 1)))
                .collect());
        };
        let (text, name) = crate::generate::read_input(
            path,
            MAX_TEXTS_BYTES,
            "the texts",
            "split the file (each part is read alike)",
        )?;
        // (A byte-order mark, as some editors write, is not text.)
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            if lines.len() == MAX_TEXTS {
                anyhow::bail!(
                    "{name} holds more than {MAX_TEXTS} texts: split it (each part is read alike)"
                );
            }
            lines.push((l.to_owned(), format!("line {} of {name}", i + 1)));
        }
        if lines.is_empty() {
            anyhow::bail!("{name} holds no text (every line is blank)");
        }
        Ok(lines)
    }
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let texts = a.input.read()?;
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let (model, tok) = crate::load(&path, &a.lora, &a.control)?;
    // As llama-embedding and the server's /v1/embeddings tokenize a text.
    let ids: Vec<Vec<u32>> = (texts.iter())
        .map(|(t, _)| gemma3_engine::encode_prompt(&tok, t))
        .collect();
    let ctx_len = model.config.ctx_len;
    if let Some(i) = ids.iter().position(|t| t.len() > ctx_len) {
        anyhow::bail!(
            "{} has {} tokens but the model's context holds {ctx_len}",
            texts[i].1,
            ids[i].len()
        );
    }
    // Several texts to a forward pass; each line printed as its group ends.
    let mut written = Ok(());
    gemma3_engine::embed::embed_texts(&model, &ids, a.pooling, a.embd_normalize, |v| {
        written = serde_json::to_string(&v)
            .map_err(anyhow::Error::from)
            .and_then(|line| Ok(outln!("{line}")?));
        written.is_ok()
    })
    .context("embedding the texts")?;
    written?;
    Ok(())
}
