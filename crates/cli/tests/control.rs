//! Control vectors on the real model (`--control-vector`, `--control-vector-scaled`,
//! `--control-vector-layer-range`) against llama.cpp with the same vectors and against the
//! exact logits with them (`tests/data/control/`, from `scripts/llama_cpp_control.py`;
//! provenance in tests/data/README.md).
//!
//! The two vectors are random (seeded): a has a direction for every layer from 1 to 17, b for
//! layers 3, 8 and 14 and one for a layer 18 the model lacks (llama.cpp leaves it out). Four
//! cases: none, a, b, and a at -1.5 with b at 2 on layers 4 to 12; three prompts each.
//!
//! Checks, as lora.rs checks adapters: relative logits as accurate as llama.cpp's, llama.cpp's
//! greedy tokens along its path, the vectors moving the exact best token at a quarter of the
//! prompt positions or more; then the CLI's greedy text, and bad flags and files.

mod common;

use common::{data_dir, gemma3, ids, model, model_path, run};
use gemma3_model::{ControlVector, Model};
use serde_json::Value;
use std::collections::HashMap;
use std::ffi::OsString;

const LAYERS: usize = 18;

fn reference() -> Value {
    let p = data_dir().join("control/llama_cpp_control.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("llama_cpp_control.json")).unwrap()
}

fn vector_file(name: &str) -> std::path::PathBuf {
    data_dir().join(format!("control/{name}.gguf"))
}

/// The model with a case's vectors (`[[name, strength], …]`) on its layer range.
fn with_vectors(path: &std::path::Path, case: &Value) -> Model {
    let mut m = Model::open(path).expect("model");
    let mut cv = ControlVector::default();
    for v in case["vectors"].as_array().unwrap() {
        cv.add_file(
            &vector_file(v[0].as_str().unwrap()),
            v[1].as_f64().unwrap() as f32,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let (first, last) = match case["layer_range"].as_array() {
        Some(r) => (
            r[0].as_u64().unwrap() as usize,
            r[1].as_u64().unwrap() as usize,
        ),
        None => (1, LAYERS),
    };
    let info = m.set_control(&cv, first, last).unwrap();
    if case["vectors"].to_string().contains("\"b\"") {
        assert_eq!(info.beyond, [18], "b's direction.18 is left out");
    }
    m
}

#[test]
fn steered_logits_and_greedy_tokens_follow_llama_cpp() {
    let Some(path) = model_path("steered_logits_and_greedy_tokens_follow_llama_cpp") else {
        return;
    };
    let r = reference();
    let mut errors = common::PathErrors::default();
    let mut base_exact: HashMap<String, Vec<u32>> = HashMap::new();
    // Per set of vectors: prompt positions whose exact best token they move, and all.
    let mut moved: HashMap<String, (usize, usize)> = HashMap::new();
    let mut last_key = String::new();
    let mut m: Option<Model> = None;
    for case in r["cases"].as_array().unwrap() {
        let key = format!("{} {}", case["vectors"], case["layer_range"]);
        if key != last_key {
            m = Some(with_vectors(&path, case));
            last_key = key.clone();
        }
        let m = m.as_ref().unwrap();
        let mut tokens = ids(&case["ids"]);
        let greedy = ids(&case["greedy"]);
        tokens.extend(&greedy[..greedy.len() - 1]);
        let logits = common::all_logits(m, &tokens);
        let steered = !case["vectors"].as_array().unwrap().is_empty();
        let exact_best = common::check_path_case(
            &key,
            case,
            &logits,
            m.config.vocab_size,
            steered.then_some(&mut errors),
        );
        let prompt_key = case["prompt"].to_string();
        let n = ids(&case["ids"]).len();
        if !steered {
            base_exact.insert(prompt_key, exact_best);
        } else {
            let b = &base_exact[&prompt_key];
            let e = moved.entry(key).or_default();
            e.0 += (0..n).filter(|&i| b[i] != exact_best[i]).count();
            e.1 += n;
        }
    }
    errors.assert_as_accurate_as_llama_cpp();
    // The vectors must matter: each set moves the exact best token at a quarter of the
    // prompt positions or more.
    assert_eq!(moved.len(), 3);
    for (key, (m, n)) in moved {
        eprintln!("{key}: the exact best token moves at {m} of {n} prompt positions");
        assert!(
            4 * m >= n,
            "{key}: the vectors hardly change the best tokens ({m} of {n})"
        );
    }
}

/// `gemma3 run --raw --temp 0` with the flags prints llama.cpp's greedy text up to its first
/// step with a lead below 0.2 (random vectors make near ties common), where that is 3 tokens
/// or more (three cases, a's and b's). And b on layers 15 to 17, where it has no direction,
/// prints the base model's text (llama.cpp's without vectors), with a warning.
#[test]
fn cli_run_with_control_vectors_prints_llama_cpp_greedy_text() {
    let test = "cli_run_with_control_vectors_prints_llama_cpp_greedy_text";
    let Some(path) = model_path(test) else {
        return;
    };
    let (_, tok) = model(test).unwrap();
    let r = reference();
    let (a, b) = (vector_file("a"), vector_file("b"));
    let flags_of = |case: &Value| -> Option<Vec<OsString>> {
        Some(match case["vectors"].to_string().as_str() {
            "[]" => vec![
                "--control-vector".into(),
                b.clone().into(),
                "--control-vector-layer-range".into(),
                "15".into(),
                "17".into(),
            ],
            r#"[["a",1.0]]"# => vec!["--control-vector".into(), a.clone().into()],
            r#"[["b",1.0]]"# => vec![
                "--control-vector-scaled".into(),
                b.clone().into(),
                "1".into(),
            ],
            _ => return None,
        })
    };
    let mut checked = Vec::new();
    for case in r["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let margins = common::floats(&case["greedy_margins"]);
        let clear = margins.iter().take_while(|&&m| m >= 0.2).count();
        // (`run --raw` reads special-token text as plain text: the chat prompt is left out.)
        if clear < 3 || prompt.starts_with("<start_of_turn>") {
            continue;
        }
        let Some(flags) = flags_of(case) else {
            continue;
        };
        let expected = tok.decode(&ids(&case["greedy"])[..clear], false).unwrap();
        let (out, stdout, stderr) = run(gemma3()
            .args(["run", "--model"])
            .arg(&path)
            .args(flags)
            .args(["--raw", "--temp", "0", "--quiet", "-n"])
            .arg(clear.to_string())
            .arg(prompt));
        assert!(out.status.success(), "{}: {stderr}", case["vectors"]);
        assert_eq!(stdout, format!("{expected}\n"), "{}", case["vectors"]);
        match case["vectors"].to_string().as_str() {
            "[]" => assert!(
                stderr.contains("no direction falls in the layers"),
                "{stderr}"
            ),
            v if v.contains("\"b\"") => assert!(
                stderr.contains("[18] left out"),
                "the layer the model lacks is named: {stderr}"
            ),
            _ => {}
        }
        checked.push((case["vectors"].to_string(), clear));
    }
    assert_eq!(checked.len(), 4, "clear cases: {checked:?}");
}

/// Bad control vector flags and files are errors naming the problem, before anything runs.
#[test]
fn bad_control_vector_flags_are_clear_errors() {
    let Some(path) = model_path("bad_control_vector_flags_are_clear_errors") else {
        return;
    };
    let a = vector_file("a");
    let missing = std::env::temp_dir().join("gemma3-tests-no-such-vector.gguf");
    // A vector 320 wide (for another model), one with a direction.0, and
    // one whose values (1e20) are finite but square past f32's range: its
    // layer's output would have made the next norm's scale 0 and every
    // logit equal (a reply of `<pad>`s).
    let narrow = common::temp_path("narrow.gguf");
    let zero = common::temp_path("zero.gguf");
    let huge = common::temp_path("huge.gguf");
    for (file, name, width, at) in [
        (&narrow, "direction.1", 320, 0.0),
        (&zero, "direction.0", 640, 0.0),
        (&huge, "direction.1", 640, 1e20),
    ] {
        let mut w = gemma3_gguf::GgufWriter::new();
        let v: Vec<u8> = (0..width)
            .flat_map(|i| (at + i as f32 * 0.01).to_le_bytes())
            .collect();
        w.add_tensor(name, &[width as u64], gemma3_gguf::GgmlType::F32, v)
            .unwrap();
        w.write_to_path(file).unwrap();
    }
    let lora = data_dir().join("lora/a.gguf");
    let cases: Vec<(Vec<OsString>, String)> = vec![
        (
            vec!["--control-vector".into(), missing.clone().into()],
            format!("control vector {}: cannot read it", missing.display()),
        ),
        (
            vec!["--control-vector".into(), lora.into()],
            "is not named direction.N".into(),
        ),
        (
            vec!["--control-vector".into(), narrow.clone().into()],
            "directions have 320 values, but this model's layers are 640 wide".into(),
        ),
        (
            vec!["--control-vector".into(), zero.clone().into()],
            "direction.0".into(),
        ),
        (
            vec!["--control-vector".into(), huge.clone().into()],
            "has values up to 1e20: their squares pass f32's range".into(),
        ),
        (
            vec![
                "--control-vector-scaled".into(),
                a.clone().into(),
                "x".into(),
            ],
            "the strength is not a number".into(),
        ),
        (
            vec![
                "--control-vector-scaled".into(),
                a.clone().into(),
                "1e9".into(),
            ],
            "the strength must be between -1000 and 1000".into(),
        ),
        (
            vec![
                "--control-vector-scaled".into(),
                a.clone().into(),
                "NaN".into(),
            ],
            "the strength must be between -1000 and 1000".into(),
        ),
        (
            vec![
                "--control-vector".into(),
                a.clone().into(),
                "--control-vector-layer-range".into(),
                "9".into(),
                "3".into(),
            ],
            "the first layer is after the last".into(),
        ),
        (
            vec![
                "--control-vector-layer-range".into(),
                "1".into(),
                "5".into(),
            ],
            "without --control-vector".into(),
        ),
    ];
    common::assert_run_flag_errors(&path, &cases);
    let _ = std::fs::remove_file(narrow);
    let _ = std::fs::remove_file(zero);
    let _ = std::fs::remove_file(huge);
}
