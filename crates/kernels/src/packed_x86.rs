//! The packed kernels' vector operations on x86-64: AVX-512 (one 512-bit
//! register per 16 lanes, `dpbusd` for the int8 products) and AVX2 (two
//! 256-bit halves, `maddubs` + `madd`). Both are exact in their integer
//! parts and round each float operation once, like [`crate::packed::Scalar`],
//! so the three give bit-identical results.

use crate::packed::{kernel, ActRow, Isa, PackedFormat, PackedKernels};
use std::arch::x86_64::*;

/// AVX-512 with VNNI; with GFNI's bit-matrix transform for moving bits
/// when `GFNI`.
pub(crate) struct Avx512<const GFNI: bool>;

impl<const GFNI: bool> Isa for Avx512<GFNI> {
    type V = __m512i;
    type F = __m512;
    const B128_CORR: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }
    #[inline(always)]
    unsafe fn splat8(x: u8) -> __m512i {
        _mm512_set1_epi8(x as i8)
    }
    #[inline(always)]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        _mm512_and_si512(a, b)
    }
    #[inline(always)]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }
    #[inline(always)]
    unsafe fn shr<const N: u32>(a: __m512i) -> __m512i {
        _mm512_srli_epi16::<N>(a)
    }
    #[inline(always)]
    unsafe fn shl<const N: u32>(a: __m512i) -> __m512i {
        _mm512_slli_epi16::<N>(a)
    }
    #[inline(always)]
    unsafe fn shr_by(a: __m512i, n: u32) -> __m512i {
        _mm512_srl_epi16(a, _mm_cvtsi32_si128(n as i32))
    }
    #[inline(always)]
    unsafe fn splat32(x: i32) -> __m512i {
        _mm512_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn add32(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn mul32(a: __m512i, b: __m512i) -> __m512i {
        _mm512_mullo_epi32(a, b)
    }
    type P = __m512i;
    #[inline(always)]
    unsafe fn psum_begin(acc: __m512i) -> __m512i {
        acc
    }
    #[inline(always)]
    unsafe fn psum_add(p: __m512i, u: __m512i, y4: i32) -> __m512i {
        Self::dot_u8(p, u, y4)
    }
    #[inline(always)]
    unsafe fn psum_end(p: __m512i) -> __m512i {
        p
    }
    #[inline(always)]
    unsafe fn psum_end_scaled(acc: __m512i, p: __m512i, sc: __m512i) -> __m512i {
        Self::add32(acc, Self::mul32(p, sc))
    }
    #[inline(always)]
    unsafe fn prep_scale(s: __m512i) -> __m512i {
        s
    }
    // (`psum_end_scaled` is a `pmulld`.)
    const SCALED_END_FREE: bool = false;
    const FEW_REGISTERS: bool = false;
    #[inline(always)]
    unsafe fn pair16(lo: __m512i, hi: __m512i) -> __m512i {
        _mm512_mask_blend_epi16(0xAAAA_AAAA, lo, _mm512_slli_epi32::<16>(hi))
    }
    #[inline(always)]
    unsafe fn madd_pairs(acc: __m512i, a: __m512i, pair: i32) -> __m512i {
        _mm512_dpwssd_epi32(acc, a, _mm512_set1_epi32(pair))
    }
    #[inline(always)]
    unsafe fn dot_u8(acc: __m512i, u: __m512i, y4: i32) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(y4))
    }
    #[inline(always)]
    unsafe fn dot_b128(acc: __m512i, u: __m512i, y4: i32) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(y4))
    }
    #[inline(always)]
    unsafe fn lut16(table: __m512i, idx: __m512i) -> __m512i {
        _mm512_shuffle_epi8(table, idx)
    }
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const _))
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const _))
    }
    #[inline(always)]
    unsafe fn dot_pairs(acc: __m512i, p: *const u8, pair: i32) -> __m512i {
        let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const _));
        _mm512_dpwssd_epi32(acc, v, _mm512_set1_epi32(pair))
    }
    #[inline(always)]
    unsafe fn to_f(v: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const _))
    }
    #[inline(always)]
    unsafe fn load_bf16_even(p: *const u8) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_loadu_si512(p as *const _)))
    }
    #[inline(always)]
    unsafe fn load_bf16_odd(p: *const u8) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_loadu_si512(p as *const _),
            _mm512_set1_epi32(0xFFFF_0000u32 as i32),
        ))
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const u8) -> __m512 {
        _mm512_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn add_f(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn splat_f(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn mul_f(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn zero_f() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn store_f(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store(p: *mut u8, v: __m512i) {
        _mm512_storeu_si512(p as *mut _, v)
    }
    #[inline(always)]
    unsafe fn and_or(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
        _mm512_ternarylogic_epi32::<0xEA>(a, b, c)
    }
    #[inline(always)]
    unsafe fn fifth_bits(h: __m512i, g: usize) -> __m512i {
        if GFNI {
            // Output bit i of each byte is the parity of (byte 7 − i of the
            // matrix) & input: one row, for bit 4, selecting input bit g.
            let m = _mm512_set1_epi64(((1u64 << g) << 24) as i64);
            _mm512_gf2p8affine_epi64_epi8::<0>(h, m)
        } else {
            crate::packed::fifth_bits_by_shifts::<Self>(h, g)
        }
    }
    #[inline(always)]
    unsafe fn two_bits(h: __m512i, i: usize) -> __m512i {
        if GFNI {
            // Rows for output bits 4 and 5 (matrix bytes 3 and 2) select
            // input bits 2i and 2i + 1.
            let m = ((1u64 << (2 * i)) << 24) | ((1u64 << (2 * i + 1)) << 16);
            _mm512_gf2p8affine_epi64_epi8::<0>(h, _mm512_set1_epi64(m as i64))
        } else {
            crate::packed::two_bits_by_shifts::<Self>(h, i)
        }
    }
}

pub(crate) struct Avx2;

#[derive(Clone, Copy)]
pub(crate) struct V2(__m256i, __m256i);
#[derive(Clone, Copy)]
pub(crate) struct F2(__m256, __m256);

macro_rules! both {
    ($f:ident, $a:expr, $b:expr) => {
        V2($f($a.0, $b.0), $f($a.1, $b.1))
    };
}

impl Isa for Avx2 {
    type V = V2;
    type F = F2;
    const B128_CORR: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> V2 {
        V2(
            _mm256_loadu_si256(p as *const _),
            _mm256_loadu_si256(p.add(32) as *const _),
        )
    }
    #[inline(always)]
    unsafe fn splat8(x: u8) -> V2 {
        let v = _mm256_set1_epi8(x as i8);
        V2(v, v)
    }
    #[inline(always)]
    unsafe fn and(a: V2, b: V2) -> V2 {
        both!(_mm256_and_si256, a, b)
    }
    #[inline(always)]
    unsafe fn or(a: V2, b: V2) -> V2 {
        both!(_mm256_or_si256, a, b)
    }
    #[inline(always)]
    unsafe fn shr<const N: u32>(a: V2) -> V2 {
        // (The immediate forms take an i32; a constant count folds to them.)
        let n = _mm_cvtsi32_si128(N as i32);
        V2(_mm256_srl_epi16(a.0, n), _mm256_srl_epi16(a.1, n))
    }
    #[inline(always)]
    unsafe fn shl<const N: u32>(a: V2) -> V2 {
        let n = _mm_cvtsi32_si128(N as i32);
        V2(_mm256_sll_epi16(a.0, n), _mm256_sll_epi16(a.1, n))
    }
    #[inline(always)]
    unsafe fn shr_by(a: V2, n: u32) -> V2 {
        let n = _mm_cvtsi32_si128(n as i32);
        V2(_mm256_srl_epi16(a.0, n), _mm256_srl_epi16(a.1, n))
    }
    #[inline(always)]
    unsafe fn splat32(x: i32) -> V2 {
        let v = _mm256_set1_epi32(x);
        V2(v, v)
    }
    #[inline(always)]
    unsafe fn add32(a: V2, b: V2) -> V2 {
        both!(_mm256_add_epi32, a, b)
    }
    #[inline(always)]
    unsafe fn mul32(a: V2, b: V2) -> V2 {
        both!(_mm256_mullo_epi32, a, b)
    }
    #[inline(always)]
    unsafe fn dot_u8(acc: V2, u: V2, y4: i32) -> V2 {
        // u8·i8 pairs to i16 cannot saturate (u ≤ 127, |y| ≤ 128: at most
        // 2 · 127 · 128 < 2^15), then pairs to i32.
        let y = _mm256_set1_epi32(y4);
        let one = _mm256_set1_epi16(1);
        let d = |u: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), one);
        V2(
            _mm256_add_epi32(acc.0, d(u.0)),
            _mm256_add_epi32(acc.1, d(u.1)),
        )
    }
    /// (i32 sums, 16-bit pair sums).
    type P = (V2, V2);
    #[inline(always)]
    unsafe fn psum_begin(acc: V2) -> (V2, V2) {
        (acc, Self::splat32(0))
    }
    #[inline(always)]
    unsafe fn psum_add((acc, p): (V2, V2), u: V2, y4: i32) -> (V2, V2) {
        // u8·i8 pairs to i16, added in 16 bits (the caller bounds the sum).
        let y = _mm256_set1_epi32(y4);
        let d = |p: __m256i, u: __m256i| _mm256_add_epi16(p, _mm256_maddubs_epi16(u, y));
        (acc, V2(d(p.0, u.0), d(p.1, u.1)))
    }
    #[inline(always)]
    unsafe fn psum_end((acc, p): (V2, V2)) -> V2 {
        let one = _mm256_set1_epi16(1);
        V2(
            _mm256_add_epi32(acc.0, _mm256_madd_epi16(p.0, one)),
            _mm256_add_epi32(acc.1, _mm256_madd_epi16(p.1, one)),
        )
    }
    #[inline(always)]
    unsafe fn psum_end_scaled(acc: V2, (_, p): (V2, V2), sc: V2) -> V2 {
        // Each i32 lane of sc holds s in both 16-bit halves: the pair sum
        // widens and multiplies by s in one `pmaddwd`.
        V2(
            _mm256_add_epi32(acc.0, _mm256_madd_epi16(p.0, sc.0)),
            _mm256_add_epi32(acc.1, _mm256_madd_epi16(p.1, sc.1)),
        )
    }
    #[inline(always)]
    unsafe fn prep_scale(s: V2) -> V2 {
        Self::pair16(s, s)
    }
    const SCALED_END_FREE: bool = true;
    const FEW_REGISTERS: bool = true;
    #[inline(always)]
    unsafe fn pair16(lo: V2, hi: V2) -> V2 {
        let pair =
            |l: __m256i, h: __m256i| _mm256_blend_epi16::<0xAA>(l, _mm256_slli_epi32::<16>(h));
        V2(pair(lo.0, hi.0), pair(lo.1, hi.1))
    }
    #[inline(always)]
    unsafe fn madd_pairs(acc: V2, a: V2, pair: i32) -> V2 {
        let b = _mm256_set1_epi32(pair);
        V2(
            _mm256_add_epi32(acc.0, _mm256_madd_epi16(a.0, b)),
            _mm256_add_epi32(acc.1, _mm256_madd_epi16(a.1, b)),
        )
    }
    #[inline(always)]
    unsafe fn dot_b128(acc: V2, u: V2, y4: i32) -> V2 {
        // w = u − 128 as a signed byte; |w|·sign(y, w) pairs cannot
        // saturate (|w| ≤ 128, |y| ≤ 127 for Q8_0 and Q8_K activations).
        let y = _mm256_set1_epi32(y4);
        let one = _mm256_set1_epi16(1);
        let bias = _mm256_set1_epi8(-128);
        let d = |u: __m256i| {
            let w = _mm256_xor_si256(u, bias);
            _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(y, w)),
                one,
            )
        };
        V2(
            _mm256_add_epi32(acc.0, d(u.0)),
            _mm256_add_epi32(acc.1, d(u.1)),
        )
    }
    #[inline(always)]
    unsafe fn lut16(table: V2, idx: V2) -> V2 {
        V2(
            _mm256_shuffle_epi8(table.0, idx.0),
            _mm256_shuffle_epi8(table.1, idx.1),
        )
    }
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> V2 {
        V2(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _)),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const _)),
        )
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> V2 {
        V2(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const _)),
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8) as *const _)),
        )
    }
    #[inline(always)]
    unsafe fn dot_pairs(acc: V2, p: *const u8, pair: i32) -> V2 {
        let b = _mm256_set1_epi32(pair);
        let lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const _));
        let hi = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16) as *const _));
        V2(
            _mm256_add_epi32(acc.0, _mm256_madd_epi16(lo, b)),
            _mm256_add_epi32(acc.1, _mm256_madd_epi16(hi, b)),
        )
    }
    #[inline(always)]
    unsafe fn to_f(v: V2) -> F2 {
        F2(_mm256_cvtepi32_ps(v.0), _mm256_cvtepi32_ps(v.1))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> F2 {
        F2(
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const _)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const _)),
        )
    }
    #[inline(always)]
    unsafe fn load_bf16_even(p: *const u8) -> F2 {
        let f = |p: *const u8| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_loadu_si256(p as *const _)))
        };
        F2(f(p), f(p.add(32)))
    }
    #[inline(always)]
    unsafe fn load_bf16_odd(p: *const u8) -> F2 {
        let m = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let f = |p: *const u8| {
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(p as *const _), m))
        };
        F2(f(p), f(p.add(32)))
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const u8) -> F2 {
        F2(
            _mm256_loadu_ps(p as *const f32),
            _mm256_loadu_ps(p.add(32) as *const f32),
        )
    }
    #[inline(always)]
    unsafe fn add_f(a: F2, b: F2) -> F2 {
        F2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
    }
    #[inline(always)]
    unsafe fn splat_f(x: f32) -> F2 {
        let v = _mm256_set1_ps(x);
        F2(v, v)
    }
    #[inline(always)]
    unsafe fn mul_f(a: F2, b: F2) -> F2 {
        F2(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
    }
    #[inline(always)]
    unsafe fn fmadd(a: F2, b: F2, c: F2) -> F2 {
        F2(
            _mm256_fmadd_ps(a.0, b.0, c.0),
            _mm256_fmadd_ps(a.1, b.1, c.1),
        )
    }
    #[inline(always)]
    unsafe fn fnmadd(a: F2, b: F2, c: F2) -> F2 {
        F2(
            _mm256_fnmadd_ps(a.0, b.0, c.0),
            _mm256_fnmadd_ps(a.1, b.1, c.1),
        )
    }
    #[inline(always)]
    unsafe fn zero_f() -> F2 {
        F2(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn store_f(p: *mut f32, v: F2) {
        _mm256_storeu_ps(p, v.0);
        _mm256_storeu_ps(p.add(8), v.1);
    }
    #[inline(always)]
    unsafe fn store(p: *mut u8, v: V2) {
        _mm256_storeu_si256(p as *mut _, v.0);
        _mm256_storeu_si256(p.add(32) as *mut _, v.1);
    }
}

/// A `#[target_feature]` entry per (Isa, token count), into which the
/// generic kernel is inlined, and its safe wrapper for the tables:
/// `packed_entry!(for Isa, "features"; name: tokens [/ streams], …)`.
/// Streams (`kernel`'s STREAMS, see `PackedKernels::t1`, `t2`, `t3`) are 1
/// unless given.
macro_rules! packed_entry {
    (for $isa:ty, $feat:literal; $($name:ident: $nt:literal $(/ $streams:literal)?),+ $(,)?) => {
        $(packed_entry!(@one $name, $isa, $feat, $nt $(, $streams)?);)+
    };
    (@one $name:ident, $isa:ty, $feat:literal, $nt:literal) => {
        packed_entry!(@one $name, $isa, $feat, $nt, 1);
    };
    (@one $name:ident, $isa:ty, $feat:literal, $nt:literal, $streams:literal) => {
        fn $name(
            f: PackedFormat,
            w: &[u8],
            gb: usize,
            nb: usize,
            a: &[ActRow; $nt],
            o: &mut [&mut [f32]; $nt],
        ) {
            #[target_feature(enable = $feat)]
            unsafe fn inner(
                f: PackedFormat,
                w: &[u8],
                gb: usize,
                nb: usize,
                a: &[ActRow; $nt],
                o: &mut [&mut [f32]; $nt],
            ) {
                kernel::<$isa, $nt, $streams>(f, w, gb, nb, a, o)
            }
            // SAFETY: only reachable through a table that `simd::available`
            // returns after detecting `$feat`; the kernel checks the lengths
            // it indexes without checks.
            unsafe { inner(f, w, gb, nb, a, o) }
        }
    };
}

packed_entry!(for Avx512<false>, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c";
    avx512_t1: 1, avx512_t2: 2, avx512_t3: 3, avx512_t4_all: 4);
packed_entry!(for Avx512<true>, "avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c";
    gfni_t1: 1, gfni_t2: 2, gfni_t3: 3, gfni_t4_all: 4);
// AVX2: one token in four streams, two and three tokens in two.
packed_entry!(for Avx2, "avx2,fma,f16c"; avx2_t1: 1 / 4, avx2_t2: 2 / 2, avx2_t3: 3 / 2, avx2_t4: 4);

/// The AVX-512 kernels with one group of 16 rows a pass: the faster
/// prompts where a core runs one 512-bit `vpdpbusd` a cycle (see
/// [`crate::x86::pairs_pay`]).
pub const PACKED_AVX512: PackedKernels = PackedKernels {
    t1: avx512_t1,
    t2: avx512_t2,
    t3: avx512_t3,
    t4: avx512_t4_all,
    tiles: None,
    widen: Some(avx512_widen),
    widens: &[PackedFormat::Q5_0, PackedFormat::Q5_1],
};

/// [`PACKED_AVX512`] with prompts' groups in pairs ([`t4_pairs`]): the
/// faster where a core runs two a cycle.
pub const PACKED_AVX512_PAIRS: PackedKernels = PackedKernels {
    t4: avx512_t4,
    ..PACKED_AVX512
};

/// [`PACKED_AVX512`] with GFNI (fewer operations to unpack Q5_0's and
/// Q6_K's high bits); one group a pass.
pub const PACKED_GFNI: PackedKernels = PackedKernels {
    t1: gfni_t1,
    t2: gfni_t2,
    t3: gfni_t3,
    t4: gfni_t4_all,
    tiles: None,
    widen: Some(gfni_widen),
    widens: &[PackedFormat::Q5_0, PackedFormat::Q5_1],
};

/// [`PACKED_GFNI`] with prompts' groups in pairs.
pub const PACKED_GFNI_PAIRS: PackedKernels = PackedKernels {
    t4: gfni_t4,
    // (Not Q5_0: `q5_0_pairs_t4` reads it as stored.)
    widens: &[PackedFormat::Q5_1],
    ..PACKED_GFNI
};

pub const PACKED_AVX2: PackedKernels = PackedKernels {
    t1: avx2_t1,
    t2: avx2_t2,
    t3: avx2_t3,
    t4: avx2_t4,
    tiles: None,
    widen: Some(avx2_widen),
    widens: crate::packed::WIDENS_ALL,
};

/// A table's widening (`PackedKernels::widen`) with its features:
/// `widen_entry!(name, Isa, "features")`.
macro_rules! widen_entry {
    ($name:ident, $isa:ty, $feat:literal) => {
        fn $name(f: PackedFormat, src: &[u8], nb: usize, dst: &mut [u8]) {
            #[target_feature(enable = $feat)]
            unsafe fn inner(f: PackedFormat, src: &[u8], nb: usize, dst: &mut [u8]) {
                crate::packed::widen::<$isa>(f, src, nb, dst)
            }
            // SAFETY: only reachable through a table that `simd::available`
            // returns after detecting `$feat`; `widen` checks the lengths
            // it uses without checks.
            unsafe { inner(f, src, nb, dst) }
        }
    };
}

widen_entry!(
    avx512_widen,
    Avx512<false>,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
);
widen_entry!(
    gfni_widen,
    Avx512<true>,
    "avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c"
);
widen_entry!(avx2_widen, Avx2, "avx2,fma,f16c");

/// A table's `t4` entry.
type T4 = fn(PackedFormat, &[u8], usize, usize, &[ActRow; 4], &mut [&mut [f32]; 4]);

/// `t4` of the AVX-512 pair tables: Q8_0, widened Q5_0, Q4_K and (with GFNI)
/// Q5_0 as stored and Q6_K in pairs of groups, the rest (and an odd last
/// group) through `all`: every format of the shipped file's layer
/// matrices.
#[inline(always)]
fn t4_pairs<const GFNI: bool>(
    all: T4,
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) {
    let paired = match f {
        PackedFormat::Q8_0 | PackedFormat::Q5_0Wide | PackedFormat::Q4K => true,
        PackedFormat::Q6K | PackedFormat::Q5_0 => GFNI,
        _ => false,
    };
    if !paired {
        return all(f, w, gb, nb, a, o);
    }
    // SAFETY: reached only from the AVX-512 tables, which
    // `simd::available` returns after detecting these features; the
    // kernel checks the lengths it reads.
    let done = match f {
        PackedFormat::Q8_0 | PackedFormat::Q5_0Wide => unsafe {
            bytes_pairs_t4(f, w, gb, nb, a, o)
        },
        PackedFormat::Q4K => unsafe { q4k_pairs_t4(w, gb, nb, a, o) },
        // (Only on the GFNI pair table: `paired` above.)
        PackedFormat::Q6K => unsafe { q6k_pairs_t4(w, gb, nb, a, o) },
        PackedFormat::Q5_0 => unsafe { q5_0_pairs_t4(w, gb, nb, a, o) },
        _ => 0,
    };
    if done * gb < w.len() {
        let [o0, o1, o2, o3] = o;
        let r = done * crate::packed::LANES;
        all(
            f,
            &w[done * gb..],
            gb,
            nb,
            a,
            &mut [&mut o0[r..], &mut o1[r..], &mut o2[r..], &mut o3[r..]],
        );
    }
}

fn avx512_t4(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) {
    t4_pairs::<false>(avx512_t4_all, f, w, gb, nb, a, o)
}

fn gfni_t4(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) {
    t4_pairs::<true>(gfni_t4_all, f, w, gb, nb, a, o)
}

/// A value the compiler must hold in a register (so that a broadcast is
/// made once and read by several `vpdpbusd`, not folded into each as a
/// memory operand); a macro, to run inside the caller's target features.
macro_rules! in_reg {
    ($v:expr) => {{
        let mut v: __m512i = $v;
        std::arch::asm!("/* {0} */", inout(zmm_reg) v, options(pure, nomem, nostack, preserves_flags));
        v
    }};
}

/// The sums of groups 2p and 2p + 1 for the 4 tokens into `o`.
#[inline(always)]
unsafe fn store_pair(o: &mut [&mut [f32]; 4], p: usize, acc_a: [__m512; 4], acc_b: [__m512; 4]) {
    for t in 0..4 {
        _mm512_storeu_ps(o[t].as_mut_ptr().add(32 * p), acc_a[t]);
        _mm512_storeu_ps(o[t].as_mut_ptr().add(32 * p + 16), acc_b[t]);
    }
}

/// The 4 tokens' Q8_K blocks and −32·(sub-block sums), checked against
/// `nb` blocks, and their outputs against `groups` groups (what the pair
/// kernels then read and write without checks).
fn q8k_rows(
    f: PackedFormat,
    a: &[ActRow; 4],
    nb: usize,
    groups: usize,
    o: &[&mut [f32]; 4],
) -> ([*const crate::formats::BlockQ8K; 4], [*const i32; 4]) {
    let mut blocks = [std::ptr::null(); 4];
    let mut neg32 = [std::ptr::null(); 4];
    for t in 0..4 {
        assert!(o[t].len() >= groups * crate::packed::LANES);
        match a[t] {
            ActRow::Q8K {
                blocks: bl,
                neg32: n,
            } => {
                assert!(bl.len() >= nb && n.len() >= 16 * nb);
                blocks[t] = bl.as_ptr();
                neg32[t] = n.as_ptr();
            }
            _ => panic!("{f:?}: activations"),
        }
    }
    (blocks, neg32)
}

/// The body of [`bytes_pairs_t4`] (`$q5` false) and [`q5_0_pairs_t4`]
/// (true): a macro, so that each is compiled with its own target features
/// (`in_reg!`'s register class needs them where it is written).
macro_rules! bytes_pairs_body {
    ($q5:literal, $f:ident, $w:ident, $gb:ident, $nb:ident, $a:ident, $o:ident) => {{
        let (f, w, gb, nb, a, o) = ($f, $w, $gb, $nb, $a, $o);
        // (Unwidened Q5_0: 64 bytes of fifth bits, then 4 vectors of nibbles.)
        let core = if $q5 { 320 } else { 512 };
        // The layout this body reads must be the format's (another format
        // passed here would have it read past `w`).
        assert_eq!(core, f.core_bytes(), "{f:?}");
        let unit = 2 * core + 64;
        assert_eq!(gb, f.group_bytes(nb));
        let groups = w.len() / gb;
        let pairs = groups / 2;
        let mut qs = [std::ptr::null::<crate::formats::BlockQ8_0>(); 4];
        let mut start = [std::ptr::null::<i32>(); 4];
        for t in 0..4 {
            assert!(o[t].len() >= groups * 16);
            match a[t] {
                ActRow::Q8_0 {
                    blocks,
                    neg16,
                    neg128,
                    d,
                    ..
                } => {
                    assert!(
                        blocks.len() >= nb
                            && neg16.len() >= nb
                            && neg128.len() >= nb
                            && d.len() >= nb
                    );
                    qs[t] = blocks.as_ptr();
                    start[t] = match f {
                        PackedFormat::Q8_0 => neg128.as_ptr(),
                        PackedFormat::Q5_0Wide | PackedFormat::Q5_0 => neg16.as_ptr(),
                        _ => unreachable!("bytes_pairs_t4: {f:?}"),
                    };
                }
                _ => panic!("{f:?}: activations"),
            }
        }
        // Block b's 4 bytes k.. of token t, in a register.
        let y = |t: usize, b: usize, k: usize| -> __m512i {
            in_reg!(_mm512_set1_epi32(crate::packed::y4(&(*qs[t].add(b)).qs, k)))
        };
        for p in 0..pairs {
            let ga = w.as_ptr().add(2 * p * gb);
            let gz = ga.add(gb);
            let mut acc_a = [_mm512_setzero_ps(); 4];
            let mut acc_b = [_mm512_setzero_ps(); 4];
            let mut b = 0;
            let mut at = 0;
            while b < nb {
                let in_unit = 2.min(nb - b);
                for j in 0..in_unit {
                    let q = at + j * core;
                    let s = at + in_unit * core + 32 * j;
                    let mut is_a: [__m512i; 4] =
                        std::array::from_fn(|t| _mm512_set1_epi32(*start[t].add(b + j)));
                    let mut is_b = is_a;
                    for c in 0..4 {
                        // Vector c's low and high weights, as the generic
                        // kernels read them.
                        let vectors = |g: *const u8| {
                            if $q5 {
                                crate::packed::q5_0_vectors::<Avx512<true>>(g.add(q), c)
                            } else {
                                (
                                    _mm512_loadu_si512(g.add(q + 64 * c) as *const _),
                                    _mm512_loadu_si512(g.add(q + 256 + 64 * c) as *const _),
                                )
                            }
                        };
                        let ((la, ha), (lb, hb)) = (vectors(ga), vectors(gz));
                        for t in 0..4 {
                            let (yl, yh) = (y(t, b + j, 4 * c), y(t, b + j, 16 + 4 * c));
                            is_a[t] = _mm512_dpbusd_epi32(is_a[t], la, yl);
                            is_b[t] = _mm512_dpbusd_epi32(is_b[t], lb, yl);
                            is_a[t] = _mm512_dpbusd_epi32(is_a[t], ha, yh);
                            is_b[t] = _mm512_dpbusd_epi32(is_b[t], hb, yh);
                        }
                    }
                    type I = Avx512<false>;
                    crate::packed::block_finish::<I, 4>(&mut acc_a, ga.add(s), a, b + j, is_a);
                    crate::packed::block_finish::<I, 4>(&mut acc_b, gz.add(s), a, b + j, is_b);
                }
                at += unit;
                b += in_unit;
            }
            store_pair(o, p, acc_a, acc_b);
        }
        2 * pairs
    }};
}

/// 4 tokens over pairs of groups of a format whose quants are plain bytes
/// (Q8_0, widened Q5_0): each activation broadcast is made once, into a
/// register, and feeds both groups' `vpdpbusd`s. Returns the groups done
/// (an even number); the same integer sums and float steps, in the same
/// order, as `kernel`, so the same bits.
///
/// The generic kernel takes one group a pass and folds each broadcast into
/// its `vpdpbusd` as a memory operand: per block and 4 tokens, 32 products,
/// 8 weight loads and 32 broadcast loads, where here 64 products take 16
/// and 32. On the Zen 5 (which can start two `vpdpbusd` a cycle) the loads
/// were what bound it: one thread, 512 tokens, old and new in turn in one
/// process (`examples/pairs_ab.rs`, best of 39), ffn_gate 278–283 → 333–336
/// G multiply-adds/s, attn_q 262–272 → 313–326, Q8_0 640 → 256 205–207 →
/// 227–235; pp512 on one thread 1834–1913 → 1957–1996 tok/s (3 alternating
/// rounds). An earlier try at two groups a pass inside the generic kernel
/// left the broadcasts to the compiler, which folded them into memory
/// operands again (two loads instead of one) or spilled; the empty `asm`
/// of `in_reg!` is what keeps each in a register.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bytes_pairs_t4(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) -> usize {
    bytes_pairs_body!(false, f, w, gb, nb, a, o)
}

/// [`bytes_pairs_t4`] for Q5_0 as stored (not widened), each vector's
/// nibbles joined to its fifth bits by GFNI's bit-matrix transform as
/// `group_q5_0` does: the GFNI pair table does not widen Q5_0. With the
/// weights in cache (one thread, in turn in one process, best of 39) it
/// ran as fast as the pairs over widened groups, or faster: at 64 tokens
/// attn_q 226–285 → 232–292 G multiply-adds/s and ffn_gate 302–310 →
/// 320–323; at 512 attn_q 266–308 → 281–310, ffn_gate 295–300 → 298–306.
/// In the model it also needs a task's weights read ahead of its passes
/// (see `packed_groups`), which widening had done for Q5_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c")]
unsafe fn q5_0_pairs_t4(
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) -> usize {
    let f = PackedFormat::Q5_0;
    bytes_pairs_body!(true, f, w, gb, nb, a, o)
}

/// [`bytes_pairs_t4`] for Q4_K: per super-block of 256 columns and pair of
/// sub-blocks (2c, 2c + 1), each token's two partial sums over the pair's 8
/// nibble vectors (low and high nibbles), times the rows' sub-block scales
/// in exact integers; the minimums' sums and the float steps as
/// `group_q4k`'s (so the same bits). One thread, 512 tokens, in turn with
/// the one-group kernel in one process (`examples/pairs_ab.rs`, best of
/// 39, three runs): attn_output 289–302 → 317–329 G multiply-adds/s,
/// ffn_down (Q4_K) 297–305 → 323–332. Widening Q4_K to bytes first (as
/// the AVX2 table does) and pairing the widened groups measured no faster
/// than the one-group kernel: 35 KB a widened group of 2048 columns, and
/// a `vpmulld` per 8 `vpdpbusd` either way.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_pairs_t4(
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) -> usize {
    type I = Avx512<false>;
    let f = PackedFormat::Q4K;
    let core = f.core_bytes();
    let unit = core + f.scale_bytes();
    assert_eq!(gb, f.group_bytes(nb));
    assert_eq!(gb, nb * unit, "one block a unit");
    let groups = w.len() / gb;
    let pairs = groups / 2;
    let (blocks, _) = q8k_rows(f, a, nb, groups, o);
    for p in 0..pairs {
        let ga = w.as_ptr().add(2 * p * gb);
        let gz = ga.add(gb);
        let mut acc_a = [_mm512_setzero_ps(); 4];
        let mut acc_b = [_mm512_setzero_ps(); 4];
        for b in 0..nb {
            let (ca, cz) = (ga.add(b * unit), gz.add(b * unit));
            let y: [&crate::formats::BlockQ8K; 4] = std::array::from_fn(|t| &*blocks[t].add(b));
            let mut s_a = [_mm512_setzero_si512(); 4];
            let mut s_b = [_mm512_setzero_si512(); 4];
            for c in 0..4 {
                let z = _mm512_setzero_si512();
                let (mut la, mut ha, mut lb, mut hb) = ([z; 4], [z; 4], [z; 4], [z; 4]);
                for g in 0..8 {
                    let (a_lo, a_hi) = crate::packed::q4k_pair::<I, false>(ca, c, g);
                    let (b_lo, b_hi) = crate::packed::q4k_pair::<I, false>(cz, c, g);
                    for t in 0..4 {
                        let q = y[t].qs.as_ptr().add(64 * c + 4 * g);
                        let yl = in_reg!(_mm512_set1_epi32((q as *const i32).read_unaligned()));
                        let yh = in_reg!(_mm512_set1_epi32(
                            (q.add(32) as *const i32).read_unaligned()
                        ));
                        la[t] = _mm512_dpbusd_epi32(la[t], a_lo, yl);
                        lb[t] = _mm512_dpbusd_epi32(lb[t], b_lo, yl);
                        ha[t] = _mm512_dpbusd_epi32(ha[t], a_hi, yh);
                        hb[t] = _mm512_dpbusd_epi32(hb[t], b_hi, yh);
                    }
                }
                let sc = |g: *const u8, j: usize| {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(g.add(16 * j) as *const _))
                };
                let (sal, sah, sbl, sbh) = (
                    sc(ca, 2 * c),
                    sc(ca, 2 * c + 1),
                    sc(cz, 2 * c),
                    sc(cz, 2 * c + 1),
                );
                for t in 0..4 {
                    s_a[t] = _mm512_add_epi32(s_a[t], _mm512_mullo_epi32(la[t], sal));
                    s_a[t] = _mm512_add_epi32(s_a[t], _mm512_mullo_epi32(ha[t], sah));
                    s_b[t] = _mm512_add_epi32(s_b[t], _mm512_mullo_epi32(lb[t], sbl));
                    s_b[t] = _mm512_add_epi32(s_b[t], _mm512_mullo_epi32(hb[t], sbh));
                }
            }
            let (m_a, m_b) = (
                crate::packed::q4k_min_sums::<I, 4>(ca, b, a),
                crate::packed::q4k_min_sums::<I, 4>(cz, b, a),
            );
            let (sa, sz) = (ca.add(core), cz.add(core));
            let (da, dza) = (
                _mm512_cvtph_ps(_mm256_loadu_si256(sa as *const _)),
                _mm512_cvtph_ps(_mm256_loadu_si256(sa.add(32) as *const _)),
            );
            let (db, dzb) = (
                _mm512_cvtph_ps(_mm256_loadu_si256(sz as *const _)),
                _mm512_cvtph_ps(_mm256_loadu_si256(sz.add(32) as *const _)),
            );
            for t in 0..4 {
                let dy = _mm512_set1_ps(y[t].d);
                let (ma, mb) = (m_a[t], m_b[t]);
                acc_a[t] =
                    _mm512_fmadd_ps(_mm512_mul_ps(da, dy), _mm512_cvtepi32_ps(s_a[t]), acc_a[t]);
                acc_a[t] =
                    _mm512_fnmadd_ps(_mm512_mul_ps(dza, dy), _mm512_cvtepi32_ps(ma), acc_a[t]);
                acc_b[t] =
                    _mm512_fmadd_ps(_mm512_mul_ps(db, dy), _mm512_cvtepi32_ps(s_b[t]), acc_b[t]);
                acc_b[t] =
                    _mm512_fnmadd_ps(_mm512_mul_ps(dzb, dy), _mm512_cvtepi32_ps(mb), acc_b[t]);
            }
        }
        store_pair(o, p, acc_a, acc_b);
    }
    2 * pairs
}

/// [`bytes_pairs_t4`] for Q6_K (on the GFNI pair table, whose bit-matrix
/// transform moves each vector's two high bits in one instruction): per
/// super-block and sub-block j of 16 columns, each token's sum from
/// −32·Σy over the sub-block's 4 vectors (two at a time for both groups,
/// to leave registers for the sums), times the rows' sub-block scales in
/// exact integers; the float step as `group_q6k`'s (so the same bits).
/// One thread, 512 tokens, in turn with the one-group kernel in one
/// process (best of 39, three runs): ffn_down (Q6_K) 274–281 → 308–314 G
/// multiply-adds/s.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c")]
unsafe fn q6k_pairs_t4(
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; 4],
    o: &mut [&mut [f32]; 4],
) -> usize {
    let f = PackedFormat::Q6K;
    let (core, sb) = (f.core_bytes(), f.scale_bytes());
    assert_eq!(gb, f.group_bytes(nb));
    let groups = w.len() / gb;
    let pairs = groups / 2;
    type I = Avx512<true>;
    let (blocks, neg32) = q8k_rows(f, a, nb, groups, o);
    let m4 = I::splat8(0x0F);
    // Vector i of a sub-block: nibbles joined to their two high bits, as
    // `q6k_vectors` makes them (two at a time here).
    let vec = |v: __m512i, c: __m512i, i: usize| {
        let lo = if i.is_multiple_of(2) {
            v
        } else {
            I::shr::<4>(v)
        };
        I::and_or(lo, m4, I::two_bits(c, i))
    };
    for p in 0..pairs {
        let ga = w.as_ptr().add(2 * p * gb);
        let gz = ga.add(gb);
        let mut acc_a = [_mm512_setzero_ps(); 4];
        let mut acc_b = [_mm512_setzero_ps(); 4];
        for b in 0..nb {
            let (qo, so) = crate::packed::block_offsets(core, sb, nb, b);
            let (ca, cz) = (ga.add(qo), gz.add(qo));
            let y: [&crate::formats::BlockQ8K; 4] = std::array::from_fn(|t| &*blocks[t].add(b));
            let mut s_a = [_mm512_setzero_si512(); 4];
            let mut s_b = [_mm512_setzero_si512(); 4];
            for j in 0..16 {
                let start: [__m512i; 4] =
                    std::array::from_fn(|t| _mm512_set1_epi32(*neg32[t].add(16 * b + j)));
                let (mut is_a, mut is_b) = (start, start);
                let (ba, bz) = (ca.add(256 + 192 * j), cz.add(256 + 192 * j));
                let (hca, hcb) = (
                    _mm512_loadu_si512(ba.add(128) as *const _),
                    _mm512_loadu_si512(bz.add(128) as *const _),
                );
                for h in 0..2 {
                    // Vectors 2h and 2h + 1: one load's low and high nibbles.
                    let va = _mm512_loadu_si512(ba.add(64 * h) as *const _);
                    let vb = _mm512_loadu_si512(bz.add(64 * h) as *const _);
                    let (a0, a1) = (vec(va, hca, 2 * h), vec(va, hca, 2 * h + 1));
                    let (b0, b1) = (vec(vb, hcb, 2 * h), vec(vb, hcb, 2 * h + 1));
                    for t in 0..4 {
                        let q = y[t].qs.as_ptr().add(16 * j + 8 * h);
                        let y0 = in_reg!(_mm512_set1_epi32((q as *const i32).read_unaligned()));
                        let y1 =
                            in_reg!(_mm512_set1_epi32((q.add(4) as *const i32).read_unaligned()));
                        is_a[t] = _mm512_dpbusd_epi32(is_a[t], a0, y0);
                        is_b[t] = _mm512_dpbusd_epi32(is_b[t], b0, y0);
                        is_a[t] = _mm512_dpbusd_epi32(is_a[t], a1, y1);
                        is_b[t] = _mm512_dpbusd_epi32(is_b[t], b1, y1);
                    }
                }
                let sc =
                    |c: *const u8| _mm512_cvtepi8_epi32(_mm_loadu_si128(c.add(16 * j) as *const _));
                let (sca, scb) = (sc(ca), sc(cz));
                for t in 0..4 {
                    s_a[t] = _mm512_add_epi32(s_a[t], _mm512_mullo_epi32(is_a[t], sca));
                    s_b[t] = _mm512_add_epi32(s_b[t], _mm512_mullo_epi32(is_b[t], scb));
                }
            }
            crate::packed::super_finish::<I, 4>(&mut acc_a, ga.add(so), a, b, s_a);
            crate::packed::super_finish::<I, 4>(&mut acc_b, gz.add(so), a, b, s_b);
        }
        store_pair(o, p, acc_a, acc_b);
    }
    2 * pairs
}
