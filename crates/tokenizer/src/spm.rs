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
const NONE: usize = usize::MAX;

/// A run of bytes `text[start..start + len]`; `len == 0` once merged into its left neighbour.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

/// A candidate merge of symbols `left` and `right` into a token with score `score` and `size` bytes.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
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

        self.symbols.clear();
        let count = text.chars().count();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            self.symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == count { NONE } else { i + 1 },
            });
        }

        self.heap.clear();
        for i in 1..self.symbols.len() {
            try_add_bigram(tok, text, &self.symbols, &mut self.heap, i - 1, i);
        }

        while let Some(bigram) = self.heap.pop() {
            let left = self.symbols[bigram.left];
            let right = self.symbols[bigram.right];
            // Stale: one side was merged away, or a side grew since this entry was pushed.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            // Merge right into left and unlink right.
            self.symbols[bigram.left].len += right.len;
            self.symbols[bigram.right].len = 0;
            self.symbols[bigram.left].next = right.next;
            if right.next != NONE {
                self.symbols[right.next].prev = bigram.left;
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
            let sym = self.symbols[i];
            let piece = &text[sym.start..sym.start + sym.len];
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
    left: usize,
    right: usize,
) {
    if left == NONE || right == NONE {
        return;
    }
    // Linked neighbours are contiguous in `text`.
    let start = symbols[left].start;
    let size = symbols[left].len + symbols[right].len;
    if let Some(id) = tok.token_id(&text[start..start + size]) {
        heap.push(Bigram {
            score: tok.score(id),
            left,
            right,
            size,
        });
    }
}
