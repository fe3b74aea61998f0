//! Dequantization of every weight format, and quantization of activations
//! (and of weights, for tests and writers) — the scalar references.
//!
//! ref: ggml/src/ggml-quants.c (dequantize_row_*, quantize_row_*_ref).

use crate::formats::*;
use half::{bf16, f16};
use std::sync::OnceLock;

/// Dequantize one row of `out.len()` elements stored in `format`.
/// `bytes` must hold exactly `format.row_bytes(out.len())` bytes.
pub fn dequantize_row(format: WeightFormat, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        format.row_bytes(out.len()),
        "dequantize_row: byte length mismatch"
    );
    match format {
        WeightFormat::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightFormat::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        WeightFormat::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        WeightFormat::Q8_0 => {
            for (b, o) in as_blocks::<BlockQ8_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_le(b.d);
                for (o, &q) in o.iter_mut().zip(b.qs.iter()) {
                    *o = d * q as f32;
                }
            }
        }
        WeightFormat::Q4_0 => {
            for (b, o) in as_blocks::<BlockQ4_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_le(b.d);
                for j in 0..QK / 2 {
                    o[j] = d * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
                    o[j + QK / 2] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        WeightFormat::Q5_0 => {
            for (b, o) in as_blocks::<BlockQ5_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_le(b.d);
                let (lo, hi) = q5_0_unpack(b);
                for j in 0..QK / 2 {
                    o[j] = d * lo[j] as f32;
                    o[j + QK / 2] = d * hi[j] as f32;
                }
            }
        }
        WeightFormat::Q4_1 => {
            for (b, o) in as_blocks::<BlockQ4_1>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                // d·q is exact in f32 (11 × 4 bits): one rounding, as ggml and gguf-py.
                let (d, m) = (f16_le(b.d), f16_le(b.m));
                for (o, q) in o.iter_mut().zip(q4_1_unpack(b)) {
                    *o = d * q as f32 + m;
                }
            }
        }
        WeightFormat::Q5_1 => {
            for (b, o) in as_blocks::<BlockQ5_1>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                let (d, m) = (f16_le(b.d), f16_le(b.m));
                for (o, q) in o.iter_mut().zip(q5_1_unpack(b)) {
                    *o = d * q as f32 + m;
                }
            }
        }
        WeightFormat::IQ4NL => {
            for (b, o) in as_blocks::<BlockIQ4NL>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_le(b.d);
                for j in 0..QK / 2 {
                    o[j] = d * KVALUES_IQ4NL[(b.qs[j] & 0x0F) as usize] as f32;
                    o[j + QK / 2] = d * KVALUES_IQ4NL[(b.qs[j] >> 4) as usize] as f32;
                }
            }
        }
        WeightFormat::IQ4XS => {
            for (b, o) in as_blocks::<BlockIQ4XS>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK_K))
            {
                let d = f16_le(b.d);
                for j in 0..8 {
                    let dl = d * b.scale(j) as f32;
                    let (q, o) = (&b.qs[16 * j..16 * j + 16], &mut o[32 * j..32 * j + 32]);
                    for l in 0..16 {
                        o[l] = dl * KVALUES_IQ4NL[(q[l] & 0x0F) as usize] as f32;
                        o[l + 16] = dl * KVALUES_IQ4NL[(q[l] >> 4) as usize] as f32;
                    }
                }
            }
        }
        WeightFormat::Q3K => {
            for (b, o) in as_blocks::<BlockQ3K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK_K))
            {
                let d = f16_le(b.d);
                let (q, sc) = q3_k_unpack(b);
                for (i, o) in o.chunks_exact_mut(16).enumerate() {
                    let dl = d * sc[i] as f32;
                    for (o, &q) in o.iter_mut().zip(&q[16 * i..16 * i + 16]) {
                        *o = dl * q as f32;
                    }
                }
            }
        }
        WeightFormat::Q4K => {
            for (b, o) in as_blocks::<BlockQ4K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK_K))
            {
                let d = f16_le(b.d);
                let dmin = f16_le(b.dmin);
                // 4 chunks of 64: low nibbles are sub-block 2c, high nibbles 2c+1.
                for c in 0..4 {
                    let q = &b.qs[32 * c..32 * c + 32];
                    let (s0, m0) = scale_min_k4(2 * c, &b.scales);
                    let (s1, m1) = scale_min_k4(2 * c + 1, &b.scales);
                    let (d0, dm0) = (d * s0 as f32, dmin * m0 as f32);
                    let (d1, dm1) = (d * s1 as f32, dmin * m1 as f32);
                    for l in 0..32 {
                        o[64 * c + l] = d0 * (q[l] & 0x0F) as f32 - dm0;
                        o[64 * c + 32 + l] = d1 * (q[l] >> 4) as f32 - dm1;
                    }
                }
            }
        }
        WeightFormat::Q5K => {
            for (b, o) in as_blocks::<BlockQ5K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK_K))
            {
                let d = f16_le(b.d);
                let dmin = f16_le(b.dmin);
                for c in 0..4 {
                    let q = &b.qs[32 * c..32 * c + 32];
                    let (s0, m0) = scale_min_k4(2 * c, &b.scales);
                    let (s1, m1) = scale_min_k4(2 * c + 1, &b.scales);
                    let (d0, dm0) = (d * s0 as f32, dmin * m0 as f32);
                    let (d1, dm1) = (d * s1 as f32, dmin * m1 as f32);
                    let (u0, u1) = (1u8 << (2 * c), 2u8 << (2 * c));
                    for l in 0..32 {
                        let h0 = if b.qh[l] & u0 != 0 { 16 } else { 0 };
                        let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                        o[64 * c + l] = d0 * ((q[l] & 0x0F) + h0) as f32 - dm0;
                        o[64 * c + 32 + l] = d1 * ((q[l] >> 4) + h1) as f32 - dm1;
                    }
                }
            }
        }
        WeightFormat::Q6K => {
            for (b, o) in as_blocks::<BlockQ6K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(QK_K))
            {
                let d = f16_le(b.d);
                let q = q6_k_unpack(b);
                for (i, (o, &q)) in o.iter_mut().zip(q.iter()).enumerate() {
                    *o = d * b.scales[i / 16] as f32 * q as f32;
                }
            }
        }
        WeightFormat::Coded(f) => {
            for (b, o) in bytes
                .chunks_exact(f.block_bytes())
                .zip(out.chunks_exact_mut(QK_K))
            {
                crate::coded::dequantize_block(f, b, o);
            }
        }
    }
}

/// Q5_0 quants as signed values in -16..=15: (elements 0..16, elements 16..32).
#[inline]
pub fn q5_0_unpack(b: &BlockQ5_0) -> ([i8; 16], [i8; 16]) {
    let qh = u32::from_le_bytes(b.qh);
    let mut lo = [0i8; 16];
    let mut hi = [0i8; 16];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        lo[j] = ((b.qs[j] & 0x0F) | h0) as i8 - 16;
        hi[j] = ((b.qs[j] >> 4) | h1) as i8 - 16;
    }
    (lo, hi)
}

/// Q4_1 quants (0..16) in element order: element j < 16 is the low nibble
/// of `qs[j]`, element j + 16 its high nibble.
#[inline]
pub fn q4_1_unpack(b: &BlockQ4_1) -> [u8; QK] {
    std::array::from_fn(|k| {
        if k < 16 {
            b.qs[k] & 0x0F
        } else {
            b.qs[k - 16] >> 4
        }
    })
}

/// Q5_1 quants (0..32) in element order: Q4_1's nibbles plus bit k of the
/// little-endian u32 `qh` as element k's fifth bit.
#[inline]
pub fn q5_1_unpack(b: &BlockQ5_1) -> [u8; QK] {
    let qh = u32::from_le_bytes(b.qh);
    std::array::from_fn(|k| {
        let lo = if k < 16 {
            b.qs[k] & 0x0F
        } else {
            b.qs[k - 16] >> 4
        };
        lo | (((qh >> k) & 1) << 4) as u8
    })
}

/// Q3_K's quants (−4..=3) in element order and its 16 sub-block scales
/// (sc − 32, −32..=31). Element 128h + 32j + l (l < 32) takes bits 2j..2j+2
/// of `qs[32h + l]` and, as its high bit, bit 4h + j of `hmask[l]`: set means
/// q = low bits, clear q = low bits − 4. Scale i's low 4 bits are nibble
/// i / 8 of byte i % 8, its high 2 bits bits 2(i / 4) of byte 8 + i % 4.
/// ref: ggml-quants.c dequantize_row_q3_K.
#[inline]
pub fn q3_k_unpack(b: &BlockQ3K) -> ([i8; QK_K], [i8; 16]) {
    let mut q = [0i8; QK_K];
    for (e, q) in q.iter_mut().enumerate() {
        let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = (b.qs[32 * h + l] >> (2 * j)) & 3;
        let high = (b.hmask[l] >> (4 * h + j)) & 1;
        *q = low as i8 - if high == 1 { 0 } else { 4 };
    }
    let sc = std::array::from_fn(|i| {
        let low = (b.scales[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (b.scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | high << 4) as i8 - 32
    });
    (q, sc)
}

/// Q6_K quants as signed values in -32..=31, in element order. Element
/// 128n + 32k + l takes its low 4 bits from ql[64n + l + 32(k&1)] (low nibble
/// for k < 2, high for k >= 2) and its high 2 bits from qh[32n + l] >> 2k.
#[inline]
pub fn q6_k_unpack(b: &BlockQ6K) -> [i8; QK_K] {
    let mut out = [0i8; QK_K];
    for n in 0..2 {
        let ql = &b.ql[64 * n..64 * n + 64];
        let qh = &b.qh[32 * n..32 * n + 32];
        let o = &mut out[128 * n..128 * n + 128];
        for l in 0..32 {
            o[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    out
}

/// Round to nearest, ties to even, for |x| < 2^22 (activation quants are
/// within ±128): adding 1.5·2^23 leaves no fraction bits, so the FPU's
/// default rounding does the work (ggml's `nearest_int`). `f32::round_ties_even`
/// would be a libm call on baseline x86-64.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Quantize activations to ggml block_q8_0, rounding as ggml's AVX path does
/// (scale 127/amax, round half to even), so our integer sums equal llama.cpp's.
/// The scalar reference of [`quantize_q8_0`].
///
/// A block holding a NaN gets a NaN scale (and zero quants), so that the
/// NaN reaches every product it takes part in, and so the logits: read as
/// 0, as the rounding alone would, it let a damaged weight give a
/// plausible wrong answer instead of an error. (The SIMD versions send
/// such a block here: a NaN rounds to −128, which they refer to this one.)
pub fn quantize_q8_0_ref(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_q8_0: length mismatch");
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        if xb.iter().any(|v| v.is_nan()) {
            *b = BlockQ8_0 {
                d: f16::NAN.to_bits().to_le_bytes(),
                qs: [0; QK],
            };
            continue;
        }
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d).to_bits().to_le_bytes();
        for (q, &v) in b.qs.iter_mut().zip(xb.iter()) {
            *q = round_even(v * id) as i8;
        }
    }
}

/// Quantize activations to ggml block_q8_K.
/// ref: ggml-quants.c quantize_row_q8_K_ref (scale -127/max, nearest_int).
/// The scalar reference of [`quantize_q8_k`].
/// A block holding a NaN gets a NaN scale, as in [`quantize_q8_0_ref`].
pub fn quantize_q8_k_ref(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "quantize_q8_k: length mismatch");
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        if xb.iter().any(|v| v.is_nan()) {
            *b = BlockQ8K {
                d: f32::NAN,
                ..BlockQ8K::default()
            };
            continue;
        }
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xb.iter()) {
            *q = (round_even(iscale * v) as i32).min(127) as i8;
        }
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// A set of activation quantizers; every one gives the bytes of the scalar
/// references, bit for bit, for every input.
#[derive(Clone, Copy)]
pub struct ActQuantizers {
    pub name: &'static str,
    /// The kernel tables this set goes with (see [`crate::simd::Level`]).
    pub level: crate::simd::Level,
    pub q8_0: fn(&[f32], &mut [BlockQ8_0]),
    pub q8_k: fn(&[f32], &mut [BlockQ8K]),
}

/// The scalar references.
pub const ACT_QUANT_SCALAR: ActQuantizers = ActQuantizers {
    name: "scalar",
    level: crate::simd::Level::Scalar,
    q8_0: quantize_q8_0_ref,
    q8_k: quantize_q8_k_ref,
};

/// Every activation quantizer set this machine can run, scalar first,
/// fastest last.
pub fn act_quantizers_available() -> Vec<ActQuantizers> {
    #[allow(unused_mut)]
    let mut v = vec![ACT_QUANT_SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        use crate::quant_x86 as x;
        if x::avx2_available() {
            v.push(ActQuantizers {
                name: "avx2",
                level: crate::simd::Level::Avx2,
                q8_0: x::quantize_q8_0_avx2,
                q8_k: x::quantize_q8_k_avx2,
            });
        }
        if x::avx512_available() {
            v.push(ActQuantizers {
                name: "avx512",
                level: crate::simd::Level::Avx512,
                q8_0: x::quantize_q8_0_avx512,
                q8_k: x::quantize_q8_k_avx512,
            });
        }
    }
    v
}

/// The activation quantizers of [`crate::simd::level`], chosen once (the
/// scalar references under `GEMMA3_FORCE_SCALAR=1`).
pub fn act_quantizers() -> &'static ActQuantizers {
    static BEST: OnceLock<ActQuantizers> = OnceLock::new();
    BEST.get_or_init(|| act_quantizers_for(crate::simd::level()))
}

/// The activation quantizers a kernel table of `level` goes with: this
/// CPU's set of that level (the scalar one if it has none).
pub fn act_quantizers_for(level: crate::simd::Level) -> ActQuantizers {
    act_quantizers_available()
        .into_iter()
        .find(|q| q.level == level)
        .unwrap_or(ACT_QUANT_SCALAR)
}

/// Quantize activations to ggml block_q8_0: [`quantize_q8_0_ref`]'s bytes,
/// by the fastest code this CPU runs.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_q8_0: length mismatch");
    (act_quantizers().q8_0)(x, out)
}

/// Quantize activations to ggml block_q8_K: [`quantize_q8_k_ref`]'s bytes,
/// by the fastest code this CPU runs.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "quantize_q8_k: length mismatch");
    (act_quantizers().q8_k)(x, out)
}

/// Quantize weights to Q8_0 (ggml quantize_row_q8_0_ref: d = amax/127, roundf).
pub fn quantize_weights_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for xb in x.chunks_exact(QK) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(xb.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// Quantize weights to Q4_0 (ggml quantize_row_q4_0_ref: d = max/-8).
pub fn quantize_weights_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for xb in x.chunks_exact(QK) {
        let max = signed_absmax(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// Quantize weights to Q5_0 (ggml quantize_row_q5_0_ref: d = max/-16).
pub fn quantize_weights_q5_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 22);
    for xb in x.chunks_exact(QK) {
        let max = signed_absmax(xb);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qh = 0u32;
        let mut qs = [0u8; 16];
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + QK / 2] * id + 16.5) as i8).min(31) as u8;
            qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend_from_slice(&qh.to_le_bytes());
        out.extend_from_slice(&qs);
    }
    out
}

/// Weights as F16 / BF16 / F32 bytes.
pub fn encode_float_weights(format: WeightFormat, x: &[f32]) -> Option<Vec<u8>> {
    Some(match format {
        WeightFormat::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightFormat::F16 => x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        WeightFormat::BF16 => x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        _ => return None,
    })
}

/// The value of largest magnitude, with its sign (first one wins ties).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Round activations in place to what a matrix in `format` multiplies them
/// as in ggml: f16 for F16 weights, bf16 for BF16 (ggml converts them to
/// the weights' type first), the values of their Q8_0 or Q8_K blocks for
/// quantized ones, unchanged for F32. `x.len()` must be a multiple of the
/// activation block (32 or 256) for quantized formats.
///
/// A plain f32 product of a weight row with the result is then ggml's
/// product up to the order of the additions: used where a matrix is small
/// enough to be kept in f32 (a LoRA adapter's), so that it gives llama.cpp's
/// values without a kernel per format.
pub fn round_activations(format: WeightFormat, x: &mut [f32]) {
    match format.act_format() {
        ActFormat::F32 => match format {
            WeightFormat::F16 => crate::ops::round_to_f16(x),
            WeightFormat::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            _ => {}
        },
        ActFormat::Q8_0 => {
            let mut blocks = vec![BlockQ8_0::default(); x.len() / QK];
            quantize_q8_0(x, &mut blocks);
            for (xb, b) in x.chunks_exact_mut(QK).zip(&blocks) {
                let d = f16_le(b.d);
                xb.iter_mut().zip(b.qs).for_each(|(v, q)| *v = d * q as f32);
            }
        }
        ActFormat::Q8K => {
            let mut blocks = vec![BlockQ8K::default(); x.len() / QK_K];
            quantize_q8_k(x, &mut blocks);
            for (xb, b) in x.chunks_exact_mut(QK_K).zip(&blocks) {
                xb.iter_mut()
                    .zip(b.qs)
                    .for_each(|(v, q)| *v = b.d * q as f32);
            }
        }
    }
}
