//! `gemma3 serve`: an OpenAI-compatible HTTP server (and Ollama's API, see
//! [`ollama`]), a thin translation layer over the engine's [`Scheduler`]
//! (continuous batching, chunked prompt reading, prefix cache). Requests
//! become token ids and generation parameters here; the scheduler's events
//! become JSON, server-sent events or newline-delimited JSON.
//!
//! Routes (all but /health and /metrics need `Authorization: Bearer KEY`, or
//! llama-server's `X-Api-Key: KEY`, when `--api-key` is set):
//! - `POST /v1/chat/completions`: `messages` (system/user/assistant; content a
//!   string or `[{type: "text", text}]` parts, required, null only for an
//!   assistant's message), rendered with Gemma's chat
//!   template; `stream` (+ `stream_options.include_usage`), `max_tokens` /
//!   `max_completion_tokens` / llama-server's `n_predict` (−1: as many as the
//!   context leaves), `temperature`, `top_p`, `top_k` (0 or −1: no limit),
//!   `min_p`, `seed`
//!   (−1: random, as llama-server), `stop`, `presence_penalty`,
//!   `frequency_penalty`, `repeat_penalty`, `repeat_last_n` (the tokens the
//!   penalties look at: 0 none, −1 all, as llama-server; default 64),
//!   `logprobs` + `top_logprobs` (0..=20), `logit_bias` (token id → −100..=100),
//!   `n` (choices, 1..=128: choice j samples with `seed + j`; streamed,
//!   their chunks interleave by `index`; the prompt counts once in the
//!   usage), llama-server's `ignore_eos`. Generation ends at eos or
//!   `<end_of_turn>`. The output may be constrained by one of
//!   `response_format` (`json_object`, with llama-server's optional `schema`;
//!   `json_schema` with `json_schema.schema`), llama-server's `grammar`
//!   (GBNF) or its `json_schema` (a `grammar` puts a `json_schema` aside, as
//!   in llama-server): a bad grammar or schema is a 400 naming its field. Fields this server does not implement and that would
//!   change the answer (`tools`, `tool_choice`, a message's `tool_calls`,
//!   and llama-server's `mirostat`, `n_probs`, `typical_p`, `dry_*`,
//!   `xtc_*`, `dynatemp_range`, `top_n_sigma`, `t_max_predict_ms` other than
//!   at their "off" values) are refused with a 400, not ignored.
//! - `POST /v1/completions`: `prompt` as text (BOS prepended unless it starts
//!   with `<bos>`; special-token text such as `<start_of_turn>` parsed, as
//!   llama-server does) or token ids, or a list of up to 64 of either (one
//!   choice each, or `n` each, prompt i's at `i·n + j`, run side by side,
//!   admitted all together or refused with a 429; token counts summed over
//!   them, times the longest); the same fields, plus `echo`, `best_of` (only
//!   as `n`) and `logprobs` (an int, completions-style; with `echo`, the
//!   prompt's tokens scored too, `max_tokens` 0 allowed, not streamed).
//! - `POST /v1/embeddings`: `input` as text (tokenized as a completion's
//!   prompt), token ids, or a list of up to 2048 of either; `encoding_format`
//!   `float` or `base64`; `dimensions` only as the model's 640. Each vector is
//!   the `--pooling` (mean by default) of the input's final hidden states,
//!   scaled to unit length, as llama-server's with `--embeddings --pooling`.
//!   The inputs run in waves of `--parallel`.
//! - Cross-origin requests from any origin, as llama-server allows them (a
//!   preflight `OPTIONS` gets a 204; responses carry
//!   `Access-Control-Allow-Origin: *`).
//! - The three OpenAI routes also without `/v1` (`/chat/completions`,
//!   `/completions`, `/models`), as llama-server serves them. (Not
//!   `/embeddings`: llama-server's route of that name is its own
//!   non-OpenAI form.)
//! - `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`
//!   (Prometheus text), `POST /tokenize` (`content`, `add_special` = false,
//!   `parse_special` = true, `with_pieces` = false, as llama-server),
//!   `POST /detokenize` (`tokens`).
//! - Ollama's API: `POST /api/chat`, `/api/generate`, `/api/embed`,
//!   `/api/embeddings`, `/api/show`, `GET /api/tags`, `/api/ps`,
//!   `/api/version` (see [`ollama`]).
//!
//! The `model` field is accepted and ignored (one model is served).
//! Defaults for absent fields: the model's own sampling (temperature 1.0,
//! top_k 64, top_p 0.95, min_p 0, no penalties), a random seed, and
//! `max_tokens` = what the context leaves (chat) or 16 (completions, as
//! OpenAI). `usage.prompt_tokens_details.cached_tokens` counts prompt tokens
//! taken from the prefix cache; a non-standard `timings` object (llama-server
//! style) gives queue, prompt and generation times.
//!
//! Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` (on
//! Ollama's `/api` routes, Ollama's `{"error": "message"}`): 400
//! naming the field for malformed or out-of-range input (and for prompt +
//! max_tokens beyond `--ctx`), 401 without the key, 404 unknown route, 429
//! with `Retry-After` when `--parallel` + `--queue` requests are already in,
//! 503 while shutting down.
//!
//! Connections: as many at once as the open-file limit allows (raised to
//! its hard limit), at most 16 384; more wait in the listen backlog. A
//! request's header must arrive within 10 s (an idle keep-alive connection is
//! closed then too) and its body within 30 s (else 408).
//!
//! Threads: the scheduler thread runs the model (its matmuls use the global
//! rayon pool); HTTP runs on a two-thread tokio runtime, since it only parses
//! JSON and moves events; tokenizing a request runs on tokio's blocking
//! threads.

pub mod error;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod routes;

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use gemma3_engine::scheduler::{Scheduler, SchedulerConfig};
use gemma3_engine::{ControlSpec, LoraSpec, Pooling};
use gemma3_model::KvCache;
use routes::App;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// `gemma3 serve` options.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Path of a GGUF model file (default: $GEMMA3_MODEL, else the cached default model).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (loopback by default: use 0.0.0.0 to serve the network, with --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences generated at once (each holds a KV cache of --ctx tokens).
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Context of each sequence in tokens (prompt + generated).
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and /metrics.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most requests waiting for a slot; beyond that requests get 429. Each choice counts as
    /// one (each prompt of a batched completion, each of `n`), and so does each embedding input
    /// in flight (an embeddings request takes at most --parallel places at a time).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most prompt tokens evaluated per step, so that a long prompt does not stall running
    /// streams (each step waits for its chunk: about 0.1 s for 128 tokens on 2 cores).
    #[arg(long, default_value_t = 128)]
    pub prompt_chunk: usize,
    /// How /v1/embeddings pools a text's final hidden states: mean (every token's, as
    /// llama-server's --pooling mean), last or cls.
    #[arg(long, default_value = "mean", value_parser = str::parse::<Pooling>)]
    pub pooling: Pooling,
    /// Render chat messages with this Jinja chat template (Hugging Face's form, as llama-server's
    /// --chat-template-file) instead of the model file's own `tokenizer.chat_template`, or
    /// Gemma's format where the file has none. It applies to Ollama's /api/chat too.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Run requests without the --lora adapters unless they ask for them (their `lora` field, or
    /// an adapter's name as their `model`) or POST /lora-adapters sets other scales (as
    /// llama-server's flag).
    #[arg(long)]
    pub lora_init_without_apply: bool,
}

/// `--lora FILE` and `--lora-scaled FILE SCALE`, as llama.cpp's flags (the
/// CLI's commands take them too).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LoraArgs {
    /// Apply a LoRA adapter (a GGUF adapter file, as llama.cpp's convert_lora_to_gguf.py writes
    /// one) at scale 1. Repeatable: the adapters' updates add up.
    #[arg(long = "lora", value_name = "FILE")]
    pub lora: Vec<PathBuf>,
    /// Apply a LoRA adapter at SCALE (times its alpha / rank, as llama.cpp). Repeatable.
    #[arg(
        long = "lora-scaled",
        num_args = 2,
        value_names = ["FILE", "SCALE"],
        allow_hyphen_values = true
    )]
    pub lora_scaled: Vec<String>,
}

impl LoraArgs {
    /// The adapters, `--lora` ones first.
    pub fn specs(&self) -> Result<Vec<LoraSpec>> {
        LoraSpec::from_flags(&self.lora, &self.lora_scaled).map_err(anyhow::Error::msg)
    }
}

/// `--control-vector FILE`, `--control-vector-scaled FILE STRENGTH` and
/// `--control-vector-layer-range START END`, as llama.cpp's flags (the CLI's
/// commands that run the model take them too).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ControlArgs {
    /// Add a control vector (a GGUF of direction.N tensors, as llama-cvector-generator or
    /// repeng write) to the output of each layer it has a direction for, at strength 1.
    /// Repeatable: the vectors add up.
    #[arg(long = "control-vector", value_name = "FILE")]
    pub control_vector: Vec<PathBuf>,
    /// Add a control vector times STRENGTH (negative steers the other way). Repeatable.
    #[arg(
        long = "control-vector-scaled",
        num_args = 2,
        value_names = ["FILE", "STRENGTH"],
        allow_hyphen_values = true
    )]
    pub control_vector_scaled: Vec<String>,
    /// Apply the control vectors to layers START to END only (inclusive; default: 1 to the
    /// last).
    #[arg(
        long = "control-vector-layer-range",
        num_args = 2,
        value_names = ["START", "END"],
        allow_hyphen_values = true
    )]
    pub control_vector_layer_range: Vec<String>,
}

impl ControlArgs {
    pub fn spec(&self) -> Result<ControlSpec> {
        ControlSpec::from_flags(
            &self.control_vector,
            &self.control_vector_scaled,
            &self.control_vector_layer_range,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// Everything needed to start a server (the model path already resolved).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_path: PathBuf,
    pub host: String,
    /// 0 = any free port.
    pub port: u16,
    pub parallel: usize,
    pub ctx: usize,
    pub queue: usize,
    pub prompt_chunk: usize,
    pub pooling: Pooling,
    /// See [`ServeArgs::chat_template_file`].
    pub chat_template_file: Option<PathBuf>,
    /// LoRA adapters applied to the model at load (`--lora`, `--lora-scaled`).
    pub loras: Vec<LoraSpec>,
    /// Control vectors added to the model at load (`--control-vector`, …).
    pub control: ControlSpec,
    /// Requests without a `lora` of their own (or an adapter's name as their
    /// `model`) run at scale 0 (`--lora-init-without-apply`).
    pub lora_init_without_apply: bool,
    pub api_key: Option<String>,
    /// After a shutdown signal: how long in-flight requests may run before
    /// they are cancelled.
    pub shutdown_grace: Duration,
    /// Time for a request's header to arrive (and for a keep-alive
    /// connection's next request to start), and then for its body.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl ServerConfig {
    pub fn new(model_path: PathBuf) -> Self {
        ServerConfig {
            model_path,
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 16,
            ctx: 4096,
            queue: 64,
            prompt_chunk: 128,
            pooling: Pooling::Mean,
            chat_template_file: None,
            loras: Vec::new(),
            control: ControlSpec::default(),
            lora_init_without_apply: false,
            api_key: None,
            shutdown_grace: Duration::from_secs(10),
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
        }
    }

    pub fn from_args(a: ServeArgs, model_path: PathBuf) -> Result<Self> {
        Ok(ServerConfig {
            loras: a.lora.specs()?,
            control: a.control.spec()?,
            lora_init_without_apply: a.lora_init_without_apply,
            host: a.host,
            port: a.port,
            parallel: a.parallel,
            ctx: a.ctx,
            queue: a.queue,
            prompt_chunk: a.prompt_chunk,
            pooling: a.pooling,
            chat_template_file: a.chat_template_file,
            api_key: a.api_key,
            ..Self::new(model_path)
        })
    }
}

/// The model at `path` and its tokenizer, with `loras` applied (see
/// [`gemma3_engine::load`]) and the control vectors of `control` added: a
/// model's error names the model, an adapter's or a control vector's the
/// file alone.
pub fn load_model(
    path: &std::path::Path,
    loras: &[LoraSpec],
    control: &ControlSpec,
) -> Result<(gemma3_model::Model, gemma3_tokenizer::Tokenizer)> {
    use gemma3_model::ModelError as E;
    let fail = |e: E| match e {
        e @ (E::Lora { .. } | E::Control { .. } | E::ControlWidth { .. }) => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(format!("loading {}", path.display())),
    };
    let (mut model, tok) = gemma3_engine::load(path, loras).map_err(fail)?;
    gemma3_engine::apply_control(&mut model, control).map_err(fail)?;
    Ok((model, tok))
}

/// The model loaded, the scheduler started and the port bound.
struct Loaded {
    app: Arc<App>,
    scheduler: std::thread::JoinHandle<()>,
    listener: std::net::TcpListener,
    header_timeout: Duration,
}

fn load(cfg: &ServerConfig) -> Result<Loaded> {
    if cfg.parallel == 0 || cfg.parallel > 256 {
        bail!("--parallel must be between 1 and 256, got {}", cfg.parallel);
    }
    if cfg.ctx < 2 {
        bail!("--ctx must be at least 2, got {}", cfg.ctx);
    }
    if cfg.prompt_chunk == 0 {
        bail!("--prompt-chunk must be at least 1");
    }
    if let Some(k) = &cfg.api_key {
        // An empty key had meant no authentication at all, and one with
        // spaces around it could never match (the client's is trimmed).
        if k.is_empty() || k.trim() != k {
            bail!("--api-key must be non-empty, without spaces around it");
        }
    }
    let path = &cfg.model_path;
    if !path.exists() {
        bail!(
            "model file {} does not exist: pass --model PATH, set $GEMMA3_MODEL, or run `gemma3 pull`",
            path.display()
        );
    }
    let (model, tok) = load_model(path, &cfg.loras, &cfg.control)?;
    let chat = gemma3_engine::chat_template(&model, &tok, cfg.chat_template_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    // Ollama's routes render Gemma's conversations with Ollama's own Gemma 3
    // template, unless a template was given or the file brings another.
    let ollama_gemma = cfg.chat_template_file.is_none() && chat.is_gemma();
    let tok = Arc::new(tok);
    if cfg.ctx > model.config.ctx_len {
        bail!(
            "--ctx {} is larger than the model's context of {} tokens",
            cfg.ctx,
            model.config.ctx_len
        );
    }
    let stop_tokens = gemma3_engine::stop_tokens(&model, &tok);
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gemma3".into());
    let vocab = model.config.vocab_size;
    let d_model = model.config.d_model;
    let file = std::fs::metadata(path).ok();
    let info = routes::ModelInfo {
        path: path.clone(),
        file_bytes: file.as_ref().map_or(0, |m| m.len()),
        modified: (file.and_then(|m| m.modified().ok())).unwrap_or(std::time::UNIX_EPOCH),
        parameters: model.n_params(),
        quantization: (model.file.get_u32("general.file_type").ok())
            .and_then(file_type_name)
            .unwrap_or("unknown")
            .to_string(),
        ctx_len: model.config.ctx_len,
        layers: model.config.n_layers,
        loras: model.loras.clone(),
    };
    let kv = KvCache::bytes_for(&model.config, cfg.ctx) * cfg.parallel;
    // (Control vectors are set at start-up for every request, as llama-server sets them.)
    let steered: Vec<String> = (model.steered_layers().iter())
        .map(|(l, _)| l.to_string())
        .collect();
    let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
    listener.set_nonblocking(true)?;
    let weights = model.loaded_weight_bytes();
    let (sched, scheduler) = Scheduler::start(
        Arc::new(model),
        tok.clone(),
        SchedulerConfig {
            parallel: cfg.parallel,
            ctx: cfg.ctx,
            max_queue: cfg.queue,
            prefill_chunk: cfg.prompt_chunk,
        },
    )
    .with_context(|| {
        format!(
            "starting the scheduler with {} KV caches of {} tokens (lower --parallel or --ctx)",
            cfg.parallel, cfg.ctx
        )
    })?;
    if cfg.lora_init_without_apply {
        sched
            .set_lora_scales(vec![0.0; info.loras.len()])
            .map_err(anyhow::Error::msg)?;
    }
    // Each adapter also answers to a model name (its file's stem), as vLLM
    // and Ollama serve fine-tunes: that adapter alone, at its scale (1 where
    // it was given 0).
    let mut adapters: Vec<(String, f32)> = Vec::new();
    for (i, l) in info.loras.iter().enumerate() {
        let stem = (l.path.file_stem())
            .map_or_else(|| format!("lora-{i}"), |s| s.to_string_lossy().into_owned());
        let taken = |n: &str| n == model_id || adapters.iter().any(|(a, _)| a == n);
        let name = if taken(&stem) {
            format!("{stem}-{i}")
        } else {
            stem
        };
        adapters.push((name, if l.scale == 0.0 { 1.0 } else { l.scale }));
    }
    eprintln!(
        "gemma3 serve: {model_id}, {} slots × {} tokens of context (KV caches {:.0} MiB), queue {}",
        cfg.parallel,
        cfg.ctx,
        kv as f64 / (1 << 20) as f64,
        cfg.queue
    );
    if !steered.is_empty() {
        eprintln!(
            "gemma3 serve: control vectors added to the output of layer(s) {} for every request",
            steered.join(", ")
        );
    }
    // The caches take memory only as positions are written, so this starts;
    // say so before a full load runs the machine out of memory.
    let need = kv as u64 + weights;
    if let Some(total) = total_memory().filter(|&t| need > t) {
        eprintln!(
            "gemma3 serve: warning: the weights and full KV caches would take {:.0} MiB, more than the {:.0} MiB this process may use: lower --parallel or --ctx",
            need as f64 / (1 << 20) as f64,
            total as f64 / (1 << 20) as f64
        );
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let app = Arc::new(App {
        sched,
        tok,
        model_id,
        api_key: cfg.api_key.clone(),
        metrics: Default::default(),
        vocab,
        d_model,
        stop_tokens,
        next_id: AtomicU64::new(0),
        started,
        body_timeout: cfg.body_timeout,
        tokenizing: Arc::new(tokio::sync::Semaphore::new(2)),
        pooling: cfg.pooling,
        grammars: Default::default(),
        info,
        chat,
        ollama_gemma,
        adapters,
    });
    Ok(Loaded {
        app,
        scheduler,
        listener,
        header_timeout: cfg.header_timeout,
    })
}

/// llama.cpp's name for a GGUF's `general.file_type` (its `LLAMA_FTYPE`
/// values, checked against the `gguf` Python package's `LlamaFileType`).
fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// A field of Linux's /proc/meminfo (`MemTotal:`, `MemAvailable:`), in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info.lines().find_map(|l| l.strip_prefix(field))?;
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1024)
}

/// A cgroup v2 file's number (a container's `memory.max`, …), if it has one.
fn cgroup(file: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/fs/cgroup/{file}")).ok()?;
    s.trim().parse().ok()
}

/// The memory this process may use, in bytes, if known: Linux's MemTotal,
/// or a cgroup v2 limit (a container's) below it.
fn total_memory() -> Option<u64> {
    let total = meminfo("MemTotal:")?;
    Some(cgroup("memory.max").map_or(total, |c| c.min(total)))
}

/// The memory free for this process now, in bytes, if known: Linux's
/// MemAvailable, or what is left under a cgroup v2 limit where less.
pub fn available_memory() -> Option<u64> {
    let free = meminfo("MemAvailable:")?;
    let left = cgroup("memory.max")
        .zip(cgroup("memory.current"))
        .map(|(max, used)| max.saturating_sub(used));
    Some(left.map_or(free, |l| l.min(free)))
}

/// The routes over the shared state.
pub fn router(app: Arc<App>) -> Router {
    // Everything that reads a body or the model needs the key (as in
    // llama-server): /tokenize ran the tokenizer on 2 MiB bodies for anyone.
    let keyed = Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/models", get(routes::models))
        // llama-server's paths without the /v1 prefix.
        .route("/chat/completions", post(routes::chat))
        .route("/completions", post(routes::completions))
        .route("/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/props", get(routes::props))
        .route(
            "/lora-adapters",
            get(routes::lora_adapters).post(routes::set_lora_adapters),
        )
        // Ollama's API.
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/show", post(ollama::show))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route_layer(from_fn_with_state(app.clone(), routes::auth));
    Router::new()
        .merge(keyed)
        .route("/health", get(routes::health))
        // Ollama answers its root with a line of text; its clients' and
        // front ends' connection checks ask for it.
        .route("/", get(|| async { "gemma3 serve is running\n" }))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(from_fn_with_state(app.clone(), routes::count))
        .layer(axum::middleware::from_fn(routes::cors))
        .layer(DefaultBodyLimit::max(routes::BODY_LIMIT))
        .with_state(app)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gemma3-http")
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Serve until `stop` resolves; then stop accepting, let in-flight requests
/// run for up to `grace` (or until `hurry` resolves), cancel the rest, and
/// wait for the scheduler thread.
fn run(
    loaded: Loaded,
    grace: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
    hurry: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Loaded {
        app,
        scheduler,
        listener,
        header_timeout,
    } = loaded;
    let rt = runtime()?;
    let sched = app.sched.clone();
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let drained = Arc::new(tokio::sync::Notify::new());
        let give_up = drained.clone();
        let shutdown = async move {
            stop.await;
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = hurry => {}
                }
                sched.cancel_all();
                // The cancelled requests' last events get DRAIN_TIMEOUT to
                // reach their clients; a client that does not read its reply
                // had held the server open for as long as it kept the
                // connection.
                tokio::time::sleep(DRAIN_TIMEOUT).await;
                give_up.notify_one();
            });
        };
        let drained = async move { drained.notified().await };
        serve_http(listener, router(app), header_timeout, shutdown, drained).await;
        Ok::<(), std::io::Error>(())
    });
    // Dropping the runtime drops every task and with them the last scheduler
    // handles; the thread then ends once its requests have.
    drop(rt);
    result.context("serving HTTP")?;
    scheduler
        .join()
        .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    Ok(())
}

/// Connections served at once: the open-file limit, raised to its hard
/// limit, less a margin for the model file, the threads and the runtime's
/// own descriptors, and at most 16 384 (more wait in the listen backlog, so
/// the server never runs out of descriptors or memory). A fixed 512 let 512
/// silent sockets, reopened as the header timeout closed them, keep
/// everyone else out.
fn connection_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 512;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max.min(1 << 20),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
    }
    // At most 16 384: an open connection holds about 20 KB (20 000 of them
    // took the server from 333 to 714 MB), so a cap at a million descriptors
    // would let idle sockets take the memory instead.
    usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .saturating_sub(128)
        .clamp(64, 16 << 10)
}

/// Time for a request's header to arrive, and for a keep-alive connection to
/// start its next request: without it, a client that sent part of a header
/// (or nothing) held its connection forever, and 20 000 of them took the
/// server down.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request's body (at most [`routes::BODY_LIMIT`]) to arrive once
/// its header has.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time the connections get to send their last bytes once the requests
/// were cancelled at shutdown; those still open after it are closed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept and serve HTTP/1 connections until `shutdown` resolves; then stop
/// accepting and wait for the open connections to finish their requests, or
/// until `give_up` resolves (those still open are then dropped).
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
    give_up: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(connection_cap()));
    let mut http = hyper::server::conn::http1::Builder::new();
    // Half-closing stays off (hyper's default, as axum::serve had it): with
    // it on, hyper stops watching for the client's end of the connection,
    // and a non-streamed request whose client hung up went on generating.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or the like: wait rather than spin.
                    eprintln!("gemma3 serve: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = give_up => {
            eprintln!(
                "gemma3 serve: closing the connections still open (their clients did not read their replies)"
            );
        }
    }
}

/// `gemma3 serve`: run in the foreground until SIGINT or SIGTERM (a second
/// signal cancels in-flight requests at once).
pub fn serve(cfg: ServerConfig) -> Result<()> {
    let loaded = load(&cfg)?;
    let addr = loaded.listener.local_addr()?;
    eprintln!(
        "gemma3 serve: listening on http://{addr} ({}); Ctrl-C to stop",
        if cfg.api_key.is_some() {
            "API key required on every route but /health and /metrics"
        } else {
            "no API key"
        }
    );
    if cfg.api_key.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "gemma3 serve: warning: {} is reachable from other machines and no --api-key is set: anyone who can reach it can use the model",
            addr.ip()
        );
    }
    let grace = cfg.shutdown_grace;
    run(
        loaded,
        grace,
        async move {
            signal().await;
            eprintln!(
                "gemma3 serve: shutting down (in-flight requests get {} s; signal again to cancel them now)",
                grace.as_secs()
            );
        },
        signal(),
    )?;
    eprintln!("gemma3 serve: stopped");
    Ok(())
}

/// SIGINT or SIGTERM.
async fn signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = int => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = int.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}

/// A server running on its own thread (for tests and embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Load the model, bind `host:port` (port 0: any free one) and serve on a
    /// background thread.
    pub fn start(cfg: ServerConfig) -> Result<Self> {
        let loaded = load(&cfg)?;
        let addr = loaded.listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let grace = cfg.shutdown_grace;
        let thread = std::thread::Builder::new()
            .name("gemma3-server".into())
            .spawn(move || {
                run(
                    loaded,
                    grace,
                    async move {
                        let _ = rx.await;
                    },
                    std::future::pending(),
                )
            })?;
        Ok(RunningServer {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Shut down gracefully (as on SIGTERM) and wait until everything stopped.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
