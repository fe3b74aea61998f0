//! x86-64 SIMD activation quantizers (Q8_0 and Q8_K), selected at run time by
//! [`crate::quant`]. Each is bit-identical to its scalar reference in
//! [`crate::quant`] for every input:
//!
//! - max |x| (and, for Q8_K, max x and min x) are reductions whose result
//!   does not depend on their order. The vector `max`/`min` take the new
//!   element first, so a NaN element is dropped exactly as `f32::max` and
//!   `>` drop it in the scalar code.
//! - the scale and its inverse are the reference's divisions (scalar, or
//!   element-wise in a vector: IEEE division is correctly rounded either
//!   way), and the scale's f16 rounding is `vcvtps2ph` with
//!   round-to-nearest-even, which is what the reference's `half` conversion
//!   runs whenever the CPU has F16C (every table here needs it).
//! - each quant is one IEEE product (no FMA) rounded by `cvtps2dq` under the
//!   current MXCSR mode — the same rounding the reference's magic-number
//!   `round_even` gets from an add under that mode, for |x| < 2^22.
//! - for finite scales the products lie within ±127.00002, so a quant of
//!   −128 can only come from a NaN or infinite product (`cvtps2dq` gives
//!   i32::MIN, saturated to −128), where Rust's saturating `as` casts differ.
//!   A block holding a −128 is redone by the scalar reference: bit-identity
//!   holds even for NaN / ∞ inputs and scales that overflow.
//!
//! ref: ggml-cpu/arch/x86/quants.c quantize_row_q8_0 / quantize_row_q8_K.

use crate::formats::*;
use crate::quant::{quantize_q8_0_ref, quantize_q8_k_ref};
use std::arch::x86_64::*;

pub fn avx2_available() -> bool {
    crate::x86::avx2_available()
}

pub fn avx512_available() -> bool {
    avx2_available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// Scale → f16 bits, as `half::f16::from_f32` does with F16C.
#[inline(always)]
unsafe fn f16_bits(d: f32) -> [u8; 2] {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d));
    (_mm_cvtsi128_si32(h) as u16).to_le_bytes()
}

/// The Q8_0 scale and its inverse from max |x|, exactly as the reference.
#[inline(always)]
fn q8_0_scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// The element of largest magnitude, with its sign, that the reference picks
/// (the first one when +a and −a tie), from the block's max and min over
/// {0} ∪ x. `None` when every element is ±0 (or NaN).
#[inline(always)]
fn q8_k_signed_max(xb: &[f32], mx: f32, mn: f32) -> Option<f32> {
    let neg = -mn;
    if mx > neg {
        Some(mx)
    } else if neg > mx {
        Some(mn)
    } else if mx == 0.0 {
        None
    } else {
        xb.iter().copied().find(|v| v.abs() == mx)
    }
}

// ---------------------------------------------------------------- AVX2 ----

#[inline(always)]
unsafe fn hmax256(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline(always)]
unsafe fn hmin256(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// 32 i32 (4 vectors, in element order) to 32 i8 with signed saturation.
#[inline(always)]
unsafe fn pack32_avx2(i: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    let q = _mm256_packs_epi16(a, b);
    _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline(always)]
unsafe fn has_min_i8_avx2(q: __m256i) -> bool {
    _mm256_movemask_epi8(_mm256_cmpeq_epi8(q, _mm256_set1_epi8(i8::MIN))) != 0
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2_impl(x: &[f32], out: &mut [BlockQ8_0]) {
    let sign = _mm256_set1_ps(-0.0);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let zero = _mm256_setzero_ps();
        let m0 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), zero);
        let m0 = _mm256_max_ps(_mm256_andnot_ps(sign, v[1]), m0);
        let m1 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), zero);
        let m1 = _mm256_max_ps(_mm256_andnot_ps(sign, v[3]), m1);
        let amax = hmax256(_mm256_max_ps(m0, m1));
        let (d, id) = q8_0_scales(amax);
        let idv = _mm256_set1_ps(id);
        let q = pack32_avx2(v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, idv))));
        if has_min_i8_avx2(q) {
            quantize_q8_0_ref(xb, std::slice::from_mut(b));
            continue;
        }
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, q);
        b.d = f16_bits(d);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_avx2_impl(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let zero = _mm256_setzero_ps();
        let (mut mx, mut mn) = ([zero; 4], [zero; 4]);
        for i in (0..QK_K / 8).step_by(4) {
            for k in 0..4 {
                let v = _mm256_loadu_ps(p.add(8 * (i + k)));
                mx[k] = _mm256_max_ps(v, mx[k]);
                mn[k] = _mm256_min_ps(v, mn[k]);
            }
        }
        let mx = hmax256(_mm256_max_ps(
            _mm256_max_ps(mx[0], mx[1]),
            _mm256_max_ps(mx[2], mx[3]),
        ));
        let mn = hmin256(_mm256_min_ps(
            _mm256_min_ps(mn[0], mn[1]),
            _mm256_min_ps(mn[2], mn[3]),
        ));
        let Some(max) = q8_k_signed_max(xb, mx, mn) else {
            // Every element ±0, or some NaN: the reference's block.
            quantize_q8_k_ref(xb, std::slice::from_mut(b));
            continue;
        };
        let iscale = -127.0 / max;
        let isv = _mm256_set1_ps(iscale);
        let mut bad = false;
        let mut sums = [_mm_setzero_si128(); 4];
        // 64 elements (4 bsums groups) per step.
        for (c, s) in sums.iter_mut().enumerate() {
            let i: [__m256i; 8] = std::array::from_fn(|k| {
                let v = _mm256_loadu_ps(p.add(64 * c + 8 * k));
                _mm256_cvtps_epi32(_mm256_mul_ps(isv, v))
            });
            for h in 0..2 {
                let q = pack32_avx2([i[4 * h], i[4 * h + 1], i[4 * h + 2], i[4 * h + 3]]);
                bad |= has_min_i8_avx2(q);
                _mm256_storeu_si256(b.qs.as_mut_ptr().add(64 * c + 32 * h) as *mut __m256i, q);
            }
            // Group g of this step is i[2g] + i[2g + 1]; horizontal sums of 4.
            let g: [__m256i; 4] = std::array::from_fn(|g| _mm256_add_epi32(i[2 * g], i[2 * g + 1]));
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(g[0], g[1]), _mm256_hadd_epi32(g[2], g[3]));
            *s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        }
        if bad {
            quantize_q8_k_ref(xb, std::slice::from_mut(b));
            continue;
        }
        let bs = b.bsums.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(bs, _mm_packs_epi32(sums[0], sums[1]));
        _mm_storeu_si128(bs.add(1), _mm_packs_epi32(sums[2], sums[3]));
        b.d = 1.0 / iscale;
    }
}

// ------------------------------------------------------------- AVX-512 ----

/// packs interleave 128-bit lanes: dword 4·lane + v holds vector v's
/// elements 4·lane..4·lane+3; this puts them back in element order.
#[inline(always)]
unsafe fn unlane_idx() -> __m512i {
    _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
}

/// 64 i32 (4 vectors, in element order) to 64 i8 with signed saturation.
#[inline(always)]
unsafe fn pack64_avx512(i: [__m512i; 4], unlane: __m512i) -> __m512i {
    let q = _mm512_packs_epi16(
        _mm512_packs_epi32(i[0], i[1]),
        _mm512_packs_epi32(i[2], i[3]),
    );
    _mm512_permutexvar_epi32(unlane, q)
}

/// One Q8_0 block (the last few of a row that are not a group of eight).
#[inline(always)]
unsafe fn q8_0_block_avx512(xb: &[f32], b: &mut BlockQ8_0) {
    let p = xb.as_ptr();
    let v0 = _mm512_loadu_ps(p);
    let v1 = _mm512_loadu_ps(p.add(16));
    let m = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps());
    let m = _mm512_max_ps(_mm512_abs_ps(v1), m);
    let amax = _mm512_reduce_max_ps(m);
    let (d, id) = q8_0_scales(amax);
    let idv = _mm512_set1_ps(id);
    let q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)));
    let q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, idv)));
    let q = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q0), q1);
    if _mm256_cmpeq_epi8_mask(q, _mm256_set1_epi8(i8::MIN)) != 0 {
        quantize_q8_0_ref(xb, std::slice::from_mut(b));
        return;
    }
    _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, q);
    b.d = f16_bits(d);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn q8_0_avx512_impl(x: &[f32], out: &mut [BlockQ8_0]) {
    let unlane = unlane_idx();
    let zero = _mm512_setzero_ps();
    let c127 = _mm512_set1_ps(127.0);
    let mut groups = out.chunks_exact_mut(8);
    // Eight blocks per step, so that the eight max|x| reductions share their
    // shuffles and the scales their divisions (one block's chain of
    // reduction → division → product → rounding is long; eight in a row
    // keep the vector units busy).
    for (xb, bs) in x.chunks_exact(8 * QK).zip(&mut groups) {
        let p = xb.as_ptr();
        let v: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(p.add(16 * k)));
        let m: [__m512; 8] = std::array::from_fn(|j| {
            _mm512_max_ps(
                _mm512_abs_ps(v[2 * j + 1]),
                _mm512_max_ps(_mm512_abs_ps(v[2 * j]), zero),
            )
        });
        // Transposed reduction. In 128-bit lanes: r[k] = [m2k(0|2), m2k(1|3),
        // m2k+1(0|2), m2k+1(1|3)]; then s[h] = [m4h, m4h+1, m4h+2, m4h+3],
        // each lane 4 partial maxima of its block; then within lanes,
        // lane l = [ml, ml, ml+4, ml+4], fully reduced.
        let r: [__m512; 4] = std::array::from_fn(|k| {
            _mm512_max_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(m[2 * k], m[2 * k + 1]),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(m[2 * k], m[2 * k + 1]),
            )
        });
        let s: [__m512; 2] = std::array::from_fn(|h| {
            _mm512_max_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(r[2 * h], r[2 * h + 1]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(r[2 * h], r[2 * h + 1]),
            )
        });
        let w = _mm512_max_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(s[0], s[1]),
            _mm512_shuffle_ps::<0b11_10_11_10>(s[0], s[1]),
        );
        let amax = _mm512_max_ps(w, _mm512_permute_ps::<0b10_11_00_01>(w));
        // The reference's d = amax / 127 and id = 127 / amax (0 for amax 0),
        // element-wise: the same correctly rounded divisions.
        let d = _mm512_div_ps(amax, c127);
        let id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(amax, zero), c127, amax);
        let mut dh = [0u16; 16];
        _mm256_storeu_si256(
            dh.as_mut_ptr() as *mut __m256i,
            _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(d),
        );
        // Block j's values sit at element 4·(j mod 4) + 2·(j / 4).
        let at = |j: usize| 4 * (j % 4) + 2 * (j / 4);
        let mut bad_blocks = 0u32;
        for h in 0..4 {
            let (j0, j1) = (2 * h, 2 * h + 1);
            let id0 = _mm512_permutexvar_ps(_mm512_set1_epi32(at(j0) as i32), id);
            let id1 = _mm512_permutexvar_ps(_mm512_set1_epi32(at(j1) as i32), id);
            let i = [
                _mm512_cvtps_epi32(_mm512_mul_ps(v[4 * h], id0)),
                _mm512_cvtps_epi32(_mm512_mul_ps(v[4 * h + 1], id0)),
                _mm512_cvtps_epi32(_mm512_mul_ps(v[4 * h + 2], id1)),
                _mm512_cvtps_epi32(_mm512_mul_ps(v[4 * h + 3], id1)),
            ];
            let q = pack64_avx512(i, unlane);
            let bad = _mm512_cmpeq_epi8_mask(q, _mm512_set1_epi8(i8::MIN));
            let (b0, b1) = bs[j0..=j1].split_at_mut(1);
            let (b0, b1) = (&mut b0[0], &mut b1[0]);
            _mm256_storeu_si256(
                b0.qs.as_mut_ptr() as *mut __m256i,
                _mm512_castsi512_si256(q),
            );
            _mm256_storeu_si256(
                b1.qs.as_mut_ptr() as *mut __m256i,
                _mm512_extracti64x4_epi64::<1>(q),
            );
            b0.d = dh[at(j0)].to_le_bytes();
            b1.d = dh[at(j1)].to_le_bytes();
            bad_blocks |= ((bad as u32 != 0) as u32) << j0 | (((bad >> 32) != 0) as u32) << j1;
        }
        // After the vector work, so that no vector is live across a call.
        while bad_blocks != 0 {
            let j = bad_blocks.trailing_zeros() as usize;
            bad_blocks &= bad_blocks - 1;
            quantize_q8_0_ref(&xb[j * QK..(j + 1) * QK], &mut bs[j..=j]);
        }
    }
    let rest = groups.into_remainder();
    let tail = x.len() - rest.len() * QK;
    for (xb, b) in x[tail..].chunks_exact(QK).zip(rest.iter_mut()) {
        q8_0_block_avx512(xb, b);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn q8_k_avx512_impl(x: &[f32], out: &mut [BlockQ8K]) {
    let unlane = unlane_idx();
    // After the sad/shift/or below, word 8g + z holds the sum of group g of
    // 64-byte chunk z; bsums[4z + g] wants it.
    let mut widx = [0i16; 32];
    for z in 0..4 {
        for g in 0..4 {
            widx[4 * z + g] = (8 * g + z) as i16;
        }
    }
    let widx = _mm512_loadu_si512(widx.as_ptr() as *const _);
    let flip = _mm512_set1_epi8(i8::MIN);
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let zero = _mm512_setzero_ps();
        let (mut mx, mut mn) = ([zero; 4], [zero; 4]);
        for i in (0..QK_K / 16).step_by(4) {
            for k in 0..4 {
                let v = _mm512_loadu_ps(p.add(16 * (i + k)));
                mx[k] = _mm512_max_ps(v, mx[k]);
                mn[k] = _mm512_min_ps(v, mn[k]);
            }
        }
        let mx = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(mx[0], mx[1]),
            _mm512_max_ps(mx[2], mx[3]),
        ));
        let mn = _mm512_reduce_min_ps(_mm512_min_ps(
            _mm512_min_ps(mn[0], mn[1]),
            _mm512_min_ps(mn[2], mn[3]),
        ));
        let Some(max) = q8_k_signed_max(xb, mx, mn) else {
            // Every element ±0, or some NaN: the reference's block.
            quantize_q8_k_ref(xb, std::slice::from_mut(b));
            continue;
        };
        let iscale = -127.0 / max;
        let isv = _mm512_set1_ps(iscale);
        let mut bad = 0u64;
        let mut sums = _mm512_setzero_si512();
        for z in 0..4 {
            let i: [__m512i; 4] = std::array::from_fn(|k| {
                let v = _mm512_loadu_ps(p.add(64 * z + 16 * k));
                _mm512_cvtps_epi32(_mm512_mul_ps(isv, v))
            });
            let q = pack64_avx512(i, unlane);
            bad |= _mm512_cmpeq_epi8_mask(q, flip);
            _mm512_storeu_si512(b.qs.as_mut_ptr().add(64 * z) as *mut _, q);
            // Sums of q + 128 per 8 bytes, then per 16 (group g = lane g, in
            // the low quadword), placed in word z of each lane's low quadword.
            let s = _mm512_sad_epu8(_mm512_xor_si512(q, flip), _mm512_setzero_si512());
            let s = _mm512_add_epi64(s, _mm512_bsrli_epi128::<8>(s));
            let s = match z {
                0 => s,
                1 => _mm512_slli_epi64::<16>(s),
                2 => _mm512_slli_epi64::<32>(s),
                _ => _mm512_slli_epi64::<48>(s),
            };
            sums = _mm512_or_si512(sums, s);
        }
        if bad != 0 {
            quantize_q8_k_ref(xb, std::slice::from_mut(b));
            continue;
        }
        let bs = _mm512_castsi512_si256(_mm512_permutexvar_epi16(widx, sums));
        let bs = _mm256_sub_epi16(bs, _mm256_set1_epi16(16 * 128));
        _mm256_storeu_si256(b.bsums.as_mut_ptr() as *mut __m256i, bs);
        b.d = 1.0 / iscale;
    }
}

// -------------------------------------------------- safe entry points ----
// Only reachable through `crate::quant`'s tables, which hold them only after
// the features they need were detected.

pub fn quantize_q8_0_avx2(x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert!(avx2_available());
    // SAFETY: listed only when avx2_available().
    unsafe { q8_0_avx2_impl(x, out) }
}

pub fn quantize_q8_k_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert!(avx2_available());
    // SAFETY: listed only when avx2_available().
    unsafe { q8_k_avx2_impl(x, out) }
}

pub fn quantize_q8_0_avx512(x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert!(avx512_available());
    // SAFETY: listed only when avx512_available().
    unsafe { q8_0_avx512_impl(x, out) }
}

pub fn quantize_q8_k_avx512(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert!(avx512_available());
    // SAFETY: listed only when avx512_available().
    unsafe { q8_k_avx512_impl(x, out) }
}
