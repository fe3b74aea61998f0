//! LoRA adapters on the real model (`--lora`, `--lora-scaled`) against llama.cpp with the same
//! adapters and against the exact logits with them (`tests/data/lora/`, from
//! `scripts/llama_cpp_lora.py`; provenance in tests/data/README.md).
//!
//! The two adapters are random (seeded), strong enough that llama.cpp's best token changes at
//! about two thirds of the prompt positions: adapter a (F16, rank 4, alpha 8) on every matrix
//! of layers 0, 5, 9 and 17; adapter b (A in F32, B in BF16, rank 2, no alpha) on q, v and
//! down of every layer, with a norm tensor llama.cpp leaves out. Four sets: none, a, b, and
//! a at 0.5 with b at 1.5; three prompts each.
//!
//! Checks, as logits.rs and greedy.rs check the base model:
//!
//! 1. accuracy: at every prompt position, the logits of llama.cpp's top 5 relative to its best
//!    token's are no further from the exact ones than llama.cpp's are (rms ≤ 1.2×, max ≤ 1.5×
//!    llama.cpp's, over the adapted cases);
//! 2. greedy: along llama.cpp's 12 greedy tokens (read in one pass), our best token is its
//!    token, unless its lead there is below 0.1, the exact logits put ours within 0.25 of it, or
//!    the two engines' leads add up to at most 0.5 (see `DISAGREEMENT`);
//! 3. the CLI: `gemma3 run --raw --temp 0` with the flags prints llama.cpp's greedy text.

mod common;

use common::{data_dir, gemma3, ids, model, model_path, run};
use gemma3_model::Model;
use serde_json::Value;
use std::collections::HashMap;

fn reference() -> Value {
    let p = data_dir().join("lora/llama_cpp_lora.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("llama_cpp_lora.json")).unwrap()
}

fn adapter_file(name: &str) -> std::path::PathBuf {
    data_dir().join(format!("lora/{name}.gguf"))
}

/// The model with a case's adapters (`[[name, scale], …]`) applied.
fn with_adapters(path: &std::path::Path, adapters: &Value) -> Model {
    let mut m = Model::open(path).expect("model");
    for a in adapters.as_array().unwrap() {
        let file = adapter_file(a[0].as_str().unwrap());
        m.load_lora(&file, a[1].as_f64().unwrap() as f32)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    m
}

/// Logits at every position of the prompt and llama.cpp's greedy tokens but the last.
fn path_logits(m: &Model, case: &Value) -> Vec<f32> {
    let mut path = ids(&case["ids"]);
    let greedy = ids(&case["greedy"]);
    path.extend(&greedy[..greedy.len() - 1]);
    common::all_logits(m, &path)
}

#[test]
fn adapted_logits_and_greedy_tokens_follow_llama_cpp() {
    let Some(path) = model_path("adapted_logits_and_greedy_tokens_follow_llama_cpp") else {
        return;
    };
    let r = reference();
    let mut models: HashMap<String, Model> = HashMap::new();
    let mut errors = common::PathErrors::default();
    let mut base_exact: HashMap<String, Vec<u32>> = HashMap::new();
    for case in r["cases"].as_array().unwrap() {
        let key = case["adapters"].to_string();
        let m = models
            .entry(key.clone())
            .or_insert_with(|| with_adapters(&path, &case["adapters"]));
        let vocab = m.config.vocab_size;
        let logits = path_logits(m, case);
        let prompt = ids(&case["ids"]);
        let adapted = !case["adapters"].as_array().unwrap().is_empty();
        let exact_best =
            common::check_path_case(&key, case, &logits, vocab, adapted.then_some(&mut errors));
        // The adapters must matter: the exact best token differs from the base model's at a
        // quarter of the prompt positions or more.
        let prompt_key = case["prompt"].to_string();
        if !adapted {
            base_exact.insert(prompt_key, exact_best);
        } else if let Some(b) = base_exact.get(&prompt_key) {
            let moved = (0..prompt.len()).filter(|&i| b[i] != exact_best[i]).count();
            assert!(
                4 * moved >= prompt.len(),
                "{key}: the adapters hardly change the best tokens ({moved} of {})",
                prompt.len()
            );
        }
    }
    errors.assert_as_accurate_as_llama_cpp();
}

/// Check 3: `gemma3 run --raw --temp 0` with `--lora` / `--lora-scaled` prints llama.cpp's
/// greedy text (two cases whose 12 steps llama.cpp takes with a lead of 0.2 or more).
#[test]
fn cli_run_with_adapters_prints_llama_cpp_greedy_text() {
    let Some(path) = model_path("cli_run_with_adapters_prints_llama_cpp_greedy_text") else {
        return;
    };
    let (_, tok) = model("cli_run_with_adapters_prints_llama_cpp_greedy_text").unwrap();
    let r = reference();
    let (a, b) = (adapter_file("a"), adapter_file("b"));
    let flags: [(&str, Vec<std::ffi::OsString>); 2] = [
        (r#"[["a",1.0]]"#, vec!["--lora".into(), a.clone().into()]),
        (
            r#"[["a",0.5],["b",1.5]]"#,
            vec![
                "--lora-scaled".into(),
                a.into(),
                "0.5".into(),
                "--lora-scaled".into(),
                b.into(),
                "1.5".into(),
            ],
        ),
    ];
    let prompts = ["The capital of France is", "Review: The food was"];
    for ((set, flags), prompt) in flags.iter().zip(prompts) {
        let case = r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["adapters"] == serde_json::from_str::<Value>(set).unwrap()
                    && c["prompt"].as_str().unwrap().starts_with(prompt)
            })
            .expect("case");
        assert!(common::floats(&case["greedy_margins"])
            .iter()
            .all(|&m| m >= 0.2));
        let expected = tok.decode(&ids(&case["greedy"]), false).unwrap();
        let (out, stdout, stderr) = run(gemma3()
            .args(["run", "--model"])
            .arg(&path)
            .args(flags)
            .args(["--raw", "--temp", "0", "-n", "12", "--quiet"])
            .arg(case["prompt"].as_str().unwrap()));
        assert!(out.status.success(), "{set}: {stderr}");
        assert_eq!(stdout, format!("{expected}\n"), "{set} {prompt:?}");
        if set.contains('b') {
            assert!(
                stderr.contains("blk.0.attn_norm.weight"),
                "the left-out norm tensor is named: {stderr}"
            );
        }
    }
}

/// Bad adapter flags are errors naming the problem, before anything runs.
#[test]
fn bad_adapter_flags_are_clear_errors() {
    let Some(path) = model_path("bad_adapter_flags_are_clear_errors") else {
        return;
    };
    let a = adapter_file("a");
    let missing = std::env::temp_dir().join("gemma3-tests-no-such-adapter.gguf");
    let cases: Vec<(Vec<std::ffi::OsString>, String)> = vec![
        (
            vec!["--lora".into(), missing.clone().into()],
            format!("LoRA adapter {}: cannot read it", missing.display()),
        ),
        (
            vec!["--lora".into(), path.clone().into()],
            "not a LoRA adapter: its general.type is".into(),
        ),
        (
            vec!["--lora-scaled".into(), a.clone().into(), "x".into()],
            "the scale is not a number".into(),
        ),
        (
            vec!["--lora-scaled".into(), a.clone().into(), "1e9".into()],
            "the scale must be between -100 and 100".into(),
        ),
        (
            vec!["--lora-scaled".into(), a.clone().into(), "-inf".into()],
            "the scale must be between -100 and 100".into(),
        ),
        (
            std::iter::repeat_n(["--lora".into(), a.clone().into()], 17)
                .flatten()
                .collect(),
            "17 LoRA adapters given: at most 16".into(),
        ),
    ];
    // An adapter's error names the adapter, not the model.
    common::assert_run_flag_errors(&path, &cases);
}

#[path = "../../model/tests/common/tiny.rs"]
mod tiny;

/// `gemma3 export-lora` on the real model: the adapted matrices become F16, every other tensor
/// keeps its bytes, and the merged file alone gives llama.cpp's greedy text under the adapter
/// (checked once by hand: llama.cpp itself reads the merged file to the same 12 tokens).
#[test]
fn export_lora_writes_a_model_with_the_adapter_merged() {
    let Some(path) = model_path("export_lora_writes_a_model_with_the_adapter_merged") else {
        return;
    };
    let (_, tok) = model("export_lora_writes_a_model_with_the_adapter_merged").unwrap();
    let out = common::temp_path("merged-a.gguf");
    let (o, _, stderr) = run(gemma3()
        .args(["export-lora", "--model"])
        .arg(&path)
        .arg("--lora")
        .arg(adapter_file("a"))
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{stderr}");
    let (base, merged) = (
        gemma3_gguf::GgufFile::open(&path).unwrap(),
        gemma3_gguf::GgufFile::open(&out).unwrap(),
    );
    let adapted = |name: &str| {
        [0, 5, 9, 17]
            .iter()
            .any(|l| name.starts_with(&format!("blk.{l}.")) && !name.contains("norm"))
    };
    assert_eq!(base.tensors().len(), merged.tensors().len());
    for t in base.tensors() {
        let m = merged.tensor(&t.name).unwrap();
        assert_eq!(m.dims, t.dims, "{}", t.name);
        if adapted(&t.name) {
            assert_eq!(m.ggml_type, gemma3_gguf::GgmlType::F16, "{}", t.name);
        } else {
            assert_eq!(merged.tensor_data(m), base.tensor_data(t), "{}", t.name);
        }
    }
    assert_eq!(base.metadata(), merged.metadata());
    let r = reference();
    let case = (r["cases"].as_array().unwrap().iter())
        .find(|c| {
            c["adapters"] == serde_json::json!([["a", 1.0]])
                && c["prompt"].as_str().unwrap().starts_with("The capital")
        })
        .unwrap();
    let expected = tok.decode(&ids(&case["greedy"]), false).unwrap();
    let (o, stdout, stderr) = run(gemma3()
        .args(["run", "--model"])
        .arg(&out)
        .args(["--raw", "--temp", "0", "-n", "12", "--quiet"])
        .arg(case["prompt"].as_str().unwrap()));
    assert!(o.status.success(), "{stderr}");
    assert_eq!(stdout, format!("{expected}\n"));
    // No adapter, the model or an adapter as the output, or a directory: refused before
    // anything is written.
    let adir = common::temp_path("export-dir");
    std::fs::create_dir_all(&adir).unwrap();
    let copy = common::temp_path("adapter-copy.gguf");
    std::fs::copy(adapter_file("a"), &copy).unwrap();
    for (args, says) in [
        (
            vec![
                "--lora".into(),
                copy.clone().into_os_string(),
                "-o".into(),
                copy.clone().into_os_string(),
            ],
            "is an adapter",
        ),
        (
            vec![
                "--lora".into(),
                copy.clone().into_os_string(),
                "-o".into(),
                adir.clone().into_os_string(),
            ],
            "is not a regular file",
        ),
        (
            vec!["-o".into(), out.clone().into_os_string()],
            "no adapter to merge",
        ),
        (
            vec![
                "--lora".into(),
                adapter_file("a").into_os_string(),
                "-o".into(),
                path.clone().into_os_string(),
            ],
            "is the model file",
        ),
    ] {
        let (o, _, stderr) = run(gemma3()
            .args(["export-lora", "--model"])
            .arg(&path)
            .args(&args));
        assert!(!o.status.success() && stderr.contains(says), "{stderr}");
    }
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(adapter_file("a")).unwrap()
    );
    let parent = std::env::temp_dir();
    let left = std::fs::read_dir(&parent).unwrap().filter_map(|e| e.ok());
    let left: Vec<_> = (left.map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".tmp") && n.contains("export-dir"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(&adir).ok();
    std::fs::remove_file(&copy).ok();
    std::fs::remove_file(&out).ok();
}

/// The merge on numbers checked by hand: a tiny model's q matrix of layer 0, an adapter of
/// rank 1 with alpha 2 (scale 2 · 0.5 / 1 = 1 at `--lora-scaled 0.5`), A = e_0 (the first
/// input) and B = 0.25 · e_3 (the fourth output): the merged matrix is W with 0.25 added at row
/// 3, column 0, and nothing else changed but F16 rounding.
#[test]
fn export_lora_adds_scale_times_b_a() {
    let spec = tiny::TinySpec::default();
    let (mut w, weights) = tiny::tiny_writer(&spec);
    let dir = common::temp_path("export-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, w.to_bytes()).unwrap();
    let q = &weights["blk.0.attn_q.weight"];
    let (n_in, n_out) = (q.dims[0] as usize, q.dims[1] as usize);
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut a = vec![0.0f32; n_in];
    a[0] = 1.0;
    let mut b = vec![0.0f32; n_out];
    b[3] = 0.25;
    w = gemma3_gguf::GgufWriter::new();
    use gemma3_gguf::Value;
    w.add_kv("general.architecture", Value::String("gemma3".into()));
    w.add_kv("general.type", Value::String("adapter".into()));
    w.add_kv("adapter.type", Value::String("lora".into()));
    w.add_kv("adapter.lora.alpha", Value::F32(2.0));
    let f32t = gemma3_gguf::GgmlType::F32;
    w.add_tensor(
        "blk.0.attn_q.weight.lora_a",
        &[n_in as u64, 1],
        f32t,
        f32s(&a),
    )
    .unwrap();
    w.add_tensor(
        "blk.0.attn_q.weight.lora_b",
        &[1, n_out as u64],
        f32t,
        f32s(&b),
    )
    .unwrap();
    let lora = dir.join("lora.gguf");
    w.write_to_path(&lora).unwrap();
    let out = dir.join("merged.gguf");
    let (o, _, stderr) = run(gemma3()
        .args(["export-lora", "--model"])
        .arg(&model)
        .arg("--lora-scaled")
        .arg(&lora)
        .arg("0.5")
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{stderr}");
    let f = gemma3_gguf::GgufFile::open(&out).unwrap();
    let t = f.tensor("blk.0.attn_q.weight").unwrap();
    let got: Vec<f32> = (f.tensor_data(t).chunks_exact(2))
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    for (i, (&g, &w0)) in got.iter().zip(&q.data).enumerate() {
        let want = w0 + if i == 3 * n_in { 0.25 } else { 0.0 };
        let f16 = half::f16::from_f32(want).to_f32();
        assert_eq!(
            g,
            f16,
            "element {i} (row {}, column {})",
            i / n_in,
            i % n_in
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `gemma3 convert-lora`: adapter a written as PEFT saves an adapter (its numbers under
/// Hugging Face's names, `lora_A` as [rank, n_in], `lora_alpha` 8, r 4) converts back to the
/// same tensors, bytes and alpha as the GGUF llama.cpp read for its references; with
/// `use_rslora` the alpha written is 8 · √4 = 16 (PEFT's alpha / √r as a GGUF's alpha / r);
/// DoRA, a per-module alpha and a tensor that is not a layer's projection are refused by name.
#[test]
fn convert_lora_turns_a_peft_adapter_into_the_gguf_one() {
    let Some(path) = model_path("convert_lora_turns_a_peft_adapter_into_the_gguf_one") else {
        return;
    };
    let a = gemma3_gguf::GgufFile::open(adapter_file("a")).unwrap();
    let hf = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    let peft_name = |gguf: &str| {
        let rest = gguf.strip_prefix("blk.").unwrap();
        let (l, rest) = rest.split_once('.').unwrap();
        let (m, ab) = rest.split_once(".weight.").unwrap();
        let module = hf.iter().find(|(g, _)| *g == m).unwrap().1;
        let ab = if ab == "lora_a" { "lora_A" } else { "lora_B" };
        format!("base_model.model.model.layers.{l}.{module}.{ab}.weight")
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = (a.tensors().iter())
        .map(|t| {
            let shape = vec![t.dims[1] as usize, t.dims[0] as usize];
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F16,
                shape,
                a.tensor_data(t),
            )
            .unwrap();
            (peft_name(&t.name), view)
        })
        .collect();
    let st = safetensors::serialize(views, None).unwrap();
    let dir = common::temp_path("peft-a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &st).unwrap();
    let convert = |config: serde_json::Value, out: &std::path::Path| {
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        run(gemma3()
            .args(["convert-lora", "--model"])
            .arg(&path)
            .arg(&dir)
            .arg("-o")
            .arg(out))
    };
    let out = dir.join("a.gguf");
    let config = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]});
    let (o, _, stderr) = convert(config.clone(), &out);
    assert!(o.status.success(), "{stderr}");
    let c = gemma3_gguf::GgufFile::open(&out).unwrap();
    assert_eq!(c.get_f32("adapter.lora.alpha").unwrap(), 8.0);
    assert_eq!(c.get_str("general.type").unwrap(), "adapter");
    assert_eq!(c.tensors().len(), a.tensors().len());
    for t in a.tensors() {
        let u = c
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(
            (u.dims.clone(), u.ggml_type),
            (t.dims.clone(), t.ggml_type),
            "{}",
            t.name
        );
        assert_eq!(c.tensor_data(u), a.tensor_data(t), "{}", t.name);
    }
    let mut rs = config.clone();
    rs["use_rslora"] = serde_json::json!(true);
    let (o, _, stderr) = convert(rs, &out);
    assert!(o.status.success(), "{stderr}");
    let c = gemma3_gguf::GgufFile::open(&out).unwrap();
    assert_eq!(c.get_f32("adapter.lora.alpha").unwrap(), 16.0); // The model as the output: refused, the model untouched.
    let before = std::fs::metadata(&path).unwrap().len();
    let (o, _, stderr) = convert(config.clone(), &path);
    assert!(
        !o.status.success() && stderr.contains("is the model file"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    for (edit, says) in [
        (serde_json::json!({"use_dora": true}), "DoRA"),
        (
            serde_json::json!({"use_rslora": "true"}),
            "use_rslora must be true or false",
        ),
        (serde_json::json!({"lora_alpha": 0}), "must be above 0"),
        (serde_json::json!({"r": 8}), "not the config's r 8"),
        (
            serde_json::json!({"alpha_pattern": {"q_proj": 4}}),
            "alpha_pattern",
        ),
        (serde_json::json!({"peft_type": "IA3"}), "peft_type is IA3"),
    ] {
        let mut c = config.clone();
        for (k, v) in edit.as_object().unwrap() {
            c[k] = v.clone();
        }
        let (o, _, stderr) = convert(c, &dir.join("refused.gguf"));
        assert!(!o.status.success() && stderr.contains(says), "{stderr}");
    }
    let data = vec![0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    let name = "base_model.model.model.embed_tokens.weight";
    let st = safetensors::serialize([(name, view)], None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), st).unwrap();
    let (o, _, stderr) = convert(config.clone(), &dir.join("refused.gguf"));
    assert!(!o.status.success() && stderr.contains(name), "{stderr}");
    assert!(!dir.join("refused.gguf").exists());
    // Two tensors that name one projection's matrix (the text model's names with and without
    // the multimodal class's `language_model.`): refused, naming both, where one of the two
    // was silently taken (which one varied from run to run).
    let data = vec![0u8; 4 * 640 * 4];
    let view = |_| {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 640], &data).unwrap()
    };
    let (plain, multi) = (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
    );
    let st = safetensors::serialize([(plain, view(0)), (multi, view(1))], None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), st).unwrap();
    let (o, _, stderr) = convert(config.clone(), &dir.join("refused.gguf"));
    let both = format!("tensors '{multi}' and '{plain}' are both blk.0.attn_q.weight.lora_a");
    assert!(!o.status.success() && stderr.contains(&both), "{stderr}");
    assert!(!dir.join("refused.gguf").exists());
    // An adapter that fails the check against the model (a layer it lacks) leaves what was at
    // the output as it was.
    let data = vec![0u8; 4 * 640 * 4];
    let a18 =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 640], &data).unwrap();
    let datb = vec![0u8; 4 * 1024 * 4];
    let b18 = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1024, 4], &datb)
        .unwrap();
    let st = safetensors::serialize(
        [
            (
                "base_model.model.model.layers.18.self_attn.q_proj.lora_A.weight",
                a18,
            ),
            (
                "base_model.model.model.layers.18.self_attn.q_proj.lora_B.weight",
                b18,
            ),
        ],
        None,
    )
    .unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), st).unwrap();
    std::fs::write(&out, "precious").unwrap();
    let (o, _, stderr) = convert(config, &out);
    assert!(
        !o.status.success() && stderr.contains("blk.18.attn_q.weight"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    std::fs::remove_dir_all(&dir).ok();
}
