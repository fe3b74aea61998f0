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
use gemma3_kernels::MatmulScratch;
use gemma3_kernels::{ops, vectorized};

/// What a token of a [`Batch`] yields besides its K/V.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Nothing (a prompt token whose successor is known).
    #[default]
    None,
    /// Its final hidden state (after the output norm): an embedding's input.
    Hidden,
    /// Its final hidden state and its logits.
    Logits,
}

/// Tokens to run: token i is at position `pos[i]` of sequence `seq[i]` (an
/// index into the caches slice) and yields `out[i]`. Tokens of one sequence
/// must appear in increasing position order.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub pos: Vec<usize>,
    pub seq: Vec<usize>,
    pub out: Vec<Output>,
    /// The scale of each of the model's LoRA adapters for each token
    /// (`Model::loras.len()` per token, in token order), or empty: every
    /// token at the adapters' own scales (`LoraInfo::scale`).
    pub lora: Vec<f32>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.pos.clear();
        self.seq.clear();
        self.out.clear();
        self.lora.clear();
    }

    /// A token, with its logits or with nothing.
    pub fn push(&mut self, token: u32, pos: usize, seq: usize, logits: bool) {
        let out = if logits { Output::Logits } else { Output::None };
        self.push_out(token, pos, seq, out);
    }

    pub fn push_out(&mut self, token: u32, pos: usize, seq: usize, out: Output) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq.push(seq);
        self.out.push(out);
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
/// micro-batch, row-major). From the last layer's "q" on (not its "k"), only the rows
/// of the tokens that want logits are computed (the first rows; see
/// `Model::forward_ubatch`): trace with logits for every token to see all.
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
    /// Normed final hidden states (d_model each) of the tokens with an
    /// output, all micro-batches of the last call
    hid: Vec<f32>,
    /// How much of `hid` the micro-batches of this call have written.
    hid_written: usize,
    /// The rows of `hid` the head reads when only some outputs want logits.
    head_in: Vec<f32>,
    /// m × vocab, all micro-batches of the last call
    pub logits: Vec<f32>,
    /// How much of `logits` the micro-batches of this call have written.
    logits_written: usize,
    mm: MatmulScratch,
    /// Per distinct RoPE base of the layers: its inverse frequencies and the
    /// micro-batch's n × head_dim cos/sin table; the first `rope_used` are
    /// this micro-batch's (the rest keep their memory for the next).
    rope: Vec<(Vec<f32>, Vec<f32>)>,
    rope_used: usize,
    /// Softmax states of the key chunks of attention tiles shared between
    /// threads.
    states: Vec<RowState>,
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

    /// The final hidden states (after the output norm, `d_model` floats
    /// each) of the last [`Model::forward`]'s tokens with an output
    /// ([`Output::Hidden`] or [`Output::Logits`]), in batch order.
    pub fn hidden(&self) -> &[f32] {
        &self.hid
    }

    fn trace(&mut self, layer: usize, name: &'static str, which: fn(&ForwardState) -> &[f32]) {
        self.trace_first(layer, name, which, usize::MAX);
    }

    /// [`ForwardState::trace`] of the first `len` values only.
    fn trace_first(
        &mut self,
        layer: usize,
        name: &'static str,
        which: fn(&ForwardState) -> &[f32],
        len: usize,
    ) {
        if let Some(mut t) = self.trace.take() {
            let v = which(self);
            t(layer, name, &v[..len.min(v.len())]);
            self.trace = Some(t);
        }
    }
}

impl Model {
    /// Run `batch` through the model, appending K/V to `caches`. Returns the
    /// logits (one row of `vocab` per token that asked for them, in order);
    /// [`ForwardState::hidden`] then holds the hidden states of every token
    /// with an output.
    pub fn forward<'s>(
        &self,
        batch: &Batch,
        caches: &mut [KvCache],
        st: &'s mut ForwardState,
    ) -> Result<&'s [f32], ModelError> {
        let n = batch.len();
        if batch.pos.len() != n || batch.seq.len() != n || batch.out.len() != n {
            return Err(ModelError::BadBatch(
                "tokens, pos, seq and out differ in length".into(),
            ));
        }
        let na = self.loras.len();
        if !batch.lora.is_empty() && batch.lora.len() != n * na {
            return Err(ModelError::BadBatch(format!(
                "{} LoRA scales for {n} tokens and {na} adapters",
                batch.lora.len()
            )));
        }
        if let Some(s) = batch.lora.iter().find(|s| !s.is_finite()) {
            return Err(ModelError::BadBatch(format!("a LoRA scale of {s}")));
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
        // Sized once here (the head writes every entry); the same size as
        // last time, as in generation, costs nothing.
        let outputs = batch.out.iter().filter(|&&o| o != Output::None).count();
        let m = batch.out.iter().filter(|&&o| o == Output::Logits).count();
        resize(&mut st.hid, outputs * self.config.d_model);
        st.hid_written = 0;
        resize(&mut st.logits, m * self.config.vocab_size);
        st.logits_written = 0;
        let mut start = 0;
        while start < n {
            let end = (start + MAX_UBATCH).min(n);
            self.forward_ubatch(batch, start..end, caches, st);
            start = end;
        }
        debug_assert_eq!(st.logits_written, st.logits.len());
        debug_assert_eq!(st.hid_written, st.hid.len());
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
        let na = self.loras.len();
        let lora_all: &[f32] = match &batch.lora[..] {
            [] => &[],
            l => &l[range.start * na..range.end * na],
        };
        let tokens = &batch.tokens[range.clone()];
        let pos = &batch.pos[range.clone()];
        let seq = &batch.seq[range.clone()];
        let outs = &batch.out[range];
        let want: Vec<bool> = outs.iter().map(|&o| o != Output::None).collect();
        let want = &want[..];
        let m = want.iter().filter(|&&w| w).count();
        // The last layer's K and V are all that tokens without an output need
        // of it: its q projection, attention, output projection and
        // feed-forward run for the m tokens with one only, moved to
        // the first m rows (as llama.cpp does with its output ids). Each
        // token's values do not depend on the others in its batch, so the
        // logits keep their bits.
        let last = self.layers.len().saturating_sub(1);
        let (sel_pos, sel_seq): (Vec<usize>, Vec<usize>) = if m < n {
            (0..n)
                .filter(|&i| want[i])
                .map(|i| (pos[i], seq[i]))
                .unzip()
        } else {
            Default::default()
        };
        let mut compacted = false;
        // The LoRA scales of the rows with an output, for the last layer's
        // compacted rows (empty where every row takes the adapters' own).
        let lora_sel: Vec<f32> = if m < n && !lora_all.is_empty() {
            (0..n)
                .filter(|&i| want[i])
                .flat_map(|i| lora_all[i * na..(i + 1) * na].iter().copied())
                .collect()
        } else {
            Vec::new()
        };

        // Embedding, scaled by sqrt(d_model) (Gemma's normaliser, in f32 as llama.cpp does).
        let embed = self.mat(&self.embed);
        let scale = (d as f32).sqrt();
        for (i, &t) in tokens.iter().enumerate() {
            let row = &mut st.x[i * d..(i + 1) * d];
            embed.dequantize_row(t as usize, row);
            row.iter_mut().for_each(|v| *v *= scale);
        }
        st.trace(usize::MAX, "embed", |s| &s.x);

        st.rope_used = 0;
        // Each layer's input norm: the first layer's here, the others' in
        // the step that ends the layer before (`add_normed`).
        if let Some(first) = self.layers.first() {
            per_token(n, st.xn.chunks_mut(d).zip(st.x.chunks(d)), |(o, x)| {
                ops::rms_norm(x, &first.attn_norm, c.rms_eps, o)
            });
        }
        for (l, layer) in self.layers.iter().enumerate() {
            // --- attention ---
            // The last layer's queries only for the m tokens that want
            // logits (their inputs moved to the first m rows of xn, which
            // the feed-forward's norm writes afresh): K and V for all.
            let few = l == last && m < n;
            if few {
                self.matmul_many(
                    [&layer.wk, &layer.wv],
                    &st.xn,
                    n,
                    [&mut st.k, &mut st.v],
                    &mut st.mm,
                    lora_all,
                );
                if m > 0 {
                    gather_rows(&mut st.xn, d, want);
                    let q = &mut st.q[..m * qd];
                    let xn = &st.xn[..m * d];
                    self.matmul(&layer.wq, xn, m, q, &mut st.mm, &lora_sel);
                }
            } else {
                self.matmul_many(
                    [&layer.wq, &layer.wk, &layer.wv],
                    &st.xn,
                    n,
                    [&mut st.q, &mut st.k, &mut st.v],
                    &mut st.mm,
                    lora_all,
                );
            }
            // cos/sin tables per distinct RoPE base, once per micro-batch.
            let used = &st.rope[..st.rope_used];
            let ti = match used.iter().position(|(f, _)| *f == layer.rope_inv_freq) {
                Some(ti) => ti,
                None => {
                    if st.rope_used == st.rope.len() {
                        st.rope.push(Default::default());
                    }
                    let (f, t) = &mut st.rope[st.rope_used];
                    f.clone_from(&layer.rope_inv_freq);
                    resize(t, n * hd);
                    per_token(n, t.chunks_mut(hd).zip(pos), |(t, &p)| {
                        rope_table(p, &layer.rope_inv_freq, t)
                    });
                    st.rope_used += 1;
                    st.rope_used - 1
                }
            };
            let table = &st.rope[ti].1;
            let (qn, kn, eps, scale) = (
                &layer.q_norm[..],
                &layer.k_norm[..],
                c.rms_eps,
                c.attn_scale,
            );
            let q_heads = |q: &mut [f32], sincos: &[f32]| {
                vectorized!(fn(q: &mut [f32], sincos: &[f32], qn: &[f32], hd: usize, eps: f32, scale: f32) {
                    for h in q.chunks_exact_mut(hd) {
                        ops::rms_norm_inplace(h, qn, eps);
                        apply_rope(h, sincos);
                        // Scaled, then rounded to f16 as llama.cpp does when it multiplies
                        // q with its f16 K cache (keeps us on its tokens at near-ties).
                        h.iter_mut().for_each(|v| *v *= scale);
                        ops::round_to_f16(h);
                    }
                })
            };
            let k_heads = |k: &mut [f32], sincos: &[f32]| {
                vectorized!(fn(k: &mut [f32], sincos: &[f32], kn: &[f32], hd: usize, eps: f32) {
                    for h in k.chunks_exact_mut(hd) {
                        ops::rms_norm_inplace(h, kn, eps);
                        apply_rope(h, sincos);
                    }
                })
            };
            if few {
                // Row j of q is the j-th token that wants logits.
                let wanted = table.chunks(hd).zip(want).filter(|(_, &w)| w);
                per_token(
                    m,
                    st.q[..m * qd].chunks_mut(qd).zip(wanted),
                    |(q, (t, _))| q_heads(q, t),
                );
                per_token(n, st.k.chunks_mut(kvd).zip(table.chunks(hd)), |(k, t)| {
                    k_heads(k, t)
                });
            } else {
                per_token(
                    n,
                    st.q.chunks_mut(qd)
                        .zip(st.k.chunks_mut(kvd))
                        .zip(table.chunks(hd)),
                    |((q, k), t)| {
                        q_heads(q, t);
                        k_heads(k, t);
                    },
                );
            }
            // Store K and V of every token before any token of the batch
            // attends: a run of consecutive positions of one sequence at a
            // time.
            let mut i = 0;
            while i < n {
                let j = run_end(pos, seq, i, n);
                let (k, v) = (&st.k[i * kvd..j * kvd], &st.v[i * kvd..j * kvd]);
                caches[seq[i]].layers[l].write_run(pos[i], k, v);
                i = j;
            }
            // (The last layer's q has rows for the m tokens only.)
            let q_rows = if few { m } else { n };
            st.trace_first(l, "q", |s| &s.q, q_rows * qd);
            st.trace(l, "k", |s| &s.k);
            if few {
                if m == 0 {
                    return;
                }
                gather_rows(&mut st.x, d, want);
                compacted = true;
            }
            // Rows in flight from here: all n, or the m compacted ones.
            let (n, pos, seq, lora) = if compacted {
                (m, &sel_pos[..], &sel_seq[..], &lora_sel[..])
            } else {
                (n, pos, seq, lora_all)
            };
            let (q, attn) = (&st.q[..n * qd], &mut st.attn[..n * qd]);
            self.attention(l, (pos, seq), caches, q, attn, &mut st.states);
            st.trace(l, "attn", |s| &s.attn);
            let o = &mut st.o[..n * d];
            self.matmul(&layer.wo, &st.attn[..n * qd], n, o, &mut st.mm, lora);
            let ffn_norm = Some(&layer.ffn_norm[..]);
            let (x, xn) = (&mut st.x[..n * d], &mut st.xn[..n * d]);
            add_normed(c, o, x, &layer.post_attn_norm, None, ffn_norm, xn);
            st.trace(l, "attn_out", |s| &s.x);

            // --- feed-forward (GeGLU) ---
            let (gate, up) = (&mut st.gate[..n * c.d_ff], &mut st.up[..n * c.d_ff]);
            let xn = &st.xn[..n * d];
            let (gu, mm) = ([&layer.w_gate, &layer.w_up], &mut st.mm);
            self.matmul_many(gu, xn, n, [gate, up], mm, lora);
            let (gate, up) = (&mut st.gate[..n * c.d_ff], &st.up[..n * c.d_ff]);
            // Element-wise, so splitting it across threads cannot change a value.
            if n >= 16 {
                let items = gate.chunks_mut(c.d_ff * 8).zip(up.chunks(c.d_ff * 8));
                gemma3_kernels::pool::for_each_item(items, 1, &|(g, u)| ops::geglu_inplace(g, u));
            } else {
                ops::geglu_inplace(gate, up);
            }
            let o = &mut st.o[..n * d];
            self.matmul(&layer.w_down, gate, n, o, &mut st.mm, lora);
            let next_norm = self.layers.get(l + 1).map(|next| &next.attn_norm[..]);
            let (x, xn) = (&mut st.x[..n * d], &mut st.xn[..n * d]);
            // (A control vector is added to the layer's output, before the
            // next layer's norm reads it, as llama.cpp's `build_cvec`.)
            let control = self.control.get(l).and_then(|v| v.as_deref());
            add_normed(c, o, x, &layer.post_ffn_norm, control, next_norm, xn);
            st.trace(l, "l_out", |s| &s.x);
        }

        // --- output norm for the tokens with an output, head for those
        // that asked for logits ---
        if m == 0 {
            return;
        }
        let h0 = st.hid_written;
        st.hid_written += m * d;
        let hid = &mut st.hid[h0..h0 + m * d];
        for (j, i) in (0..n).filter(|&i| want[i]).enumerate() {
            // (Compacted, token i's row is now row j.)
            let i = if compacted { j } else { i };
            ops::rms_norm(
                &st.x[i * d..(i + 1) * d],
                &self.final_norm,
                c.rms_eps,
                &mut hid[j * d..(j + 1) * d],
            );
        }
        let ml = outs.iter().filter(|&&o| o == Output::Logits).count();
        if ml == 0 {
            return;
        }
        let head_in: &[f32] = if ml == m {
            hid
        } else {
            // Row j of `hid` is the j-th token with an output.
            let with_output = outs.iter().filter(|&&o| o != Output::None);
            st.head_in.clear();
            for (row, _) in hid
                .chunks(d)
                .zip(with_output)
                .filter(|(_, &o)| o == Output::Logits)
            {
                st.head_in.extend_from_slice(row);
            }
            &st.head_in
        };
        let vocab = c.vocab_size;
        let old = st.logits_written;
        st.logits_written += ml * vocab;
        let out = &mut st.logits[old..old + ml * vocab];
        self.matmul(self.head(), head_in, ml, out, &mut st.mm, &[]);
    }

    /// Causal attention of each token's query heads over its sequence's cache
    /// (keys pos-window+1..=pos on sliding-window layers). Consecutive tokens
    /// of one sequence go in tiles of up to `MAX_ROWS` query rows (tokens ×
    /// the query heads of one KV head) that share each block of keys; an
    /// online softmax over the blocks (chunk by chunk, see [`CHUNK_KEYS`])
    /// means no score matrix is ever built.
    fn attention(
        &self,
        l: usize,
        (pos, seq): (&[usize], &[usize]),
        caches: &[KvCache],
        q: &[f32],
        out: &mut [f32],
        states: &mut Vec<RowState>,
    ) {
        let c = &self.config;
        let n = pos.len();
        let group = c.n_heads / c.n_kv_heads;
        let per_tile = (MAX_ROWS / group).max(1);
        let cache = |i: usize| &caches[seq[i]].layers[l];
        // Tiles: runs of consecutive positions of one sequence, cut every per_tile tokens.
        let mut tiles = Vec::new();
        let mut i = 0;
        while i < n {
            let j = run_end(pos, seq, i, per_tile);
            for g in 0..c.n_kv_heads {
                tiles.push(Tile::new(c, cache(i), &pos[i..j], i, g));
            }
            i = j;
        }
        let threads = gemma3_kernels::pool::threads();
        let optr = SharedOut(out.as_mut_ptr());
        let few_chunks =
            || tiles.iter().map(|t| t.chunks().count()).sum::<usize>() < 2 * tiles.len();
        if tiles.len() >= threads || few_chunks() {
            // A tile per task (for fewer tiles than threads, over fewer than
            // two chunks of keys each, one thread does a tile: sharing one
            // chunk is not possible, and the fork, join and merge would
            // cost more than it saves).
            let work = |i: usize| {
                #[allow(clippy::redundant_locals)]
                let optr = optr;
                let (t, lc) = (&tiles[i], cache(tiles[i].first));
                vectorized!(fn(
                    c: &crate::Config,
                    lc: &crate::kv_cache::LayerCache,
                    t: &Tile,
                    q: &[f32],
                    optr: SharedOut,
                ) {
                    attend_tile(c, lc, t, q, optr)
                })
            };
            if n <= gemma3_kernels::pool::SMALL_BATCH || threads == 1 {
                return gemma3_kernels::pool::for_each_task(tiles.len(), &work);
            }
            // A prompt's causal tiles grow with their position: the
            // largest first, each a task of its own, so that the threads
            // end on small ones instead of one waiting on the other's last
            // large tile. pp64 on two threads (Zen 3), the attention
            // phase over 21 runs: 43.1–47.4 → 42.1–43.3 ms, five
            // alternating rounds.
            let mut order: Vec<usize> = (0..tiles.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(tiles[i].blocks()));
            gemma3_kernels::pool::for_each_task(order.len(), &|j| work(order[j]));
            return;
        }
        // Fewer tiles than threads (generation: one token, one KV head):
        // each tile's chunks of keys are shared out, each thread taking a
        // run of them (about an equal share of the tile's key blocks) and
        // computing each chunk's softmax state on its own; then each tile's
        // chunk states are merged in chunk order. A chunk's state and the
        // merges are the same operations, in the same order, as in
        // `attend_tile`, so the results are the same bits on any thread
        // count. Each thread reads its own part of the cache (keys and
        // values), where splitting the value columns had both threads read
        // parts of every value row and repeat the softmax's steps.
        let parts = threads.div_ceil(tiles.len());
        let chunk_lists: Vec<Vec<std::ops::Range<usize>>> =
            tiles.iter().map(|t| t.chunks().collect()).collect();
        let starts: Vec<usize> = (chunk_lists.iter())
            .scan(0, |at, ch| {
                let s = *at;
                *at += ch.len();
                Some(s)
            })
            .collect();
        let total: usize = chunk_lists.iter().map(Vec::len).sum();
        if states.len() < total {
            states.resize_with(total, RowState::default);
        }
        let sptr = SharedStates(states.as_mut_ptr());
        // Part k of a tile: the chunks whose middle lies in the k-th of
        // `parts` equal spans of its blocks (by its first block, a short
        // last chunk and the one before it went to the same part).
        let part_of = |t: &Tile, ch: &std::ops::Range<usize>| {
            ((ch.start + ch.end) * parts / (2 * t.blocks())).min(parts - 1)
        };
        let work = |i: usize| {
            #[allow(clippy::redundant_locals)]
            let sptr = sptr;
            let (ti, k) = (i / parts, i % parts);
            let t = &tiles[ti];
            let lc = cache(t.first);
            let qrows = t.queries(c, q);
            for (j, ch) in chunk_lists[ti].iter().enumerate() {
                if part_of(t, ch) != k {
                    continue;
                }
                // SAFETY: chunk j of tile ti is this task's alone (each
                // chunk has one part), and `states` outlives the tasks.
                let st = unsafe { &mut *sptr.0.add(starts[ti] + j) };
                let (ch, qrows) = (ch.clone(), &qrows[..]);
                vectorized!(fn(
                    c: &crate::Config,
                    lc: &crate::kv_cache::LayerCache,
                    t: &Tile,
                    ch: std::ops::Range<usize>,
                    qrows: &[f32],
                    st: &mut RowState,
                ) {
                    chunk_softmax_pv(c, lc, t, ch, qrows, st)
                })
            }
        };
        gemma3_kernels::pool::for_each_task(tiles.len() * parts, &work);
        for (ti, t) in tiles.iter().enumerate() {
            let mine = &states[starts[ti]..starts[ti] + chunk_lists[ti].len()];
            vectorized!(fn(c: &crate::Config, t: &Tile, mine: &[RowState], optr: SharedOut) {
                let mut merged = RowState::default();
                for st in mine {
                    merged.merge(st, t.rows, c.head_dim);
                }
                merged.write_out(c, t, optr);
            })
        }
    }
}

/// Keys per chunk of a row's attention, a multiple of the key block: the
/// online softmax runs over each chunk (aligned to absolute positions) on
/// its own, and the chunks' states are merged in order (see [`RowState`]),
/// so that a generated token's chunks can be shared between threads
/// without its bits depending on how. 128 keys: a merge (two
/// multiplies per accumulator element) per 128 keys of multiply-adds.
const CHUNK_KEYS: usize = 8 * KB;

/// The attention output, which tasks write at disjoint places (each task
/// its own tokens and query heads).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: each task writes only its own places (as above), so writes never
// overlap, and the &mut borrow of the buffer is held while the tasks run.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// The chunk states of tiles shared between threads, which tasks write at
/// disjoint places (each task its own chunks).
#[derive(Clone, Copy)]
struct SharedStates(*mut RowState);
// SAFETY: each task writes only its own chunks' states, and the &mut borrow
// of the states is held while the tasks run.
unsafe impl Send for SharedStates {}
// SAFETY: as above.
unsafe impl Sync for SharedStates {}

/// A tile's rows' online-softmax state over some keys: each row's running
/// max `m`, its sum of exp(score − m), and its accumulated P·V (rows × the
/// columns computed, `acc`).
///
/// Chunks merge in order: for rows where either state saw no key (max
/// −∞ and sum 0) the other is taken as it is; otherwise, with M the larger max,
/// `ca = exp(a.m − M)` and `cb = exp(b.m − M)` (1 where equal),
/// `sum = fma(b.sum, cb, a.sum · ca)` and each `acc = fma(b.acc, cb, a.acc ·
/// ca)`.
#[derive(Default)]
struct RowState {
    m: [f32; MAX_ROWS],
    sum: [f32; MAX_ROWS],
    acc: Vec<f32>,
}

impl RowState {
    /// No keys seen yet, for `rows` rows of `w` columns.
    fn reset(&mut self, rows: usize, w: usize) {
        self.m = [f32::NEG_INFINITY; MAX_ROWS];
        self.sum = [0.0; MAX_ROWS];
        self.acc.clear();
        self.acc.resize(rows * w, 0.0);
    }

    /// `self` followed by `b` (a later chunk), for `rows` rows of `w`
    /// columns; a `self` never reset starts with no keys seen. (Inlined into
    /// callers built with the vector units' features: compiled alone for
    /// the baseline x86-64, its `mul_add`s were calls to a software fma.)
    #[inline(always)]
    fn merge(&mut self, b: &RowState, rows: usize, w: usize) {
        if self.acc.len() != rows * w {
            self.reset(rows, w);
        }
        for r in 0..rows {
            let (am, bm) = (self.m[r], b.m[r]);
            let (acc, bacc) = (
                &mut self.acc[r * w..(r + 1) * w],
                &b.acc[r * w..(r + 1) * w],
            );
            // No keys seen: max −∞ and a zero sum (a chunk whose scores
            // were all NaN also has max −∞, but a NaN sum, and goes on to
            // make the row's output NaN).
            if bm == f32::NEG_INFINITY && b.sum[r] == 0.0 {
                continue;
            }
            if am == f32::NEG_INFINITY && self.sum[r] == 0.0 {
                self.m[r] = bm;
                self.sum[r] = b.sum[r];
                acc.copy_from_slice(bacc);
                continue;
            }
            let mx = am.max(bm);
            let ca = if am == mx { 1.0 } else { (am - mx).exp() };
            let cb = if bm == mx { 1.0 } else { (bm - mx).exp() };
            self.m[r] = mx;
            self.sum[r] = b.sum[r].mul_add(cb, self.sum[r] * ca);
            for (a, &bv) in acc.iter_mut().zip(bacc) {
                *a = bv.mul_add(cb, *a * ca);
            }
        }
    }

    /// The tile's rows' outputs: acc / sum.
    #[inline(always)]
    fn write_out(&self, c: &crate::Config, t: &Tile, out: SharedOut) {
        let (qd, hd) = (c.q_dim(), c.head_dim);
        for r in 0..t.rows {
            let (tok, h) = (r / t.group, r % t.group);
            let inv = 1.0 / self.sum[r];
            let at = (t.first + tok) * qd + (t.g * t.group + h) * hd;
            // SAFETY: row (first + tok, head g·group + h) of the n × qd
            // output belongs to this task only (see SharedOut).
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), hd) };
            for (o, &a) in o.iter_mut().zip(&self.acc[r * hd..(r + 1) * hd]) {
                *o = a * inv;
            }
        }
    }
}

/// Most query rows per attention tile.
const MAX_ROWS: usize = gemma3_kernels::simd::MAX_ROWS;
const KB: usize = gemma3_kernels::simd::KEY_BLOCK;

/// The query rows of an attention tile: tokens `first..first + pos.len()`
/// (consecutive positions `pos` of one sequence) × the `group` query heads
/// of KV head `g`; row r is token r / group, head g·group + r % group.
///
/// Each row has its own result, computed the same way whatever tile it is
/// in: keys go in blocks of `KB` aligned to absolute positions; a row skips
/// the blocks outside its range lo..=hi and ignores the keys of a block
/// outside it; per block it takes its scores (fma chains over the head
/// dimension), raises its running max, rescales its sum and accumulator
/// when the max grew, adds exp(score − max) in key order, and accumulates
/// P·V in key order. This online softmax starts afresh at each chunk of
/// [`CHUNK_KEYS`] (aligned to absolute positions), and the chunks' states
/// are merged in order ([`RowState`]). Keys that other rows of the tile
/// need get weight 0 for this row, which leaves its sums unchanged.
struct Tile<'a> {
    pos: &'a [usize],
    first: usize,
    g: usize,
    group: usize,
    rows: usize,
    /// Each row's position and first key, once per tile (not a division
    /// per row per block).
    row_pos: [usize; MAX_ROWS],
    row_lo: [usize; MAX_ROWS],
    /// The first block's first key, and the last key any row wants.
    start: usize,
    hi_max: usize,
}

impl<'a> Tile<'a> {
    fn new(
        c: &crate::Config,
        lc: &crate::kv_cache::LayerCache,
        pos: &'a [usize],
        first: usize,
        g: usize,
    ) -> Self {
        let group = c.n_heads / c.n_kv_heads;
        let rows = pos.len() * group;
        assert!(rows <= MAX_ROWS);
        let lo_of = |p: usize| {
            if lc.window == usize::MAX {
                0
            } else {
                (p + 1).saturating_sub(lc.window)
            }
        };
        let (mut row_pos, mut row_lo) = ([0usize; MAX_ROWS], [0usize; MAX_ROWS]);
        for r in 0..rows {
            row_pos[r] = pos[r / group];
            row_lo[r] = lo_of(row_pos[r]);
        }
        let lo_min = lo_of(pos[0]);
        Tile {
            pos,
            first,
            g,
            group,
            rows,
            row_pos,
            row_lo,
            start: lo_min - lo_min % KB,
            hi_max: pos[pos.len() - 1],
        }
    }

    fn blocks(&self) -> usize {
        (self.hi_max - self.start) / KB + 1
    }

    /// The tile's blocks chunk by chunk ([`CHUNK_KEYS`], aligned to
    /// absolute positions), in order.
    fn chunks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let nb = self.blocks();
        let mut b = 0;
        std::iter::from_fn(move || {
            if b >= nb {
                return None;
            }
            let next = (self.base(b) / CHUNK_KEYS + 1) * CHUNK_KEYS;
            let end = ((next - self.start) / KB).min(nb);
            let ch = b..end;
            b = end;
            Some(ch)
        })
    }

    /// First key of block b.
    fn base(&self, b: usize) -> usize {
        self.start + b * KB
    }

    /// How far ahead the kernels prefetch as they read block b: the block
    /// after next, into L2 (a token's attention otherwise waits on each
    /// block's misses in turn), for tiles of 4 rows or more.
    ///
    /// With the 2 rows a thread had when two threads split a token's heads,
    /// prefetching made tg64 at depth 8000 6–22% slower (3 of 3 alternating
    /// runs), where on one thread, 4 rows, the next block into L1 made it
    /// 3–14% faster (3 of 3). Two blocks ahead into L2 then beat one into
    /// L1 on one thread: tg128 after 512 tokens in 5 of 6 alternating pairs
    /// (+3 to +8%), tg32 at depth 8000 in 2 of 3; pp512 unchanged. For 2-row
    /// tiles, two ahead into L2 was inconclusive (tg128 after 512 tokens on
    /// 2 threads ahead in 3 of 5 pairs, depth 8000 in 2 of 3), so they still
    /// do not prefetch. (All measured on a Zen 4. On a Zen 3 the AVX2
    /// kernels, which had ignored `ahead`, gained from it too: one thread,
    /// tg32 at depth 4000 70–78 → 77–85 tok/s and tg128 after 512 tokens +2
    /// to +11%, 3 of 3 alternating rounds each.)
    fn ahead(&self, b: usize, kvd: usize) -> usize {
        if self.rows >= 4 && self.base(b) + KB <= self.hi_max {
            2 * KB * kvd
        } else {
            0
        }
    }

    /// The tile's query rows (each token's heads contiguous), rows × hd.
    fn queries(&self, c: &crate::Config, q: &[f32]) -> Vec<f32> {
        let (hd, qd) = (c.head_dim, c.q_dim());
        // A token's heads of KV head g are contiguous in q.
        let w = self.group * hd;
        let mut qrows = vec![0.0f32; self.rows * hd];
        for t in 0..self.pos.len() {
            let src = (self.first + t) * qd + self.g * w;
            qrows[t * w..(t + 1) * w].copy_from_slice(&q[src..src + w]);
        }
        qrows
    }
}

/// Attention of a tile's rows, in one pass over its key blocks.
#[inline(always)]
fn attend_tile(
    c: &crate::Config,
    lc: &crate::kv_cache::LayerCache,
    t: &Tile,
    q: &[f32],
    out: SharedOut,
) {
    let qrows = t.queries(c, q);
    tile_softmax_pv(c, lc, t, &qrows, out);
}

/// The largest of `s[j0..=j1]` (−∞ for an empty range): the keys outside
/// the range set to −∞, then halving steps without a branch, where a fold
/// key by key tested each key's range and waited on each maximum in turn
/// (pp512 on one thread, Zen 3: the attention phase 449–452 → 429–441 ms
/// over 3 runs, four alternating rounds; under 1% of the prompt). The
/// maximum of the same values does not depend on the order they are taken
/// in.
#[inline(always)]
fn range_max(s: &[f32; KB], (j0, j1): (usize, usize)) -> f32 {
    // (Not `f32::max`: its NaN rule costs three more operations per
    // maximum; a NaN score makes the row's output NaN either way.)
    fn mx<const N: usize>(a: &[f32]) -> [f32; N] {
        std::array::from_fn(|i| if a[i] > a[i + N] { a[i] } else { a[i + N] })
    }
    let v: [f32; KB] = std::array::from_fn(|j| {
        if j0 <= j && j <= j1 {
            s[j]
        } else {
            f32::NEG_INFINITY
        }
    });
    let h: [f32; 2] = mx(&mx::<4>(&mx::<8>(&v)));
    mx::<1>(&h)[0]
}

/// Scores of a tile's rows (`qrows`, from [`Tile::queries`]) against its
/// key blocks b and b + 1 (rows × KB each): the same bits as two calls of
/// [`block_scores`], in one pass over the rows' queries (see `F16Ops::qk2`).
/// One thread, Zen 5, old and new in turn in one process: pp512 median
/// +1.0 to +2.6% (3 of 3 sets of 11 pairs), pp4096 +1.2 to +3.0% (2 of 2
/// sets of 6).
fn block_scores2(
    c: &crate::Config,
    lc: &crate::kv_cache::LayerCache,
    t: &Tile,
    qrows: &[f32],
    b: usize,
    s0: &mut [f32],
    s1: &mut [f32],
) {
    let ops = gemma3_kernels::simd::f16_best();
    let hd = c.head_dim;
    (ops.qk2)(
        qrows,
        [
            lc.k_tile(t.base(b), t.g * hd, hd),
            lc.k_tile(t.base(b + 1), t.g * hd, hd),
        ],
        s0,
        s1,
        t.ahead(b + 1, c.kv_dim()),
    );
}

/// Scores of a tile's rows (`qrows`, from [`Tile::queries`]) against its
/// key block b, rows × KB.
fn block_scores(
    c: &crate::Config,
    lc: &crate::kv_cache::LayerCache,
    t: &Tile,
    qrows: &[f32],
    b: usize,
    s: &mut [f32],
) {
    let ops = gemma3_kernels::simd::f16_best();
    let hd = c.head_dim;
    (ops.qk)(
        qrows,
        lc.k_tile(t.base(b), t.g * hd, hd),
        s,
        t.ahead(b, c.kv_dim()),
    );
}

/// The online softmax and P·V of a tile's rows (queries `qrows`) over its
/// key blocks in order: chunk by chunk ([`Tile::chunks`]), each chunk's
/// state merged into the rows' in order; writes the rows' outputs.
#[inline(always)]
fn tile_softmax_pv(
    c: &crate::Config,
    lc: &crate::kv_cache::LayerCache,
    t: &Tile,
    qrows: &[f32],
    out: SharedOut,
) {
    let (mut total, mut part) = (RowState::default(), RowState::default());
    for ch in t.chunks() {
        chunk_softmax_pv(c, lc, t, ch, qrows, &mut part);
        total.merge(&part, t.rows, c.head_dim);
    }
    total.write_out(c, t, out);
}

/// One chunk's online softmax and P·V (its blocks `blocks`, within one
/// chunk), from no keys seen, into `st`: per block, each row takes its
/// scores, raises its running max, rescales its sum and accumulator when
/// the max grew, adds exp(score − max) in key order, and accumulates P·V
/// in key order.
#[inline(always)]
fn chunk_softmax_pv(
    c: &crate::Config,
    lc: &crate::kv_cache::LayerCache,
    t: &Tile,
    blocks: std::ops::Range<usize>,
    qrows: &[f32],
    st: &mut RowState,
) {
    let ops = gemma3_kernels::simd::f16_best();
    let (hd, kvd) = (c.head_dim, c.kv_dim());
    let (rows, w) = (t.rows, hd);
    st.reset(rows, w);
    // Scores two blocks at a time (`block_scores2`): each even step of the
    // chunk scores its block into bufs[0] and the next into bufs[1], which
    // the odd step after it reads.
    let mut bufs = [[0.0f32; MAX_ROWS * KB]; 2];
    for b in blocks.clone() {
        let base = t.base(b);
        let odd = (b - blocks.start) % 2 == 1;
        if !odd {
            let [s0, s1] = &mut bufs;
            let s0 = &mut s0[..rows * KB];
            if b + 1 < blocks.end {
                block_scores2(c, lc, t, qrows, b, s0, &mut s1[..rows * KB]);
            } else {
                block_scores(c, lc, t, qrows, b, s0);
            }
        }
        let s = &mut bufs[odd as usize];
        // Keys of this block any row wants: jmin..=jmax; row r's own are
        // range[r] (empty, j0 > j1, when it wants none). Each row's block
        // max over its range comes from one pass over the keys with the
        // rows side by side (one row's fold at a time waited on each max in
        // turn).
        let (mut jmin, mut jmax) = (KB, 0);
        let mut range = [(1usize, 0usize); MAX_ROWS];
        for ((rg, &lo), &p) in range.iter_mut().zip(&t.row_lo).zip(&t.row_pos).take(rows) {
            let (lo, hi) = (lo.max(base), p.min(base + KB - 1));
            if lo <= hi {
                *rg = (lo - base, hi - base);
                jmin = jmin.min(lo - base);
                jmax = jmax.max(hi - base);
            }
        }
        let mut bm = [f32::NEG_INFINITY; MAX_ROWS];
        for r in 0..rows {
            let row: &[f32; KB] = s[r * KB..(r + 1) * KB].try_into().unwrap();
            bm[r] = range_max(row, range[r]);
        }
        for r in 0..rows {
            let srow = &mut s[r * KB..(r + 1) * KB];
            let (j0, j1) = range[r];
            if j0 > j1 {
                srow.fill(0.0);
                continue;
            }
            let new_m = st.m[r].max(bm[r]);
            // exp(0) is exactly 1 (the common case once the max settles).
            let corr = if new_m == st.m[r] && new_m.is_finite() {
                1.0
            } else {
                (st.m[r] - new_m).exp()
            };
            st.m[r] = new_m;
            st.sum[r] *= corr;
            (ops.exp_sub)(srow, new_m);
            srow[..j0].fill(0.0);
            srow[j1 + 1..].fill(0.0);
            if corr != 1.0 {
                st.acc[r * w..(r + 1) * w]
                    .iter_mut()
                    .for_each(|v| *v *= corr);
            }
        }
        // Each row adds its block's probabilities in key order (the zeros
        // outside its range leave a sum unchanged), the rows side by side:
        // one row at a time, each add waited on the previous one.
        for j in 0..KB {
            for r in 0..rows {
                st.sum[r] += s[r * KB + j];
            }
        }
        if jmin <= jmax {
            // The block's slots are consecutive: a cache holds whole tiles
            // and a block is one (so no modulo per key).
            let s0 = lc.slot(base);
            let mut offs = [0usize; KB];
            for j in jmin..=jmax {
                offs[j - jmin] = (s0 + j) * kvd + t.g * hd;
            }
            (ops.pv)(
                &mut st.acc,
                &s[jmin..],
                &lc.v,
                &offs[..=jmax - jmin],
                w,
                t.ahead(b, kvd),
            );
        }
    }
}

/// A sub-layer's end for each token (each row of `o`, `x` and `xn`): its
/// output `o` normed with `post` and added to the residual stream `x` (with
/// `control`, a control vector, after it), then, where `next` is given, `x`
/// normed with it into `xn` (the next sub-layer's input): one pass over the
/// tokens, and one fork and join on many threads, for both.
fn add_normed(
    c: &crate::Config,
    o: &mut [f32],
    x: &mut [f32],
    post: &[f32],
    control: Option<&[f32]>,
    next: Option<&[f32]>,
    xn: &mut [f32],
) {
    let (d, eps) = (c.d_model, c.rms_eps);
    let n = o.len() / d;
    let rows = o.chunks_mut(d).zip(x.chunks_mut(d)).zip(xn.chunks_mut(d));
    per_token(n, rows, |((o, x), xn)| {
        vectorized!(fn(
            o: &mut [f32],
            x: &mut [f32],
            xn: &mut [f32],
            post: &[f32],
            control: Option<&[f32]>,
            next: Option<&[f32]>,
            eps: f32,
        ) {
            ops::rms_norm_inplace(o, post, eps);
            ops::add_inplace(x, o);
            if let Some(v) = control {
                ops::add_inplace(x, v);
            }
            if let Some(w) = next {
                ops::rms_norm(x, w, eps, xn);
            }
        })
    });
}

/// Moves the rows (of `width` values) whose `keep` is set to the front, in
/// order.
fn gather_rows(v: &mut [f32], width: usize, keep: &[bool]) {
    for (j, i) in (0..keep.len()).filter(|&i| keep[i]).enumerate() {
        // j ≤ i: row j is kept or already copied from.
        v.copy_within(i * width..(i + 1) * width, j * width);
    }
}

/// The end of the run of consecutive positions of one sequence that starts
/// at token i, at most `cap` tokens long.
fn run_end(pos: &[usize], seq: &[usize], i: usize, cap: usize) -> usize {
    let mut j = i + 1;
    while j < pos.len() && j - i < cap && seq[j] == seq[i] && pos[j] == pos[j - 1] + 1 {
        j += 1;
    }
    j
}

/// Run `f` on every item (one per token), across threads when the batch is
/// big enough to pay for it. Items are independent, so the split cannot
/// change a value.
fn per_token<I, F>(n: usize, items: I, f: F)
where
    I: Iterator + Send,
    I::Item: Send,
    F: Fn(I::Item) + Sync + Send,
{
    if n >= 32 {
        // 16 tokens a task: one token's norm costs less than handing it
        // out.
        gemma3_kernels::pool::for_each_item(items, 16, &f);
    } else {
        items.for_each(f);
    }
}

/// cos/sin for one position: table[i] = cos θ_i and table[d/2 + i] = sin θ_i
/// (d/2 = inv_freq.len()) with θ_i = pos · inv_freq[i].
pub(crate) fn rope_table(pos: usize, inv_freq: &[f32], table: &mut [f32]) {
    let (cos, sin) = table.split_at_mut(inv_freq.len());
    for ((c, s), &f) in cos.iter_mut().zip(sin).zip(inv_freq) {
        (*s, *c) = (pos as f32 * f).sin_cos();
    }
}

/// NeoX rotation of one head: pairs (i, i + d/2). The table's cosines and
/// sines in two runs (not interleaved), so that the compiler takes several
/// pairs per instruction.
#[inline]
pub(crate) fn apply_rope(x: &mut [f32], table: &[f32]) {
    let half = x.len() / 2;
    let (cos, sin) = table.split_at(half);
    let (lo, hi) = x.split_at_mut(half);
    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
        (*a, *b) = (*a * c - *b * s, *a * s + *b * c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk states merged in order, against the softmax worked by hand:
    /// a row over two chunks (max 1, sum 2, then max 3, sum 1) weighs the
    /// first by e^−2; a chunk that saw no key changes nothing, before or
    /// after; a chunk whose scores were all NaN (max −∞, sum NaN) makes
    /// the row NaN instead of passing for one with no keys.
    #[test]
    fn chunk_states_merge_as_one_softmax() {
        let (rows, w) = (2, 3);
        let state = |m: [f32; 2], sum: [f32; 2], acc: [f32; 6]| {
            let mut s = RowState::default();
            s.reset(rows, w);
            s.m[..2].copy_from_slice(&m);
            s.sum[..2].copy_from_slice(&sum);
            s.acc.copy_from_slice(&acc);
            s
        };
        let ninf = f32::NEG_INFINITY;
        let empty = state([ninf; 2], [0.0; 2], [0.0; 6]);
        let a = state([1.0, ninf], [2.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
        let b = state([3.0, ninf], [1.0, f32::NAN], [4.0, 5.0, 6.0, 0.0, 0.0, 0.0]);
        let mut merged = RowState::default();
        for s in [&empty, &a, &empty, &b, &empty] {
            merged.merge(s, rows, w);
        }
        let e = (-2.0f64).exp();
        assert_eq!(merged.m[0], 3.0);
        assert!((merged.sum[0] as f64 - (1.0 + 2.0 * e)).abs() < 1e-6);
        for (c, want) in [4.0 + e, 5.0 + 2.0 * e, 6.0 + 3.0 * e]
            .into_iter()
            .enumerate()
        {
            assert!((merged.acc[c] as f64 - want).abs() < 1e-5, "column {c}");
        }
        assert!(merged.sum[1].is_nan(), "an all-NaN chunk must not vanish");
    }

    /// `range_max` against the plain fold over the range, for every range
    /// of a block (empty ones included) and scores with ties, negative
    /// zeros, infinities and the largest value at each end.
    #[test]
    fn range_max_is_the_fold_over_the_range() {
        let mut rng = 0x9e37_79b9_u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng
        };
        for case in 0..200 {
            let s: [f32; KB] = std::array::from_fn(|j| match (case, j) {
                (0, _) => -0.0,
                (1, 0) | (2, 15) => 1e30,
                (3, 7) => f32::INFINITY,
                (4, _) => f32::NEG_INFINITY,
                _ => (next() % 64) as f32 / 8.0 - 4.0,
            });
            for j0 in 0..KB {
                for j1 in 0..KB {
                    let want = (j0..=j1).fold(f32::NEG_INFINITY, |m, j| m.max(s[j]));
                    assert_eq!(
                        range_max(&s, (j0, j1)),
                        want,
                        "case {case}, keys {j0}..={j1}"
                    );
                }
            }
        }
    }
}
