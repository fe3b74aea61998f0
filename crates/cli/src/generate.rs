//! `gemma3 run` and `gemma3 chat`.

use anyhow::{Context, Result};
use clap::Args;
use gemma3_engine::{GenerateParams, GrammarSpec, Message, Role, SamplingParams, Session};
use gemma3_model::Model;
use gemma3_tokenizer::Tokenizer;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Path of a GGUF model file (default: $GEMMA3_MODEL, else the cached default model).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub lora: gemma3_server::LoraArgs,
    #[command(flatten)]
    pub control: gemma3_server::ControlArgs,
    /// Most tokens to generate (-1: until the model ends its text or the context is full, as llama.cpp).
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512, value_parser = parse_max_tokens, allow_hyphen_values = true)]
    pub max_tokens: usize,
    /// Temperature (0 = greedy). Default: the model's own sampling (1.0, top-k 64, top-p 0.95).
    #[arg(long)]
    pub temp: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seed for sampling (default, or -1 as in llama.cpp: random).
    #[arg(long, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: Option<Seed>,
    /// Penalise tokens seen in the last --repeat-last-n (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many of the latest tokens the repeat, presence and frequency penalties look at (0: none,
    /// so the penalties are off; -1: all), as llama.cpp.
    #[arg(long, default_value_t = 64, value_parser = parse_repeat_last_n, allow_hyphen_values = true)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Add BIAS (-100..100) to token ID's logit, as llama.cpp's flag: 15043+1, 15043-100
    /// (repeatable; `gemma3 tokenize` gives ids).
    #[arg(long, value_name = "ID(+|-)BIAS", value_parser = parse_logit_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Context size in tokens (KV cache; default 8192, or the model's context if smaller).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// A system message (folded into the first user turn, as Gemma's template does).
    #[arg(long)]
    pub system: Option<String>,
    /// Constrain the output to a GBNF grammar (llama.cpp's format; `root` is the start rule).
    #[arg(long, value_name = "GBNF", group = "constraint")]
    pub grammar: Option<String>,
    /// Read the GBNF grammar from FILE.
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar_file: Option<PathBuf>,
    /// Constrain the output to JSON that SCHEMA (a JSON schema) accepts; '{}' for any JSON value.
    #[arg(short = 'j', long, value_name = "SCHEMA", group = "constraint")]
    pub json_schema: Option<String>,
    /// Read the JSON schema from FILE (llama.cpp's -jf).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema_file: Option<PathBuf>,
    /// Render the conversation with this Jinja chat template (Hugging Face's form, as llama.cpp's
    /// --chat-template-file) instead of the model file's own `tokenizer.chat_template`, or
    /// Gemma's format where the file has none.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// Print the prompt as the model reads it (after the chat template) to stderr first.
    #[arg(long)]
    pub verbose_prompt: bool,
}

#[derive(Args)]
#[group(id = "input", required = true, multiple = false, args = ["prompt", "prompt_flag", "file"])]
pub struct RunArgs {
    #[command(flatten)]
    pub s: SamplingArgs,
    /// Feed PROMPT as plain text (base-model completion, BOS prepended) and print only the continuation.
    #[arg(long, conflicts_with = "system")]
    pub raw: bool,
    /// Do not print the timing line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// The prompt (or give it with -p, or read it with -f).
    pub prompt: Option<String>,
    /// The prompt, as llama-cli takes it.
    #[arg(short = 'p', long = "prompt", value_name = "PROMPT")]
    pub prompt_flag: Option<String>,
    /// Read the prompt from FILE ("-": standard input), as llama-cli's -f.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl RunArgs {
    /// The prompt from whichever of PROMPT, -p and -f was given (clap lets
    /// exactly one through).
    fn prompt_text(&self) -> Result<String> {
        if let Some(p) = self.prompt.as_ref().or(self.prompt_flag.as_ref()) {
            return Ok(p.clone());
        }
        let path = self.file.as_ref().context("no prompt given")?;
        let (text, _) = read_input(
            path,
            MAX_PROMPT_BYTES,
            "the prompt",
            "more than any context of this model can hold",
        )?;
        Ok(text)
    }
}

/// Most bytes a grammar or schema file may hold.
const MAX_GRAMMAR_BYTES: u64 = 1 << 20;

/// Most bytes a prompt file may hold: Gemma 3's longest token is 48 bytes,
/// so no prompt of more fits the model's context of 32 768 tokens (and
/// `-f /dev/zero` must not read until memory runs out).
const MAX_PROMPT_BYTES: u64 = 8 << 20;

/// All of FILE ("-": standard input) as UTF-8 text, and the name its
/// errors give the source; refused when longer than `max` bytes (saying
/// `too_big`) without reading further. `what` ("the prompt") names the text.
pub(crate) fn read_input(
    path: &std::path::Path,
    max: u64,
    what: &str,
    too_big: &str,
) -> Result<(String, String)> {
    let (reader, name): (Box<dyn std::io::Read>, String) = if path.as_os_str() == "-" {
        (Box::new(std::io::stdin()), "standard input".into())
    } else {
        let f = std::fs::File::open(path)
            .with_context(|| format!("reading {what} from {}", path.display()))?;
        (Box::new(f), path.display().to_string())
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(reader, max + 1), &mut bytes)
        .with_context(|| format!("reading {what} from {name}"))?;
    if bytes.len() as u64 > max {
        anyhow::bail!("{what} in {name}: over {} MiB; {too_big}", max >> 20);
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{what} in {name}: not UTF-8 text: {e}"))?;
    Ok((text, name))
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub s: SamplingArgs,
}

/// `ID+BIAS` or `ID-BIAS` (llama.cpp's `--logit-bias` form).
fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let split = s
        .find(['+', '-'])
        .ok_or("expected ID+BIAS or ID-BIAS, e.g. 15043-100")?;
    if split == 0 {
        return Err(format!(
            "'{s}' starts with a sign: expected ID+BIAS or ID-BIAS with a token id (0 or more) first, e.g. 15043-100"
        ));
    }
    let id = s[..split]
        .parse::<u32>()
        .map_err(|_| format!("'{}' is not a token id", &s[..split]))?;
    let bias = s[split..]
        .parse::<f32>()
        .ok()
        .filter(|b| (-100.0..=100.0).contains(b))
        .ok_or_else(|| format!("'{}' is not a bias in [-100, 100]", &s[split..]))?;
    Ok((id, bias))
}

/// A `--seed`: a number, or random (`-1`).
#[derive(Clone, Copy, Debug)]
pub enum Seed {
    Fixed(u64),
    Random,
}

fn parse_seed(s: &str) -> Result<Seed, String> {
    if s == "-1" {
        return Ok(Seed::Random);
    }
    s.parse::<u64>().map(Seed::Fixed).map_err(|_| {
        format!("'{s}' is not a seed: a number from 0 to 2^64 - 1, or -1 for a random one")
    })
}

/// `-n`: a count of at least 1, or -1 for no limit but the context.
fn parse_max_tokens(s: &str) -> Result<usize, String> {
    if s == "-1" {
        return Ok(usize::MAX);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("at least 1 token (or -1: until the text ends or the context is full)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "'{s}' is not a token count: a number of at least 1, or -1 for no limit"
        )),
    }
}

/// `--repeat-last-n`: a count (0 turns the penalties off), or -1 for all.
fn parse_repeat_last_n(s: &str) -> Result<usize, String> {
    if s == "-1" {
        return Ok(gemma3_engine::ALL_HISTORY);
    }
    s.parse::<usize>().map_err(|_| {
        format!("'{s}' is not a token count: a number, 0 (penalties off) or -1 (all tokens)")
    })
}

impl SamplingArgs {
    /// Generation settings; `chat` also stops at `<start_of_turn>` (the base
    /// model sometimes opens a new turn instead of closing its own).
    fn params(&self, model: &Model, tok: &Tokenizer, chat: bool) -> Result<GenerateParams> {
        if chat && (tok.specials().start_of_turn.is_none() || tok.specials().end_of_turn.is_none())
        {
            anyhow::bail!(
                "this model's vocabulary has no <start_of_turn> / <end_of_turn> tokens, so it has no chat format: use `gemma3 run --raw` for plain completion"
            );
        }
        let base = SamplingParams::chat_default();
        let seed = match self.seed {
            Some(Seed::Fixed(s)) => s,
            None | Some(Seed::Random) => gemma3_engine::sampler::random_seed(),
        };
        let sampling = SamplingParams {
            temperature: self.temp.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed,
        };
        if let Some(&(id, _)) = self
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= tok.vocab_size())
        {
            anyhow::bail!(
                "--logit-bias: token {id} is outside the vocabulary of {}",
                tok.vocab_size()
            );
        }
        sampling.validate().map_err(anyhow::Error::msg)?;
        let mut stop_tokens = gemma3_engine::stop_tokens(model, tok);
        if chat {
            stop_tokens.extend(tok.specials().start_of_turn);
        }
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampling,
            stop_strings: self.stop.clone(),
            stop_tokens,
            constraint: self.constraint(tok)?,
        })
    }

    /// The grammar or schema given (at most one: clap's group), compiled.
    fn constraint(&self, tok: &Tokenizer) -> Result<Option<gemma3_engine::Constraint>> {
        let file = |path: &PathBuf, what: &str| {
            read_input(path, MAX_GRAMMAR_BYTES, what, "no grammar is that large").map(|r| r.0)
        };
        let json = |text: &str, flag: &str| -> Result<GrammarSpec> {
            let v = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("{flag}: not valid JSON: {e}"))?;
            Ok(GrammarSpec::JsonSchema(v))
        };
        let (spec, flag) = if let Some(g) = &self.grammar {
            (GrammarSpec::Gbnf(g.clone()), "--grammar")
        } else if let Some(p) = &self.grammar_file {
            (GrammarSpec::Gbnf(file(p, "the grammar")?), "--grammar-file")
        } else if let Some(j) = &self.json_schema {
            (json(j, "--json-schema")?, "--json-schema")
        } else if let Some(p) = &self.json_schema_file {
            let text = file(p, "the JSON schema")?;
            (json(&text, "--json-schema-file")?, "--json-schema-file")
        } else {
            return Ok(None);
        };
        let grammars = gemma3_engine::Grammars::new(tok)?;
        let c = grammars
            .compile(&spec)
            .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        Ok(Some(c))
    }

    /// The context to allocate: --ctx, else 8192 clamped to the model's context.
    fn ctx_for(&self, model: &Model) -> usize {
        self.ctx.unwrap_or(8192).min(model.config.ctx_len)
    }

    fn load(&self) -> Result<(Model, Tokenizer)> {
        if self.ctx == Some(0) {
            anyhow::bail!("--ctx must be at least 1");
        }
        let path = crate::model_path::resolve(self.model.clone(), true)?;
        let (model, tok) = crate::load(&path, &self.lora, &self.control)?;
        if let Some(ctx) = self.ctx.filter(|&c| c > model.config.ctx_len) {
            anyhow::bail!(
                "--ctx {ctx} is larger than the model's context of {} tokens",
                model.config.ctx_len
            );
        }
        Ok((model, tok))
    }

    /// The chat template (see [`gemma3_engine::chat_template`]).
    fn template(&self, model: &Model, tok: &Tokenizer) -> Result<gemma3_engine::ChatTemplate> {
        gemma3_engine::chat_template(model, tok, self.chat_template_file.as_deref())
            .map_err(anyhow::Error::msg)
    }

    /// `text` tokenized as a prompt (special-token text parsed), shown on
    /// stderr first with --verbose-prompt.
    fn prompt_ids(&self, tok: &Tokenizer, text: &str) -> Vec<u32> {
        if self.verbose_prompt {
            eprintln!("{text}");
        }
        tok.encode(text, false, true)
    }
}

fn timing_line(g: &gemma3_engine::Generation) -> String {
    let pp = g.prompt_evaluated as f64 / g.prompt_time.as_secs_f64().max(1e-9);
    let tg = g.tokens.len() as f64 / g.gen_time.as_secs_f64().max(1e-9);
    format!(
        "[prompt: {} tokens ({} evaluated) in {:.3} s, {:.1} tokens/s | generation: {} tokens in {:.3} s, {:.1} tokens/s | finish: {:?}]",
        g.prompt_tokens,
        g.prompt_evaluated,
        g.prompt_time.as_secs_f64(),
        pp,
        g.tokens.len(),
        g.gen_time.as_secs_f64(),
        tg,
        g.finish
    )
}

pub fn run(a: RunArgs) -> Result<()> {
    let prompt_text = a.prompt_text()?;
    let (model, tok) = a.s.load()?;
    let params = a.s.params(&model, &tok, !a.raw)?;
    let prompt = if a.raw {
        if a.s.chat_template_file.is_some() {
            anyhow::bail!(
                "--chat-template-file has no effect with --raw (no chat template is applied)"
            );
        }
        if a.s.verbose_prompt {
            eprintln!("{prompt_text}");
        }
        tok.encode(&prompt_text, true, false)
    } else {
        let template = a.s.template(&model, &tok)?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.s.system {
            msgs.push(Message::new(Role::System, s.clone()));
        }
        msgs.push(Message::new(Role::User, prompt_text.clone()));
        a.s.prompt_ids(&tok, &template.render(&msgs, true)?)
    };
    let mut session = Session::try_new(&model, a.s.ctx_for(&model))?;
    let stdout = std::io::stdout();
    // A failed write (the reader went away, a full disk) stops the reply
    // and is the command's error.
    let mut written = Ok(());
    let g = session.generate(&tok, &prompt, &params, |t| {
        let mut out = stdout.lock();
        written = out.write_all(t.as_bytes()).and_then(|_| out.flush());
        written.is_ok()
    })?;
    written?;
    outln!()?;
    // Ended by the context, not by -n: said even with --quiet (llama.cpp
    // warns the same), since the text stops mid-way.
    note_full_context(&g, &params, session.ctx());
    if !a.quiet {
        eprintln!("{}", timing_line(&g));
    }
    Ok(())
}

/// Say so when a reply was ended by the context rather than by -n (even
/// with --quiet, as llama.cpp warns the same), since its text stops mid-way.
fn note_full_context(g: &gemma3_engine::Generation, params: &GenerateParams, ctx: usize) {
    let length = g.finish == gemma3_engine::FinishReason::Length;
    if length && g.tokens.len() < params.max_tokens {
        eprintln!(
            "(the context of {ctx} tokens is full: the reply stopped there; a larger --ctx gives it room)"
        );
    }
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let (model, tok) = a.s.load()?;
    let template = a.s.template(&model, &tok)?;
    let mut params = a.s.params(&model, &tok, true)?;
    let mut session = Session::try_new(&model, a.s.ctx_for(&model))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (i, g) = (interrupted.clone(), generating.clone());
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) {
                i.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &a.s.system {
        history.push(Message::new(Role::System, s.clone()));
    }
    let system_len = history.len();
    // The system text and an empty turn must fit, or no message ever will.
    if a.s.system.is_some() {
        let mut probe = history.clone();
        probe.push(Message::new(Role::User, ""));
        let floor = tok
            .encode(&template.render(&probe, true)?, false, true)
            .len();
        if floor >= session.ctx() {
            anyhow::bail!(
                "--system takes {floor} tokens with the chat template, more than the context of {} can hold with room for a message and a reply: shorten it, or use a larger --ctx",
                session.ctx()
            );
        }
    }
    eprintln!("gemma3 chat — /reset clears the history, /exit quits, Ctrl-C stops a reply. (This is the base model: replies are weak until fine-tuned.)");
    let stdin = std::io::stdin();
    let first_seed = params.sampling.seed;
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        let mut bytes = Vec::new();
        let mut input = stdin.lock();
        if std::io::Read::take(&mut input, MAX_PROMPT_BYTES + 1).read_until(b'\n', &mut bytes)? == 0
        {
            break;
        }
        if bytes.len() as u64 > MAX_PROMPT_BYTES {
            // The rest of the line unread, and skipped a buffer at a time.
            while !bytes.ends_with(b"\n") {
                bytes.clear();
                if std::io::Read::take(&mut input, 1 << 16).read_until(b'\n', &mut bytes)? == 0 {
                    break;
                }
            }
            eprintln!(
                "(that line is over {} MiB, more than any context holds: type a shorter one)",
                MAX_PROMPT_BYTES >> 20
            );
            continue;
        }
        drop(input);
        let Ok(line) = String::from_utf8(bytes) else {
            eprintln!("(that line is not valid UTF-8: type it again)");
            continue;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(system_len);
                session.reset();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new(Role::User, line));
        let text = match template.render(&history, true) {
            Ok(text) => text,
            Err(e) => {
                // (The template refused this message: say so and go on.)
                history.pop();
                eprintln!("({e})");
                continue;
            }
        };
        let prompt = a.s.prompt_ids(&tok, &text);
        if prompt.len() >= session.ctx() {
            if history.len() == system_len + 1 {
                // Nothing to drop by /reset: this message alone (with the system text) is too long.
                eprintln!("(this message needs {} tokens, more than the context of {} can hold with room for a reply: shorten it, or start with a larger --ctx)", prompt.len(), session.ctx());
            } else {
                eprintln!("(the conversation has {} tokens and no longer fits the context of {}: /reset to start over)", prompt.len(), session.ctx());
            }
            history.pop();
            continue;
        }
        // Turn k samples with seed + k: each turn its own draws, reproducible from --seed.
        params.sampling.seed = first_seed.wrapping_add(turn);
        turn += 1;
        interrupted.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let stdout = std::io::stdout();
        let mut written = Ok(());
        let r = session.generate(&tok, &prompt, &params, |t| {
            let mut out = stdout.lock();
            written = out.write_all(t.as_bytes()).and_then(|_| out.flush());
            written.is_ok() && !interrupted.load(Ordering::SeqCst)
        });
        generating.store(false, Ordering::SeqCst);
        written?;
        outln!()?;
        match r {
            Ok(g) => {
                note_full_context(&g, &params, session.ctx());
                history.push(Message::new(Role::Assistant, g.text));
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_logit_bias;

    #[test]
    fn logit_bias_flags_as_llama_cpp_writes_them() {
        assert_eq!(parse_logit_bias("15043+1"), Ok((15043, 1.0)));
        assert_eq!(parse_logit_bias("15043-100"), Ok((15043, -100.0)));
        assert_eq!(parse_logit_bias("7+0.5"), Ok((7, 0.5)));
        for bad in ["15043", "x+1", "+1", "7+101", "7-1e9", "7+nan", "7+"] {
            assert!(parse_logit_bias(bad).is_err(), "{bad}");
        }
        // A negative id is named as such, not as an empty id.
        let e = parse_logit_bias("-1+1").unwrap_err();
        assert!(e.contains("starts with a sign"), "{e}");
    }
}
