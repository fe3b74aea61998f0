//! Incremental decoding of a token stream into text.

use crate::{Tokenizer, TokenizerError};

/// Decodes tokens one at a time (as a generator produces them) into text, never emitting half a UTF-8
/// character.
///
/// Byte tokens can split a character (an emoji is often four `<0xNN>` tokens): incomplete trailing bytes
/// are held back until a later token completes them. Bytes that can never become valid (an invalid lead
/// byte, or an incomplete sequence broken by the next byte) come out as one U+FFFD per maximal invalid
/// sequence, as [`String::from_utf8_lossy`] does, so the concatenated output of [`StreamDecoder::push`] and
/// [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of the same ids.
#[derive(Debug, Clone)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    special: bool,
    /// Bytes not yet emitted: at most an incomplete UTF-8 sequence (< 4 bytes) between calls.
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, special: bool) -> Self {
        Self {
            tokenizer,
            special,
            pending: Vec::with_capacity(8),
        }
    }

    /// Adds token `id` and returns the text it completes (possibly empty).
    /// An out-of-range id is an error and leaves the decoder unchanged.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let piece = self.tokenizer.token_to_piece(id, self.special)?;
        self.pending.extend_from_slice(piece);
        Ok(self.take_complete())
    }

    /// Returns whatever is still held back, with incomplete sequences as U+FFFD, and empties the decoder.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Moves every complete character (and U+FFFD for each invalid sequence) out of `pending`, leaving
    /// only a trailing sequence that may still complete.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Can never become valid: replace and go on after it.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // A valid prefix cut off by the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let consumed = self.pending.len() - rest.len();
        self.pending.drain(..consumed);
        out
    }
}
