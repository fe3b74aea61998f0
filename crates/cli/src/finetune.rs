//! `gemma3 finetune`: train a LoRA adapter on examples from a JSON Lines file and write it as a
//! GGUF adapter, which `--lora` applies (here, in `gemma3 serve`, or in llama.cpp). The base
//! model's weights stay as they are (see `gemma3_model::train`).
//!
//! Each line is one example, in one of the forms fine-tuning tools take:
//! - `{"prompt": "...", "completion": "..."}`: BOS, the prompt, then the completion and EOS,
//!   each tokenized alone as `run --raw` tokenizes a prompt and generates after it; the loss is
//!   on the completion and EOS (so the model learns to stop).
//! - `{"text": "..."}`: BOS and the text; the loss is on every token after BOS.
//! - `{"messages": [{"role": "user", "content": "..."}, ...]}`: the conversation in the
//!   model's chat template (or `--chat-template-file`'s), tokenized as `run` and `serve`
//!   tokenize one; the loss is on each assistant turn, from its first token through the
//!   template's end of that turn.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gemma3_engine::{ChatTemplate, Message, Role};
use gemma3_model::train::{AdamW, DenseModel, Example, Precision, Rng, TrainableLora, MAX_ROWS};
use gemma3_tokenizer::Tokenizer;
use serde_json::Value as Json;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The matrices `--targets` names, in the order of `Layer::matrix`.
const TARGETS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

#[derive(Clone, Copy, ValueEnum)]
enum Schedule {
    /// Warm-up, then down to 0 in a straight line by the last step (transformers' default).
    Linear,
    /// Warm-up, then the same rate to the end.
    Constant,
}

/// `--precision`.
#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    /// The frozen weights' exact values, f32 activations.
    F32,
    /// Weights and activations rounded to bf16, sums in f32 (AVX-512 BF16).
    Bf16,
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// Training examples, JSON Lines: {"prompt", "completion"}, {"text"} or {"messages"} per
    /// line (see the README's "Fine-tuning").
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Held-out examples in the same form: their mean loss and exact share (every target the
    /// likeliest token) before training and after each epoch.
    #[arg(long, value_name = "FILE")]
    val: Option<PathBuf>,
    /// The adapter file to write (after each epoch, whole or not at all).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Rank of each low-rank pair.
    #[arg(short, long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha: the updates are scaled by alpha / rank (default: 2 × rank).
    #[arg(long)]
    alpha: Option<f32>,
    /// The layer matrices to adapt, in every layer.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    targets: Vec<String>,
    /// Passes over the training examples.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps (default: all the epochs').
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: Schedule,
    /// Steps over which the learning rate rises from 0 to --lr.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Examples per optimizer step (the loss is the mean over their target tokens).
    #[arg(short, long, default_value_t = 8)]
    batch: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Gradients are scaled down to this L2 norm where larger (0: never).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// The longest example, in tokens; a longer one is an error (its line is named).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Seed of A's initial values and of the order of the examples.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write the adapter every N steps (it is written after each epoch, and when Ctrl-C
    /// stops the run after its current step).
    #[arg(long, value_name = "N")]
    save_every: Option<usize>,
    /// Render {"messages"} examples with this Jinja chat template (as `run` and `serve` take
    /// one) instead of the model file's own.
    #[arg(long, value_name = "FILE")]
    chat_template_file: Option<PathBuf>,
    /// Continue training this adapter (its matrices, ranks and alpha) instead of a new one.
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// The frozen weights' products: bf16 (1.7-2.1× as fast on a Zen 4; each weight and activation
    /// rounded to bf16, the sums f32, as mixed-precision training does) or f32 (the exact
    /// function). Default: bf16 where the CPU has AVX-512 BF16, else f32.
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
}

/// Most bytes a training or validation file may hold: a file past it (or
/// a device such as /dev/zero) is refused, not read until memory runs out.
/// banking77's training split is 1 MB as JSON Lines.
const MAX_DATA_BYTES: u64 = 256 << 20;

/// The examples of a JSON Lines file, each tokenized and its targets marked.
fn read_examples(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Vec<Example>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_DATA_BYTES + 1), &mut bytes)
        })
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_DATA_BYTES {
        bail!(
            "{}: over {} MiB of examples, more than a run on a CPU can learn from; use a part of them",
            path.display(),
            MAX_DATA_BYTES >> 20
        );
    }
    // (A byte-order mark, as some editors write one, is not part of the first line.)
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = || format!("{} line {}", path.display(), i + 1);
        let Ok(line) = std::str::from_utf8(line) else {
            bail!("{}: not UTF-8 text", at());
        };
        if line.trim().is_empty() {
            continue;
        }
        let json: Json =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let ex = example(&json, tok, template).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        if ex.tokens.len() > max_len {
            bail!(
                "{}: {} tokens, more than --max-len {max_len}",
                at(),
                ex.tokens.len()
            );
        }
        if ex.n_targets() == 0 {
            bail!("{}: nothing to learn (no token is a target)", at());
        }
        out.push(ex);
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

fn string<'a>(json: &'a Json, key: &str) -> Result<&'a str, String> {
    match json.get(key) {
        Some(Json::String(s)) => Ok(s),
        Some(_) => Err(format!("\"{key}\" is not a string")),
        None => Err(format!("no \"{key}\"")),
    }
}

fn example(json: &Json, tok: &Tokenizer, template: &ChatTemplate) -> Result<Example, String> {
    let Json::Object(obj) = json else {
        return Err("not a JSON object".into());
    };
    let keys = |k: &[&str]| k.iter().all(|k| obj.contains_key(*k));
    let forms = [&["prompt", "completion"][..], &["text"], &["messages"]];
    if forms.iter().filter(|f| keys(f)).count() > 1 {
        return Err(
            "more than one of \"prompt\"/\"completion\", \"text\" and \"messages\": give one"
                .into(),
        );
    }
    if keys(&["prompt", "completion"]) {
        let mut tokens = gemma3_engine::encode_prompt(tok, string(json, "prompt")?);
        let completion = tok.encode(string(json, "completion")?, false, true);
        let start = tokens.len();
        tokens.extend(completion);
        tokens.push(tok.specials().eos);
        let target = (0..tokens.len()).map(|i| i >= start).collect();
        Ok(Example { tokens, target })
    } else if keys(&["text"]) {
        let tokens = gemma3_engine::encode_prompt(tok, string(json, "text")?);
        let target = (0..tokens.len()).map(|i| i > 0).collect();
        Ok(Example { tokens, target })
    } else if keys(&["messages"]) {
        chat_example(json, tok, template)
    } else {
        Err("expected \"prompt\" and \"completion\", \"text\", or \"messages\"".into())
    }
}

/// A conversation in the chat template, the assistant turns its targets: each turn's tokens
/// are those the conversation through it adds to the one before it with the assistant's turn
/// opened (which must be a prefix of it).
fn chat_example(json: &Json, tok: &Tokenizer, template: &ChatTemplate) -> Result<Example, String> {
    let Some(Json::Array(list)) = json.get("messages") else {
        return Err("\"messages\" is not an array".into());
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = string(m, "role").map_err(|e| format!("message {}: {e}", i + 1))?;
        let role =
            Role::parse(role).ok_or_else(|| format!("message {}: unknown role '{role}'", i + 1))?;
        let content = string(m, "content").map_err(|e| format!("message {}: {e}", i + 1))?;
        messages.push(Message::new(role, content));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message to learn".into());
    }
    // Tokenized as `run` and `serve` tokenize a rendered conversation: special-token text
    // parsed, and no BOS but the one the template writes.
    let render = |upto: usize, open: bool| -> Result<Vec<u32>, String> {
        let text = (template.render(&messages[..upto], open)).map_err(|e| e.to_string())?;
        Ok(tok.encode(&text, false, true))
    };
    let tokens = render(messages.len(), false)?;
    let mut target = vec![false; tokens.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        if i == 0 {
            return Err("the conversation starts with an assistant message: it must follow a user (or system) message".into());
        }
        let before = render(i, true)?;
        let through = render(i + 1, false)?;
        if !through.starts_with(&before) || !tokens.starts_with(&through) {
            return Err(format!(
                "message {}: the chat template's rendering of the conversation up to it is not a prefix of the one through it, so its tokens cannot be told apart",
                i + 1
            ));
        }
        target[before.len()..through.len()].fill(true);
    }
    Ok(Example { tokens, target })
}

/// Checks the numbers a user gives, each named.
fn check(a: &FinetuneArgs) -> Result<()> {
    let finite = |name: &str, v: f32, lo: f32, hi: f32| {
        if !(v.is_finite() && v >= lo && v <= hi) {
            bail!("{name} must be a number from {lo} to {hi}, got {v}");
        }
        Ok(())
    };
    finite("--lr", a.lr, 0.0, 1.0)?;
    if a.lr == 0.0 {
        bail!("--lr must be above 0");
    }
    finite("--weight-decay", a.weight_decay, 0.0, 1.0)?;
    finite("--max-grad-norm", a.max_grad_norm, 0.0, 1e6)?;
    if let Some(alpha) = a.alpha {
        finite("--alpha", alpha, -1e4, 1e4)?;
        if alpha == 0.0 {
            bail!("--alpha must not be 0 (the updates would be scaled by 0)");
        }
    }
    if a.rank == 0 || a.rank > 256 {
        bail!("--rank must be from 1 to 256, got {}", a.rank);
    }
    if a.batch == 0 || a.batch > 4096 {
        bail!("--batch must be from 1 to 4096, got {}", a.batch);
    }
    if a.epochs == 0 || a.epochs > 1000 {
        bail!("--epochs must be from 1 to 1000, got {}", a.epochs);
    }
    if a.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if a.save_every == Some(0) {
        bail!("--save-every must be at least 1");
    }
    if a.max_len < 2 {
        bail!("--max-len must be at least 2 (BOS and one token to learn)");
    }
    Ok(())
}

/// The matrices `--targets` names, as indices; unknown names and repeats refused.
fn targets(names: &[String]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for n in names {
        let Some(i) = TARGETS.iter().position(|t| t == n) else {
            bail!(
                "--targets: unknown matrix '{n}' (choose from {})",
                TARGETS.join(",")
            );
        };
        if out.contains(&i) {
            bail!("--targets names '{n}' twice");
        }
        out.push(i);
    }
    if out.is_empty() {
        bail!("--targets names no matrix");
    }
    Ok(out)
}

/// How a model does on held-out examples.
#[derive(Clone, Copy)]
struct Held {
    /// The mean loss per target token.
    loss: f64,
    /// The share of examples whose targets are each the likeliest token.
    exact: f64,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loss {:.4}, exact {:.1}%", self.loss, 100.0 * self.exact)
    }
}

/// [`Held`] over `examples`, in batches.
fn held_out(dense: &DenseModel, lora: &TrainableLora, examples: &[Example], batch: usize) -> Held {
    let (mut sum, mut n, mut exact) = (0.0, 0, 0);
    for chunk in examples.chunks(batch) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let p = dense.pass(lora, &refs, false);
        sum += p.loss_sum;
        n += p.targets;
        exact += p.exact;
    }
    Held {
        loss: sum / n.max(1) as f64,
        exact: exact as f64 / examples.len().max(1) as f64,
    }
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    check(&a)?;
    let target_ids = targets(&a.targets)?;
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let mut inputs = vec![
        ("the model file", path.as_path()),
        ("the training data", &a.data),
    ];
    if let Some(v) = &a.val {
        inputs.push(("the validation data", v));
    }
    if let Some(i) = &a.init {
        inputs.push(("the adapter to continue", i));
    }
    if let Some(t) = &a.chat_template_file {
        inputs.push(("the chat template", t));
    }
    crate::write_gguf::check_output(&a.output, &inputs)?;
    let (model, tok) = gemma3_server::load_model(&path, &[], &Default::default())?;
    let ctx = model.config.ctx_len;
    let max_len = a.max_len.min(ctx);
    let template = gemma3_engine::chat_template(&model, &tok, a.chat_template_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    let mut train = read_examples(&a.data, &tok, &template, max_len)?;
    let val = match &a.val {
        Some(v) => read_examples(v, &tok, &template, max_len)?,
        None => Vec::new(),
    };
    let mut lora = match &a.init {
        Some(p) => {
            if a.alpha.is_some() || a.rank != 8 || a.targets.len() != TARGETS.len() {
                eprintln!(
                    "note: --init {} keeps its own matrices, ranks and alpha",
                    p.display()
                );
            }
            TrainableLora::from_file(&model, model.read_lora(p)?)
        }
        None => {
            let alpha = a.alpha.unwrap_or(2.0 * a.rank as f32);
            let smallest = (model.layers.iter())
                .flat_map(|l| target_ids.iter().map(|&m| l.matrix(m)))
                .map(|t| t.rows.min(t.cols))
                .min()
                .unwrap_or(0);
            if a.rank > smallest {
                bail!(
                    "--rank {} is larger than the smallest adapted matrix's side ({smallest})",
                    a.rank
                );
            }
            TrainableLora::new(&model, &target_ids, a.rank, alpha, a.seed)
        }
    };
    let precision = match a.precision {
        None => Precision::fastest(),
        Some(PrecisionArg::F32) => Precision::F32,
        Some(PrecisionArg::Bf16) if gemma3_kernels::bf16mm::available() => Precision::Bf16,
        Some(PrecisionArg::Bf16) => bail!(
            "--precision bf16 needs AVX-512 BF16, which this CPU lacks (or GEMMA3_FORCE_SCALAR asks for the scalar kernels): use --precision f32"
        ),
    };
    // What a step keeps, for the longest examples (a group of passes holds
    // at most MAX_ROWS tokens, or one longer example), checked before the
    // weights are expanded.
    let longest = train
        .iter()
        .chain(&val)
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(0);
    let rows = (a.batch * longest).min(MAX_ROWS).max(longest);
    let rank = lora.pairs.iter().map(|p| p.rank).max().unwrap_or(0);
    let (weights, expanding) = DenseModel::planned_bytes(&model, precision);
    let step = DenseModel::pass_bytes(&model, rows, longest, rank);
    let need = weights + step.max(expanding);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    if let Some(free) = gemma3_server::available_memory().map(|b| b as usize) {
        if need > free {
            bail!(
                "training would need about {:.0} MiB (weights expanded {:.0} MiB, and a step over examples of {longest} tokens {:.0} MiB), more than the {:.0} MiB available: lower --max-len or --batch, or shorten the examples",
                mib(need),
                mib(weights),
                mib(step),
                mib(free)
            );
        }
    }
    let t0 = Instant::now();
    let dense = DenseModel::with_precision(&model, precision);
    let per_epoch = train.len().div_ceil(a.batch);
    let total = a.steps.unwrap_or(usize::MAX).min(per_epoch * a.epochs);
    if a.warmup >= total {
        bail!(
            "--warmup {} is not below the run's {total} steps: the learning rate would never reach --lr (with --warmup {total} or more, the first step's is 0)",
            a.warmup
        );
    }
    let tokens: usize = train.iter().map(|e| e.tokens.len()).sum();
    eprintln!(
        "{} examples ({tokens} tokens, {} targets), {} held out; {} pairs, {} parameters; weights expanded to {} ({:.0} MiB) in {:.1} s, about {:.0} MiB in all; {total} steps of {}",
        train.len(),
        train.iter().map(Example::n_targets).sum::<usize>(),
        val.len(),
        lora.pairs.len(),
        lora.n_params(),
        match precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        },
        mib(dense.bytes()),
        t0.elapsed().as_secs_f64(),
        mib(need),
        a.batch
    );
    let evaluate =
        |lora: &TrainableLora| (!val.is_empty()).then(|| held_out(&dense, lora, &val, a.batch));
    let first_val = evaluate(&lora);
    if let Some(v) = first_val {
        eprintln!("held out, before training: {v}");
    }
    let name = (a.output.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lora".into());
    // Ctrl-C: stop after the current step and write the adapter; a second one quits at once,
    // unless the adapter is being written (it then quits once it is).
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let (stop, saving) = (
        std::sync::Arc::new(AtomicBool::new(false)),
        std::sync::Arc::new(AtomicBool::new(false)),
    );
    let (flag, busy) = (stop.clone(), saving.clone());
    ctrlc::set_handler(move || {
        if !flag.swap(true, SeqCst) {
            eprintln!(
                "stopping after this step, then writing the adapter (Ctrl-C again: quit now)"
            );
        } else if busy.load(SeqCst) {
            eprintln!("writing the adapter: quitting once it is written");
        } else {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let stopped = || stop.load(SeqCst);
    // The step losses are of the weights before each update; the last
    // update's result is checked on the shortest example before the adapter
    // is written, so that it is never one whose outputs are not finite.
    let probe = (train.iter())
        .min_by_key(|e| e.tokens.len())
        .expect("training examples")
        .clone();
    let save = |lora: &TrainableLora, step: usize| {
        let loss = dense.pass(lora, &[&probe], false).loss_sum;
        if !loss.is_finite() {
            bail!(
                "the adapter's outputs became {loss} after step {step}: lower --lr (or --alpha); {} not written",
                a.output.display()
            );
        }
        saving.store(true, SeqCst);
        let written = crate::write_gguf::write_new(&lora.to_gguf(&name), &a.output, |tmp| {
            model.read_lora(tmp).map(|_| ()).map_err(|e| {
                anyhow::Error::new(e)
                    .context("the written adapter does not read back (nothing written)")
            })
        });
        saving.store(false, SeqCst);
        written
    };
    let mut opt = AdamW::new(&lora, a.weight_decay);
    let mut rng = Rng::new(a.seed ^ 0x5eed);
    let (mut step, mut last_val, mut first_loss, mut last_loss) = (0, first_val, None, 0.0);
    let start = Instant::now();
    let mut seen_tokens = 0usize;
    'epochs: for epoch in 1..=a.epochs {
        rng.shuffle(&mut train);
        let (mut ep_sum, mut ep_n) = (0.0, 0);
        for chunk in train.chunks(a.batch) {
            if step == total || stopped() {
                break 'epochs;
            }
            let lr = learning_rate(&a, step, total);
            let refs: Vec<&Example> = chunk.iter().collect();
            let pass = dense.pass(&lora, &refs, true);
            let grads = pass.grads.expect("asked for");
            let loss = pass.loss_sum / pass.targets as f64;
            if !loss.is_finite() {
                if step == 0 {
                    bail!("the loss is {loss} before any update: the model's outputs are not finite on this data{}", if a.init.is_some() { " with the adapter given with --init (its values or alpha)" } else { "" });
                }
                bail!("the loss became {loss} at step {}: lower --lr", step + 1);
            }
            let norm = opt.step(&mut lora, grads, lr, a.max_grad_norm);
            if !norm.is_finite() {
                bail!(
                    "the gradients became {norm} at step {}: lower --lr",
                    step + 1
                );
            }
            step += 1;
            seen_tokens += chunk.iter().map(|e| e.tokens.len()).sum::<usize>();
            ep_sum += pass.loss_sum;
            ep_n += pass.targets;
            first_loss.get_or_insert(loss);
            last_loss = loss;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "step {step}/{total}  epoch {epoch}  loss {loss:.4}  lr {lr:.2e}  grad norm {norm:.3}  {:.0} tokens/s",
                seen_tokens as f64 / secs
            );
            if a.save_every.is_some_and(|k| step % k == 0) {
                save(&lora, step)?;
            }
        }
        let mean = ep_sum / ep_n.max(1) as f64;
        last_val = evaluate(&lora).or(last_val);
        held_out_finite(last_val, step, &a.output)?;
        match last_val {
            Some(v) => eprintln!("epoch {epoch}: training loss {mean:.4}; held out: {v}"),
            None => eprintln!("epoch {epoch}: training loss {mean:.4}"),
        }
        save(&lora, step)?;
    }
    if step == 0 {
        bail!("stopped before the first step: nothing written");
    }
    if step % per_epoch != 0 {
        // Stopped by --steps or Ctrl-C within an epoch (after Ctrl-C, without
        // the held-out pass).
        if !stopped() {
            last_val = evaluate(&lora).or(last_val);
            held_out_finite(last_val, step, &a.output)?;
        }
        save(&lora, step)?;
    }
    let mut out = std::io::stdout().lock();
    write!(
        out,
        "{}: {} pairs of rank {}, alpha {}; {step} steps in {:.0} s; batch loss {:.4} → {last_loss:.4}",
        a.output.display(),
        lora.pairs.len(),
        lora.pairs.first().map_or(0, |p| p.rank),
        lora.alpha,
        start.elapsed().as_secs_f64(),
        first_loss.unwrap_or(f64::NAN),
    )?;
    if let (Some(f), Some(l)) = (first_val, last_val) {
        write!(
            out,
            "; held-out loss {:.4} → {:.4}, exact {:.1}% → {:.1}%",
            f.loss,
            l.loss,
            100.0 * f.exact,
            100.0 * l.exact
        )?;
    }
    writeln!(out)?;
    if stopped() {
        // Written, but cut short: a script can tell.
        eprintln!("stopped by Ctrl-C after step {step} of {total}; the adapter holds that step");
        std::process::exit(130);
    }
    Ok(())
}

/// An error where the held-out loss after `step` is not finite: the adapter
/// at `output` is then not written.
fn held_out_finite(held: Option<Held>, step: usize, output: &Path) -> Result<()> {
    match held {
        Some(h) if !h.loss.is_finite() => bail!(
            "the held-out loss became {} after step {step}: lower --lr (or --alpha); {} not written",
            h.loss,
            output.display()
        ),
        _ => Ok(()),
    }
}

/// The learning rate at `step` (from 0) of `total`.
fn learning_rate(a: &FinetuneArgs, step: usize, total: usize) -> f32 {
    if step < a.warmup {
        // transformers' warm-up: its first step at 0.
        return a.lr * step as f32 / a.warmup as f32;
    }
    match a.schedule {
        Schedule::Constant => a.lr,
        Schedule::Linear => {
            let left = total.saturating_sub(step) as f32;
            let span = total.saturating_sub(a.warmup).max(1) as f32;
            a.lr * left / span
        }
    }
}
