//! The HTTP routes: translate OpenAI JSON into engine requests (token ids and
//! generation parameters), hand them to the scheduler, and translate its
//! events back into JSON or server-sent events.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{
    parse_body, ChatRequest, Common, CompletionRequest, EmbeddingRequest, Fields, MaxTokens,
    Prompt, COMPLETIONS_DEFAULT_MAX_TOKENS,
};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use gemma3_engine::embed::normalize_l2;
use gemma3_engine::scheduler::{
    Event, EventSink, PromptToken, Request as EngineRequest, Scheduler, SubmitError, Usage,
};
use gemma3_engine::{Constraint, FinishReason, GenerateParams, Grammars, Pooling};
use gemma3_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What every handler shares.
pub struct App {
    pub sched: Scheduler,
    pub tok: Arc<Tokenizer>,
    /// The id /v1/models reports and responses carry.
    pub model_id: String,
    pub api_key: Option<String>,
    pub metrics: Metrics,
    pub vocab: usize,
    /// Floats in a hidden state (an embedding).
    pub d_model: usize,
    /// eos and `<end_of_turn>`.
    pub stop_tokens: Vec<u32>,
    pub next_id: AtomicU64,
    pub started: u64,
    /// See [`crate::ServerConfig`].
    pub body_timeout: std::time::Duration,
    /// Requests being tokenized, or grammars compiled, at once (see
    /// `encode` and `constraint`). A turn is held by the blocking work
    /// itself, so a client that goes away does not free it early.
    pub tokenizing: Arc<tokio::sync::Semaphore>,
    /// How `/v1/embeddings` pools a text's hidden states.
    pub pooling: Pooling,
    /// The grammar compiler for this vocabulary, built by the first request
    /// that asks for a grammar or schema.
    pub grammars: std::sync::OnceLock<Result<Grammars, String>>,
    /// What Ollama's `/api/tags` and `/api/show` say of the model.
    pub info: ModelInfo,
    /// How chat messages become the prompt (`--chat-template-file`, the
    /// file's own template, or Gemma's format).
    pub chat: gemma3_engine::ChatTemplate,
    /// Whether Ollama's routes render with Ollama's Gemma 3 template (no
    /// template given, and the file's, if any, is Gemma's) rather than `chat`.
    pub ollama_gemma: bool,
    /// Each LoRA adapter's model name and the scale it runs at when a
    /// request names it in its `model`, by adapter id.
    pub adapters: Vec<(String, f32)>,
}

/// The model file and its size, for Ollama's listings.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub path: std::path::PathBuf,
    pub file_bytes: u64,
    pub modified: std::time::SystemTime,
    pub parameters: u64,
    /// llama.cpp's name of the file's type (`Q4_K_M`), or "unknown".
    pub quantization: String,
    /// The model's training context (not the server's `--ctx`).
    pub ctx_len: usize,
    pub layers: usize,
    /// The LoRA adapters applied at start, in order (their ids).
    pub loras: Vec<gemma3_model::LoraInfo>,
}

pub type AppState = State<Arc<App>>;

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

impl App {
    /// A request's LoRA scales: its own `lora`, else, where its `model`
    /// names an adapter, that adapter alone at its scale, else None (the
    /// server's current ones, read once, so that the jobs of one request
    /// run at the same scales even if `POST /lora-adapters` changes them
    /// while some wait). A `model` that names nothing this server runs is a
    /// 404 (see [`App::adapter_named`]), with a `lora` of its own too.
    pub(crate) fn scales_for(
        &self,
        model: Option<&str>,
        lora: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, ApiError> {
        let named = self.adapter_named(model)?;
        if lora.is_some() {
            return Ok(lora);
        }
        Ok(named.map(|id| {
            let mut s = vec![0.0; self.adapters.len()];
            s[id] = self.adapters[id].1;
            s
        }))
    }

    /// The adapter a request's `model` names, if any: an adapter's name,
    /// with or without Ollama's default tag `:latest`. A server without
    /// adapters runs its one model whatever the name; one with adapters
    /// (as vLLM and Ollama serve fine-tunes) answers 404 to a name that is
    /// neither an adapter's nor the base model's, where a mistyped
    /// adapter's name had silently run the base model.
    pub(crate) fn adapter_named(&self, model: Option<&str>) -> Result<Option<usize>, ApiError> {
        let Some(asked) = model else {
            return Ok(None);
        };
        let name = asked.strip_suffix(":latest").unwrap_or(asked);
        if let Some(id) = self.adapters.iter().position(|(a, _)| a == name) {
            return Ok(Some(id));
        }
        if self.adapters.is_empty() || name == self.model_id {
            return Ok(None);
        }
        Err(self.no_such_model(asked))
    }

    /// The 404 for a model name this server does not run, listing those it
    /// does (the base model's, then the adapters').
    pub(crate) fn no_such_model(&self, asked: &str) -> ApiError {
        let names: Vec<String> = std::iter::once(&self.model_id)
            .chain(self.adapters.iter().map(|(a, _)| a))
            .map(|n| format!("'{n}'"))
            .collect();
        let message = format!(
            "model '{asked}' not found: this server runs {}",
            names.join(", ")
        );
        ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(message).with_code("model_not_found")
        }
    }

    pub(crate) fn lora_or_current(&self, lora: Option<Vec<f32>>) -> Option<Vec<f32>> {
        match lora {
            None if !self.info.loras.is_empty() => Some(self.sched.lora_scales()),
            l => l,
        }
    }

    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:08x}{n:08x}", self.started as u32)
    }

    /// How many tokens to generate: `prompt + max_tokens` must fit the context.
    pub(crate) fn budget(
        &self,
        prompt: usize,
        common: &Common,
        default: Option<usize>,
        prompt_field: &str,
    ) -> Result<usize, ApiError> {
        let ctx = self.sched.ctx();
        if prompt == 0 {
            return Err(ApiError::field(prompt_field, "the prompt is empty"));
        }
        // (A prompt scored and nothing generated may fill the context.)
        let scoring_only = common.max_tokens == MaxTokens::Count(0);
        if prompt > ctx || (prompt == ctx && !scoring_only) {
            return Err(ApiError::field(
                prompt_field,
                format!("the prompt has {prompt} tokens but the context holds {ctx} (and at least one more is needed to generate): shorten the prompt, or start the server with a larger --ctx"),
            )
            .with_code("context_length_exceeded"));
        }
        let room = ctx - prompt;
        match common.max_tokens {
            MaxTokens::Unlimited => Ok(room),
            MaxTokens::Count(m) if m > room as u64 => Err(ApiError::field(
                common.max_tokens_key,
                format!(
                    "the prompt has {prompt} tokens and {} is {m}: together {} tokens, beyond the context of {ctx} tokens (at most {room} new tokens fit)",
                    common.max_tokens_key,
                    (prompt as u64).saturating_add(m)
                ),
            )
            .with_code("context_length_exceeded")),
            MaxTokens::Count(m) => Ok(m as usize),
            MaxTokens::Default => Ok(default.map_or(room, |d| d.min(room))),
        }
    }

    /// Whether `prompts` × `n` choices fit this server at once (each choice
    /// is a request to the scheduler, which holds `--parallel` plus
    /// `--queue`); if not, a 400 naming `n` or `prompt`: a request it could
    /// never hold is the caller's error, not a 429 to retry.
    pub(crate) fn fits(&self, prompts: usize, n: usize) -> Result<(), ApiError> {
        let limit = self.sched.limit();
        let jobs = prompts.saturating_mul(n);
        if jobs <= limit {
            return Ok(());
        }
        let (field, what) = match (prompts, n) {
            (p, 1) => ("prompt", format!("{p} prompts")),
            (1, n) => ("n", format!("n = {n} choices")),
            (p, n) => ("n", format!("{p} prompts × n = {n}: {jobs} choices")),
        };
        Err(ApiError::field(
            field,
            format!("{what}, but this server holds at most {limit} requests at once (--parallel + --queue)"),
        ))
    }

    /// The parameters of choice `choice` (of `n`, see [`Common::n`]).
    pub(crate) fn params(
        &self,
        common: &Common,
        max_tokens: usize,
        constraint: Option<Constraint>,
        choice: usize,
    ) -> GenerateParams {
        let mut sampling = common.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(choice as u64);
        if common.ignore_eos {
            // As llama-server does: the end tokens get a logit of −∞.
            (sampling.logit_bias).extend(self.stop_tokens.iter().map(|&t| (t, f32::NEG_INFINITY)));
        }
        GenerateParams {
            max_tokens,
            sampling,
            stop_strings: common.stop.clone(),
            stop_tokens: self.stop_tokens.clone(),
            constraint,
        }
    }

    /// Queue several jobs as one (see [`Scheduler::submit_many`]): each
    /// one's events arrive on its receiver, in order. Dropping a receiver
    /// (the client went away) makes the scheduler drop that job.
    /// `logprobs`: the generated tokens' (with k alternatives);
    /// `prompt_logprobs`: the prompt's (see [`EngineRequest::prompt_logprobs`]).
    pub(crate) fn submit_many(
        &self,
        jobs: Vec<(Vec<u32>, GenerateParams)>,
        logprobs: Option<usize>,
        prompt_logprobs: Option<usize>,
        lora: Option<Vec<f32>>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
        let jobs = jobs
            .into_iter()
            .map(|(prompt, params)| (prompt, params, None));
        Ok(self.queue(jobs, logprobs, prompt_logprobs, lora)?)
    }

    /// Queue embedding jobs as one: each prompt's pooled vector arrives on its
    /// receiver as an [`Event::Embedding`].
    fn submit_embeddings(
        &self,
        prompts: Vec<Vec<u32>>,
        lora: Option<Vec<f32>>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, SubmitError> {
        // (Unused by an embedding job.)
        let params = GenerateParams::greedy(0);
        let jobs = (prompts.into_iter()).map(|p| (p, params.clone(), Some(self.pooling)));
        self.queue(jobs, None, None, lora)
    }

    fn queue(
        &self,
        jobs: impl Iterator<Item = (Vec<u32>, GenerateParams, Option<Pooling>)>,
        logprobs: Option<usize>,
        prompt_logprobs: Option<usize>,
        lora: Option<Vec<f32>>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, SubmitError> {
        // Scales given with the request (its `lora`, or an adapter named as
        // its `model`) are the client's choice: see `own_lora`.
        let own_lora = lora.is_some();
        let lora = self.lora_or_current(lora);
        let (reqs, rxs): (Vec<_>, Vec<_>) = jobs
            .map(|(prompt, params, embed)| {
                let (tx, rx) = unbounded_channel();
                let req = EngineRequest {
                    prompt,
                    params,
                    logprobs,
                    embed,
                    prompt_logprobs,
                    lora: lora.clone(),
                    own_lora,
                    events: Box::new(Sink(tx)),
                };
                (req, rx)
            })
            .unzip();
        self.sched.submit_many(reqs)?;
        Ok(rxs)
    }

    /// The text of a token (special tokens spelled out) and its bytes.
    /// The text of a token (special tokens spelled out) and its bytes. A
    /// token that is not whole UTF-8 (a byte of a longer character) is
    /// written as OpenAI writes it, `bytes:\xe2\x80`: as U+FFFD, such
    /// tokens' `top_logprobs` entries fell on one key.
    fn piece(&self, id: u32) -> (String, Vec<u8>) {
        let b = self.tok.token_to_piece(id, true).unwrap_or(&[]).to_vec();
        let text = match std::str::from_utf8(&b) {
            Ok(t) => t.to_string(),
            Err(_) => {
                let hex: String = b.iter().map(|x| format!("\\x{x:02x}")).collect();
                format!("bytes:{hex}")
            }
        };
        (text, b)
    }

    fn chat_logprob(&self, id: u32, lp: f32, top: &[(u32, f32)]) -> Value {
        let (t, b) = self.piece(id);
        let top: Vec<Value> = top
            .iter()
            .map(|&(id, lp)| {
                let (t, b) = self.piece(id);
                json!({"token": t, "logprob": lp, "bytes": b})
            })
            .collect();
        json!({"token": t, "logprob": lp, "bytes": b, "top_logprobs": top})
    }

    fn top_map(&self, top: &[(u32, f32)]) -> Value {
        let mut m = serde_json::Map::new();
        for &(id, lp) in top {
            m.entry(self.piece(id).0).or_insert(json!(lp));
        }
        Value::Object(m)
    }
}

/// A request body that is a JSON object; anything else is an OpenAI-shaped
/// error (including a body over [`BODY_LIMIT`]: 413, and one that does not
/// arrive within the body timeout: 408).
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<Arc<App>> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        parse_body(&read_body(req, app).await?).map(JsonObject)
    }
}

/// A request body that is any JSON value (`POST /lora-adapters` takes an
/// array), read as [`JsonObject`] reads one.
pub struct JsonValue(pub Value);

impl FromRequest<Arc<App>> for JsonValue {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let body = read_body(req, app).await?;
        serde_json::from_slice(&body)
            .map(JsonValue)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }
}

/// A request's body, within [`BODY_LIMIT`] and the body timeout.
async fn read_body(req: Request, app: &Arc<App>) -> Result<Bytes, ApiError> {
    // A length over the limit is refused before the body is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let read = Bytes::from_request(req, app);
    let body = match tokio::time::timeout(app.body_timeout, read).await {
        Ok(body) => body.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                return too_large();
            }
            let mut e = ApiError::bad_request(r.body_text());
            e.status = r.status();
            e
        })?,
        Err(_) => {
            let mut e = ApiError::bad_request(format!(
                "the request body did not arrive within {} s",
                app.body_timeout.as_secs_f32()
            ));
            e.status = StatusCode::REQUEST_TIMEOUT;
            return Err(e);
        }
    };
    Ok(body)
}

/// The largest request body: checked against its declared length here, and
/// enforced while reading it by the router's `DefaultBodyLimit`.
pub const BODY_LIMIT: usize = 2 << 20;

fn too_large() -> ApiError {
    let mut e = ApiError::bad_request(format!(
        "the request body is larger than the {} MiB limit",
        BODY_LIMIT >> 20
    ));
    e.status = StatusCode::PAYLOAD_TOO_LARGE;
    e
}

/// `text` tokenized on tokio's blocking threads: a 2 MiB text takes seconds,
/// which on the two HTTP threads had stalled every other request and stream.
pub(crate) async fn encode(
    app: &Arc<App>,
    text: String,
    add_bos: bool,
    special: bool,
) -> Result<Vec<u32>, ApiError> {
    tokenize_with(app, move |tok| tok.encode(&text, add_bos, special)).await
}

/// The request's grammar or schema, compiled once (a batch's prompts take
/// clones), in a turn of [`on_blocking_turn`]: building the vocabulary's
/// index takes about a second, once, and a large grammar as long.
pub(crate) async fn constraint(
    app: &Arc<App>,
    common: &Common,
) -> Result<Option<Constraint>, ApiError> {
    let Some((spec, field)) = common.grammar.clone() else {
        return Ok(None);
    };
    let own = app.clone();
    on_blocking_turn(app, "the grammar compiler", move || {
        let app = own;
        let grammars = app
            .grammars
            .get_or_init(|| Grammars::new(&app.tok).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ApiError::internal(format!("grammars: {e}")))?;
        let c = grammars
            .compile(&spec)
            .map_err(|e| ApiError::field(field, e.to_string()))?;
        Ok(Some(c))
    })
    .await?
}

/// Run `f` on the tokenizer on tokio's blocking threads.
async fn tokenize_with(
    app: &Arc<App>,
    f: impl FnOnce(&Tokenizer) -> Vec<u32> + Send + 'static,
) -> Result<Vec<u32>, ApiError> {
    let tok = app.tok.clone();
    on_blocking_turn(app, "the tokenizer", move || f(&tok)).await
}

/// Run `f` on tokio's blocking threads in one of the two turns tokenizing
/// and grammar compiling share (more would take the cores from the model's
/// workers). The turn is held by `f`'s thread, so a client that goes away
/// does not free it early. `what` names the work in the error if the
/// thread is lost.
async fn on_blocking_turn<T: Send + 'static>(
    app: &Arc<App>,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let stopped = || ApiError::internal(format!("{what} stopped"));
    let turn = app
        .tokenizing
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| stopped())?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        f()
    })
    .await
    .map_err(|_| stopped())
}

/// Events into the tokio channel a handler awaits (sending never blocks).
struct Sink(UnboundedSender<Event>);

impl EventSink for Sink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub(crate) fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// llama-server style timings (not part of OpenAI's schema).
fn timings_json(u: &Usage) -> Value {
    let gen_s = u.gen_time.as_secs_f64();
    json!({
        "queue_ms": u.queue_time.as_secs_f64() * 1e3,
        "prompt_ms": u.prompt_time.as_secs_f64() * 1e3,
        "prompt_n": u.prompt_tokens - u.cached_tokens,
        "predicted_ms": gen_s * 1e3,
        "predicted_n": u.completion_tokens,
        "predicted_per_second": if gen_s > 0.0 { u.completion_tokens as f64 / gen_s } else { 0.0 },
    })
}

/// One generated token as a response reports it.
pub(crate) struct GenToken {
    id: u32,
    logprob: Option<f32>,
    top: Vec<(u32, f32)>,
    /// Characters of generated text before this token's.
    offset: usize,
    /// Bytes of generated text before this token's, and whether it has none.
    start: usize,
    empty: bool,
}

/// Lines up the generated tokens with the text released for them (the
/// scheduler holds text back while it may begin a stop string, and cuts a
/// stop string off): a token is reported once the first byte of its text
/// is out, so a token that a stop string cut entirely is never reported,
/// and the tokens and offsets a response gives follow its text. Before,
/// every token was reported as it came, so the logprobs of a stop string's
/// tokens followed text that ended before them, with offsets that had not
/// moved. Bytes and characters are counted in the decoder's own text of
/// each token (`Event::Token::piece`), which is what the reply is made of:
/// an invalid byte there is one U+FFFD, three bytes and one character.
#[derive(Default)]
struct Aligner {
    /// Bytes and characters of all the tokens' text so far.
    bytes: usize,
    chars: usize,
    /// Bytes of text released so far.
    released: usize,
    pending: std::collections::VecDeque<GenToken>,
}

impl Aligner {
    /// Token `id`, whose text is `piece`, came with `text` released; the
    /// tokens now out.
    fn token(
        &mut self,
        id: u32,
        text: &str,
        piece: &str,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    ) -> Vec<GenToken> {
        self.pending.push_back(GenToken {
            id,
            logprob,
            top,
            offset: self.chars,
            start: self.bytes,
            empty: piece.is_empty(),
        });
        self.bytes += piece.len();
        self.chars += piece.chars().count();
        self.released += text.len();
        self.ready()
    }

    fn ready(&mut self) -> Vec<GenToken> {
        let mut out = Vec::new();
        while let Some(t) = self.pending.front() {
            if t.start < self.released || (t.empty && t.start <= self.released) {
                out.extend(self.pending.pop_front());
            } else {
                break;
            }
        }
        out
    }

    /// The end, with `tail` the text released last: the tokens still to
    /// report. Unless a stop string cut text, that is all of them.
    fn finish(&mut self, finish: FinishReason, tail: &str) -> Vec<GenToken> {
        self.released += tail.len();
        if finish == FinishReason::Length || self.released >= self.bytes {
            return self.pending.drain(..).collect();
        }
        let out = self.ready();
        self.pending.clear();
        out
    }
}

/// A token prompt as `echo` gives it back: its text with special tokens
/// written out (as a text prompt has them), without a leading BOS (which a
/// text prompt gets without writing it).
fn echo_text(app: &App, ids: &[u32]) -> String {
    let skip = usize::from(ids.first() == Some(&app.tok.specials().bos));
    app.tok.decode(&ids[skip..], true).unwrap_or_default()
}

/// Completions-style `logprobs` for `tokens`, after the scored `prompt`
/// tokens where `echo` asked for them (the first prompt token's
/// log-probability and alternatives null, as OpenAI gives them). Text
/// offsets count characters of the reply's text: the echoed prompt (in which
/// special tokens such as `<bos>` have no text), then the generated text.
fn completion_logprobs(app: &App, prompt: &[PromptToken], tokens: &[GenToken]) -> Value {
    let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    // The prompt's characters as the echo spells them (see `echo_text`):
    // special tokens written out, bytes counted once their character is
    // whole, and a leading BOS not at all.
    let mut dec = app.tok.stream_decoder(true);
    let mut at = 0;
    for (i, t) in prompt.iter().enumerate() {
        toks.push(app.piece(t.id).0);
        lps.push(json!(t.logprob));
        tops.push(match t.logprob {
            None => Value::Null,
            Some(_) => app.top_map(&t.top_logprobs),
        });
        offs.push(at);
        let piece = dec.push(t.id).unwrap_or_default();
        if !(i == 0 && t.id == app.tok.specials().bos) {
            at += piece.chars().count();
        }
    }
    for t in tokens {
        toks.push(app.piece(t.id).0);
        lps.push(json!(t.logprob));
        tops.push(app.top_map(&t.top));
        offs.push(at + t.offset);
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// Everything a finished request produced.
pub(crate) struct Collected {
    pub(crate) text: String,
    /// The prompt's tokens scored, where asked for.
    pub(crate) prompt: Vec<PromptToken>,
    pub(crate) tokens: Vec<GenToken>,
    pub(crate) finish: FinishReason,
    pub(crate) usage: Usage,
}

pub(crate) async fn collect(
    first: Option<Event>,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        prompt: Vec::new(),
        tokens: Vec::new(),
        finish: FinishReason::Stop,
        usage: Usage::default(),
    };
    let mut align = Aligner::default();
    let mut ev = first;
    loop {
        let e = match ev.take() {
            Some(e) => e,
            None => rx
                .recv()
                .await
                .ok_or_else(|| ApiError::internal("the scheduler stopped"))?,
        };
        match e {
            Event::Token {
                id,
                text,
                piece,
                logprob,
                top_logprobs,
            } => {
                c.tokens
                    .extend(align.token(id, &text, &piece, logprob, top_logprobs));
                c.text.push_str(&text);
            }
            Event::Done {
                finish,
                text,
                usage,
            } => {
                c.tokens.extend(align.finish(finish, &text));
                c.text.push_str(&text);
                c.finish = finish;
                c.usage = usage;
                return Ok(c);
            }
            Event::Prompt(p) => c.prompt = p,
            Event::Error(e) => return Err(e.into()),
            Event::Embedding { .. } => return Err(unexpected_embedding()),
        }
    }
}

/// An [`Event::Embedding`] for a generation request (the scheduler sends
/// one only to requests that asked for it).
fn unexpected_embedding() -> ApiError {
    ApiError::internal("the scheduler answered a generation request with an embedding")
}

/// The first event: an error before any token becomes an HTTP error status.
async fn first_event(rx: &mut UnboundedReceiver<Event>) -> Result<Event, ApiError> {
    match rx.recv().await {
        None => Err(ApiError::internal("the scheduler stopped")),
        Some(Event::Error(e)) => Err(e.into()),
        Some(e) => Ok(e),
    }
}

/// Turns events into the JSON chunks of one endpoint's stream. `index` is
/// a choice's place in the response's `choices`.
pub(crate) trait StreamFormat: Send + 'static {
    /// Newline-delimited JSON (Ollama's streams) instead of server-sent
    /// events ending with `data: [DONE]` (OpenAI's).
    const NDJSON: bool = false;
    /// The chunks that open choice `index`.
    fn start(&mut self, index: usize) -> Vec<Value>;
    /// The chunk for released `text` and the `tokens` now out (see
    /// [`Aligner`]), if either has anything.
    fn text(&self, index: usize, text: &str, tokens: &[GenToken]) -> Option<Value>;
    /// The chunk that ends choice `index` with its finish reason, and that
    /// choice's usage.
    fn finish(&self, index: usize, finish: FinishReason, usage: &Usage) -> Value;
    /// The request's usage, all choices together, if asked for: the last chunk.
    fn usage(&self, usage: &Usage) -> Option<Value>;
    /// An error that ends the stream.
    fn error(&self, e: &ApiError) -> Value {
        e.body()
    }
}

fn push_data(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

/// One chunk of `F`'s stream.
fn push_chunk<F: StreamFormat>(out: &mut String, v: &Value) {
    if F::NDJSON {
        out.push_str(&v.to_string());
        out.push('\n');
    } else {
        push_data(out, v);
    }
}

/// One choice of a response: its job's first event if already taken (see
/// [`choices`]) and the rest to come, and whether its usage counts the
/// prompt's tokens (see [`add_usage`]).
pub(crate) struct Choice {
    pub(crate) first: Option<Event>,
    pub(crate) rx: UnboundedReceiver<Event>,
    pub(crate) counts_prompt: bool,
}

/// The response's jobs, queued as one. The first one's first event is
/// awaited, so that an error before any token (a grammar that fails, a
/// prompt the scheduler refuses) becomes the HTTP error; the others' come
/// with the rest, since a choice beyond `--parallel` starts only when
/// another ends, and awaiting it held a stream's first byte back until
/// then. `counts_prompt(i)`: whether job i's prompt tokens count in the
/// usage.
pub(crate) async fn choices(
    rxs: Vec<UnboundedReceiver<Event>>,
    counts_prompt: impl Fn(usize) -> bool,
) -> Result<Vec<Choice>, ApiError> {
    let mut out = Vec::with_capacity(rxs.len());
    for (i, mut rx) in rxs.into_iter().enumerate() {
        let first = if i == 0 {
            Some(first_event(&mut rx).await?)
        } else {
            None
        };
        out.push(Choice {
            first,
            rx,
            counts_prompt: counts_prompt(i),
        });
    }
    Ok(out)
}

/// A stream of `fmt`'s chunks for the choices (server-sent events, or
/// newline-delimited JSON where `F::NDJSON`), each choice's chunks in its
/// order and the choices' interleaved as their tokens come, ending with the
/// usage (if asked for) and, for events, `data: [DONE]` once every choice
/// has finished. An error in any choice ends the stream with the error (the
/// other choices' jobs are dropped with it).
pub(crate) fn stream_response<F: StreamFormat>(choices: Vec<Choice>, mut fmt: F) -> Response {
    use futures_util::stream::{self, StreamExt};
    let mut head = String::new();
    for i in 0..choices.len() {
        for v in fmt.start(i) {
            push_chunk::<F>(&mut head, &v);
        }
    }
    let counts_prompt: Vec<bool> = choices.iter().map(|c| c.counts_prompt).collect();
    // Each choice's events tagged with its index, then `None` when its
    // channel closes (before `Done` that is the scheduler gone).
    let events = stream::select_all(choices.into_iter().enumerate().map(|(i, c)| {
        let rest = stream::unfold(
            c.rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        );
        stream::iter(c.first)
            .chain(rest)
            .map(move |e| (i, Some(e)))
            .chain(stream::once(async move { (i, None) }))
            .boxed()
    }));
    struct St<F> {
        head: String,
        events: stream::SelectAll<stream::BoxStream<'static, (usize, Option<Event>)>>,
        fmt: F,
        aligns: Vec<Aligner>,
        counts_prompt: Vec<bool>,
        finished: Vec<bool>,
        open: usize,
        usage: Usage,
        done: bool,
    }
    let n = counts_prompt.len();
    let st = St {
        head,
        events,
        fmt,
        aligns: (0..n).map(|_| Aligner::default()).collect(),
        counts_prompt,
        finished: vec![false; n],
        open: n,
        usage: Usage::default(),
        done: false,
    };
    let stream = stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = std::mem::take(&mut st.head);
        while let Some((i, ev)) = st.events.next().await {
            match ev {
                Some(Event::Token {
                    id,
                    text,
                    piece,
                    logprob,
                    top_logprobs,
                }) => {
                    let tokens = st.aligns[i].token(id, &text, &piece, logprob, top_logprobs);
                    if let Some(v) = st.fmt.text(i, &text, &tokens) {
                        push_chunk::<F>(&mut out, &v);
                    }
                    if !out.is_empty() {
                        return Some((Ok::<_, Infallible>(Bytes::from(out)), st));
                    }
                }
                Some(Event::Done {
                    finish,
                    text,
                    usage,
                }) => {
                    let tokens = st.aligns[i].finish(finish, &text);
                    if let Some(v) = st.fmt.text(i, &text, &tokens) {
                        push_chunk::<F>(&mut out, &v);
                    }
                    push_chunk::<F>(&mut out, &st.fmt.finish(i, finish, &usage));
                    st.usage = add_usage(st.usage, &usage, st.counts_prompt[i]);
                    st.finished[i] = true;
                    st.open -= 1;
                    if st.open == 0 {
                        if let Some(v) = st.fmt.usage(&st.usage) {
                            push_chunk::<F>(&mut out, &v);
                        }
                        break;
                    }
                    return Some((Ok(Bytes::from(out)), st));
                }
                // (A choice's channel closes after its `Done`, which ended
                // it above; a close first is the scheduler gone.)
                None if st.finished[i] => {}
                Some(Event::Error(e)) => {
                    push_chunk::<F>(&mut out, &st.fmt.error(&ApiError::from(e)));
                    break;
                }
                Some(Event::Embedding { .. }) => {
                    push_chunk::<F>(&mut out, &st.fmt.error(&unexpected_embedding()));
                    break;
                }
                // (Streams do not ask for the prompt's scores.)
                Some(Event::Prompt(_)) => {}
                None => {
                    let e = ApiError::internal("the scheduler stopped");
                    push_chunk::<F>(&mut out, &st.fmt.error(&e));
                    break;
                }
            }
        }
        if !F::NDJSON {
            out.push_str("data: [DONE]\n\n");
        }
        st.done = true;
        Some((Ok(Bytes::from(out)), st))
    });
    (
        [
            (
                header::CONTENT_TYPE,
                if F::NDJSON {
                    "application/x-ndjson"
                } else {
                    "text/event-stream"
                },
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One chunk of an OpenAI stream: the response's (app, id, created),
/// `object`, the `choices` and, for the last, the `usage`.
fn stream_chunk(
    (app, id, created): (&App, &str, u64),
    object: &str,
    choices: Value,
    usage: Option<&Usage>,
) -> Value {
    let mut v = json!({
        "id": id, "object": object, "created": created, "model": app.model_id, "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = usage_json(u);
    }
    v
}

struct ChatStream {
    app: Arc<App>,
    id: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
}

/// Chat's `logprobs.content` entries for `tokens` (those that carry one).
fn chat_logprobs(app: &App, tokens: &[GenToken]) -> Vec<Value> {
    tokens
        .iter()
        .filter_map(|t| t.logprob.map(|lp| app.chat_logprob(t.id, lp, &t.top)))
        .collect()
}

impl ChatStream {
    /// The `logprobs` of a chunk for `tokens` (null when not asked for or none).
    fn logprobs(&self, tokens: &[GenToken]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let content = chat_logprobs(&self.app, tokens);
        if content.is_empty() {
            return Value::Null;
        }
        json!({ "content": content })
    }

    fn chunk(&self, choices: Value, usage: Option<&Usage>) -> Value {
        let head = (&*self.app, self.id.as_str(), self.created);
        stream_chunk(head, "chat.completion.chunk", choices, usage)
    }

    fn choice(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        self.chunk(
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]),
            None,
        )
    }
}

impl StreamFormat for ChatStream {
    fn start(&mut self, index: usize) -> Vec<Value> {
        vec![self.choice(
            index,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )]
    }

    fn text(&self, index: usize, text: &str, tokens: &[GenToken]) -> Option<Value> {
        let logprobs = self.logprobs(tokens);
        (!text.is_empty() || !logprobs.is_null())
            .then(|| self.choice(index, json!({"content": text}), logprobs, None))
    }

    fn finish(&self, index: usize, finish: FinishReason, _: &Usage) -> Value {
        self.choice(index, json!({}), Value::Null, Some(finish_str(finish)))
    }

    fn usage(&self, usage: &Usage) -> Option<Value> {
        self.include_usage
            .then(|| self.chunk(json!([]), Some(usage)))
    }
}

struct CompletionStream {
    app: Arc<App>,
    id: String,
    created: u64,
    logprobs: Option<usize>,
    include_usage: bool,
    /// Each choice's prompt text, to echo (empty without `echo`).
    echoes: Vec<String>,
}

impl CompletionStream {
    /// The completions-style `logprobs` of a chunk for `tokens` (null when
    /// not asked for or none).
    fn logprobs(&self, tokens: &[GenToken]) -> Value {
        if self.logprobs.is_none() || tokens.is_empty() {
            return Value::Null;
        }
        completion_logprobs(&self.app, &[], tokens)
    }

    fn chunk(&self, choices: Value, usage: Option<&Usage>) -> Value {
        let head = (&*self.app, self.id.as_str(), self.created);
        stream_chunk(head, "text_completion", choices, usage)
    }

    fn choice(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        self.chunk(
            json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]),
            None,
        )
    }
}

impl StreamFormat for CompletionStream {
    fn start(&mut self, index: usize) -> Vec<Value> {
        match self.echoes.get_mut(index).map(std::mem::take) {
            Some(p) if !p.is_empty() => vec![self.choice(index, &p, Value::Null, None)],
            _ => Vec::new(),
        }
    }

    fn text(&self, index: usize, text: &str, tokens: &[GenToken]) -> Option<Value> {
        let logprobs = self.logprobs(tokens);
        (!text.is_empty() || !logprobs.is_null()).then(|| self.choice(index, text, logprobs, None))
    }

    fn finish(&self, index: usize, finish: FinishReason, _: &Usage) -> Value {
        self.choice(index, "", Value::Null, Some(finish_str(finish)))
    }

    fn usage(&self, usage: &Usage) -> Option<Value> {
        self.include_usage
            .then(|| self.chunk(json!([]), Some(usage)))
    }
}

pub async fn chat(
    State(app): AppState,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let req = ChatRequest::parse(&body, app.vocab)?;
    let lora = crate::openai::request_lora(&body, app.info.loras.len())?;
    let lora = app.scales_for(body.get("model").and_then(Value::as_str), lora)?;
    let prompt = chat_prompt(&app, &req.messages).await?;
    let max_tokens = app.budget(prompt.len(), &req.common, None, "messages")?;
    let n = req.common.n;
    app.fits(1, n)?;
    let constraint = constraint(&app, &req.common).await?;
    let jobs = (0..n)
        .map(|j| {
            let params = app.params(&req.common, max_tokens, constraint.clone(), j);
            (prompt.clone(), params)
        })
        .collect();
    let rxs = app.submit_many(jobs, req.logprobs, None, lora)?;
    // (The prompt counts once, as OpenAI counts it for n choices.)
    let choices = choices(rxs, |j| j == 0).await?;
    let id = app.new_id("chatcmpl");
    let created = unix_now();
    if req.common.stream {
        let fmt = ChatStream {
            app: app.clone(),
            id,
            created,
            logprobs: req.logprobs.is_some(),
            include_usage: req.common.include_usage,
        };
        return Ok(stream_response(choices, fmt));
    }
    let mut out = Vec::with_capacity(n);
    let mut usage = Usage::default();
    for (index, ch) in choices.into_iter().enumerate() {
        let c = collect(ch.first, ch.rx).await?;
        let logprobs = match req.logprobs {
            Some(_) => json!({ "content": chat_logprobs(&app, &c.tokens) }),
            None => Value::Null,
        };
        out.push(json!({
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs,
            "finish_reason": finish_str(c.finish),
        }));
        usage = add_usage(usage, &c.usage, ch.counts_prompt);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id, "object": "chat.completion", "created": created, "model": app.model_id,
            "choices": out,
            "usage": usage_json(&usage),
            "timings": timings_json(&usage),
        }),
    ))
}

/// A refusal where this model's vocabulary has no turn tokens, so no chat
/// format; `plain` names the route to use instead.
pub(crate) fn chat_format(app: &App, plain: &str) -> Result<(), ApiError> {
    let sp = app.tok.specials();
    if sp.start_of_turn.is_none() || sp.end_of_turn.is_none() {
        return Err(ApiError::bad_request(format!(
            "this model's vocabulary has no <start_of_turn> / <end_of_turn> tokens, so it has no chat format: use {plain}"
        )));
    }
    Ok(())
}

/// `messages` rendered with the chat template and tokenized (special
/// tokens parsed, as llama-server and `transformers` do); an error names
/// `messages`.
async fn chat_prompt(
    app: &Arc<App>,
    messages: &[gemma3_engine::Message],
) -> Result<Vec<u32>, ApiError> {
    if app.chat.is_gemma() {
        chat_format(app, "/v1/completions")?;
    }
    let text = app
        .chat
        .render(messages, true)
        .map_err(|e| chat_error(e, "messages"))?;
    encode(app, text, false, true).await
}

/// A chat template's error: the server's own (500) where the template fails,
/// the request's (400 naming `field`) where it refuses the messages.
pub(crate) fn chat_error(e: gemma3_engine::ChatError, field: &str) -> ApiError {
    match e {
        gemma3_engine::ChatError::Template(_) => ApiError::internal(e.to_string()),
        e => ApiError::field(field, e.to_string()),
    }
}

/// A completion's prompt (or an embedding's input) as token ids: text as
/// [`gemma3_engine::encode_prompt`] tokenizes it (special-token text parsed,
/// as llama-server does: read as plain text, a prompt in Gemma's turn
/// format had its reply spell out `<end_of_turn` instead of ending); token
/// ids as given.
pub(crate) async fn prompt_ids(app: &Arc<App>, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    match prompt {
        Prompt::Text(s) => {
            let s = s.clone();
            tokenize_with(app, move |tok| gemma3_engine::encode_prompt(tok, &s)).await
        }
        Prompt::Tokens(t) => Ok(t.clone()),
    }
}

/// Each prompt's pooled final hidden states (`--pooling`, not normalized),
/// in order, and the prompts' tokens. The prompts run in waves of at most
/// `--parallel`, each as large as the free places allow, so a batch larger
/// than the server holds at once still runs. Only a first wave that finds
/// no place gets the 429 any request would; later ones wait for room.
pub(crate) async fn embed_all(
    app: &Arc<App>,
    prompts: Vec<Vec<u32>>,
    lora: Option<Vec<f32>>,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let lora = app.lora_or_current(lora);
    let mut vectors = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = 0;
    let mut next = 0;
    while next < prompts.len() {
        // A wave of as many as fit now (at least one), at most --parallel.
        let s = app.sched.stats();
        let room = (app.sched.limit())
            .saturating_sub(s.active + s.waiting)
            .clamp(1, app.sched.parallel());
        let end = (next + room).min(prompts.len());
        let rxs = match app.submit_embeddings(prompts[next..end].to_vec(), lora.clone()) {
            Ok(rxs) => rxs,
            // Once vectors are made, wait for room rather than throw them away.
            Err(SubmitError::QueueFull { .. }) if next > 0 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        next = end;
        for mut rx in rxs {
            match rx.recv().await {
                Some(Event::Embedding { vector, usage }) => {
                    prompt_tokens += usage.prompt_tokens;
                    vectors.push(vector);
                }
                Some(Event::Error(e)) => return Err(e.into()),
                Some(_) => {
                    return Err(ApiError::internal(
                        "the scheduler answered an embedding request with tokens",
                    ))
                }
                None => return Err(ApiError::internal("the scheduler stopped")),
            }
        }
    }
    Ok((vectors, prompt_tokens))
}

/// `POST /v1/embeddings`: each input's final hidden states pooled
/// (`--pooling`) and scaled to unit length, as llama-server's (with
/// `--embeddings --pooling`) are; run in waves (see `embed_all`).
pub async fn embeddings(
    State(app): AppState,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let req = EmbeddingRequest::parse(&body, app.vocab, app.d_model)?;
    let lora = crate::openai::request_lora(&body, app.info.loras.len())?;
    let lora = app.scales_for(body.get("model").and_then(Value::as_str), lora)?;
    let several = req.inputs.len() > 1;
    let ctx = app.sched.ctx();
    // Every input tokenized and checked against the context before any is queued.
    let mut prompts = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.iter().enumerate() {
        // As the completions' prompts.
        let ids = prompt_ids(&app, input).await?;
        if ids.len() > ctx {
            let field = if several {
                format!("input[{i}]")
            } else {
                "input".to_string()
            };
            return Err(ApiError::field(
                &field,
                format!(
                    "the input has {} tokens but the context holds {ctx}: shorten it, or start the server with a larger --ctx",
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        prompts.push(ids);
    }
    let (vectors, prompt_tokens) = embed_all(&app, prompts, lora).await?;
    let data: Vec<Value> = (vectors.into_iter().enumerate())
        .map(|(index, mut vector)| {
            normalize_l2(&mut vector);
            let embedding = if req.base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": app.model_id,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    ))
}

pub async fn completions(
    State(app): AppState,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let req = CompletionRequest::parse(&body, app.vocab)?;
    let lora = crate::openai::request_lora(&body, app.info.loras.len())?;
    let lora = app.scales_for(body.get("model").and_then(Value::as_str), lora)?;
    let n = req.common.n;
    app.fits(req.prompts.len(), n)?;
    // Every prompt tokenized and checked against the context before any is
    // queued, so a bad one fails the request without work done. The
    // prompts' text is kept only to echo it.
    let mut jobs = Vec::with_capacity(req.prompts.len() * n);
    let mut echoes = Vec::new();
    let constraint = constraint(&app, &req.common).await?;
    let several = req.prompts.len() > 1;
    for (i, prompt) in req.prompts.iter().enumerate() {
        let ids = prompt_ids(&app, prompt).await?;
        if req.echo {
            let text = match prompt {
                Prompt::Text(s) => s.clone(),
                Prompt::Tokens(t) => echo_text(&app, t),
            };
            echoes.extend(std::iter::repeat_n(text, n));
        }
        // (In a batch, the error names the prompt: `prompt[i]`.)
        let field = if several {
            format!("prompt[{i}]")
        } else {
            "prompt".to_string()
        };
        let max_tokens = app.budget(
            ids.len(),
            &req.common,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
            &field,
        )?;
        // Prompt i's choices are i·n .. i·n + n, as OpenAI orders them.
        for j in 0..n {
            let params = app.params(&req.common, max_tokens, constraint.clone(), j);
            jobs.push((ids.clone(), params));
        }
    }
    // Queued as one (all or none), and run side by side.
    // With echo, logprobs cover the prompt too (scored by the scheduler).
    let prompt_logprobs = req.logprobs.filter(|_| req.echo);
    let rxs = app.submit_many(jobs, req.logprobs, prompt_logprobs, lora)?;
    // (Each prompt counts once, however many its choices.)
    let choices = choices(rxs, |k| k % n == 0).await?;
    let id = app.new_id("cmpl");
    let created = unix_now();
    if req.common.stream {
        let fmt = CompletionStream {
            app: app.clone(),
            id,
            created,
            logprobs: req.logprobs,
            include_usage: req.common.include_usage,
            echoes,
        };
        return Ok(stream_response(choices, fmt));
    }
    let mut out = Vec::with_capacity(choices.len());
    let mut usage = Usage::default();
    let mut echoes = echoes.into_iter();
    for (index, ch) in choices.into_iter().enumerate() {
        let c = collect(ch.first, ch.rx).await?;
        let logprobs = match req.logprobs {
            Some(_) => completion_logprobs(&app, &c.prompt, &c.tokens),
            None => Value::Null,
        };
        let text = match echoes.next() {
            Some(p) => p + &c.text,
            None => c.text,
        };
        out.push(json!({"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": finish_str(c.finish)}));
        usage = add_usage(usage, &c.usage, ch.counts_prompt);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id, "object": "text_completion", "created": created, "model": app.model_id,
            "choices": out,
            "usage": usage_json(&usage),
            "timings": timings_json(&usage),
        }),
    ))
}

/// A request's usage with one more choice's: completion tokens summed,
/// prompt tokens only where `counts_prompt` (a prompt's first choice: OpenAI
/// counts a prompt once however many choices it has), times the longest
/// (the choices run side by side, so summed times exceeded the request's
/// own, and the rate `timings` derives would have been per choice).
pub(crate) fn add_usage(a: Usage, b: &Usage, counts_prompt: bool) -> Usage {
    let (prompt, cached) = if counts_prompt {
        (b.prompt_tokens, b.cached_tokens)
    } else {
        (0, 0)
    };
    Usage {
        prompt_tokens: a.prompt_tokens + prompt,
        cached_tokens: a.cached_tokens + cached,
        completion_tokens: a.completion_tokens + b.completion_tokens,
        queue_time: a.queue_time.max(b.queue_time),
        prompt_time: a.prompt_time.max(b.prompt_time),
        gen_time: a.gen_time.max(b.gen_time),
    }
}

/// The one model this server runs, as OpenAI's model object.
fn model_object(app: &App) -> Value {
    json!({
        "id": app.model_id, "object": "model", "created": app.started, "owned_by": "gemma3-rs",
        "meta": {"n_ctx": app.sched.ctx(), "n_vocab": app.vocab, "parallel": app.sched.parallel()},
    })
}

/// The model objects of the LoRA adapters (by name, `parent` the base
/// model's id, as vLLM lists them).
fn adapter_objects(app: &App) -> impl Iterator<Item = Value> + '_ {
    app.adapters.iter().map(|(name, _)| {
        let mut m = model_object(app);
        m["id"] = json!(name);
        m["parent"] = json!(app.model_id);
        m
    })
}

pub async fn models(State(app): AppState) -> Response {
    let data: Vec<Value> = std::iter::once(model_object(&app))
        .chain(adapter_objects(&app))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (the `openai` package's `models.retrieve`): the
/// model object for this server's model id or one of its adapters', else a
/// 404.
pub async fn model(
    State(app): AppState,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    // (An id that is not UTF-8 once decoded, such as %ff, is a JSON 400
    // like every other error, not axum's plain-text one.)
    let axum::extract::Path(id) = id.map_err(|e| {
        ApiError::bad_request(format!("the model id in the path: {}", e.body_text()))
    })?;
    if id == app.model_id {
        return Ok(json_response(StatusCode::OK, &model_object(&app)));
    }
    match adapter_objects(&app).find(|m| m["id"] == id.as_str()) {
        Some(m) => Ok(json_response(StatusCode::OK, &m)),
        None => Err(app.no_such_model(&id)),
    }
}

/// `GET /lora-adapters`, as llama-server: the adapters, by id, with their
/// paths and the scales requests without their own `lora` run at.
pub async fn lora_adapters(State(app): AppState) -> Response {
    let scales = app.sched.lora_scales();
    let list: Vec<Value> = (app.info.loras.iter().zip(scales).enumerate())
        .map(|(id, (l, s))| json!({"id": id, "path": l.path.display().to_string(), "scale": s}))
        .collect();
    json_response(StatusCode::OK, &Value::Array(list))
}

/// `POST /lora-adapters` (`[{"id": 0, "scale": 0.5}, …]`, an adapter left
/// out at 0), as llama-server: the scales of requests admitted from now on
/// that give none of their own. Answers with the new list.
pub async fn set_lora_adapters(
    State(app): AppState,
    JsonValue(body): JsonValue,
) -> Result<Response, ApiError> {
    let scales = crate::openai::lora_list(&body, "body", app.info.loras.len())?;
    app.sched
        .set_lora_scales(scales)
        .map_err(ApiError::bad_request)?;
    Ok(lora_adapters(State(app)).await)
}

/// `GET /props`, as llama-server answers it (its web UI and clients read
/// it): the context per slot, the default sampling, the slots, the model,
/// the chat template in use and the special tokens (behind `--api-key`, as
/// llama-server's).
pub async fn props(State(app): AppState) -> Response {
    let d = gemma3_engine::SamplingParams::chat_default();
    let piece = |id: u32| {
        let b = app.tok.token_to_piece(id, true).unwrap_or(&[]);
        String::from_utf8_lossy(b).into_owned()
    };
    let sp = app.tok.specials();
    json_response(
        StatusCode::OK,
        &json!({
            "default_generation_settings": {
                "n_ctx": app.sched.ctx(),
                "params": {
                    "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
                    "min_p": d.min_p, "repeat_penalty": d.repeat_penalty,
                    "repeat_last_n": d.repeat_last_n, "presence_penalty": d.presence_penalty,
                    "frequency_penalty": d.frequency_penalty, "seed": -1,
                    "n_predict": -1,
                },
            },
            "total_slots": app.sched.parallel(),
            "model_alias": app.model_id,
            "model_path": app.info.path.display().to_string(),
            "modalities": {"vision": false, "audio": false},
            "chat_template": app.chat.source(),
            "bos_token": piece(sp.bos),
            "eos_token": piece(sp.eos),
            "build_info": concat!("gemma3-rs ", env!("CARGO_PKG_VERSION")),
        }),
    )
}

pub async fn health(State(app): AppState) -> Response {
    let s = app.sched.stats();
    json_response(
        StatusCode::OK,
        &json!({
            "status": "ok",
            "slots_idle": s.parallel - s.active.min(s.parallel),
            "slots_processing": s.active,
            "queue_depth": s.waiting,
        }),
    )
}

pub async fn metrics(State(app): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&app.sched.stats()),
    )
        .into_response()
}

pub async fn tokenize(
    State(app): AppState,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let f = Fields(&obj);
    let content = f
        .str("content")?
        .ok_or_else(|| ApiError::field("content", "'content' is required"))?;
    // llama-server's defaults.
    let add_special = f.bool("add_special")?.unwrap_or(false);
    let parse_special = f.bool("parse_special")?.unwrap_or(true);
    let with_pieces = f.bool("with_pieces")?.unwrap_or(false);
    let tokens = encode(&app, content.to_string(), add_special, parse_special).await?;
    if !with_pieces {
        return Ok(json_response(StatusCode::OK, &json!({"tokens": tokens})));
    }
    // As llama-server: each id with its piece, a string where the piece is
    // valid UTF-8 on its own, else its bytes.
    let pieces: Vec<Value> = tokens
        .iter()
        .map(|&id| {
            let (text, bytes) = app.piece(id);
            let piece = match std::str::from_utf8(&bytes) {
                Ok(_) => json!(text),
                Err(_) => json!(bytes),
            };
            json!({"id": id, "piece": piece})
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"tokens": pieces})))
}

pub async fn detokenize(
    State(app): AppState,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let ids: Vec<u32> = match Fields(&obj).get("tokens") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if (id as usize) < app.vocab => Ok(id as u32),
                _ => Err(ApiError::field(
                    "tokens",
                    format!("'tokens' must hold token ids below {}, got {v}", app.vocab),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::field(
                "tokens",
                "'tokens' must be an array of token ids",
            ))
        }
    };
    let content = app
        .tok
        .decode(&ids, true)
        .map_err(|e| ApiError::field("tokens", e.to_string()))?;
    Ok(json_response(StatusCode::OK, &json!({"content": content})))
}

/// `e` in the shape of the API `path` belongs to: Ollama's (`/api/...`)
/// or OpenAI's.
fn error_for(path: &str, e: ApiError) -> Response {
    if path.starts_with("/api/") {
        crate::ollama::OllamaError(e).into_response()
    } else {
        e.into_response()
    }
}

pub async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    let e = ApiError::not_found(format!("no route for {} {path}", req.method()));
    error_for(path, e)
}

pub async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let e =
        ApiError::method_not_allowed(format!("method {} is not allowed on {path}", req.method()));
    error_for(path, e)
}

/// Constant-time comparison, so the key cannot be guessed byte by byte from timings.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// With an API key set, the routes it guards (all but /health and /metrics)
/// need `Authorization: Bearer KEY`, or `X-Api-Key: KEY` as llama-server
/// also accepts.
pub async fn auth(State(app): AppState, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let h = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let bearer = h(header::AUTHORIZATION)
            // The scheme's name is case-insensitive (RFC 7235).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, k)| same_key(k.trim(), key));
        let ok = bearer
            || h(header::HeaderName::from_static("x-api-key"))
                .is_some_and(|k| same_key(k.trim(), key));
        if !ok {
            return error_for(req.uri().path(), ApiError::unauthorized());
        }
    }
    next.run(req).await
}

/// Cross-origin requests, as llama-server answers them, so that a web page
/// (a browser chat UI) can call the server: any origin may read the
/// responses, and a preflight (`OPTIONS` with
/// `Access-Control-Request-Method`) gets a 204 naming the methods, and
/// allowing the headers it asked for. The API key still guards the same routes.
pub async fn cors(req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let requested = (req.headers())
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let preflight = req.method() == axum::http::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut r = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        // Whatever headers the page asks for (the openai JS SDK sends its
        // own x-stainless-* ones), as llama-server allows any.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            requested.unwrap_or(header::HeaderValue::from_static(
                "authorization, content-type, x-api-key",
            )),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            header::HeaderValue::from_static("86400"),
        );
        r
    } else {
        next.run(req).await
    };
    if origin.is_some() {
        r.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::HeaderValue::from_static("*"),
        );
    }
    // The CORS headers depend on whether there was an Origin.
    r.headers_mut()
        .append(header::VARY, header::HeaderValue::from_static("origin"));
    r
}

/// Count every response by status for /metrics.
pub async fn count(State(app): AppState, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    app.metrics.count(r.status().as_u16());
    r
}
