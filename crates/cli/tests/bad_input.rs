//! Bad input to the `gemma3` binary: broken or foreign model files and invalid flags must give
//! a clear error on stderr and a non-zero exit, never a panic.
//!
//! Model files are written under the system temp dir: truncated copies of the real model,
//! random bytes, and variants of a tiny synthetic gemma3 GGUF (crates/model/tests/common).

mod common;

#[path = "../../model/tests/common/tiny.rs"]
mod tiny;

use common::{gemma3, run, temp_path};
use gemma3_gguf::GgmlType;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tiny::{tiny_writer, tiny_writer_with, TinySpec};

/// Run `gemma3 ARGS`; assert it fails cleanly with every `needles` in stderr; return stderr.
fn fails_with(args: &[&str], model: Option<&Path>, needles: &[&str]) -> String {
    let mut cmd = gemma3();
    cmd.args(args);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(
        !out.status.success(),
        "gemma3 {args:?} succeeded; stdout {stdout:?}"
    );
    assert_eq!(out.status.code(), Some(1), "gemma3 {args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "gemma3 {args:?} panicked: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "gemma3 {args:?}: stderr lacks {n:?}: {stderr}"
        );
    }
    stderr
}

/// A model file in the temp dir, removed when dropped. Each test uses its own name (tests run
/// in parallel threads).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn write_tiny(name: &str, w: &gemma3_gguf::GgufWriter) -> TempFile {
    let p = temp_path(name);
    w.write_to_path(&p).expect("writing a tiny model");
    TempFile(p)
}

fn tiny_model(name: &str) -> TempFile {
    write_tiny(name, &tiny_writer(&TinySpec::default()).0)
}

#[test]
fn the_tiny_model_itself_runs() {
    // The positive control for the tests below that break one thing in it.
    let p = tiny_model("tiny-control.gguf");
    let (out, stdout, stderr) = run(gemma3().args(["run", "--model"]).arg(&*p).args([
        "--raw", "--ctx", "64", "--temp", "0", "-n", "4", "--quiet", "ab",
    ]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.ends_with('\n'), "{stdout:?}");
    assert!(
        !stderr.contains("is full"),
        "-n ended it, not the context: {stderr}"
    );
}

#[test]
fn a_kernel_table_the_cpu_cannot_run_is_refused() {
    let p = tiny_model("tiny-kernels.gguf");
    let info = |env: &[(&str, &str)]| {
        let mut c = gemma3();
        c.env_remove("GEMMA3_FORCE_SCALAR")
            .env_remove("GEMMA3_KERNELS")
            .args(["info", "--model"])
            .arg(&*p);
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c)
    };
    // The scalar table exists everywhere, and info names the table it runs.
    let (out, stdout, stderr) = info(&[("GEMMA3_KERNELS", "scalar")]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("kernels: scalar;"), "{stdout}");
    for (env, needles) in [
        (
            &[("GEMMA3_KERNELS", "avx9000")][..],
            &["GEMMA3_KERNELS=\"avx9000\"", "it runs: scalar"][..],
        ),
        (
            &[("GEMMA3_KERNELS", "avx2"), ("GEMMA3_FORCE_SCALAR", "1")][..],
            &["GEMMA3_FORCE_SCALAR", "\"avx2\""][..],
        ),
        (
            &[("GEMMA3_PREFETCH", "4k")][..],
            &["GEMMA3_PREFETCH=\"4k\"", "byte count"][..],
        ),
    ] {
        let (out, stdout, stderr) = info(env);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {stdout} {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{env:?}: stderr lacks {n:?}: {stderr}");
        }
    }
}

#[test]
fn truncated_model_files() {
    let Some(real) = common::model_path("truncated_model_files") else {
        return;
    };
    for (name, len) in [
        ("trunc-1MB.gguf", 1u64 << 20),
        ("trunc-100MB.gguf", 100 << 20),
    ] {
        let p = TempFile(temp_path(name));
        {
            let mut src = std::fs::File::open(&real).unwrap().take(len);
            let mut dst = std::fs::File::create(&*p).unwrap();
            std::io::copy(&mut src, &mut dst).unwrap();
            dst.flush().unwrap();
        }
        let err = fails_with(&["run", "--raw", "-n", "1", "hi"], Some(&p), &[name]);
        // A cut inside the metadata is reported as a count larger than "the bytes left in the
        // file" can hold; a cut inside the tensor data as truncation.
        assert!(
            err.to_lowercase().contains("truncat")
                || err.contains("bytes left in the file")
                || err.contains("past the end of the file"),
            "{name}: the error does not say the file is cut short: {err}"
        );
        eprintln!("{name}: {}", err.trim());
    }
}

#[test]
fn random_bytes_are_not_a_gguf() {
    let p = TempFile(temp_path("random.gguf"));
    let mut rng = tiny::Rng::new(99);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&*p, bytes).unwrap();
    let err = fails_with(&["run", "--raw", "-n", "1", "hi"], Some(&p), &["GGUF"]);
    eprintln!("{}", err.trim());
    // An empty file, too.
    let p = TempFile(temp_path("empty.gguf"));
    std::fs::write(&*p, b"").unwrap();
    fails_with(
        &["run", "--raw", "-n", "1", "hi"],
        Some(&p),
        &["empty.gguf"],
    );
}

#[test]
fn a_missing_file_is_named() {
    let p = temp_path("does-not-exist.gguf");
    let err = fails_with(
        &["run", "--raw", "-n", "1", "hi"],
        Some(&p),
        &["does-not-exist.gguf"],
    );
    assert!(
        err.contains("No such file") || err.contains("not found") || err.contains("cannot"),
        "{err}"
    );
    fails_with(&["info"], Some(&p), &["does-not-exist.gguf"]);
    fails_with(&["tokenize", "hi"], Some(&p), &["does-not-exist.gguf"]);
}

/// `run -f` with a prompt file that is not there names the file (exit 1),
/// before any model is read; two prompts at once (an argument and -p) are
/// a usage error (exit 2), as clap reports them.
#[test]
fn a_missing_prompt_file_is_named() {
    let p = temp_path("no-such-prompt.txt");
    let model = temp_path("no-model-needed.gguf");
    fails_with(
        &["run", "-f", p.to_str().unwrap()],
        Some(&model),
        &["reading the prompt", "no-such-prompt.txt"],
    );
    // Endless input is cut off, not read until memory runs out.
    fails_with(
        &["run", "-f", "/dev/zero"],
        Some(&model),
        &["/dev/zero", "over 8 MiB"],
    );
    let (out, _, stderr) = run(gemma3().args(["run", "-p", "a", "b"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn another_architecture_is_named() {
    let p = write_tiny(
        "llama-arch.gguf",
        &tiny_writer_with(&TinySpec::default(), "llama", None),
    );
    fails_with(
        &["run", "--raw", "-n", "1", "hi"],
        Some(&p),
        &["architecture", "llama"],
    );
}

#[test]
fn an_unsupported_tensor_type_is_named() {
    // Q8_K (ggml's activation format, never a weight type) blocks hold 256 elements: a
    // model 256 wide.
    let spec = TinySpec {
        d_model: 256,
        ..TinySpec::default()
    };
    let p = write_tiny(
        "q8k.gguf",
        &tiny_writer_with(
            &spec,
            "gemma3",
            Some(("blk.1.ffn_up.weight", GgmlType::Q8K)),
        ),
    );
    fails_with(
        &["run", "--raw", "-n", "1", "hi"],
        Some(&p),
        &["blk.1.ffn_up.weight", "Q8_K"],
    );
}

#[test]
fn invalid_flags_are_clear_errors() {
    let p = tiny_model("tiny-flags.gguf");
    let base = ["run", "--raw", "-n", "2"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .chain(&["hi"])
            .map(|s| s.to_string())
            .collect()
    };
    let args = with(&["--ctx", "0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, Some(&p), &["--ctx", "at least 1"]);
    let args = with(&["--ctx", "64", "--temp=-1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, Some(&p), &["temperature", "-1"]);
    let args = with(&["--ctx", "64", "--top-p", "2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, Some(&p), &["top_p", "2"]);
    // `--temp -1` (a separate word) is refused too, by the argument parser or the check.
    let args = with(&["--ctx", "64", "--temp", "-1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, _, stderr) = run(gemma3().args(&args).arg("--model").arg(&*p));
    assert!(
        !out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    let text = common::data_dir().join("GPL-3.txt");
    let text = text.to_str().unwrap();
    fails_with(&["ppl", "--ctx", "0", text], Some(&p), &["--ctx"]);
    fails_with(
        &["bench", "-p", "0", "-n", "0"],
        Some(&p),
        &["nothing to measure"],
    );
    fails_with(&["bench", "-r", "0"], Some(&p), &["--reps"]);
    fails_with(&["bench", "-t", "1,0"], Some(&p), &["--threads", "got 0"]);
    // More than 4 threads a core: the spinning workers took 23 s a token at 1024 on 2 cores.
    fails_with(
        &["bench", "-t", "100000"],
        Some(&p),
        &["--threads", "4 per core"],
    );
    fails_with(
        &["-t", "100000", "run", "--raw", "hi"],
        Some(&p),
        &["--threads", "4 per core"],
    );
    // Depth + length wrapped around usize and passed the context check.
    fails_with(
        &["bench", "-d", "18446744073709551615", "-p", "1", "-n", "0"],
        Some(&p),
        &["exceeds the context"],
    );
    fails_with(
        &["bench", "-p", "0", "-n", "18446744073709551615"],
        Some(&p),
        &["exceed the context"],
    );
    // The last generated token's position is depth + n − 1: 2040 + 8 fills the tiny
    // model's 2048 exactly (it had been refused), 2041 + 8 does not fit.
    let (out, _, stderr) = run(gemma3()
        .args([
            "bench",
            "-p",
            "0",
            "-n",
            "8",
            "-d",
            "2040",
            "-r",
            "1",
            "--no-warmup",
        ])
        .arg("--model")
        .arg(&*p));
    assert!(out.status.success(), "{stderr}");
    fails_with(
        &["bench", "-p", "0", "-n", "8", "-d", "2041"],
        Some(&p),
        &["exceed the context of 2048"],
    );
    fails_with(&["ppl", "--chunks", "0", text], Some(&p), &["--chunks"]);
    // A malformed value is the argument parser's error (status 2).
    let args = with(&["--ctx", "64", "--logit-bias", "12x"]);
    let (out, _, stderr) = run(gemma3().args(&args).arg("--model").arg(&*p));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ID+BIAS"), "{stderr}");
    let args = with(&["--ctx", "64", "--logit-bias", "300+1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(
        &args,
        Some(&p),
        &["--logit-bias", "token 300", "vocabulary of 300"],
    );
    fails_with(&["info", "--ctx", "0"], Some(&p), &["--ctx"]);
    fails_with(
        &["info", "--ctx", "4096"],
        Some(&p),
        &["--ctx 4096", "2048"],
    );
    // Named before the model loads: a missing file is not what is reported.
    let missing = temp_path("bench-missing.gguf");
    fails_with(
        &["bench", "-p", "0", "-n", "0"],
        Some(&missing),
        &["nothing to measure"],
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let p = tiny_model("tiny-long-prompt.gguf");
    let prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z";
    let f = gemma3_gguf::GgufFile::open(&*p).unwrap();
    let n = gemma3_engine::tokenizer_from_gguf(&f)
        .unwrap()
        .encode(prompt, true, false)
        .len();
    assert!(n > 16);
    fails_with(
        &["run", "--raw", "--ctx", "16", "-n", "1", prompt],
        Some(&p),
        &[&format!("prompt has {n} tokens but the context holds 16")],
    );
}

/// `bench` on a vocabulary of 300: its synthetic prompt divided by (vocab − 1000).
#[test]
fn bench_runs_on_a_small_vocabulary() {
    let p = tiny_model("tiny-bench.gguf");
    let (out, stdout, stderr) = run(gemma3()
        .args([
            "bench", "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--model",
        ])
        .arg(&*p));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("pp8") && stdout.contains("tg2"), "{stdout}");
}

/// A reader that goes away (`gemma3 run … | head -c1`) ends the command quietly with SIGPIPE's
/// status; a full disk is an error. Both had panicked in `println!`.
#[test]
fn a_closed_or_full_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let p = tiny_model("tiny-pipe.gguf");
    let mut child = gemma3()
        .args([
            "run", "--raw", "--ctx", "1024", "--temp", "0", "-n", "1000", "--quiet",
        ])
        .arg("--model")
        .arg(&*p)
        .arg("ab")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let (out, _, stderr) = run(gemma3().args(["info", "--model"]).arg(&*p).stdout(full));
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("No space left"), "{stderr}");
    }
}

/// A path that is no regular file: a directory gave "No such device", and a FIFO blocked.
#[test]
fn a_model_path_that_is_not_a_file_is_named() {
    let dir = std::env::temp_dir();
    let dir = dir.to_str().unwrap();
    fails_with(
        &["run", "--raw", "-n", "1", "--model", dir, "hi"],
        None,
        &["not a regular file"],
    );
}

/// `ppl` reads at most 64 MiB of text: /dev/zero had grown it to 19 GB, and 256 MiB of text
/// would take about 11 GB to tokenize.
#[test]
fn ppl_text_has_a_size_limit() {
    let p = tiny_model("tiny-ppl-zero.gguf");
    let big = TempFile(temp_path("sparse.txt"));
    std::fs::File::create(&*big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    fails_with(&["ppl", big.to_str().unwrap()], Some(&p), &["64 MiB"]);
}

/// Files a lenient reader would run with a silently wrong answer: each is refused, naming
/// what is wrong.
#[test]
fn inconsistent_model_files_are_refused() {
    use gemma3_gguf::{Array, GgufWriter, Value};
    let spec = TinySpec::default();
    let case = |name: &str, edit: &dyn Fn(&mut GgufWriter), needles: &[&str]| {
        let (mut w, _) = tiny_writer(&spec);
        edit(&mut w);
        let p = write_tiny(name, &w);
        fails_with(
            &["run", "--raw", "--ctx", "64", "-n", "2", "ab"],
            Some(&p),
            needles,
        );
    };
    // An optional key of another type is not read as its default (512).
    case(
        "swa-f32.gguf",
        &|w| w.add_kv("gemma3.attention.sliding_window", Value::F32(8.0)),
        &["gemma3.attention.sliding_window"],
    );
    case(
        "rope-u32.gguf",
        &|w| w.add_kv("gemma3.rope.freq_base", Value::U32(10000)),
        &["gemma3.rope.freq_base"],
    );
    for (file, v) in [("qpas-0.gguf", 0.0), ("qpas-nan.gguf", f32::NAN)] {
        case(
            file,
            &|w| w.add_kv("gemma3.attention.query_pre_attn_scalar", Value::F32(v)),
            &["query_pre_attn_scalar"],
        );
    }
    // Positive but absurd: the rotation's frequencies overflow, the scores' scale is 10²⁰,
    // or the heads' width makes 131072 values a token. (The first two loaded and made
    // every logit NaN; the third took 16.6 GB at 1024 heads × 4096 for 200 tokens.)
    case(
        "rope-tiny.gguf",
        &|w| w.add_kv("gemma3.rope.freq_base", Value::F32(1e-45)),
        &["gemma3.rope.freq_base", "not finite"],
    );
    case(
        "qpas-tiny.gguf",
        &|w| w.add_kv("gemma3.attention.query_pre_attn_scalar", Value::F32(1e-40)),
        &["query_pre_attn_scalar", "more than 16"],
    );
    case(
        "wide-heads.gguf",
        &|w| {
            w.add_kv("gemma3.attention.head_count", Value::U32(32));
            w.add_kv("gemma3.attention.key_length", Value::U32(4096));
            w.add_kv("gemma3.attention.value_length", Value::U32(4096));
        },
        &["gemma3.attention.head_count", "131072 values a token"],
    );
    // Tokenizer flags other than Gemma's (llama.cpp follows them; they had been ignored),
    // and an optional special id of the wrong type (it had been dropped).
    case(
        "no-bos.gguf",
        &|w| w.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        &["tokenizer.ggml.add_bos_token is false"],
    );
    case(
        "space-prefix.gguf",
        &|w| w.add_kv("tokenizer.ggml.add_space_prefix", Value::Bool(true)),
        &["tokenizer.ggml.add_space_prefix is true"],
    );
    case(
        "unk-string.gguf",
        &|w| w.add_kv("tokenizer.ggml.unknown_token_id", Value::String("3".into())),
        &["tokenizer.ggml.unknown_token_id"],
    );
    case(
        "pad-minus-one.gguf",
        &|w| w.add_kv("tokenizer.ggml.padding_token_id", Value::I32(-1)),
        &["tokenizer.ggml.padding_token_id"],
    );
    // block_count leaving out the file's last layer: not run on the other five.
    case(
        "fewer-blocks.gguf",
        &|w| w.add_kv("gemma3.block_count", Value::U32(5)),
        &["tensors", "blk.5."],
    );
    // One token more than the embedding has rows (ppl indexed past the logits).
    case(
        "long-vocab.gguf",
        &|w| {
            let (tokens, scores, types) = tiny::tiny_vocab(spec.vocab + 1);
            w.add_kv(
                "tokenizer.ggml.tokens",
                Value::Array(Array::String(tokens.into())),
            );
            w.add_kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
            w.add_kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
        },
        &["vocabulary has 301 tokens", "300 rows"],
    );
}

/// A vocabulary without Gemma's turn tokens has no chat format: `run` without `--raw`, and
/// `chat`, say so (the template had been tokenized as plain bytes, with no stop token).
#[test]
fn a_model_without_turn_tokens_has_no_chat() {
    use gemma3_gguf::{Array, Value};
    let spec = TinySpec::default();
    let (mut w, _) = tiny_writer(&spec);
    let (mut tokens, scores, types) = tiny::tiny_vocab(spec.vocab);
    assert_eq!(tokens[4], "<start_of_turn>");
    tokens[4] = "<turn_a>".into();
    tokens[5] = "<turn_b>".into();
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(tokens.into())),
    );
    w.add_kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    w.add_kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    let p = write_tiny("no-turns.gguf", &w);
    fails_with(
        &["run", "--ctx", "64", "-n", "2", "ab"],
        Some(&p),
        &["no chat format", "--raw"],
    );
    let (out, _, stderr) = run(gemma3()
        .args(["run", "--raw", "--ctx", "64", "-n", "2", "--model"])
        .arg(&*p)
        .arg("ab"));
    assert!(out.status.success(), "--raw still runs: {stderr}");
}

/// The tiny model in F32 with `edit` made to its weights, written to the temp dir.
fn tiny_f32_edited(
    name: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, tiny::TinyTensor>, &TinySpec),
) -> TempFile {
    let spec = TinySpec::default();
    let mut weights = tiny::tiny_weights(&spec);
    edit(&mut weights, &spec);
    let mut w = gemma3_gguf::GgufWriter::new();
    tiny::tiny_metadata(&mut w, &spec, "gemma3");
    for (name, t) in &weights {
        let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor(name, &t.dims, GgmlType::F32, bytes).unwrap();
    }
    write_tiny(name, &w)
}

/// An embedding of no rows is named as such (the message had expected Gemma's 262144).
#[test]
fn an_empty_vocabulary_dimension_is_named() {
    let p = tiny_f32_edited("no-rows.gguf", |w, spec| {
        let embd = w.get_mut("token_embd.weight").unwrap();
        embd.dims = vec![spec.d_model as u64, 0];
        embd.data.clear();
    });
    let e = fails_with(
        &["run", "--raw", "-n", "1", "ab"],
        Some(&p),
        &["token_embd.weight", "the vocabulary, must be from 1"],
    );
    assert!(!e.contains("262144"), "{e}");
}

/// NaN weights give NaN logits: an error, not a reply of token 0 after token 0.
#[test]
fn non_finite_logits_are_an_error() {
    // A NaN norm weight is refused when the model loads, naming the tensor.
    let p = tiny_f32_edited("nan-norm.gguf", |w, _| {
        w.get_mut("output_norm.weight").unwrap().data[0] = f32::NAN;
    });
    fails_with(
        &["run", "--raw", "--ctx", "64", "-n", "2", "ab"],
        Some(&p),
        &["output_norm.weight", "must be finite"],
    );
    let p = tiny_f32_edited("nan-matrix.gguf", |w, _| {
        w.get_mut("blk.0.attn_q.weight").unwrap().data[0] = f32::NAN;
    });
    fails_with(
        &[
            "run", "--raw", "--ctx", "64", "--temp", "0", "-n", "2", "ab",
        ],
        Some(&p),
        &["not finite"],
    );
    // cvector-generate had read NaN rows as "no difference" between the prompts.
    let (pos, neg) = (temp_path("nan-pos.txt"), temp_path("nan-neg.txt"));
    std::fs::write(&pos, "ab\nabc\n").unwrap();
    std::fs::write(&neg, "ba\ncba\n").unwrap();
    let cv = temp_path("nan-cv.gguf");
    let args = ["cvector-generate", "--positive-file", pos.to_str().unwrap()];
    let mut args = args.to_vec();
    args.extend([
        "--negative-file",
        neg.to_str().unwrap(),
        "-o",
        cv.to_str().unwrap(),
    ]);
    fails_with(&args, Some(&p), &["hidden states are not finite"]);
    assert!(!cv.exists());
    let _ = (std::fs::remove_file(&pos), std::fs::remove_file(&neg));
    // One NaN logit among finite ones (the last token's row of the tied head): greedy
    // skipped it, and sampling's NaN probabilities fell through to an arbitrary token,
    // both with status 0 and plausible text.
    let p = tiny_f32_edited("nan-row.gguf", |w, spec| {
        let embd = w.get_mut("token_embd.weight").unwrap();
        let last_row = embd.data.len() - spec.d_model;
        embd.data[last_row..].fill(f32::NAN);
    });
    for sampling in [
        &["--temp", "0"][..],
        &["--temp", "1", "--seed", "3"],
        &["--temp", "1", "--top-k", "0", "--seed", "3"],
    ] {
        let mut args = vec!["run", "--raw", "--ctx", "64", "-n", "2"];
        args.extend(sampling);
        args.push("ab");
        fails_with(&args, Some(&p), &["not finite"]);
    }
    // classify's log-softmax over that row was NaN, and the labels' scores with it: it
    // printed a label (`null` scores under --json) with status 0.
    for json in [&[][..], &["--json"]] {
        let mut args = vec!["classify", "-l", "a", "-l", "b"];
        args.extend(json);
        args.push("ab");
        fails_with(&args, Some(&p), &["not finite"]);
    }
}

#[test]
fn llama_cpp_minus_one_values_and_refused_combinations() {
    let p = tiny_model("tiny-minus-one.gguf");
    // llama.cpp's -1s: no limit but the context for -n, a random seed, and the whole
    // history for --repeat-last-n (0 turns the penalties off there, and now here).
    let (out, stdout, stderr) = run(gemma3().args(["run", "--model"]).arg(&*p).args([
        "--raw",
        "--ctx",
        "24",
        "-n",
        "-1",
        "--seed",
        "-1",
        "--repeat-penalty",
        "1.3",
        "--repeat-last-n",
        "-1",
        // The end tokens (<eos> 1, <end_of_turn> 5) banned, so only the context ends it.
        "--logit-bias",
        "1-100",
        "--logit-bias",
        "5-100",
        "ab",
    ]));
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.is_empty(), "{stderr}");
    // -n -1 ran to the context's end: prompt and generated tokens fill its 24 positions,
    // and the last token, drawn from the last position's logits, needs none.
    assert!(stderr.contains("finish: Length"), "{stderr}");
    // Said, since the text stops mid-way (a stop by -n is not).
    assert!(
        stderr.contains("the context of 24 tokens is full"),
        "{stderr}"
    );
    let count = |what: &str| -> usize {
        let at = stderr
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {stderr}"))
            + what.len();
        stderr[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        count("prompt: ") + count("generation: "),
        24 + 1,
        "{stderr}"
    );
    for bad in [
        &["-n", "-2"][..],
        &["-n", "0"],
        &["--seed", "-2"],
        &["--repeat-last-n", "-3"],
    ] {
        let mut args = vec!["run", "--raw", "--ctx", "24"];
        args.extend(bad);
        args.push("ab");
        let (out, _, stderr) = run(gemma3().args(&args).arg("--model").arg(&*p));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(bad[0]) || stderr.contains("--max-tokens"),
            "{args:?}: {stderr}"
        );
    }
    // --system has no place in a raw prompt: refused, where it was silently dropped.
    let (out, _, stderr) = run(gemma3().args(["run", "--model"]).arg(&*p).args([
        "--raw",
        "--system",
        "Be brief.",
        "ab",
    ]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--system"), "{stderr}");
}

/// A chat message too long for the context with nothing to /reset: the advice is to shorten
/// it or raise --ctx (it had been "/reset to start over", which cannot help); then the chat
/// goes on.
#[test]
fn a_chat_message_longer_than_the_context_says_what_helps() {
    use std::io::Write as _;
    let p = tiny_model("tiny-chat-long.gguf");
    let mut child = gemma3()
        .args(["chat", "--ctx", "12", "-n", "2", "--temp", "0", "--model"])
        .arg(&*p)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running gemma3 chat");
    let long = "abcd ".repeat(20);
    let mut stdin = child.stdin.take().unwrap();
    write!(stdin, "{long}\na\n/exit\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("shorten it, or start with a larger --ctx"),
        "{stderr}"
    );
    assert!(!stderr.contains("/reset to start over"), "{stderr}");
}

/// `embed`'s bad values: an unknown pooling or normalisation is a usage error
/// naming the choices (exit 2); an empty text, a missing file and a file of
/// empty lines are named (exit 1), before any model is read.
#[test]
fn embed_refuses_bad_values() {
    for (args, needle) in [
        (
            &["embed", "--pooling", "none", "x"][..],
            "one of mean, last, cls",
        ),
        (
            &["embed", "--embd-normalize", "1", "x"][..],
            "2 (unit Euclidean length) or -1",
        ),
        (&["embed"][..], "required"),
    ] {
        let (out, _, stderr) = run(gemma3().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let model = temp_path("no-model-needed.gguf");
    fails_with(&["embed", "a", ""], Some(&model), &["text 2 is empty"]);
    let missing = temp_path("no-such-texts.txt");
    fails_with(
        &["embed", "-f", missing.to_str().unwrap()],
        Some(&model),
        &["reading the texts", "no-such-texts.txt"],
    );
    fails_with(
        &["embed", "-f", "/dev/zero"],
        Some(&model),
        &["/dev/zero", "over 64 MiB"],
    );
    let blank = temp_path("blank-texts.txt");
    std::fs::write(&blank, "\n  \n").unwrap();
    fails_with(
        &["embed", "-f", blank.to_str().unwrap()],
        Some(&model),
        &["holds no text"],
    );
    // More than 2²⁰ texts (64 MiB of one-letter lines had taken 7.5 GB before the first).
    std::fs::write(&blank, "a\n".repeat((1 << 20) + 1)).unwrap();
    fails_with(
        &["embed", "-f", blank.to_str().unwrap()],
        Some(&model),
        &["holds more than 1048576 texts"],
    );
    std::fs::remove_file(&blank).ok();
}

/// `chat` with a --system text that leaves no room for any message stops at
/// start, naming --system, instead of refusing every line it is given.
#[test]
fn chat_refuses_a_system_text_that_fills_the_context() {
    let Some(real) = common::model_path("chat_refuses_a_system_text_that_fills_the_context") else {
        return;
    };
    let system = "word ".repeat(300);
    fails_with(
        &["chat", "--system", &system, "-c", "128"],
        Some(&real),
        &["--system takes", "context of 128"],
    );
}

/// `chat` reads a line of at most 8 MiB (as `run -f` a prompt), skips the
/// rest of a longer one and goes on: it had read a 1.5 GB line whole, 4.6 GB
/// of memory and rising, without a word.
#[test]
fn chat_skips_a_line_longer_than_any_context() {
    let Some(real) = common::model_path("chat_skips_a_line_longer_than_any_context") else {
        return;
    };
    let mut cmd = gemma3();
    cmd.args(["chat", "-n", "1", "--model"]).arg(&real);
    cmd.stdin(std::process::Stdio::piped());
    cmd.stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..12 {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = stdin.write_all(b"\nhi\n/exit\n");
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("that line is over 8 MiB"), "{stderr}");
    // The next line was read as a message, and answered.
    assert!(!out.stdout.is_empty(), "{stderr}");
}

/// A NaN block scale inside a layer's quantized matrix (as a damaged file
/// holds) ends in the non-finite error: the next 8-bit activation
/// quantizer had read the NaN as 0, and the real model answered
/// plausibly (an attn_q scale: "the capital of the country of the same";
/// a Q4_K ffn_down scale: an empty reply) with status 0.
#[test]
fn a_nan_block_scale_in_a_layer_is_an_error() {
    let Some(real) = common::model_path("a_nan_block_scale_in_a_layer_is_an_error") else {
        return;
    };
    let f = gemma3_gguf::GgufFile::open(&real).unwrap();
    for name in ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"] {
        // The first block's f16 scale (Q5_0 and Q4_K both start with it).
        let at = f.data_start() + f.tensor(name).unwrap().offset;
        let p = TempFile(temp_path(&format!("nan-scale-{name}.gguf")));
        std::fs::copy(&real, &*p).unwrap();
        {
            use std::io::{Seek, SeekFrom};
            let mut w = std::fs::OpenOptions::new().write(true).open(&*p).unwrap();
            w.seek(SeekFrom::Start(at)).unwrap();
            w.write_all(&[0x00, 0x7e]).unwrap(); // an f16 NaN
        }
        fails_with(
            &[
                "run",
                "--raw",
                "--temp",
                "0",
                "-n",
                "4",
                "The capital of France is",
            ],
            Some(&p),
            &["not finite"],
        );
    }
}

/// A model file's own `tokenizer.chat_template` renders its chats (a
/// fine-tune that switched to ChatML: the text is Python jinja2's, from the
/// engine's golden), and one that cannot be used leaves Gemma's format with
/// a warning instead of refusing the file.
#[test]
fn a_model_files_own_chat_template_is_used() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("chat_templates.json")).unwrap())
            .unwrap();
    let want = (golden["cases"].as_array().unwrap().iter())
        .find(|c| {
            c["template"] == "chatml_chat_template.jinja"
                && c["label"] == "one user turn"
                && c["add_generation_prompt"] == true
        })
        .and_then(|c| c["text"].as_str())
        .unwrap()
        .to_string();
    let with_template = |name: &str, template: &str| {
        let (mut w, _) = tiny_writer(&TinySpec::default());
        w.add_kv(
            "tokenizer.chat_template",
            gemma3_gguf::Value::String(template.into()),
        );
        write_tiny(name, &w)
    };
    let shown = |p: &Path| {
        run(gemma3().args(["run", "--model"]).arg(p).args([
            "--ctx",
            "512",
            "--temp",
            "0",
            "-n",
            "1",
            "--quiet",
            "--verbose-prompt",
            "Hi",
        ]))
    };
    let chatml = std::fs::read_to_string(data.join("chatml_chat_template.jinja")).unwrap();
    let p = with_template("tiny-chatml.gguf", &chatml);
    let (out, _, stderr) = shown(&p);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with(&want),
        "{stderr:?} does not start with {want:?}"
    );
    let (out, stdout, stderr) = run(gemma3().args(["info", "--model"]).arg(&*p));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("chat template the file's tokenizer.chat_template (Jinja"),
        "{stdout}"
    );

    let p = with_template("tiny-broken-template.gguf", "{% for m in messages %}");
    let (out, _, stderr) = shown(&p);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the model file's tokenizer.chat_template cannot be used"),
        "{stderr}"
    );
    assert!(
        stderr.contains("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
        "{stderr}"
    );
}

/// `pull` with a cache variable set but empty, or $XDG_CACHE_HOME relative, uses
/// ~/.cache/gemma3, where a verified model already is, and writes nothing in the current
/// directory (either once put the cache there, and started a 253 MB download into it).
#[test]
fn empty_or_relative_cache_variables_count_as_unset() {
    let Some(model) = common::model_path("empty_or_relative_cache_variables_count_as_unset") else {
        return;
    };
    let model = std::fs::canonicalize(model).unwrap();
    let home = temp_path("home");
    let cache = home.join(".cache").join("gemma3");
    std::fs::create_dir_all(&cache).unwrap();
    let cached = cache.join("gemma-3-270m-q4_k_m.gguf");
    std::os::unix::fs::symlink(&model, &cached).unwrap();
    let cwd = temp_path("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    for (var, value) in [
        ("XDG_CACHE_HOME", ""),
        ("GEMMA3_CACHE", ""),
        ("XDG_CACHE_HOME", "relative"),
    ] {
        let mut cmd = gemma3();
        cmd.arg("pull")
            .current_dir(&cwd)
            .env_remove("GEMMA3_MODEL")
            .env_remove("GEMMA3_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .env("HOME", &home)
            // (Nothing may be fetched: a pull that tried would fail.)
            .env("GEMMA3_PYTHON", "/bin/false")
            .env(var, value);
        let (out, stdout, stderr) = run(&mut cmd);
        assert!(out.status.success(), "{var}={value:?}: {stderr}");
        assert_eq!(stdout.trim(), cached.to_str().unwrap(), "{var}={value:?}");
        let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().collect();
        assert!(left.is_empty(), "{var}={value:?} wrote {left:?}");
    }
    std::fs::remove_dir_all(&home).ok();
    std::fs::remove_dir_all(&cwd).ok();
}
