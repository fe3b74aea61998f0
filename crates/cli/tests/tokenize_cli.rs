//! `gemma3 tokenize --json` against llama.cpp's and the Hugging Face tokenizer's ids
//! (reference.json `tokenize`).

mod common;

use common::{gemma3, ids, reference, run};

fn tokenize(path: &std::path::Path, text: &str, special: bool) -> Vec<u32> {
    let mut cmd = gemma3();
    cmd.args(["tokenize", "--json", "--model"]).arg(path);
    if special {
        cmd.arg("--special");
    }
    let (out, stdout, stderr) = run(cmd.arg("--").arg(text));
    assert!(
        out.status.success(),
        "gemma3 tokenize {text:?} failed: {stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout:?}: {e}"))
}

#[test]
fn tokenize_json_equals_llama_cpp_ids() {
    let Some(path) = common::model_path("tokenize_json_equals_llama_cpp_ids") else {
        return;
    };
    let cases = reference()["tokenize"].as_array().unwrap();
    let pick = [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "你好，世界！今天天气很好，我们去公园散步吧。",
        "   leading spaces and  double  spaces ",
        "",
        "mixed\r\nline\rendings\n",
        "🙂🙂🙂🙂🙂🙂🙂🙂",
    ];
    for text in pick {
        let case = cases
            .iter()
            .find(|c| c["text"] == text)
            .unwrap_or_else(|| panic!("{text:?} is not in the reference"));
        assert_eq!(
            tokenize(&path, text, false),
            ids(&case["llama_cpp"]),
            "{text:?}"
        );
    }
}

#[test]
fn tokenize_special_parses_the_chat_markers_like_hf() {
    let Some(path) = common::model_path("tokenize_special_parses_the_chat_markers_like_hf") else {
        return;
    };
    let text = "<start_of_turn>user\nhi<end_of_turn>";
    let case = reference()["tokenize"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"] == text)
        .unwrap();
    // With --special the markers are single tokens (as the HF tokenizer parses them) ...
    let hf = ids(&case["hf"]);
    assert_eq!(tokenize(&path, text, true), hf);
    assert_eq!(hf, [2, 105, 2364, 107, 2202, 106]);
    // ... without it they are text, as llama.cpp tokenizes them when specials are off.
    assert_eq!(tokenize(&path, text, false), ids(&case["llama_cpp"]));
}
