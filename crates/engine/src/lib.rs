//! Generation on top of the model: the sampler, stop conditions, the chat
//! template, a session that owns one sequence's KV cache, and the scheduler
//! that serves many sequences at once with continuous batching.
//!
//! The model speaks token ids; text enters and leaves here, through the
//! tokenizer built from the model file's vocabulary.

pub mod chat;
pub mod embed;
pub mod gbnf;
pub mod grammar;
pub mod sampler;
pub mod scheduler;
pub mod session;
pub mod stop;

pub use chat::{render_chat, ChatError, ChatTemplate, Message, Role};
pub use embed::Pooling;
pub use grammar::{Constraint, GrammarError, GrammarSpec, Grammars};
pub use sampler::{Sampler, SamplingParams, ALL_HISTORY};
pub use session::{FinishReason, GenerateParams, Generation, Session, SessionError};

use gemma3_gguf::GgufFile;
use gemma3_tokenizer::{SpecialTokens, Tokenizer};

/// A prompt's text as llama-server and llama-embedding tokenize it: BOS
/// first, special-token text (`<start_of_turn>` …) parsed, so that a prompt
/// in Gemma's turn format means its turns; a text that starts with `<bos>`
/// itself gets no second one.
pub fn encode_prompt(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = tok.encode(text, true, true);
    let bos = tok.specials().bos;
    if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
        ids.remove(0);
    }
    ids
}

/// The chat template to render conversations with: `file`'s Jinja template
/// if given (`--chat-template-file`), else the model file's own
/// `tokenizer.chat_template` (a fine-tune's, as Hugging Face's converter
/// writes it), else Gemma's format; Gemma 3's own template, from either, is
/// Gemma's format. A template is tried on one user message: a given one
/// that fails is an error naming it; the file's own falls back to Gemma's
/// format with a warning on stderr (such files ran before templates were
/// read).
pub fn chat_template(
    model: &gemma3_model::Model,
    tok: &Tokenizer,
    file: Option<&std::path::Path>,
) -> Result<ChatTemplate, String> {
    let piece = |id: u32| {
        let b = tok.token_to_piece(id, true).unwrap_or(&[]);
        String::from_utf8_lossy(b).into_owned()
    };
    let (bos, eos) = (piece(tok.specials().bos), piece(tok.specials().eos));
    let tried = |source: &str| {
        let t = ChatTemplate::jinja(source, &bos, &eos)?;
        if t.render(&[Message::new(Role::User, "Hi")], true)?
            .is_empty()
        {
            return Err(ChatError::Template(
                "it renders a conversation as nothing".into(),
            ));
        }
        Ok::<_, ChatError>(t)
    };
    if let Some(f) = file {
        // (Read up to a limit: a template is kilobytes, and /dev/zero is not one.)
        const MAX_TEMPLATE: u64 = 16 << 20;
        let mut source = String::new();
        let read = std::fs::File::open(f).and_then(|file| {
            std::io::Read::read_to_string(
                &mut std::io::Read::take(file, MAX_TEMPLATE + 1),
                &mut source,
            )
        });
        read.map_err(|e| format!("reading the chat template {}: {e}", f.display()))?;
        if source.len() as u64 > MAX_TEMPLATE {
            return Err(format!(
                "the chat template {} is larger than {} MiB",
                f.display(),
                MAX_TEMPLATE >> 20
            ));
        }
        return tried(&source).map_err(|e| format!("{}: {e}", f.display()));
    }
    match model.file.get_str("tokenizer.chat_template") {
        Ok(source) => Ok(tried(source).unwrap_or_else(|e| {
            eprintln!("warning: the model file's tokenizer.chat_template cannot be used ({e}); using Gemma's format (--chat-template-file gives another)");
            ChatTemplate::gemma()
        })),
        Err(_) => Ok(ChatTemplate::gemma()),
    }
}

/// Tokens that end a reply: eos, `<end_of_turn>`, the file's end-of-turn
/// and end-of-message tokens (`tokenizer.ggml.eot_token_id`,
/// `eom_token_id`), and the turn ends of other chat formats a fine-tune may
/// have been given (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<|endoftext|>`)
/// where the vocabulary has them, as llama.cpp's end-of-generation set.
pub fn stop_tokens(model: &gemma3_model::Model, tok: &Tokenizer) -> Vec<u32> {
    let sp = tok.specials();
    let mut out = vec![sp.eos];
    out.extend(sp.end_of_turn);
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        out.extend(
            model
                .file
                .get_u32(key)
                .ok()
                .filter(|&id| (id as usize) < tok.vocab_size()),
        );
    }
    // (Only as special tokens: a text piece of the same spelling is text.)
    for text in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"] {
        out.extend(tok.token_id(text).filter(|&id| {
            matches!(
                tok.token_type(id),
                Some(
                    gemma3_tokenizer::TokenType::Control | gemma3_tokenizer::TokenType::UserDefined
                )
            )
        }));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Open a model file and build its tokenizer, interleaving the output head
/// while the tokenizer is built (the two take about as long; this is most
/// of the time before the first token).
///
/// A second later, a background thread moves the packed weights to 2 MB
/// pages (about 0.3 s of a core), after which generation runs about 15%
/// faster; see `Model::collapse_huge_pages_in_background`.
///
/// Then each of `loras` is applied, in order (see
/// [`gemma3_model::Model::load_lora`]); tensors of an adapter that llama.cpp
/// also leaves out (norm weights) are named in a warning on stderr.
pub fn load(
    path: &std::path::Path,
    loras: &[LoraSpec],
) -> Result<(gemma3_model::Model, Tokenizer), gemma3_model::ModelError> {
    let (mut model, tok) = gemma3_model::Model::open_alongside(path, tokenizer_from_gguf)?;
    apply_loras(&mut model, loras)?;
    let tok = tok?;
    // Every token must have an embedding row and a logit, and every row a
    // token (llama.cpp checks token_embd's shape against the vocabulary).
    if tok.vocab_size() != model.config.vocab_size {
        return Err(gemma3_model::ModelError::Tokenizer(format!(
            "the vocabulary has {} tokens but token_embd.weight has {} rows",
            tok.vocab_size(),
            model.config.vocab_size
        )));
    }
    model.collapse_huge_pages_in_background();
    Ok((model, tok))
}

/// A LoRA adapter to apply when loading: `--lora FILE` (scale 1) or
/// `--lora-scaled FILE SCALE`, as llama.cpp's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: std::path::PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    /// The most adapters applied at once.
    pub const MAX: usize = 16;
    /// The largest scale, either way (an adapter's scale is about 1; a huge
    /// one only turns the logits into infinities).
    pub const MAX_SCALE: f32 = 100.0;

    /// The adapters of `--lora FILE` (each at scale 1) and `--lora-scaled
    /// FILE SCALE` (given as a flat list of pairs), those first. A scale must
    /// be a finite number within ±[`LoraSpec::MAX_SCALE`], and there may be at
    /// most [`LoraSpec::MAX`] adapters (each is held in memory on its own,
    /// the same file given twice included).
    pub fn from_flags(lora: &[std::path::PathBuf], scaled: &[String]) -> Result<Vec<Self>, String> {
        let mut out: Vec<Self> = lora
            .iter()
            .map(|p| Self {
                path: p.clone(),
                scale: 1.0,
            })
            .collect();
        let pairs = scaled_files("--lora-scaled", "scale", scaled, Self::MAX_SCALE)?;
        out.extend(pairs.into_iter().map(|(path, scale)| Self { path, scale }));
        if out.len() > Self::MAX {
            return Err(format!(
                "{} LoRA adapters given: at most {} may be applied at once",
                out.len(),
                Self::MAX
            ));
        }
        Ok(out)
    }
}

/// The (file, number) pairs of a flag given as `FLAG FILE NUMBER` (a flat
/// list of pairs, as clap gathers them), each number (what the flag calls
/// `what`: a scale, a strength) finite and within ±`max`.
fn scaled_files(
    flag: &str,
    what: &str,
    pairs: &[String],
    max: f32,
) -> Result<Vec<(std::path::PathBuf, f32)>, String> {
    let mut out = Vec::with_capacity(pairs.len() / 2);
    for pair in pairs.chunks(2) {
        let [path, number] = pair else {
            return Err(format!("{flag} takes a file and a {what}"));
        };
        let v: f32 = (number.trim().parse())
            .map_err(|_| format!("{flag} {path} {number}: the {what} is not a number"))?;
        if !v.is_finite() || v.abs() > max {
            return Err(format!(
                "{flag} {path} {number}: the {what} must be between -{max} and {max}"
            ));
        }
        out.push((path.into(), v));
    }
    Ok(out)
}

/// Apply each of `loras` to `model`, in order (see
/// [`gemma3_model::Model::load_lora`]); tensors of an adapter that llama.cpp
/// also leaves out (norm weights) are named in a warning on stderr.
pub fn apply_loras(
    model: &mut gemma3_model::Model,
    loras: &[LoraSpec],
) -> Result<(), gemma3_model::ModelError> {
    for l in loras {
        let info = model.load_lora(&l.path, l.scale)?;
        if !info.skipped.is_empty() {
            eprintln!(
                "warning: LoRA adapter {}: {} tensor(s) left out, as llama.cpp leaves them out: {}",
                l.path.display(),
                info.skipped.len(),
                info.skipped.join(", ")
            );
        }
    }
    Ok(())
}

/// Control vectors to add when loading: `--control-vector FILE` (strength 1),
/// `--control-vector-scaled FILE STRENGTH` and `--control-vector-layer-range
/// START END`, as llama.cpp's flags (see [`gemma3_model::control`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControlSpec {
    /// Each file and its strength, in order.
    pub files: Vec<(std::path::PathBuf, f32)>,
    /// The first and last layer (inclusive) whose output takes a direction;
    /// None: 1 to the last.
    pub layers: Option<(usize, usize)>,
}

impl ControlSpec {
    /// The largest strength, either way (a direction's norm is about that of
    /// the residual stream it steers; a huge multiple only swamps it).
    pub const MAX_STRENGTH: f32 = 1000.0;

    /// The control vectors of `--control-vector FILE` (strength 1) and
    /// `--control-vector-scaled FILE STRENGTH` (a flat list of pairs), those
    /// first, and `--control-vector-layer-range START END` (a pair, or
    /// empty). As llama.cpp, a START or END of 0 or less means the first or
    /// the last layer.
    pub fn from_flags(
        plain: &[std::path::PathBuf],
        scaled: &[String],
        range: &[String],
    ) -> Result<Self, String> {
        let mut files: Vec<_> = plain.iter().map(|p| (p.clone(), 1.0)).collect();
        files.extend(scaled_files(
            "--control-vector-scaled",
            "strength",
            scaled,
            Self::MAX_STRENGTH,
        )?);
        let layers = match range {
            [] => None,
            [a, b] => {
                let parse = |v: &String| {
                    v.trim().parse::<i64>().map_err(|_| {
                        format!("--control-vector-layer-range {a} {b}: '{v}' is not a whole number")
                    })
                };
                let (a, b) = (parse(a)?, parse(b)?);
                // (0 or less: the default end, as llama.cpp; clamped to usize later.)
                let first = if a <= 0 { 1 } else { a as usize };
                let last = if b <= 0 { usize::MAX } else { b as usize };
                if first > last {
                    return Err(format!(
                        "--control-vector-layer-range {a} {b}: the first layer is after the last"
                    ));
                }
                Some((first, last))
            }
            _ => return Err("--control-vector-layer-range takes a first and a last layer".into()),
        };
        if files.is_empty() && layers.is_some() {
            return Err(
                "--control-vector-layer-range is given without --control-vector or --control-vector-scaled"
                    .into(),
            );
        }
        Ok(ControlSpec { files, layers })
    }
}

/// Add the control vectors of `spec` to `model` (see
/// [`gemma3_model::Model::set_control`]); directions for layers the model
/// lacks are named in a warning on stderr, as llama.cpp leaves them out.
pub fn apply_control(
    model: &mut gemma3_model::Model,
    spec: &ControlSpec,
) -> Result<(), gemma3_model::ModelError> {
    if spec.files.is_empty() {
        return Ok(());
    }
    let mut cv = gemma3_model::ControlVector::default();
    for (path, strength) in &spec.files {
        cv.add_file(path, *strength)?;
    }
    let (first, last) = spec.layers.unwrap_or((1, usize::MAX));
    let info = model.set_control(&cv, first, last)?;
    if !info.beyond.is_empty() {
        eprintln!(
            "warning: control vectors: direction(s) for layer(s) {:?} left out: the model's layers are 0 to {}",
            info.beyond,
            model.layers.len() - 1
        );
    }
    if info.layers.is_empty() {
        eprintln!("warning: control vectors: no direction falls in the layers they apply to");
    }
    Ok(())
}

/// `line` with llama.cpp's escapes (`string_process_escapes`) replaced:
/// `\n`, `\r`, `\t`, `\'`, `\"`, `\\` and `\xHH` (two hex digits, the byte
/// itself); any other backslash stays as it is. A byte `\xHH` makes that is
/// not UTF-8 becomes U+FFFD (llama.cpp keeps the raw byte in its string).
pub fn process_escapes(line: &str) -> String {
    let b = line.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let simple = match b[i + 1] {
                b'n' => Some(b'\n'),
                b'r' => Some(b'\r'),
                b't' => Some(b'\t'),
                b'\'' => Some(b'\''),
                b'"' => Some(b'"'),
                b'\\' => Some(b'\\'),
                _ => None,
            };
            if let Some(c) = simple {
                out.push(c);
                i += 2;
                continue;
            }
            if b[i + 1] == b'x' && i + 3 < b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 2]), hex(b[i + 3])) {
                    out.push(h << 4 | l);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A positive and a negative prompt as llama-cvector-generator runs them:
/// each tokenized with BOS and special-token text parsed, the shorter padded
/// to the other's length with the last token the tokenizer gives for " "
/// (without BOS).
pub fn cvector_pair(tok: &Tokenizer, positive: &str, negative: &str) -> (Vec<u32>, Vec<u32>) {
    let (mut p, mut n) = (
        tok.encode(positive, true, true),
        tok.encode(negative, true, true),
    );
    let pad = tok.encode(" ", false, false).last().copied();
    let len = p.len().max(n.len());
    if let Some(pad) = pad {
        p.resize(len, pad);
        n.resize(len, pad);
    }
    (p, n)
}

/// Build the tokenizer from a GGUF file's `tokenizer.ggml.*` vocabulary.
pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<Tokenizer, gemma3_model::ModelError> {
    let err = |e: String| gemma3_model::ModelError::Tokenizer(e);
    let model = f.get_str("tokenizer.ggml.model")?;
    if model != "llama" {
        return Err(err(format!("tokenizer.ggml.model is '{model}'; only SentencePiece ('llama') vocabularies are supported")));
    }
    // How a prompt is encoded is Gemma's: BOS first, no EOS, no space put
    // before the text. A file that asks otherwise is refused, where it had
    // been encoded as Gemma's without a word (llama.cpp follows the flags).
    for (key, gemma) in [
        ("tokenizer.ggml.add_bos_token", true),
        ("tokenizer.ggml.add_eos_token", false),
        ("tokenizer.ggml.add_sep_token", false),
        ("tokenizer.ggml.add_space_prefix", false),
    ] {
        if f.get(key).is_some() {
            let b = f.get_bool(key)?;
            if b != gemma {
                return Err(err(format!(
                    "{key} is {b}: this engine encodes prompts as Gemma's tokenizer does ({key} {gemma})"
                )));
            }
        }
    }
    let tokens = f
        .get_array("tokenizer.ggml.tokens")?
        .as_strings()
        .ok_or_else(|| err("tokenizer.ggml.tokens is not a string array".into()))?;
    let scores = f
        .get_array("tokenizer.ggml.scores")?
        .as_f32s()
        .ok_or_else(|| err("tokenizer.ggml.scores is not an f32 array".into()))?
        .to_vec();
    let types = f
        .get_array("tokenizer.ggml.token_type")?
        .as_i32s()
        .ok_or_else(|| err("tokenizer.ggml.token_type is not an i32 array".into()))?
        .to_vec();
    let find = |t: &str| tokens.iter().position(|s| s == t).map(|i| i as u32);
    // Absent: none. Present, it must be an id (a −1 or a string had been
    // dropped without a word).
    let optional_id = |key: &str| match f.get(key) {
        None => Ok(None),
        Some(_) => f.get_u32(key).map(Some),
    };
    let specials = SpecialTokens {
        bos: f.get_u32("tokenizer.ggml.bos_token_id")?,
        eos: f.get_u32("tokenizer.ggml.eos_token_id")?,
        unk: optional_id("tokenizer.ggml.unknown_token_id")?,
        pad: optional_id("tokenizer.ggml.padding_token_id")?,
        start_of_turn: find("<start_of_turn>"),
        end_of_turn: find("<end_of_turn>"),
    };
    Tokenizer::new(tokens.iter(), scores, types, specials).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_read_as_llama_cpp_reads_them() {
        use super::process_escapes;
        assert_eq!(process_escapes(r"a\nb\tc"), "a\nb\tc");
        assert_eq!(process_escapes(r#"\"q\" \'s\' \\n"#), "\"q\" 's' \\n");
        assert_eq!(process_escapes(r"\x41\x7a"), "Az");
        // Unknown escapes, a bad \x and a trailing backslash stay as they are,
        // and a \x followed by a character of several bytes is not split.
        assert_eq!(process_escapes(r"\q \xZZ end\"), r"\q \xZZ end\");
        assert_eq!(process_escapes(r"\x4"), r"\x4");
        assert_eq!(process_escapes(r"\xAé \x€"), r"\xAé \x€");
    }
}
