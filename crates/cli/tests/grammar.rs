//! Constrained generation against llama.cpp (`tests/data/grammar.json`, from
//! `scripts/llama_cpp_grammar.py`: six GBNF grammars, the tokens llama.cpp's
//! grammar sampler and greedy choice pick, with its raw logits at each step),
//! and the CLI's grammar and JSON-schema flags as a user gives them.
//!
//! As in greedy.rs, llama.cpp rounds differently from us, so where its logit
//! of our token is within `NEAR_TIE` of its own choice a correct engine may
//! take the other: the paths are compared up to the first such step.

mod common;

use common::{gemma3, ids, model, run};
use gemma3_engine::{GenerateParams, GrammarSpec, Grammars, Session};

const NEAR_TIE: f64 = 0.1;

/// Each case's grammar as a regular expression, written by hand from the
/// GBNF (tests/data/grammar.json, in order): every output must match it.
const LANGUAGES: [(&str, &str); 6] = [
    ("sentiment label", r"^ (positive|negative)$"),
    ("list of numbers", r"^ [0-9]+(, ?[0-9]+){0,6}\.$"),
    (
        "json-like record",
        r#"^ \{ ?"name": "[^"\\\n]{1,40}", ?"age": [1-9][0-9]{0,2}, ?"city": "[^"\\\n]{1,40}" ?\}$"#,
    ),
    (
        "yes or no with a reason",
        r"^ (Yes|No)[.,] [A-Za-z ,']{1,60}\.$",
    ),
    ("chat turn, one word", r"^[A-Z][a-z]+$"),
    ("anything but a digit", r"^[^0-9\n]{1,30}\n$"),
];

fn cases() -> Vec<serde_json::Value> {
    let p = common::data_dir().join("grammar.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("grammar.json")).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn greedy_under_a_grammar_matches_llama_cpp() {
    let Some((m, tok)) = model("greedy_under_a_grammar_matches_llama_cpp") else {
        return;
    };
    let grammars = Grammars::new(tok).expect("grammars");
    let sp = tok.specials();
    let ends = vec![sp.eos, sp.end_of_turn.unwrap()];
    let mut failures = Vec::new();
    let mut whole = 0;
    let cases = cases();
    assert_eq!(cases.len(), 6);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        assert_eq!(
            gemma3_engine::encode_prompt(tok, case["prompt"].as_str().unwrap()),
            prompt_ids,
            "{name}: prompt ids"
        );
        let steps = case["steps"].as_array().unwrap();
        // llama.cpp's tokens, then whether it ended (an end token) or ran out.
        let want: Vec<u32> = steps
            .iter()
            .filter(|s| !s["end"].as_bool().unwrap())
            .map(|s| s["token"].as_u64().unwrap() as u32)
            .collect();
        let ended = steps.last().unwrap()["end"].as_bool().unwrap();
        let spec = GrammarSpec::Gbnf(case["grammar"].as_str().unwrap().into());
        let params = GenerateParams {
            stop_tokens: ends.clone(),
            constraint: Some(grammars.compile(&spec).expect("compiles")),
            ..GenerateParams::greedy(case["max_tokens"].as_u64().unwrap() as usize)
        };
        let mut s = Session::new(m, 512);
        let g = s
            .generate(tok, &prompt_ids, &params, |_| true)
            .expect("generates");
        // Whatever llama.cpp did, ours is in the grammar's language (the
        // chat case runs out of tokens inside its one long word, which
        // every prefix of two letters or more matches).
        let (lang_name, lang) = LANGUAGES[cases.iter().position(|c| c == case).unwrap()];
        assert_eq!(lang_name, name);
        let re = regex::Regex::new(lang).unwrap();
        assert!(
            re.is_match(&g.text),
            "{name}: {:?} is not in {lang}",
            g.text
        );
        // (And llama.cpp's text is, too: the expressions are the grammars.)
        assert!(
            re.is_match(case["text"].as_str().unwrap()),
            "{name}: llama.cpp's text"
        );
        let matched = g
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        if matched == want.len() && g.tokens.len() == want.len() {
            // Same tokens; and the same end: the grammar's, or the budget.
            let finish = if ended {
                gemma3_engine::FinishReason::Stop
            } else {
                gemma3_engine::FinishReason::Length
            };
            assert_eq!(g.finish, finish, "{name}");
            eprintln!("{name}: all {matched} tokens match: {:?}", g.text);
            whole += 1;
            continue;
        }
        // The first difference must be a near-tie in llama.cpp's own logits
        // (its row holds our token among its 20 best, or the ends).
        let step = &steps[matched];
        let theirs = step["logit"].as_f64().unwrap();
        let ours_tok = g.tokens.get(matched).copied();
        let ours = ours_tok.and_then(|t| {
            step["top20"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p[0].as_u64() == Some(t as u64))
                .map(|p| p[1].as_f64().unwrap())
        });
        eprintln!(
            "{name}: {matched} tokens match; then llama.cpp {} ({theirs:.3}), ours {ours_tok:?} ({ours:?})\n  llama.cpp: {:?}\n  ours:      {:?}",
            step["token"], case["text"], g.text
        );
        if !ours.is_some_and(|x| (theirs - x).abs() < NEAR_TIE) {
            failures.push(format!(
                "{name}: token {matched} differs from llama.cpp's, not at a near-tie (ours: {:?}, llama.cpp: {:?})",
                g.text, case["text"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        whole >= 4,
        "only {whole} of 6 grammars gave llama.cpp's whole output"
    );
}

#[test]
fn cli_grammar_and_json_schema_flags() {
    let Some(path) = common::model_path("cli_grammar_and_json_schema_flags") else {
        return;
    };
    let path = path.to_str().unwrap();
    // A label from a fixed set: llama.cpp's text for this case.
    let case = &cases()[0];
    let label = |sampling: &[&str]| {
        let mut cmd = gemma3();
        cmd.args(["run", "--model", path, "--raw", "--quiet"])
            .args(sampling)
            .args(["--grammar", case["grammar"].as_str().unwrap()])
            .arg(case["prompt"].as_str().unwrap());
        run(&mut cmd)
    };
    let (out, stdout, stderr) = label(&["--temp", "0"]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim_end_matches('\n'),
        case["text"].as_str().unwrap()
    );

    // Sampled, too: whatever the draw, a label (a token the grammar refuses
    // is drawn again from the masked row).
    for seed in ["1", "2", "3"] {
        let (out, stdout, stderr) = label(&["--temp", "1.5", "--top-k", "0", "--seed", seed]);
        assert!(out.status.success(), "{stderr}");
        let got = stdout.trim_end_matches('\n');
        assert!(
            got == " positive" || got == " negative",
            "seed {seed}: {got:?}"
        );
    }

    // A schema: the output is one JSON object it accepts (an integer age in
    // range, a name, a city from the enum), and generation ends there.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"enum": ["Paris", "London", "Rome"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    });
    let file = common::temp_path("schema.json");
    std::fs::write(&file, schema.to_string()).unwrap();
    let (out, stdout, stderr) = run(gemma3().args([
        "run",
        "--model",
        path,
        "--raw",
        "--temp",
        "0",
        "-n",
        "80",
        "--json-schema-file",
        file.to_str().unwrap(),
        "Extract the person as JSON.\nText: Alice Smith is 30 years old and lives in Paris.\nJSON:",
    ]));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finish: Stop"), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON: {e}: {stdout:?}"));
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 3, "{v}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 30),
        "{v}"
    );
    assert!(o["age"].as_u64().is_some_and(|a| a <= 150), "{v}");
    assert!(
        ["Paris", "London", "Rome"].contains(&o["city"].as_str().unwrap_or("")),
        "{v}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn cli_refuses_bad_grammars_by_name() {
    let Some(path) = common::model_path("cli_refuses_bad_grammars_by_name") else {
        return;
    };
    let bad = [
        (
            vec!["--grammar", "root ::= item"],
            "--grammar: GBNF grammar: rule 'item' is used but never defined",
        ),
        (
            vec!["--grammar", "root ::= \"a"],
            "--grammar: GBNF grammar: line 1: unterminated string literal",
        ),
        (vec!["-j", "{\"type\": "], "--json-schema: not valid JSON"),
        (
            vec!["-j", "[1]"],
            "--json-schema: invalid grammar: a JSON schema must be an object",
        ),
        (
            vec![
                "-j",
                "{\"type\": \"integer\", \"minimum\": 5, \"maximum\": 1}",
            ],
            "--json-schema: invalid grammar",
        ),
        (
            vec!["--grammar-file", "/nonexistent/g.gbnf"],
            "reading the grammar from /nonexistent/g.gbnf",
        ),
    ];
    for (args, want) in bad {
        let mut cmd = gemma3();
        cmd.arg("run").arg("--model").arg(&path);
        cmd.args(["--raw", "-n", "4"]).args(&args).arg("Hello");
        let (out, _, stderr) = run(&mut cmd);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Two constraints at once: clap refuses.
    let (out, _, stderr) = run(gemma3().arg("run").arg("--model").arg(&path).args([
        "--raw",
        "--grammar",
        "root ::= \"a\"",
        "-j",
        "{}",
        "Hello",
    ]));
    assert!(!out.status.success());
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
