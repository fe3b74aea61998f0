//! Gemma's chat turn format.
//!
//! ```text
//! <bos><start_of_turn>user
//! {system}\n\n{first user message}<end_of_turn>
//! <start_of_turn>model
//! {reply}<end_of_turn>
//! <start_of_turn>model\n          ← generation prompt
//! ```
//! ref: the chat_template in google/gemma-3-270m's tokenizer_config.json: a
//! system message is folded into the first user turn (as it is, where the
//! turns' contents are trimmed), the assistant role is called "model",
//! roles must alternate. `tests/chat_template.rs` checks this rendering
//! against that template run by Python's jinja2.
//!
//! A fine-tune may bring its own template (its file's
//! `tokenizer.chat_template`, as Hugging Face's converter writes it): a
//! [`ChatTemplate`] renders that one with minijinja, set up as transformers
//! sets up jinja2 for `apply_chat_template`.

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Parse an OpenAI-style role name ("model" is accepted for assistant).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" | "developer" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" | "model" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ChatError {
    #[error("no messages")]
    Empty,
    #[error("a system message may only come first (message {0})")]
    MisplacedSystem(usize),
    #[error(
        "roles must alternate user/assistant starting with user (message {index} is {found:?})"
    )]
    NotAlternating { index: usize, found: Role },
    #[error("a system message needs a user message after it (Gemma's template folds it into the first user turn, and would drop it)")]
    SystemOnly,
    /// The chat template does not compile, or failed while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template refused the conversation (`raise_exception`).
    #[error("the chat template refused the messages: {0}")]
    Refused(String),
}

/// How a conversation becomes prompt text: Gemma's turns as [`render_chat`]
/// writes them, or a Jinja chat template.
pub struct ChatTemplate {
    jinja: Option<Jinja>,
}

struct Jinja {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

/// The name of the one template a [`Jinja`] environment holds (errors say
/// "in chat template:LINE").
const TEMPLATE: &str = "chat template";

impl ChatTemplate {
    /// Gemma's own format, as [`render_chat`] writes it.
    pub fn gemma() -> Self {
        ChatTemplate { jinja: None }
    }

    /// A Jinja chat template (Hugging Face's form: `messages` of `role` and
    /// `content`, `add_generation_prompt`, `bos_token`, `eos_token`,
    /// `raise_exception`), compiled as transformers compiles it: blocks'
    /// trailing newlines and leading spaces trimmed, Python's string and
    /// dict methods (`.strip()`, `.items()`, ...) available.
    pub fn jinja(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(
                    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, RAISED)
                        .with_source(Raised(msg)),
                )
            },
        );
        env.add_template_owned(TEMPLATE, source.to_owned())
            .map_err(|e| ChatError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            jinja: Some(Jinja {
                env,
                bos: bos.into(),
                eos: eos.into(),
            }),
        })
    }

    /// Whether this is Gemma's own format (no Jinja template).
    pub fn is_gemma(&self) -> bool {
        self.jinja.is_none()
    }

    /// The prompt text of `messages` (special-token text included, to be
    /// encoded with special tokens parsed; the template writes BOS), with
    /// the assistant's turn opened when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let Some(j) = &self.jinja else {
            return render_chat(messages, add_generation_prompt);
        };
        if messages.is_empty() {
            return Err(ChatError::Empty);
        }
        let msgs: Vec<minijinja::Value> = (messages.iter())
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                minijinja::context! { role => role, content => m.content.clone() }
            })
            .collect();
        let t = j
            .env
            .get_template(TEMPLATE)
            .map_err(|e| ChatError::Template(describe(&e)))?;
        t.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => j.bos.clone(),
            eos_token => j.eos.clone(),
        })
        .map_err(|e| match raised(&e) {
            Some(msg) => ChatError::Refused(msg),
            None => ChatError::Template(describe(&e)),
        })
    }
}

/// The marker of a `raise_exception` error, whose message is its source.
const RAISED: &str = "raise_exception";

#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The message a template's `raise_exception` gave, if `e` is that.
fn raised(e: &minijinja::Error) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        src = s.source();
    }
    None
}

/// A minijinja error on one line (its first: it names the template's line).
fn describe(e: &minijinja::Error) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Render messages into Gemma's format, with `<bos>` once at the start and,
/// when `add_generation_prompt`, an open model turn at the end. The result
/// holds special-token text, to be encoded with special tokens parsed.
pub fn render_chat(messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::Empty);
    }
    let (system, rest) = match messages[0].role {
        Role::System => (Some(messages[0].content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    if system.is_some() && rest.is_empty() {
        return Err(ChatError::SystemOnly);
    }
    let offset = messages.len() - rest.len();
    let mut out = String::from("<bos>");
    for (i, m) in rest.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role == Role::System {
            return Err(ChatError::MisplacedSystem(i + offset));
        }
        if m.role != expected {
            return Err(ChatError::NotAlternating {
                index: i + offset,
                found: m.role,
            });
        }
        let role = if m.role == Role::User {
            "user"
        } else {
            "model"
        };
        out.push_str("<start_of_turn>");
        out.push_str(role);
        out.push('\n');
        if i == 0 {
            if let Some(s) = system {
                out.push_str(s);
                out.push_str("\n\n");
            }
        }
        out.push_str(m.content.trim());
        out.push_str("<end_of_turn>\n");
    }
    if add_generation_prompt {
        out.push_str("<start_of_turn>model\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_folds_into_first_user_turn() {
        let m = [
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, " Hi "),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Bye"),
        ];
        assert_eq!(
            render_chat(&m, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn roles_must_alternate() {
        let m = [Message::new(Role::User, "a"), Message::new(Role::User, "b")];
        assert_eq!(
            render_chat(&m, true),
            Err(ChatError::NotAlternating {
                index: 1,
                found: Role::User
            })
        );
        let m = [Message::new(Role::Assistant, "a")];
        assert!(render_chat(&m, true).is_err());
        let m = [
            Message::new(Role::User, "a"),
            Message::new(Role::System, "b"),
        ];
        assert_eq!(render_chat(&m, true), Err(ChatError::MisplacedSystem(1)));
        assert_eq!(render_chat(&[], true), Err(ChatError::Empty));
        // Alone, the system text would have been dropped without a word.
        let m = [Message::new(Role::System, "Answer in French.")];
        assert_eq!(render_chat(&m, true), Err(ChatError::SystemOnly));
    }
}
