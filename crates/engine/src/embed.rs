//! Embeddings: a text's final hidden states (after the output norm, the
//! vectors the output head reads) pooled into one vector, as llama.cpp's
//! `--embeddings --pooling` pools them, then optionally scaled to unit
//! length (llama.cpp's default for llama-server's `/v1/embeddings` and
//! `llama-embedding`).
//!
//! The file's metadata names no pooling for this model (it is a language
//! model, not an embedding model), so llama-server needs `--pooling`; here
//! the default is mean, the usual choice for a causal model's sentence
//! vectors.

use crate::session::SessionError;
use gemma3_model::{Batch, ForwardState, KvCache, Model, Output};
use std::fmt;

/// Tokens per forward pass of [`embed_texts`] (the micro-batch a prompt
/// fills): enough texts that the weights, read once per pass, cost little
/// beside the arithmetic.
pub const GROUP_TOKENS: usize = 512;

/// How a sequence's hidden states become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooling {
    /// The average over every token, BOS included (llama.cpp's `mean`).
    #[default]
    Mean,
    /// The last token's (llama.cpp's `last`): the one that has read the
    /// whole text.
    Last,
    /// The first token's (llama.cpp's `cls`; for this model always BOS, so
    /// the same vector for every text: there for parity only).
    Cls,
}

impl Pooling {
    pub const NAMES: [&'static str; 3] = ["mean", "last", "cls"];

    pub fn parse(s: &str) -> Option<Pooling> {
        match s {
            "mean" => Some(Pooling::Mean),
            "last" => Some(Pooling::Last),
            "cls" => Some(Pooling::Cls),
            _ => None,
        }
    }

    /// Whether position `i` of a text of `len` tokens takes part.
    pub fn reads(self, i: usize, len: usize) -> bool {
        match self {
            Pooling::Mean => true,
            Pooling::Last => i + 1 == len,
            Pooling::Cls => i == 0,
        }
    }

    /// What the forward pass must yield at position `i` of a text of `len`
    /// tokens: its hidden state where this pooling reads it.
    pub fn output_at(self, i: usize, len: usize) -> Output {
        if self.reads(i, len) {
            Output::Hidden
        } else {
            Output::None
        }
    }
}

/// A pooling's name, as a command-line value (the error names the choices).
impl std::str::FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Pooling, String> {
        Pooling::parse(s).ok_or_else(|| {
            format!(
                "'{s}' is not a pooling: one of {}",
                Pooling::NAMES.join(", ")
            )
        })
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = *self as usize;
        f.write_str(Pooling::NAMES[i])
    }
}

/// One text's pooling, fed its hidden rows as they are computed (a long
/// text is read over several steps).
#[derive(Clone, Debug)]
pub struct Pooler {
    pooling: Pooling,
    sum: Vec<f64>,
    rows: usize,
}

impl Pooler {
    pub fn new(pooling: Pooling, d_model: usize) -> Self {
        Pooler {
            pooling,
            sum: vec![0.0; d_model],
            rows: 0,
        }
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Add the hidden state of a position that [`Pooling::reads`].
    pub fn add(&mut self, row: &[f32]) {
        assert_eq!(row.len(), self.sum.len(), "a hidden row of d_model floats");
        for (s, &x) in self.sum.iter_mut().zip(row) {
            *s += x as f64;
        }
        self.rows += 1;
    }

    /// The pooled vector, scaled to unit length when `normalize`. None when
    /// no row was added.
    pub fn finish(&self, normalize: bool) -> Option<Vec<f32>> {
        if self.rows == 0 {
            return None;
        }
        let n = self.rows as f64;
        let mut v: Vec<f32> = self.sum.iter().map(|&s| (s / n) as f32).collect();
        if normalize {
            normalize_l2(&mut v);
        }
        Some(v)
    }
}

/// Run `texts` through one forward pass, text k as sequence k from position
/// 0 in `caches[k]`, and pool each one's hidden states. A text's vector has
/// the bits it has alone (the forward pass computes each token's row on its
/// own).
pub(crate) fn pool_texts(
    model: &Model,
    texts: &[&[u32]],
    caches: &mut [KvCache],
    batch: &mut Batch,
    st: &mut ForwardState,
    pooling: Pooling,
    normalize: bool,
) -> Result<Vec<Vec<f32>>, SessionError> {
    batch.clear();
    for (k, text) in texts.iter().enumerate() {
        for (i, &t) in text.iter().enumerate() {
            batch.push_out(t, i, k, pooling.output_at(i, text.len()));
        }
    }
    model.forward(batch, caches, st)?;
    let d = model.config.d_model;
    let hidden = st.hidden();
    if hidden.iter().any(|x| !x.is_finite()) {
        return Err(SessionError::NonFiniteHidden);
    }
    // Row h of `hidden` is the batch's h-th token with an output: text by text.
    let mut rows = hidden.chunks(d);
    Ok(texts
        .iter()
        .map(|text| {
            let mut pooler = Pooler::new(pooling, d);
            (0..text.len())
                .filter(|&i| pooling.reads(i, text.len()))
                .for_each(|_| pooler.add(rows.next().expect("a hidden row per output")));
            pooler
                .finish(normalize)
                .expect("every pooling reads a position of a non-empty text")
        })
        .collect())
}

/// The embeddings of `texts` (token ids, BOS first), in order, handed to
/// `out` as they are made (it returns false to stop). Texts go several to a
/// forward pass, up to [`GROUP_TOKENS`] tokens (a longer one alone), each
/// with a cache of its own length, so that the weights are read once per
/// group rather than once per text; each vector has the bits
/// [`crate::Session::embed`] gives its text alone.
pub fn embed_texts(
    model: &Model,
    texts: &[Vec<u32>],
    pooling: Pooling,
    normalize: bool,
    mut out: impl FnMut(Vec<f32>) -> bool,
) -> Result<(), SessionError> {
    let ctx = model.config.ctx_len;
    for t in texts {
        if t.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        if t.len() > ctx {
            return Err(SessionError::PromptTooLong {
                prompt: t.len(),
                ctx,
            });
        }
    }
    let (mut batch, mut st) = (Batch::default(), ForwardState::new());
    let mut start = 0;
    while start < texts.len() {
        let mut end = start + 1;
        let mut tokens = texts[start].len();
        while end < texts.len() && tokens + texts[end].len() <= GROUP_TOKENS {
            tokens += texts[end].len();
            end += 1;
        }
        let group: Vec<&[u32]> = texts[start..end].iter().map(Vec::as_slice).collect();
        let mut caches = (group.iter())
            .map(|t| KvCache::try_new(&model.config, t.len()))
            .collect::<Result<Vec<_>, _>>()?;
        let vectors = pool_texts(
            model,
            &group,
            &mut caches,
            &mut batch,
            &mut st,
            pooling,
            normalize,
        )?;
        for v in vectors {
            if !out(v) {
                return Ok(());
            }
        }
        start = end;
    }
    Ok(())
}

/// Scale `v` to unit Euclidean length (a zero vector stays zero), as
/// llama.cpp's `common_embd_normalize(.., 2)` does.
pub fn normalize_l2(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    v.iter_mut().for_each(|x| *x = (*x as f64 * scale) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_by_hand() {
        // Rows (1, 2), (3, 4), (5, 12): mean (3, 6); last (5, 12), whose
        // length is 13.
        let rows = [[1.0f32, 2.0], [3.0, 4.0], [5.0, 12.0]];
        let pooled = |p: Pooling, normalize: bool| {
            let mut pooler = Pooler::new(p, 2);
            for (i, r) in rows.iter().enumerate() {
                if p.reads(i, rows.len()) {
                    pooler.add(r);
                }
            }
            pooler.finish(normalize).unwrap()
        };
        assert_eq!(pooled(Pooling::Mean, false), [3.0, 6.0]);
        assert_eq!(pooled(Pooling::Last, false), [5.0, 12.0]);
        assert_eq!(pooled(Pooling::Cls, false), [1.0, 2.0]);
        assert_eq!(pooled(Pooling::Last, true), [5.0 / 13.0, 12.0 / 13.0]);
        assert_eq!(Pooler::new(Pooling::Mean, 2).finish(true), None);
        let mut zero = [0.0f32; 3];
        normalize_l2(&mut zero);
        assert_eq!(zero, [0.0; 3]);
    }

    #[test]
    fn names_round_trip() {
        for name in Pooling::NAMES {
            assert_eq!(Pooling::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(Pooling::parse("none"), None);
    }
}
