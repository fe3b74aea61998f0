//! `out = x · Wᵀ` for a quantized weight matrix W (rows × cols, each row in
//! its block format) and n rows of f32 activations, split across threads by
//! weight rows so that each core streams different weights.
//!
//! The model computes with the interleaved layout of [`crate::packed`]
//! wherever a matrix has one; this row-major path serves the rest (formats
//! without a packed form, row counts that are not a multiple of 16).

use crate::formats::*;
use crate::quant::{quantize_q8_0, quantize_q8_k};
use crate::simd::{best, DotKernels, Tiles};

/// A borrowed weight matrix: `rows` rows of `cols` elements in `format`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks that `data` holds exactly rows × cols elements of `format`.
    pub fn new(format: WeightFormat, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        if !cols.is_multiple_of(format.block_size())
            || data.len() != rows.checked_mul(format.row_bytes(cols))?
        {
            return None;
        }
        Some(QMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantize row `r` into `out` (length cols).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        crate::quant::dequantize_row(self.format, self.row(r), out)
    }
}

/// Activations of n tokens, quantized for one weight format.
#[derive(Clone, Copy)]
pub enum Acts<'a> {
    F32(&'a [f32]),
    Q8_0(&'a [BlockQ8_0]),
    Q8K(&'a [BlockQ8K]),
}

/// Reusable buffers for quantized activations (grown, never shrunk).
#[derive(Default)]
pub struct MatmulScratch {
    q8_0: Vec<BlockQ8_0>,
    q8k: Vec<BlockQ8K>,
    /// For the packed kernels (see `packed::ActRow`): per Q8_0 block
    /// −8·Σq, −16·Σq, −128·Σq, the scale as f32 and the scale times Σq; per
    /// Q8_K block −32 times each of its 16 sub-block sums.
    neg8: Vec<i32>,
    neg16: Vec<i32>,
    neg128: Vec<i32>,
    dq: Vec<f32>,
    ds: Vec<f32>,
    neg32: Vec<i32>,
}

impl MatmulScratch {
    /// Quantize `x` (n × cols) for the packed kernels of a matrix packed
    /// from `format` (see [`crate::packed::ActRow`]).
    pub(crate) fn quantize_packed<'s>(
        &'s mut self,
        format: WeightFormat,
        x: &'s [f32],
        cols: usize,
    ) -> crate::packed::ActRow<'s> {
        use crate::packed::ActRow;
        if format.act_format() == ActFormat::F32 {
            // Float weights take the activations as they are.
            return ActRow::F32 { x };
        }
        match self.quantize(format, x, cols) {
            Acts::Q8_0(_) => {
                let nb = x.len() / QK;
                self.neg8.resize(nb, 0);
                self.neg16.resize(nb, 0);
                self.neg128.resize(nb, 0);
                self.dq.resize(nb, 0.0);
                self.ds.resize(nb, 0.0);
                let (b, n8, n16, n128, d, ds) = (
                    &self.q8_0[..nb],
                    &mut self.neg8[..nb],
                    &mut self.neg16[..nb],
                    &mut self.neg128[..nb],
                    &mut self.dq[..nb],
                    &mut self.ds[..nb],
                );
                // Per block, so splitting the work cannot change a value.
                // Serial, this loop was 0.6% of pp512's perf samples on two
                // threads, all of them on one thread while the other waited.
                let chunk = SIDE_ROWS_PER_TASK * (cols / QK);
                if chunk > 0 && nb >= 2 * chunk && crate::pool::threads() > 1 {
                    let items = b
                        .chunks(chunk)
                        .zip(n8.chunks_mut(chunk))
                        .zip(n16.chunks_mut(chunk))
                        .zip(n128.chunks_mut(chunk))
                        .zip(d.chunks_mut(chunk))
                        .zip(ds.chunks_mut(chunk));
                    crate::pool::for_each_item(items, 1, &|(((((b, n8), n16), n128), d), ds)| {
                        q8_0_sides(b, [n8, n16, n128], d, ds)
                    });
                } else {
                    q8_0_sides(b, [n8, n16, n128], d, ds);
                }
                ActRow::Q8_0 {
                    blocks: &self.q8_0[..nb],
                    neg8: &self.neg8[..nb],
                    neg16: &self.neg16[..nb],
                    neg128: &self.neg128[..nb],
                    d: &self.dq[..nb],
                    ds: &self.ds[..nb],
                }
            }
            Acts::Q8K(_) => {
                let nb = x.len() / QK_K;
                self.neg32.resize(16 * nb, 0);
                for (b, n) in self.q8k[..nb].iter().zip(self.neg32.chunks_exact_mut(16)) {
                    for (n, &s) in n.iter_mut().zip(&b.bsums) {
                        *n = -32 * s as i32;
                    }
                }
                ActRow::Q8K {
                    blocks: &self.q8k[..nb],
                    neg32: &self.neg32[..16 * nb],
                }
            }
            Acts::F32(_) => unreachable!("handled above"),
        }
    }

    /// Quantize `x` (n × cols) into the activation format that `format` consumes.
    pub fn quantize<'s>(&'s mut self, format: WeightFormat, x: &'s [f32], cols: usize) -> Acts<'s> {
        match format.act_format() {
            ActFormat::F32 => Acts::F32(x),
            ActFormat::Q8_0 => {
                let nb = x.len() / QK;
                if self.q8_0.len() < nb {
                    self.q8_0.resize(nb, BlockQ8_0::default());
                }
                let blocks = &mut self.q8_0[..nb];
                debug_assert_eq!(cols % QK, 0);
                par_rows(x, blocks, cols, cols / QK, quantize_q8_0);
                Acts::Q8_0(blocks)
            }
            ActFormat::Q8K => {
                let nb = x.len() / QK_K;
                if self.q8k.len() < nb {
                    self.q8k.resize(nb, BlockQ8K::default());
                }
                let blocks = &mut self.q8k[..nb];
                par_rows(x, blocks, cols, cols / QK_K, quantize_q8_k);
                Acts::Q8K(blocks)
            }
        }
    }
}

/// Per Q8_0 activation block: −8·Σq, −16·Σq, −128·Σq, the scale as f32
/// and the scale times Σq (see `packed::ActRow`).
fn q8_0_sides(blocks: &[BlockQ8_0], neg: [&mut [i32]; 3], d: &mut [f32], ds: &mut [f32]) {
    let [neg8, neg16, neg128] = neg;
    for (i, b) in blocks.iter().enumerate() {
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        neg8[i] = -8 * sum;
        neg16[i] = -16 * sum;
        neg128[i] = -128 * sum;
        d[i] = f16_le(b.d);
        ds[i] = d[i] * sum as f32;
    }
}

/// Token rows per task of the packed activations' side sums.
const SIDE_ROWS_PER_TASK: usize = 16;

/// Quantize activation rows (each independently, so the split cannot change
/// a result), across threads when there are many.
fn par_rows<B: Send>(
    x: &[f32],
    out: &mut [B],
    cols: usize,
    blocks_per_row: usize,
    f: fn(&[f32], &mut [B]),
) {
    const ROWS_PER_TASK: usize = 16;
    if x.len() / cols.max(1) < 2 * ROWS_PER_TASK {
        return f(x, out);
    }
    let items = x
        .chunks(cols * ROWS_PER_TASK)
        .zip(out.chunks_mut(blocks_per_row * ROWS_PER_TASK));
    crate::pool::for_each_item(items, 1, &|(x, o)| f(x, o));
}

/// Dot product of weight row `r` with activation row `t` for the float
/// formats (F32, F16, BF16), which have no tables.
fn dot_float(w: &QMatrix, r: usize, acts: Acts, t: usize) -> f32 {
    match acts {
        Acts::F32(a) => {
            crate::dot::dot_float_ref(w.format, w.row(r), &a[t * w.cols..(t + 1) * w.cols])
        }
        _ => panic!("activations quantized for the wrong format ({})", w.format),
    }
}

/// Rows r0..r1 of `w` times all n activation rows, in 4×4 tiles (1-wide at
/// the edges); `put(r, t, value)` stores each result. Quantized formats go
/// through the tables' whole-range functions (one call per 1 or 4 tokens).
fn tile_rows(
    k: &DotKernels,
    w: &QMatrix,
    r0: usize,
    r1: usize,
    acts: Acts,
    n: usize,
    put: impl Fn(usize, usize, f32),
) {
    fn run<W: RawBlock, A>(
        tiles: &Tiles<W, A>,
        w: &QMatrix,
        r0: usize,
        r1: usize,
        a: &[A],
        n: usize,
        put: &impl Fn(usize, usize, f32),
    ) {
        let nb = w.cols / w.format.block_size();
        let rb = w.row_bytes();
        let rows: &[W] = as_blocks(&w.data[r0 * rb..r1 * rb]);
        let mut buf = vec![0.0f32; (r1 - r0) * 4];
        let tok = |t: usize| &a[t * nb..(t + 1) * nb];
        let mut t = 0;
        while t < n {
            if t + 4 <= n {
                (tiles.rows4)(
                    rows,
                    nb,
                    [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)],
                    &mut buf,
                );
                for (r, v) in buf.chunks_exact(4).enumerate() {
                    for (j, &x) in v.iter().enumerate() {
                        put(r0 + r, t + j, x);
                    }
                }
                t += 4;
            } else {
                (tiles.rows1)(rows, nb, [tok(t)], &mut buf);
                for (r, &x) in buf[..r1 - r0].iter().enumerate() {
                    put(r0 + r, t, x);
                }
                t += 1;
            }
        }
    }
    match (w.format, acts) {
        (WeightFormat::Q8_0, Acts::Q8_0(a)) => run(&k.q8_0, w, r0, r1, a, n, &put),
        (WeightFormat::Q4_0, Acts::Q8_0(a)) => run(&k.q4_0, w, r0, r1, a, n, &put),
        (WeightFormat::Q5_0, Acts::Q8_0(a)) => run(&k.q5_0, w, r0, r1, a, n, &put),
        (WeightFormat::Q4_1, Acts::Q8_0(a)) => run(&k.q4_1, w, r0, r1, a, n, &put),
        (WeightFormat::Q5_1, Acts::Q8_0(a)) => run(&k.q5_1, w, r0, r1, a, n, &put),
        (WeightFormat::IQ4NL, Acts::Q8_0(a)) => run(&k.iq4nl, w, r0, r1, a, n, &put),
        (WeightFormat::IQ4XS, Acts::Q8K(a)) => run(&k.iq4xs, w, r0, r1, a, n, &put),
        (WeightFormat::Q3K, Acts::Q8K(a)) => run(&k.q3k, w, r0, r1, a, n, &put),
        (WeightFormat::Q4K, Acts::Q8K(a)) => run(&k.q4k, w, r0, r1, a, n, &put),
        (WeightFormat::Q5K, Acts::Q8K(a)) => run(&k.q5k, w, r0, r1, a, n, &put),
        (WeightFormat::Q6K, Acts::Q8K(a)) => run(&k.q6k, w, r0, r1, a, n, &put),
        (f @ WeightFormat::Coded(_), Acts::Q8K(a)) => {
            // Q2_K and the lattice formats have no tables: one scalar dot
            // per (row, token), the packed kernels' definition.
            let nb = w.cols / QK_K;
            for r in r0..r1 {
                for t in 0..n {
                    let act = crate::packed::ActRow::Q8K {
                        blocks: &a[t * nb..(t + 1) * nb],
                        neg32: &[],
                    };
                    put(r, t, crate::packed::spec_dot(f, w.row(r), act));
                }
            }
        }
        _ => {
            // Float formats: one dot per (row, token).
            for r in r0..r1 {
                for t in 0..n {
                    put(r, t, dot_float(w, r, acts, t));
                }
            }
        }
    }
}

/// A raw pointer to the output that worker threads write disjoint parts of
/// (here and in `packed::matmul_packed`).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: only used to write disjoint elements from different threads (each
// weight row, or group of 16 rows, is owned by exactly one task), while the
// &mut borrow of the output is held.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Panics unless `x` is n × cols and `out` n × rows (a caller's bug).
pub(crate) fn check_shapes(x: &[f32], out: &[f32], n: usize, rows: usize, cols: usize) {
    assert_eq!(
        x.len(),
        n * cols,
        "matmul: x has {} values, expected {n} × {cols}",
        x.len()
    );
    assert_eq!(
        out.len(),
        n * rows,
        "matmul: out has {} values, expected {n} × {rows}",
        out.len()
    );
}

/// `out[t][r] = Σ_c x[t][c] · W[r][c]` for t < n, r < rows.
/// `x` is n × cols, `out` is n × rows, both row-major.
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32], scratch: &mut MatmulScratch) {
    matmul_with(best(), w, x, n, out, scratch)
}

/// [`matmul`] with an explicit kernel table (tests compare tables).
pub fn matmul_with(
    k: &DotKernels,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    check_shapes(x, out, n, w.rows, w.cols);
    let acts = scratch.quantize(w.format, x, w.cols);
    let rows = w.rows;
    // Rows per task: at least ~32 KiB of weight·token work per task so that
    // scheduling stays cheap next to it, and enough tasks to balance the
    // threads; a multiple of 4 for the 4-row tiles.
    let threads = crate::pool::threads();
    let min_rows = (32 * 1024 / (w.row_bytes() * n).max(1)).max(4);
    let chunk = ((rows / (threads * 8))
        .clamp(min_rows, 256.max(min_rows))
        .div_ceil(4)
        * 4)
    .min(rows.max(1));
    let ptr = OutPtr(out.as_mut_ptr());
    let body = |r0: usize| {
        // Capture the whole OutPtr (Send + Sync), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY (for every write below): t < n and r < rows, so the index
        // is inside `out` (n × rows, asserted above); rows r0..r1 belong to
        // this task only.
        let put = |r: usize, t: usize, v: f32| unsafe { *ptr.0.add(t * rows + r) = v };
        tile_rows(k, w, r0, r1, acts, n, put);
    };
    crate::pool::for_each_task(rows.div_ceil(chunk), &|i| body(i * chunk));
}
