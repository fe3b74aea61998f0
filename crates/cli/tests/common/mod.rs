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

/// Below this lead, llama.cpp's greedy token is a near tie: either engine may pick the other.
pub const NEAR_TIE: f64 = 0.1;
/// Our token is as good as llama.cpp's where the exact logits put it within this of it.
pub const EXACT_NEAR_TIE: f64 = 0.25;
/// Two engines as accurate as llama.cpp (its rms error on relative logits with adapters: 0.30)
/// may disagree on which of two tokens leads by up to twice that: a mismatch where our lead
/// plus llama.cpp's is at most this is within that disagreement.
pub const DISAGREEMENT: f64 = 0.5;

/// How far relative logits are from the exact ones, ours and llama.cpp's, over many cases.
#[derive(Default)]
pub struct PathErrors {
    pub ours: Vec<f64>,
    pub llama: Vec<f64>,
}

impl PathErrors {
    /// Ours no further from the exact logits than llama.cpp's: rms ≤ 1.2×, max ≤ 1.5×.
    pub fn assert_as_accurate_as_llama_cpp(&self) {
        eprintln!(
            "relative logits vs exact over {} values: ours rms {:.3} max {:.3}; llama.cpp rms {:.3} max {:.3}",
            self.ours.len(),
            rms(&self.ours),
            max_abs(&self.ours),
            rms(&self.llama),
            max_abs(&self.llama)
        );
        assert!(!self.ours.is_empty());
        assert!(rms(&self.ours) <= 1.2 * rms(&self.llama), "rms");
        assert!(max_abs(&self.ours) <= 1.5 * max_abs(&self.llama), "max");
    }
}

/// One case of a llama.cpp reference along a path (`ids`, the prompt; `prompt_top5`, its
/// top 5 at each prompt position; `greedy` and `greedy_margins`, its greedy tokens and
/// leads; `exact`, the exact logits of some tokens at every position of the prompt and the
/// greedy tokens but the last), checked against `logits` (ours, vocab wide, at those
/// positions):
///
/// 1. where `errors` is given, each relative logit of llama.cpp's top 5 (to its best) at the
///    prompt positions, ours and llama.cpp's, minus the exact one, is added to it;
/// 2. along llama.cpp's greedy tokens our best token is its token, unless its lead there is
///    below [`NEAR_TIE`], the exact logits put ours within [`EXACT_NEAR_TIE`] of it, or the
///    two engines' leads add up to at most [`DISAGREEMENT`].
///
/// Returns the exact best token at each position (each exact row's first).
pub fn check_path_case(
    key: &str,
    case: &serde_json::Value,
    logits: &[f32],
    vocab: usize,
    errors: Option<&mut PathErrors>,
) -> Vec<u32> {
    use std::collections::HashMap;
    let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
    let exact: Vec<HashMap<u32, f64>> = (case["exact"].as_array().unwrap().iter())
        .map(|r| pairs(r).into_iter().collect())
        .collect();
    let prompt = ids(&case["ids"]);
    if let Some(errors) = errors {
        for (i, top) in case["prompt_top5"].as_array().unwrap().iter().enumerate() {
            let top = pairs(top);
            let (t0, l0) = top[0];
            for &(t, l) in &top[1..] {
                let e = exact[i][&t] - exact[i][&t0];
                let ours = (row(i)[t as usize] - row(i)[t0 as usize]) as f64;
                errors.ours.push(ours - e);
                errors.llama.push((l - l0) - e);
            }
        }
    }
    let greedy = ids(&case["greedy"]);
    let margins = floats(&case["greedy_margins"]);
    for (s, &t) in greedy.iter().enumerate() {
        let pos = prompt.len() - 1 + s;
        let best = argmax(row(pos));
        if best == t {
            continue;
        }
        let ex = &exact[pos];
        let near = ex.get(&best).is_some_and(|&e| e >= ex[&t] - EXACT_NEAR_TIE);
        let ours_lead = (row(pos)[best as usize] - row(pos)[t as usize]) as f64;
        eprintln!(
            "{key} step {s}: ours {best} by {ours_lead:.3} over llama.cpp's {t} (its lead {:.3}); exact {:?} vs {:.3}",
            margins[s],
            ex.get(&best),
            ex[&t]
        );
        assert!(
            margins[s] < NEAR_TIE || near || ours_lead + margins[s] <= DISAGREEMENT,
            "{key} {:?} step {s}: we pick {best} by {ours_lead:.3} where llama.cpp picks {t} \
             with a lead of {:.3}, and the exact logits do not put ours within \
             {EXACT_NEAR_TIE} of it ({:?} vs {:.3})",
            case["prompt"],
            margins[s],
            ex.get(&best),
            ex[&t]
        );
    }
    (case["exact"].as_array().unwrap().iter())
        .map(|r| r[0][0].as_u64().unwrap() as u32)
        .collect()
}

/// `gemma3 run` on the model at `path` with each case's flags fails with its text on stderr, names
/// the file or flag at fault rather than the model ("loading"), and does not panic.
pub fn assert_run_flag_errors(path: &std::path::Path, cases: &[(Vec<std::ffi::OsString>, String)]) {
    for (flags, want) in cases {
        let (out, _, stderr) = run(gemma3()
            .args(["run", "--model"])
            .arg(path)
            .args(flags)
            .args(["--raw", "-n", "1", "Hi"]));
        assert!(!out.status.success(), "{flags:?}");
        assert!(stderr.contains(want.as_str()), "{flags:?}: {stderr}");
        assert!(!stderr.contains("loading"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The cosine of the angle between `a` and `b`.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}
