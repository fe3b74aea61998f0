//! The one forward pass, for any mix of tokens from any sequences: prefill is
//! a batch of positions of one sequence, decode is one position of each of
//! many sequences. Weights are read once per micro-batch of up to
//! [`MAX_UBATCH`] tokens.
//!
//! Per layer (ref: HF `Gemma3DecoderLayer`, llama.cpp `llm_build_gemma3`):
//! ```text
//! h = x + post_attn_norm(Wo · attn(rope(q_norm(Wq·n)), rope(k_norm(Wk·n)), Wv·n)),  n = attn_norm(x)
//! x = h + post_ffn_norm(Wdown · (gelu_tanh(Wgate·m) ⊙ Wup·m)),                       m = ffn_norm(h)
//! ```

use crate::kv_cache::MAX_UBATCH;
use crate::{KvCache, Model, ModelError};
use gemma3_kernels::ops;
use gemma3_kernels::MatmulScratch;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Tokens to run: token i is at position `pos[i]` of sequence `seq[i]` (an
/// index into the caches slice); logits are produced for tokens with
/// `logits[i]`. Tokens of one sequence must appear in increasing position order.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub pos: Vec<usize>,
    pub seq: Vec<usize>,
    pub logits: Vec<bool>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.pos.clear();
        self.seq.clear();
        self.logits.clear();
    }

    pub fn push(&mut self, token: u32, pos: usize, seq: usize, logits: bool) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq.push(seq);
        self.logits.push(logits);
    }

    /// Tokens of one sequence (index 0) from `start`; logits for the last only,
    /// or for all when `all_logits`.
    pub fn for_sequence(tokens: &[u32], start: usize, all_logits: bool) -> Self {
        let mut b = Batch::default();
        for (i, &t) in tokens.iter().enumerate() {
            b.push(t, start + i, 0, all_logits || i + 1 == tokens.len());
        }
        b
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A per-layer observer of named intermediates: (layer, name, values of the
/// micro-batch, row-major).
pub type Trace = Box<dyn FnMut(usize, &'static str, &[f32]) + Send>;

/// Activation buffers for one micro-batch, allocated once and reused.
#[derive(Default)]
pub struct ForwardState {
    /// n × d_model residual stream
    x: Vec<f32>,
    /// n × d_model normed input of the current block
    xn: Vec<f32>,
    /// n × q_dim
    q: Vec<f32>,
    /// n × kv_dim
    k: Vec<f32>,
    /// n × kv_dim
    v: Vec<f32>,
    /// n × q_dim attention output
    attn: Vec<f32>,
    /// n × d_model
    o: Vec<f32>,
    /// n × d_ff
    gate: Vec<f32>,
    /// n × d_ff
    up: Vec<f32>,
    /// m × d_model normed hidden states of the tokens that want logits
    hid: Vec<f32>,
    /// m × vocab, all micro-batches of the last call
    pub logits: Vec<f32>,
    mm: MatmulScratch,
    pub trace: Option<Trace>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

impl ForwardState {
    pub fn new() -> Self {
        Self::default()
    }

    fn trace(&mut self, layer: usize, name: &'static str, which: fn(&ForwardState) -> &[f32]) {
        if let Some(mut t) = self.trace.take() {
            t(layer, name, which(self));
            self.trace = Some(t);
        }
    }
}

impl Model {
    /// Run `batch` through the model, appending K/V to `caches`. Returns the
    /// logits (one row of `vocab` per token that asked for them, in order).
    pub fn forward<'s>(
        &self,
        batch: &Batch,
        caches: &mut [KvCache],
        st: &'s mut ForwardState,
    ) -> Result<&'s [f32], ModelError> {
        let n = batch.len();
        if batch.pos.len() != n || batch.seq.len() != n || batch.logits.len() != n {
            return Err(ModelError::BadBatch(
                "tokens, pos, seq and logits differ in length".into(),
            ));
        }
        for i in 0..n {
            let (t, p, s) = (batch.tokens[i], batch.pos[i], batch.seq[i]);
            if t as usize >= self.config.vocab_size {
                return Err(ModelError::BadToken {
                    id: t,
                    vocab: self.config.vocab_size,
                });
            }
            let cache = caches
                .get(s)
                .ok_or_else(|| ModelError::BadBatch(format!("sequence {s} has no cache")))?;
            if p >= cache.ctx {
                return Err(ModelError::ContextOverflow {
                    pos: p,
                    ctx: cache.ctx,
                });
            }
        }
        let m = batch.logits.iter().filter(|&&l| l).count();
        st.logits.clear();
        st.logits.reserve(m * self.config.vocab_size);
        let mut start = 0;
        while start < n {
            let end = (start + MAX_UBATCH).min(n);
            self.forward_ubatch(batch, start..end, caches, st);
            start = end;
        }
        Ok(&st.logits)
    }

    fn forward_ubatch(
        &self,
        batch: &Batch,
        range: std::ops::Range<usize>,
        caches: &mut [KvCache],
        st: &mut ForwardState,
    ) {
        let c = &self.config;
        let n = range.len();
        let (d, qd, kvd, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        resize(&mut st.x, n * d);
        resize(&mut st.xn, n * d);
        resize(&mut st.q, n * qd);
        resize(&mut st.k, n * kvd);
        resize(&mut st.v, n * kvd);
        resize(&mut st.attn, n * qd);
        resize(&mut st.o, n * d);
        resize(&mut st.gate, n * c.d_ff);
        resize(&mut st.up, n * c.d_ff);
        let tokens = &batch.tokens[range.clone()];
        let pos = &batch.pos[range.clone()];
        let seq = &batch.seq[range.clone()];

        // Embedding, scaled by sqrt(d_model) (Gemma's normaliser, in f32 as llama.cpp does).
        let embed = self.mat(&self.embed);
        let scale = (d as f32).sqrt();
        for (i, &t) in tokens.iter().enumerate() {
            let row = &mut st.x[i * d..(i + 1) * d];
            embed.dequantize_row(t as usize, row);
            row.iter_mut().for_each(|v| *v *= scale);
        }
        st.trace(usize::MAX, "embed", |s| &s.x);

        for (l, layer) in self.layers.iter().enumerate() {
            // --- attention ---
            for i in 0..n {
                ops::rms_norm(
                    &st.x[i * d..(i + 1) * d],
                    &layer.attn_norm,
                    c.rms_eps,
                    &mut st.xn[i * d..(i + 1) * d],
                );
            }
            self.matmul(&layer.wq, &st.xn, n, &mut st.q, &mut st.mm);
            self.matmul(&layer.wk, &st.xn, n, &mut st.k, &mut st.mm);
            self.matmul(&layer.wv, &st.xn, n, &mut st.v, &mut st.mm);
            let mut sincos = vec![0.0f32; hd];
            for i in 0..n {
                rope_table(pos[i], &layer.rope_inv_freq, &mut sincos);
                for h in st.q[i * qd..(i + 1) * qd].chunks_exact_mut(hd) {
                    ops::rms_norm_inplace(h, &layer.q_norm, c.rms_eps);
                    apply_rope(h, &sincos);
                    // Scaled, then rounded to f16 as llama.cpp does when it
                    // multiplies q with its f16 K cache (keeps us on its tokens at near-ties).
                    h.iter_mut()
                        .for_each(|v| *v = half::f16::from_f32(*v * c.attn_scale).to_f32());
                }
                for h in st.k[i * kvd..(i + 1) * kvd].chunks_exact_mut(hd) {
                    ops::rms_norm_inplace(h, &layer.k_norm, c.rms_eps);
                    apply_rope(h, &sincos);
                }
                // Store K and V of this token before any token of the batch attends.
                let lc = &mut caches[seq[i]].layers[l];
                let s = lc.slot(pos[i]) * kvd;
                lc.k[s..s + kvd].convert_from_f32_slice(&st.k[i * kvd..(i + 1) * kvd]);
                lc.v[s..s + kvd].convert_from_f32_slice(&st.v[i * kvd..(i + 1) * kvd]);
            }
            st.trace(l, "q", |s| &s.q);
            st.trace(l, "k", |s| &s.k);
            self.attention(l, pos, seq, caches, &st.q, &mut st.attn);
            st.trace(l, "attn", |s| &s.attn);
            self.matmul(&layer.wo, &st.attn, n, &mut st.o, &mut st.mm);
            for i in 0..n {
                let o = &mut st.o[i * d..(i + 1) * d];
                ops::rms_norm_inplace(o, &layer.post_attn_norm, c.rms_eps);
                ops::add_inplace(&mut st.x[i * d..(i + 1) * d], o);
            }
            st.trace(l, "attn_out", |s| &s.x);

            // --- feed-forward (GeGLU) ---
            for i in 0..n {
                ops::rms_norm(
                    &st.x[i * d..(i + 1) * d],
                    &layer.ffn_norm,
                    c.rms_eps,
                    &mut st.xn[i * d..(i + 1) * d],
                );
            }
            self.matmul(&layer.w_gate, &st.xn, n, &mut st.gate, &mut st.mm);
            self.matmul(&layer.w_up, &st.xn, n, &mut st.up, &mut st.mm);
            // Element-wise, so splitting it across threads cannot change a value.
            if n >= 16 {
                st.gate
                    .par_chunks_mut(c.d_ff * 8)
                    .zip(st.up.par_chunks(c.d_ff * 8))
                    .for_each(|(g, u)| ops::geglu_inplace(g, u));
            } else {
                ops::geglu_inplace(&mut st.gate, &st.up);
            }
            self.matmul(&layer.w_down, &st.gate, n, &mut st.o, &mut st.mm);
            for i in 0..n {
                let o = &mut st.o[i * d..(i + 1) * d];
                ops::rms_norm_inplace(o, &layer.post_ffn_norm, c.rms_eps);
                ops::add_inplace(&mut st.x[i * d..(i + 1) * d], o);
            }
            st.trace(l, "l_out", |s| &s.x);
        }

        // --- output head, only for the tokens that asked ---
        let want = &batch.logits[range];
        let m = want.iter().filter(|&&w| w).count();
        if m == 0 {
            return;
        }
        resize(&mut st.hid, m * d);
        for (j, i) in (0..n).filter(|&i| want[i]).enumerate() {
            ops::rms_norm(
                &st.x[i * d..(i + 1) * d],
                &self.final_norm,
                c.rms_eps,
                &mut st.hid[j * d..(j + 1) * d],
            );
        }
        let vocab = c.vocab_size;
        let old = st.logits.len();
        st.logits.resize(old + m * vocab, 0.0);
        gemma3_kernels::matmul(
            &self.mat(self.head()),
            &st.hid,
            m,
            &mut st.logits[old..],
            &mut st.mm,
        );
    }

    /// Causal attention of each token's query heads over its sequence's cache
    /// (keys pos-window+1..=pos on sliding-window layers), one task per
    /// (token, KV head), with an online softmax over blocks of keys so no
    /// score matrix is ever materialised.
    fn attention(
        &self,
        l: usize,
        pos: &[usize],
        seq: &[usize],
        caches: &[KvCache],
        q: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, qd) = (c.head_dim, c.q_dim());
        let group = c.n_heads / c.n_kv_heads;
        let kvd = c.kv_dim();
        let work = |(i, o): (usize, &mut [f32])| {
            let lc = &caches[seq[i]].layers[l];
            let p = pos[i];
            let lo = if lc.window == usize::MAX {
                0
            } else {
                (p + 1).saturating_sub(lc.window)
            };
            for (g, og) in o.chunks_exact_mut(group * hd).enumerate() {
                let qg = &q[i * qd + g * group * hd..i * qd + (g + 1) * group * hd];
                attend(qg, lc, g * hd, kvd, hd, lo, p, og);
            }
        };
        if pos.len() == 1 {
            out.chunks_exact_mut(qd).enumerate().for_each(work);
        } else {
            out.par_chunks_exact_mut(qd).enumerate().for_each(work);
        }
    }
}

/// Keys per block of the online softmax.
const KV_BLOCK: usize = 32;
/// Most query heads per KV head (grouped-query attention).
const MAX_GROUP: usize = 8;

/// Attention of `q` (group × hd, pre-scaled) over cached positions lo..=hi
/// of one KV head (at column `col`), written to `out` (group × hd). Keys and
/// values stay f16 in the cache; the f16 ops convert them on the fly.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    lc: &crate::kv_cache::LayerCache,
    col: usize,
    kvd: usize,
    hd: usize,
    lo: usize,
    hi: usize,
    out: &mut [f32],
) {
    let ops = gemma3_kernels::simd::f16_best();
    let group = q.len() / hd;
    assert!(
        group <= MAX_GROUP,
        "at most {MAX_GROUP} query heads per KV head"
    );
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut sum = [0.0f32; MAX_GROUP];
    // s[j][h]: score of key j for head h, then its softmax weight.
    let mut s = [[0.0f32; MAX_GROUP]; KV_BLOCK];
    out.fill(0.0);
    let mut b0 = lo;
    while b0 <= hi {
        let b1 = (b0 + KV_BLOCK - 1).min(hi);
        let nb = b1 - b0 + 1;
        for (j, p) in (b0..=b1).enumerate() {
            let off = lc.slot(p) * kvd + col;
            (ops.dots)(q, &lc.k[off..off + hd], &mut s[j][..group]);
        }
        // Online softmax: rescale what was accumulated when the max grows.
        let mut corr = [1.0f32; MAX_GROUP];
        for h in 0..group {
            let bm = s[..nb].iter().fold(f32::NEG_INFINITY, |a, r| a.max(r[h]));
            let new_m = m[h].max(bm);
            corr[h] = (m[h] - new_m).exp();
            m[h] = new_m;
            sum[h] *= corr[h];
            for r in s[..nb].iter_mut() {
                r[h] = (r[h] - new_m).exp();
                sum[h] += r[h];
            }
        }
        for h in 0..group {
            if corr[h] != 1.0 {
                out[h * hd..(h + 1) * hd]
                    .iter_mut()
                    .for_each(|v| *v *= corr[h]);
            }
        }
        let mut offs = [0usize; KV_BLOCK];
        let mut pw = [0.0f32; KV_BLOCK * MAX_GROUP];
        for (j, p) in (b0..=b1).enumerate() {
            offs[j] = lc.slot(p) * kvd + col;
            pw[j * group..(j + 1) * group].copy_from_slice(&s[j][..group]);
        }
        (ops.pv)(out, &pw[..nb * group], &lc.v, &offs[..nb], hd);
        b0 = b1 + 1;
    }
    for h in 0..group {
        let inv = 1.0 / sum[h];
        out[h * hd..(h + 1) * hd].iter_mut().for_each(|v| *v *= inv);
    }
}

/// cos/sin for one position: table[2i] = cos θ_i, table[2i+1] = sin θ_i with
/// θ_i = pos · inv_freq[i].
fn rope_table(pos: usize, inv_freq: &[f32], table: &mut [f32]) {
    for (i, &f) in inv_freq.iter().enumerate() {
        let (s, c) = (pos as f32 * f).sin_cos();
        table[2 * i] = c;
        table[2 * i + 1] = s;
    }
}

/// NeoX rotation of one head: pairs (i, i + d/2).
#[inline]
fn apply_rope(x: &mut [f32], table: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (c, s) = (table[2 * i], table[2 * i + 1]);
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}
