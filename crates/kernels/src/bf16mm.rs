//! bf16 matrix products for training: `out (+)= x · Mᵀ`, with x in f32
//! rounded to bf16 on the way in, M rounded to bf16 once and laid out in
//! column panels, and the sums kept in f32.
//!
//! Training multiplies the same frozen matrices (each layer's W forward and
//! Wᵀ backward, the output head both ways) thousands of times. Packed once,
//! they need no packing per product, take half the bytes of f32, and feed
//! AVX-512 BF16's `vdpbf16ps`, which does two multiply-adds per f32 lane
//! where an FMA does one (measured on the Zen 4: about 2× the f32 FMA rate).
//! The price is bf16's 8-bit significand on both operands, as in mixed-
//! precision training: products of bf16 values are exact in f32, and the
//! sums are f32's.
//!
//! [`product`] runs the AVX-512 BF16 kernel where the CPU has it
//! ([`available`]), and otherwise [`product_ref`], the scalar twin: the same
//! roundings and the same order of additions (per output: its pairs in
//! order, each pair's odd product added before its even one, as Intel
//! defines `vdpbf16ps`), so that the two agree bit for bit on normal
//! numbers (the instructions flush subnormal ones to zero).

use half::bf16;
use rayon::prelude::*;

/// Output columns per panel: one 512-bit register of f32 sums.
pub const PANEL: usize = 16;

/// A matrix M (n × k: n outputs, each a dot product over k) rounded to bf16
/// and laid out for [`product`]: panels of [`PANEL`] rows of M, each panel
/// the pairs (`M[c][2q]`, `M[c][2q + 1]`) of its rows c for q = 0, 1, …, one
/// 32-bit word per row (even element in the low half), [`PANEL`] words per
/// pair. Rows past n and the odd k's last element are zeros.
pub struct Panels {
    n: usize,
    k: usize,
    data: Vec<u32>,
}

/// Two bf16 values (round to nearest even) in one word, `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
}

impl Panels {
    /// M given row by row: `m` is n × k, row-major.
    pub fn from_rows(m: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(m.len(), n * k, "an n × k matrix");
        Self::build(n, k, |c, q| {
            let row = &m[c * k..(c + 1) * k];
            (row[2 * q], row.get(2 * q + 1).copied().unwrap_or(0.0))
        })
    }

    /// M = Wᵀ for W given row by row: `w` is k × n, row-major (a layer's
    /// weights for the backward product `dy · W`).
    pub fn from_columns(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), n * k, "a k × n matrix");
        Self::build(n, k, |c, q| {
            let hi = if 2 * q + 1 < k {
                w[(2 * q + 1) * n + c]
            } else {
                0.0
            };
            (w[2 * q * n + c], hi)
        })
    }

    fn build(n: usize, k: usize, at: impl Fn(usize, usize) -> (f32, f32) + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(PANEL) * pairs * PANEL];
        data.par_chunks_mut((pairs * PANEL).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for (q, lanes) in panel.chunks_mut(PANEL).enumerate() {
                    for (lane, word) in lanes.iter_mut().enumerate() {
                        let c = p * PANEL + lane;
                        if c < n {
                            let (lo, hi) = at(c, q);
                            *word = pair(lo, hi);
                        }
                    }
                }
            });
        Panels { n, k, data }
    }

    /// Outputs (M's rows).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The dot products' length (M's columns).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }

    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// `M[c][j]` as the products read it (rounded to bf16).
    pub fn get(&self, c: usize, j: usize) -> f32 {
        let w = self.data[(c / PANEL * self.pairs() + j / 2) * PANEL + c % PANEL];
        bf16::from_bits((w >> (16 * (j % 2))) as u16).to_f32()
    }
}

/// Whether [`product`] has the AVX-512 BF16 kernel on this CPU (and
/// `GEMMA3_FORCE_SCALAR` does not ask for the scalar paths).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !crate::simd::force_scalar()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[r][c] (+)= Σ_j x[r][j] · M[c][j]` for `rows` rows of x (each
/// `m.k()` long) and `out` rows × `m.n()`, both row-major; `accumulate`:
/// added to out, else written over it. The threads of rayon's pool take
/// ranges of output columns.
pub fn product(x: &[f32], rows: usize, m: &Panels, out: &mut [f32], accumulate: bool) {
    check(x, rows, m, out);
    if rows == 0 || m.n == 0 {
        return;
    }
    if m.k == 0 {
        // Empty sums (the kernel takes at least one pair).
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (`available`), and
        // `check` has bounded every index the kernel takes.
        unsafe { x86::product(x, rows, m, out, accumulate) };
        return;
    }
    product_ref(x, rows, m, out, accumulate);
}

fn check(x: &[f32], rows: usize, m: &Panels, out: &mut [f32]) {
    assert_eq!(Some(x.len()), rows.checked_mul(m.k), "x is rows × k");
    assert_eq!(Some(out.len()), rows.checked_mul(m.n), "out is rows × n");
}

/// [`product`]'s scalar twin (one thread), equal to it bit for bit.
pub fn product_ref(x: &[f32], rows: usize, m: &Panels, out: &mut [f32], accumulate: bool) {
    check(x, rows, m, out);
    let (k, pairs) = (m.k, m.pairs());
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let xb: Vec<u32> = (0..pairs)
            .map(|q| pair(xr[2 * q], xr.get(2 * q + 1).copied().unwrap_or(0.0)))
            .collect();
        for c in 0..m.n {
            let o = &mut out[r * m.n + c];
            let mut t = if accumulate { *o } else { 0.0 };
            let panel = &m.data[c / PANEL * pairs * PANEL..];
            for (q, &xq) in xb.iter().enumerate() {
                let w = panel[q * PANEL + c % PANEL];
                let half = |v: u32, s: u32| bf16::from_bits((v >> s) as u16).to_f32();
                t += half(xq, 16) * half(w, 16);
                t += half(xq, 0) * half(w, 0);
            }
            *o = t;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #![allow(clippy::needless_range_loop)] // registers indexed by row and panel
    use super::{Panels, PANEL};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Rows of x per tile.
    const R: usize = 6;
    /// Panels per tile: 6 × 4 sums, 4 weight registers and a broadcast.
    const C: usize = 4;
    /// Pairs per pass over a tile's panels: 384 × 4 panels × 64 bytes,
    /// 96 KB of weights, stay in L2 while every row block goes by.
    const KC: usize = 384;

    /// A pointer the threads share, each writing only its own columns.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: the threads of `product` write disjoint column ranges.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    /// See [`super::product`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn product(
        x: &[f32],
        rows: usize,
        m: &Panels,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let pairs = m.pairs();
        // x's rows as bf16 pairs, padded to whole pairs.
        let mut xb = vec![0u32; rows * pairs];
        for (src, dst) in x.chunks_exact(m.k).zip(xb.chunks_exact_mut(pairs)) {
            to_pairs(src, dst);
        }
        let groups = m.panels().div_ceil(C);
        let threads = rayon::current_num_threads().min(groups).max(1);
        let per = groups.div_ceil(threads);
        let o = Out(out.as_mut_ptr());
        let xb = &xb;
        (0..groups.div_ceil(per)).into_par_iter().for_each(|t| {
            let g = t * per..(groups.min((t + 1) * per));
            // SAFETY: as product's; this thread's panels are its own columns.
            unsafe {
                columns(
                    xb,
                    rows,
                    m,
                    g.start * C..(g.end * C).min(m.panels()),
                    o,
                    accumulate,
                )
            }
        });
    }

    /// x's row (k floats) as bf16 pairs (round to nearest even; the odd
    /// k's last pair zero-padded).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn to_pairs(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        let mut j = 0;
        while j < k {
            let lo = (k - j).min(16);
            let hi = (k - j).saturating_sub(16).min(16);
            let a = _mm512_maskz_loadu_ps(mask(lo), src.as_ptr().add(j));
            let b = _mm512_maskz_loadu_ps(mask(hi), src.as_ptr().add(j + 16.min(k - j)));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let words = (lo + hi).div_ceil(2);
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(j / 2) as *mut i32, mask(words), v);
            j += 32;
        }
    }

    fn mask(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// Output columns of `panels` (a range of panel indices) for every row.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn columns(
        xb: &[u32],
        rows: usize,
        m: &Panels,
        panels: std::ops::Range<usize>,
        out: Out,
        accumulate: bool,
    ) {
        let pairs = m.pairs();
        let mut q0 = 0;
        while q0 < pairs {
            let kc = KC.min(pairs - q0);
            let load = accumulate || q0 > 0;
            let mut p = panels.start;
            while p < panels.end {
                let c = C.min(panels.end - p);
                let mut masks = [0u16; C];
                for i in 0..c {
                    masks[i] = mask(m.n - (p + i) * PANEL);
                }
                let w = m.data.as_ptr().add((p * pairs + q0) * PANEL);
                let mut r0 = 0;
                while r0 < rows {
                    let r = R.min(rows - r0);
                    let x = xb.as_ptr().add(r0 * pairs + q0);
                    let o = out.0.add(r0 * m.n + p * PANEL);
                    let t = Tile {
                        x,
                        xs: pairs,
                        w,
                        ws: pairs * PANEL,
                        kc,
                        o,
                        os: m.n,
                        masks,
                        load,
                    };
                    dispatch(r, c, &t);
                    r0 += R;
                }
                p += C;
            }
            q0 += kc;
        }
    }

    /// One tile's operands: x's rows from pair q0 (stride `xs` words), its
    /// panels from pair q0 (stride `ws`), `kc` pairs, and its sums at `o`
    /// (row stride `os`), `masks` the valid lanes of each panel's columns.
    struct Tile {
        x: *const u32,
        xs: usize,
        w: *const u32,
        ws: usize,
        kc: usize,
        o: *mut f32,
        os: usize,
        masks: [u16; C],
        load: bool,
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dispatch(r: usize, c: usize, t: &Tile) {
        macro_rules! by_c {
            ($r:literal) => {
                match c {
                    1 => tile::<$r, 1>(t),
                    2 => tile::<$r, 2>(t),
                    3 => tile::<$r, 3>(t),
                    _ => tile::<$r, 4>(t),
                }
            };
        }
        match r {
            1 => by_c!(1),
            2 => by_c!(2),
            3 => by_c!(3),
            4 => by_c!(4),
            5 => by_c!(5),
            _ => by_c!(6),
        }
    }

    /// NR rows × NC panels: per pair, NC weight registers and one broadcast
    /// per row, NR × NC `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const NR: usize, const NC: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); NC]; NR];
        if t.load {
            for r in 0..NR {
                for c in 0..NC {
                    acc[r][c] = _mm512_maskz_loadu_ps(t.masks[c], t.o.add(r * t.os + c * PANEL));
                }
            }
        }
        for q in 0..t.kc {
            let mut w = [_mm512_setzero_si512(); NC];
            for c in 0..NC {
                w[c] = _mm512_loadu_si512(t.w.add(c * t.ws + q * PANEL) as *const _);
            }
            for r in 0..NR {
                let b = _mm512_set1_epi32(*t.x.add(r * t.xs + q) as i32);
                for c in 0..NC {
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], bh(w[c]), bh(b));
                }
            }
        }
        for r in 0..NR {
            for c in 0..NC {
                _mm512_mask_storeu_ps(t.o.add(r * t.os + c * PANEL), t.masks[c], acc[r][c]);
            }
        }
    }

    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits of plain data.
        unsafe { std::mem::transmute(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Shapes with every remainder: rows not a multiple of the tile's 6,
    /// panels not of 4, n not of 16, an odd k, k past one pass of pairs, k = 0.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 16, 2),
        (7, 37, 33),
        (13, 100, 640),
        (6, 64, 1001),
        (25, 80, 1536),
        (3, 5, 7),
        (2, 3, 0),
    ];

    #[test]
    fn simd_equals_the_scalar_twin_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        let mut seed = 7;
        for (rows, n, k) in SHAPES {
            let x = rand(rows * k, &mut seed);
            let m = Panels::from_rows(&rand(n * k, &mut seed), n, k);
            for accumulate in [false, true] {
                let start = rand(rows * n, &mut seed);
                let (mut a, mut b) = (start.clone(), start);
                product(&x, rows, &m, &mut a, accumulate);
                product_ref(&x, rows, &m, &mut b, accumulate);
                let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{rows} × {n} × {k}, accumulate {accumulate}");
            }
        }
    }

    /// Against f64 sums of the bf16-rounded operands: the roundings are
    /// bf16's, the sums f32's (and each operand's error at most 2⁻⁹).
    #[test]
    fn products_are_dot_products_of_rounded_operands() {
        let mut seed = 11;
        for (rows, n, k) in SHAPES {
            let (x, mf) = (rand(rows * k, &mut seed), rand(n * k, &mut seed));
            let m = Panels::from_rows(&mf, n, k);
            let t = Panels::from_columns(&transpose(&mf, n, k), k, n);
            let mut out = vec![0.0; rows * n];
            product(&x, rows, &m, &mut out, false);
            let mut out_t = vec![0.0; rows * n];
            product(&x, rows, &t, &mut out_t, false);
            assert_eq!(out, out_t, "from_columns lays out the transpose");
            let round = |v: f32| bf16::from_f32(v).to_f32() as f64;
            for r in 0..rows {
                for c in 0..n {
                    let (mut exact, mut rounded, mut mass) = (0.0, 0.0, 0.0);
                    for j in 0..k {
                        let (a, b) = (x[r * k + j] as f64, mf[c * k + j] as f64);
                        exact += a * b;
                        rounded += round(a as f32) * round(b as f32);
                        mass += (a * b).abs();
                        assert_eq!(m.get(c, j) as f64, round(b as f32));
                    }
                    let got = out[r * n + c] as f64;
                    let tol = 1e-6 * mass + 1e-6;
                    assert!((got - rounded).abs() <= tol, "{got} vs {rounded}");
                    assert!((got - exact).abs() <= 2.0 * 2f64.powi(-8) * mass + tol);
                }
            }
        }
    }

    fn transpose(m: &[f32], n: usize, k: usize) -> Vec<f32> {
        (0..k * n).map(|i| m[(i % n) * k + i / n]).collect()
    }
}
