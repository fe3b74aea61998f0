//! Test helpers: the real model, a server on an ephemeral port, and a minimal
//! HTTP/1.1 client over `std::net::TcpStream` (no client library to build).

#![allow(dead_code)]

use gemma3_server::{RunningServer, ServerConfig};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The real model: $GEMMA3_MODEL, else the cached default. None (skip) only
/// when GEMMA3_SKIP_MODEL_TESTS=1; otherwise a missing model fails loudly.
pub fn model_path() -> Option<PathBuf> {
    let p = match std::env::var_os("GEMMA3_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("$HOME is not set");
            PathBuf::from(home).join(".cache/gemma3/gemma-3-270m-q4_k_m.gguf")
        }
    };
    if p.exists() {
        return Some(p);
    }
    if std::env::var("GEMMA3_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "skipping: model {} not found and GEMMA3_SKIP_MODEL_TESTS=1",
            p.display()
        );
        return None;
    }
    panic!(
        "model {} not found: run `gemma3 pull` or set $GEMMA3_MODEL (or GEMMA3_SKIP_MODEL_TESTS=1 to skip)",
        p.display()
    );
}

/// Tests share two cores: run one server test at a time so that timings
/// (cancellation within a step, queue behaviour) mean something.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn config(model: PathBuf, parallel: usize, ctx: usize) -> ServerConfig {
    let mut c = ServerConfig::new(model);
    c.port = 0;
    c.parallel = parallel;
    c.ctx = ctx;
    c.shutdown_grace = Duration::from_secs(2);
    c
}

pub fn start(cfg: ServerConfig) -> RunningServer {
    RunningServer::start(cfg).expect("starting the server")
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of a server-sent event stream, up to `[DONE]`
    /// (which must be there).
    pub fn events(&self) -> Vec<Value> {
        let text = self.text();
        let mut out = Vec::new();
        for block in text.split("\n\n") {
            let Some(data) = block.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(data).expect("event is JSON"));
        }
        panic!("stream did not end with [DONE]: {text}");
    }
}

/// Open a connection and send one request (Connection: close).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send request");
    s
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol]).unwrap_or("0");
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
}

/// Read a whole response (until the server closes the connection).
pub fn read_response(mut s: TcpStream) -> Response {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Response {
    read_response(send(addr, method, path, body, headers))
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, &body.to_string(), &[])
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, "", &[])
}

/// A gauge or counter from /metrics.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The text of a chat stream's deltas, and the finish reason.
pub fn chat_stream_text(events: &[Value]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events {
        if let Some(c) = e["choices"].get(0) {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}
