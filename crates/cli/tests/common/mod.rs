//! Shared helpers of the CLI and model-level tests: where the real model is, the llama.cpp
//! reference data (`tests/data/reference.json`, provenance in `tests/data/README.md`), and
//! running the built `gemma3` binary.

#![allow(dead_code)]

use gemma3_model::Model;
use gemma3_tokenizer::Tokenizer;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const MODEL_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// The real model: `$GEMMA3_MODEL`, else `~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf`.
///
/// Missing: a failure with instructions, unless `GEMMA3_SKIP_MODEL_TESTS=1`, in which case a
/// note is printed and `None` returned (the caller returns early).
pub fn model_path(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("GEMMA3_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/gemma3/gemma-3-270m-q4_k_m.gguf"),
    };
    if path.exists() {
        return Some(path);
    }
    if std::env::var("GEMMA3_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "note: {test}: SKIPPED, model file {} not found and GEMMA3_SKIP_MODEL_TESTS=1",
            path.display()
        );
        return None;
    }
    panic!(
        "{test} needs the model file {} (sha256 {MODEL_SHA256}), which is missing: run \
         `gemma3 pull` (or set GEMMA3_MODEL to its path), or set GEMMA3_SKIP_MODEL_TESTS=1 \
         to skip the tests that need it",
        path.display()
    );
}

/// The real model and its tokenizer, loaded once per test binary.
pub fn model(test: &str) -> Option<&'static (Model, Tokenizer)> {
    static M: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    let path = model_path(test)?;
    Some(M.get_or_init(|| {
        let m = Model::open(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        let t = gemma3_engine::tokenizer_from_gguf(&m.file)
            .unwrap_or_else(|e| panic!("tokenizer of {}: {e}", path.display()));
        (m, t)
    }))
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// llama.cpp's reference data (a verbatim copy of the shared reference.json).
pub fn reference() -> &'static serde_json::Value {
    static R: OnceLock<serde_json::Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = data_dir().join("reference.json");
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("reference.json parses");
        assert_eq!(
            v["model_sha256"], MODEL_SHA256,
            "reference is for another model"
        );
        v
    })
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// The built `gemma3` binary, pointed at an empty model cache: tests name the model with
/// `--model`, and nothing is ever pulled into the user's cache.
pub fn gemma3() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gemma3"));
    c.env(
        "GEMMA3_CACHE",
        std::env::temp_dir().join("gemma3-tests-no-cache"),
    );
    c.env_remove("GEMMA3_MODEL");
    c
}

pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("running gemma3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// A path in the system temp dir, private to this test process (nothing is created).
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gemma3-tests-{}-{name}", std::process::id()))
}

/// Index of the largest logit (first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `[[id, value], …]` as (id, value) pairs (the references' top-k lists).
pub fn pairs(v: &serde_json::Value) -> Vec<(u32, f64)> {
    v.as_array()
        .expect("an array of pairs")
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
        .collect()
}

pub fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Logits at every position of `ids` (n × vocab), one batch in a fresh cache.
pub fn all_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = gemma3_model::KvCache::new(&m.config, ids.len());
    let mut st = gemma3_model::ForwardState::new();
    m.forward(
        &gemma3_model::Batch::for_sequence(ids, 0, true),
        std::slice::from_mut(&mut cache),
        &mut st,
    )
    .expect("forward")
    .to_vec()
}
