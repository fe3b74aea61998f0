//! Chat templates against Python's jinja2: `tests/data/chat_templates.json`
//! holds each template's rendering of a few conversations by jinja2, set up
//! as transformers sets it up (`scripts/jinja_chat_reference.py`). Our
//! minijinja rendering of the same template files must give the same text
//! (or refuse where the template raised), and Gemma's built-in rendering
//! must give the text of Gemma's own template.

use gemma3_engine::{render_chat, ChatError, ChatTemplate, Message, Role};
use serde_json::Value;

/// A test file: Gemma 3's template in `src`, the rest in `tests/data`.
fn data(name: &str) -> String {
    let dir = if name.starts_with("gemma3") {
        "src"
    } else {
        "tests/data"
    };
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn messages(v: &Value) -> Vec<Message> {
    (v.as_array().unwrap().iter())
        .map(|m| {
            let role = Role::parse(m["role"].as_str().unwrap()).unwrap();
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

fn cases() -> Vec<Value> {
    let v: Value = serde_json::from_str(&data("chat_templates.json")).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn jinja_templates_render_as_jinja2_does() {
    let mut checked = 0;
    for c in cases() {
        let name = c["template"].as_str().unwrap();
        let t = ChatTemplate::jinja(&data(name), "<bos>", "<eos>").unwrap();
        let got = t.render(
            &messages(&c["messages"]),
            c["add_generation_prompt"].as_bool().unwrap(),
        );
        let what = format!(
            "{name}, {}, generation prompt {}",
            c["label"], c["add_generation_prompt"]
        );
        match (&got, c["text"].as_str(), c["error"].as_str()) {
            (Ok(text), Some(want), _) => assert_eq!(text, want, "{what}"),
            (Err(ChatError::Refused(msg)), None, Some(want)) => assert_eq!(msg, want, "{what}"),
            // (Gemma 3's own template is rendered by Gemma's format, which
            // says the same in its own words.)
            (Err(ChatError::NotAlternating { .. }), None, Some(_))
                if name.starts_with("gemma3") => {}
            _ => panic!("{what}: got {got:?}, jinja2 gave {c}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 60);
}

#[test]
fn gemma_builtin_is_gemmas_own_template() {
    for c in cases()
        .iter()
        .filter(|c| c["template"] == "gemma3_chat_template.jinja")
    {
        let got = render_chat(
            &messages(&c["messages"]),
            c["add_generation_prompt"].as_bool().unwrap(),
        );
        match (c["text"].as_str(), got) {
            (Some(want), Ok(text)) => assert_eq!(text, want, "{}", c["label"]),
            (None, Err(ChatError::NotAlternating { .. })) => {}
            (_, got) => panic!("{}: got {got:?}, jinja2 gave {c}", c["label"]),
        }
    }
}

#[test]
fn gemma3s_own_template_is_gemmas_format() {
    let t = ChatTemplate::jinja(&data("gemma3_chat_template.jinja"), "<bos>", "<eos>").unwrap();
    assert!(t.is_gemma());
    // Whitespace aside.
    let spaced = data("gemma3_chat_template.jinja").replace('\n', "\n\n");
    assert!(ChatTemplate::is_gemma3(&spaced));
    assert!(!ChatTemplate::is_gemma3(&data(
        "chatml_chat_template.jinja"
    )));
}

#[test]
fn runaway_templates_stop() {
    let m = [Message::new(Role::User, "x")];
    // Endless work runs out of fuel; endless text out of room.
    let t = ChatTemplate::jinja(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    assert!(matches!(t.render(&m, true), Err(ChatError::Template(_))));
    let t = ChatTemplate::jinja(
        "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    let e = t.render(&m, true).unwrap_err();
    assert!(e.to_string().contains("MiB"), "{e}");
    // Formatting that would allocate a width at once is refused, not run.
    for source in [
        "{{ '{:>100000000000}'.format('x') }}",
        "{{ '{:.65536}'.format(1.5) }}",
        "{{ {'a': 1} | tojson(indent=9223372036854775807) }}",
    ] {
        let t = ChatTemplate::jinja(source, "<bos>", "<eos>").unwrap();
        assert!(
            matches!(t.render(&m, true), Err(ChatError::Template(_))),
            "{source}"
        );
    }
    let t =
        ChatTemplate::jinja("{{ '{:>6}|{:.2f}'.format('ab', 1.5) }}", "<bos>", "<eos>").unwrap();
    assert_eq!(t.render(&m, true).unwrap(), "    ab|1.50");
    // strftime_now writes today's date.
    let t = ChatTemplate::jinja("{{ strftime_now('%Y-%m-%d') }}", "<bos>", "<eos>").unwrap();
    let date = t.render(&m, true).unwrap();
    assert!(date.len() == 10 && date.starts_with("20"), "{date}");
}

#[test]
fn bad_templates_are_errors_that_say_why() {
    let e = ChatTemplate::jinja("{% for m in messages %}{{ m.content }}", "<bos>", "<eos>");
    let msg = e
        .err()
        .expect("an unclosed block must not compile")
        .to_string();
    assert!(
        msg.starts_with("chat template:") && msg.contains("chat template:1"),
        "{msg}"
    );
    // A failure while rendering (an unknown function) is an error too.
    let t = ChatTemplate::jinja("{{ nope() }}", "<bos>", "<eos>").unwrap();
    let e = t
        .render(&[Message::new(Role::User, "x")], true)
        .unwrap_err();
    assert!(matches!(e, ChatError::Template(_)), "{e:?}");
    // Python's string methods, as transformers' templates use them.
    let t = ChatTemplate::jinja(
        "{{ messages[0].content.strip().upper() }}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    assert_eq!(
        t.render(&[Message::new(Role::User, " hi ")], true).unwrap(),
        "HI"
    );
}
