//! `--chat-template-file` and `--verbose-prompt` on the command line: the
//! prompt shown is the template's text as Python's jinja2 renders it (the
//! engine's golden, `crates/engine/tests/data/chat_templates.json`), and a
//! template that does not compile is an error naming the file.

mod common;

use common::{gemma3, run};
use serde_json::Value;

#[test]
fn cli_renders_with_a_chat_template_file() {
    let Some(path) = common::model_path("cli_renders_with_a_chat_template_file") else {
        return;
    };
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("chat_templates.json")).unwrap())
            .unwrap();
    let want = |template: &str, label: &str| {
        let c = (golden["cases"].as_array().unwrap().iter())
            .find(|c| {
                c["template"] == template
                    && c["label"] == label
                    && c["add_generation_prompt"] == true
            })
            .unwrap();
        c["text"].as_str().unwrap().to_string()
    };
    let shown = |extra: &[&str]| {
        let mut cmd = gemma3();
        cmd.args([
            "run",
            "--model",
            path.to_str().unwrap(),
            "--quiet",
            "--verbose-prompt",
        ])
        .args(["--temp", "0", "-n", "1", "--system", "Be brief."])
        .args(extra)
        .arg("Hi");
        let (out, _, stderr) = run(&mut cmd);
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let chatml = data.join("chatml_chat_template.jinja");
    let stderr = shown(&["--chat-template-file", chatml.to_str().unwrap()]);
    let text = want("chatml_chat_template.jinja", "system folded");
    assert!(
        stderr.starts_with(&text),
        "{stderr:?} does not start with {text:?}"
    );
    // Without one: Gemma's format, as Gemma's own template renders it.
    let stderr = shown(&[]);
    let text = want("gemma3_chat_template.jinja", "system folded");
    assert!(
        stderr.starts_with(&text),
        "{stderr:?} does not start with {text:?}"
    );

    let bad = common::temp_path("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}").unwrap();
    let mut cmd = gemma3();
    cmd.args([
        "run",
        "--model",
        path.to_str().unwrap(),
        "-n",
        "1",
        "--chat-template-file",
    ])
    .arg(&bad)
    .arg("Hi");
    let (out, _, stderr) = run(&mut cmd);
    std::fs::remove_file(&bad).ok();
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jinja") && stderr.contains("chat template"),
        "{stderr}"
    );
}
