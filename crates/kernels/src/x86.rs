//! x86-64 SIMD kernels (AVX2 + FMA + F16C, and AVX-512 VNNI for the int8
//! products), selected at run time by [`crate::simd`].
//!
//! Each kernel takes one weight row and NT activation rows (NT = 1 or 4):
//! the weight block is loaded and unpacked once for all NT tokens, and each
//! token's sum is accumulated in exactly the same order whatever NT is, so a
//! token's result does not depend on how many tokens share the call.
//!
//! Integer products are exact in both the AVX2 (maddubs/madd) and the VNNI
//! (dpbusd) forms, so the two tables give bit-identical results.
//!
//! ref: the block layouts in formats.rs; the sign trick for signed×signed
//! int8 products and the 0xF0 trick for Q5_0's fifth bit follow ggml-cpu's
//! x86 quants.c.

use crate::formats::*;
use crate::simd::DotKernels;
use std::arch::x86_64::*;

pub fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn vnni_available() -> bool {
    avx2_available()
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
}

/// How the int8 × int8 → i32 products are formed.
trait Int8Dot {
    /// Σ over each group of 4 bytes of u(x)·s(y), as 8 × i32, where `ux` is
    /// unsigned and `sy` signed.
    unsafe fn dot_us(ux: __m256i, sy: __m256i) -> __m256i;
}

struct Avx2;
struct Vnni;

impl Int8Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot_us(ux: __m256i, sy: __m256i) -> __m256i {
        // u8·i8 pairs to i16 (cannot saturate: |u| ≤ 128, |s| ≤ 127), then pairs to i32.
        _mm256_madd_epi16(_mm256_maddubs_epi16(ux, sy), _mm256_set1_epi16(1))
    }
}

impl Int8Dot for Vnni {
    #[inline(always)]
    unsafe fn dot_us(ux: __m256i, sy: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), ux, sy)
    }
}

#[inline(always)]
unsafe fn f16_to_f32(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn load(p: &[i8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

#[inline(always)]
unsafe fn loadu8(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

/// Signed x · signed y summed in groups of 4 → 8 × i32 (|x·y| terms exact).
#[inline(always)]
unsafe fn dot_ss<D: Int8Dot>(x: __m256i, y: __m256i) -> __m256i {
    D::dot_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// 16 bytes of nibbles → 32 bytes: low nibbles in bytes 0..16, high in 16..32.
#[inline(always)]
unsafe fn nibbles32(qs: &[u8; 16]) -> __m256i {
    let t = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// 32 bits → 32 bytes, 0xFF where the bit is set.
#[inline(always)]
unsafe fn bits_to_bytes(x: u32) -> __m256i {
    let v = _mm256_set1_epi32(x as i32);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let b = _mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bit);
    _mm256_cmpeq_epi8(b, bit)
}

// ---------------------------------------------------------------- Q8_0, Q4_0, Q5_0

/// Legacy 32-element formats: `unpack` gives the block's signed quants.
#[inline(always)]
unsafe fn dot_legacy<D: Int8Dot, W, const NT: usize>(
    w: &[W],
    a: [&[BlockQ8_0]; NT],
    unpack: impl Fn(&W) -> (__m256i, [u8; 2]),
) -> [f32; NT] {
    for t in a.iter() {
        assert!(t.len() >= w.len());
    }
    let mut acc = [_mm256_setzero_ps(); NT];
    for (i, b) in w.iter().enumerate() {
        let (x, d) = unpack(b);
        let dx = f16_to_f32(d);
        for t in 0..NT {
            let y = a[t].get_unchecked(i);
            let p = dot_ss::<D>(x, load(&y.qs));
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(dx * f16_to_f32(y.d)),
                _mm256_cvtepi32_ps(p),
                acc[t],
            );
        }
    }
    let mut out = [0.0; NT];
    for t in 0..NT {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

#[inline(always)]
unsafe fn q8_0<D: Int8Dot, const NT: usize>(w: &[BlockQ8_0], a: [&[BlockQ8_0]; NT]) -> [f32; NT] {
    dot_legacy::<D, _, NT>(w, a, |b| (load(&b.qs), b.d))
}

#[inline(always)]
unsafe fn q4_0<D: Int8Dot, const NT: usize>(w: &[BlockQ4_0], a: [&[BlockQ8_0]; NT]) -> [f32; NT] {
    dot_legacy::<D, _, NT>(w, a, |b| {
        (_mm256_sub_epi8(nibbles32(&b.qs), _mm256_set1_epi8(8)), b.d)
    })
}

#[inline(always)]
unsafe fn q5_0<D: Int8Dot, const NT: usize>(w: &[BlockQ5_0], a: [&[BlockQ8_0]; NT]) -> [f32; NT] {
    dot_legacy::<D, _, NT>(w, a, |b| {
        // q - 16: where the fifth bit is clear, OR-ing 0xF0 onto the nibble
        // gives the nibble - 16 in two's complement; where set, q - 16 = nibble.
        let hi = _mm256_andnot_si256(
            bits_to_bytes(u32::from_le_bytes(b.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        (_mm256_or_si256(nibbles32(&b.qs), hi), b.d)
    })
}

// ---------------------------------------------------------------- K-quants

/// Q4_K/Q5_K: Σ_j sc_j·Σ q·y over 8 sub-blocks, given the 4 chunks' low/high
/// quants (unsigned), and the mins term Σ_j m_j·(bsum_2j + bsum_2j+1).
#[inline(always)]
unsafe fn dot_k4<D: Int8Dot, const NT: usize>(
    d: f32,
    dmin: f32,
    scales: &[u8; 12],
    q: &[(__m256i, __m256i); 4],
    a: &[&BlockQ8K; NT],
    acc: &mut [__m256],
    accm: &mut [f32; NT],
) {
    let mut sc = [0i16; 8];
    let mut mn = [0i32; 8];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, scales);
        sc[j] = s as i16;
        mn[j] = m as i32;
    }
    for t in 0..NT {
        let y = a[t];
        let mut sumi = _mm256_setzero_si256();
        for (c, &(lo, hi)) in q.iter().enumerate() {
            let p0 = D::dot_us(lo, load(&y.qs[64 * c..]));
            let p1 = D::dot_us(hi, load(&y.qs[64 * c + 32..]));
            sumi = _mm256_add_epi32(
                sumi,
                _mm256_mullo_epi32(p0, _mm256_set1_epi32(sc[2 * c] as i32)),
            );
            sumi = _mm256_add_epi32(
                sumi,
                _mm256_mullo_epi32(p1, _mm256_set1_epi32(sc[2 * c + 1] as i32)),
            );
        }
        let mut m = 0i32;
        for j in 0..8 {
            m += mn[j] * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
        }
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
        accm[t] += dmin * y.d * m as f32;
    }
}

#[inline(always)]
unsafe fn q4k<D: Int8Dot, const NT: usize>(w: &[BlockQ4K], a: [&[BlockQ8K]; NT]) -> [f32; NT] {
    for t in a.iter() {
        assert!(t.len() >= w.len());
    }
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut accm = [0.0f32; NT];
    let m4 = _mm256_set1_epi8(0x0F);
    for (i, b) in w.iter().enumerate() {
        let mut q = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
        for (c, qc) in q.iter_mut().enumerate() {
            let v = loadu8(&b.qs[32 * c..]);
            *qc = (
                _mm256_and_si256(v, m4),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
            );
        }
        let ys: [&BlockQ8K; NT] = std::array::from_fn(|t| a[t].get_unchecked(i));
        dot_k4::<D, NT>(
            f16_to_f32(b.d),
            f16_to_f32(b.dmin),
            &b.scales,
            &q,
            &ys,
            &mut acc,
            &mut accm,
        );
    }
    std::array::from_fn(|t| hsum_ps(acc[t]) - accm[t])
}

#[inline(always)]
unsafe fn q5k<D: Int8Dot, const NT: usize>(w: &[BlockQ5K], a: [&[BlockQ8K]; NT]) -> [f32; NT] {
    for t in a.iter() {
        assert!(t.len() >= w.len());
    }
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut accm = [0.0f32; NT];
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    for (i, b) in w.iter().enumerate() {
        let hbits = loadu8(&b.qh);
        let mut q = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
        for (c, qc) in q.iter_mut().enumerate() {
            let v = loadu8(&b.qs[32 * c..]);
            // Bit 2c (low half) and 2c+1 (high half) of each qh byte, moved to bit 4.
            let h0 = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32)),
                one,
            );
            let h1 = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32 + 1)),
                one,
            );
            let lo = _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_slli_epi16(h0, 4));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                _mm256_slli_epi16(h1, 4),
            );
            *qc = (lo, hi);
        }
        let ys: [&BlockQ8K; NT] = std::array::from_fn(|t| a[t].get_unchecked(i));
        dot_k4::<D, NT>(
            f16_to_f32(b.d),
            f16_to_f32(b.dmin),
            &b.scales,
            &q,
            &ys,
            &mut acc,
            &mut accm,
        );
    }
    std::array::from_fn(|t| hsum_ps(acc[t]) - accm[t])
}

#[inline(always)]
unsafe fn q6k<D: Int8Dot, const NT: usize>(w: &[BlockQ6K], a: [&[BlockQ8K]; NT]) -> [f32; NT] {
    for t in a.iter() {
        assert!(t.len() >= w.len());
    }
    let mut acc = [_mm256_setzero_ps(); NT];
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let m32 = _mm256_set1_epi8(32);
    for (i, b) in w.iter().enumerate() {
        // 8 groups of 32 unsigned 6-bit quants (0..63), element order.
        let mut q = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            let ql0 = loadu8(&b.ql[64 * n..]);
            let ql1 = loadu8(&b.ql[64 * n + 32..]);
            let qh = loadu8(&b.qh[32 * n..]);
            q[4 * n] = _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
            );
            q[4 * n + 1] = _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
            );
            q[4 * n + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                _mm256_and_si256(qh, m30),
            );
            q[4 * n + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
            );
        }
        // Scales of the two 16-element halves of each group, one per 128-bit lane.
        let sc: [__m256i; 8] = std::array::from_fn(|g| {
            _mm256_set_m128i(
                _mm_set1_epi32(b.scales[2 * g + 1] as i32),
                _mm_set1_epi32(b.scales[2 * g] as i32),
            )
        });
        let d = f16_to_f32(b.d);
        for t in 0..NT {
            let y = a[t].get_unchecked(i);
            let mut sumi = _mm256_setzero_si256();
            for g in 0..8 {
                let yv = load(&y.qs[32 * g..]);
                // Σ (q - 32)·y = Σ q·y - 32·Σ y, both exact in i32.
                let p = _mm256_sub_epi32(D::dot_us(q[g], yv), D::dot_us(m32, yv));
                sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, sc[g]));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]))
}

// ---------------------------------------------------------------- tables

/// Safe entry points: a `#[target_feature]` function per (kernel, table)
/// into which the generic kernel is inlined, and a safe wrapper that is only
/// placed in a table after the CPU features were detected.
macro_rules! entry {
    ($name:ident, $kernel:ident, $d:ty, $feat:literal, $w:ty, $a:ty, $nt:literal) => {
        fn $name(w: &[$w], a: [&[$a]; $nt]) -> [f32; $nt] {
            #[target_feature(enable = $feat)]
            unsafe fn inner(w: &[$w], a: [&[$a]; $nt]) -> [f32; $nt] {
                $kernel::<$d, $nt>(w, a)
            }
            // SAFETY: this function is only reachable through a kernel table
            // that `simd::available` returns after detecting `$feat`.
            unsafe { inner(w, a) }
        }
    };
}

entry!(
    avx2_q8_0_1,
    q8_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ8_0,
    BlockQ8_0,
    1
);
entry!(
    avx2_q8_0_4,
    q8_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ8_0,
    BlockQ8_0,
    4
);
entry!(
    avx2_q4_0_1,
    q4_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4_0,
    BlockQ8_0,
    1
);
entry!(
    avx2_q4_0_4,
    q4_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4_0,
    BlockQ8_0,
    4
);
entry!(
    avx2_q5_0_1,
    q5_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5_0,
    BlockQ8_0,
    1
);
entry!(
    avx2_q5_0_4,
    q5_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5_0,
    BlockQ8_0,
    4
);
entry!(
    avx2_q4k_1,
    q4k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4K,
    BlockQ8K,
    1
);
entry!(
    avx2_q4k_4,
    q4k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4K,
    BlockQ8K,
    4
);
entry!(
    avx2_q5k_1,
    q5k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5K,
    BlockQ8K,
    1
);
entry!(
    avx2_q5k_4,
    q5k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5K,
    BlockQ8K,
    4
);
entry!(
    avx2_q6k_1,
    q6k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ6K,
    BlockQ8K,
    1
);
entry!(
    avx2_q6k_4,
    q6k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ6K,
    BlockQ8K,
    4
);

entry!(
    vnni_q8_0_1,
    q8_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ8_0,
    BlockQ8_0,
    1
);
entry!(
    vnni_q8_0_4,
    q8_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ8_0,
    BlockQ8_0,
    4
);
entry!(
    vnni_q4_0_1,
    q4_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ4_0,
    BlockQ8_0,
    1
);
entry!(
    vnni_q4_0_4,
    q4_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ4_0,
    BlockQ8_0,
    4
);
entry!(
    vnni_q5_0_1,
    q5_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ5_0,
    BlockQ8_0,
    1
);
entry!(
    vnni_q5_0_4,
    q5_0,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ5_0,
    BlockQ8_0,
    4
);
entry!(
    vnni_q4k_1,
    q4k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ4K,
    BlockQ8K,
    1
);
entry!(
    vnni_q4k_4,
    q4k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ4K,
    BlockQ8K,
    4
);
entry!(
    vnni_q5k_1,
    q5k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ5K,
    BlockQ8K,
    1
);
entry!(
    vnni_q5k_4,
    q5k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ5K,
    BlockQ8K,
    4
);
entry!(
    vnni_q6k_1,
    q6k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ6K,
    BlockQ8K,
    1
);
entry!(
    vnni_q6k_4,
    q6k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    BlockQ6K,
    BlockQ8K,
    4
);

pub const AVX2: DotKernels = DotKernels {
    name: "avx2",
    q8_0: (avx2_q8_0_1, avx2_q8_0_4),
    q4_0: (avx2_q4_0_1, avx2_q4_0_4),
    q5_0: (avx2_q5_0_1, avx2_q5_0_4),
    q4k: (avx2_q4k_1, avx2_q4k_4),
    q5k: (avx2_q5k_1, avx2_q5k_4),
    q6k: (avx2_q6k_1, avx2_q6k_4),
};

pub const VNNI: DotKernels = DotKernels {
    name: "avx512-vnni",
    q8_0: (vnni_q8_0_1, vnni_q8_0_4),
    q4_0: (vnni_q4_0_1, vnni_q4_0_4),
    q5_0: (vnni_q5_0_1, vnni_q5_0_4),
    q4k: (vnni_q4k_1, vnni_q4k_4),
    q5k: (vnni_q5k_1, vnni_q5k_4),
    q6k: (vnni_q6k_1, vnni_q6k_4),
};
