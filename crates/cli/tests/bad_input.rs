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
    fails_with(&["bench", "-t", "1,0"], Some(&p), &["thread counts", "0"]);
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
