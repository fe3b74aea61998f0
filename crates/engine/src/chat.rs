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
//! system message is folded into the first user turn, the assistant role is
//! called "model", contents are trimmed, roles must alternate.

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
}

/// Render messages into Gemma's format, with `<bos>` once at the start and,
/// when `add_generation_prompt`, an open model turn at the end. The result
/// holds special-token text, to be encoded with special tokens parsed.
pub fn render_chat(messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::Empty);
    }
    let (system, rest) = match messages[0].role {
        Role::System => (Some(messages[0].content.trim()), &messages[1..]),
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
