//! SentencePiece-style BPE over token scores, for one raw fragment.
//!
//! ref: llama.cpp `llm_tokenizer_spm_session::tokenize` (originally llama.cpp commit 074bea2). The
//! fragment (spaces escaped to `▁`) starts as one symbol per UTF-8 character in a doubly linked list. A
//! max-heap holds every adjacent pair whose concatenation is a vocabulary token (of any type), keyed by
//! that token's score, ties going to the smaller left index. Popping a pair merges the right symbol into
//! the left one unless the entry is stale, then offers the two new neighbouring pairs. At the end each
//! symbol is a token, or a single character that is not one and falls back to its UTF-8 bytes as
//! `<0xNN>` tokens. O(n log n) in the fragment's length.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::Tokenizer;

/// No neighbour.
const NONE: u32 = u32::MAX;

/// A run of bytes `text[start..start + len]`; `len == 0` once merged into its left neighbour.
/// (u32 fields, as the bigrams': a fragment's symbols and pairs take 32 bytes a character
/// where usize fields took 64, and a fragment is far under 4 GiB: every input is capped.)
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

/// A candidate merge of symbols `left` and `right` into a token with score `score` and `size` bytes.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl Ord for Bigram {
    /// Greater = popped first: higher score, then smaller left index (llama.cpp `llm_bigram_spm::
    /// comparator`). Scores are never NaN and -0.0 is normalised away in `Tokenizer::new`, so `total_cmp`
    /// agrees with C++'s `<`.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// Buffers reused across the fragments of one `encode` call.
#[derive(Default)]
pub(crate) struct Workspace {
    /// The fragment with ' ' replaced by "▁".
    text: String,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
}

impl Workspace {
    /// Appends the tokens of one raw fragment to `out`.
    pub(crate) fn encode(&mut self, tok: &Tokenizer, fragment: &str, out: &mut Vec<u32>) {
        // ref: llama.cpp `llama_escape_whitespace`.
        self.text.clear();
        self.text
            .extend(fragment.chars().map(|c| if c == ' ' { '▁' } else { c }));
        let text = self.text.as_str();
        if text.is_empty() {
            return;
        }

        assert!(
            text.len() < NONE as usize,
            "a text fragment of {} bytes is over the tokenizer's 4 GiB",
            text.len()
        );
        self.symbols.clear();
        let count = text.chars().count() as u32;
        for (i, (start, ch)) in (0u32..).zip(text.char_indices()) {
            self.symbols.push(Symbol {
                start: start as u32,
                len: ch.len_utf8() as u32,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == count { NONE } else { i + 1 },
            });
        }

        self.heap.clear();
        for i in 1..self.symbols.len() as u32 {
            try_add_bigram(tok, text, &self.symbols, &mut self.heap, i - 1, i);
        }

        while let Some(bigram) = self.heap.pop() {
            let left = self.symbols[bigram.left as usize];
            let right = self.symbols[bigram.right as usize];
            // Stale: one side was merged away, or a side grew since this entry was pushed.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            // Merge right into left and unlink right.
            self.symbols[bigram.left as usize].len += right.len;
            self.symbols[bigram.right as usize].len = 0;
            self.symbols[bigram.left as usize].next = right.next;
            if right.next != NONE {
                self.symbols[right.next as usize].prev = bigram.left;
            }
            try_add_bigram(
                tok,
                text,
                &self.symbols,
                &mut self.heap,
                left.prev,
                bigram.left,
            );
            try_add_bigram(
                tok,
                text,
                &self.symbols,
                &mut self.heap,
                bigram.left,
                right.next,
            );
        }

        let mut i = 0;
        while i != NONE {
            let sym = self.symbols[i as usize];
            let piece = &text[sym.start as usize..(sym.start + sym.len) as usize];
            match tok.token_id(piece) {
                Some(id) => out.push(id),
                // Only single characters can be missing: merges only ever form tokens.
                None => out.extend(piece.bytes().map(|b| tok.byte_token(b))),
            }
            i = sym.next;
        }
    }
}

/// Pushes the pair (left, right) if their concatenation is a token.
fn try_add_bigram(
    tok: &Tokenizer,
    text: &str,
    symbols: &[Symbol],
    heap: &mut BinaryHeap<Bigram>,
    left: u32,
    right: u32,
) {
    if left == NONE || right == NONE {
        return;
    }
    // Linked neighbours are contiguous in `text`.
    let start = symbols[left as usize].start;
    let size = symbols[left as usize].len + symbols[right as usize].len;
    if let Some(id) = tok.token_id(&text[start as usize..(start + size) as usize]) {
        heap.push(Bigram {
            score: tok.score(id),
            left,
            right,
            size,
        });
    }
}
