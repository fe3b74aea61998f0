//! Gemma 3's tokenizer: a SentencePiece-style BPE over a scored vocabulary, as llama.cpp runs it.
//!
//! The vocabulary arrives as three parallel lists (token text, score, token type), as a GGUF file stores
//! them under `tokenizer.ggml.{tokens,scores,token_type}`; this crate knows nothing of file formats.
//!
//! Encoding reproduces llama.cpp's `llama_vocab::impl::tokenize` for an SPM vocabulary with
//! `add_space_prefix = false` (Gemma 3), token for token:
//!
//! 1. Partition (module `partition`): special tokens (CONTROL, USER_DEFINED, UNKNOWN) are cut out of
//!    the text first, longest first across the whole text (llama.cpp's `tokenizer_st_partition`).
//!    USER_DEFINED tokens (runs of `\n`, `\t` and spaces, some HTML tags) are cut out even when special
//!    tokens are not parsed.
//! 2. BPE (module `spm`): every remaining raw fragment has its spaces escaped to `▁` (U+2581) and is
//!    merged pair by pair, best-scoring pair first (llama.cpp's `llm_tokenizer_spm_session`); characters
//!    that are not tokens fall back to `<0xNN>` byte tokens.
//!
//! Decoding maps each token to its bytes ([`Tokenizer::token_to_piece`]); [`StreamDecoder`] turns a stream
//! of tokens into text without ever splitting a UTF-8 character.
//!
//! ref: llama.cpp `src/llama-vocab.cpp` (commit 0c1e570, the one bundled in llama-cpp-python 0.3.36).
//!
//! ```
//! use gemma3_tokenizer::{SpecialTokens, Tokenizer};
//! // A toy vocabulary: <pad> <eos> <bos>, three pieces (type 1 NORMAL), "\n\n" (type 4 USER_DEFINED),
//! // and the 256 byte tokens (type 6) that byte fallback needs.
//! let mut tokens: Vec<String> =
//!     ["<pad>", "<eos>", "<bos>", "▁", "h", "▁h", "\n\n"].map(String::from).into();
//! let mut scores = vec![0.0, 0.0, 0.0, -1.0, -2.0, -0.5, 0.0];
//! let mut types = vec![3, 3, 3, 1, 1, 1, 4];
//! for b in 0..=255u8 {
//!     tokens.push(format!("<0x{b:02X}>"));
//!     scores.push(0.0);
//!     types.push(6);
//! }
//! let specials = SpecialTokens {
//!     bos: 2,
//!     eos: 1,
//!     unk: None,
//!     pad: Some(0),
//!     start_of_turn: None,
//!     end_of_turn: None,
//! };
//! let tok = Tokenizer::new(tokens, scores, types, specials)?;
//! let ids = tok.encode(" h\n\né", true, false);
//! assert_eq!(ids, [2, 5, 6, 7 + 0xC3, 7 + 0xA9]); // <bos> "▁h" "\n\n" <0xC3> <0xA9>
//! assert_eq!(tok.decode(&ids, false)?, " h\n\né");
//! # Ok::<(), gemma3_tokenizer::TokenizerError>(())
//! ```

mod decode;
mod partition;
mod spm;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use std::fmt;
use std::hash::BuildHasher;

pub use decode::StreamDecoder;

use TokenType as Type;

/// The kind of a vocabulary entry, as stored in GGUF's `tokenizer.ggml.token_type` (SentencePiece's
/// `ModelProto.SentencePiece.Type`, numbered from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 1: ordinary text piece; `▁` stands for a space.
    Normal,
    /// 2: the unknown-token placeholder.
    Unknown,
    /// 3: control token (`<bos>`, `<start_of_turn>`, ...): matched in text only when special tokens are
    /// parsed, decoded to nothing unless asked for.
    Control,
    /// 4: user-defined token: always matched in text before BPE, decoded as its text.
    UserDefined,
    /// 5: unused slot: never decoded to text.
    Unused,
    /// 6: a raw byte, text `<0xNN>`.
    Byte,
}

impl TryFrom<i32> for TokenType {
    type Error = i32;

    /// Maps GGUF's token type number; returns the number itself when it is not one of 1..=6.
    fn try_from(value: i32) -> Result<Self, i32> {
        Ok(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => return Err(other),
        })
    }
}

impl TokenType {
    /// CONTROL and UNKNOWN tokens: matched in text only with `parse_special`, decoded to text only with
    /// `special` (llama.cpp's `LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN`).
    fn is_parse_special_only(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// Ids of the tokens the engine and the chat template need by role. The caller reads them from the
/// model's metadata (bos/eos/unk/pad) or looks them up by text (`<start_of_turn>`, `<end_of_turn>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence, prepended by [`Tokenizer::encode`] when `add_bos` is set (Gemma 3: 2).
    pub bos: u32,
    /// End of sequence (Gemma 3: 1).
    pub eos: u32,
    /// Unknown token (Gemma 3: 3). Never produced by encoding: unknown characters become byte tokens.
    pub unk: Option<u32>,
    /// Padding (Gemma 3: 0).
    pub pad: Option<u32>,
    /// `<start_of_turn>` (Gemma 3: 105).
    pub start_of_turn: Option<u32>,
    /// `<end_of_turn>` (Gemma 3: 106), where an instruction-tuned model ends its answer.
    pub end_of_turn: Option<u32>,
}

/// What went wrong building or using a [`Tokenizer`].
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum TokenizerError {
    /// The three vocabulary lists must have one entry per token.
    #[error(
        "vocabulary lists differ in length: {tokens} tokens, {scores} scores, {types} token types"
    )]
    LengthMismatch {
        tokens: usize,
        scores: usize,
        types: usize,
    },
    /// Token ids are u32.
    #[error("vocabulary has {0} tokens, more than u32 ids can address")]
    TooManyTokens(usize),
    /// A token type outside 1..=6.
    #[error("token {id} ({text:?}) has unknown token type {value} (expected 1..=6)")]
    InvalidTokenType { id: u32, text: String, value: i32 },
    /// A NaN score would make the merge order undefined.
    #[error("token {id} ({text:?}) has a NaN score")]
    NanScore { id: u32, text: String },
    /// Byte fallback needs all 256 tokens `<0x00>`..`<0xFF>`.
    #[error(
        "byte token {text} is missing from the vocabulary (byte fallback needs <0x00>..<0xFF>)"
    )]
    MissingByteToken { text: String },
    /// A BYTE-type token whose text is not `<0xNN>`.
    #[error("token {id} has type BYTE but text {text:?}, expected <0xNN>")]
    MalformedByteToken { id: u32, text: String },
    /// A special token id that is not in the vocabulary.
    #[error(
        "special token {role} has id {id}, out of range for a vocabulary of {vocab_size} tokens"
    )]
    SpecialOutOfRange {
        role: &'static str,
        id: u32,
        vocab_size: usize,
    },
    /// A token id that is not in the vocabulary.
    #[error("token id {0} is not in the vocabulary")]
    UnknownId(u32),
    /// A special token longer than [`MAX_SPECIAL_LEN`].
    #[error("special token {id} is {len} bytes long, more than {MAX_SPECIAL_LEN}")]
    SpecialTooLong { id: u32, len: usize },
}

/// Longest text a CONTROL, USER_DEFINED or UNKNOWN token may have (Gemma 3's
/// longest is 31 bytes): finding them in a text takes time proportional to
/// the text's length times this.
pub const MAX_SPECIAL_LEN: usize = 1024;

/// Gemma 3's tokenizer: vocabulary, text→id map and special-token matcher, built once by [`Tokenizer::new`].
#[derive(Clone)]
pub struct Tokenizer {
    /// Raw token texts.
    texts: Texts,
    /// (vocab,) merge priorities; -0.0 normalised to 0.0 so ordering matches C++'s `<`.
    scores: Vec<f32>,
    /// (vocab,)
    types: Vec<TokenType>,
    /// Text → id over every token of any type, as a table of ids hashed by their texts (so no key
    /// is a String of its own: building 262 144 of them, and freeing them, took a large share of the
    /// load). For duplicate texts the later id wins (as llama.cpp's `token_to_id[word] = i`).
    /// (Fx hashing, not SipHash: its keys are the fixed vocabulary, and encoding looks texts up
    /// here for every merge. `gemma3 tokenize` on 104 KB of text, less the same on "hi": 41 → 16 ms,
    /// medians of 10 alternating runs on the Zen 3; loading the same within the noise.)
    token_to_id: HashTable<u32>,
    /// Byte value → id of the token `<0xNN>`.
    byte_tokens: [u32; 256],
    /// CONTROL / USER_DEFINED / UNKNOWN tokens in matching order.
    specials_matcher: partition::SpecialMatcher,
    /// Decoded bytes of every token with `special = true`, concatenated; token i is
    /// `pieces[piece_offsets[i]..piece_offsets[i + 1]]`. (vocab + 1,) offsets.
    pieces: Vec<u8>,
    piece_offsets: Vec<usize>,
    specials: SpecialTokens,
}

/// The vocabulary's texts, concatenated: token i is `buf[offsets[i]..offsets[i + 1]]`.
#[derive(Clone)]
struct Texts {
    buf: String,
    /// (vocab + 1,), starting at 0; each a char boundary, as every text was a whole `str`.
    offsets: Vec<usize>,
}

impl Texts {
    fn collect<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Self {
        let tokens = tokens.into_iter();
        let mut offsets = Vec::with_capacity(tokens.size_hint().0 + 1);
        offsets.push(0);
        let mut buf = String::new();
        for text in tokens {
            buf.push_str(text.as_ref());
            offsets.push(buf.len());
        }
        Self { buf, offsets }
    }

    fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Text of token `id`; `id < len()`.
    fn get(&self, id: usize) -> &str {
        &self.buf[self.offsets[id]..self.offsets[id + 1]]
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        self.offsets.windows(2).map(|w| &self.buf[w[0]..w[1]])
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_matchables", &self.specials_matcher.len())
            .field("specials", &self.specials)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from the three parallel vocabulary lists (`types` as GGUF numbers them, see
    /// [`TokenType`]). Checks that the lists have equal length, every type is known, no score is NaN, the
    /// byte tokens `<0x00>`..`<0xFF>` all exist, BYTE tokens are spelled `<0xNN>`, and every id in
    /// `specials` is in range.
    pub fn new<S: AsRef<str>>(
        tokens: impl IntoIterator<Item = S>,
        scores: Vec<f32>,
        types: Vec<i32>,
        specials: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let texts = Texts::collect(tokens);
        let n = texts.len();
        if scores.len() != n || types.len() != n {
            return Err(TokenizerError::LengthMismatch {
                tokens: n,
                scores: scores.len(),
                types: types.len(),
            });
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::TooManyTokens(n));
        }

        let mut parsed_types = Vec::with_capacity(n);
        for (id, (&value, text)) in types.iter().zip(texts.iter()).enumerate() {
            let ty =
                TokenType::try_from(value).map_err(|value| TokenizerError::InvalidTokenType {
                    id: id as u32,
                    text: text.to_string(),
                    value,
                })?;
            let special = matches!(
                ty,
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            );
            if special && text.len() > MAX_SPECIAL_LEN {
                return Err(TokenizerError::SpecialTooLong {
                    id: id as u32,
                    len: text.len(),
                });
            }
            parsed_types.push(ty);
        }

        let mut scores = scores;
        for (id, score) in scores.iter_mut().enumerate() {
            if score.is_nan() {
                return Err(TokenizerError::NanScore {
                    id: id as u32,
                    text: texts.get(id).to_string(),
                });
            }
            // C++ compares scores with `<`, where -0.0 == 0.0; `f32::total_cmp` would not. The real vocab
            // has one -0.0 ("▁t", id 494).
            if *score == 0.0 {
                *score = 0.0;
            }
        }

        // ref: llama.cpp `byte_to_token` for SPM looks up the text "<0x%02X>" (uppercase hex): the
        // last token with exactly that text, of any type (as a lookup in `token_to_id` finds it).
        let mut byte_tokens = [u32::MAX; 256];
        for (id, text) in texts.iter().enumerate() {
            if let Some(byte) = parse_byte_token(text) {
                if text == byte_token_text(byte) {
                    byte_tokens[byte as usize] = id as u32;
                }
            }
        }
        for (byte, &id) in byte_tokens.iter().enumerate() {
            if id == u32::MAX {
                let text = byte_token_text(byte as u8);
                return Err(TokenizerError::MissingByteToken { text });
            }
        }

        let mut pieces = Vec::new();
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0);
        for (id, (text, &ty)) in texts.iter().zip(&parsed_types).enumerate() {
            match ty {
                Type::Normal => {
                    // `text.replace('▁', " ")`, without a String per token.
                    for (i, part) in text.split('▁').enumerate() {
                        if i > 0 {
                            pieces.push(b' ');
                        }
                        pieces.extend_from_slice(part.as_bytes());
                    }
                }
                Type::UserDefined | Type::Control | Type::Unknown => {
                    pieces.extend_from_slice(text.as_bytes())
                }
                Type::Byte => {
                    let byte = parse_byte_token(text).ok_or_else(|| {
                        TokenizerError::MalformedByteToken {
                            id: id as u32,
                            text: text.to_string(),
                        }
                    })?;
                    pieces.push(byte);
                }
                // llama.cpp decodes UNUSED to nothing even with `special = true`: its token_to_piece
                // copies text only for CONTROL | UNKNOWN | USER_DEFINED, NORMAL and BYTE.
                Type::Unused => {}
            }
            piece_offsets.push(pieces.len());
        }

        let roles = [
            ("bos", Some(specials.bos)),
            ("eos", Some(specials.eos)),
            ("unk", specials.unk),
            ("pad", specials.pad),
            ("start_of_turn", specials.start_of_turn),
            ("end_of_turn", specials.end_of_turn),
        ];
        for (role, id) in roles {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialOutOfRange {
                        role,
                        id,
                        vocab_size: n,
                    });
                }
            }
        }

        let specials_matcher = partition::SpecialMatcher::new(&texts, &parsed_types);

        // A later duplicate text takes over the earlier one's entry, as llama.cpp's
        // `token_to_id[word] = i` does.
        let mut token_to_id = HashTable::with_capacity(n);
        for (id, text) in texts.iter().enumerate() {
            let hash = FxBuildHasher.hash_one(text);
            match token_to_id.find_mut(hash, |&other: &u32| texts.get(other as usize) == text) {
                Some(entry) => *entry = id as u32,
                None => {
                    token_to_id.insert_unique(hash, id as u32, |&other: &u32| {
                        FxBuildHasher.hash_one(texts.get(other as usize))
                    });
                }
            }
        }

        Ok(Self {
            texts,
            scores,
            types: parsed_types,
            token_to_id,
            byte_tokens,
            specials_matcher,
            pieces,
            piece_offsets,
            specials,
        })
    }

    /// Encodes `text` into token ids, exactly as llama.cpp's `llama_tokenize(vocab, text, add_special =
    /// add_bos, parse_special)` does for Gemma 3.
    ///
    /// With `parse_special == false`, text such as `<start_of_turn>` is tokenized as plain text (but
    /// USER_DEFINED tokens such as `"\n\n"` or `"<table>"` are still matched whole). With `add_bos`, the BOS
    /// id is prepended (also for empty text).
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.push(self.specials.bos);
        }
        let mut bpe = spm::Workspace::default();
        for fragment in self.specials_matcher.partition(text, parse_special) {
            match fragment {
                partition::Fragment::Raw(range) => bpe.encode(self, &text[range], &mut out),
                partition::Fragment::Token(id) => out.push(id),
            }
        }
        out
    }

    /// Decodes ids to text: the concatenated bytes of [`Tokenizer::token_to_piece`], converted to UTF-8
    /// lossily at the end (an invalid byte sequence becomes U+FFFD). Does not strip a leading BOS: with
    /// `special == false` it decodes to nothing anyway.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_to_piece(id, special)?);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The bytes token `id` decodes to (llama.cpp's `token_to_piece` with `lstrip = 0`):
    /// NORMAL → its text with `▁` as space; USER_DEFINED → its text; BYTE → the one raw byte (possibly part
    /// of a UTF-8 character); CONTROL / UNKNOWN → nothing, or their text when `special`; UNUSED → nothing.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<&[u8], TokenizerError> {
        let ty = self.token_type(id).ok_or(TokenizerError::UnknownId(id))?;
        if !special && ty.is_parse_special_only() {
            return Ok(&[]);
        }
        let i = id as usize;
        Ok(&self.pieces[self.piece_offsets[i]..self.piece_offsets[i + 1]])
    }

    /// The raw vocabulary text of token `id` (with `▁` for spaces, `<0xNN>` for bytes).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        (i < self.texts.len()).then(|| self.texts.get(i))
    }

    /// The id of the token whose raw vocabulary text is exactly `text` (the last one, for duplicates).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        let hash = FxBuildHasher.hash_one(text);
        self.token_to_id
            .find(hash, |&id| self.texts.get(id as usize) == text)
            .copied()
    }

    /// The type of token `id`.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Number of tokens in the vocabulary (Gemma 3: 262144).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The special token ids given to [`Tokenizer::new`].
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// A decoder for a stream of generated tokens that emits only whole UTF-8 characters.
    pub fn stream_decoder(&self, special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, special)
    }

    fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }

    fn byte_token(&self, byte: u8) -> u32 {
        self.byte_tokens[byte as usize]
    }
}

/// `<0xNN>` with uppercase hex, the spelling SentencePiece and llama.cpp use.
fn byte_token_text(byte: u8) -> String {
    format!("<0x{byte:02X}>")
}

/// Parses `<0xNN>` (either case of hex digit) to its byte value.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
