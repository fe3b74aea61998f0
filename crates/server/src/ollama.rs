//! Ollama's API over the same scheduler: `POST /api/chat`, `/api/generate`,
//! `/api/embed` (and the older `/api/embeddings`), `/api/show`, and
//! `GET /api/tags`, `/api/ps`, `/api/version`, so that tools written for
//! Ollama (its Python and JavaScript clients, and the applications built on
//! them) can use `gemma3 serve`.
//!
//! A request is translated into the OpenAI routes' fields and read by
//! [`parse_common`], so sampling, limits and grammars behave as there;
//! replies take Ollama's shapes: streamed by default, as newline-delimited
//! JSON, the last object `done: true` with the counts and durations (in
//! nanoseconds); errors as `{"error": "..."}` with the OpenAI routes'
//! statuses. An error names the request's field as Ollama spells it
//! (`options.temperature`, `format`).

use crate::error::ApiError;
use crate::openai::{
    check_dimensions, message_head, parse_common, Common, Fields, MaxTokens, MAX_EMBEDDING_INPUTS,
};
use crate::routes::{
    chat_error, chat_format, choices, collect, constraint, embed_all, encode, finish_str,
    json_response, prompt_ids, stream_response, App, AppState, GenToken, JsonObject, StreamFormat,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gemma3_engine::embed::normalize_l2;
use gemma3_engine::scheduler::Usage;
use gemma3_engine::{FinishReason, Message, Role};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An error as Ollama sends it: the status, and `{"error": message}`.
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

/// The field an error names, as an Ollama request spells it: sampling
/// fields are `options`' (the OpenAI routes' `temperature` is
/// `options.temperature` here), a grammar's is `format`.
fn ollama_field(p: &str) -> String {
    if SAMPLING_OPTIONS.contains(&p) || p == "num_predict" {
        format!("options.{p}")
    } else if p == "response_format" || p == "json_schema" {
        "format".into()
    } else {
        p.into()
    }
}

impl OllamaError {
    /// The message, naming the field where it does not already.
    fn message(&self) -> String {
        let e = &self.0;
        let Some(p) = e.param.as_deref() else {
            return e.message.clone();
        };
        let named = ollama_field(p);
        let quoted = format!("'{p}'");
        if named != p && e.message.contains(&quoted) {
            e.message.replacen(&quoted, &format!("'{named}'"), 1)
        } else if e.message.contains(named.as_str()) {
            e.message.clone()
        } else {
            format!("{named}: {}", e.message)
        }
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.0.status, &json!({"error": self.message()}));
        if let Some(s) = self.0.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

type Reply = Result<Response, OllamaError>;

/// Ollama's `options` this server reads, by the OpenAI routes' (and
/// llama-server's) name of each: the same meaning and limits.
const SAMPLING_OPTIONS: [&str; 12] = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "typical_p",
    "mirostat",
];

/// An Ollama request's `options`, `format`, `stream` and `tools` as the
/// OpenAI routes' fields (`num_predict` keeps its name; `-2`, "fill the
/// context", is `-1`, as far as the context goes, here). Options about
/// resources (`num_ctx`, `num_thread`, ...) are left to the server's own
/// settings, and unknown ones are left out, as Ollama leaves them.
fn openai_fields(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let f = Fields(body);
    let mut m = Map::new();
    m.insert("stream".into(), f.bool("stream")?.unwrap_or(true).into());
    match f.get("options") {
        None => {}
        Some(Value::Object(o)) => {
            for (k, v) in o.iter().filter(|(_, v)| !v.is_null()) {
                let k = k.as_str();
                if SAMPLING_OPTIONS.contains(&k) {
                    m.insert(k.into(), v.clone());
                } else if k == "num_predict" {
                    let v = if v.as_i64() == Some(-2) {
                        json!(-1)
                    } else {
                        v.clone()
                    };
                    m.insert(k.into(), v);
                } else if k == "tfs_z" {
                    // Tail-free sampling, off at 1 (Ollama's default).
                    if v.as_f64() != Some(1.0) {
                        return Err(ApiError::field(
                            "options.tfs_z",
                            format!("'options.tfs_z' (tail-free sampling) is not supported (got {v}); leave it out or at 1"),
                        ));
                    }
                }
                // Anything else is left out, as Ollama leaves out options it
                // does not know (with a warning in its log): the resource
                // options, mirostat's rates (mirostat must be off), and
                // options of other Ollama versions.
            }
        }
        Some(v) => {
            return Err(ApiError::field(
                "options",
                format!("'options' must be an object, got {v}"),
            ))
        }
    }
    match f.get("format") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => {
            m.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(s @ Value::Object(_)) => {
            m.insert("json_schema".into(), s.clone());
        }
        Some(v) => {
            return Err(ApiError::field(
                "format",
                format!("'format' must be \"json\" or a JSON schema object, got {v}"),
            ))
        }
    }
    if let Some(t) = f.get("tools") {
        m.insert("tools".into(), t.clone());
    }
    Ok(m)
}

/// The request's sampling and length, read as the OpenAI routes read them
/// (an error's field is renamed as Ollama spells it by [`OllamaError`]).
fn parse(body: &Map<String, Value>, app: &App) -> Result<Common, ApiError> {
    // Fields that change the answer's form and that this server does not
    // implement.
    let f = Fields(body);
    // `think`: a boolean, or a level ("high", ...) for models that have them.
    match f.get("think") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true) | Value::String(_)) => {
            return Err(ApiError::field(
                "think",
                "this model does not think: leave 'think' out or false",
            ))
        }
        Some(v) => {
            return Err(ApiError::field(
                "think",
                format!("'think' must be a boolean or a level, got {v}"),
            ))
        }
    }
    if f.bool("logprobs")? == Some(true) {
        return Err(ApiError::field(
            "logprobs",
            "'logprobs' is served by the OpenAI routes (/v1/chat/completions, /v1/completions), not by /api",
        ));
    }
    let m = openai_fields(body)?;
    parse_common(&Fields(&m), &["num_predict"], app.vocab, false)
}

/// Refuse field `key` unless absent, null or empty (a string or array).
fn refuse_nonempty(f: &Fields, key: &str, what: &str) -> Result<(), ApiError> {
    match f.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(ApiError::field(
            key,
            format!("'{key}' ({what}) is not supported"),
        )),
    }
}

/// The model name a reply carries: the request's, else this server's.
fn model_name(f: &Fields, app: &App) -> Result<String, ApiError> {
    Ok(f.str("model")?.unwrap_or(&app.model_id).to_string())
}

/// `t` as RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = gemma3_engine::chat::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// The counts and durations of a reply's last object.
fn stats(v: &mut Value, finish: FinishReason, u: &Usage) {
    v["done_reason"] = json!(finish_str(finish));
    v["total_duration"] = json!(nanos(u.queue_time + u.prompt_time + u.gen_time));
    v["load_duration"] = json!(0);
    v["prompt_eval_count"] = json!(u.prompt_tokens);
    v["prompt_eval_duration"] = json!(nanos(u.prompt_time));
    v["eval_count"] = json!(u.completion_tokens);
    v["eval_duration"] = json!(nanos(u.gen_time));
}

/// One object of a chat (`message`) or generate (`response`) reply; the
/// last (`done: true`) when `end` is given.
struct Shape {
    model: String,
    chat: bool,
}

impl Shape {
    fn object(&self, text: &str, end: Option<(FinishReason, &Usage)>) -> Value {
        let mut v = json!({"model": self.model, "created_at": rfc3339(SystemTime::now())});
        if self.chat {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        v["done"] = json!(end.is_some());
        if let Some((finish, usage)) = end {
            stats(&mut v, finish, usage);
        }
        v
    }

    /// The reply to a request that only loads or unloads the model
    /// (`reason`): done, nothing generated.
    fn loaded(&self, reason: &str) -> Response {
        let mut v = self.object("", None);
        v["done"] = json!(true);
        v["done_reason"] = json!(reason);
        json_response(StatusCode::OK, &v)
    }
}

impl StreamFormat for Shape {
    const NDJSON: bool = true;

    fn start(&mut self, _: usize) -> Vec<Value> {
        Vec::new()
    }

    fn text(&self, _: usize, text: &str, _: &[GenToken]) -> Option<Value> {
        (!text.is_empty()).then(|| self.object(text, None))
    }

    fn finish(&self, _: usize, finish: FinishReason, usage: &Usage) -> Value {
        self.object("", Some((finish, usage)))
    }

    fn usage(&self, _: &Usage) -> Option<Value> {
        None
    }

    fn error(&self, e: &ApiError) -> Value {
        json!({"error": e.message})
    }
}

/// Generate a reply to `prompt` (token ids) with `common`, as one object
/// or a stream of them.
async fn reply(
    app: &Arc<App>,
    prompt: Vec<u32>,
    mut common: Common,
    shape: Shape,
    field: &str,
) -> Reply {
    // As Ollama: `num_predict` beyond the context stops at the context's end
    // (`done_reason: "length"`), where the OpenAI routes refuse it.
    let room = app.sched.ctx().saturating_sub(prompt.len());
    if let MaxTokens::Count(m) = common.max_tokens {
        if room > 0 && m > room as u64 {
            common.max_tokens = MaxTokens::Count(room as u64);
        }
    }
    let max_tokens = app.budget(prompt.len(), &common, None, field)?;
    let constraint = constraint(app, &common).await?;
    let params = app.params(&common, max_tokens, constraint, 0);
    // (A fine-tune served as an adapter is chosen by its model name.)
    let lora = app.scales_for(Some(&shape.model), None)?;
    let rxs = app.submit_many(vec![(prompt, params)], None, None, lora)?;
    let mut choices = choices(rxs, |_| true).await?;
    if common.stream {
        return Ok(stream_response(choices, shape));
    }
    let Some(ch) = choices.pop() else {
        return Err(ApiError::internal("no reply").into());
    };
    let c = collect(ch.first, ch.rx).await?;
    let v = shape.object(&c.text, Some((c.finish, &c.usage)));
    Ok(json_response(StatusCode::OK, &v))
}

/// `messages` in Ollama's template for Gemma 3 (that of its library's
/// `gemma3` models): each message a turn of its own, a system message a
/// user turn, the content as it is; after a last user or system message
/// the model's turn opens, and a last assistant message is left open for
/// the model to continue. BOS first, as Ollama's tokenizer adds it. (The
/// OpenAI route renders Gemma's own template: a first system message folded
/// into the first user turn, the turns alternating.)
fn ollama_template(messages: &[Message]) -> String {
    let mut out = String::from("<bos>");
    for (i, m) in messages.iter().enumerate() {
        let last = i + 1 == messages.len();
        match m.role {
            Role::User | Role::System => {
                out.push_str("<start_of_turn>user\n");
                out.push_str(&m.content);
                out.push_str("<end_of_turn>\n");
                if last {
                    out.push_str("<start_of_turn>model\n");
                }
            }
            Role::Assistant => {
                out.push_str("<start_of_turn>model\n");
                out.push_str(&m.content);
                if !last {
                    out.push_str("<end_of_turn>\n");
                }
            }
        }
    }
    out
}

/// `messages` in [`ollama_template`] (or, for a model or a
/// `--chat-template-file` whose template is not Gemma's, in that template),
/// tokenized with special-token text parsed (as Ollama does).
async fn templated(app: &Arc<App>, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    let text = if app.ollama_gemma {
        chat_format(app, "/api/generate with 'raw': true")?;
        ollama_template(messages)
    } else {
        (app.chat.render(messages, true)).map_err(|e| chat_error(e, "messages"))?
    };
    encode(app, text, false, true).await
}

/// A request without messages (or prompt) only loads the model, or with
/// `keep_alive: 0` unloads it: this server keeps its one model loaded, and
/// answers as Ollama does, generating nothing.
fn load_only(f: &Fields, shape: &Shape) -> Response {
    let unload = f
        .get("keep_alive")
        .is_some_and(|k| k.as_f64() == Some(0.0) || k == "0");
    shape.loaded(if unload { "unload" } else { "load" })
}

/// `POST /api/chat`: `messages` (system, user and assistant, each a
/// `content` string) in Ollama's template for Gemma 3 (`ollama_template`).
pub async fn chat(State(app): AppState, body: Result<JsonObject, ApiError>) -> Reply {
    let JsonObject(body) = body?;
    let f = Fields(&body);
    let shape = Shape {
        model: model_name(&f, &app)?,
        chat: true,
    };
    let msgs = match f.get("messages") {
        None => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("'messages' must be an array, got {v}"),
            )
            .into())
        }
    };
    let common = parse(&body, &app)?;
    if msgs.is_empty() {
        return Ok(load_only(&f, &shape));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let (o, role) = message_head(i, m)?;
        let mf = Fields(o);
        let field = |k: &str| format!("messages[{i}].{k}");
        refuse_nonempty(&mf, "images", "images: this model reads text only")
            .map_err(|e| ApiError::field(&field("images"), e.message))?;
        let content = mf
            .str("content")
            .map_err(|e| ApiError::field(&field("content"), e.message))?
            .unwrap_or("");
        messages.push(Message::new(role, content));
    }
    let prompt = templated(&app, &messages).await?;
    reply(&app, prompt, common, shape, "messages").await
}

/// `POST /api/generate`: `system` and `prompt` as Ollama's template puts
/// them (each a user turn, see `ollama_template`); with `raw`, the prompt
/// as it is (BOS and special-token text parsed, as `/v1/completions` reads
/// it).
pub async fn generate(State(app): AppState, body: Result<JsonObject, ApiError>) -> Reply {
    let JsonObject(body) = body?;
    let f = Fields(&body);
    let shape = Shape {
        model: model_name(&f, &app)?,
        chat: false,
    };
    refuse_nonempty(&f, "suffix", "fill-in-the-middle")?;
    refuse_nonempty(&f, "images", "images: this model reads text only")?;
    refuse_nonempty(&f, "template", "a template other than the model's")?;
    refuse_nonempty(
        &f,
        "context",
        "continuing from a returned context: send the conversation to /api/chat",
    )?;
    let prompt = f.str("prompt")?.unwrap_or("").to_string();
    let system = f.str("system")?.unwrap_or("").to_string();
    let raw = f.bool("raw")?.unwrap_or(false);
    let common = parse(&body, &app)?;
    if prompt.is_empty() {
        return Ok(load_only(&f, &shape));
    }
    let ids = if raw {
        if !system.is_empty() {
            return Err(ApiError::field(
                "system",
                "'system' goes in the template, which 'raw' leaves out",
            )
            .into());
        }
        prompt_ids(&app, &crate::openai::Prompt::Text(prompt)).await?
    } else {
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(Message::new(Role::System, system));
        }
        messages.push(Message::new(Role::User, prompt));
        templated(&app, &messages).await?
    };
    reply(&app, ids, common, shape, "prompt").await
}

/// The texts of an embedding request's `key` (a string or an array of them;
/// "" or `[]` none),
/// tokenized (BOS and special-token text parsed, as `/v1/embeddings` does)
/// and cut to the context where `truncate` (Ollama's default), else refused
/// when longer.
async fn embed_inputs(
    app: &Arc<App>,
    f: &Fields<'_>,
    key: &str,
    truncate: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let texts: Vec<String> = match f.get(key) {
        None => return Err(ApiError::field(key, format!("'{key}' is required"))),
        // Nothing to embed: how Ollama's clients load a model.
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_EMBEDDING_INPUTS {
                return Err(ApiError::field(
                    key,
                    format!(
                        "at most {MAX_EMBEDDING_INPUTS} inputs per request, got {}",
                        a.len()
                    ),
                ));
            }
            (a.iter().enumerate())
                .map(|(i, v)| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::field(
                            &format!("{key}[{i}]"),
                            format!("'{key}[{i}]' must be a string"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::field(
                key,
                format!("'{key}' must be a string or an array of strings, got {v}"),
            ))
        }
    };
    let ctx = app.sched.ctx();
    let several = texts.len() > 1;
    let mut out = Vec::with_capacity(texts.len());
    for (i, t) in texts.into_iter().enumerate() {
        let name = if several {
            format!("{key}[{i}]")
        } else {
            key.to_string()
        };
        if t.is_empty() {
            return Err(ApiError::field(
                &name,
                format!("'{name}' must not be empty"),
            ));
        }
        let mut ids = prompt_ids(app, &crate::openai::Prompt::Text(t)).await?;
        if ids.len() > ctx {
            if !truncate {
                return Err(ApiError::field(
                    &name,
                    format!("the input has {} tokens but the context holds {ctx} (send 'truncate': true to cut it)", ids.len()),
                )
                .with_code("context_length_exceeded"));
            }
            ids.truncate(ctx);
        }
        out.push(ids);
    }
    Ok(out)
}

/// `POST /api/embed`: one vector per input, the `--pooling` of its final
/// hidden states at unit length (as Ollama's are).
pub async fn embed(State(app): AppState, body: Result<JsonObject, ApiError>) -> Reply {
    let JsonObject(body) = body?;
    let f = Fields(&body);
    let model = model_name(&f, &app)?;
    check_dimensions(&f, app.d_model)?;
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let t0 = std::time::Instant::now();
    let prompts = embed_inputs(&app, &f, "input", truncate).await?;
    let lora = app.scales_for(Some(&model), None)?;
    let (mut vectors, prompt_tokens) = embed_all(&app, prompts, lora).await?;
    vectors.iter_mut().for_each(|v| normalize_l2(v));
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "model": model,
            "embeddings": vectors,
            "total_duration": nanos(t0.elapsed()),
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
        }),
    ))
}

/// `POST /api/embeddings` (Ollama's older route): one `prompt`'s vector,
/// not normalized (as Ollama's older route leaves it).
pub async fn embeddings(State(app): AppState, body: Result<JsonObject, ApiError>) -> Reply {
    let JsonObject(body) = body?;
    let f = Fields(&body);
    if !matches!(f.get("prompt"), Some(Value::String(_))) {
        return Err(ApiError::field("prompt", "'prompt' must be a string").into());
    }
    let prompts = embed_inputs(&app, &f, "prompt", true).await?;
    let lora = app.scales_for(f.str("model")?, None)?;
    let (mut vectors, _) = embed_all(&app, prompts, lora).await?;
    let vector = vectors.pop().unwrap_or_default();
    Ok(json_response(StatusCode::OK, &json!({"embedding": vector})))
}

/// The model's `details`, as `/api/tags`, `/api/show` and `/api/ps` give them.
fn details(app: &App) -> Value {
    let info = &app.info;
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "gemma3",
        "families": ["gemma3"],
        "parameter_size": format!("{:.2}M", info.parameters as f64 / 1e6),
        "quantization_level": info.quantization,
    })
}

fn model_entry(app: &App) -> Value {
    let info = &app.info;
    json!({
        "name": app.model_id,
        "model": app.model_id,
        "modified_at": rfc3339(info.modified),
        "size": info.file_bytes,
        "digest": "",
        "details": details(app),
    })
}

/// `GET /api/tags`: the model this server runs, and each LoRA adapter
/// under its own name.
pub async fn tags(State(app): AppState) -> Response {
    let base = model_entry(&app);
    let adapters = app.adapters.iter().map(|(name, _)| {
        let mut m = base.clone();
        m["name"] = json!(name);
        m["model"] = json!(name);
        m
    });
    let models: Vec<Value> = std::iter::once(base.clone()).chain(adapters).collect();
    json_response(StatusCode::OK, &json!({"models": models}))
}

/// `GET /api/ps`: the model, always loaded.
pub async fn ps(State(app): AppState) -> Response {
    let mut m = model_entry(&app);
    m["expires_at"] = json!("2999-12-31T23:59:59Z");
    m["size_vram"] = json!(0);
    m["context_length"] = json!(app.sched.ctx());
    json_response(StatusCode::OK, &json!({"models": [m]}))
}

/// `POST /api/show`: the model's details, its sampling defaults and its
/// architecture's numbers (whatever `model` names where the server holds
/// no adapters: it runs one; with adapters, a base or adapter name).
pub async fn show(State(app): AppState, body: Result<JsonObject, ApiError>) -> Reply {
    let JsonObject(body) = body?;
    app.adapter_named(Fields(&body).str("model")?)?;
    let info = &app.info;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "modelfile": "",
            "parameters": "temperature 1\ntop_k 64\ntop_p 0.95\nstop \"<end_of_turn>\"",
            "template": "",
            "details": details(&app),
            "model_info": {
                "general.architecture": "gemma3",
                "general.parameter_count": info.parameters,
                "gemma3.context_length": info.ctx_len,
                "gemma3.embedding_length": app.d_model,
                "gemma3.block_count": info.layers,
            },
            "capabilities": ["completion"],
            "modified_at": rfc3339(info.modified),
        }),
    ))
}

/// `GET /api/version`: this server's version.
pub async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"version": env!("CARGO_PKG_VERSION")}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        // Hand-checked: 0 is the epoch; 951_782_400 is 2000-02-29 (a leap
        // day in a century year); 1_700_000_000 is 2023-11-14 22:13:20.
        let at = |s: u64, n: u32| rfc3339(UNIX_EPOCH + Duration::new(s, n));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(1_700_000_000, 0), "2023-11-14T22:13:20.000000000Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59.000000000Z");
    }

    #[test]
    fn options_become_fields() {
        let body = |v: Value| v.as_object().unwrap().clone();
        let m = openai_fields(&body(json!({
            "options": {"temperature": 0.5, "num_predict": -2, "num_ctx": 4096, "mirostat_eta": null},
            "format": "json",
        })))
        .unwrap();
        assert_eq!(m["temperature"], 0.5);
        assert_eq!(m["num_predict"], -1);
        assert_eq!(m["stream"], true);
        assert_eq!(m["response_format"], json!({"type": "json_object"}));
        assert!(!m.contains_key("num_ctx"));
        let err = |v: Value| openai_fields(&body(v)).unwrap_err().param;
        // Unknown options are left out, as Ollama leaves them.
        let m = openai_fields(&body(json!({"options": {"bogus": 1}}))).unwrap();
        assert!(!m.contains_key("bogus"));
        assert_eq!(
            err(json!({"options": {"tfs_z": 0.5}})).as_deref(),
            Some("options.tfs_z")
        );
        assert_eq!(err(json!({"format": "xml"})).as_deref(), Some("format"));
        assert_eq!(err(json!({"options": 3})).as_deref(), Some("options"));
    }
}
