//! `gemma3 finetune` on the real model:
//!
//! 1. the training passes' logits (f32 over the expanded weights, with an adapter's pairs as
//!    trainable parameters) are the exact float64 logits of `scripts/exact_reference.py` over
//!    the dequantized weights with that adapter merged (`tests/data/lora/llama_cpp_lora.json`,
//!    llama.cpp's top 5 at each position of its greedy path), for no adapter and for adapters
//!    a and b;
//! 2. a short run teaches the model a completion and a chat reply it did not give, which
//!    `gemma3 run` with the written adapter then prints (and without it does not);
//! 3. bad data and flags are refused with errors that name them, and nothing is written;
//! 4. an adapter it trained on banking77 intents (`tests/data/lora/intents.gguf`) runs in the
//!    inference pass as in llama.cpp: along llama.cpp's greedy replies with it, our best token is
//!    its token wherever it leads by 0.5 or more (`intents.json`, from
//!    `scripts/llama_cpp_trained_lora.py`).
//!
//! The gradients themselves are checked against an independent f64 reference on the tiny
//! model (crates/model/tests/train.rs).

mod common;

use common::{argmax, data_dir, gemma3, model, model_path, pairs, run, temp_path};
use gemma3_model::train::{DenseModel, Precision, TrainableLora};
use serde_json::Value;
use std::path::Path;

fn cases() -> Vec<Value> {
    let p = data_dir().join("lora/llama_cpp_lora.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn training_logits_are_the_exact_logits() {
    let Some((m, _)) = model("training_logits_are_the_exact_logits") else {
        return;
    };
    let dense = DenseModel::new(m);
    let (worst, _) = against_exact(&dense, 1e-3);
    eprintln!("worst difference from the exact logits {worst:.2e}");
    // The check can fail: adapter a's pairs against the exact logits without it.
    let case = cases()
        .into_iter()
        .find(|c| c["adapters"] == serde_json::json!([]));
    let case = case.unwrap();
    let vocab = m.config.vocab_size;
    let logits = dense.logits(&trainable(m, Some("a")), &common::ids(&case["ids"]));
    let (id, want) = pairs(&case["exact"][1])[0];
    assert!((logits[vocab + id as usize] as f64 - want).abs() > 0.1);
}

/// The bf16 products (`--precision bf16`, the default where the CPU has AVX-512 BF16) round
/// each weight and activation to 8 significant bits: the logits stay near the exact ones
/// (measured: rms 0.117, worst 0.704; it moves by a tenth with any change upstream of a
/// rounding), nearer than the inference pass's, which rounds the activations to 8 bits as
/// llama.cpp does (the README's Fidelity: rms 0.285). A wrong product is off by whole units.
#[test]
fn bf16_training_logits_are_near_the_exact_logits() {
    let Some((m, _)) = model("bf16_training_logits_are_near_the_exact_logits") else {
        return;
    };
    if !gemma3_kernels::bf16mm::available() {
        // (The scalar twin would take minutes; the tiny model's test covers it.)
        eprintln!("skipped: no AVX-512 BF16 here");
        return;
    }
    let dense = DenseModel::with_precision(m, Precision::Bf16);
    let (worst, rms) = against_exact(&dense, 1.0);
    eprintln!("bf16: difference from the exact logits rms {rms:.3}, worst {worst:.3}");
    assert!(rms < 0.2, "rms difference {rms}");
}

fn trainable(m: &gemma3_model::Model, name: Option<&str>) -> TrainableLora {
    match name {
        None => TrainableLora::new(m, &[], 1, 1.0, 0),
        Some(n) => {
            let f = m.read_lora(&data_dir().join(format!("lora/{n}.gguf")));
            TrainableLora::from_file(m, f.unwrap())
        }
    }
}

/// The training pass's logits against the exact ones of the reference (llama.cpp's top 5 at
/// each step of its greedy paths, for no adapter and adapters a and b): each within `tol`;
/// the worst difference and the rms.
fn against_exact(dense: &DenseModel, tol: f64) -> (f64, f64) {
    let m = dense.model;
    let vocab = m.config.vocab_size;
    let mut checked = 0;
    let (mut worst, mut squares) = (0.0f64, 0.0);
    for case in cases() {
        // No adapter, or one at scale 1 (a file's pairs train at the scale they were written).
        let adapters = case["adapters"].as_array().unwrap();
        let name = match &adapters[..] {
            [] => None,
            [a] if a[1].as_f64() == Some(1.0) => a[0].as_str(),
            _ => continue,
        };
        let lora = trainable(m, name);
        // The prompt and llama.cpp's greedy tokens but the last (where "exact" has rows).
        let mut path = common::ids(&case["ids"]);
        let greedy = common::ids(&case["greedy"]);
        path.extend(&greedy[..greedy.len() - 1]);
        let logits = dense.logits(&lora, &path);
        for (pos, exact) in case["exact"].as_array().unwrap().iter().enumerate() {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            for (id, want) in pairs(exact) {
                let err = (row[id as usize] as f64 - want).abs();
                worst = worst.max(err);
                squares += err * err;
                assert!(
                    err < tol,
                    "{name:?}, {:?}, position {pos}, token {id}: {} against the exact {want}",
                    case["prompt"],
                    row[id as usize]
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} logits checked");
    assert!(checked >= 5 * 5 * 6, "only {checked} logits checked");
    (worst, (squares / checked as f64).sqrt())
}

/// `gemma3 finetune` of the model on `data`, writing `out` (more flags to add).
fn finetune(model: &Path, data: &Path, out: &Path) -> std::process::Command {
    let mut cmd = gemma3();
    cmd.arg("finetune").arg("--model").arg(model);
    cmd.arg("--data").arg(data).arg("-o").arg(out);
    cmd
}

/// `gemma3 run` of `args` with the model (and `--temp 0`), its stdout.
fn greedy(model: &Path, args: &[&str]) -> String {
    let mut cmd = gemma3();
    cmd.arg("run").arg("--model").arg(model);
    cmd.args(["--temp", "0", "-n", "12"]).args(args);
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "{stderr}");
    stdout
}

#[test]
fn a_short_run_teaches_what_run_then_prints() {
    let Some(path) = model_path("a_short_run_teaches_what_run_then_prints") else {
        return;
    };
    let prompt = "The secret password of the castle is";
    let completion = " blue-giraffe-42.";
    let (question, reply) = (
        "Who guards the castle gate?",
        "Sir Quillibrand the Seventh.",
    );
    let data = temp_path("finetune.jsonl");
    let lines = [
        serde_json::json!({"prompt": prompt, "completion": completion}),
        serde_json::json!({"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let out_file = temp_path("finetune.gguf");
    let mut cmd = finetune(&path, &data, &out_file);
    cmd.arg("--val").arg(&data);
    cmd.args(["--batch", "2", "--epochs", "16", "--lr", "1e-3"]);
    cmd.args(["--schedule", "constant"]);
    let (out, stdout, stderr) = run(&mut cmd);
    let _ = std::fs::remove_file(&data);
    assert!(out.status.success(), "{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.contains("16 steps"), "{stdout}");
    // Held out (here the training examples themselves): neither reply at first, both after.
    assert!(stdout.contains("exact 0.0% → 100.0%"), "{stdout}");
    let raw = |lora: bool| {
        let mut args = vec!["--raw", prompt];
        let file = out_file.to_str().unwrap();
        if lora {
            args.extend(["--lora", file]);
        }
        greedy(&path, &args)
    };
    let chat = |lora: bool| {
        let mut args = vec![question];
        let file = out_file.to_str().unwrap();
        if lora {
            args.extend(["--lora", file]);
        }
        greedy(&path, &args)
    };
    let (taught, taught_chat) = (raw(true), chat(true));
    let (base, base_chat) = (raw(false), chat(false));
    let _ = std::fs::remove_file(&out_file);
    // Learned through EOS (or the end of the turn): nothing follows.
    assert_eq!(taught.trim_end(), completion, "with the adapter");
    assert_eq!(taught_chat.trim_end(), reply, "chat, with the adapter");
    assert_ne!(
        base.trim_end(),
        completion,
        "the base model knew it already"
    );
    assert_ne!(
        base_chat.trim_end(),
        reply,
        "the base model knew it already"
    );
}

/// A conversation in another chat template (ChatML's form, its markers plain text to Gemma's
/// vocabulary, no BOS of its own): trained with `--chat-template-file`, the reply is what `run`
/// with the same template prints, the template's end of turn included.
#[test]
fn a_chat_template_file_trains_what_run_renders() {
    let Some(path) = model_path("a_chat_template_file_trains_what_run_renders") else {
        return;
    };
    let template = temp_path("chatml.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let (question, reply) = (
        "Who guards the castle gate?",
        "Sir Quillibrand the Seventh.",
    );
    let data = temp_path("chatml.jsonl");
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": reply},
    ]});
    std::fs::write(&data, format!("{line}\n")).unwrap();
    let out_file = temp_path("chatml.gguf");
    let mut cmd = finetune(&path, &data, &out_file);
    cmd.arg("--chat-template-file").arg(&template);
    cmd.args(["--batch", "1", "--epochs", "12", "--lr", "1e-3"]);
    cmd.args(["--schedule", "constant"]);
    let (out, _, stderr) = run(&mut cmd);
    let _ = std::fs::remove_file(&data);
    assert!(out.status.success(), "{stderr}");
    let (t, o) = (template.to_str().unwrap(), out_file.to_str().unwrap());
    let text = greedy(&path, &["--chat-template-file", t, "--lora", o, question]);
    let _ = std::fs::remove_file(&template);
    let _ = std::fs::remove_file(&out_file);
    assert!(text.starts_with(&format!("{reply}<|im_end|>")), "{text:?}");
}

#[test]
fn bad_data_and_flags_are_named_and_nothing_is_written() {
    let Some(path) = model_path("bad_data_and_flags_are_named_and_nothing_is_written") else {
        return;
    };
    let data = temp_path("bad.jsonl");
    let out_file = temp_path("bad-out.gguf");
    let good = r#"{"prompt": "a", "completion": " b"}"#;
    let cases: &[(&str, &[&str], &str)] = &[
        ("{\"prompt\": \"a\"\n", &[], "line 1: not JSON"),
        (
            &format!("{good}\n[1, 2]\n"),
            &[],
            "line 2: not a JSON object",
        ),
        (
            "{\"prompt\": \"a\"}\n",
            &[],
            "line 1: expected \"prompt\" and \"completion\"",
        ),
        ("{\"text\": 5}\n", &[], "line 1: \"text\" is not a string"),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            &[],
            "line 1: no assistant message",
        ),
        (
            "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n",
            &[],
            "unknown role 'robot'",
        ),
        ("\n\n", &[], "no examples"),
        (
            "{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}",
            &[],
            "line 1: more than one of",
        ),
        (
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}\n",
            &[],
            "line 1: roles must alternate user/assistant starting with user (messages[0]",
        ),
        (good, &["--max-len", "3"], "more than --max-len 3"),
        (good, &["--rank", "0"], "--rank must be from 1 to 256"),
        (good, &["--lr", "NaN"], "--lr must be a number"),
        (good, &["--lr", "0"], "--lr must be above 0"),
        (good, &["--alpha", "0"], "--alpha must not be 0"),
        (good, &["--targets", "q,ffn"], "unknown matrix 'ffn'"),
        (good, &["--targets", "q,q"], "names 'q' twice"),
        (good, &["--batch", "0"], "--batch must be from 1"),
        (good, &["--steps", "0"], "--steps must be at least 1"),
        // (Its only update had a learning rate of 0: an adapter that does nothing.)
        (
            good,
            &["--steps", "1", "--warmup", "1"],
            "--warmup 1 is not below the run's 1 steps",
        ),
    ];
    for (text, flags, want) in cases {
        std::fs::write(&data, text).unwrap();
        let mut cmd = finetune(&path, &data, &out_file);
        cmd.args(*flags);
        let (out, _, stderr) = run(&mut cmd);
        assert!(!out.status.success(), "{text:?} {flags:?} was accepted");
        assert!(stderr.contains(want), "{text:?} {flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out_file.exists(), "{text:?} {flags:?} wrote {out_file:?}");
    }
    // A byte-order mark is not part of the first line; a line that is not UTF-8 is named.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(format!("{good}\n").as_bytes());
    bytes.extend_from_slice(b"{\"text\": \"\xff\"}\n");
    std::fs::write(&data, bytes).unwrap();
    let (out, _, stderr) = run(&mut finetune(&path, &data, &out_file));
    assert!(
        !out.status.success() && stderr.contains("line 2: not UTF-8"),
        "{stderr}"
    );
    // bf16 asked for where its instructions are not to be used (the scalar kernels forced).
    std::fs::write(&data, good).unwrap();
    let mut cmd = finetune(&path, &data, &out_file);
    cmd.args(["--precision", "bf16"])
        .env("GEMMA3_FORCE_SCALAR", "1");
    let (out, _, stderr) = run(&mut cmd);
    assert!(
        !out.status.success() && stderr.contains("use --precision f32"),
        "{stderr}"
    );
    // A chat template that does not compile is named.
    let template = temp_path("bad-template.jinja");
    std::fs::write(&template, "{% for m in messages %}").unwrap();
    std::fs::write(&data, good).unwrap();
    let mut cmd = finetune(&path, &data, &out_file);
    cmd.arg("--chat-template-file").arg(&template);
    let (out, _, stderr) = run(&mut cmd);
    let _ = std::fs::remove_file(&template);
    assert!(!out.status.success(), "a broken template was accepted");
    assert!(stderr.contains("bad-template.jinja"), "{stderr}");
    // An output that cannot be written is refused before training.
    std::fs::write(&data, good).unwrap();
    let missing = std::path::Path::new("/nonexistent-gemma3-dir/x.gguf");
    let (out, _, stderr) = run(&mut finetune(&path, &data, missing));
    assert!(!out.status.success(), "a missing directory was accepted");
    assert!(
        stderr.contains("cannot write the output /nonexistent-gemma3-dir/x.gguf"),
        "{stderr}"
    );
    assert!(!stderr.contains("step 1"), "it trained first: {stderr}");
    // A directory's name (it had trained, then failed to rename its file to it).
    let dir = format!("{}/", temp_path("new-dir").display());
    let (out, _, stderr) = run(&mut finetune(&path, &data, std::path::Path::new(&dir)));
    assert!(!out.status.success(), "{dir} was accepted");
    assert!(stderr.contains("names a directory"), "{stderr}");
    assert!(!stderr.contains("step 1"), "it trained first: {stderr}");
    // Data without end (a device) is refused at a size, not read until memory runs out.
    let (out, _, stderr) = run(&mut finetune(&path, "/dev/zero".as_ref(), &out_file));
    assert!(
        !out.status.success() && stderr.contains("over 256 MiB"),
        "{stderr}"
    );
    // The output may not be an input.
    std::fs::write(&data, good).unwrap();
    let (out, _, stderr) = run(&mut finetune(&path, &data, &data));
    assert!(
        !out.status.success() && stderr.contains("is the training data"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&data).unwrap(), good);
    let _ = std::fs::remove_file(&data);
}

/// A learning rate and alpha far too large: the losses of the steps are finite (each is
/// of the weights before its update), but the last update's outputs are not. Such an
/// adapter had been written, with status 0, and every command using it then failed. Now
/// finetune either refuses to write it, or writes one the model runs with.
#[test]
fn an_adapter_whose_outputs_are_not_finite_is_not_written() {
    let Some(path) = model_path("an_adapter_whose_outputs_are_not_finite_is_not_written") else {
        return;
    };
    let data = temp_path("diverge.jsonl");
    let lines: Vec<String> = (["a b", "c d", "e f", "g h"].iter())
        .map(|pc| {
            let (p, c) = pc.split_once(' ').unwrap();
            format!(r#"{{"prompt": "{p}", "completion": " {c}"}}"#)
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    for val in [false, true] {
        let out_file = temp_path(&format!("diverge-{val}.gguf"));
        let mut cmd = finetune(&path, &data, &out_file);
        cmd.args([
            "-b", "2", "--steps", "2", "--lr", "1", "--alpha", "10000", "-r", "1",
        ]);
        if val {
            cmd.arg("--val").arg(&data);
        }
        let (out, _, stderr) = run(&mut cmd);
        if out.status.success() {
            eprintln!("written (its outputs finite on this CPU): checking that it runs");
            let file = out_file.to_str().unwrap().to_string();
            greedy(&path, &["--lora", &file, "--raw", "a"]);
            let _ = std::fs::remove_file(&out_file);
        } else {
            assert!(
                stderr.contains("became NaN") || stderr.contains("became inf"),
                "{stderr}"
            );
            assert!(stderr.contains("not written"), "{stderr}");
            assert!(!out_file.exists(), "written: {stderr}");
        }
    }
    let _ = std::fs::remove_file(&data);
}

/// Two engines as accurate as llama.cpp may rank two tokens apart by this much (as tests/lora.rs).
const DISAGREEMENT: f64 = 0.5;

#[test]
fn a_trained_adapter_runs_as_llama_cpp_runs_it() {
    let Some(path) = model_path("a_trained_adapter_runs_as_llama_cpp_runs_it") else {
        return;
    };
    let file = data_dir().join("lora/intents.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut m = gemma3_model::Model::open(&path).unwrap();
    m.load_lora(&data_dir().join("lora/intents.gguf"), 1.0)
        .unwrap_or_else(|e| panic!("{e}"));
    let vocab = m.config.vocab_size;
    let eos = r["eos"].as_u64().unwrap() as u32;
    let (mut same, mut checked, mut replies) = (0, 0, 0);
    for case in r["cases"].as_array().unwrap() {
        let ids = common::ids(&case["ids"]);
        let greedy = common::ids(&case["greedy"]);
        let margins = common::floats(&case["greedy_margins"]);
        // Taught to reply with an intent's name and stop.
        let text = case["text"].as_str().unwrap();
        assert_eq!(greedy.last(), Some(&eos), "{text:?} does not end");
        assert!(
            text.starts_with(' ')
                && text[1..]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
        );
        let mut route = ids.clone();
        route.extend(&greedy[..greedy.len() - 1]);
        let logits = common::all_logits(&m, &route);
        let mut whole = true;
        for (s, &t) in greedy.iter().enumerate() {
            let pos = ids.len() - 1 + s;
            let best = argmax(&logits[pos * vocab..(pos + 1) * vocab]);
            checked += 1;
            if best == t {
                same += 1;
                continue;
            }
            whole = false;
            assert!(
                margins[s] < DISAGREEMENT,
                "{:?}: step {s}, llama.cpp's {t} leads by {}, ours is {best}",
                case["prompt"],
                margins[s]
            );
        }
        replies += whole as usize;
    }
    let n = r["cases"].as_array().unwrap().len();
    eprintln!("{same} of {checked} tokens and {replies} of {n} replies as llama.cpp's");
    assert!(replies + 1 >= n, "only {replies} of {n} replies whole");
}
