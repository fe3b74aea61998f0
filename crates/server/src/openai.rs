//! OpenAI request bodies → typed, validated requests. Every error names the
//! field at fault.
//!
//! Defaults when a field is absent: the model's own sampling (temperature 1.0,
//! top_k 64, top_p 0.95, min_p 0, no penalties), a random seed, and as many
//! new tokens as the context leaves (chat) or 16 (completions, OpenAI's
//! default for that endpoint).

use crate::error::ApiError;
use gemma3_engine::sampler::random_seed;
use gemma3_engine::{GrammarSpec, Message, Role, SamplingParams};
use serde_json::{Map, Value};

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes: every generated token is checked against
/// all of their bytes, and 16 of 120 KB had halved every stream's speed.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `logit_bias` entries per request.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Most alternatives per token for `top_logprobs` / completions' `logprobs`.
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// `max_tokens` of /v1/completions when absent (OpenAI's default).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;
/// Most choices per prompt (`n`; OpenAI's own limit). A request's choices
/// must also fit the server's places at once (`--parallel + --queue`).
pub const MAX_CHOICES: u64 = 128;

/// The request body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Typed access to an object's fields; JSON null counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(name: &str, expected: &str, v: &Value) -> ApiError {
    ApiError::field(
        name,
        format!("'{name}' must be {expected}, got {}", type_name(v)),
    )
}

/// The error for a number that is not an integer in `lo..=hi`: out of
/// range if it is a whole number outside it (JSON integers past 64 bits
/// arrive as floats), otherwise not an integer (such as 1.5, or 5.0 written
/// as a float); either way quoting what was sent.
fn not_an_integer(name: &str, v: &Value, (lo, hi): (i128, i128)) -> ApiError {
    match v.as_f64() {
        // (Compared as i128, which holds both bounds exactly: as f64,
        // u64::MAX rounds up to 2⁶⁴, which would pass for in range.)
        Some(x) if x.fract() == 0.0 && !(lo..=hi).contains(&(x as i128)) => ApiError::field(
            name,
            format!("'{name}' is out of range: it must be between {lo} and {hi}, got {v}"),
        ),
        Some(_) => ApiError::field(name, format!("'{name}' must be an integer, got {v}")),
        None => wrong_type(name, "an integer", v),
    }
}

impl<'a> Fields<'a> {
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    pub fn f32(&self, k: &str) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                // (A JSON number is finite; as f32 it may not be.)
                Some(x) if (x as f32).is_infinite() => Err(ApiError::field(
                    k,
                    format!("'{k}' is out of range for a 32-bit float, got {v}"),
                )),
                Some(x) => Ok(Some(x as f32)),
                None => Err(wrong_type(k, "a number", v)),
            },
        }
    }

    /// A non-negative integer.
    pub fn u64(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x)),
                None if v.as_i64().is_some() => Err(ApiError::field(
                    k,
                    format!("'{k}' must not be negative, got {v}"),
                )),
                None => Err(not_an_integer(k, v, (0, u64::MAX.into()))),
            },
        }
    }

    pub fn i64(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_u64().map(|x| x as i64))
                .map(Some)
                .ok_or_else(|| not_an_integer(k, v, (i64::MIN.into(), u64::MAX.into()))),
        }
    }

    /// Whether `k` is −1, llama-server's "no limit" or "random".
    pub fn is_minus_one(&self, k: &str) -> bool {
        self.get(k).and_then(Value::as_i64) == Some(-1)
    }

    pub fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| wrong_type(k, "a boolean", v)),
        }
    }

    pub fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| wrong_type(k, "a string", v)),
        }
    }
}

/// Fields shared by both completion endpoints.
#[derive(Clone, Debug)]
pub struct Common {
    pub sampling: SamplingParams,
    pub max_tokens: MaxTokens,
    /// The name `max_tokens` came by (for error messages).
    pub max_tokens_key: &'static str,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// llama-server's `ignore_eos`: the end-of-text and end-of-turn tokens
    /// are never drawn, so generation runs to `max_tokens`.
    pub ignore_eos: bool,
    /// The output's grammar or schema (`response_format`, or llama-server's
    /// `grammar` / `json_schema`), and the field it came by.
    pub grammar: Option<(GrammarSpec, &'static str)>,
    /// Choices per prompt (`n`), at least 1. Choice j samples with seed
    /// `seed + j`, so choice 0 is the reply `n = 1` gives.
    pub n: usize,
}

/// How many tokens a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxTokens {
    /// None said: the endpoint's default.
    Default,
    /// As many as the context leaves (llama-server's `n_predict: -1`, also
    /// accepted as `max_tokens: -1`).
    Unlimited,
    /// At least 1 (any count, however large: one beyond the context is the
    /// caller's error, not "unlimited"); 0 only for a completion with
    /// `echo` (the prompt scored, nothing generated).
    Count(u64),
}

/// llama-server sampling and output fields this server does not implement,
/// each with the test that its value leaves it off: any other value is
/// refused with a 400, as each would change the answer (silently ignored,
/// `mirostat` or `n_probs` gave another sampler's reply and no probabilities).
/// (llama-server's `samplers`, the order of its sampling steps, is accepted
/// and ignored: llama.cpp's web UI sends it with every request, and the
/// steps this server has run in llama.cpp's default order.)
const LLAMA_SERVER_FIELDS: [(&str, OffTest); 8] = [
    ("mirostat", is_zero),
    ("n_probs", is_zero),
    ("dry_multiplier", is_zero),
    ("xtc_probability", is_zero),
    ("dynatemp_range", is_zero),
    ("t_max_predict_ms", is_zero),
    ("typical_p", |v| v.as_f64() == Some(1.0)),
    ("top_n_sigma", |v| v.as_f64().is_some_and(|x| x <= 0.0)),
];

/// A list of adapter scales in llama-server's form, `[{"id": 0, "scale":
/// 0.5}, …]` (a request's `lora`, or the body of `POST /lora-adapters`), as
/// one scale per adapter: an adapter left out is at 0, as llama-server reads
/// the list. `field` names it in errors; `adapters` is how many there are.
pub fn lora_list(v: &Value, field: &str, adapters: usize) -> Result<Vec<f32>, ApiError> {
    let Value::Array(list) = v else {
        return Err(wrong_type(field, "an array of {\"id\", \"scale\"}", v));
    };
    let mut scales: Vec<Option<f32>> = vec![None; adapters];
    for (i, e) in list.iter().enumerate() {
        let id = e.get("id").and_then(Value::as_u64);
        let scale = e.get("scale").and_then(Value::as_f64);
        let (Some(id), Some(scale)) = (id, scale) else {
            return Err(ApiError::field(
                field,
                format!("'{field}' entry {i} must be an object with an integer 'id' and a number 'scale', got {e}"),
            ));
        };
        let Some(slot) = scales.get_mut(id as usize) else {
            return Err(ApiError::field(
                field,
                format!(
                    "'{field}' entry {i} names adapter {id}, but this server has {adapters} (GET /lora-adapters lists them)"
                ),
            ));
        };
        let m = gemma3_engine::LoraSpec::MAX_SCALE as f64;
        if !(-m..=m).contains(&scale) {
            return Err(ApiError::field(
                field,
                format!("'{field}' entry {i}: the scale must be between -{m} and {m}, got {scale}"),
            ));
        }
        if slot.replace(scale as f32).is_some() {
            return Err(ApiError::field(
                field,
                format!("'{field}' names adapter {id} twice"),
            ));
        }
    }
    Ok(scales.into_iter().map(|s| s.unwrap_or(0.0)).collect())
}

/// A request's `lora` (see [`lora_list`]), or None where it has none: it
/// runs at the server's current scales.
pub fn request_lora(
    obj: &Map<String, Value>,
    adapters: usize,
) -> Result<Option<Vec<f32>>, ApiError> {
    match obj.get("lora") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => lora_list(v, "lora", adapters).map(Some),
    }
}

/// Whether a field's value leaves it off.
type OffTest = fn(&Value) -> bool;

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

/// Parse the sampling, length, stop and streaming fields. `max_keys` are the
/// names `max_tokens` goes by, the first present one wins; it may be 0 only
/// where `zero_tokens` (a completion with `echo`: the prompt scored,
/// nothing generated).
pub fn parse_common(
    f: &Fields,
    max_keys: &[&'static str],
    vocab: usize,
    zero_tokens: bool,
) -> Result<Common, ApiError> {
    let base = SamplingParams::chat_default();
    // Fields that would change the answer and that this server does not
    // implement: refused rather than ignored.
    for key in ["tools", "functions"] {
        match f.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(ApiError::field(
                    key,
                    format!("'{key}' (function calling) is not supported"),
                ))
            }
        }
    }
    for key in ["tool_choice", "function_call"] {
        match f.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => {
                return Err(ApiError::field(
                    key,
                    format!("'{key}' (function calling) is not supported"),
                ))
            }
        }
    }
    let grammar = parse_grammar(f)?;
    for (key, off) in LLAMA_SERVER_FIELDS {
        if let Some(v) = f.get(key) {
            if !off(v) {
                return Err(ApiError::field(
                    key,
                    format!("'{key}' is not supported by this server (got {v}); leave it out"),
                ));
            }
        }
    }
    let logit_bias = match f.get("logit_bias") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => {
            if m.len() > MAX_LOGIT_BIAS {
                return Err(ApiError::field(
                    "logit_bias",
                    format!("at most {MAX_LOGIT_BIAS} 'logit_bias' entries are supported"),
                ));
            }
            m.iter()
                .map(|(k, v)| {
                    let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
                    let bias = v.as_f64().filter(|b| (-100.0..=100.0).contains(b));
                    match (id, bias) {
                        (Some(id), Some(b)) => Ok((id, b as f32)),
                        _ => Err(ApiError::field(
                            "logit_bias",
                            format!(
                                "'logit_bias' maps token ids below {vocab} to numbers in [-100, 100], got \"{k}\": {v}"
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("logit_bias", "an object of token id: bias", v)),
    };
    let n = match f.u64("n")? {
        None => 1,
        Some(n @ 1..=MAX_CHOICES) => n as usize,
        Some(n) => {
            return Err(ApiError::field(
                "n",
                format!("'n' (choices per prompt) must be between 1 and {MAX_CHOICES}, got {n}"),
            ))
        }
    };
    // llama-server's -1 (and 0) is no limit.
    let top_k = if f.is_minus_one("top_k") {
        0
    } else {
        (f.u64("top_k")?).map_or(base.top_k, |k| usize::try_from(k).unwrap_or(usize::MAX))
    };
    // As llama.cpp's server: 0 turns the penalties off, -1 looks at the whole history.
    let repeat_last_n = match f.i64("repeat_last_n")? {
        None => base.repeat_last_n,
        Some(-1) => gemma3_engine::ALL_HISTORY,
        Some(n) => usize::try_from(n).map_err(|_| {
            ApiError::field(
                "repeat_last_n",
                format!("'repeat_last_n' is a token count, 0 (penalties off) or -1 (all tokens), got {n}"),
            )
        })?,
    };
    let sampling = SamplingParams {
        temperature: f.f32("temperature")?.unwrap_or(base.temperature),
        top_k,
        top_p: f.f32("top_p")?.unwrap_or(base.top_p),
        min_p: f.f32("min_p")?.unwrap_or(base.min_p),
        repeat_penalty: f.f32("repeat_penalty")?.unwrap_or(base.repeat_penalty),
        repeat_last_n,
        presence_penalty: f.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: f.f32("frequency_penalty")?.unwrap_or(0.0),
        logit_bias,
        // -1 is random, as in llama.cpp's server.
        seed: if f.is_minus_one("seed") {
            random_seed()
        } else {
            f.u64("seed")?.unwrap_or_else(random_seed)
        },
    };
    if let Err(msg) = sampling.validate() {
        // The engine's messages start with the field name.
        let field = msg.split_whitespace().next().unwrap_or("").to_string();
        return Err(ApiError::field(&field, msg));
    }
    let mut max_tokens = MaxTokens::Default;
    let mut max_tokens_key = max_keys.last().copied().unwrap_or("max_tokens");
    for &k in max_keys {
        if f.is_minus_one(k) {
            max_tokens = MaxTokens::Unlimited;
            max_tokens_key = k;
            break;
        }
        if let Some(n) = f.u64(k)? {
            if n == 0 && !zero_tokens {
                return Err(ApiError::field(k, format!("'{k}' must be at least 1")));
            }
            max_tokens = MaxTokens::Count(n);
            max_tokens_key = k;
            break;
        }
    }
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP_STRINGS {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "at most {MAX_STOP_STRINGS} stop strings are supported, got {}",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong_type("stop", "a string or an array of strings", v))
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::field(
            "stop",
            format!(
                "stop strings may be at most {MAX_STOP_BYTES} bytes long, got {}",
                long.len()
            ),
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|_| {
                ApiError::field(
                    "stream_options.include_usage",
                    "'stream_options.include_usage' must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    Ok(Common {
        sampling,
        max_tokens,
        max_tokens_key,
        stop,
        stream,
        include_usage,
        ignore_eos,
        grammar,
        n,
    })
}

/// The output's constraint: OpenAI's `response_format` (`text`;
/// `json_object`, with llama-server's optional `schema`; `json_schema` with
/// `json_schema.schema`), or llama-server's `grammar` (GBNF) or
/// `json_schema`. At most one of them may constrain.
fn parse_grammar(f: &Fields) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let mut found: Vec<(GrammarSpec, &'static str)> = Vec::new();
    const RF: &str = "response_format";
    match f.get(RF) {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => match o.get("schema") {
                None | Some(Value::Null) => found.push((GrammarSpec::json_object(), RF)),
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    found.push((GrammarSpec::JsonSchema(s.clone()), RF))
                }
                Some(_) => {
                    return Err(ApiError::field(
                        RF,
                        "'response_format.schema' must be a JSON schema object",
                    ))
                }
            },
            Some("json_schema") => {
                let schema = o.get("json_schema").and_then(|j| j.get("schema"));
                match schema {
                    Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                        found.push((GrammarSpec::JsonSchema(s.clone()), RF))
                    }
                    _ => {
                        return Err(ApiError::field(
                            RF,
                            "'response_format' of type 'json_schema' needs 'json_schema': {\"schema\": {...}} with a JSON schema object",
                        ))
                    }
                }
            }
            _ => {
                return Err(ApiError::field(
                    RF,
                    "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                ))
            }
        },
        Some(_) => return Err(ApiError::field(RF, "'response_format' must be an object")),
    }
    match f.get("grammar") {
        None | Some(Value::Null) => {}
        Some(Value::String(g)) if g.is_empty() => {}
        Some(Value::String(g)) => found.push((GrammarSpec::Gbnf(g.clone()), "grammar")),
        Some(_) => {
            return Err(ApiError::field(
                "grammar",
                "'grammar' must be a string (a GBNF grammar)",
            ))
        }
    }
    // As llama-server: a `grammar` given (even empty) puts `json_schema`
    // aside; `json_schema: {}` is any JSON value.
    let grammar_given = matches!(f.get("grammar"), Some(Value::String(_)));
    match f.get("json_schema") {
        None | Some(Value::Null) => {}
        Some(Value::Object(_)) if grammar_given => {}
        Some(s @ Value::Object(_)) => {
            found.push((GrammarSpec::JsonSchema(s.clone()), "json_schema"))
        }
        Some(_) => {
            return Err(ApiError::field(
                "json_schema",
                "'json_schema' must be a JSON schema object",
            ))
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.1).collect();
        return Err(ApiError::bad_request(format!(
            "give at most one of 'response_format' (json) and llama-server's 'grammar' or 'json_schema'; got {}",
            names.join(" and ")
        )));
    }
    Ok(found.pop())
}

/// A parsed `POST /v1/chat/completions`.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub common: Common,
    /// Some(k): log-probabilities with k alternatives per token.
    pub logprobs: Option<usize>,
}

/// A message's content: a string, or text parts (each trimmed and joined, as
/// Gemma's chat template does). Required, as OpenAI requires it; null only
/// for an assistant's message (as OpenAI allows, e.g. beside tool calls),
/// read as empty.
fn content_text(i: usize, role: Role, v: Option<&Value>) -> Result<String, ApiError> {
    let field = format!("messages[{i}].content");
    match v {
        None => Err(ApiError::field(&field, format!("'{field}' is required"))),
        Some(Value::Null) if role == Role::Assistant => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let pf = format!("{field}[{j}]");
                let Value::Object(o) = p else {
                    return Err(wrong_type(&pf, "an object", p));
                };
                match o.get("type").and_then(Value::as_str) {
                    Some("text") => match o.get("text") {
                        Some(Value::String(t)) => out.push_str(t.trim()),
                        Some(v) => return Err(wrong_type(&format!("{pf}.text"), "a string", v)),
                        None => {
                            return Err(ApiError::field(
                                &format!("{pf}.text"),
                                format!("'{pf}.text' is missing"),
                            ))
                        }
                    },
                    Some(other) => {
                        return Err(ApiError::field(
                            &format!("{pf}.type"),
                            format!("content parts of type '{other}' are not supported (this model reads text only)"),
                        ))
                    }
                    None => {
                        return Err(ApiError::field(
                            &format!("{pf}.type"),
                            format!("'{pf}.type' must be \"text\""),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(wrong_type(&field, "a string or an array of parts", v)),
    }
}

/// Message i of a `messages` array as an object and its role (system,
/// user or assistant), with the errors both APIs give; tool calls are
/// refused (null or an empty list is none).
pub fn message_head(i: usize, m: &Value) -> Result<(&Map<String, Value>, Role), ApiError> {
    let Value::Object(o) = m else {
        return Err(wrong_type(&format!("messages[{i}]"), "an object", m));
    };
    let role_field = format!("messages[{i}].role");
    let role = match o.get("role") {
        Some(Value::String(r)) => Role::parse(r).ok_or_else(|| {
            ApiError::field(
                &role_field,
                format!("unknown role '{r}' (expected system, user or assistant)"),
            )
        })?,
        Some(v) => return Err(wrong_type(&role_field, "a string", v)),
        None => {
            return Err(ApiError::field(
                &role_field,
                format!("'{role_field}' is required"),
            ))
        }
    };
    match o.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(ApiError::field(
                &format!("messages[{i}].tool_calls"),
                "tool calls (function calling) are not supported",
            ))
        }
    }
    Ok((o, role))
}

impl ChatRequest {
    pub fn parse(obj: &Map<String, Value>, vocab: usize) -> Result<Self, ApiError> {
        let f = Fields(obj);
        f.str("model")?;
        let msgs = match f.get("messages") {
            None => return Err(ApiError::field("messages", "'messages' is required")),
            Some(Value::Array(a)) => a,
            Some(v) => return Err(wrong_type("messages", "an array", v)),
        };
        if msgs.is_empty() {
            return Err(ApiError::field("messages", "'messages' must not be empty"));
        }
        let mut messages = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let (o, role) = message_head(i, m)?;
            messages.push(Message::new(role, content_text(i, role, o.get("content"))?));
        }
        let common = parse_common(
            &f,
            &["max_completion_tokens", "max_tokens", "n_predict"],
            vocab,
            false,
        )?;
        let want = f.bool("logprobs")?.unwrap_or(false);
        let top = f.u64("top_logprobs")?;
        if let Some(k) = top {
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::field(
                    "top_logprobs",
                    format!("'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            if !want && k > 0 {
                return Err(ApiError::field(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs' set to true",
                ));
            }
        }
        let logprobs = want.then_some(top.unwrap_or(0) as usize);
        Ok(ChatRequest {
            messages,
            common,
            logprobs,
        })
    }
}

/// Most prompts one `POST /v1/completions` takes (each is a job of its own
/// in the scheduler's queue).
pub const MAX_PROMPTS: usize = 64;

/// The prompt of `POST /v1/completions`.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed `POST /v1/completions`.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    /// One prompt, or several (OpenAI's batch form: one choice each).
    pub prompts: Vec<Prompt>,
    pub common: Common,
    pub echo: bool,
    /// Some(k): log-probabilities with k alternatives per token.
    pub logprobs: Option<usize>,
}

/// Field `name` as one text or token array, or a list of up to `max` of
/// either (`what` names them in the error), each element's errors naming
/// it (`name[i]`). An empty text is refused only where `empty_text` is
/// false (a completion's "" is BOS alone; an embedding of nothing is not).
fn prompt_list(
    f: &Fields,
    name: &str,
    what: &str,
    max: usize,
    vocab: usize,
    empty_text: bool,
) -> Result<Vec<Prompt>, ApiError> {
    let empty = |name: &str| ApiError::field(name, format!("'{name}' must not be empty"));
    let text = |name: &str, s: &str| {
        if s.is_empty() && !empty_text {
            Err(empty(name))
        } else {
            Ok(Prompt::Text(s.to_owned()))
        }
    };
    match f.get(name) {
        None => Err(ApiError::field(name, format!("'{name}' is required"))),
        Some(Value::String(s)) => Ok(vec![text(name, s)?]),
        Some(Value::Array(a)) => match a.first() {
            None => Err(empty(name)),
            // Several: texts, or arrays of token ids.
            Some(Value::String(_) | Value::Array(_)) => {
                if a.len() > max {
                    return Err(ApiError::field(
                        name,
                        format!("at most {max} {what} per request, got {}", a.len()),
                    ));
                }
                (a.iter().enumerate())
                    .map(|(i, v)| {
                        let item = format!("{name}[{i}]");
                        match v {
                            Value::String(s) => text(&item, s),
                            Value::Array(ids) if !ids.is_empty() => {
                                Ok(Prompt::Tokens(token_array_of(&item, ids, vocab)?))
                            }
                            Value::Array(_) => Err(empty(&item)),
                            v => Err(wrong_type(&item, "a string or an array of token ids", v)),
                        }
                    })
                    .collect()
            }
            Some(_) => Ok(vec![Prompt::Tokens(token_array_of(name, a, vocab)?)]),
        },
        Some(v) => Err(wrong_type(
            name,
            "a string, an array of token ids, or an array of either",
            v,
        )),
    }
}

/// Token ids, field `name`'s (for its errors, which name the element).
fn token_array_of(name: &str, a: &[Value], vocab: usize) -> Result<Vec<u32>, ApiError> {
    (a.iter().enumerate())
        .map(|(i, v)| match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::field(
                name,
                format!("token id {id} is outside the vocabulary of {vocab}"),
            )),
            None => Err(ApiError::field(
                name,
                format!(
                    "'{name}[{i}]' must be a token id (an integer from 0 to {}), got {}",
                    vocab - 1,
                    match v {
                        Value::Number(n) => n.to_string(),
                        other => type_name(other).to_string(),
                    }
                ),
            )),
        })
        .collect()
}

/// Most inputs of one `POST /v1/embeddings` (OpenAI's own limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An embedding request's `dimensions`: absent, or the model's own (the
/// vectors cannot be shortened).
pub fn check_dimensions(f: &Fields, dims: usize) -> Result<(), ApiError> {
    match f.u64("dimensions")? {
        Some(d) if d != dims as u64 => Err(ApiError::field(
            "dimensions",
            format!("this model's embeddings have {dims} dimensions (they cannot be shortened), got {d}"),
        )),
        _ => Ok(()),
    }
}

/// A parsed `POST /v1/embeddings`.
#[derive(Clone, Debug)]
pub struct EmbeddingRequest {
    /// One text or token array per vector, in order.
    pub inputs: Vec<Prompt>,
    /// `encoding_format: "base64"`: each vector as the base64 of its
    /// little-endian f32 bytes (what OpenAI's Python client asks for).
    pub base64: bool,
}

impl EmbeddingRequest {
    pub fn parse(obj: &Map<String, Value>, vocab: usize, dims: usize) -> Result<Self, ApiError> {
        let f = Fields(obj);
        f.str("model")?;
        f.str("user")?;
        let inputs = prompt_list(&f, "input", "inputs", MAX_EMBEDDING_INPUTS, vocab, false)?;
        let base64 = match f.str("encoding_format")? {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::field(
                    "encoding_format",
                    format!("'encoding_format' must be \"float\" or \"base64\", got \"{other}\""),
                ))
            }
        };
        check_dimensions(&f, dims)?;
        Ok(EmbeddingRequest { inputs, base64 })
    }
}

impl CompletionRequest {
    pub fn parse(obj: &Map<String, Value>, vocab: usize) -> Result<Self, ApiError> {
        let f = Fields(obj);
        f.str("model")?;
        let prompts = prompt_list(&f, "prompt", "prompts", MAX_PROMPTS, vocab, true)?;
        if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::field("suffix", "'suffix' is not supported"));
        }
        let echo = f.bool("echo")?.unwrap_or(false);
        // With echo, max_tokens may be 0 (OpenAI's way to score a prompt:
        // its tokens' log-probabilities, nothing generated).
        let common = parse_common(&f, &["max_tokens", "n_predict"], vocab, echo)?;
        // OpenAI's best_of (≥ n) draws that many and returns the n of
        // highest log-probability; equal to n it is n itself (and below n
        // OpenAI refuses it).
        if let Some(b) = f.u64("best_of")? {
            if b != common.n as u64 {
                return Err(ApiError::field(
                    "best_of",
                    format!(
                        "'best_of' other than n is not supported (got {b}, n = {}): ask for n choices",
                        common.n
                    ),
                ));
            }
        }
        let logprobs = match f.u64("logprobs")? {
            Some(k) if k > MAX_TOP_LOGPROBS => {
                return Err(ApiError::field(
                    "logprobs",
                    format!("'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
            k => k.map(|k| k as usize),
        };
        if echo && logprobs.is_some() && common.stream {
            return Err(ApiError::field(
                "stream",
                "'echo' with 'logprobs' (the prompt's log-probabilities) is not streamed: leave 'stream' out",
            ));
        }
        Ok(CompletionRequest {
            prompts,
            common,
            echo,
            logprobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// A number past a field's range is said to be out of range, quoting
    /// what the client sent (an integer past 64 bits reaches us as a
    /// float; a finite double may not fit an f32), not "not an integer" or
    /// "not finite".
    #[test]
    fn numbers_out_of_range_say_so_and_quote_what_was_sent() {
        let m: Map<String, Value> = serde_json::from_str(
            r#"{"big": 99999999999999999999, "half": 1.5, "huge": 1e308, "seed": 1e30, "two64": 18446744073709551616,
                "neg": -3, "word": "x", "ok": 7, "t": 0.5, "five": 5.0}"#,
        )
        .unwrap();
        let f = Fields(&m);
        let err = |r: Result<(), ApiError>| {
            let e = r.unwrap_err();
            (e.param.unwrap(), e.message)
        };
        let (u, i, x) = (
            |k| err(f.u64(k).map(drop)),
            |k| err(f.i64(k).map(drop)),
            |k| err(f.f32(k).map(drop)),
        );
        for ((param, e), want) in [
            (u("big"), "'big' is out of range: it must be between 0 and 18446744073709551615, got 1e+20"),
            (u("two64"), "'two64' is out of range: it must be between 0 and 18446744073709551615, got 1.8446744073709552e+19"),
            (u("half"), "'half' must be an integer, got 1.5"),
            (u("five"), "'five' must be an integer, got 5.0"),
            (i("seed"), "'seed' is out of range: it must be between -9223372036854775808 and 18446744073709551615, got 1e+30"),
            (x("huge"), "'huge' is out of range for a 32-bit float, got 1e+308"),
            (u("neg"), "'neg' must not be negative, got -3"),
            (u("word"), "'word' must be an integer, got a string"),
        ] {
            assert_eq!(e, want);
            assert!(want.starts_with(&format!("'{param}'")), "{want}");
        }
        assert_eq!(f.u64("ok").unwrap(), Some(7));
        assert_eq!(f.i64("neg").unwrap(), Some(-3));
        assert_eq!(f.f32("t").unwrap(), Some(0.5));
    }

    #[test]
    fn chat_defaults_and_parts() {
        let r = ChatRequest::parse(&obj(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": " Hi "}, {"type": "text", "text": "there"}]}
            ]
        })), 1000)
        .unwrap();
        assert_eq!(r.messages[1].content, "Hithere");
        assert_eq!(r.common.sampling.temperature, 1.0);
        assert_eq!(r.common.sampling.top_k, 64);
        assert_eq!(r.common.sampling.top_p, 0.95);
        assert_eq!(r.common.max_tokens, MaxTokens::Default);
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn grammars_come_by_three_fields() {
        let m = json!([{"role": "user", "content": "hi"}]);
        let g = |v: Value| ChatRequest::parse(&obj(v), 1000).map(|r| r.common.grammar);
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(g(json!({"messages": m})).unwrap(), None);
        assert_eq!(
            g(json!({"messages": m, "response_format": {"type": "text"}})).unwrap(),
            None
        );
        // As llama-server: an empty grammar is off and puts a schema aside;
        // a grammar wins over a schema; an empty schema is any JSON value.
        assert_eq!(
            g(json!({"messages": m, "grammar": "", "json_schema": {"type": "integer"}})).unwrap(),
            None
        );
        assert_eq!(
            g(json!({"messages": m, "grammar": "root ::= \"a\"", "json_schema": {}})).unwrap(),
            Some((GrammarSpec::Gbnf("root ::= \"a\"".into()), "grammar"))
        );
        assert_eq!(
            g(json!({"messages": m, "json_schema": {}})).unwrap(),
            Some((GrammarSpec::JsonSchema(json!({})), "json_schema"))
        );
        assert_eq!(
            g(json!({"messages": m, "response_format": {"type": "json_object"}})).unwrap(),
            Some((GrammarSpec::json_object(), "response_format"))
        );
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}});
        assert_eq!(
            g(json!({"messages": m, "response_format": rf})).unwrap(),
            Some((GrammarSpec::JsonSchema(schema.clone()), "response_format"))
        );
        assert_eq!(
            g(json!({"messages": m, "json_schema": schema})).unwrap(),
            Some((GrammarSpec::JsonSchema(schema.clone()), "json_schema"))
        );
        assert_eq!(
            g(json!({"messages": m, "grammar": "root ::= \"a\""})).unwrap(),
            Some((GrammarSpec::Gbnf("root ::= \"a\"".into()), "grammar"))
        );
        let two = g(json!({"messages": m, "grammar": "root ::= \"a\"",
            "response_format": {"type": "json_object"}}));
        assert!(two.unwrap_err().message.contains("at most one"));
    }

    #[test]
    fn errors_name_the_field() {
        let param = |v: Value| {
            ChatRequest::parse(&obj(v), 1000)
                .unwrap_err()
                .param
                .unwrap_or_default()
        };
        let m = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            param(json!({"messages": m, "temperature": "hot"})),
            "temperature"
        );
        assert_eq!(
            param(json!({"messages": m, "temperature": 1e9})),
            "temperature"
        );
        assert_eq!(param(json!({"messages": m, "top_p": 5})), "top_p");
        assert_eq!(param(json!({"messages": m, "max_tokens": 0})), "max_tokens");
        assert_eq!(
            param(json!({"messages": m, "max_tokens": -3})),
            "max_tokens"
        );
        assert_eq!(param(json!({"messages": m, "n": 0})), "n");
        assert_eq!(param(json!({"messages": m, "n": 129})), "n");
        // Refused, not ignored: each would change the answer.
        assert_eq!(
            param(json!({"messages": m, "tools": [{"type": "function"}]})),
            "tools"
        );
        assert_eq!(
            param(json!({"messages": m, "tool_choice": "required"})),
            "tool_choice"
        );
        assert_eq!(
            param(json!({"messages": m, "response_format": {"type": "xml"}})),
            "response_format"
        );
        assert_eq!(
            param(json!({"messages": m, "response_format": {"type": "json_schema"}})),
            "response_format"
        );
        assert_eq!(
            param(json!({"messages": m, "response_format": {"type": "json_object", "schema": 3}})),
            "response_format"
        );
        assert_eq!(param(json!({"messages": m, "grammar": 7})), "grammar");
        assert_eq!(
            param(json!({"messages": m, "json_schema": "x"})),
            "json_schema"
        );
        let call = json!([{"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]);
        assert_eq!(param(json!({"messages": call})), "messages[1].tool_calls");
        assert_eq!(
            param(json!({"messages": m, "logit_bias": {"1000": 1}})),
            "logit_bias"
        );
        assert_eq!(
            param(json!({"messages": m, "logit_bias": {"5": -101}})),
            "logit_bias"
        );
        assert_eq!(
            param(json!({"messages": m, "logit_bias": {"x": 1}})),
            "logit_bias"
        );
        assert_eq!(
            param(json!({"messages": m, "logit_bias": [1]})),
            "logit_bias"
        );
        assert_eq!(
            param(json!({"messages": m, "stop": ["x".repeat(1025)]})),
            "stop"
        );
        assert_eq!(
            param(json!({"messages": m, "repeat_penalty": 1e-40})),
            "repeat_penalty"
        );
        assert_eq!(
            param(json!({"messages": m, "repeat_last_n": -2})),
            "repeat_last_n"
        );
        assert_eq!(param(json!({"messages": m, "seed": -2})), "seed");
        // As llama.cpp's server: repeat_last_n 0 is off and -1 all tokens; seed -1 is random.
        let sampling = |v: Value| ChatRequest::parse(&obj(v), 1000).unwrap().common.sampling;
        assert_eq!(
            sampling(json!({"messages": m, "repeat_last_n": 0})).repeat_last_n,
            0
        );
        assert_eq!(
            sampling(json!({"messages": m, "repeat_last_n": -1})).repeat_last_n,
            gemma3_engine::ALL_HISTORY
        );
        assert_eq!(
            sampling(json!({"messages": m, "repeat_last_n": 7})).repeat_last_n,
            7
        );
        assert_eq!(
            sampling(json!({"messages": m, "seed": u64::MAX})).seed,
            u64::MAX
        );
        let (a, b) = (
            sampling(json!({"messages": m, "seed": -1})).seed,
            sampling(json!({"messages": m, "seed": -1})).seed,
        );
        assert_ne!(a, b, "seed -1 is a fresh random seed each time");
        // llama-server's own fields: refused where they would change the
        // answer (they had been ignored), accepted at their "off" values.
        for (key, on) in [
            ("mirostat", json!(2)),
            ("n_probs", json!(5)),
            ("dry_multiplier", json!(0.8)),
            ("xtc_probability", json!(0.5)),
            ("dynatemp_range", json!(0.5)),
            ("t_max_predict_ms", json!(100)),
            ("typical_p", json!(0.5)),
            ("top_n_sigma", json!(1.0)),
        ] {
            assert_eq!(param(json!({"messages": m, key: on})), key);
        }
        let off = json!({"messages": m, "grammar": "", "json_schema": {}, "mirostat": 0,
            "n_probs": 0, "dry_multiplier": 0.0, "xtc_probability": 0, "dynatemp_range": 0,
            "t_max_predict_ms": 0, "typical_p": 1.0, "top_n_sigma": -1.0, "cache_prompt": true,
            "samplers": "edkypmxt"});
        assert!(ChatRequest::parse(&obj(off), 1000).is_ok());
        // llama-server's lengths and -1s: n_predict is max_tokens, -1 is "as
        // many as the context leaves"; top_k -1 is no limit.
        let common = |v: Value| ChatRequest::parse(&obj(v), 1000).unwrap().common;
        assert_eq!(
            common(json!({"messages": m, "n_predict": 3})).max_tokens,
            MaxTokens::Count(3)
        );
        assert_eq!(
            common(json!({"messages": m, "n_predict": 3, "max_tokens": 5})).max_tokens,
            MaxTokens::Count(5)
        );
        assert_eq!(
            common(json!({"messages": m, "max_tokens": -1})).max_tokens,
            MaxTokens::Unlimited
        );
        assert_eq!(
            common(json!({"messages": m, "n_predict": -1})).max_tokens,
            MaxTokens::Unlimited
        );
        assert_eq!(param(json!({"messages": m, "n_predict": -2})), "n_predict");
        assert_eq!(
            common(json!({"messages": m, "top_k": -1})).sampling.top_k,
            0
        );
        assert!(common(json!({"messages": m, "ignore_eos": true})).ignore_eos);
        assert_eq!(param(json!({"messages": m, "ignore_eos": 1})), "ignore_eos");
        let ok = |v: Value| ChatRequest::parse(&obj(v), 1000).map(|r| r.common.sampling.logit_bias);
        assert_eq!(
            ok(
                json!({"messages": m, "logit_bias": {"7": -100, "999": 2.5}, "tool_choice": "none",
                "tools": [], "response_format": {"type": "text"}})
            )
            .unwrap()
            .len(),
            2
        );
        assert_eq!(param(json!({"messages": m, "stop": 3})), "stop");
        assert_eq!(
            param(json!({"messages": m, "logprobs": true, "top_logprobs": 21})),
            "top_logprobs"
        );
        assert_eq!(param(json!({"messages": "hi"})), "messages");
        assert_eq!(
            param(json!({"messages": [{"role": "robot", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(
            param(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            "messages[0].content[0].type"
        );
        // Content is required; null only for an assistant's message.
        let two = |second: Value| json!({"messages": [{"role": "user", "content": "x"}, second]});
        assert_eq!(param(two(json!({"role": "user"}))), "messages[1].content");
        assert_eq!(
            param(two(json!({"role": "system", "content": null}))),
            "messages[1].content"
        );
        let ok = ChatRequest::parse(
            &obj(two(json!({"role": "assistant", "content": null}))),
            1000,
        );
        assert_eq!(ok.expect("null assistant content").messages[1].content, "");
    }

    #[test]
    fn completion_prompts() {
        let p = |v: Value| CompletionRequest::parse(&obj(v), 100).map(|r| r.prompts);
        assert_eq!(
            p(json!({"prompt": "x"})).unwrap(),
            [Prompt::Text("x".into())]
        );
        assert_eq!(
            p(json!({"prompt": [1, 2]})).unwrap(),
            [Prompt::Tokens(vec![1, 2])]
        );
        assert_eq!(
            p(json!({"prompt": [[3]]})).unwrap(),
            [Prompt::Tokens(vec![3])]
        );
        // OpenAI's batch form: one choice per prompt (it had been refused).
        assert_eq!(
            p(json!({"prompt": ["a", "b"]})).unwrap(),
            [Prompt::Text("a".into()), Prompt::Text("b".into())]
        );
        assert_eq!(
            p(json!({"prompt": [[3], [4, 5]]})).unwrap(),
            [Prompt::Tokens(vec![3]), Prompt::Tokens(vec![4, 5])]
        );
        let param = |v: Value| p(v).unwrap_err().param;
        // A bad element of the batch is named where it is.
        assert_eq!(
            param(json!({"prompt": ["a", 1]})).as_deref(),
            Some("prompt[1]")
        );
        assert_eq!(
            param(json!({"prompt": [[3], []]})).as_deref(),
            Some("prompt[1]")
        );
        assert_eq!(
            param(json!({"prompt": vec!["a"; MAX_PROMPTS + 1]})).as_deref(),
            Some("prompt")
        );
        // Several prompts stream too (their choices interleaved by index).
        assert!(p(json!({"prompt": ["a", "b"], "stream": true})).is_ok());
        assert_eq!(param(json!({"prompt": [100]})).as_deref(), Some("prompt"));
        assert_eq!(param(json!({"prompt": []})).as_deref(), Some("prompt"));
        assert_eq!(param(json!({})).as_deref(), Some("prompt"));
    }
}
