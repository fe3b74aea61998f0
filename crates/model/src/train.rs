//! Training a LoRA adapter (`gemma3 finetune`): the forward pass over the
//! model's weights expanded once from their quantized form, keeping what
//! the backward pass needs; the backward pass to the adapters' A and B (the
//! base weights stay frozen); and AdamW.
//!
//! As in QLoRA, only the low-rank pairs learn. Each adapted matrix gives
//! `W·x + s·B·(A·x)` with `s = alpha / rank`, the form llama.cpp applies
//! (see [`crate::lora`]), so the trained pairs are written as its GGUF
//! adapter and `--lora` (ours or llama.cpp's) runs them over the quantized
//! model. The passes are the inference forward's arithmetic (`forward.rs`)
//! without its rounding to ggml's types (f16 queries, int8 activations): the
//! exact function whose gradient the backward pass computes. A sequence is
//! one example starting at position 0; a batch's examples go through the
//! layers as one matrix of rows, each product split between the pool's
//! threads, and attend each within itself.
//!
//! The frozen products run in f32 ([`Precision::F32`], the exact function)
//! or in bf16 with f32 sums ([`Precision::Bf16`], AVX-512 BF16: 1.7-2.1×
//! as fast, each operand rounded to 8 significant bits). Either way the
//! expanded weights take 4 bytes per parameter (bf16 keeps W and Wᵀ, one
//! for each direction): about 1.1 GB for the 270M model, 0.67 GB of it the
//! output head (the tied embedding).

use crate::forward::{apply_rope, rope_table};
use crate::lora::MATRICES;
use crate::Model;
use gemma3_gguf::{GgmlType, GgufWriter, Value};
use gemma3_kernels::bf16mm::{self, Panels};
use gemma3_kernels::ops;
use gemma3_kernels::simd::exp_poly;
use rayon::prelude::*;

/// A matrix view for [`gemm`]: `rows` × `cols` elements of `d`, element
/// (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    d: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major, rows `rs` apart (a column range of a wider matrix).
    fn strided(d: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            d,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    fn new(d: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(d, rows, cols, cols)
    }
    /// The transpose: the same elements.
    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A row-major output view for [`gemm`], rows `rs` apart.
struct MatMut<'a> {
    d: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    fn new(d: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut {
            d,
            rows,
            cols,
            rs: cols,
        }
    }
}

impl<'a> Mat<'a> {
    /// Rows `i0..i0 + rows` of the view.
    fn rows(self, i0: usize, rows: usize) -> Self {
        let d = if rows == 0 {
            &self.d[..0]
        } else {
            &self.d[i0 * self.rs..]
        };
        Mat { d, rows, ..self }
    }
}

/// [`gemm`] with c's rows split between the pool's threads (each packs its
/// part of a, and b whole): for the adapters' products, whose small
/// operand is their rank.
fn gemm_rows(alpha: f32, a: Mat, b: Mat, beta: f32, c: MatMut) {
    let k = parts(c.rows);
    if k == 1 {
        return gemm(alpha, a, b, beta, c);
    }
    let per = c.rows.div_ceil(k);
    let (rows, cols, rs) = (c.rows, c.cols, c.rs);
    (c.d.par_chunks_mut(per * rs).take(rows.div_ceil(per)))
        .enumerate()
        .for_each(|(p, d)| {
            let n = per.min(rows - p * per);
            let c = MatMut {
                d,
                rows: n,
                cols,
                rs,
            };
            gemm(alpha, a.rows(p * per, n), b, beta, c);
        });
}

/// `c += alpha · a·b` with the inner dimension split between the pool's
/// threads and the partial products added: for [`dyw`] (each thread then
/// reads its own weights) and `dA += s·dhᵀ·x` (whose output has only the
/// rank's rows).
fn gemm_sum(alpha: f32, a: Mat, b: Mat, c: MatMut) {
    let k = parts(a.cols);
    if k == 1 {
        return gemm(alpha, a, b, 1.0, c);
    }
    let per = a.cols.div_ceil(k);
    let (m, n) = (c.rows, c.cols);
    let pieces: Vec<Vec<f32>> = (0..a.cols.div_ceil(per))
        .into_par_iter()
        .map(|p| {
            let len = per.min(a.cols - p * per);
            let mut out = vec![0.0; m * n];
            let ap = a.t().rows(p * per, len).t();
            gemm(
                alpha,
                ap,
                b.rows(p * per, len),
                0.0,
                MatMut::new(&mut out, m, n),
            );
            out
        })
        .collect();
    for piece in &pieces {
        for (crow, prow) in c.d.chunks_mut(c.rs).zip(piece.chunks(n)) {
            crow[..n].iter_mut().zip(prow).for_each(|(x, y)| *x += y);
        }
    }
}

/// One past the last element a view reaches (0 when it is empty).
fn reach(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    let last = ((rows - 1).checked_mul(rs))
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    last.map_or(usize::MAX, |l| l + 1)
}

/// `c = alpha · a·b + beta · c` (with `beta` 0, c's old values are not read).
fn gemm(alpha: f32, a: Mat, b: Mat, beta: f32, c: MatMut) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert_eq!((a.rows, b.cols), (c.rows, c.cols), "gemm: output shape");
    assert!(reach(a.rows, a.cols, a.rs, a.cs) <= a.d.len());
    assert!(reach(b.rows, b.cols, b.rs, b.cs) <= b.d.len());
    assert!(reach(c.rows, c.cols, c.rs, 1) <= c.d.len());
    assert!(
        c.rows <= 1 || c.rs >= c.cols,
        "gemm: the output's rows overlap"
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    // SAFETY: the asserts keep every element each view's strides reach
    // inside its slice and c's elements apart from one another, and c,
    // borrowed mutably, overlaps neither a nor b.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.d.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.d.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.d.as_mut_ptr(),
            c.rs as isize,
            1,
        )
    }
}

/// RMS norm of each row of `x` (rows of `w.len()`): `y = x·r·w` with
/// `r = 1/sqrt(mean(x²) + eps)` (the inference pass's `ops::rms_scale`),
/// kept in `r` for [`rms_back`].
fn rms_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], r: &mut [f32]) {
    let d = w.len();
    for ((x, y), r) in x.chunks(d).zip(y.chunks_mut(d)).zip(r.iter_mut()) {
        *r = ops::rms_scale(x, eps);
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * *r * w;
        }
    }
}

/// `dx += ∂(x·r·w)/∂x · dy` for each row: with `g = dy·w`,
/// `dx = r·g − r³·x·(g·x)/d`.
fn rms_back(x: &[f32], w: &[f32], r: &[f32], dy: &[f32], dx: &mut [f32]) {
    let d = w.len();
    let rows = x.chunks(d).zip(dy.chunks(d)).zip(dx.chunks_mut(d));
    for (((x, dy), dx), &r) in rows.zip(r) {
        let gx: f64 = (x.iter().zip(dy).zip(w))
            .map(|((&x, &dy), &w)| (dy * w) as f64 * x as f64)
            .sum();
        let c = (r as f64).powi(3) * gx / d as f64;
        for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            *dx += r * dy * w - (c * x as f64) as f32;
        }
    }
}

/// The backward pass of the inference pass's NeoX rotation (`apply_rope`,
/// with its `rope_table`'s cosines then sines): the rotation back, which is
/// its transpose.
fn rope_back(x: &mut [f32], table: &[f32]) {
    let half = x.len() / 2;
    let (cos, sin) = table.split_at(half);
    let (lo, hi) = x.split_at_mut(half);
    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
        (*a, *b) = (*a * c + *b * s, *b * c - *a * s);
    }
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/π)

/// The tanh inside tanh-GELU (`ops::gelu_tanh`): `gelu(x) = x·(1 + t)/2`
/// (kept by the forward pass, so that the backward pass needs none).
#[inline(always)]
fn gelu_inner_tanh(x: f32) -> f32 {
    tanh(GELU_C * (x + 0.044715 * x * x * x))
}

/// tanh through [`exp_poly`], within 3·10⁻⁷ of libm's (an absolute bound:
/// near 0 it loses relative accuracy, harmless where t enters as 1 ± t, as
/// in GELU): unlike libm's, the compiler vectorizes it.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let e = exp_poly(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// `f(x[i])` for each i, in pieces for the pool's threads.
fn map_rows(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = x.to_vec();
    (out.par_chunks_mut(1 << 14)).for_each(|o| each(o, &f));
    out
}

/// `v = f(v)` for each v of `o`: a loop the compiler vectorizes, with FMA
/// where the CPU has it (without, [`exp_poly`]'s `mul_add` is a call).
fn each(o: &mut [f32], f: &impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { each_fma(o, f) };
        return;
    }
    o.iter_mut().for_each(|v| *v = f(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn each_fma(o: &mut [f32], f: &impl Fn(f32) -> f32) {
    o.iter_mut().for_each(|v| *v = f(*v));
}

/// GELU's derivative at x, whose [`gelu_inner_tanh`] is t.
fn gelu_grad(x: f32, t: f32) -> f32 {
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
}

/// One trainable low-rank pair on a layer matrix (n_out × n_in):
/// `A` (rank × n_in) and `B` (n_out × rank), row-major.
#[derive(Clone, Debug)]
pub struct LoraParams {
    pub layer: usize,
    /// The matrix by its index in q k v o gate up down.
    pub matrix: usize,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// `alpha / rank` (1 where the adapter has no alpha, as llama.cpp).
    pub scale: f32,
}

/// The adapter being trained: its pairs, and where each matrix's is.
#[derive(Clone, Debug)]
pub struct TrainableLora {
    /// `adapter.lora.alpha` (0: none).
    pub alpha: f32,
    pub pairs: Vec<LoraParams>,
    /// (layer, matrix) → index in `pairs`.
    index: Vec<[Option<usize>; 7]>,
}

/// SplitMix64: the seeded draws of A's initial values and the example order.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

impl TrainableLora {
    /// A fresh adapter of `rank` on the matrices `targets` (indices in q k v
    /// o gate up down) of every layer, initialised as PEFT does: A uniform
    /// in ±1/sqrt(n_in) (Kaiming's with a = √5), B zero, so that training
    /// starts from the base model.
    pub fn new(model: &Model, targets: &[usize], rank: usize, alpha: f32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut pairs = Vec::new();
        for (l, layer) in model.layers.iter().enumerate() {
            for &m in targets {
                let t = layer.matrix(m);
                let bound = 1.0 / (t.cols as f32).sqrt();
                pairs.push(LoraParams {
                    layer: l,
                    matrix: m,
                    rank,
                    n_in: t.cols,
                    n_out: t.rows,
                    a: (0..rank * t.cols)
                        .map(|_| rng.range(-bound, bound))
                        .collect(),
                    b: vec![0.0; t.rows * rank],
                    scale: alpha / rank as f32,
                });
            }
        }
        Self::with_pairs(model, alpha, pairs)
    }

    /// The pairs of an adapter file (read by [`Model::read_lora`]), to train
    /// on from where it stands.
    pub fn from_file(model: &Model, f: crate::LoraFile) -> Self {
        let pairs = (f.pairs.into_iter())
            .map(|p| {
                let t = model.layers[p.layer].matrix(p.matrix);
                LoraParams {
                    scale: p.scale(1.0, f.alpha),
                    layer: p.layer,
                    matrix: p.matrix,
                    rank: p.rank,
                    n_in: t.cols,
                    n_out: t.rows,
                    a: p.a,
                    b: p.b,
                }
            })
            .collect();
        Self::with_pairs(model, f.alpha, pairs)
    }

    fn with_pairs(model: &Model, alpha: f32, pairs: Vec<LoraParams>) -> Self {
        let mut index = vec![[None; 7]; model.layers.len()];
        for (i, p) in pairs.iter().enumerate() {
            index[p.layer][p.matrix] = Some(i);
        }
        TrainableLora {
            alpha,
            pairs,
            index,
        }
    }

    fn pair(&self, layer: usize, matrix: usize) -> Option<(usize, &LoraParams)> {
        self.index[layer][matrix].map(|i| (i, &self.pairs[i]))
    }

    /// Trainable parameters (A's and B's elements).
    pub fn n_params(&self) -> usize {
        self.pairs.iter().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// The adapter as llama.cpp's converter writes one: `<matrix>.lora_a`
    /// (ggml [n_in, rank]) and `.lora_b` ([rank, n_out]) in F32, with
    /// `adapter.lora.alpha`.
    pub fn to_gguf(&self, name: &str) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::String("gemma3".into()));
        w.add_kv("general.type", Value::String("adapter".into()));
        w.add_kv("general.name", Value::String(name.into()));
        w.add_kv("adapter.type", Value::String("lora".into()));
        w.add_kv("adapter.lora.alpha", Value::F32(self.alpha));
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for p in &self.pairs {
            let base = format!("blk.{}.{}.weight", p.layer, MATRICES[p.matrix]);
            let dims_a = [p.n_in as u64, p.rank as u64];
            let dims_b = [p.rank as u64, p.n_out as u64];
            (w.add_tensor(
                &format!("{base}.lora_a"),
                &dims_a,
                GgmlType::F32,
                bytes(&p.a),
            ))
            .expect("a new, unique tensor name");
            (w.add_tensor(
                &format!("{base}.lora_b"),
                &dims_b,
                GgmlType::F32,
                bytes(&p.b),
            ))
            .expect("a new, unique tensor name");
        }
        w
    }
}

/// Gradients of the loss with respect to each pair's A and B, in the order
/// of [`TrainableLora::pairs`].
#[derive(Clone, Debug)]
pub struct Grads {
    pub a: Vec<Vec<f32>>,
    pub b: Vec<Vec<f32>>,
}

impl Grads {
    pub fn zeros(lora: &TrainableLora) -> Self {
        Grads {
            a: lora.pairs.iter().map(|p| vec![0.0; p.a.len()]).collect(),
            b: lora.pairs.iter().map(|p| vec![0.0; p.b.len()]).collect(),
        }
    }

    /// The L2 norm of all of them together.
    pub fn norm(&self) -> f64 {
        let all = self.a.iter().chain(&self.b).flatten();
        all.map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt()
    }

    fn scale(&mut self, s: f32) {
        let all = self.a.iter_mut().chain(self.b.iter_mut()).flatten();
        all.for_each(|g| *g *= s);
    }
}

/// One training sequence: its tokens from position 0, and which of them the
/// loss predicts (`target[i]`: token i, from the tokens before it; never
/// the first).
#[derive(Clone, Debug)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub target: Vec<bool>,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Where a batch's examples lie in its rows: example e is rows
/// `starts[e]..starts[e] + lens[e]`, at positions 0.. within it.
struct Spans {
    starts: Vec<usize>,
    lens: Vec<usize>,
}

impl Spans {
    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.starts.iter().copied().zip(self.lens.iter().copied())
    }
}

/// `v` (rows of `width`) cut into one mutable piece per span.
fn split_spans<'a>(mut v: &'a mut [f32], spans: &Spans, width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(spans.lens.len());
    for &len in &spans.lens {
        let (head, rest) = v.split_at_mut(len * width);
        out.push(head);
        v = rest;
    }
    out
}

/// What one layer's forward pass keeps for its backward pass (n rows: the
/// batch's examples one after another).
#[derive(Default)]
struct LayerTape {
    /// The residual stream in (n × d), its attention norm's inverse RMS, and
    /// the normed input.
    x: Vec<f32>,
    r_in: Vec<f32>,
    xn: Vec<f32>,
    /// `A·input` (n × rank) of each adapted matrix, by matrix index.
    h: [Vec<f32>; 7],
    /// q and k before their norms, and those norms' inverse RMS (per head).
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    r_q: Vec<f32>,
    r_k: Vec<f32>,
    /// Each row's RoPE table (`rope_table`: a head's width, cosines then
    /// sines).
    rope: Vec<f32>,
    /// q (normed, rotated, scaled), k (normed, rotated) and v.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention weights per example, heads × len × len (0 outside each
    /// row's keys).
    p: Vec<Vec<f32>>,
    attn: Vec<f32>,
    /// The attention's output projection, its post-norm's inverse RMS, and
    /// the residual stream after it.
    o: Vec<f32>,
    r_o: Vec<f32>,
    x_mid: Vec<f32>,
    r_ffn: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// tanh-GELU's tanh of each gate value (see [`gelu_inner_tanh`]).
    tanh: Vec<f32>,
    /// The feed-forward's output and its post-norm's inverse RMS.
    f: Vec<f32>,
    r_f: Vec<f32>,
}

/// The model's weights as the training passes read them: the layer matrices
/// and the output head expanded to f32 (rows × cols, row-major), the rest
/// (norms, RoPE, the embedding) read from the [`Model`]. Adapters loaded into
/// the model (`Model::load_lora`) are not seen: the one being trained is
/// given to each pass.
pub struct DenseModel<'m> {
    pub model: &'m Model,
    /// The most tokens a pass runs through the layers at once ([`MAX_ROWS`]).
    pub max_rows: usize,
    layers: Vec<[Frozen; 7]>,
    head: Frozen,
}

/// The most tokens [`DenseModel::pass`] runs through the layers at once
/// unless told otherwise (`DenseModel::max_rows`).
pub const MAX_ROWS: usize = 1024;

/// Target rows whose logits are computed at once: 128 × 262144, 128 MB.
const HEAD_ROWS: usize = 128;

/// The fewest rows (of weights, of an output, or of a product's inner
/// dimension) a thread takes in the split products.
const MIN_SPLIT: usize = 64;

/// The pieces `rows` such rows are cut into for the pool's threads.
fn parts(rows: usize) -> usize {
    rayon::current_num_threads().min(rows / MIN_SPLIT).max(1)
}

/// `y = x·wᵀ` for x (n × cols) and w (rows × cols): each thread multiplies
/// its own range of w's rows, so that each weight is read once.
fn xwt(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * rows];
    let xm = Mat::new(x, n, cols);
    let k = parts(rows);
    if k == 1 || n == 0 {
        gemm(
            1.0,
            xm,
            Mat::new(w, rows, cols).t(),
            0.0,
            MatMut::new(&mut y, n, rows),
        );
        return y;
    }
    let per = rows.div_ceil(k);
    let pieces: Vec<Vec<f32>> = (w.par_chunks(per * cols))
        .map(|wc| {
            let r = wc.len() / cols;
            let mut out = vec![0.0; n * r];
            gemm(
                1.0,
                xm,
                Mat::new(wc, r, cols).t(),
                0.0,
                MatMut::new(&mut out, n, r),
            );
            out
        })
        .collect();
    for (p, piece) in pieces.iter().enumerate() {
        let r = piece.len() / n;
        for (yr, pr) in y.chunks_mut(rows).zip(piece.chunks(r)) {
            yr[p * per..p * per + r].copy_from_slice(pr);
        }
    }
    y
}

/// `dx (+)= dy·w` for dy (n × rows) and w (rows × cols), `accumulate`:
/// added to dx, else written over it. Each thread takes a range of w's rows
/// (and dy's columns): [`gemm_sum`].
fn dyw(
    dy: &[f32],
    n: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    if !accumulate {
        dx.fill(0.0);
    }
    let (dym, wm) = (Mat::new(dy, n, rows), Mat::new(w, rows, cols));
    gemm_sum(1.0, dym, wm, MatMut::new(dx, n, cols));
}

/// How [`DenseModel`] holds the frozen weights for its products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32: the quantized weights' exact values, and f32 activations (the
    /// `matrixmultiply` crate's kernels). The passes compute the exact
    /// function of the model and adapter, but for GELU's tanh and the
    /// softmax's exponentials, within 3·10⁻⁷ (`exp_poly`).
    F32,
    /// bf16 weights and activations with f32 sums ([`bf16mm`]: AVX-512
    /// BF16, about twice the f32 multiply-add rate; packed once, so no
    /// product packs its weights). Each operand is off by at most 2⁻⁹ of
    /// itself, as in mixed-precision training. Where the CPU lacks the
    /// instructions the products run on [`bf16mm::product_ref`], one
    /// thread and slow: see [`Precision::fastest`].
    Bf16,
}

impl Precision {
    /// bf16 where the CPU has its instructions ([`bf16mm::available`]),
    /// else f32.
    pub fn fastest() -> Self {
        if bf16mm::available() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// A frozen matrix W (rows × cols) as the products read it: f32, or bf16
/// panels of W (for `x·Wᵀ`) and of Wᵀ (for `dy·W`).
enum Frozen {
    F32 {
        w: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    Bf16 {
        fwd: Panels,
        back: Panels,
    },
}

impl Frozen {
    fn new(w: Vec<f32>, rows: usize, cols: usize, precision: Precision) -> Self {
        match precision {
            Precision::F32 => Frozen::F32 { w, rows, cols },
            Precision::Bf16 => Frozen::Bf16 {
                fwd: Panels::from_rows(&w, rows, cols),
                back: Panels::from_columns(&w, rows, cols),
            },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Frozen::F32 { w, .. } => 4 * w.len(),
            Frozen::Bf16 { fwd, back } => fwd.bytes() + back.bytes(),
        }
    }

    /// `x·Wᵀ` for x (n × cols).
    fn xwt(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            Frozen::F32 { w, rows, cols } => xwt(x, n, w, *rows, *cols),
            Frozen::Bf16 { fwd, .. } => {
                let mut y = vec![0.0; n * fwd.n()];
                bf16mm::product(x, n, fwd, &mut y, false);
                y
            }
        }
    }

    /// `dx (+)= dy·W` for dy (n × rows); `accumulate`: added to dx, else
    /// written over it.
    fn dyw(&self, dy: &[f32], n: usize, dx: &mut [f32], accumulate: bool) {
        match self {
            Frozen::F32 { w, rows, cols } => dyw(dy, n, w, *rows, *cols, dx, accumulate),
            Frozen::Bf16 { back, .. } => bf16mm::product(dy, n, back, dx, accumulate),
        }
    }
}

/// What a pass over examples gives: the summed loss (nats) over the
/// targets it counted, and the gradients of the mean loss of its batch.
pub struct Pass {
    pub loss_sum: f64,
    pub targets: usize,
    /// Examples each of whose targets has the largest logit given the tokens
    /// before it: those that greedy decoding after their untargeted start
    /// would reproduce (a prompt's completion, EOS included), by this pass's
    /// logits.
    pub exact: usize,
    pub grads: Option<Grads>,
}

impl<'m> DenseModel<'m> {
    /// Expand `model`'s matrices to f32 (with the pool's threads): the
    /// passes are the exact function ([`Precision::F32`]).
    pub fn new(model: &'m Model) -> Self {
        Self::with_precision(model, Precision::F32)
    }

    /// Expand `model`'s matrices to `precision`.
    pub fn with_precision(model: &'m Model, precision: Precision) -> Self {
        let expand = |t: &crate::Tensor| {
            let mut out = vec![0.0f32; t.rows * t.cols];
            let m = model.mat(t);
            out.par_chunks_mut(t.cols)
                .enumerate()
                .for_each(|(r, row)| m.dequantize_row(r, row));
            Frozen::new(out, t.rows, t.cols, precision)
        };
        let layers = (model.layers.iter())
            .map(|l| std::array::from_fn(|m| expand(l.matrix(m))))
            .collect();
        let head = expand(model.head());
        DenseModel {
            model,
            max_rows: MAX_ROWS,
            layers,
            head,
        }
    }

    /// Bytes of the expanded weights.
    pub fn bytes(&self) -> usize {
        let layers: usize = self.layers.iter().flatten().map(Frozen::bytes).sum();
        layers + self.head.bytes()
    }

    /// What [`Self::with_precision`] will take, before it runs: the bytes
    /// of the expanded weights (4 per parameter either way), and the most
    /// it holds on top of them while it expands (bf16 keeps a matrix's f32
    /// values while it packs them).
    pub fn planned_bytes(model: &Model, precision: Precision) -> (usize, usize) {
        let sizes = (model.layers.iter())
            .flat_map(|l| (0..7).map(|m| l.matrix(m)))
            .chain([model.head()])
            .map(|t| t.rows * t.cols);
        let (total, largest) = sizes.fold((0, 0), |(t, m), n| (t + n, m.max(n)));
        let transient = match precision {
            Precision::F32 => 0,
            Precision::Bf16 => 4 * largest,
        };
        (4 * total, transient)
    }

    /// About the bytes a pass keeps for its backward pass over `rows`
    /// tokens in examples of at most `longest`, with the output head's
    /// logits and `rank`'s pairs: the layers' tapes (each layer's
    /// activations, and its attention weights, heads × len² per example).
    pub fn pass_bytes(model: &Model, rows: usize, longest: usize, rank: usize) -> usize {
        let c = &model.config;
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let per_token = 6 * c.d_model + 3 * qd + 3 * kvd + 4 * c.d_ff + c.head_dim + 7 * rank + 16;
        let attention = c.n_heads * longest;
        let tapes = rows * model.layers.len() * (per_token + attention);
        // The head's logits and their gradients for HEAD_ROWS targets, and
        // the gradients of one layer in flight (about a tape's width).
        4 * (tapes + HEAD_ROWS * c.vocab_size + rows * per_token)
    }

    /// `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` for n rows; returns y and `x·Aᵀ`.
    fn linear(
        &self,
        lora: &TrainableLora,
        l: usize,
        m: usize,
        x: &[f32],
        n: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let t = self.model.layers[l].matrix(m);
        let (rows, cols) = (t.rows, t.cols);
        let mut y = self.layers[l][m].xwt(x, n);
        let mut h = Vec::new();
        if let Some((_, p)) = lora.pair(l, m) {
            h = vec![0.0; n * p.rank];
            let a = Mat::new(&p.a, p.rank, cols);
            gemm_rows(
                1.0,
                Mat::new(x, n, cols),
                a.t(),
                0.0,
                MatMut::new(&mut h, n, p.rank),
            );
            let b = Mat::new(&p.b, rows, p.rank);
            let hm = Mat::new(&h, n, p.rank);
            gemm_rows(p.scale, hm, b.t(), 1.0, MatMut::new(&mut y, n, rows));
        }
        (y, h)
    }

    /// The backward pass of [`Self::linear`]: `dx (+)= dy·W (+ s·(dy·B)·A)`
    /// (`accumulate`: added to dx, else written over it), and the pair's
    /// gradients `dB += s·dyᵀ·h`, `dA += s·(dy·B)ᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    fn linear_back(
        &self,
        lora: &TrainableLora,
        (l, m): (usize, usize),
        x: &[f32],
        h: &[f32],
        dy: &[f32],
        n: usize,
        dx: &mut [f32],
        accumulate: bool,
        grads: &mut Grads,
    ) {
        let t = self.model.layers[l].matrix(m);
        let (rows, cols) = (t.rows, t.cols);
        self.layers[l][m].dyw(dy, n, dx, accumulate);
        if let Some((i, p)) = lora.pair(l, m) {
            let r = p.rank;
            let dym = Mat::new(dy, n, rows);
            let hm = Mat::new(h, n, r);
            gemm_rows(
                p.scale,
                dym.t(),
                hm,
                1.0,
                MatMut::new(&mut grads.b[i], rows, r),
            );
            let mut dh = vec![0.0; n * r];
            gemm_rows(
                1.0,
                dym,
                Mat::new(&p.b, rows, r),
                0.0,
                MatMut::new(&mut dh, n, r),
            );
            let dhm = Mat::new(&dh, n, r);
            let xm = Mat::new(x, n, cols);
            gemm_sum(p.scale, dhm.t(), xm, MatMut::new(&mut grads.a[i], r, cols));
            gemm_rows(
                p.scale,
                dhm,
                Mat::new(&p.a, r, cols),
                1.0,
                MatMut::new(dx, n, cols),
            );
        }
    }

    /// Every row's RoPE table for layer l, at its position within its
    /// example.
    fn rope_tables(&self, l: usize, spans: &Spans) -> Vec<f32> {
        let f = &self.model.layers[l].rope_inv_freq;
        let hd = 2 * f.len();
        let mut out = vec![0.0; spans.lens.iter().sum::<usize>() * hd];
        let positions = spans.lens.iter().flat_map(|&len| 0..len);
        for (table, p) in out.chunks_mut(hd).zip(positions) {
            rope_table(p, f, table);
        }
        out
    }

    /// The first key position the query at position i sees in layer l.
    fn first_key(&self, l: usize, i: usize) -> usize {
        if self.model.layers[l].is_global {
            0
        } else {
            (i + 1).saturating_sub(self.model.config.sliding_window)
        }
    }

    /// One example's attention in layer l: for each head, P = softmax(q·kᵀ)
    /// over each row's keys and attn = P·v. q and attn are its rows (len ×
    /// q_dim), k and v (len × kv_dim); returns P, heads × len × len.
    fn attend(&self, l: usize, q: &[f32], k: &[f32], v: &[f32], attn: &mut [f32]) -> Vec<f32> {
        let c = &self.model.config;
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n = q.len() / qd;
        let mut p = vec![0.0; nh * n * n];
        let group = nh / nkv;
        for (h, ph) in p.chunks_mut(n * n).enumerate() {
            let g = h / group;
            let qm = Mat::strided(&q[h * hd..], n, hd, qd);
            let km = Mat::strided(&k[g * hd..], n, hd, kvd);
            gemm(1.0, qm, km.t(), 0.0, MatMut::new(ph, n, n));
            for (i, row) in ph.chunks_mut(n).enumerate() {
                let lo = self.first_key(l, i);
                let keys = &mut row[lo..=i];
                let max = keys.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                keys.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                keys.iter_mut().for_each(|s| *s /= sum);
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let vm = Mat::strided(&v[g * hd..], n, hd, kvd);
            let out = MatMut {
                d: &mut attn[h * hd..],
                rows: n,
                cols: hd,
                rs: qd,
            };
            gemm(1.0, Mat::new(ph, n, n), vm, 0.0, out);
        }
        p
    }

    /// The backward pass of [`Self::attend`] for one example: from dattn
    /// (len × q_dim) to dq (written), dk and dv (written).
    #[allow(clippy::too_many_arguments)]
    fn attend_back(
        &self,
        (q, k, v, p): (&[f32], &[f32], &[f32], &[f32]),
        dattn: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let c = &self.model.config;
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n = q.len() / qd;
        dk.fill(0.0);
        dv.fill(0.0);
        let mut ds = vec![0.0; n * n];
        let group = nh / nkv;
        for (h, ph) in p.chunks(n * n).enumerate() {
            let g = h / group;
            let da = Mat::strided(&dattn[h * hd..], n, hd, qd);
            let pm = Mat::new(ph, n, n);
            // dv += Pᵀ·dattn; dP = dattn·vᵀ.
            let dv_g = MatMut {
                d: &mut dv[g * hd..],
                rows: n,
                cols: hd,
                rs: kvd,
            };
            gemm(1.0, pm.t(), da, 1.0, dv_g);
            let vm = Mat::strided(&v[g * hd..], n, hd, kvd);
            gemm(1.0, da, vm.t(), 0.0, MatMut::new(&mut ds, n, n));
            // Through the softmax: dS = P ⊙ (dP − Σ_j P·dP).
            for (row, prow) in ds.chunks_mut(n).zip(ph.chunks(n)) {
                let dot: f32 = row.iter().zip(prow).map(|(a, b)| a * b).sum();
                row.iter_mut()
                    .zip(prow)
                    .for_each(|(s, &p)| *s = p * (*s - dot));
            }
            let dsm = Mat::new(&ds, n, n);
            // dq = dS·k; dk += dSᵀ·q.
            let km = Mat::strided(&k[g * hd..], n, hd, kvd);
            let dq_h = MatMut {
                d: &mut dq[h * hd..],
                rows: n,
                cols: hd,
                rs: qd,
            };
            gemm(1.0, dsm, km, 0.0, dq_h);
            let qm = Mat::strided(&q[h * hd..], n, hd, qd);
            let dk_g = MatMut {
                d: &mut dk[g * hd..],
                rows: n,
                cols: hd,
                rs: kvd,
            };
            gemm(1.0, dsm.t(), qm, 1.0, dk_g);
        }
    }

    /// Layer l's forward pass over the residual stream `x` (the batch's
    /// rows): its output, and what its backward pass needs.
    fn layer_forward(
        &self,
        lora: &TrainableLora,
        l: usize,
        x: Vec<f32>,
        spans: &Spans,
    ) -> (LayerTape, Vec<f32>) {
        let c = &self.model.config;
        let layer = &self.model.layers[l];
        let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd, eps) = (nh * hd, nkv * hd, c.rms_eps);
        let n = x.len() / d;
        let mut t = LayerTape {
            r_in: vec![0.0; n],
            xn: vec![0.0; n * d],
            ..Default::default()
        };
        rms_rows(&x, &layer.attn_norm, eps, &mut t.xn, &mut t.r_in);
        t.x = x;
        (t.q_raw, t.h[0]) = self.linear(lora, l, 0, &t.xn, n);
        (t.k_raw, t.h[1]) = self.linear(lora, l, 1, &t.xn, n);
        (t.v, t.h[2]) = self.linear(lora, l, 2, &t.xn, n);
        t.rope = self.rope_tables(l, spans);
        t.q = vec![0.0; n * qd];
        t.r_q = vec![0.0; n * nh];
        rms_rows(&t.q_raw, &layer.q_norm, eps, &mut t.q, &mut t.r_q);
        t.k = vec![0.0; n * kvd];
        t.r_k = vec![0.0; n * nkv];
        rms_rows(&t.k_raw, &layer.k_norm, eps, &mut t.k, &mut t.r_k);
        let rows = t.q.chunks_mut(qd).zip(t.k.chunks_mut(kvd));
        for ((q, k), table) in rows.zip(t.rope.chunks(hd)) {
            for h in q.chunks_mut(hd) {
                apply_rope(h, table);
                h.iter_mut().for_each(|v| *v *= c.attn_scale);
            }
            for h in k.chunks_mut(hd) {
                apply_rope(h, table);
            }
        }
        // Attention, each example on its own (on the pool's threads).
        t.attn = vec![0.0; n * qd];
        let attn = split_spans(&mut t.attn, spans, qd);
        let (q, k, v) = (&t.q, &t.k, &t.v);
        t.p = (attn.into_par_iter().zip(spans.starts.par_iter()))
            .map(|(attn, &s)| {
                let len = attn.len() / qd;
                let (q, k, v) = (
                    &q[s * qd..(s + len) * qd],
                    &k[s * kvd..(s + len) * kvd],
                    &v[s * kvd..(s + len) * kvd],
                );
                self.attend(l, q, k, v, attn)
            })
            .collect();
        (t.o, t.h[3]) = self.linear(lora, l, 3, &t.attn, n);
        t.r_o = vec![0.0; n];
        let mut normed = vec![0.0; n * d];
        rms_rows(&t.o, &layer.post_attn_norm, eps, &mut normed, &mut t.r_o);
        t.x_mid = t.x.iter().zip(&normed).map(|(a, b)| a + b).collect();
        t.r_ffn = vec![0.0; n];
        t.xn2 = vec![0.0; n * d];
        rms_rows(&t.x_mid, &layer.ffn_norm, eps, &mut t.xn2, &mut t.r_ffn);
        (t.gate, t.h[4]) = self.linear(lora, l, 4, &t.xn2, n);
        (t.up, t.h[5]) = self.linear(lora, l, 5, &t.xn2, n);
        t.tanh = map_rows(&t.gate, gelu_inner_tanh);
        t.act = (t.gate.par_iter().zip(&t.tanh).zip(&t.up))
            .map(|((&g, &th), &u)| 0.5 * g * (1.0 + th) * u)
            .collect();
        (t.f, t.h[6]) = self.linear(lora, l, 6, &t.act, n);
        t.r_f = vec![0.0; n];
        rms_rows(&t.f, &layer.post_ffn_norm, eps, &mut normed, &mut t.r_f);
        let out = t.x_mid.iter().zip(&normed).map(|(a, b)| a + b).collect();
        (t, out)
    }

    /// Given `dx`, the loss's gradient at layer l's output, returns the
    /// gradient at its input, adding the pairs' gradients to `grads`.
    fn layer_backward(
        &self,
        lora: &TrainableLora,
        l: usize,
        t: &LayerTape,
        spans: &Spans,
        dx: Vec<f32>,
        grads: &mut Grads,
    ) -> Vec<f32> {
        let c = &self.model.config;
        let layer = &self.model.layers[l];
        let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n = t.r_in.len();
        // Feed-forward: x_out = x_mid + norm(f).
        let mut df = vec![0.0; n * d];
        rms_back(&t.f, &layer.post_ffn_norm, &t.r_f, &dx, &mut df);
        let mut dact = vec![0.0; n * ff];
        self.linear_back(
            lora,
            (l, 6),
            &t.act,
            &t.h[6],
            &df,
            n,
            &mut dact,
            false,
            grads,
        );
        let (dgate, dup): (Vec<f32>, Vec<f32>) = (dact.par_iter().zip(&t.gate).zip(&t.up))
            .zip(&t.tanh)
            .map(|(((&da, &g), &u), &th)| (da * u * gelu_grad(g, th), da * 0.5 * g * (1.0 + th)))
            .unzip();
        let mut dxn2 = vec![0.0; n * d];
        self.linear_back(
            lora,
            (l, 4),
            &t.xn2,
            &t.h[4],
            &dgate,
            n,
            &mut dxn2,
            false,
            grads,
        );
        self.linear_back(
            lora,
            (l, 5),
            &t.xn2,
            &t.h[5],
            &dup,
            n,
            &mut dxn2,
            true,
            grads,
        );
        let mut dx_mid = dx;
        rms_back(&t.x_mid, &layer.ffn_norm, &t.r_ffn, &dxn2, &mut dx_mid);

        // Attention: x_mid = x + norm(o).
        let mut d_o = vec![0.0; n * d];
        rms_back(&t.o, &layer.post_attn_norm, &t.r_o, &dx_mid, &mut d_o);
        let mut dattn = vec![0.0; n * qd];
        self.linear_back(
            lora,
            (l, 3),
            &t.attn,
            &t.h[3],
            &d_o,
            n,
            &mut dattn,
            false,
            grads,
        );
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        let pieces = split_spans(&mut dq, spans, qd)
            .into_iter()
            .zip(split_spans(&mut dk, spans, kvd))
            .zip(split_spans(&mut dv, spans, kvd));
        let pieces: Vec<_> = pieces.zip(spans.iter()).zip(&t.p).collect();
        pieces
            .into_par_iter()
            .for_each(|((((dq, dk), dv), (s, len)), p)| {
                let e = s + len;
                let saved = (
                    &t.q[s * qd..e * qd],
                    &t.k[s * kvd..e * kvd],
                    &t.v[s * kvd..e * kvd],
                    &p[..],
                );
                self.attend_back(saved, &dattn[s * qd..e * qd], dq, dk, dv);
            });
        // Back through the scale, the rotation and the per-head norms.
        let rows = dq.chunks_mut(qd).zip(dk.chunks_mut(kvd));
        for ((q, k), table) in rows.zip(t.rope.chunks(hd)) {
            for h in q.chunks_mut(hd) {
                h.iter_mut().for_each(|v| *v *= c.attn_scale);
                rope_back(h, table);
            }
            for h in k.chunks_mut(hd) {
                rope_back(h, table);
            }
        }
        let mut dq_raw = vec![0.0; n * qd];
        rms_back(&t.q_raw, &layer.q_norm, &t.r_q, &dq, &mut dq_raw);
        let mut dk_raw = vec![0.0; n * kvd];
        rms_back(&t.k_raw, &layer.k_norm, &t.r_k, &dk, &mut dk_raw);
        let mut dxn = vec![0.0; n * d];
        self.linear_back(
            lora,
            (l, 0),
            &t.xn,
            &t.h[0],
            &dq_raw,
            n,
            &mut dxn,
            false,
            grads,
        );
        self.linear_back(
            lora,
            (l, 1),
            &t.xn,
            &t.h[1],
            &dk_raw,
            n,
            &mut dxn,
            true,
            grads,
        );
        self.linear_back(lora, (l, 2), &t.xn, &t.h[2], &dv, n, &mut dxn, true, grads);
        let mut dx_in = dx_mid;
        rms_back(&t.x, &layer.attn_norm, &t.r_in, &dxn, &mut dx_in);
        dx_in
    }

    /// The residual stream after the last layer for `tokens` (the examples
    /// of `spans` one after another), and each layer's tape.
    fn layers_forward(
        &self,
        lora: &TrainableLora,
        tokens: &[u32],
        spans: &Spans,
    ) -> (Vec<f32>, Vec<LayerTape>) {
        let d = self.model.config.d_model;
        // The embedding rows, scaled by sqrt(d_model) as in inference.
        let embed = self.model.mat(&self.model.embed);
        let mut x = vec![0.0f32; tokens.len() * d];
        let scale = (d as f32).sqrt();
        for (row, &tok) in x.chunks_mut(d).zip(tokens) {
            embed.dequantize_row(tok as usize, row);
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let mut tapes = Vec::with_capacity(self.model.layers.len());
        for l in 0..self.model.layers.len() {
            let (t, out) = self.layer_forward(lora, l, x, spans);
            x = out;
            tapes.push(t);
        }
        (x, tapes)
    }

    /// The logits (n × vocab) at every position of one sequence, as the
    /// training passes compute them (for checks against a reference).
    pub fn logits(&self, lora: &TrainableLora, tokens: &[u32]) -> Vec<f32> {
        let c = &self.model.config;
        let n = tokens.len();
        let spans = Spans {
            starts: vec![0],
            lens: vec![n],
        };
        let (x, _) = self.layers_forward(lora, tokens, &spans);
        let (mut hid, mut r) = (vec![0.0; n * c.d_model], vec![0.0; n]);
        rms_rows(&x, &self.model.final_norm, c.rms_eps, &mut hid, &mut r);
        self.head.xwt(&hid, n)
    }

    /// The loss over `batch` and, with `grads`, the gradients of its mean
    /// over all the batch's targets. The examples go through the layers as
    /// one matrix of rows (each weight read once per product), attending
    /// each within itself, in groups of at most `max_rows` tokens (an
    /// example longer than that alone) whose gradients add up: what the
    /// backward pass keeps stays near 1 MB a token for the 270M model.
    pub fn pass(&self, lora: &TrainableLora, batch: &[&Example], grads: bool) -> Pass {
        let targets: usize = batch.iter().map(|e| e.n_targets()).sum();
        let norm = 1.0 / targets.max(1) as f32;
        let mut total = Pass {
            loss_sum: 0.0,
            targets: 0,
            exact: 0,
            grads: grads.then(|| Grads::zeros(lora)),
        };
        let mut start = 0;
        while start < batch.len() {
            let mut end = start + 1;
            let mut rows = batch[start].tokens.len();
            while end < batch.len() && rows + batch[end].tokens.len() <= self.max_rows {
                rows += batch[end].tokens.len();
                end += 1;
            }
            let p = self.group(lora, &batch[start..end], norm, total.grads.as_mut());
            total.loss_sum += p.0;
            total.targets += p.1;
            total.exact += p.2;
            start = end;
        }
        total
    }

    /// [`Self::pass`] over one group: its summed loss, target count and
    /// examples predicted exactly, adding the gradients of `norm` × that
    /// sum to `grads`.
    fn group(
        &self,
        lora: &TrainableLora,
        batch: &[&Example],
        norm: f32,
        grads: Option<&mut Grads>,
    ) -> (f64, usize, usize) {
        let c = &self.model.config;
        let (d, vocab) = (c.d_model, c.vocab_size);
        for e in batch {
            assert_eq!(e.target.len(), e.tokens.len(), "one target flag per token");
            assert!(!e.tokens.is_empty(), "an example without tokens");
        }
        let spans = Spans {
            starts: (batch.iter())
                .scan(0, |s, e| {
                    *s += e.tokens.len();
                    Some(*s - e.tokens.len())
                })
                .collect(),
            lens: batch.iter().map(|e| e.tokens.len()).collect(),
        };
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let (x, mut tapes) = self.layers_forward(lora, &tokens, &spans);
        // Each target's row (the one before it) and token.
        // Each target's row (the one before it), token and example.
        let targets: Vec<(usize, usize, usize)> = (batch.iter().zip(spans.iter()).enumerate())
            .flat_map(|(k, (e, (s, len)))| {
                (1..len)
                    .filter(|&i| e.target[i])
                    .map(move |i| (s + i - 1, e.tokens[i] as usize, k))
            })
            .collect();
        let mut missed = vec![false; batch.len()];
        let mut dx = grads.is_some().then(|| vec![0.0f32; x.len()]);
        let mut loss = 0.0f64;
        for chunk in targets.chunks(HEAD_ROWS) {
            let m = chunk.len();
            let mut xs = Vec::with_capacity(m * d);
            chunk
                .iter()
                .for_each(|&(i, _, _)| xs.extend_from_slice(&x[i * d..(i + 1) * d]));
            let (mut hid, mut r) = (vec![0.0; m * d], vec![0.0; m]);
            rms_rows(&xs, &self.model.final_norm, c.rms_eps, &mut hid, &mut r);
            let mut logits = self.head.xwt(&hid, m);
            let losses: Vec<(f64, bool)> = (logits.par_chunks_mut(vocab).zip(chunk))
                .map(|(z, &(_, y, _))| {
                    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    // (Ties count as misses.)
                    let best = z[y] == max && z.iter().filter(|&&v| v == max).count() == 1;
                    let zy = z[y];
                    // (A −∞ logit gives 0: exp_poly's n < −126 case.)
                    each(z, &|v| exp_poly(v - max));
                    let sum: f64 = z.chunks(64).map(|c| c.iter().sum::<f32>() as f64).sum();
                    let loss = max as f64 + sum.ln() - zy as f64;
                    // d(loss)/dz = softmax − one-hot, times norm.
                    let scale = (norm as f64 / sum) as f32;
                    for v in z.iter_mut() {
                        *v *= scale;
                    }
                    z[y] -= norm;
                    (loss, best)
                })
                .collect();
            for (&(l, best), &(_, _, k)) in losses.iter().zip(chunk) {
                loss += l;
                missed[k] |= !best;
            }
            if let Some(dx) = dx.as_mut() {
                let mut dhid = vec![0.0; m * d];
                self.head.dyw(&logits, m, &mut dhid, false);
                let mut dxs = vec![0.0; m * d];
                rms_back(&xs, &self.model.final_norm, &r, &dhid, &mut dxs);
                for (row, &(i, _, _)) in dxs.chunks(d).zip(chunk) {
                    dx[i * d..(i + 1) * d].copy_from_slice(row);
                }
            }
        }
        if let (Some(mut dx), Some(g)) = (dx, grads) {
            for l in (0..self.model.layers.len()).rev() {
                let t = tapes.pop().expect("one tape per layer");
                dx = self.layer_backward(lora, l, &t, &spans, dx, g);
            }
        }
        let exact = (batch.iter().zip(&missed))
            .filter(|(e, &m)| !m && e.n_targets() > 0)
            .count();
        (loss, targets.len(), exact)
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments), over A and B.
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    steps: i32,
    m: Grads,
    v: Grads,
}

impl AdamW {
    /// PyTorch's defaults (β 0.9 and 0.999, ε 1e-8) and `weight_decay`.
    pub fn new(lora: &TrainableLora, weight_decay: f32) -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            steps: 0,
            m: Grads::zeros(lora),
            v: Grads::zeros(lora),
        }
    }

    /// One step at learning rate `lr`, the gradients first scaled down to
    /// an L2 norm of `max_norm` where larger (0: no clipping). Returns their
    /// norm before clipping; where that is not finite, the step is not
    /// taken.
    pub fn step(&mut self, lora: &mut TrainableLora, mut g: Grads, lr: f32, max_norm: f32) -> f64 {
        let norm = g.norm();
        if !norm.is_finite() {
            // Nothing changes: the caller sees the norm and stops.
            return norm;
        }
        if max_norm > 0.0 && norm > max_norm as f64 {
            g.scale((max_norm as f64 / norm) as f32);
        }
        self.steps += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.steps);
        let c2 = 1.0 - b2.powi(self.steps);
        let params = lora.pairs.iter_mut().flat_map(|p| [&mut p.a, &mut p.b]);
        let grads = g.a.iter().zip(&g.b).flat_map(|(a, b)| [a, b]);
        let ms = self
            .m
            .a
            .iter_mut()
            .zip(self.m.b.iter_mut())
            .flat_map(|(a, b)| [a, b]);
        let vs = self
            .v
            .a
            .iter_mut()
            .zip(self.v.b.iter_mut())
            .flat_map(|(a, b)| [a, b]);
        for (((w, g), m), v) in params.zip(grads).zip(ms).zip(vs) {
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let (mh, vh) = (*m / c1, *v / c2);
                *w -= lr * (mh / (vh.sqrt() + self.eps) + self.weight_decay * *w);
            }
        }
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The norm's backward pass against central differences of its forward
    /// pass, worked in f64 here.
    #[test]
    fn rms_back_matches_central_differences() {
        let x = [0.3f32, -1.2, 0.7, 2.0];
        let w = [1.1f32, 0.4, -0.8, 1.5];
        let dy = [0.5f32, -0.25, 1.0, 0.75];
        let f = |x: &[f64]| -> f64 {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-6;
            let r = 1.0 / ms.sqrt();
            (0..4).map(|i| x[i] * r * w[i] as f64 * dy[i] as f64).sum()
        };
        let (mut y, mut r) = ([0.0f32; 4], [0.0f32; 1]);
        rms_rows(&x, &w, 1e-6, &mut y, &mut r);
        let mut dx = [0.0f32; 4];
        rms_back(&x, &w, &r, &dy, &mut dx);
        for i in 0..4 {
            let mut xp: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut xm = xp.clone();
            xp[i] += 1e-5;
            xm[i] -= 1e-5;
            let num = (f(&xp) - f(&xm)) / 2e-5;
            assert!(
                (num - dx[i] as f64).abs() < 1e-4,
                "{i}: {num} against {}",
                dx[i]
            );
        }
    }

    /// The vectorizable tanh against libm's in f64, and at its edges.
    #[test]
    fn tanh_is_within_3e_7_of_libm() {
        let mut worst = 0.0f64;
        for i in -40_000..=40_000 {
            for x in [i as f32 * 5e-4, i as f32 * 1e-8] {
                let err = (tanh(x) as f64 - (x as f64).tanh()).abs();
                worst = worst.max(err);
            }
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!((tanh(f32::INFINITY), tanh(f32::NEG_INFINITY)), (1.0, -1.0));
        assert!(tanh(f32::NAN).is_nan());
    }

    /// GELU's derivative against central differences.
    #[test]
    fn gelu_grad_matches_central_differences() {
        for x in [-4.0f32, -1.3, -0.2, 0.0, 0.5, 1.7, 3.9] {
            let g = |x: f64| 0.5 * x * (1.0 + (0.7978845608 * (x + 0.044715 * x * x * x)).tanh());
            let num = (g(x as f64 + 1e-5) - g(x as f64 - 1e-5)) / 2e-5;
            let ours = gelu_grad(x, gelu_inner_tanh(x)) as f64;
            assert!((num - ours).abs() < 1e-4, "{x}: {num} against {ours}");
        }
    }

    /// The threaded products against a plain triple loop, for thread counts
    /// and row counts that cut the weights unevenly (and into fewer pieces
    /// than threads: 8193 rows on 128 threads are 65 pieces of 127).
    #[test]
    fn split_products_equal_the_plain_ones() {
        let mut rng = Rng::new(3);
        for threads in [2, 3, 5, 128] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for rows in [64, 129, 301, 8193] {
                let (n, cols) = (3, 5);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.range(-1.0, 1.0)).collect();
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.range(-1.0, 1.0)).collect();
                let dy: Vec<f32> = (0..n * rows).map(|_| rng.range(-1.0, 1.0)).collect();
                let (y, dx) = pool.install(|| {
                    let mut dx = vec![1.0; n * cols];
                    dyw(&dy, n, &w, rows, cols, &mut dx, true);
                    (xwt(&x, n, &w, rows, cols), dx)
                });
                for i in 0..n {
                    for r in 0..rows {
                        let want: f32 = (0..cols).map(|c| x[i * cols + c] * w[r * cols + c]).sum();
                        assert!(
                            (y[i * rows + r] - want).abs() < 1e-4,
                            "{threads} threads, {rows} rows"
                        );
                    }
                    for c in 0..cols {
                        let want: f32 = 1.0
                            + (0..rows)
                                .map(|r| dy[i * rows + r] * w[r * cols + c])
                                .sum::<f32>();
                        assert!(
                            (dx[i * cols + c] - want).abs() < 1e-3 * want.abs().max(1.0),
                            "{threads} threads, {rows} rows"
                        );
                    }
                }
            }
        }
    }

    /// The adapters' split products against the plain one, for row counts
    /// that split unevenly and thread counts above the pieces.
    #[test]
    fn split_small_products_equal_the_plain_ones() {
        let mut rng = Rng::new(5);
        for threads in [2, 3, 7] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (n, k, r) in [(64, 9, 3), (129, 40, 8), (301, 17, 5), (1000, 6, 2)] {
                let x: Vec<f32> = (0..n * k).map(|_| rng.range(-1.0, 1.0)).collect();
                let a: Vec<f32> = (0..r * k).map(|_| rng.range(-1.0, 1.0)).collect();
                let h: Vec<f32> = (0..n * r).map(|_| rng.range(-1.0, 1.0)).collect();
                let start: Vec<f32> = (0..n * r).map(|_| rng.range(-1.0, 1.0)).collect();
                let close = |p: &[f32], q: &[f32]| {
                    p.iter()
                        .zip(q)
                        .all(|(x, y)| (x - y).abs() <= 1e-4 * x.abs().max(1.0))
                };
                // c (n × r) = 2·x·aᵀ + c, rows split.
                let (mut want, mut got) = (start.clone(), start.clone());
                let (xm, am) = (Mat::new(&x, n, k), Mat::new(&a, r, k));
                gemm(2.0, xm, am.t(), 1.0, MatMut::new(&mut want, n, r));
                pool.install(|| gemm_rows(2.0, xm, am.t(), 1.0, MatMut::new(&mut got, n, r)));
                assert!(
                    close(&want, &got),
                    "rows: {threads} threads, {n} × {k} × {r}"
                );
                // c (r × k) += 2·hᵀ·x, the inner n split.
                let start: Vec<f32> = (0..r * k).map(|_| rng.range(-1.0, 1.0)).collect();
                let (mut want, mut got) = (start.clone(), start);
                let hm = Mat::new(&h, n, r);
                gemm(2.0, hm.t(), xm, 1.0, MatMut::new(&mut want, r, k));
                pool.install(|| gemm_sum(2.0, hm.t(), xm, MatMut::new(&mut got, r, k)));
                assert!(
                    close(&want, &got),
                    "sum: {threads} threads, {n} × {k} × {r}"
                );
            }
        }
    }

    /// The strided views: a transposed product against one worked by hand.
    #[test]
    fn gemm_reads_transposes_and_column_ranges() {
        // a = [[1 2 3] [4 5 6]], b = [[1 0] [0 1] [1 1]]: a·b = [[4 5] [10 11]].
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0]; // bᵀ, 2 × 3
        let mut c = [0.0f32; 4];
        gemm(
            1.0,
            Mat::new(&a, 2, 3),
            Mat::new(&bt, 2, 3).t(),
            0.0,
            MatMut::new(&mut c, 2, 2),
        );
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
        // Columns 1..3 of a (rows 3 apart) times [[1] [1]]: [5, 11], added.
        let mut c = [1.0f32; 2];
        let ones = [1.0f32; 2];
        gemm(
            1.0,
            Mat::strided(&a[1..], 2, 2, 3),
            Mat::new(&ones, 2, 1),
            1.0,
            MatMut::new(&mut c, 2, 1),
        );
        assert_eq!(c, [6.0, 12.0]);
    }
}
