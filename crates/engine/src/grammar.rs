//! Constrained generation: a grammar or a JSON schema limits which tokens
//! may come next, as llama.cpp's `--grammar` / `--json-schema` and
//! llama-server's `grammar`, `json_schema` and `response_format` do.
//!
//! The grammars are compiled and matched by llguidance. At each step the
//! token drawn from the model's row stands if a [`Constraint`] allows it
//! (its bytes continue the text so far); only otherwise does the
//! constraint mask the row (−∞ for every token it refuses) for a second
//! draw (`session::draw`). The chosen token advances it. The end tokens are
//! allowed exactly when the grammar could end there; once nothing can
//! follow, generation stops.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use gemma3_tokenizer::{TokenType, Tokenizer};

/// What constrains a generation, as the user gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// llama.cpp's GBNF (`root` is the start rule).
    Gbnf(String),
    /// A JSON schema; the output is one JSON value it accepts.
    JsonSchema(serde_json::Value),
}

impl GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }
}

/// A grammar or schema that cannot be compiled, or a generation the
/// grammar cannot go on with.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Gbnf(#[from] crate::gbnf::GbnfError),
    #[error("invalid grammar: {0}")]
    Invalid(String),
    #[error("constrained generation failed: {0}")]
    Matcher(String),
    /// The matcher refused a token it had allowed: a fault of this engine
    /// (or llguidance), not of the request.
    #[error("the grammar matcher failed: {0}")]
    Internal(String),
}

/// Whitespace a JSON schema's output may have between its tokens: none, a
/// space, or one or two line breaks and up to 20 spaces or tabs, as in the
/// grammars llama.cpp makes of schemas (`space ::= | " " | "\n"{1,2} [
/// \t]{0,20}`). A free run of whitespace would let a base model pad forever.
const JSON_WHITESPACE: &str = r"[ ]|\n{1,2}[ \t]{0,20}";

/// The stack a grammar is compiled on (address space: only the pages a
/// deep grammar touches are ever used).
const COMPILE_STACK: usize = 256 << 20;

/// The compiler of grammars for one vocabulary: built once (it indexes
/// every token's bytes), then shared by every request.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

impl Grammars {
    /// Index `tok`'s vocabulary: each token as the bytes it decodes to
    /// (byte tokens their byte; control, unknown and unused tokens marked
    /// special, so no text grammar can match them). End-of-sequence is the
    /// grammar's end token.
    pub fn new(tok: &Tokenizer) -> Result<Self, GrammarError> {
        let n = tok.vocab_size();
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let ty = tok.token_type(id).unwrap_or(TokenType::Unused);
            let text = tok.token_text(id).unwrap_or("");
            let word = match ty {
                TokenType::Normal | TokenType::UserDefined | TokenType::Byte => {
                    tok.token_to_piece(id, false).unwrap_or(&[]).to_vec()
                }
                TokenType::Control | TokenType::Unknown | TokenType::Unused => Vec::new(),
            };
            if word.is_empty() {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(text.as_bytes());
                words.push(w);
            } else {
                words.push(word);
            }
        }
        let sp = tok.specials();
        let info = TokRxInfo {
            vocab_size: n as u32,
            tok_eos: sp.eos,
            tok_bos: Some(sp.bos),
            tok_pad: sp.pad,
            tok_unk: sp.unk,
            tok_end_of_turn: sp.end_of_turn,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        // (With llguidance's JSON slices of the vocabulary: 1.15 s to build
        // against 0.77 without, on the Zen 4, for masks about 1.5× as fast.)
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        factory.quiet();
        let limits = factory.limits_mut();
        // No parser state or grammar dump in errors: they reach clients.
        limits.verbose_errors = false;
        // GBNF's one-character lexemes put every alternative that starts
        // alike in one row: 8000 labels rather than 2000.
        limits.max_items_in_row = 8000;
        Ok(Grammars { factory })
    }

    /// Compile `spec` into a fresh constraint.
    ///
    /// On a thread of its own with a deep stack: llguidance's compilers
    /// recurse once per nested schema or `$ref` followed (a chain of 3000
    /// `$ref`s overflowed an 8 MiB stack and aborted the process).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("grammar".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(s, || self.compile_here(spec))
                .map_err(|e| GrammarError::Invalid(format!("no thread to compile on: {e}")))?;
            worker.join().unwrap_or_else(|_| {
                Err(GrammarError::Invalid("the grammar compiler failed".into()))
            })
        })
    }

    fn compile_here(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        let grammar = match spec {
            GrammarSpec::Gbnf(text) => TopLevelGrammar::from_lark(crate::gbnf::gbnf_to_lark(text)?),
            GrammarSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(GrammarError::Invalid(
                        "a JSON schema must be an object (or true/false)".into(),
                    ));
                }
                // (`true`: any value, with the same whitespace as the rest.)
                let mut schema = match schema {
                    serde_json::Value::Bool(true) => serde_json::json!({}),
                    s => s.clone(),
                };
                read_schema(&mut schema, true);
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(
                        || serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
        };
        let invalid = |e: String| GrammarError::Invalid(brief(&e));
        // (llguidance turns its own panics into errors.)
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        // A grammar no text can start (a rule defined only through itself)
        // is the caller's mistake: say so now, not at the first token.
        let first = matcher.clone().compute_mask();
        match first {
            Ok(m) if m.is_zero() && !matcher.is_accepting().unwrap_or(false) => {
                return Err(GrammarError::Invalid(NO_TEXT.into()))
            }
            Ok(_) => {}
            Err(e) => return Err(invalid(explain(&e.to_string()))),
        }
        Ok(Constraint {
            matcher,
            eos: self.factory.tok_env().tok_trie().eos_token(),
            spent: std::time::Duration::ZERO,
            tokens: 0,
        })
    }
}

/// An error of llguidance's matcher, in a short line.
fn matcher_error(e: impl std::fmt::Display) -> GrammarError {
    GrammarError::Matcher(brief(&explain(&e.to_string())))
}

const NO_TEXT: &str =
    "no text can follow here: a rule never finishes (is it defined only through itself?)";

/// llguidance's word for "no token can continue", in plain words.
fn explain(e: &str) -> String {
    if e.contains("NoExtensionBias") || e.contains("no extension") {
        NO_TEXT.into()
    } else {
        e.to_string()
    }
}

/// An llguidance error on one line, at most 300 characters: it may quote
/// the rewritten grammar whole, or carry a backtrace (left out: from a line
/// of a backtrace on). Its lines are joined, since some say what is wrong
/// only after the first (a regex's error: "regex parse error:", the pattern,
/// a caret, then "error: unclosed group").
fn brief(e: &str) -> String {
    let lines: Vec<&str> = (e.lines().map(str::trim))
        .take_while(|l| !l.starts_with("stack backtrace") && !l.starts_with("0: "))
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines.join(" ").replace(" <non-verbose/>", "");
    let joined = (joined.split("; consider making your grammar"))
        .next()
        .unwrap_or_default();
    let line = joined.strip_prefix("panic: ").unwrap_or(joined);
    match line.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// Largest integer a JSON schema's output may have without a bound of its
/// own: llama.cpp's schema grammars write up to 16 digits, and this is the
/// largest 16-digit integer an f64 holds (llguidance reads bounds as f64s,
/// so 9 999 999 999 999 999 would be 10¹⁶, 17 digits).
const MAX_JSON_INTEGER: i64 = 9_999_999_999_999_998;

/// A JSON schema as llama.cpp's schema converter reads it: objects that
/// name their properties and say nothing of others take no others (a base
/// model otherwise adds keys of its own), and integers have at most 16
/// digits (otherwise a model can write digits until its budget runs out).
/// Only schema positions are visited (not `const`, `enum`, `not` or the
/// conditionals), and an `allOf` member (`may_close` false) or a schema
/// beside a `$ref` or an `allOf` is left open: its keys may be another
/// part's.
fn read_schema(v: &mut serde_json::Value, may_close: bool) {
    use serde_json::Value;
    let Value::Object(o) = v else {
        return;
    };
    let merged = o.contains_key("$ref") || o.contains_key("allOf");
    if may_close
        && !merged
        && o.get("properties").is_some_and(Value::is_object)
        && !o.contains_key("additionalProperties")
        && !o.contains_key("unevaluatedProperties")
    {
        o.insert("additionalProperties".into(), false.into());
    }
    cap_integer(o);
    for (key, sub) in o.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" => {
                if let Value::Object(m) = sub {
                    m.values_mut().for_each(|s| read_schema(s, true));
                }
            }
            "additionalProperties" | "items" | "contains" => match sub {
                Value::Array(a) => a.iter_mut().for_each(|s| read_schema(s, true)),
                s => read_schema(s, true),
            },
            "prefixItems" | "anyOf" | "oneOf" => {
                if let Value::Array(a) = sub {
                    a.iter_mut().for_each(|s| read_schema(s, true));
                }
            }
            "allOf" => {
                if let Value::Array(a) = sub {
                    a.iter_mut().for_each(|s| read_schema(s, false));
                }
            }
            _ => {}
        }
    }
}

/// An integer schema (its type `integer`, alone or beside non-numbers)
/// without a bound on a side gets ±[`MAX_JSON_INTEGER`] there, where that
/// agrees with the other bound; not when `const` or `enum` pins the value.
fn cap_integer(o: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    let integer = match o.get("type") {
        Some(Value::String(t)) => t == "integer",
        Some(Value::Array(ts)) => {
            ts.iter().any(|t| t == "integer") && !ts.iter().any(|t| t == "number")
        }
        _ => false,
    };
    if !integer || o.contains_key("const") || o.contains_key("enum") {
        return;
    }
    // llguidance reads bounds as f64s, and makes an exclusive one
    // inclusive by adding or taking 1 in f64. Past 2⁵³ both round, and to
    // nearest they had let 10¹⁶ through a maximum of 9 999 999 999 999 999.
    // So an integer's exclusive bounds are made inclusive here, exactly, and
    // a bound an f64 cannot hold moves inward to the nearest one that it
    // can, never outward. (None left between them: the schema's own error,
    // that no integer fits.)
    for (exclusive, inclusive, up) in [
        ("exclusiveMinimum", "minimum", true),
        ("exclusiveMaximum", "maximum", false),
    ] {
        let step = if up { 1 } else { -1 };
        if let Some(v) = o.get(exclusive).and_then(Value::as_i64) {
            let Some(next) = v.checked_add(step) else {
                continue;
            };
            let tighter = match o.get(inclusive).and_then(Value::as_i64) {
                Some(w) if up => next.max(w),
                Some(w) => next.min(w),
                None if o.contains_key(inclusive) => continue,
                None => next,
            };
            o.remove(exclusive);
            o.insert(inclusive.into(), tighter.into());
        }
        if let Some(v) = o.get(inclusive).and_then(Value::as_i64) {
            if let Some(inward) = f64_inward(v, up) {
                o.insert(inclusive.into(), inward.into());
            }
        }
    }
    // A side's bound: None where none is given; Some(None) where it is not a number.
    let bound = |o: &serde_json::Map<String, Value>, keys: [&str; 2]| {
        (keys.iter()).find_map(|k| o.get(*k)).map(Value::as_f64)
    };
    let (lo, hi) = (
        bound(o, ["minimum", "exclusiveMinimum"]),
        bound(o, ["maximum", "exclusiveMaximum"]),
    );
    let max = MAX_JSON_INTEGER as f64;
    if hi.is_none() && lo.flatten().is_none_or(|l| l <= max) {
        o.insert("maximum".into(), MAX_JSON_INTEGER.into());
    }
    if lo.is_none() && hi.flatten().is_none_or(|h| h >= -max) {
        o.insert("minimum".into(), (-MAX_JSON_INTEGER).into());
    }
}

/// Where `v` is not exactly an f64: the nearest integer that is, above `v`
/// (`up`) or below it. (Past 2⁵³ every f64 is an integer.)
fn f64_inward(v: i64, up: bool) -> Option<i64> {
    let f = v as f64;
    // (`f as i64` saturates: 2⁶³ rounded from i64::MAX gives i64::MAX.)
    if f as i128 == v as i128 {
        return None;
    }
    let outward = if up {
        (f as i128) < v as i128
    } else {
        (f as i128) > v as i128
    };
    let f = if !outward {
        f
    } else if up == (f > 0.0) {
        f64::from_bits(f.to_bits() + 1)
    } else {
        f64::from_bits(f.to_bits() - 1)
    };
    (f.abs() < 9.2e18).then_some(f as i64)
}

/// Most time the grammar's work for one generated token may take (see
/// [`Constraint::charge`]).
pub const MAX_TOKEN_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// The grammar's work a generation may take in all: `base` plus
/// `per_token` for each token (see [`Constraint::charge`]).
pub struct GrammarBudget {
    pub base: std::time::Duration,
    pub per_token: std::time::Duration,
}

/// See [`GrammarBudget`]: hundreds of times what grammars that are not
/// ambiguous took a token.
pub const MAX_GRAMMAR_TIME: GrammarBudget = GrammarBudget {
    base: std::time::Duration::from_secs(2),
    per_token: std::time::Duration::from_millis(20),
};

/// One generation's place in its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    eos: u32,
    /// The grammar's work so far, and for how many tokens.
    spent: std::time::Duration,
    tokens: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Set to −∞ the logit of every token the grammar does not allow next.
    /// `ends` (the generation's stop tokens) are allowed where the grammar
    /// may end, and only there.
    pub fn mask(&mut self, logits: &mut [f32], ends: &[u32]) -> Result<(), GrammarError> {
        let allowed: SimpleVob = self.matcher.compute_mask().map_err(matcher_error)?;
        let may_end = allowed.is_allowed(self.eos);
        // The end tokens' own logits, set back below where the grammar may end.
        let kept: Vec<(usize, f32)> = (ends.iter())
            .filter_map(|&e| Some((e as usize, *logits.get(e as usize)?)))
            .collect();
        // (A NaN or +∞ stays, for the sampler to report a broken model.)
        let ban = |l: &mut f32| {
            if !l.is_nan() && *l != f32::INFINITY {
                *l = f32::NEG_INFINITY;
            }
        };
        let words = allowed.as_slice();
        for (chunk, &w) in logits.chunks_mut(32).zip(words) {
            if w != u32::MAX {
                for (b, l) in chunk.iter_mut().enumerate() {
                    if w >> b & 1 == 0 {
                        ban(l);
                    }
                }
            }
        }
        // (Tokens past the mask's words, if any, are not allowed.)
        logits.iter_mut().skip(32 * words.len()).for_each(ban);
        if let Some(l) = logits.get_mut(self.eos as usize) {
            ban(l);
        }
        for (e, l) in kept {
            if may_end {
                logits[e] = l;
            } else {
                ban(&mut logits[e]);
            }
        }
        Ok(())
    }

    /// Whether `token` may come next: one of `ends` where the grammar may
    /// end, or a token whose bytes continue the text (a walk over that one
    /// token, where [`Constraint::mask`] walks the whole vocabulary).
    pub fn allows(&mut self, token: u32, ends: &[u32]) -> Result<bool, GrammarError> {
        if ends.contains(&token) {
            return self.matcher.is_accepting().map_err(matcher_error);
        }
        if token == self.eos {
            return Ok(false);
        }
        Ok(self
            .matcher
            .validate_tokens(&[token])
            .map_err(matcher_error)?
            == 1)
    }

    /// Advance past `token` (one [`Constraint::allows`]).
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        // A parse past llguidance's limits is the grammar's fault (too
        // ambiguous), not this engine's; any other refusal of a token the
        // grammar allowed is.
        let refused = |e: String| {
            if e.contains("max is") || e.contains("Too many items") {
                GrammarError::Matcher(format!(
                    "the grammar is too ambiguous to follow: {}",
                    brief(&e)
                ))
            } else {
                GrammarError::Internal(brief(&e))
            }
        };
        self.matcher
            .consume_token(token)
            .map_err(|e| refused(e.to_string()))?;
        if let Some(e) = self.matcher.get_error() {
            return Err(refused(e));
        }
        Ok(())
    }

    /// Count `spent`, the grammar's work for one token (checking it,
    /// masking the row where needed, advancing past it): an error where it
    /// is over [`MAX_TOKEN_TIME`], or where the generation's grammar work in
    /// all is over [`MAX_GRAMMAR_TIME`]. An ambiguous grammar (`x ::= x x`)
    /// costs more with every token, and a server's step waits for every
    /// sequence's; the JSON and GBNF grammars measured took at most 26 ms
    /// for a token (a first mask) and 0.03 ms at the median, on a Zen 4.
    pub fn charge(&mut self, spent: std::time::Duration) -> Result<(), GrammarError> {
        self.spent += spent;
        self.tokens += 1;
        let budget = MAX_GRAMMAR_TIME.base + MAX_GRAMMAR_TIME.per_token * self.tokens;
        if spent > MAX_TOKEN_TIME || self.spent > budget {
            let what = if spent > MAX_TOKEN_TIME {
                format!(
                    "token {} took {} ms to match (at most {} ms)",
                    self.tokens,
                    spent.as_millis(),
                    MAX_TOKEN_TIME.as_millis()
                )
            } else {
                format!(
                    "its {} tokens took {:.1} s to match (at most {:.1} s)",
                    self.tokens,
                    self.spent.as_secs_f64(),
                    budget.as_secs_f64()
                )
            };
            return Err(GrammarError::Matcher(format!(
                "the grammar is too ambiguous to follow: {what}; write it so that a text has fewer parses (no rule such as x ::= x x)"
            )));
        }
        Ok(())
    }

    /// The grammar is complete and nothing may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma3_tokenizer::SpecialTokens;

    /// Specials 0–4, the 256 byte tokens, then a few words.
    const WORDS: [&str; 5] = ["a", "b", "ab", "▁yes", "<x>"];

    fn tokenizer() -> Tokenizer {
        let mut texts: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"]
            .map(String::from)
            .to_vec();
        let mut types = vec![3, 3, 3, 2, 3];
        texts.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        texts.extend(WORDS.map(String::from));
        types.extend([1; WORDS.len()]);
        let specials = SpecialTokens {
            bos: 2,
            eos: 1,
            unk: Some(3),
            pad: Some(0),
            start_of_turn: None,
            end_of_turn: Some(4),
        };
        let n = texts.len();
        Tokenizer::new(texts, vec![0.0; n], types, specials).unwrap()
    }

    fn word(w: &str) -> u32 {
        (261 + WORDS.iter().position(|x| *x == w).unwrap()) as u32
    }

    /// Tokens left drawable by `c`'s mask over a row of ones (ends 1 and 4).
    fn allowed(c: &mut Constraint, n: usize) -> Vec<u32> {
        let mut row = vec![1.0f32; n];
        c.mask(&mut row, &[1, 4]).unwrap();
        (0..n as u32).filter(|&i| row[i as usize] == 1.0).collect()
    }

    #[test]
    fn masks_allow_what_continues_the_text_and_ends_only_at_its_end() {
        let tok = tokenizer();
        let n = tok.vocab_size();
        let g = Grammars::new(&tok).unwrap();
        let mut c = g
            .compile(&GrammarSpec::Gbnf(r#"root ::= "a"+"#.into()))
            .unwrap();
        // 'a' as a word or as its byte; not 'b', 'ab', an end, or a control token.
        assert_eq!(allowed(&mut c, n), vec![5 + 0x61, word("a")]);
        c.accept(word("a")).unwrap();
        assert!(!c.is_done());
        // Now the text may end: both end tokens join, with their own logits.
        assert_eq!(allowed(&mut c, n), vec![1, 4, 5 + 0x61, word("a")]);
        let mut row: Vec<f32> = (0..n).map(|i| i as f32).collect();
        row[word("b") as usize] = f32::NAN;
        c.mask(&mut row, &[1, 4]).unwrap();
        assert_eq!((row[1], row[4]), (1.0, 4.0));
        // A NaN stays NaN where the token is banned: the sampler reports it.
        assert!(row[word("b") as usize].is_nan());

        // A grammar that ends: done after its last token.
        let mut c = g
            .compile(&GrammarSpec::Gbnf(r#"root ::= "ab""#.into()))
            .unwrap();
        assert_eq!(allowed(&mut c, n), vec![5 + 0x61, word("a"), word("ab")]);
        c.accept(word("ab")).unwrap();
        assert!(c.is_done());

        // Special tokens never spell text: "<x>" as a word, not <eos>'s text.
        let spec = GrammarSpec::Gbnf(r#"root ::= "<" [a-z_]+ ">""#.into());
        let mut c = g.compile(&spec).unwrap();
        assert_eq!(allowed(&mut c, n), vec![5 + 0x3C, word("<x>")]);
        // A space is a space ("▁yes" is " yes").
        let mut c = g
            .compile(&GrammarSpec::Gbnf(r#"root ::= " yes""#.into()))
            .unwrap();
        assert_eq!(allowed(&mut c, n), vec![5 + 0x20, word("▁yes")]);
    }

    /// `allows` says of each token what the mask says, along a path.
    #[test]
    fn allows_agrees_with_the_mask() {
        let tok = tokenizer();
        let n = tok.vocab_size();
        let g = Grammars::new(&tok).unwrap();
        let specs = [
            (
                GrammarSpec::Gbnf(r#"root ::= ("a" | "b")+ " yes""#.into()),
                "abba yes",
            ),
            (GrammarSpec::json_object(), "{\"a\": [1, 2]}"),
        ];
        for (spec, text) in specs {
            let mut c = g.compile(&spec).unwrap();
            for b in text.bytes() {
                let by_mask = allowed(&mut c, n);
                let by_allows: Vec<u32> = (0..n as u32)
                    .filter(|&t| c.allows(t, &[1, 4]).unwrap())
                    .collect();
                assert_eq!(by_allows, by_mask, "{spec:?} before {:?}", b as char);
                c.accept(5 + b as u32).unwrap();
            }
        }
    }

    #[test]
    fn schemas_are_read_as_llama_cpp_reads_them() {
        use serde_json::json;
        let read = |mut v: serde_json::Value| {
            read_schema(&mut v, true);
            v
        };
        let m = MAX_JSON_INTEGER;
        // Closed where properties are named; nested schemas too, but not the
        // properties map itself, nor a const's value, nor `not`.
        assert_eq!(
            read(
                json!({"properties": {"properties": {"type": "object", "properties": {}}},
                "not": {"properties": {}}, "const": {"properties": {}, "type": "integer"}})
            ),
            json!({"properties": {"properties": {"type": "object", "properties": {},
                "additionalProperties": false}}, "not": {"properties": {}},
                "const": {"properties": {}, "type": "integer"}, "additionalProperties": false})
        );
        // allOf's parts and a schema beside $ref stay open.
        let all = json!({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]});
        assert_eq!(read(all.clone()), all);
        let r = json!({"$ref": "#/$defs/x", "properties": {"c": {}}, "$defs": {"x": {"properties": {}}}});
        assert_eq!(
            read(r),
            json!({"$ref": "#/$defs/x", "properties": {"c": {}},
                "$defs": {"x": {"properties": {}, "additionalProperties": false}}})
        );
        // Integers: both bounds where none is said; one where the other is;
        // none where the user's bound is past 16 digits or a const pins it.
        assert_eq!(
            read(json!({"type": "integer"})),
            json!({"type": "integer", "maximum": m, "minimum": -m})
        );
        assert_eq!(
            read(json!({"type": ["integer", "null"], "minimum": 0})),
            json!({"type": ["integer", "null"], "minimum": 0, "maximum": m})
        );
        assert_eq!(
            read(json!({"type": "integer", "minimum": 1e17})),
            json!({"type": "integer", "minimum": 1e17})
        );
        // Bounds past 2⁵³ that an f64 cannot hold move inward to one that it
        // can (llguidance reads f64s); the cap is itself an f64's.
        assert_eq!(m, 9_999_999_999_999_998);
        assert_eq!(m as f64 as i64, m);
        let odd = 9_007_199_254_740_993i64; // 2⁵³ + 1
        assert_eq!(
            read(json!({"type": "integer", "minimum": odd, "maximum": odd})),
            json!({"type": "integer", "minimum": odd + 1, "maximum": odd - 1})
        );
        // Exclusive bounds made inclusive, exactly (-odd + 1 is an f64;
        // 3·odd − 1 is not, and the f64 below it is 3·odd − 3).
        assert_eq!(
            read(json!({"type": "integer", "exclusiveMinimum": -odd, "exclusiveMaximum": 3 * odd})),
            json!({"type": "integer", "minimum": -odd + 1, "maximum": 3 * odd - 3})
        );
        assert_eq!(
            read(json!({"type": "integer", "exclusiveMinimum": 2, "minimum": 7})),
            json!({"type": "integer", "minimum": 7, "maximum": m})
        );
        let plain = [
            json!({"type": ["integer", "number"]}),
            json!({"type": "integer", "const": 5}),
            json!({"type": "number"}),
        ];
        for v in plain {
            assert_eq!(read(v.clone()), v);
        }
        // Items, anyOf, $defs are schemas.
        assert_eq!(
            read(
                json!({"items": {"type": "integer", "maximum": 3}, "anyOf": [{"properties": {}}]})
            ),
            json!({"items": {"type": "integer", "maximum": 3, "minimum": -m},
                "anyOf": [{"properties": {}, "additionalProperties": false}]})
        );
    }

    #[test]
    fn errors_are_one_short_line() {
        let long = format!(
            "first line {}\nsecond line\nstack backtrace: ...",
            "x".repeat(400)
        );
        let b = brief(&long);
        assert!(b.starts_with("first line") && b.ends_with('…'), "{b}");
        assert_eq!(b.chars().count(), 301);
        // What follows a first line ending in a colon is kept, up to a backtrace.
        assert_eq!(
            brief("regex parse error:\n    ((\n      ^\nerror: unclosed group\nstack backtrace:\n   0: x"),
            "regex parse error: (( ^ error: unclosed group"
        );
        assert_eq!(
            brief("\npanic: assertion failed: x\n   0: ..."),
            "assertion failed: x"
        );
    }

    /// Integers past 2⁵³ under a JSON schema keep to its bounds: they had
    /// been rounded to the nearest f64, which let 10¹⁶ through a maximum of
    /// 9 999 999 999 999 999, and the 16-digit cap let it through too.
    #[test]
    fn integer_bounds_past_2_53_hold() {
        let g = Grammars::new(&tokenizer()).unwrap();
        // Whether `text`, byte by byte, is a complete output of `schema`.
        let complete = |schema: serde_json::Value, text: &str| {
            let mut c = g.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
            for b in text.bytes() {
                let t = 5 + b as u32;
                if !c.allows(t, &[1]).unwrap() {
                    return false;
                }
                c.accept(t).unwrap();
            }
            c.allows(1, &[1]).unwrap()
        };
        let near = serde_json::json!({"type": "integer",
            "minimum": 9_999_999_999_999_990i64, "maximum": 9_999_999_999_999_999i64});
        assert!(complete(near.clone(), "9999999999999998"));
        assert!(!complete(near, "10000000000000000"));
        // (llguidance's own exclusive-to-inclusive step, 10¹⁶ − 1 in f64, is 10¹⁶.)
        let below = serde_json::json!({"type": "integer",
            "exclusiveMaximum": 10_000_000_000_000_000i64});
        assert!(complete(below.clone(), "9999999999999998"));
        assert!(!complete(below, "10000000000000000"));
        let plain = serde_json::json!({"type": "integer"});
        assert!(complete(plain.clone(), "-9999999999999998"));
        assert!(!complete(plain, "10000000000000000"));
    }

    /// The grammar's time for one token and for a generation in all, each
    /// bounded (500 ms; 2 s + 20 ms a token), the error saying which.
    #[test]
    fn grammar_work_is_bounded_per_token_and_in_all() {
        use std::time::Duration;
        let g = Grammars::new(&tokenizer()).unwrap();
        let fresh = || {
            g.compile(&GrammarSpec::Gbnf(r#"root ::= "a"+"#.into()))
                .unwrap()
        };
        let mut c = fresh();
        c.charge(Duration::from_millis(500)).unwrap();
        let e = c
            .charge(Duration::from_millis(501))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("too ambiguous") && e.contains("token 2 took 501 ms"),
            "{e}"
        );
        // 5 × 400 ms = 2.0 s within 2.1 s; 6 × 400 ms = 2.4 s over 2.12 s.
        let mut c = fresh();
        for _ in 0..5 {
            c.charge(Duration::from_millis(400)).unwrap();
        }
        let e = c
            .charge(Duration::from_millis(400))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("its 6 tokens took 2.4 s to match (at most 2.1 s)"),
            "{e}"
        );
    }

    /// A grammar whose parse passes llguidance's limit at a token is the
    /// request's fault (an error it is told), not this engine's, and the
    /// message carries none of llguidance's markup.
    #[test]
    fn a_parse_past_the_limits_is_the_grammar_s_fault() {
        let g = Grammars::new(&tokenizer()).unwrap();
        let alternatives = vec![r#""a" "b""#; 9000].join(" | ");
        let spec = GrammarSpec::Gbnf(format!("root ::= {alternatives}"));
        let mut c = g.compile(&spec).unwrap();
        let e = c.accept(word("a")).unwrap_err();
        assert!(matches!(e, GrammarError::Matcher(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("too ambiguous") && e.contains("max is 8000"),
            "{e}"
        );
        assert!(
            !e.contains("<non-verbose/>") && !e.contains("consider"),
            "{e}"
        );
    }

    #[test]
    fn schemas_compile_or_say_why_not() {
        let g = Grammars::new(&tokenizer()).unwrap();
        let mut c = g.compile(&GrammarSpec::json_object()).unwrap();
        let n = tokenizer().vocab_size();
        // An object starts with '{' (whitespace only comes between its tokens).
        assert_eq!(allowed(&mut c, n), vec![5 + 0x7B]);
        c.accept(5 + 0x7B).unwrap();
        // Then a key, its closing brace, or llama.cpp's whitespace: a space
        // or a line break (not a tab first).
        let next = allowed(&mut c, n);
        assert!(
            next.contains(&(5 + 0x22)) && next.contains(&(5 + 0x7D)),
            "{next:?}"
        );
        assert!(
            next.contains(&(5 + 0x20)) && next.contains(&(5 + 0x0A)),
            "{next:?}"
        );
        assert!(
            !next.contains(&(5 + 0x09)) && !next.contains(&1),
            "{next:?}"
        );
        let bad = |v: serde_json::Value| g.compile(&GrammarSpec::JsonSchema(v)).unwrap_err();
        assert!(bad(serde_json::json!([1]))
            .to_string()
            .contains("must be an object"));
        let unsat = serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1});
        assert!(bad(unsat).to_string().contains("minimum"));
        // The deepest nesting the GBNF reader takes compiles: k parentheses
        // around a literal, repeated as often as the reader lets it.
        for k in 0..24 {
            let (open, close) = ("(".repeat(k), ")".repeat(k));
            let text = |stars: usize| format!("root ::= {open}\"a\"{}{close}", "*".repeat(stars));
            let most = (0..30)
                .take_while(|&s| crate::gbnf::gbnf_to_lark(&text(s)).is_ok())
                .last()
                .unwrap();
            g.compile(&GrammarSpec::Gbnf(text(most)))
                .unwrap_or_else(|e| panic!("{k} parentheses, {most} stars: {e}"));
        }
        // A rule that never finishes: refused before any token.
        let e = g.compile(&GrammarSpec::Gbnf("root ::= root \"a\"".into()));
        assert!(e.unwrap_err().to_string().contains("never finishes"));
        // Objects that name their properties take no others unless they say so.
        let mut c = g
            .compile(&GrammarSpec::JsonSchema(serde_json::json!({
                "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]
            })))
            .unwrap();
        for b in "{\"a\":1".bytes() {
            c.accept(5 + b as u32).unwrap();
        }
        assert!(!allowed(&mut c, n).contains(&(5 + b',' as u32)));
        let mut c = g
            .compile(&GrammarSpec::JsonSchema(serde_json::json!({
                "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                "additionalProperties": true
            })))
            .unwrap();
        for b in "{\"a\":1".bytes() {
            c.accept(5 + b as u32).unwrap();
        }
        assert!(allowed(&mut c, n).contains(&(5 + b',' as u32)));
        // allOf's parts may hold each other's keys (closing each had made
        // this unsatisfiable).
        let all = serde_json::json!({"allOf": [
            {"properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]});
        g.compile(&GrammarSpec::JsonSchema(all)).unwrap();
        // `true`: any value, with llama.cpp's whitespace (no third line break).
        let mut c = g
            .compile(&GrammarSpec::JsonSchema(serde_json::json!(true)))
            .unwrap();
        for b in "[\n\n".bytes() {
            c.accept(5 + b as u32).unwrap();
        }
        assert!(!allowed(&mut c, n).contains(&(5 + 0x0A)));
        // An integer stops at 16 digits unless its bounds say otherwise.
        let mut c = g
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "integer"}),
            ))
            .unwrap();
        for _ in 0..15 {
            assert!(allowed(&mut c, n).contains(&(5 + b'9' as u32)));
            c.accept(5 + b'9' as u32).unwrap();
        }
        // (16 nines is no f64: the cap is 9 999 999 999 999 998.)
        assert!(!allowed(&mut c, n).contains(&(5 + b'9' as u32)));
        c.accept(5 + b'8' as u32).unwrap();
        assert!(c.is_done(), "no 17th digit");
        let mut c = g
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "integer", "minimum": 0}),
            ))
            .unwrap();
        assert!(!allowed(&mut c, n).contains(&(5 + b'-' as u32)));
        assert!(g
            .compile(&GrammarSpec::Gbnf("root ::= x".into()))
            .unwrap_err()
            .to_string()
            .contains("'x' is used but never defined"));
    }
}
