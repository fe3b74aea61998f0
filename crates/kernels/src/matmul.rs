//! `out = x · Wᵀ` for a quantized weight matrix W (rows × cols, each row in
//! its block format) and n rows of f32 activations, split across threads by
//! weight rows so that each core streams different weights.

use crate::formats::*;
use crate::quant::{quantize_q8_0, quantize_q8_k};
use crate::simd::{best, DotKernels};
use rayon::prelude::*;

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
        if cols % format.block_size() != 0
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
}

impl MatmulScratch {
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
                quantize_q8_0(x, blocks);
                Acts::Q8_0(blocks)
            }
            ActFormat::Q8K => {
                let nb = x.len() / QK_K;
                if self.q8k.len() < nb {
                    self.q8k.resize(nb, BlockQ8K::default());
                }
                let blocks = &mut self.q8k[..nb];
                quantize_q8_k(x, blocks);
                Acts::Q8K(blocks)
            }
        }
    }
}

/// Dot products of weight row `r` with activation rows t0..t0+NT (NT = 1 or 4).
#[inline]
fn dot_rows<const NT: usize>(
    k: &DotKernels,
    w: &QMatrix,
    r: usize,
    acts: Acts,
    t0: usize,
) -> [f32; NT] {
    fn rows<A, const NT: usize>(a: &[A], nb: usize, t0: usize) -> [&[A]; NT] {
        std::array::from_fn(|i| &a[(t0 + i) * nb..(t0 + i + 1) * nb])
    }
    // Pick the 1- or 4-token kernel of a pair and run it.
    fn call<W, A, const NT: usize>(
        p: &crate::simd::DotPair<W, A>,
        w: &[W],
        a: [&[A]; NT],
    ) -> [f32; NT] {
        let mut out = [0.0; NT];
        if NT == 4 {
            out.copy_from_slice(&(p.1)(w, std::array::from_fn(|i| a[i])));
        } else {
            for i in 0..NT {
                out[i] = (p.0)(w, [a[i]])[0];
            }
        }
        out
    }
    let row = w.row(r);
    match (w.format, acts) {
        (WeightFormat::Q8_0, Acts::Q8_0(a)) => {
            call(&k.q8_0, as_blocks(row), rows(a, w.cols / QK, t0))
        }
        (WeightFormat::Q4_0, Acts::Q8_0(a)) => {
            call(&k.q4_0, as_blocks(row), rows(a, w.cols / QK, t0))
        }
        (WeightFormat::Q5_0, Acts::Q8_0(a)) => {
            call(&k.q5_0, as_blocks(row), rows(a, w.cols / QK, t0))
        }
        (WeightFormat::Q4K, Acts::Q8K(a)) => {
            call(&k.q4k, as_blocks(row), rows(a, w.cols / QK_K, t0))
        }
        (WeightFormat::Q5K, Acts::Q8K(a)) => {
            call(&k.q5k, as_blocks(row), rows(a, w.cols / QK_K, t0))
        }
        (WeightFormat::Q6K, Acts::Q8K(a)) => {
            call(&k.q6k, as_blocks(row), rows(a, w.cols / QK_K, t0))
        }
        (f @ (WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16), Acts::F32(a)) => {
            std::array::from_fn(|i| {
                crate::dot::dot_float_ref(f, row, &a[(t0 + i) * w.cols..(t0 + i + 1) * w.cols])
            })
        }
        (f, _) => panic!("activations quantized for the wrong format ({f})"),
    }
}

/// Dot product of weight row `r` with activation row `t` (as the matmul computes it).
pub fn dot_row(k: &DotKernels, w: &QMatrix, r: usize, acts: Acts, t: usize) -> f32 {
    dot_rows::<1>(k, w, r, acts, t)[0]
}

/// A raw pointer to the output that worker threads write disjoint parts of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used to write disjoint elements from different threads (each
// weight row r is owned by exactly one task), while the &mut borrow is held.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

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
    assert_eq!(
        x.len(),
        n * w.cols,
        "matmul: x has {} values, expected {n} × {}",
        x.len(),
        w.cols
    );
    assert_eq!(
        out.len(),
        n * w.rows,
        "matmul: out has {} values, expected {n} × {}",
        out.len(),
        w.rows
    );
    let acts = scratch.quantize(w.format, x, w.cols);
    let rows = w.rows;
    // Rows per task: enough work per task to amortise scheduling, enough
    // tasks to balance the threads.
    let threads = rayon::current_num_threads().max(1);
    let chunk = (rows / (threads * 8)).clamp(4, 256).min(rows.max(1));
    let ptr = OutPtr(out.as_mut_ptr());
    let body = |r0: usize| {
        let ptr = ptr;
        let r1 = (r0 + chunk).min(rows);
        for r in r0..r1 {
            let mut t = 0;
            while t + 4 <= n {
                let v = dot_rows::<4>(k, w, r, acts, t);
                for (i, v) in v.into_iter().enumerate() {
                    // SAFETY: t + i < n and r < rows, so the index is inside
                    // `out` (n × rows, asserted above); row r belongs to this task only.
                    unsafe { *ptr.0.add((t + i) * rows + r) = v };
                }
                t += 4;
            }
            while t < n {
                let v = dot_rows::<1>(k, w, r, acts, t)[0];
                // SAFETY: as above.
                unsafe { *ptr.0.add(t * rows + r) = v };
                t += 1;
            }
        }
    };
    if threads == 1 || rows <= chunk {
        (0..rows).step_by(chunk.max(1)).for_each(body);
    } else {
        (0..rows).into_par_iter().step_by(chunk).for_each(body);
    }
}
