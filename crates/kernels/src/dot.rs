//! Scalar reference dot products: one weight row (in its block format) with
//! one row of activations (in the format [`WeightFormat::act_format`] names).
//! Integer sums inside a block are exact, so the SIMD versions agree with
//! these up to the order of the final f32 additions.
//!
//! ref: ggml-cpu/quants.c ggml_vec_dot_*_generic.

use crate::formats::*;
use crate::quant::{q3_k_unpack, q4_1_unpack, q5_0_unpack, q5_1_unpack, q6_k_unpack};
use half::{bf16, f16};

pub fn dot_q8_0_ref(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let s: i32 =
            x.qs.iter()
                .zip(y.qs.iter())
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sum += s as f32 * (f16_le(x.d) * f16_le(y.d));
    }
    sum
}

pub fn dot_q4_0_ref(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += ((x.qs[j] & 0x0F) as i32 - 8) * y.qs[j] as i32;
            s += ((x.qs[j] >> 4) as i32 - 8) * y.qs[j + QK / 2] as i32;
        }
        sum += s as f32 * (f16_le(x.d) * f16_le(y.d));
    }
    sum
}

pub fn dot_q5_0_ref(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (lo, hi) = q5_0_unpack(x);
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += lo[j] as i32 * y.qs[j] as i32 + hi[j] as i32 * y.qs[j + QK / 2] as i32;
        }
        sum += s as f32 * (f16_le(x.d) * f16_le(y.d));
    }
    sum
}

pub fn dot_iq4nl_ref(w: &[BlockIQ4NL], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += KVALUES_IQ4NL[(x.qs[j] & 0x0F) as usize] as i32 * y.qs[j] as i32;
            s += KVALUES_IQ4NL[(x.qs[j] >> 4) as usize] as i32 * y.qs[j + QK / 2] as i32;
        }
        sum = (f16_le(x.d) * f16_le(y.d)).mul_add(s as f32, sum);
    }
    sum
}

/// Q3_K: S = Σ_j sc_j·Σ q·y over the 16 sub-blocks of 16 in exact
/// integers, then `sum = fma(d·dy, S, sum)` (as the packed kernels, which
/// run it in Q6_K's form).
pub fn dot_q3k_ref(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (q, sc) = q3_k_unpack(x);
        let mut s = 0i32;
        for (j, &sc) in sc.iter().enumerate() {
            let is: i32 = (16 * j..16 * j + 16)
                .map(|k| q[k] as i32 * y.qs[k] as i32)
                .sum();
            s += sc as i32 * is;
        }
        sum = (f16_le(x.d) * y.d).mul_add(s as f32, sum);
    }
    sum
}

/// IQ4_XS: S = Σ_j (ls_j − 32)·Σ kv(q)·y in exact integers, then
/// `sum = fma(d·dy, S, sum)` per super-block.
pub fn dot_iq4xs_ref(w: &[BlockIQ4XS], a: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..8 {
            let mut is = 0i32;
            for l in 0..16 {
                let q = x.qs[16 * j + l];
                is += KVALUES_IQ4NL[(q & 0x0F) as usize] as i32 * y.qs[32 * j + l] as i32;
                is += KVALUES_IQ4NL[(q >> 4) as usize] as i32 * y.qs[32 * j + 16 + l] as i32;
            }
            s += x.scale(j) * is;
        }
        sum = (f16_le(x.d) * y.d).mul_add(s as f32, sum);
    }
    sum
}

/// Q4_1 / Q5_1 (`x = d·q + m`, q unsigned): per block
/// `sum = fma(dw·dy, Σq·y, sum)`, then `sum = fma(m, dy·Σy, sum)` (dy·Σy is
/// exact: ggml's block_q8_1 stores it rounded to f16 instead). The packed
/// kernels' definition (`packed::spec_dot`) is the same.
fn dot_min_ref(blocks: impl Iterator<Item = ([u8; 2], [u8; 2], [u8; QK])>, a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for ((d, m, q), y) in blocks.zip(a) {
        let s: i32 = q
            .iter()
            .zip(&y.qs)
            .map(|(&p, &v)| p as i32 * v as i32)
            .sum();
        let sy: i32 = y.qs.iter().map(|&v| v as i32).sum();
        let dy = f16_le(y.d);
        sum = (f16_le(d) * dy).mul_add(s as f32, sum);
        sum = f16_le(m).mul_add(dy * sy as f32, sum);
    }
    sum
}

pub fn dot_q4_1_ref(w: &[BlockQ4_1], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    dot_min_ref(w.iter().map(|x| (x.d, x.m, q4_1_unpack(x))), a)
}

pub fn dot_q5_1_ref(w: &[BlockQ5_1], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    dot_min_ref(w.iter().map(|x| (x.d, x.m, q5_1_unpack(x))), a)
}

/// Sum over the 8 sub-blocks of `scale_j * Σ q·q8` and of `min_j * Σ q8`.
#[inline]
fn kquant_sums(scales: &[u8; 12], q: &[u8; QK_K], y: &BlockQ8K) -> (i32, i32) {
    let (mut s, mut m) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, mn) = scale_min_k4(j, scales);
        let d: i32 = q[32 * j..32 * j + 32]
            .iter()
            .zip(&y.qs[32 * j..32 * j + 32])
            .map(|(&p, &q)| p as i32 * q as i32)
            .sum();
        s += sc as i32 * d;
        m += mn as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
    }
    (s, m)
}

pub fn dot_q4k_ref(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        // Unpack to element order: chunk c of 64 = low nibbles then high nibbles.
        let mut q = [0u8; QK_K];
        for c in 0..4 {
            for l in 0..32 {
                q[64 * c + l] = x.qs[32 * c + l] & 0x0F;
                q[64 * c + 32 + l] = x.qs[32 * c + l] >> 4;
            }
        }
        let (s, m) = kquant_sums(&x.scales, &q, y);
        sum += f16_le(x.d) * y.d * s as f32 - f16_le(x.dmin) * y.d * m as f32;
    }
    sum
}

pub fn dot_q5k_ref(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut q = [0u8; QK_K];
        for c in 0..4 {
            let (u0, u1) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let h0 = if x.qh[l] & u0 != 0 { 16 } else { 0 };
                let h1 = if x.qh[l] & u1 != 0 { 16 } else { 0 };
                q[64 * c + l] = (x.qs[32 * c + l] & 0x0F) + h0;
                q[64 * c + 32 + l] = (x.qs[32 * c + l] >> 4) + h1;
            }
        }
        let (s, m) = kquant_sums(&x.scales, &q, y);
        sum += f16_le(x.d) * y.d * s as f32 - f16_le(x.dmin) * y.d * m as f32;
    }
    sum
}

pub fn dot_q6k_ref(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let q = q6_k_unpack(x);
        let mut s = 0i32;
        for j in 0..QK_K / 16 {
            let d: i32 = q[16 * j..16 * j + 16]
                .iter()
                .zip(&y.qs[16 * j..16 * j + 16])
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
            s += x.scales[j] as i32 * d;
        }
        sum += f16_le(x.d) * y.d * s as f32;
    }
    sum
}

/// Float weight formats (F32, F16, BF16) against f32 activations.
pub fn dot_float_ref(format: WeightFormat, w: &[u8], a: &[f32]) -> f32 {
    match format {
        WeightFormat::F32 => w
            .chunks_exact(4)
            .zip(a)
            .map(|(c, &y)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * y)
            .sum(),
        WeightFormat::F16 => w
            .chunks_exact(2)
            .zip(a)
            .map(|(c, &y)| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * y)
            .sum(),
        WeightFormat::BF16 => w
            .chunks_exact(2)
            .zip(a)
            .map(|(c, &y)| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * y)
            .sum(),
        other => panic!("dot_float_ref called with quantized format {other}"),
    }
}
