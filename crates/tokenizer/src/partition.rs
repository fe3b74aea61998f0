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
//! same result from a byte trie of the matchable tokens, one pass over the text per distinct token length
//! (at most 31 for Gemma 3), longest first: every hit of that length is collected, hits are applied in
//! (token order, position) order, and a hit is taken only if none of its bytes is already claimed. That is
//! exactly llama.cpp's outcome: within one token, the greedy left-to-right search accepts an occurrence iff
//! it lies wholly in raw text not claimed by an earlier token or by its own previous occurrence. Time
//! O(text × max token length), memory O(text).

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
    /// Distinct token lengths, descending: all matchable tokens / USER_DEFINED only.
    lengths_any: Vec<usize>,
    lengths_user: Vec<usize>,
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
        let mut lengths_any = Vec::new();
        let mut lengths_user = Vec::new();
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
            // Lengths arrive in descending order.
            if lengths_any.last() != Some(&text.len()) {
                lengths_any.push(text.len());
            }
            if user_defined && lengths_user.last() != Some(&text.len()) {
                lengths_user.push(text.len());
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
            lengths_any,
            lengths_user,
        }
    }

    /// Number of matchable tokens (with `parse_special`).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The rank of the first active matchable token whose text is exactly `bytes`.
    fn exact_match(&self, bytes: &[u8], parse_special: bool) -> Option<u32> {
        let mut node = 0usize;
        for &b in bytes {
            let children = &self.nodes[node].children;
            let i = children.binary_search_by_key(&b, |&(c, _)| c).ok()?;
            node = children[i].1 as usize;
        }
        let node = &self.nodes[node];
        if parse_special {
            node.any
        } else {
            node.user
        }
    }

    /// Splits `text` into raw fragments and special tokens (see the module docs).
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        let n = bytes.len();
        if n == 0 {
            return Vec::new();
        }
        let lengths = if parse_special {
            &self.lengths_any
        } else {
            &self.lengths_user
        };

        // (n,) true where a byte belongs to an accepted special token.
        let mut claimed = vec![false; n];
        // (start, rank) of accepted tokens.
        let mut accepted: Vec<(usize, u32)> = Vec::new();
        // (rank, start) of candidate occurrences of one length.
        let mut hits: Vec<(u32, usize)> = Vec::new();
        for &len in lengths {
            if len > n {
                continue;
            }
            hits.clear();
            for pos in 0..=n - len {
                if claimed[pos] || !self.first_bytes[bytes[pos] as usize] {
                    continue;
                }
                if let Some(rank) = self.exact_match(&bytes[pos..pos + len], parse_special) {
                    hits.push((rank, pos));
                }
            }
            // Token by token in matching order, each left to right.
            hits.sort_unstable();
            for &(rank, pos) in &hits {
                let span = &mut claimed[pos..pos + len];
                if span.iter().any(|&c| c) {
                    continue;
                }
                span.fill(true);
                accepted.push((pos, rank));
            }
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
