//! The server end to end with the real model, over real HTTP on 127.0.0.1:0.

mod common;

use common::*;
use gemma3_engine::{render_chat, GenerateParams, Message, Role, SamplingParams, Session};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PROMPTS: [&str; 16] = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three primary colours.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous physicist.",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue?",
    "Describe a cat in five words.",
    "What comes after Tuesday?",
    "Suggest a name for a goldfish.",
    "How many legs does a spider have?",
    "Write the first line of a story about a dragon.",
    "What is the boiling point of water in Celsius?",
    "Recommend a book for a long flight.",
];

fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "gemma3",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// 16 concurrent streaming greedy requests each get exactly their solo
/// output, in far fewer forward passes than tokens (they were batched); and
/// the solo output is the single-sequence `Session`'s.
#[test]
fn concurrent_streams_match_solo() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    const N: usize = 24;
    let server = start(config(model.clone(), 16, 1024));
    let addr = server.addr;

    let solo: Vec<String> = PROMPTS
        .iter()
        .map(|p| {
            let r = post(addr, "/v1/chat/completions", &chat_body(p, N, true));
            assert_eq!(r.status, 200, "{}", r.text());
            chat_stream_text(&r.events()).0
        })
        .collect();

    let steps_before = metric(addr, "gemma3_decode_steps_total");
    let generated_before = metric(addr, "gemma3_generated_tokens_total");
    let barrier = std::sync::Barrier::new(PROMPTS.len());
    let together: Vec<(String, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                let barrier = &barrier;
                s.spawn(move || {
                    let body = chat_body(p, N, true).to_string();
                    barrier.wait();
                    let r = read_response(send(addr, "POST", "/v1/chat/completions", &body, &[]));
                    assert_eq!(r.status, 200, "{}", r.text());
                    chat_stream_text(&r.events())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((text, finish), solo)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(
            text, solo,
            "prompt {i} ({:?}) differs when batched",
            PROMPTS[i]
        );
        assert!(finish.is_some(), "prompt {i}: no finish_reason");
    }
    let steps = metric(addr, "gemma3_decode_steps_total") - steps_before;
    let generated = metric(addr, "gemma3_generated_tokens_total") - generated_before;
    eprintln!("16 concurrent streams: {generated} tokens in {steps} forward passes");
    assert!(
        steps * 3.0 < generated,
        "{generated} tokens took {steps} forward passes: the requests were not batched"
    );
    server.stop().unwrap();

    // The first prompt through the plain single-sequence path.
    let m = gemma3_model::Model::open(&model).unwrap();
    let tok = gemma3_engine::tokenizer_from_gguf(&m.file).unwrap();
    let prompt = tok.encode(
        &render_chat(&[Message::new(Role::User, PROMPTS[0])], true).unwrap(),
        false,
        true,
    );
    let mut stop_tokens = vec![tok.specials().eos];
    stop_tokens.extend(tok.specials().end_of_turn);
    let params = GenerateParams {
        constraint: None,
        max_tokens: N,
        sampling: SamplingParams::greedy(),
        stop_strings: vec![],
        stop_tokens,
    };
    let g = Session::new(&m, 1024)
        .generate(&tok, &prompt, &params, |_| true)
        .unwrap();
    assert_eq!(g.text, solo[0], "the server differs from Session::generate");
}

/// A client that disconnects mid-stream frees its slot: with --parallel 1
/// the next request is served at once, and no sequence stays active.
/// Waits up to 5 s for `n` active sequences, failing with `why`; the wait.
fn wait_for_active(addr: std::net::SocketAddr, n: f64, why: &str) -> Duration {
    let t0 = Instant::now();
    while metric(addr, "gemma3_active_sequences") != n {
        assert!(t0.elapsed() < Duration::from_secs(5), "{why}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

#[test]
fn dropped_client_frees_its_slot() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 1, 1024));
    let addr = server.addr;

    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": true});
    let mut s = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
    // Read until a few tokens have arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 4 {
        use std::io::Read;
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(metric(addr, "gemma3_active_sequences"), 1.0);
    drop(s);

    let freed = wait_for_active(addr, 0.0, "the dropped stream still holds its slot");
    eprintln!("slot freed {freed:?} after the client left");
    let generated = metric(addr, "gemma3_generated_tokens_total");
    assert!(
        generated < 200.0,
        "{generated} tokens: generation went on after the disconnect"
    );

    // The same for a request that is not streamed: its client's hang-up is
    // seen while it waits (half-closing connections had kept this one
    // generating all its tokens).
    let quiet = json!({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0});
    let s = send(addr, "POST", "/v1/completions", &quiet.to_string(), &[]);
    wait_for_active(addr, 1.0, "the request never started");
    let before = metric(addr, "gemma3_generated_tokens_total");
    drop(s);
    wait_for_active(addr, 0.0, "the dropped request still holds its slot");
    let generated = metric(addr, "gemma3_generated_tokens_total") - before;
    assert!(
        generated < 200.0,
        "{generated} tokens: generation went on after the disconnect"
    );

    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);

    // Shutdown with a stream in flight: it is cancelled after the grace
    // period and the server stops cleanly.
    let s = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || read_response(s));
    server.stop().unwrap();
    let r = reader.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("shutting down"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

fn expect_error(r: &Response, status: u16, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
    v
}

/// Every class of bad request gets its status and an OpenAI-shaped error,
/// and the server keeps serving.
#[test]
fn bad_requests_get_openai_errors() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let mut cfg = config(model, 1, 256);
    cfg.queue = 0;
    cfg.api_key = Some("sekret".into());
    let server = start(cfg);
    let addr = server.addr;
    let auth = [("Authorization", "Bearer sekret")];
    let call = |path: &str, body: &str| request(addr, "POST", path, body, &auth);
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        call("/v1/chat/completions", &b.to_string())
    };

    // Authentication.
    let r = post(addr, "/v1/chat/completions", &json!({"messages": []}));
    expect_error(&r, 401, None);
    let r = request(
        addr,
        "GET",
        "/v1/models",
        "",
        &[("Authorization", "Bearer wrong")],
    );
    expect_error(&r, 401, None);
    let r = request(addr, "GET", "/v1/models", "", &auth);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["object"], "model");
    assert_eq!(get(addr, "/health").status, 200, "/health needs no key");

    // A body over the limit: 413, saying the limit, as soon as its length is
    // known (the body itself is not sent, so that the server's early reply
    // cannot meet a client still writing).
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let head = "POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n\
        Content-Type: application/json\r\nContent-Length: 3145728\r\n\r\n";
    std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
    let v = expect_error(&read_response(s), 413, None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("2 MiB"),
        "{v}"
    );

    // A system message alone (the template would drop it).
    let system_only = json!({"messages": [{"role": "system", "content": "Answer in French."}]});
    let r = call("/v1/chat/completions", &system_only.to_string());
    expect_error(&r, 400, Some("messages"));

    // Malformed JSON and wrong types.
    expect_error(&call("/v1/chat/completions", "{\"messages\": ["), 400, None);
    expect_error(&call("/v1/chat/completions", "[1, 2]"), 400, None);
    expect_error(
        &chat(json!({"temperature": "warm"})),
        400,
        Some("temperature"),
    );
    expect_error(&chat(json!({"messages": "Hi"})), 400, Some("messages"));
    expect_error(
        &chat(json!({"messages": [{"role": "user", "content": 5}]})),
        400,
        Some("messages[0].content"),
    );
    expect_error(
        &chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
        400,
        Some("messages[0].role"),
    );
    expect_error(&chat(json!({"stop": {"a": 1}})), 400, Some("stop"));
    expect_error(&chat(json!({"stream": "yes"})), 400, Some("stream"));
    expect_error(
        &chat(json!({"messages": [{"role": "assistant", "content": "x"}]})),
        400,
        Some("messages"),
    );
    expect_error(
        &call("/v1/completions", &json!({"prompt": 5}).to_string()),
        400,
        Some("prompt"),
    );
    expect_error(
        &call(
            "/v1/completions",
            &json!({"prompt": [1, 999999999]}).to_string(),
        ),
        400,
        Some("prompt"),
    );
    // In a batch of token arrays the bad element is named where it is.
    let v = expect_error(
        &call(
            "/v1/completions",
            &json!({"prompt": [[1, 2], [3, "x"]]}).to_string(),
        ),
        400,
        Some("prompt[1]"),
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'prompt[1][1]' must be a token id"), "{msg}");

    // Absurd values.
    expect_error(&chat(json!({"temperature": 1e9})), 400, Some("temperature"));
    expect_error(&chat(json!({"top_p": 5})), 400, Some("top_p"));
    expect_error(&chat(json!({"min_p": -1})), 400, Some("min_p"));
    expect_error(
        &chat(json!({"presence_penalty": 9})),
        400,
        Some("presence_penalty"),
    );
    expect_error(&chat(json!({"max_tokens": 0})), 400, Some("max_tokens"));
    expect_error(
        &chat(json!({"max_completion_tokens": 0})),
        400,
        Some("max_completion_tokens"),
    );
    expect_error(&chat(json!({"n": 0})), 400, Some("n"));
    expect_error(&chat(json!({"n": 129})), 400, Some("n"));
    // Two choices are two requests, more than this server holds at once.
    let v = expect_error(&chat(json!({"n": 2})), 400, Some("n"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("holds at most 1 request"), "{msg}");
    expect_error(
        &chat(json!({"logprobs": true, "top_logprobs": 50})),
        400,
        Some("top_logprobs"),
    );

    // Beyond the context: the message says both numbers.
    let v = expect_error(
        &chat(json!({"max_tokens": 1_000_000_000_000u64})),
        400,
        Some("max_tokens"),
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("1000000000000") && msg.contains("256"),
        "{msg}"
    );
    // The largest count too: it had been the sentinel for -1 ("as many as
    // the context leaves") and was served as such.
    expect_error(
        &chat(json!({"max_tokens": u64::MAX})),
        400,
        Some("max_tokens"),
    );
    let long = "word ".repeat(400);
    let v = expect_error(
        &call(
            "/v1/completions",
            &json!({"prompt": long, "max_tokens": 1}).to_string(),
        ),
        400,
        Some("prompt"),
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("256"),
        "{v}"
    );

    // Unknown route, wrong method.
    expect_error(&get(addr, "/v1/nothing"), 404, None);
    expect_error(&get(addr, "/nothing"), 404, None);
    expect_error(
        &request(addr, "GET", "/v1/chat/completions", "", &auth),
        405,
        None,
    );

    // Queue full: --parallel 1 --queue 0 with one stream running.
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": true});
    let mut s = send(addr, "POST", "/v1/completions", &body.to_string(), &auth);
    {
        use std::io::Read;
        let mut b = [0u8; 1024];
        assert!(s.read(&mut b).unwrap() > 0);
    }
    let r = call(
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}).to_string(),
    );
    expect_error(&r, 429, None);
    assert_eq!(r.header("retry-after"), Some("1"), "{:?}", r.headers);
    drop(s);

    // Still serving.
    let t0 = Instant::now();
    loop {
        let r = chat(json!({"temperature": 0}));
        if r.status == 200 {
            let v = r.json();
            assert_eq!(v["object"], "chat.completion");
            assert_eq!(v["choices"][0]["message"]["role"], "assistant");
            break;
        }
        // The dropped stream may hold the slot for one more step.
        assert!(
            r.status == 429 && t0.elapsed() < Duration::from_secs(10),
            "{}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = get(addr, "/metrics").text();
    assert!(m.contains("gemma3_requests_total{status=\"400\"}"), "{m}");
    assert!(m.contains("gemma3_requests_total{status=\"429\"}"), "{m}");
    server.stop().unwrap();
}

/// A second request sharing a long prefix reuses its KV state (in place from
/// a finished slot, or copied from a busy one) and gives the same greedy
/// output as without the cache.
#[test]
fn prefix_cache_reuses_and_matches() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 2, 1024));
    let addr = server.addr;
    let prefix = "The following is a transcript of a long and careful lecture on the history of \
        astronomy, from the first star catalogues of Babylon through Ptolemy's Almagest, the \
        Copernican revolution, Kepler's laws of planetary motion and Galileo's telescope, to \
        Newton's law of universal gravitation and the discovery of Neptune by calculation. \
        The lecturer speaks slowly and answers every question from the audience in detail. ";
    let completion = |q: &str, max: usize| json!({"prompt": format!("{prefix}{q}"), "max_tokens": max, "temperature": 0});
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };

    // Reference: a fresh server, nothing cached.
    let r = post(
        addr,
        "/v1/completions",
        &completion("Question: who was Kepler?", 16),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reference = r.json();
    assert_eq!(cached(&reference), 0);
    let prompt_tokens = reference["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 80,
        "the prefix should be long: {prompt_tokens}"
    );

    // Same prefix, another question, streamed and kept running: it reuses
    // the finished slot in place.
    let mut body = completion("Question: what did Galileo see?", 400);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut s = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
    {
        use std::io::Read;
        let mut b = [0u8; 4096];
        let mut seen = String::new();
        while seen.matches("data: ").count() < 2 {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0);
            seen.push_str(&String::from_utf8_lossy(&b[..n]));
        }
    }

    // The reference request again while that one runs: its slot is busy, so
    // the prefix is copied from it into the other slot.
    let r = post(
        addr,
        "/v1/completions",
        &completion("Question: who was Kepler?", 16),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let again = r.json();
    eprintln!(
        "prompt {prompt_tokens} tokens, cached {} on the second request",
        cached(&again)
    );
    assert!(cached(&again) >= 80, "{again}");
    assert_eq!(again["choices"][0]["text"], reference["choices"][0]["text"]);
    drop(s);

    // And once more, now from a finished slot in place.
    std::thread::sleep(Duration::from_millis(300));
    let r = post(
        addr,
        "/v1/completions",
        &completion("Question: who was Kepler?", 16),
    );
    let third = r.json();
    assert!(cached(&third) >= prompt_tokens - 1, "{third}");
    assert_eq!(third["choices"][0]["text"], reference["choices"][0]["text"]);

    // Chat too: same system prompt, cached tokens reported.
    let sys = format!("You are a patient astronomy tutor. Context: {prefix}");
    let ask = |q: &str| {
        post(
            addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "system", "content": sys}, {"role": "user", "content": q}],
                    "max_tokens": 8, "temperature": 0}),
        )
        .json()
    };
    ask("Who was Ptolemy?");
    let v = ask("Who was Newton?");
    assert!(cached(&v) >= 80, "{v}");
    assert!(metric(addr, "gemma3_prompt_tokens_cached_total") > 0.0);
    server.stop().unwrap();
}

/// Logprobs, stop strings, echo, token-id prompts, usage in streams, and the
/// tokenizer routes.
#[test]
fn api_features() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 2, 512));
    let addr = server.addr;

    // Chat logprobs: the chosen token is the most likely one when greedy.
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3, "{v}");
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], c["token"]);
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }

    // Completions: token-id prompt = text prompt; echo; logprobs; stop string.
    let text = post(
        addr,
        "/tokenize",
        &json!({"content": "The capital of France is", "add_special": true}),
    )
    .json();
    let ids = text["tokens"].clone();
    assert_eq!(ids[0], 2, "BOS first: {ids}");
    let a = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    )
    .json();
    let b = post(
        addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    )
    .json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let lp = &b["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6, "{b}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{b}");
    let gen = a["choices"][0]["text"].as_str().unwrap().to_string();
    let e = post(addr, "/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "echo": true})).json();
    assert_eq!(
        e["choices"][0]["text"].as_str().unwrap(),
        format!("The capital of France is{gen}")
    );
    // A stop string cuts the text before it.
    let word = gen.split_whitespace().nth(1).unwrap_or("the").to_string();
    let s = post(addr, "/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "stop": [word.clone()]})).json();
    assert_eq!(s["choices"][0]["finish_reason"], "stop", "{s}");
    let cut = s["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        cut,
        &gen[..gen.find(&word).unwrap()],
        "stop {word:?} in {gen:?}"
    );
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    // The logprobs stop with the text: every token reported starts inside
    // it, and the offsets count the text before each. (The stop string's
    // tokens had been reported too, after text that ended before them,
    // with offsets held where the held-back text began.)
    // The tokens' text run together: a `bytes:\xNN` token (a byte that is
    // not a whole character) is its bytes, decoded with the ones around it.
    let text_of = |tokens: &[String]| {
        let mut raw = Vec::new();
        for t in tokens {
            match t.strip_prefix("bytes:") {
                Some(hex) => raw.extend(
                    hex.split("\\x")
                        .filter(|h| !h.is_empty())
                        .map(|h| u8::from_str_radix(h, 16).unwrap()),
                ),
                None => raw.extend_from_slice(t.as_bytes()),
            }
        }
        String::from_utf8_lossy(&raw).into_owned()
    };
    let lines_up = |tokens: &[String], offsets: &[u64], text: &str, why: &str| {
        let all = text_of(tokens);
        assert!(all.starts_with(text), "{why}: {tokens:?} for {text:?}");
        let but_last = text_of(&tokens[..tokens.len().saturating_sub(1)]);
        assert!(
            but_last.len() < text.len().max(1),
            "{why}: {tokens:?} for {text:?}"
        );
        for (i, &o) in offsets.iter().enumerate() {
            assert_eq!(
                o as usize,
                text_of(&tokens[..i]).chars().count(),
                "{why}: {offsets:?}"
            );
        }
    };
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let stop_lp = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
        "stop": [word.clone()], "logprobs": 1});
    let v = post(addr, "/v1/completions", &stop_lp).json();
    let lp = &v["choices"][0]["logprobs"];
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    lines_up(&strs(&lp["tokens"]), &offsets, cut, "completions");
    let mut streamed = stop_lp.clone();
    streamed["stream"] = json!(true);
    let ev = post(addr, "/v1/completions", &streamed).events();
    let (mut text, mut tokens, mut offsets) = (String::new(), vec![], vec![]);
    for e in &ev {
        let Some(c) = e["choices"].get(0) else {
            continue;
        };
        text.push_str(c["text"].as_str().unwrap_or(""));
        if c["logprobs"].is_object() {
            tokens.extend(strs(&c["logprobs"]["tokens"]));
            offsets.extend(
                c["logprobs"]["text_offset"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_u64().unwrap()),
            );
        }
    }
    assert_eq!(text, cut);
    lines_up(&tokens, &offsets, cut, "completions, streamed");
    // Invalid bytes (byte tokens <0xFF> and <0x80> made likely): each is a
    // U+FFFD in the text, three bytes and one character, which the
    // alignment had counted as one byte (reporting the cut ' world') and
    // the offsets as zero or one character.
    for (byte, bias, stop) in [
        (493u32, 10, Some(" world")),
        (493, 10, Some("\n")),
        (366, 15, None),
    ] {
        let ids: Vec<u32> = std::iter::once(2)
            .chain([byte, 9259, 1902, 107].repeat(6))
            .collect();
        let mut body = json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 1,
            "logit_bias": {byte.to_string(): bias}});
        if let Some(stop) = stop {
            body["stop"] = json!([stop]);
        }
        let v = post(addr, "/v1/completions", &body).json();
        let c = &v["choices"][0];
        let text = c["text"].as_str().unwrap();
        assert!(text.starts_with('\u{FFFD}'), "{v}");
        let offsets: Vec<u64> = c["logprobs"]["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        lines_up(
            &strs(&c["logprobs"]["tokens"]),
            &offsets,
            text,
            &format!("byte {byte}, stop {stop:?}"),
        );
    }
    let chat_stop = json!({"messages": [{"role": "user", "content": "Count from 1 to 9."}],
        "max_tokens": 12, "temperature": 0, "logprobs": true, "stream": true});
    let full = chat_stream_text(&post(addr, "/v1/chat/completions", &chat_stop).events()).0;
    let stop = full
        .chars()
        .skip(full.chars().count() / 2)
        .take(3)
        .collect::<String>();
    let mut chat_stop = chat_stop.clone();
    chat_stop["stop"] = json!([stop.clone()]);
    let ev = post(addr, "/v1/chat/completions", &chat_stop).events();
    let text = chat_stream_text(&ev).0;
    assert_eq!(
        text,
        &full[..full.find(&stop).unwrap()],
        "stop {stop:?} in {full:?}"
    );
    let tokens: Vec<String> = ev
        .iter()
        .filter_map(|e| {
            e["choices"].get(0)?["logprobs"]["content"]
                .as_array()
                .cloned()
        })
        .flatten()
        .map(|c| c["token"].as_str().unwrap().to_string())
        .collect();
    lines_up(&tokens, &[], &text, "chat, streamed");

    // Streamed completion with usage.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let ev = r.events();
    let streamed: String = ev
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str())
        .collect();
    assert_eq!(streamed, gen);
    let last = ev.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 6, "{last}");

    // Seeded sampling is reproducible.
    let seeded =
        json!({"prompt": "Once upon a time", "max_tokens": 8, "seed": 42, "temperature": 0.9});
    let x = post(addr, "/v1/completions", &seeded).json();
    let y = post(addr, "/v1/completions", &seeded).json();
    assert_eq!(x["choices"][0]["text"], y["choices"][0]["text"]);

    // Tokenizer routes.
    let t = post(
        addr,
        "/tokenize",
        &json!({"content": "<start_of_turn>hello"}),
    )
    .json();
    assert_eq!(t["tokens"][0], 105, "specials parsed by default: {t}");
    let d = post(addr, "/detokenize", &json!({"tokens": t["tokens"]})).json();
    assert_eq!(d["content"], "<start_of_turn>hello");
    expect_error(
        &post(addr, "/detokenize", &json!({"tokens": [-1]})),
        400,
        Some("tokens"),
    );
    let h = get(addr, "/health").json();
    assert_eq!(h["status"], "ok");

    // llama-server's forms. /tokenize with pieces:
    let t = post(
        addr,
        "/tokenize",
        &json!({"content": "<start_of_turn>hello", "with_pieces": true}),
    )
    .json();
    assert_eq!(
        t["tokens"][0],
        json!({"id": 105, "piece": "<start_of_turn>"}),
        "{t}"
    );
    assert_eq!(t["tokens"][1]["piece"], "hello", "{t}");
    // n_predict for max_tokens; ignore_eos keeps going past a forced end of text.
    let eos_forced = json!({"prompt": "The capital of France is", "n_predict": 3,
        "temperature": 0, "logit_bias": {"1": 100}});
    let v = post(addr, "/v1/completions", &eos_forced).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 0, "{v}");
    let mut ignoring = eos_forced.clone();
    ignoring["ignore_eos"] = json!(true);
    let v = post(addr, "/v1/completions", &ignoring).json();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    // Completions' top_logprobs maps go most likely first (they had come in
    // the order of their keys).
    for top in b["choices"][0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
    {
        let lps: Vec<f64> = top
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{top}");
    }
    // A completions prompt in Gemma's turn format means its turns (it had
    // been read as plain text: 29 tokens for these 12), and one that starts
    // with <bos> gets no second.
    let turns = "<start_of_turn>user\nSay hi.<end_of_turn>\n<start_of_turn>model\n";
    for (prompt, add_special) in [(turns.to_string(), true), (format!("<bos>{turns}"), false)] {
        let ids = post(
            addr,
            "/tokenize",
            &json!({"content": prompt, "add_special": add_special}),
        )
        .json();
        let n = ids["tokens"].as_array().unwrap().len();
        assert_eq!(ids["tokens"][0], 2, "{ids}");
        assert_eq!(ids["tokens"][1], 105, "{ids}");
        let v = post(
            addr,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 1}),
        )
        .json();
        assert_eq!(v["usage"]["prompt_tokens"], n, "{prompt:?}: {v}");
    }
    // Several prompts in one request (OpenAI's batch form, which had been
    // refused): one choice each, in order, each what it gets alone, with
    // the usage summed.
    let once = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
    )
    .json();
    let both = post(addr, "/v1/completions", &json!({"prompt": ["The capital of France is", "Once upon a time"], "max_tokens": 6, "temperature": 0, "logprobs": 1})).json();
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{both}");
    for (i, alone) in [&a, &once].into_iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        assert_eq!(choices[i]["text"], alone["choices"][0]["text"], "{both}");
        assert_eq!(
            choices[i]["logprobs"]["tokens"].as_array().unwrap().len(),
            6,
            "{both}"
        );
    }
    // A prompt of a batch that does not fit is named by its index.
    let long = vec![9259u32; 600];
    expect_error(
        &post(
            addr,
            "/v1/completions",
            &json!({"prompt": [json!("Hi"), json!(long)], "max_tokens": 1}),
        ),
        400,
        Some("prompt[1]"),
    );
    let sum = |k: &str| a["usage"][k].as_u64().unwrap() + once["usage"][k].as_u64().unwrap();
    assert_eq!(both["usage"]["prompt_tokens"], sum("prompt_tokens"));
    assert_eq!(both["usage"]["completion_tokens"], 12);
    // The openai package's models.retrieve.
    let id = get(addr, "/v1/models").json()["data"][0]["id"].clone();
    let m = get(addr, &format!("/v1/models/{}", id.as_str().unwrap()));
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.json()["id"], id);
    expect_error(&get(addr, "/v1/models/no-such-model"), 404, None);
    // An id that is not UTF-8 once decoded: a JSON error too.
    let v = expect_error(&get(addr, "/v1/models/%00%ff"), 400, None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("model id"),
        "{v}"
    );
    // llama-server's paths without /v1.
    assert_eq!(get(addr, "/models").json()["data"][0]["id"], id);
    let short = post(
        addr,
        "/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    )
    .json();
    assert_eq!(short["choices"][0]["text"], a["choices"][0]["text"]);
    let chat = |path: &str| {
        post(addr, path, &chat_body("Hi", 4, false)).json()["choices"][0]["message"]["content"]
            .clone()
    };
    assert_eq!(chat("/chat/completions"), chat("/v1/chat/completions"));
    server.stop().unwrap();
}

/// A long prompt is read in chunks mixed into the running streams' steps:
/// a stream keeps getting tokens while another request's prompt is read.
#[test]
fn long_prompt_does_not_stall_streams() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let mut cfg = config(model, 2, 2048);
    cfg.prompt_chunk = 128;
    let server = start(cfg);
    let addr = server.addr;

    // Stream A: record when each event arrives.
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true});
    let mut a = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
    let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let reader = {
        let times = times.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut b = [0u8; 8192];
            loop {
                match a.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let k = String::from_utf8_lossy(&b[..n]).matches("data: ").count();
                        let now = Instant::now();
                        let mut t = times.lock().unwrap();
                        t.extend((0..k).map(|_| now));
                        if t.len() >= 40 {
                            return; // enough: hang up
                        }
                    }
                }
            }
        })
    };
    while times.lock().unwrap().len() < 3 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // B: a ~1000-token prompt, 8 chunks of 128 tokens.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(100);
    let t_submit = Instant::now();
    let mut b = json!({"prompt": long, "max_tokens": 1, "temperature": 0, "stream": true});
    b["stream_options"] = json!({"include_usage": true});
    // Headers come once B's first token is there, i.e. after its whole prompt.
    let s = send(addr, "POST", "/v1/completions", &b.to_string(), &[]);
    let mut s2 = s.try_clone().unwrap();
    {
        use std::io::Read;
        let mut first = [0u8; 1];
        s2.read_exact(&mut first).unwrap();
    }
    let t_first = Instant::now();
    let r = read_response(s);
    let usage = r.events().last().unwrap()["usage"].clone();
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 900, "{usage}");
    let during = times
        .lock()
        .unwrap()
        .iter()
        .filter(|&&t| t > t_submit && t < t_first)
        .count();
    eprintln!(
        "B's {prompt_tokens}-token prompt took {:?}; stream A got {during} events meanwhile",
        t_first - t_submit
    );
    assert!(
        during >= 4,
        "stream A got only {during} tokens while B's prompt was read in 128-token chunks"
    );
    reader.join().unwrap();
    server.stop().unwrap();
}

/// Connections that never finish a request are closed: a header sent in part
/// (or not at all) within the header timeout, a body not sent within the body
/// timeout (408). Before, such connections stayed open forever and 20 000 of
/// them made the server unreachable.
#[test]
fn slow_connections_are_closed() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let Some(model) = model_path() else { return };
    let _g = serial();
    let mut cfg = config(model, 1, 256);
    cfg.header_timeout = Duration::from_secs(1);
    cfg.body_timeout = Duration::from_secs(1);
    let server = start(cfg);
    let addr = server.addr;
    // Closed (EOF or reset) well within 10 s, where it had stayed open.
    let closed_within = |mut s: TcpStream, limit: Duration| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert!(t0.elapsed() < limit, "open for {:?}", t0.elapsed());
        String::from_utf8_lossy(&buf).into_owned()
    };
    let mut partial = TcpStream::connect(addr).unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    closed_within(partial, Duration::from_secs(5));
    closed_within(TcpStream::connect(addr).unwrap(), Duration::from_secs(5));

    let mut slow_body = TcpStream::connect(addr).unwrap();
    slow_body
        .write_all(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"content\"",
        )
        .unwrap();
    let reply = closed_within(slow_body, Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");

    // Still serving.
    assert_eq!(get(addr, "/health").status, 200);
}

/// `logit_bias` changes the choice (it had been ignored), ids past the
/// vocabulary are refused; the key's scheme is case-insensitive and guards
/// /tokenize too.
#[test]
fn logit_bias_and_keys() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let mut cfg = config(model, 1, 256);
    // An empty key had meant no authentication; one with spaces around it
    // could never match.
    for bad in ["", " sekret"] {
        cfg.api_key = Some(bad.into());
        let e = gemma3_server::RunningServer::start(cfg.clone())
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("--api-key"), "{e:#}");
    }
    cfg.api_key = Some("sekret".into());
    cfg.queue = 2;
    let server = start(cfg);
    let addr = server.addr;
    let auth = [("Authorization", "bearer sekret")];
    let tokenize = |headers: &[(&str, &str)]| {
        request(
            addr,
            "POST",
            "/tokenize",
            r#"{"content": " Paris"}"#,
            headers,
        )
    };
    expect_error(&tokenize(&[]), 401, None);
    expect_error(&tokenize(&[("X-Api-Key", "wrong")]), 401, None);
    // llama-server's other header for the key.
    let r = tokenize(&[("X-Api-Key", "sekret")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = tokenize(&auth);
    assert_eq!(r.status, 200, "{}", r.text());
    // A browser's preflight, then its request (it had been a 405, and no
    // response allowed another origin to read it).
    let origin = ("Origin", "http://localhost:3000");
    let pre = request(
        addr,
        "OPTIONS",
        "/v1/chat/completions",
        "",
        &[
            origin,
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type, x-stainless-os",
            ),
        ],
    );
    assert_eq!(pre.status, 204, "{}", pre.text());
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    let allowed = pre
        .header("access-control-allow-headers")
        .unwrap_or_default();
    assert!(
        allowed.contains("authorization") && allowed.contains("x-stainless-os"),
        "{allowed}"
    );
    assert!(pre
        .header("access-control-allow-methods")
        .unwrap_or_default()
        .contains("POST"));
    let r = tokenize(&[auth[0], origin]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    // Without an Origin (not a browser), no CORS headers.
    assert_eq!(tokenize(&auth).header("access-control-allow-origin"), None);
    let paris = r.json()["tokens"][0].as_u64().unwrap();
    let complete = |extra: Value| {
        let mut b =
            json!({"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        request(addr, "POST", "/v1/completions", &b.to_string(), &auth)
    };
    let plain = complete(json!({})).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!plain.starts_with(" Paris"), "{plain:?}");
    let forced = complete(json!({"logit_bias": {paris.to_string(): 100}}));
    assert_eq!(forced.status, 200, "{}", forced.text());
    let text = forced.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text, " Paris Paris", "bias +100 on ' Paris'");
    let r = complete(json!({"logit_bias": {"262144": 1}}));
    expect_error(&r, 400, Some("logit_bias"));
    // A batch of prompts larger than the server ever holds at once (1 slot + a
    // queue of 2) is the caller's error, not a 429 to retry.
    let r = complete(json!({"prompt": ["a", "b", "c", "d"]}));
    let e = expect_error(&r, 400, Some("prompt"));
    assert!(e.to_string().contains("--queue"), "{e}");
    let r = complete(json!({"prompt": ["a", "b", "c"]}));
    assert_eq!(
        r.json()["choices"].as_array().map(Vec::len),
        Some(3),
        "{}",
        r.text()
    );
    // A batch is admitted whole or not at all. With one stream running, 3
    // prompts do not fit the 2 places left: a 429, and no place taken, so
    // 2 prompts sent right after do fit. (Taken one at a time, the refused
    // batch's first two had held their places until the scheduler's next
    // step, refusing the second batch too.)
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": true});
    let mut s = send(addr, "POST", "/v1/completions", &body.to_string(), &auth);
    {
        use std::io::Read;
        let mut b = [0u8; 256];
        assert!(s.read(&mut b).unwrap() > 0);
    }
    let e = expect_error(&complete(json!({"prompt": ["a", "b", "c"]})), 429, None);
    // The message states the load as it was: 1 in, 3 asked for, limit 3.
    let m = e["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("1 running or waiting plus 3 asked for is over the limit of 3"),
        "{m}"
    );
    let r = complete(json!({"prompt": ["a", "b"]}));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);
}

/// `POST /v1/embeddings`: one unit-length vector per
/// input, in order, pointing where llama.cpp's mean-pooled one does (cosine
/// ≥ 0.995; two different texts are at most 0.76 apart there); more inputs
/// than `--parallel` run in waves; token ids give their text's vector; base64
/// carries the same floats; bad inputs get a 400 naming the field.
#[test]
fn embeddings_match_llama_cpp() {
    use base64::Engine as _;
    let Some(model) = model_path() else { return };
    let _g = serial();
    // Two places and no queue: five inputs run in waves.
    let mut cfg = config(model, 2, 1024);
    cfg.queue = 0;
    let server = start(cfg);
    let addr = server.addr;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../cli/tests/data/embeddings.json"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let texts = r["texts"].as_array().unwrap();
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let norm = |a: &[f64]| a.iter().map(|x| x * x).sum::<f64>().sqrt();

    let resp = post(
        addr,
        "/v1/embeddings",
        &json!({"input": texts, "model": "any"}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(
        data.len(),
        texts.len(),
        "one vector per input, past --parallel 2"
    );
    let tokens: u64 = (r["token_ids"].as_array().unwrap().iter())
        .map(|t| t.as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(v["usage"]["prompt_tokens"], tokens, "{}", v["usage"]);
    assert_eq!(v["usage"]["total_tokens"], tokens);
    let mut vectors = Vec::new();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let ours = floats(&d["embedding"]);
        assert_eq!(ours.len(), 640);
        assert!(
            (norm(&ours) - 1.0).abs() < 1e-5,
            "input {i}: length {}",
            norm(&ours)
        );
        let llama = floats(&r["llama_cpp"]["mean"][i]);
        let cos = ours.iter().zip(&llama).map(|(a, b)| a * b).sum::<f64>() / norm(&llama);
        assert!(cos >= 0.995, "input {i}: cosine {cos} to llama.cpp's");
        vectors.push(ours);
    }

    // Token ids and base64: the same vector.
    let ids = &r["token_ids"][2];
    let v = post(
        addr,
        "/v1/embeddings",
        &json!({"input": ids, "encoding_format": "base64"}),
    )
    .json();
    let b64 = v["data"][0]["embedding"].as_str().expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // (The JSON numbers are the f32s' shortest forms: read back as f32, exact.)
    let text_floats: Vec<f32> = vectors[2].iter().map(|&x| x as f32).collect();
    assert!(
        decoded == text_floats,
        "token ids in base64 differ from the text's floats"
    );

    // With one of the two places taken by a stream, the waves take one
    // place at a time (a wave of two had been refused with a 429).
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stream": true});
    let mut stream = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
    {
        use std::io::Read;
        let mut b = [0u8; 256];
        assert!(stream.read(&mut b).unwrap() > 0);
    }
    let r = post(addr, "/v1/embeddings", &json!({"input": texts}));
    assert_eq!(r.status, 200, "{}", r.text());
    let again: Vec<Vec<f64>> = (r.json()["data"].as_array().unwrap().iter())
        .map(|d| floats(&d["embedding"]))
        .collect();
    assert_eq!(again, vectors, "the same vectors beside a stream");
    drop(stream);

    let too_long: Vec<u32> = vec![2; 1025];
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": ["a", ""]}), "input[1]"),
        (json!({"input": [["x"]]}), "input[0]"),
        (json!({"input": {"text": "a"}}), "input"),
        (json!({"input": [2, 300000]}), "input"),
        (json!({"input": [1.5, 2]}), "input"),
        (json!({"input": [2, "hello"]}), "input"),
        (json!({"input": too_long}), "input"),
        (
            json!({"input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": "a", "dimensions": 64}), "dimensions"),
    ] {
        let e = expect_error(&post(addr, "/v1/embeddings", &body), 400, Some(param));
        if param == "input" && body["input"].as_array().is_some_and(|a| a.len() > 1024) {
            assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
        }
        // A bad element of a token array is named (it had been "'input' must
        // be a string or an array of token ids, got a number").
        if body["input"] == json!([1.5, 2]) || body["input"] == json!([2, "hello"]) {
            let m = e["error"]["message"].as_str().unwrap();
            assert!(m.contains("must be a token id"), "{m}");
            assert!(m.contains("'input[0]'") || m.contains("'input[1]'"), "{m}");
        }
    }
    assert_eq!(get(addr, "/health").status, 200);
}

/// Grammars and schemas through every field that carries one: llama.cpp's
/// text for a GBNF label (tests/data/grammar.json of gemma3-cli, case
/// "sentiment label"), JSON that a schema accepts, the same replies batched
/// as alone and streamed as not; bad grammars are 400s naming their field.
#[test]
fn grammars_constrain_replies() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 4, 512));
    let addr = server.addr;

    let label = json!({
        "prompt": "Review: The food was cold and the waiter was rude.\nSentiment (positive or negative):",
        "grammar": "root ::= \" positive\" | \" negative\"",
        "temperature": 0,
        "max_tokens": 8,
    });
    let r = post(addr, "/v1/completions", &label);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], " negative", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    // A batch shares one compiled grammar; each prompt gets a label.
    let mut batch = label.clone();
    batch["prompt"] = json!([
        label["prompt"],
        "Review: Lovely staff, great pasta.\nSentiment (positive or negative):"
    ]);
    let r = post(addr, "/v1/completions", &batch);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], " negative", "{v}");
    assert!(
        ["positive", "negative"].contains(&v["choices"][1]["text"].as_str().unwrap().trim()),
        "{v}"
    );

    let schema = json!({
        "type": "object",
        "properties": {"intent": {"enum": ["balance", "transfer", "card_lost"]}},
        "required": ["intent"],
        "additionalProperties": false
    });
    let chat = |format: Value, stream: bool| {
        json!({
            "messages": [{"role": "user", "content": "Classify the banking intent: I can't find my credit card anywhere."}],
            "temperature": 0,
            "max_tokens": 40,
            "stream": stream,
            "response_format": format,
        })
    };
    let strict = json!({"type": "json_schema", "json_schema": {"name": "intent", "strict": true, "schema": schema}});
    let r = post(addr, "/v1/chat/completions", &chat(strict.clone(), false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let reply: Value =
        serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content:?}"));
    let intent = reply["intent"].as_str().unwrap_or_default();
    assert!(
        ["balance", "transfer", "card_lost"].contains(&intent),
        "{reply}"
    );
    assert_eq!(reply.as_object().unwrap().len(), 1, "{reply}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    // Streamed, and batched beside an unconstrained request and a JSON
    // object one: the same text.
    let object = json!({"type": "json_object"});
    let (streamed, plain, obj) = std::thread::scope(|s| {
        let a = s.spawn(|| post(addr, "/v1/chat/completions", &chat(strict.clone(), true)));
        let b = s.spawn(|| {
            post(
                addr,
                "/v1/completions",
                &json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 24}),
            )
        });
        let c = s.spawn(|| post(addr, "/v1/chat/completions", &chat(object.clone(), false)));
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    let (text, finish) = chat_stream_text(&streamed.events());
    assert_eq!(text, content);
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(obj.status, 200, "{}", obj.text());
    let content = obj.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.trim_start().starts_with('{'), "{content:?}");
    if obj.json()["choices"][0]["finish_reason"] == "stop" {
        let v: Value =
            serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content:?}"));
        assert!(v.is_object(), "{v}");
    }

    // Bad grammars and schemas: 400s naming the field; the server goes on.
    let mut bad = label.clone();
    bad["grammar"] = json!("root ::= item");
    let e = expect_error(&post(addr, "/v1/completions", &bad), 400, Some("grammar"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'item' is used but never defined"),
        "{e}"
    );
    let unsat = json!({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}});
    let e = expect_error(
        &post(addr, "/v1/chat/completions", &chat(unsat, false)),
        400,
        Some("response_format"),
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("minimum"),
        "{e}"
    );
    let mut both = label.clone();
    both["response_format"] = json!({"type": "json_object"});
    expect_error(&post(addr, "/v1/completions", &both), 400, None);
    // (As llama-server: a grammar wins over a json_schema beside it.)
    both["response_format"] = Value::Null;
    both["json_schema"] = schema.clone();
    let r = post(addr, "/v1/completions", &both);
    assert_eq!(r.json()["choices"][0]["text"], " negative", "{}", r.text());
    let r = post(addr, "/v1/completions", &label);
    assert_eq!(r.json()["choices"][0]["text"], " negative");
    server.stop().unwrap();
}

/// Stream events per choice: each index's text (chat deltas or completion
/// text, in order), and its finish reasons.
fn stream_choices(events: &[Value], key: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for e in events {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, Default::default());
            }
            let t = if key == "delta" {
                &c["delta"]["content"]
            } else {
                &c["text"]
            };
            if let Some(t) = t.as_str() {
                out[i].0.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                out[i].1.push(f.to_string());
            }
        }
    }
    out
}

/// `n` choices: choice j is the reply `n = 1` gives with seed + j, the
/// prompt's tokens count once in the usage, streams interleave the choices
/// by index, and a batch of prompts orders prompt i's choices at i·n + j.
#[test]
fn n_choices() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 4, 512));
    let addr = server.addr;
    let chat = |n: usize, seed: u64, stream: bool| {
        let mut b = json!({
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n, "stream": stream,
        });
        if stream {
            b["stream_options"] = json!({"include_usage": true});
        }
        let r = post(addr, "/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        r
    };
    let singles: Vec<Value> = (0..3).map(|j| chat(1, 11 + j, false).json()).collect();
    let text = |v: &Value, i: usize| {
        v["choices"][i]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let three = chat(3, 11, false).json();
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{three}");
    for (j, single) in singles.iter().enumerate() {
        assert_eq!(choices[j]["index"], j, "{three}");
        assert_eq!(text(&three, j), text(single, 0), "choice {j}: {three}");
        assert_eq!(
            choices[j]["finish_reason"],
            single["choices"][0]["finish_reason"]
        );
    }
    assert!(
        (0..3).any(|j| text(&three, j) != text(&three, 0)),
        "three seeds gave one reply: {three}"
    );
    let count = |v: &Value, k: &str| v["usage"][k].as_u64().unwrap();
    assert_eq!(
        count(&three, "prompt_tokens"),
        count(&singles[0], "prompt_tokens")
    );
    let generated: u64 = singles.iter().map(|s| count(s, "completion_tokens")).sum();
    assert_eq!(count(&three, "completion_tokens"), generated);

    // Streamed: the same choices, each opened with its role, ended once,
    // then one usage chunk for all.
    let events = chat(3, 11, true).events();
    let per = stream_choices(&events, "delta");
    assert_eq!(per.len(), 3);
    for (j, (t, finish)) in per.iter().enumerate() {
        assert_eq!(*t, text(&three, j), "streamed choice {j}");
        assert_eq!(finish.len(), 1, "choice {j} ended {finish:?}");
        let roles = (events.iter())
            .filter(|e| {
                e["choices"][0]["index"] == j && e["choices"][0]["delta"]["role"] == "assistant"
            })
            .count();
        assert_eq!(roles, 1, "choice {j}'s role chunks");
    }
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"], three["usage"], "{last}");

    // The copies of a long prompt read it once: the first choice reads it,
    // the others wait for that and copy its cache.
    let long = format!(
        "{} Which sentence came first?",
        "The quick brown fox jumps over the lazy dog.".repeat(8)
    );
    let (cached, read) = (
        metric(addr, "gemma3_prompt_tokens_cached_total"),
        metric(addr, "gemma3_prompt_tokens_total"),
    );
    let b = json!({"messages": [{"role": "user", "content": long}], "max_tokens": 4, "n": 4, "seed": 1});
    let r = post(addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 200, "{}", r.text());
    let p = count(&r.json(), "prompt_tokens") as f64;
    assert!(p > 64.0, "{p}");
    assert_eq!(metric(addr, "gemma3_prompt_tokens_total") - read, 4.0 * p);
    assert_eq!(
        metric(addr, "gemma3_prompt_tokens_cached_total") - cached,
        3.0 * (p - 1.0),
        "the copies did not take the first choice's prompt"
    );

    // Completions: two prompts × two choices, streamed and not, with echo.
    let prompts = ["The sky is", "My favourite food is"];
    let cmpl = |prompt: Value, n: usize, seed: u64, stream: bool| {
        let b = json!({"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed,
            "n": n, "echo": true, "stream": stream});
        let r = post(addr, "/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        r
    };
    let batch = cmpl(json!(prompts), 2, 5, false).json();
    let choices = batch["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{batch}");
    let streamed = stream_choices(&cmpl(json!(prompts), 2, 5, true).events(), "text");
    assert_eq!(streamed.len(), 4);
    for (k, c) in choices.iter().enumerate() {
        let (i, j) = (k / 2, k % 2);
        let single = cmpl(json!(prompts[i]), 1, 5 + j as u64, false).json();
        assert_eq!(c["index"], k);
        assert_eq!(
            c["text"], single["choices"][0]["text"],
            "choice {k}: {batch}"
        );
        assert!(c["text"].as_str().unwrap().starts_with(prompts[i]), "{c}");
        assert_eq!(
            streamed[k].0,
            c["text"].as_str().unwrap(),
            "streamed choice {k}"
        );
        assert_eq!(streamed[k].1.len(), 1);
    }

    // best_of is n's when equal, refused otherwise.
    let mut b = json!({"prompt": "Hi", "max_tokens": 2, "n": 2, "best_of": 2});
    assert_eq!(post(addr, "/v1/completions", &b).status, 200);
    for other in [1, 3] {
        b["best_of"] = json!(other);
        expect_error(&post(addr, "/v1/completions", &b), 400, Some("best_of"));
    }
}

/// Ollama's routes: newline-delimited JSON streamed by default, whose text
/// is the unstreamed reply's and the OpenAI route's for the same request;
/// the last object's counts; a request without messages only "loads"; and
/// errors as `{"error": "..."}` naming the field as Ollama spells it.
#[test]
fn ollama_routes() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 2, 512));
    let addr = server.addr;
    let messages = json!([{"role": "user", "content": "Name three colours."}]);
    let body = json!({"model": "gemma3:270m", "messages": messages,
        "options": {"temperature": 0, "num_predict": 16, "num_ctx": 8192}});
    let r = post(addr, "/api/chat", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = (r.text().lines())
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (last, parts) = lines.split_last().unwrap();
    assert!(parts
        .iter()
        .all(|p| p["done"] == false && p["model"] == "gemma3:270m"));
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["done_reason"], "length", "{last}");
    assert_eq!(last["eval_count"], 16, "{last}");
    let streamed: String = (parts.iter())
        .map(|p| p["message"]["content"].as_str().unwrap())
        .collect();
    let mut once = body.clone();
    once["stream"] = json!(false);
    let whole = post(addr, "/api/chat", &once).json();
    assert_eq!(whole["message"]["content"], streamed.as_str(), "{whole}");
    assert_eq!(whole["prompt_eval_count"], last["prompt_eval_count"]);
    let openai = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_tokens": 16}),
    )
    .json();
    assert_eq!(
        openai["choices"][0]["message"]["content"],
        streamed.as_str()
    );

    let loaded = post(addr, "/api/chat", &json!({"model": "m", "messages": []})).json();
    assert_eq!(loaded["done_reason"], "load", "{loaded}");

    let error = |path: &str, body: &str, field: &str| {
        let r = request(addr, "POST", path, body, &[]);
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["error"].as_str().map(str::to_string);
        let msg = msg.unwrap_or_else(|| panic!("not Ollama's error shape: {}", r.text()));
        assert!(msg.contains(field), "{field}: {msg}");
    };
    let chat = |extra: Value| {
        let mut b = json!({"messages": messages});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    error("/api/chat", "{bad", "not valid JSON");
    error(
        "/api/chat",
        &chat(json!({"options": {"temperature": -1}})),
        "options.temperature",
    );
    error(
        "/api/chat",
        &chat(json!({"options": {"num_predict": "many"}})),
        "options.num_predict",
    );
    error(
        "/api/chat",
        &chat(json!({"format": {"type": "foo"}})),
        "format",
    );
    error(
        "/api/chat",
        &chat(json!({"messages": [{"role": "user", "content": 1}]})),
        "messages[0].content",
    );
    error("/api/chat", &chat(json!({"think": 1})), "think");
    error("/api/chat", &chat(json!({"logprobs": true})), "logprobs");
    error(
        "/api/chat",
        &chat(json!({"options": {"mirostat": 2}})),
        "options.mirostat",
    );
    error("/api/chat", &chat(json!({"format": "xml"})), "format");
    error("/api/chat", &chat(json!({"think": true})), "think");
    error(
        "/api/generate",
        &json!({"prompt": "x", "suffix": "y"}).to_string(),
        "suffix",
    );
    error(
        "/api/embed",
        &json!({"input": ["a", ""]}).to_string(),
        "input[1]",
    );
    error(
        "/api/embeddings",
        &json!({"prompt": ["a"]}).to_string(),
        "prompt",
    );
    let long = "word ".repeat(600);
    error(
        "/api/embed",
        &json!({"input": long, "truncate": false}).to_string(),
        "truncate",
    );
    // Truncated (Ollama's default), the long input embeds.
    let r = post(addr, "/api/embed", &json!({"input": long}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["prompt_eval_count"], 512);
    // Nothing to embed (how clients load a model) is no vectors.
    let r = post(addr, "/api/embed", &json!({"input": ""}));
    assert_eq!(r.json()["embeddings"], json!([]), "{}", r.text());
    // The older route: one vector, not scaled to unit length.
    let v = post(addr, "/api/embeddings", &json!({"prompt": "hello"})).json();
    let v: Vec<f64> = (v["embedding"].as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 640);
    assert!((v.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() > 0.01);

    // Unknown options are left out, as Ollama leaves them; resource ones too.
    let mut b = once.clone();
    b["options"] = json!({"temperature": 0, "num_predict": 16, "bogus": 1, "num_thread": 64});
    assert_eq!(
        post(addr, "/api/chat", &b).json()["message"],
        whole["message"]
    );
    // num_predict beyond the context stops at its end, as in Ollama.
    b["options"] = json!({"temperature": 0, "num_predict": 100000});
    let r = post(addr, "/api/chat", &b).json();
    let (p, e) = (r["prompt_eval_count"].as_u64(), r["eval_count"].as_u64());
    assert_eq!(p.unwrap() + e.unwrap(), 512, "{r}");
    assert_eq!(r["done_reason"], "length", "{r}");

    // Ollama's template for Gemma 3, written out by hand from the one its
    // library publishes: each message a turn of its own (a system message a
    // user turn), a last assistant message continued. The same text given
    // raw to /v1/completions (which adds BOS) must give the same reply.
    let raw = |prompt: &str| {
        let b = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
        post(addr, "/v1/completions", &b).json()["choices"][0]["text"].clone()
    };
    let g = json!({"system": "Answer in French.", "prompt": "Name a colour.", "stream": false,
        "options": {"temperature": 0, "num_predict": 12}});
    let r = post(addr, "/api/generate", &g).json();
    assert_eq!(
        r["response"],
        raw("<start_of_turn>user\nAnswer in French.<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"),
        "{r}"
    );
    let c = json!({"messages": [{"role": "user", "content": "Name a colour."},
        {"role": "user", "content": "A warm one."}, {"role": "assistant", "content": "The colour is"}],
        "stream": false, "options": {"temperature": 0, "num_predict": 12}});
    let r = post(addr, "/api/chat", &c).json();
    assert_eq!(
        r["message"]["content"],
        raw("<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>user\nA warm one.<end_of_turn>\n<start_of_turn>model\nThe colour is"),
        "{r}"
    );

    // The listings, and Ollama's error shape on routes it does not serve.
    let tags = get(addr, "/api/tags").json();
    assert_eq!(
        tags["models"][0]["details"]["quantization_level"], "Q4_K_M",
        "{tags}"
    );
    assert_eq!(
        get(addr, "/api/ps").json()["models"][0]["context_length"],
        512
    );
    assert_eq!(post(addr, "/api/show", &json!({"model": "x"})).status, 200);
    assert!(get(addr, "/api/version").json()["version"].is_string());
    let r = post(addr, "/api/pull", &json!({"model": "llama3"}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string(), "{}", r.text());
    assert_eq!(get(addr, "/").status, 200);
}

/// `--chat-template-file`: a fine-tune's Jinja template renders the chat
/// (both APIs), as Python's jinja2 renders it (the engine's golden text):
/// the reply is the one to that text's tokens given as a raw prompt.
#[test]
fn chat_template_file_renders_chats() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data");
    let mut cfg = config(model, 2, 512);
    cfg.chat_template_file = Some(data.join("chatml_chat_template.jinja"));
    let server = start(cfg);
    let addr = server.addr;
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("chat_templates.json")).unwrap())
            .unwrap();
    let case = (golden["cases"].as_array().unwrap().iter())
        .find(|c| {
            c["template"] == "chatml_chat_template.jinja"
                && c["label"] == "three turns"
                && c["add_generation_prompt"] == true
        })
        .unwrap();
    let ids = post(
        addr,
        "/tokenize",
        &json!({"content": case["text"], "add_special": false, "parse_special": true}),
    )
    .json()["tokens"]
        .clone();
    let want = post(
        addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
    )
    .json();
    let chat = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": case["messages"], "max_tokens": 8, "temperature": 0}),
    )
    .json();
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        ids.as_array().unwrap().len(),
        "{chat}"
    );
    assert_eq!(
        chat["choices"][0]["message"]["content"], want["choices"][0]["text"],
        "{chat}"
    );
    let ollama = post(
        addr,
        "/api/chat",
        &json!({"messages": case["messages"], "stream": false,
            "options": {"num_predict": 8, "temperature": 0}}),
    )
    .json();
    assert_eq!(
        ollama["message"]["content"], want["choices"][0]["text"],
        "{ollama}"
    );
    drop(server);

    // A conversation the template refuses (its raise_exception) is a 400
    // naming messages, on both APIs.
    let strict = std::env::temp_dir().join(format!("gemma3-strict-{}.jinja", std::process::id()));
    std::fs::write(
        &strict,
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}<bos>{{ messages[0].content }}",
    )
    .unwrap();
    let mut cfg = config(model_path().unwrap(), 2, 512);
    cfg.chat_template_file = Some(strict.clone());
    let server = start(cfg);
    let two = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let v = expect_error(
        &post(
            server.addr,
            "/v1/chat/completions",
            &json!({"messages": two}),
        ),
        400,
        Some("messages"),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("one message only"),
        "{v}"
    );
    let r = post(
        server.addr,
        "/api/chat",
        &json!({"messages": two, "stream": false}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let one = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2});
    assert_eq!(post(server.addr, "/v1/chat/completions", &one).status, 200);
    std::fs::remove_file(&strict).ok();
}

/// `echo` with `logprobs` scores the prompt (as OpenAI's completions did,
/// and as lm-evaluation-harness asks a server to): each prompt token's
/// log-probability given those before it, against llama.cpp's
/// (`tests/data/prompt_logprobs.json`, `scripts/llama_cpp_prompt_logprobs.py`).
/// Both round activations to 8 bits per block, so they differ by a little:
/// on these prompts a mean of 0.02–0.15 a token and at most 0.47 (measured
/// when the reference was made); a position off by one, or a missing
/// normalization, is off by nats. Where llama.cpp's best token leads its
/// second by more than 0.5, ours is the same.
#[test]
fn prompt_logprobs_match_llama_cpp() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 2, 512));
    let addr = server.addr;
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/prompt_logprobs.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(data).unwrap()).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let ids = &case["ids"];
        let r = post(
            addr,
            "/v1/completions",
            &json!({"prompt": ids, "echo": true, "logprobs": 5, "max_tokens": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let c = &v["choices"][0];
        let lp = &c["logprobs"];
        let n = ids.as_array().unwrap().len();
        assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{v}");
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 0);
        let positions = case["positions"].as_array().unwrap();
        let mut diffs = Vec::new();
        for (i, p) in positions.iter().enumerate() {
            let ours = lp["token_logprobs"][i + 1].as_f64().unwrap();
            let theirs = p["logprob"].as_f64().unwrap();
            diffs.push((ours - theirs).abs());
            let top = &p["top"];
            if top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap() > 0.5 {
                let (best, _) = (lp["top_logprobs"][i + 1].as_object().unwrap().iter())
                    .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
                    .unwrap();
                let id = top[0][0].as_u64().unwrap();
                let want =
                    post(addr, "/detokenize", &json!({"tokens": [id]})).json()["content"].clone();
                assert_eq!(
                    best,
                    want.as_str().unwrap(),
                    "{}: position {}",
                    case["text"],
                    i + 1
                );
            }
        }
        // Each token's text starts at its offset in the echoed text (special
        // tokens written out; a byte of a longer character at that character).
        let text: Vec<char> = c["text"].as_str().unwrap().chars().collect();
        for (t, o) in
            (lp["tokens"].as_array().unwrap().iter()).zip(lp["text_offset"].as_array().unwrap())
        {
            let (t, o) = (t.as_str().unwrap(), o.as_u64().unwrap() as usize);
            assert!(
                o <= text.len(),
                "{}: offset {o} past the text",
                case["text"]
            );
            if t != "<bos>" && !t.starts_with("bytes:") {
                let at: String = text[o..].iter().collect();
                assert!(
                    at.starts_with(t),
                    "{}: {t:?} is not at {o} of {at:?}",
                    case["text"]
                );
            }
        }
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        assert!(
            mean < 0.2 && max < 0.7,
            "{}: mean {mean:.3}, max {max:.3}",
            case["text"]
        );
    }
    // A text prompt is the same tokens (BOS first), scored alike; and with
    // one token generated its log-probability follows the prompt's.
    let case = &reference["cases"][0];
    let by_ids = post(
        addr,
        "/v1/completions",
        &json!({"prompt": case["ids"], "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0}),
    )
    .json();
    let by_text = post(
        addr,
        "/v1/completions",
        &json!({"prompt": case["text"], "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0}),
    )
    .json();
    assert_eq!(
        by_ids["choices"][0]["logprobs"],
        by_text["choices"][0]["logprobs"]
    );
    let lp = &by_text["choices"][0]["logprobs"];
    let n = case["ids"].as_array().unwrap().len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n + 1);
    assert!(lp["token_logprobs"][n].as_f64().unwrap() <= 0.0);
    assert!(by_text["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(case["text"].as_str().unwrap()));
    // Offsets count the echoed text's characters (<bos> has none).
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["text_offset"][1], 0);
    assert_eq!(lp["text_offset"][2], 3, "{lp}"); // "The"
                                                 // Not streamed; and without echo, max_tokens 0 is still refused.
    expect_error(
        &post(
            addr,
            "/v1/completions",
            &json!({"prompt": "x", "echo": true, "logprobs": 1, "stream": true}),
        ),
        400,
        Some("stream"),
    );
    expect_error(
        &post(
            addr,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 0}),
        ),
        400,
        Some("max_tokens"),
    );
    // A prompt scored and nothing generated may fill the context (512).
    let full: Vec<u32> = std::iter::once(2)
        .chain(std::iter::repeat_n(236764, 511))
        .collect();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": full, "echo": true, "logprobs": 0, "max_tokens": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 512);
    // Tokens that are a byte of a longer character are written as OpenAI
    // writes them, so their alternatives do not fall on one key.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "𓀀𓀁", "echo": true, "logprobs": 5, "max_tokens": 0}),
    )
    .json();
    let lp = &r["choices"][0]["logprobs"];
    assert!(
        lp["tokens"][1].as_str().unwrap().starts_with("bytes:\\x"),
        "{lp}"
    );
    for top in lp["top_logprobs"].as_array().unwrap().iter().skip(1) {
        assert_eq!(top.as_object().unwrap().len(), 5, "{lp}");
    }
}

/// The LoRA test data (`cli/tests/data/lora`): the adapters' directory and llama.cpp's
/// reference with them.
fn lora_data() -> (std::path::PathBuf, Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/data/lora");
    let text = std::fs::read_to_string(dir.join("llama_cpp_lora.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

/// The adapters `name.gguf` of `dir` at their scales.
fn lora_specs<const N: usize>(
    dir: &std::path::Path,
    adapters: [(&str, f32); N],
) -> Vec<gemma3_engine::LoraSpec> {
    (adapters.iter())
        .map(|(name, scale)| gemma3_engine::LoraSpec {
            path: dir.join(format!("{name}.gguf")),
            scale: *scale,
        })
        .collect()
}

/// llama.cpp's greedy case under `adapters` for the prompt starting with `prompt`, its steps
/// up to the first it takes with a lead under 0.1, and their text (the server's detokenizing).
fn lora_greedy(
    addr: std::net::SocketAddr,
    reference: &Value,
    adapters: Value,
    prompt: &str,
) -> (Value, usize, Value) {
    let case = (reference["cases"].as_array().unwrap().iter())
        .find(|c| c["adapters"] == adapters && c["prompt"].as_str().unwrap().starts_with(prompt))
        .unwrap();
    let margins = case["greedy_margins"].as_array().unwrap();
    let steps = (margins.iter())
        .position(|m| m.as_f64().unwrap() < 0.1)
        .unwrap_or(margins.len());
    let tokens = &case["greedy"].as_array().unwrap()[..steps];
    let text = post(addr, "/detokenize", &json!({"tokens": tokens})).json()["content"].clone();
    (case.clone(), steps, text)
}

/// Control vectors on a server: started with vector a (`cli/tests/data/control`, strength 1,
/// every layer), as llama-server takes `--control-vector`, it answers every request with
/// llama.cpp's greedy tokens under that vector (up to the first step llama.cpp takes with a lead
/// under 0.2, as `cli/tests/control.rs` reads them: random vectors make near ties common), three
/// prompts at once in one batch; without the vector some reply differs, so the vector is what
/// the test sees.
#[test]
fn control_vectors_steer_every_request() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/data/control");
    let text = std::fs::read_to_string(dir.join("llama_cpp_control.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<&Value> = (reference["cases"].as_array().unwrap().iter())
        .filter(|c| c["vectors"] == json!([["a", 1.0]]))
        .collect();
    assert_eq!(cases.len(), 3);
    let mut cfg = config(model.clone(), 4, 512);
    cfg.control = gemma3_engine::ControlSpec {
        files: vec![(dir.join("a.gguf"), 1.0)],
        layers: None,
    };
    let server = start(cfg);
    let addr = server.addr;
    let steps_of = |case: &Value| {
        let margins = case["greedy_margins"].as_array().unwrap();
        (margins.iter())
            .position(|m| m.as_f64().unwrap() < 0.2)
            .unwrap_or(margins.len())
    };
    let expected: Vec<(Value, usize, Value)> = (cases.iter())
        .map(|case| {
            let steps = steps_of(case);
            let tokens = &case["greedy"].as_array().unwrap()[..steps];
            let text =
                post(addr, "/detokenize", &json!({"tokens": tokens})).json()["content"].clone();
            (case["ids"].clone(), steps, text)
        })
        .collect();
    // (4, 3 and 1 clear steps: the chat prompt's second token is a near tie.)
    assert!(
        expected.iter().all(|(_, steps, _)| *steps >= 1),
        "{expected:?}"
    );
    let replies: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (expected.iter())
            .map(|(ids, steps, _)| {
                s.spawn(move || {
                    let body = json!({"prompt": ids, "max_tokens": steps, "temperature": 0});
                    post(addr, "/v1/completions", &body).json()["choices"][0]["text"].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((_, _, want), got) in expected.iter().zip(&replies) {
        assert_eq!(got, want);
    }
    drop(server);
    // Without the vector some reply is another text.
    let server = start(config(model, 1, 512));
    let changed = (expected.iter()).filter(|(ids, steps, want)| {
        let body = json!({"prompt": ids, "max_tokens": steps, "temperature": 0});
        let base = post(server.addr, "/v1/completions", &body).json()["choices"][0]["text"].clone();
        &base != want
    });
    assert!(changed.count() >= 1, "the vector changes no reply");
}

/// Adapters per request: a server holding adapters a (at 1) and b (at 0, loaded unapplied)
/// answers each request at the scales its `lora` asks for (an adapter left out at 0, as
/// llama-server reads the list), several at once in one batch, with llama.cpp's greedy tokens
/// under the same adapters (`cli/tests/data/lora`, up to the first step llama.cpp takes with a
/// lead under 0.1); `GET /lora-adapters` lists them and `POST /lora-adapters` sets the scales
/// of requests without their own, as llama-server's do.
#[test]
fn lora_adapters_apply_per_request() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let (dir, reference) = lora_data();
    let mut cfg = config(model, 4, 512);
    cfg.loras = lora_specs(&dir, [("a", 1.0), ("b", 0.0)]);
    let server = start(cfg);
    let addr = server.addr;
    let list = get(addr, "/lora-adapters").json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(
        (list[0]["scale"].clone(), list[1]["scale"].clone()),
        (json!(1.0), json!(0.0))
    );
    assert!(
        list[1]["path"].as_str().unwrap().ends_with("b.gguf"),
        "{list}"
    );
    let expected = |adapters: Value, prompt: &str| {
        let (case, steps, text) = lora_greedy(addr, &reference, adapters, prompt);
        (case["ids"].clone(), steps, text)
    };
    let requests = [
        (json!([["a", 1.0]]), "The capital", Value::Null),
        (json!([]), "Review", json!([])),
        (
            json!([["b", 1.0]]),
            "The capital",
            json!([{"id": 1, "scale": 1.0}]),
        ),
        (
            json!([["a", 0.5], ["b", 1.5]]),
            "Review",
            json!([{"id": 0, "scale": 0.5}, {"id": 1, "scale": 1.5}]),
        ),
    ];
    let jobs: Vec<(Value, usize, Value, Value)> = (requests.iter())
        .map(|(adapters, prompt, lora)| {
            let (ids, steps, text) = expected(adapters.clone(), prompt);
            (ids, steps, text, lora.clone())
        })
        .collect();
    // All four at once: their tokens share each step's batch.
    let handles: Vec<_> = (jobs.iter().cloned())
        .map(|(ids, steps, _, lora)| {
            std::thread::spawn(move || {
                let body =
                    json!({"prompt": ids, "max_tokens": steps, "temperature": 0, "lora": lora});
                post(addr, "/v1/completions", &body)
            })
        })
        .collect();
    for (h, ((adapters, prompt, _), (_, steps, want, _))) in
        handles.into_iter().zip(requests.iter().zip(&jobs))
    {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(*steps >= 2, "{adapters} {prompt}: {steps} decisive steps");
        assert_eq!(r.json()["choices"][0]["text"], *want, "{adapters} {prompt}");
    }
    // POST sets the scales of requests without their own: b alone.
    let set = post(addr, "/lora-adapters", &json!([{"id": 1, "scale": 1.0}]));
    assert_eq!(set.status, 200, "{}", set.text());
    let list = get(addr, "/lora-adapters").json();
    assert_eq!(
        (list[0]["scale"].clone(), list[1]["scale"].clone()),
        (json!(0.0), json!(1.0))
    );
    let (ids, steps, want) = expected(json!([["b", 1.0]]), "The capital");
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": steps, "temperature": 0}),
    );
    assert_eq!(r.json()["choices"][0]["text"], want);
    for (lora, says) in [
        (
            json!([{"id": 0, "scale": 1.0}, {"id": 0, "scale": 1.0}]),
            "names adapter 0 twice",
        ),
        (
            json!([{"id": 3, "scale": 1.0}]),
            "names adapter 3, but this server has 2",
        ),
        (json!([{"id": 0}]), "an integer 'id' and a number 'scale'"),
        (json!([{"id": 0, "scale": 1e3}]), "between -100 and 100"),
        // Allowed, but too large for adapter a: the model's logits overflow (the same scale
        // from `--lora-scaled` is the CLI's error too).
        (json!([{"id": 0, "scale": 100.0}]), "not finite numbers"),
        (json!({"id": 0}), "'lora'"),
    ] {
        let body = json!({"prompt": "Hi", "max_tokens": 1, "lora": lora.clone()});
        let r = post(addr, "/v1/completions", &body);
        let e = expect_error(&r, 400, Some("lora"));
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{lora}: {e}"
        );
    }
    let r = post(addr, "/lora-adapters", &json!([{"id": 9, "scale": 1.0}]));
    assert_eq!(r.status, 400, "{}", r.text());
}

/// A request without its own `lora` runs at the scales the server had when it arrived: its
/// choices waiting for the one slot while `POST /lora-adapters` changes them all run at the
/// old ones (read per job, its two choices had run one under each).
#[test]
fn lora_scales_are_read_when_a_request_arrives() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let (dir, reference) = lora_data();
    let mut cfg = config(model, 1, 512);
    cfg.loras = lora_specs(&dir, [("a", 1.0), ("b", 0.0)]);
    let server = start(cfg);
    let addr = server.addr;
    let (case, steps, want) = lora_greedy(addr, &reference, json!([["a", 1.0]]), "The capital");
    // A long request holds the one slot.
    let blocker = std::thread::spawn(move || {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "ignore_eos": true});
        post(addr, "/v1/completions", &body)
    });
    wait_for_active(addr, 1.0, "the long request starts");
    let ids = case["ids"].clone();
    let waiting = std::thread::spawn(move || {
        let body = json!({"prompt": ids, "max_tokens": steps, "temperature": 0, "n": 2});
        post(addr, "/v1/completions", &body)
    });
    let t0 = Instant::now();
    while metric(addr, "gemma3_queue_depth") != 2.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the two choices wait"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let set = post(addr, "/lora-adapters", &json!([{"id": 1, "scale": 1.0}]));
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(
        metric(addr, "gemma3_queue_depth"),
        2.0,
        "still waiting after the change"
    );
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for c in r.json()["choices"].as_array().unwrap() {
        assert_eq!(
            c["text"], want,
            "choice {}: at the scales of its arrival",
            c["index"]
        );
    }
    assert_eq!(blocker.join().unwrap().status, 200);
}

/// Adapters as models, as vLLM and Ollama serve fine-tunes: with `--lora-init-without-apply`
/// the base model answers by default, and a request whose `model` is an adapter's name (its
/// file's stem) runs that adapter alone: llama.cpp's greedy text under it, on the OpenAI and
/// Ollama routes; `/v1/models` and `/api/tags` list the adapters.
#[test]
fn lora_adapters_answer_to_their_names() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let (dir, reference) = lora_data();
    let mut cfg = config(model, 2, 512);
    cfg.loras = lora_specs(&dir, [("a", 1.0), ("b", 1.0)]);
    cfg.lora_init_without_apply = true;
    let server = start(cfg);
    let addr = server.addr;
    let ids: Vec<Value> = get(addr, "/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("gemma-3-270m-q4_k_m"), json!("a"), json!("b")]);
    assert_eq!(
        get(addr, "/v1/models/b").json()["parent"],
        "gemma-3-270m-q4_k_m"
    );
    let tags = get(addr, "/api/tags").json();
    assert_eq!(tags["models"].as_array().unwrap().len(), 3, "{tags}");
    let list = get(addr, "/lora-adapters").json();
    assert_eq!(
        (list[0]["scale"].clone(), list[1]["scale"].clone()),
        (json!(0.0), json!(0.0))
    );
    for (name, adapters) in [
        ("gemma-3-270m-q4_k_m", json!([])),
        ("a", json!([["a", 1.0]])),
        ("b", json!([["b", 1.0]])),
    ] {
        let (case, steps, want) = lora_greedy(addr, &reference, adapters, "The capital");
        assert!(steps >= 3, "{name}: {steps}");
        let body =
            json!({"model": name, "prompt": case["ids"], "max_tokens": steps, "temperature": 0});
        let r = post(addr, "/v1/completions", &body);
        assert_eq!(r.json()["choices"][0]["text"], want, "{name}");
        let body = json!({
            "model": name, "prompt": case["prompt"], "raw": true, "stream": false,
            "options": {"temperature": 0, "num_predict": steps},
        });
        let r = post(addr, "/api/generate", &body);
        assert_eq!(r.json()["response"], want, "{name} on Ollama's route");
        assert_eq!(r.json()["model"], name);
        // With Ollama's default tag, as its clients write a name.
        let mut tagged = body.clone();
        tagged["model"] = json!(format!("{name}:latest"));
        let r = post(addr, "/api/generate", &tagged);
        assert_eq!(r.json()["response"], want, "{name}:latest");
    }
    // A name that is neither the base model's nor an adapter's (a typo of
    // one) is a 404 naming it and what the server runs, on every route
    // that reads `model`, not the base model's reply.
    let messages = json!([{"role": "user", "content": "Hi"}]);
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "Hi", "max_tokens": 1})),
        // (With a `lora` of its own too: the name is still checked.)
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 1, "lora": [{"id": 0, "scale": 1.0}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 1}),
        ),
        ("/v1/embeddings", json!({"input": "Hi"})),
        ("/api/generate", json!({"prompt": "Hi", "stream": false})),
        ("/api/chat", json!({"messages": messages, "stream": false})),
        ("/api/embed", json!({"input": "Hi"})),
        ("/api/embeddings", json!({"prompt": "Hi"})),
        ("/api/show", json!({})),
    ] {
        let mut body = body;
        body["model"] = json!("c");
        let r = post(addr, path, &body);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        let text = r.text();
        assert!(
            text.contains("model 'c' not found: this server runs 'gemma-3-270m-q4_k_m', 'a', 'b'"),
            "{path}: {text}"
        );
    }
    assert_eq!(post(addr, "/api/show", &json!({"model": "b"})).status, 200);
    let r = get(addr, "/v1/models/c");
    assert_eq!(r.status, 404);
    assert!(r
        .text()
        .contains("this server runs 'gemma-3-270m-q4_k_m', 'a', 'b'"));
}

/// `GET /props`, as llama-server answers it: the context per slot, the slots, the default
/// sampling (the model's: temperature 1, top-k 64, top-p 0.95), the chat template in use
/// (Gemma 3's, as the default model has none of its own) and the special tokens.
#[test]
fn props_describe_the_server_as_llama_server_does() {
    let Some(model) = model_path() else { return };
    let _g = serial();
    let server = start(config(model, 3, 640));
    let p = get(server.addr, "/props");
    assert_eq!(p.status, 200, "{}", p.text());
    let p = p.json();
    assert_eq!(p["total_slots"], 3);
    assert_eq!(p["default_generation_settings"]["n_ctx"], 640);
    let params = &p["default_generation_settings"]["params"];
    assert_eq!(
        (params["top_k"].clone(), params["temperature"].clone()),
        (json!(64), json!(1.0))
    );
    assert!(
        (params["top_p"].as_f64().unwrap() - 0.95).abs() < 1e-6,
        "{params}"
    );
    let t = p["chat_template"].as_str().unwrap();
    assert!(
        t.contains("<start_of_turn>") && t.contains("bos_token"),
        "{t}"
    );
    assert_eq!(
        (p["bos_token"].clone(), p["eos_token"].clone()),
        (json!("<bos>"), json!("<eos>"))
    );
    assert!(p["model_path"].as_str().unwrap().ends_with(".gguf"));
}
