//! `gemma3 cvector-generate` on the real model against the vectors llama-cvector-generator's
//! method makes from llama.cpp's tokens and the exact float64 hidden states
//! (`tests/data/cvector/reference.json`, from `scripts/cvector_reference.py`; provenance in
//! tests/data/README.md): 8 pairs of happy and sad prompts, of different lengths (the shorter
//! padded), one in Gemma's chat format with escapes.

mod common;

use common::{data_dir, gemma3, ids, model, model_path, run, temp_path};
use gemma3_model::ControlVector;
use serde_json::Value;
use std::path::PathBuf;

fn reference() -> Value {
    let p = data_dir().join("cvector/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("cvector/reference.json")).unwrap()
}

fn prompts(side: &str) -> PathBuf {
    data_dir().join(format!("cvector/{side}.txt"))
}

/// The command's own reading of the prompt files (escapes processed) and its pairing (tokens
/// padded as llama-cvector-generator pads them) give llama.cpp's tokens.
#[test]
fn prompt_pairs_tokenize_and_pad_as_llama_cpp() {
    let Some((_, tok)) = model("prompt_pairs_tokenize_and_pad_as_llama_cpp") else {
        return;
    };
    let r = reference();
    let read = |side: &str| -> Vec<String> {
        let text = std::fs::read_to_string(prompts(side)).unwrap();
        (text.lines())
            .filter(|l| !l.is_empty())
            .map(gemma3_engine::process_escapes)
            .collect()
    };
    let (pos, neg) = (read("positive"), read("negative"));
    let pairs = r["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), pos.len());
    let mut padded = 0;
    for ((p, n), want) in pos.iter().zip(&neg).zip(pairs) {
        let (p, n) = gemma3_engine::cvector_pair(tok, p, n);
        assert_eq!(p, ids(&want["positive"]));
        assert_eq!(n, ids(&want["negative"]));
        padded += p
            .iter()
            .chain(&n)
            .filter(|&&t| t as u64 == r["pad"].as_u64().unwrap())
            .count();
    }
    assert!(padded > 0, "the pairs exercise the padding");
}

/// `cvector-generate` with each method writes 17 unit directions, from the same number of
/// difference rows per layer as the reference, that point where the exact ones do (signed
/// alike) as closely as llama.cpp's from its own hidden states: 1 - cosine at most 1.5 times
/// llama.cpp's on average over the layers, and below 5e-3 at every layer.
#[test]
fn generated_directions_match_the_exact_ones() {
    let Some(path) = model_path("generated_directions_match_the_exact_ones") else {
        return;
    };
    let r = reference();
    for method in ["mean", "pca"] {
        let out = temp_path(&format!("cvector-{method}.gguf"));
        let (status, stdout, stderr) = run(gemma3()
            .args(["cvector-generate", "--model"])
            .arg(&path)
            .arg("--positive-file")
            .arg(prompts("positive"))
            .arg("--negative-file")
            .arg(prompts("negative"))
            .args(["--method", method, "-o"])
            .arg(&out));
        assert!(status.status.success(), "{stderr}");
        assert!(stdout.contains("17 directions"), "{stdout}");
        for (l, rows) in r["rows"].as_array().unwrap().iter().enumerate() {
            let want = format!(
                "direction.{:<2} from layer {l:>2}'s output: {} rows,",
                l + 1,
                rows
            );
            assert!(stderr.contains(&want), "{want}\n{stderr}");
        }
        let mut cv = ControlVector::default();
        cv.add_file(&out, 1.0).unwrap();
        let _ = std::fs::remove_file(&out);
        let want = r[method].as_array().unwrap();
        let llama = r[format!("llama_cpp_{method}")].as_array().unwrap();
        assert_eq!(cv.layers.len(), want.len());
        // Per layer, 1 - cosine with the exact direction: ours, and llama.cpp's from its own
        // hidden states.
        let (mut ours_off, mut llama_off) = (Vec::new(), Vec::new());
        for (l, ((ours, exact), theirs)) in cv.layers.iter().zip(want).zip(llama).enumerate() {
            let exact = common::floats(exact);
            let ours: Vec<f64> = ours.iter().map(|&x| x as f64).collect();
            let norm = ours.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "{method} direction.{}: length {norm}",
                l + 1
            );
            ours_off.push(1.0 - common::cosine(&ours, &exact));
            llama_off.push(1.0 - common::cosine(&common::floats(theirs), &exact));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let worst = ours_off.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "{method}: 1 - cosine with the exact directions, mean over layers: ours {:.2e}, \
             llama.cpp's {:.2e}; worst: ours {worst:.2e}, llama.cpp's {:.2e}",
            mean(&ours_off),
            mean(&llama_off),
            llama_off.iter().cloned().fold(0.0, f64::max)
        );
        assert!(
            mean(&ours_off) <= 1.5 * mean(&llama_off),
            "{method}: ours {ours_off:?}\nllama.cpp's {llama_off:?}"
        );
        assert!(worst < 5e-3, "{method}: {ours_off:?}");
    }
}

/// A generated vector steers: subtracted from the "happy" direction, greedy text after a
/// neutral prompt turns to fear, anger or sadness, words that are not there without it.
#[test]
fn a_generated_vector_steers_generation() {
    let Some(path) = model_path("a_generated_vector_steers_generation") else {
        return;
    };
    let out = temp_path("cvector-steer.gguf");
    let (status, _, stderr) = run(gemma3()
        .args(["cvector-generate", "--model"])
        .arg(&path)
        .arg("--positive-file")
        .arg(prompts("positive"))
        .arg("--negative-file")
        .arg(prompts("negative"))
        .arg("-o")
        .arg(&out));
    assert!(status.status.success(), "{stderr}");
    let prompt = "Yesterday my friend called me and told me that";
    let text = |strength: &str| {
        let mut cmd = gemma3();
        cmd.args(["run", "--model"]).arg(&path);
        if strength != "0" {
            cmd.arg("--control-vector-scaled").arg(&out).arg(strength);
        }
        let (o, stdout, stderr) =
            run(cmd.args(["--raw", "--temp", "0", "--quiet", "-n", "24", prompt]));
        assert!(o.status.success(), "{stderr}");
        stdout.to_lowercase()
    };
    let moods = [
        "sad", "scared", "angry", "afraid", "upset", "cried", "worried",
    ];
    let base = text("0");
    let steered = text("-60");
    let _ = std::fs::remove_file(&out);
    eprintln!("base: {base}\nsteered: {steered}");
    assert!(!moods.iter().any(|m| base.contains(m)), "{base}");
    assert!(moods.iter().any(|m| steered.contains(m)), "{steered}");
}

/// Bad prompt files, flags and outputs are errors that name the problem, before anything is
/// written.
#[test]
fn bad_cvector_inputs_are_clear_errors() {
    let Some(path) = model_path("bad_cvector_inputs_are_clear_errors") else {
        return;
    };
    let short = temp_path("cvector-short.txt");
    std::fs::write(&short, "only one\n").unwrap();
    let blank = temp_path("cvector-blank.txt");
    std::fs::write(&blank, "\n\n").unwrap();
    let out = temp_path("cvector-bad-out.gguf");
    let missing = temp_path("cvector-no-such-file.txt");
    let (pos, neg) = (prompts("positive"), prompts("negative"));
    let cases: Vec<(Vec<PathBuf>, Vec<&str>, String)> = vec![
        (
            vec![pos.clone(), short.clone()],
            vec![],
            "8 positive prompts but 1 negative".into(),
        ),
        (
            vec![blank.clone(), neg.clone()],
            vec![],
            "holds no prompt".into(),
        ),
        (
            vec![missing.clone(), neg.clone()],
            vec![],
            "cvector-no-such-file.txt".into(),
        ),
        (
            vec![pos.clone(), pos.clone()],
            vec![],
            "there is no difference".into(),
        ),
        (
            vec![pos.clone(), neg.clone()],
            vec!["--pca-iter", "1000", "--pca-batch", "7"],
            "not a multiple of --pca-batch 7".into(),
        ),
        (
            vec![pos.clone(), neg.clone()],
            vec!["--pca-iter", "0"],
            "--pca-iter must be".into(),
        ),
        (
            vec![pos.clone(), neg.clone()],
            vec!["--method", "svd"],
            "invalid value 'svd'".into(),
        ),
    ];
    for (files, flags, want) in cases {
        let (o, _, stderr) = run(gemma3()
            .args(["cvector-generate", "--model"])
            .arg(&path)
            .arg("--positive-file")
            .arg(&files[0])
            .arg("--negative-file")
            .arg(&files[1])
            .args(&flags)
            .arg("-o")
            .arg(&out));
        assert!(!o.status.success(), "{files:?} {flags:?}");
        assert!(stderr.contains(&want), "{files:?} {flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "nothing is written on an error");
    }
    // The output may not be the model, nor a prompt file.
    for target in [&path, &pos] {
        let (o, _, stderr) = run(gemma3()
            .args(["cvector-generate", "--model"])
            .arg(&path)
            .arg("--positive-file")
            .arg(&pos)
            .arg("--negative-file")
            .arg(&neg)
            .arg("-o")
            .arg(target));
        assert!(!o.status.success());
        assert!(stderr.contains("the output"), "{stderr}");
    }
    for f in [short, blank] {
        let _ = std::fs::remove_file(f);
    }
}
