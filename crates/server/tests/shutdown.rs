//! Shutdown against clients that do not cooperate, on the tiny synthetic model (fast enough
//! to generate megabytes of events in a moment): a client that never reads its reply, and a
//! request whose body arrives after the grace period.

#[path = "../../model/tests/common/tiny.rs"]
mod tiny;

use gemma3_server::{RunningServer, ServerConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A server of the tiny model (written to the temp dir under `name`), its grace period 1 s.
fn tiny_server(name: &str) -> (RunningServer, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("gemma3-shutdown-{}-{name}", std::process::id()));
    let (w, _) = tiny::tiny_writer(&tiny::TinySpec::default());
    std::fs::write(&path, w.to_bytes()).unwrap();
    let mut cfg = ServerConfig::new(path.clone());
    cfg.port = 0;
    cfg.parallel = 2;
    cfg.ctx = 1024;
    cfg.shutdown_grace = Duration::from_secs(1);
    (RunningServer::start(cfg).unwrap(), path)
}

fn request_bytes(addr: std::net::SocketAddr, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Stop the server on another thread; whether it stopped within `limit`.
fn stops_within(server: RunningServer, limit: Duration) -> bool {
    let stopping = std::thread::spawn(move || server.stop());
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if stopping.is_finished() {
            stopping.join().unwrap().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A client that asks for a large streamed reply and never reads it had held the server
/// open, after every signal, for as long as it kept the connection: the wait for the open
/// connections is now bounded (the grace period, then 5 s for the last bytes).
#[test]
fn a_client_that_never_reads_does_not_hold_the_server_open() {
    let (server, path) = tiny_server("stalled.gguf");
    let addr = server.addr;
    let body = r#"{"prompt": "ab", "max_tokens": 900, "n": 12, "stream": true, "logprobs": 20, "ignore_eos": true, "temperature": 1}"#;
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(&request_bytes(addr, body)).unwrap();
    // Generated and queued for the client (megabytes of events), never read.
    std::thread::sleep(Duration::from_secs(2));
    let limit = Duration::from_secs(1) + gemma3_server::DRAIN_TIMEOUT + Duration::from_secs(10);
    assert!(
        stops_within(server, limit),
        "still serving a client that does not read"
    );
    drop(stalled);
    let _ = std::fs::remove_file(path);
}

/// A request whose body arrives after the grace period is refused (503), not run in full.
#[test]
fn a_request_after_the_grace_period_is_refused() {
    let (server, path) = tiny_server("late.gguf");
    let addr = server.addr;
    let body = r#"{"prompt": "ab", "max_tokens": 4}"#;
    let bytes = request_bytes(addr, body);
    let mut late = TcpStream::connect(addr).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let split = bytes.len() - 5;
    late.write_all(&bytes[..split]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stopping = std::thread::spawn(move || server.stop());
    std::thread::sleep(Duration::from_millis(1500));
    late.write_all(&bytes[split..]).unwrap();
    let mut reply = String::new();
    let _ = late.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("shutting down"), "{reply}");
    stopping.join().unwrap().unwrap();
    let _ = std::fs::remove_file(path);
}
