//! Cutting special tokens out of the text before BPE.
//!
//! ref: llama.cpp `llama_vocab::impl::tokenizer_st_partition`. Its semantics, which we reproduce:
//! - the matchable set is every CONTROL, USER_DEFINED and UNKNOWN token, sorted by byte length, longest
//!   first (llama.cpp uses `std::sort`, which is not stable; we keep ids ascending within a length, which
//!   can only matter for two equal-length tokens overlapping in the text);
//! - without `parse_special`, CONTROL and UNKNOWN tokens are skipped but USER_DEFINED ones still match;
//! - token by token in that order, every still-raw fragment is searched left to right for non-overlapping
//!   occurrences (find, then continue after the match), each splitting the fragment into
//!   raw | token | raw. A token never matches across an earlier match.
//!
//! llama.cpp does this with one substring search per token per fragment: O(#specials × text). We get the
//! same result from a byte trie of the matchable tokens, walked from each position of the text as far as
//! the text follows it: every occurrence of every token is collected, the hits are applied in (token
//! order, position) order, and a hit is taken only if none of its bytes is already claimed. That is
//! exactly llama.cpp's outcome: within one token, the greedy left-to-right search accepts an occurrence iff
//! it lies wholly in raw text not claimed by an earlier token or by its own previous occurrence. Time
//! O(text × longest token), which [`crate::MAX_SPECIAL_LEN`] bounds (Gemma 3's longest is 31 bytes), memory
//! O(text + hits). (One pass per distinct token length had cost text × the sum of the lengths: 43 s for
//! 5 KB of text against a crafted vocabulary of 2000 of them.)

use std::ops::Range;

use crate::TokenType;

/// A piece of the partitioned text, in text order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    /// Bytes of the input still to be BPE-encoded (always on char boundaries).
    Raw(Range<usize>),
    /// A whole special token.
    Token(u32),
}

/// One matchable token, at its rank in matching order.
#[derive(Clone, Debug)]
struct Entry {
    id: u32,
    len: usize,
}

#[derive(Clone, Debug, Default)]
struct Node {
    /// (byte, child node index), sorted by byte.
    children: Vec<(u8, u32)>,
    /// First rank whose text ends here, among all matchable tokens (used with `parse_special`).
    any: Option<u32>,
    /// First rank whose text ends here among USER_DEFINED tokens (used without `parse_special`).
    /// Later ranks with the same text can never match: the first one claims every occurrence.
    user: Option<u32>,
}

/// The matchable special tokens, built once per vocabulary.
#[derive(Clone, Debug)]
pub(crate) struct SpecialMatcher {
    /// Matchable tokens in matching order (length descending, then id ascending).
    entries: Vec<Entry>,
    /// Byte trie of their texts; node 0 is the root.
    nodes: Vec<Node>,
    /// Bytes that start some matchable token: a cheap filter before walking the trie.
    first_bytes: [bool; 256],
}

impl SpecialMatcher {
    pub(crate) fn new(tokens: &crate::Texts, types: &[TokenType]) -> Self {
        let mut matchable: Vec<(u32, bool)> = tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (text, ty))| {
                // An empty text would match everywhere (llama.cpp would loop on it); skip it.
                !text.is_empty()
                    && matches!(
                        ty,
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(id, (_, ty))| (id as u32, *ty == TokenType::UserDefined))
            .collect();
        // Stable sort: ids stay ascending within a length.
        matchable.sort_by_key(|&(id, _)| std::cmp::Reverse(tokens.get(id as usize).len()));

        let mut nodes = vec![Node::default()];
        let mut first_bytes = [false; 256];
        let mut entries = Vec::with_capacity(matchable.len());
        for (rank, &(id, user_defined)) in matchable.iter().enumerate() {
            let text = tokens.get(id as usize).as_bytes();
            first_bytes[text[0] as usize] = true;
            let mut node = 0usize;
            for &b in text {
                node = match nodes[node].children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => nodes[node].children[i].1 as usize,
                    Err(i) => {
                        let child = nodes.len();
                        nodes[node].children.insert(i, (b, child as u32));
                        nodes.push(Node::default());
                        child
                    }
                };
            }
            let rank = rank as u32;
            let end = &mut nodes[node];
            end.any.get_or_insert(rank);
            if user_defined {
                end.user.get_or_insert(rank);
            }
            entries.push(Entry {
                id,
                len: text.len(),
            });
        }

        Self {
            entries,
            nodes,
            first_bytes,
        }
    }

    /// Number of matchable tokens (with `parse_special`).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Splits `text` into raw fragments and special tokens (see the module docs).
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        let n = bytes.len();
        if n == 0 {
            return Vec::new();
        }
        // (rank, start) of every occurrence of every active token: one walk
        // down the trie from each position, as far as the text follows it.
        let mut hits: Vec<(u32, usize)> = Vec::new();
        for pos in 0..n {
            if !self.first_bytes[bytes[pos] as usize] {
                continue;
            }
            let mut node = 0usize;
            for &b in &bytes[pos..] {
                let children = &self.nodes[node].children;
                let Ok(i) = children.binary_search_by_key(&b, |&(c, _)| c) else {
                    break;
                };
                node = children[i].1 as usize;
                let end = &self.nodes[node];
                if let Some(rank) = if parse_special { end.any } else { end.user } {
                    hits.push((rank, pos));
                }
            }
        }
        // Token by token in matching order (longest first), each left to
        // right; a hit only where none of its bytes is claimed yet.
        hits.sort_unstable();
        // (n,) true where a byte belongs to an accepted special token.
        let mut claimed = vec![false; n];
        // (start, rank) of accepted tokens.
        let mut accepted: Vec<(usize, u32)> = Vec::new();
        for &(rank, pos) in &hits {
            let len = self.entries[rank as usize].len;
            let span = &mut claimed[pos..pos + len];
            if span.iter().any(|&c| c) {
                continue;
            }
            span.fill(true);
            accepted.push((pos, rank));
        }

        accepted.sort_unstable();
        let mut fragments = Vec::with_capacity(2 * accepted.len() + 1);
        let mut cursor = 0;
        for (start, rank) in accepted {
            let entry = &self.entries[rank as usize];
            if start > cursor {
                fragments.push(Fragment::Raw(cursor..start));
            }
            fragments.push(Fragment::Token(entry.id));
            cursor = start + entry.len;
        }
        if cursor < n {
            fragments.push(Fragment::Raw(cursor..n));
        }
        fragments
    }
}
