//! `gemma3 embed` against llama.cpp's embeddings and the exact ones
//! (`tests/data/embeddings.json`, made by `scripts/llama_cpp_embeddings.py`).

mod common;

use common::{data_dir, gemma3, run};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(data_dir().join("embeddings.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// |a − b| / |b|.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b)
}

/// The vectors `gemma3 embed` prints for `texts`, one per line.
fn embed(model: &std::path::Path, args: &[&str], texts: &[String]) -> Vec<Vec<f64>> {
    let (out, stdout, stderr) = run(gemma3()
        .arg("embed")
        .arg("--model")
        .arg(model)
        .args(args)
        .args(texts));
    assert!(out.status.success(), "gemma3 embed {args:?}: {stderr}");
    stdout
        .lines()
        .map(|l| vector(&serde_json::from_str(l).unwrap()))
        .collect()
}

/// Each text's pooled vector points where llama.cpp's does (cosine ≥ 0.995, where
/// two different texts, or one text's mean and last poolings, are at most 0.90
/// apart in the reference), and is as close to the exact one as llama.cpp's
/// within half again llama.cpp's own error (both engines round activations to 8
/// bits and keep an f16 cache: 1.5–8.6% of the vector's length here). The default
/// output is the same vector scaled to unit length.
#[test]
fn embeddings_match_llama_cpp_and_exact() {
    let Some(model) = common::model_path("embeddings_match_llama_cpp_and_exact") else {
        return;
    };
    let r = reference();
    let texts: Vec<String> = (r["texts"].as_array().unwrap().iter())
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    for pooling in ["mean", "last"] {
        let raw = embed(
            &model,
            &["--pooling", pooling, "--embd-normalize", "-1"],
            &texts,
        );
        assert_eq!(raw.len(), texts.len(), "one line per text");
        for (i, ours) in raw.iter().enumerate() {
            let llama = vector(&r["llama_cpp"][pooling][i]);
            let exact = vector(&r["exact"][pooling][i]);
            assert_eq!(ours.len(), 640);
            let cos = common::cosine(ours, &llama);
            assert!(
                cos >= 0.995,
                "{pooling} text {i}: cosine {cos} to llama.cpp's"
            );
            let (e_ours, e_llama) = (rel_err(ours, &exact), rel_err(&llama, &exact));
            assert!(
                e_ours <= 1.5 * e_llama,
                "{pooling} text {i}: {e_ours} off the exact vector, llama.cpp {e_llama}"
            );
        }
        let unit = embed(&model, &["--pooling", pooling], &texts);
        for (u, v) in unit.iter().zip(&raw) {
            assert!((norm(u) - 1.0).abs() < 1e-5, "unit length: {}", norm(u));
            let n = norm(v);
            assert!(u.iter().zip(v).all(|(a, b)| (a - b / n).abs() < 1e-6));
        }
    }
}

/// Texts from a file, one per line (empty lines skipped), give the vectors of
/// the same texts as arguments.
#[test]
fn texts_from_a_file_are_its_lines() {
    let Some(model) = common::model_path("texts_from_a_file_are_its_lines") else {
        return;
    };
    let texts = ["Hello".to_string(), "book a table for two".to_string()];
    let file = common::temp_path("embed-lines.txt");
    // A byte-order mark and a blank line are not texts.
    std::fs::write(
        &file,
        format!("\u{feff}{}\n \t\n{}\r\n", texts[0], texts[1]),
    )
    .unwrap();
    let from_file = embed(&model, &["-f", file.to_str().unwrap()], &[]);
    assert_eq!(from_file, embed(&model, &[], &texts));
    // Special-token text is parsed, as llama-embedding and the server read
    // it: a text that starts with <bos> gets no second one.
    let bos = embed(&model, &[], &["<bos>Hello".to_string()]);
    assert_eq!(bos[0], from_file[0], "<bos>Hello = Hello");
    // A text too long for the context is named by its line.
    std::fs::write(&file, format!("a\n\n{}\n", "hello ".repeat(33_000))).unwrap();
    let (out, _, stderr) = run(gemma3()
        .args(["embed", "--model"])
        .arg(&model)
        .arg("-f")
        .arg(&file));
    std::fs::remove_file(&file).ok();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 3 of") && stderr.contains("32768"),
        "{stderr}"
    );
}
