#![allow(clippy::needless_range_loop)] // SIMD kernels index parallel arrays of registers by row/token
//! x86-64 SIMD kernels (AVX2 + FMA + F16C, and AVX-512 VNNI for the int8
//! products), selected at run time by [`crate::simd`].
//!
//! Each kernel computes a tile of NR weight rows × NT activation rows (1 or
//! 4 each): a weight block is unpacked once for all NT tokens and an
//! activation block loaded once for all NR rows. Every (row, token) pair has
//! its own accumulator, fed block by block in order and summed horizontally
//! at the end, so a result does not depend on the tile it was computed in
//! (a token's logits are the same alone or in a batch).
//!
//! Integer products are exact in both the AVX2 (maddubs/madd) and the VNNI
//! (dpbusd) forms, so the two tables give bit-identical results.
//!
//! ref: the block layouts in formats.rs; the sign trick for signed×signed
//! int8 products and the 0xF0 trick for Q5_0's fifth bit follow ggml-cpu's
//! x86 quants.c.

use crate::formats::*;
use crate::simd::{DotKernels, Tiles};
use std::arch::x86_64::*;

pub fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn gfni_available() -> bool {
    vnni_available() && is_x86_feature_detected!("gfni")
}

pub fn vnni_available() -> bool {
    avx2_available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
}

/// The CPU's family if it is an AMD one (the base family plus the
/// extended family, as AMD numbers them: 25 is Zen 3 and Zen 4, 26 Zen 5).
pub(crate) fn amd_family() -> Option<u32> {
    use std::arch::x86_64::__cpuid;
    // (`__cpuid` is an unsafe fn in older toolchains, safe in newer ones.)
    // SAFETY: CPUID leaves 0 and 1 exist on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let (v, l1) = unsafe { (__cpuid(0), __cpuid(1)) };
    let amd = [v.ebx, v.edx, v.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
    let base = (l1.eax >> 8) & 0xF;
    let ext = if base == 0xF {
        (l1.eax >> 20) & 0xFF
    } else {
        0
    };
    amd.then_some(base + ext)
}

/// Whether prompts take their byte-quant groups in pairs by default (the
/// `-pairs` tables): on an AMD family 26 CPU (Zen 5), where it was measured
/// to pay, and nowhere else.
///
/// Pairs pay where a core starts two 512-bit `vpdpbusd` a cycle, so that
/// its loads, not its multiply-adds, bound the one-group loop: on the
/// Zen 5 server core they ran each kernel 8–21% faster in cache. A
/// core that runs a 512-bit `vpdpbusd` as two 256-bit halves, one a cycle,
/// has loads to spare, and there the pairs' extra registers and setup cost
/// more than they save: on a Zen 4 (family 25), the model in one process
/// with the tables in turn (medians), pp512 on one thread 872 tok/s with
/// pairs against 987 with one group (which also widens Q5_0), on two
/// threads 1645 against 1890 (`docs/performance.md`). Other CPUs are
/// unmeasured and take the one-group kernels, the older ones, measured on
/// more hosts. (Zen 5 mobile parts, family 26 but by AMD's account with
/// 256-bit halves like the Zen 4's, are unmeasured too.)
pub(crate) fn pairs_pay() -> bool {
    amd_family() == Some(26)
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

/// How far ahead to prefetch weights, given the bytes of one tile of rows:
/// whole tiles, at least 16 KiB. Measured on the 262144×640 Q8_0 head (one
/// thread, Zen 4): no prefetch 32 ms, 2 tiles into L1 22 ms, 8 tiles into L2
/// 10 ms. Prefetches into L1 occupy the few line-fill buffers that demand
/// loads need; into L2 they queue in the much deeper L2 miss queue.
#[inline(always)]
fn prefetch_distance(tile_bytes: usize) -> usize {
    tile_bytes * (16 * 1024 / tile_bytes.max(1)).max(2)
}

/// Prefetch into L2 the cache lines of a block `ahead` bytes past `p` (a
/// hint: it never faults, even past the end of the mapping).
#[inline(always)]
unsafe fn prefetch(p: *const u8, ahead: usize) {
    let q = p.wrapping_add(ahead) as *const i8;
    _mm_prefetch::<_MM_HINT_T1>(q);
    _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(64));
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
pub(crate) unsafe fn bits_to_bytes(x: u32) -> __m256i {
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

/// Blocks per row of a tile, after checking that all weight rows have that
/// many and every activation row at least as many (the kernels index
/// without bounds checks).
#[inline(always)]
fn tile_blocks<W, A, const NR: usize, const NT: usize>(w: &[&[W]; NR], a: &[&[A]; NT]) -> usize {
    // Plain loops: closures would not be inlined into the kernels.
    let nb = w[0].len();
    for r in w {
        assert!(r.len() == nb, "tile rows differ in length");
    }
    for t in a {
        assert!(t.len() >= nb, "activation rows shorter than weight rows");
    }
    nb
}

// ---------------------------------------------------------------- Q8_0, Q4_0, Q5_0
//
// No closures below: a closure does not inherit the enclosing function's
// target features, so intrinsics inside one would not be inlined.

/// A legacy 32-element block: its signed quants and its f16 scale.
trait Legacy {
    unsafe fn unpack(&self) -> (__m256i, [u8; 2]);
    /// The same values, for callers compiled with AVX-512 BW+VL (mask ops).
    #[inline(always)]
    unsafe fn unpack_avx512(&self) -> (__m256i, [u8; 2]) {
        self.unpack()
    }
}

impl Legacy for BlockQ8_0 {
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, [u8; 2]) {
        (load(&self.qs), self.d)
    }
}

impl Legacy for BlockQ4_0 {
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, [u8; 2]) {
        (
            _mm256_sub_epi8(nibbles32(&self.qs), _mm256_set1_epi8(8)),
            self.d,
        )
    }
}

impl Legacy for BlockQ5_0 {
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, [u8; 2]) {
        // q - 16: where the fifth bit is clear, OR-ing 0xF0 onto the nibble
        // gives the nibble - 16 in two's complement; where set, q - 16 = nibble.
        let hi = _mm256_andnot_si256(
            bits_to_bytes(u32::from_le_bytes(self.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        (_mm256_or_si256(nibbles32(&self.qs), hi), self.d)
    }

    #[inline(always)]
    unsafe fn unpack_avx512(&self) -> (__m256i, [u8; 2]) {
        // The fifth bits are a ready-made byte mask: subtract 16 where clear.
        let fifth: __mmask32 = u32::from_le_bytes(self.qh);
        let nib = nibbles32(&self.qs);
        (
            _mm256_mask_sub_epi8(nib, !fifth, nib, _mm256_set1_epi8(16)),
            self.d,
        )
    }
}

#[inline(always)]
unsafe fn tile_legacy<D: Int8Dot, W: Legacy, const NR: usize, const NT: usize>(
    w: [&[W]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    let nb = tile_blocks(&w, &a);
    let mut acc = [[_mm256_setzero_ps(); NT]; NR];
    // Matrix rows are contiguous, and the next tile's rows follow this one's:
    // prefetch the same block of the row NR rows further down.
    let ahead = prefetch_distance(NR * nb * std::mem::size_of::<W>());
    for i in 0..nb {
        let mut x = [_mm256_setzero_si256(); NR];
        let mut dx = [0.0f32; NR];
        for r in 0..NR {
            prefetch(w[r].as_ptr().add(i) as *const u8, ahead);
            let (q, d) = w[r].get_unchecked(i).unpack();
            x[r] = q;
            dx[r] = f16_to_f32(d);
        }
        for t in 0..NT {
            let yb = a[t].get_unchecked(i);
            let y = load(&yb.qs);
            let dy = f16_to_f32(yb.d);
            for r in 0..NR {
                let p = dot_ss::<D>(x[r], y);
                acc[r][t] =
                    _mm256_fmadd_ps(_mm256_set1_ps(dx[r] * dy), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    let mut out = [[0.0f32; NT]; NR];
    for r in 0..NR {
        for t in 0..NT {
            out[r][t] = hsum_ps(acc[r][t]);
        }
    }
    out
}

#[inline(always)]
unsafe fn q8_0<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ8_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy::<D, _, NR, NT>(w, a)
}

#[inline(always)]
unsafe fn q4_0<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ4_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy::<D, _, NR, NT>(w, a)
}

#[inline(always)]
unsafe fn q5_0<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ5_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy::<D, _, NR, NT>(w, a)
}

/// The legacy tile with AVX-512: two consecutive blocks per 512-bit vector
/// (lanes 0..8 hold block i's partial sums, lanes 8..16 block i+1's), which
/// halves the instructions per block. Used by the VNNI table only; results
/// still do not depend on the tile shape.
#[inline(always)]
unsafe fn tile_legacy512<W: Legacy, const NR: usize, const NT: usize>(
    w: [&[W]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    let nb = tile_blocks(&w, &a);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); NT]; NR];
    let ahead = prefetch_distance(NR * nb * std::mem::size_of::<W>());
    let mut i = 0;
    while i < nb {
        // A pair of blocks, or the last block alone (upper half zero). Scales
        // are splatted per half: [d_i × 8, d_i+1 × 8].
        let pair = i + 1 < nb;
        let mut ux = [zero; NR];
        let mut dx = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            prefetch(w[r].as_ptr().add(i) as *const u8, ahead);
            let (q0, d0) = w[r].get_unchecked(i).unpack_avx512();
            let (x, d1) = if pair {
                let (q1, d1) = w[r].get_unchecked(i + 1).unpack_avx512();
                (
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1),
                    f16_to_f32(d1),
                )
            } else {
                (_mm512_zextsi256_si512(q0), 0.0)
            };
            dx[r] = _mm512_insertf32x8::<1>(_mm512_set1_ps(f16_to_f32(d0)), _mm256_set1_ps(d1));
            // x + 128 as unsigned bytes (dpbusd multiplies u8 by i8).
            ux[r] = _mm512_xor_si512(x, _mm512_set1_epi8(-128));
        }
        for t in 0..NT {
            let y0 = a[t].get_unchecked(i);
            let (y, dy1) = if pair {
                let y1 = a[t].get_unchecked(i + 1);
                (
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(&y0.qs)), load(&y1.qs)),
                    f16_to_f32(y1.d),
                )
            } else {
                (_mm512_zextsi256_si512(load(&y0.qs)), 0.0)
            };
            let dy = _mm512_insertf32x8::<1>(_mm512_set1_ps(f16_to_f32(y0.d)), _mm256_set1_ps(dy1));
            // Σ (x + 128)·y - 128·Σ y = Σ x·y: start each product's
            // accumulator at -128 × (partial sums of y), shared by all rows.
            let corr = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), y));
            for r in 0..NR {
                let p = _mm512_dpbusd_epi32(corr, ux[r], y);
                acc[r][t] =
                    _mm512_fmadd_ps(_mm512_mul_ps(dx[r], dy), _mm512_cvtepi32_ps(p), acc[r][t]);
            }
        }
        i += 2;
    }
    let mut out = [[0.0f32; NT]; NR];
    for r in 0..NR {
        for t in 0..NT {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // same shape as the other kernels for `entry!`
unsafe fn q8_0_512<D, const NR: usize, const NT: usize>(
    w: [&[BlockQ8_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy512::<_, NR, NT>(w, a)
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)]
unsafe fn q4_0_512<D, const NR: usize, const NT: usize>(
    w: [&[BlockQ4_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy512::<_, NR, NT>(w, a)
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)]
unsafe fn q5_0_512<D, const NR: usize, const NT: usize>(
    w: [&[BlockQ5_0]; NR],
    a: [&[BlockQ8_0]; NT],
) -> [[f32; NT]; NR] {
    tile_legacy512::<_, NR, NT>(w, a)
}

// ---------------------------------------------------------------- K-quants

/// An unpacked Q4_K/Q5_K block: 4 chunks of (low, high) unsigned quants,
/// 8 sub-block scales and mins, and the super-block scales.
#[derive(Clone, Copy)]
struct K4 {
    lo: [__m256i; 4],
    hi: [__m256i; 4],
    sc: [i32; 8],
    /// The 8 sub-block mins as i32 lanes.
    mn: __m256i,
    d: f32,
    dmin: f32,
}

trait KQuant4 {
    unsafe fn unpack(&self) -> K4;
}

#[inline(always)]
unsafe fn k4_scales(scales: &[u8; 12], sc: &mut [i32; 8], mn: &mut __m256i) {
    let mut m = [0i32; 8];
    for j in 0..8 {
        let (s, mj) = scale_min_k4(j, scales);
        sc[j] = s as i32;
        m[j] = mj as i32;
    }
    *mn = _mm256_loadu_si256(m.as_ptr() as *const __m256i);
}

impl KQuant4 for BlockQ4K {
    #[inline(always)]
    unsafe fn unpack(&self) -> K4 {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut k = K4 {
            lo: [_mm256_setzero_si256(); 4],
            hi: [_mm256_setzero_si256(); 4],
            sc: [0; 8],
            mn: _mm256_setzero_si256(),
            d: f16_to_f32(self.d),
            dmin: f16_to_f32(self.dmin),
        };
        for c in 0..4 {
            let v = loadu8(&self.qs[32 * c..]);
            k.lo[c] = _mm256_and_si256(v, m4);
            k.hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        k4_scales(&self.scales, &mut k.sc, &mut k.mn);
        k
    }
}

impl KQuant4 for BlockQ5K {
    #[inline(always)]
    unsafe fn unpack(&self) -> K4 {
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let hbits = loadu8(&self.qh);
        let mut k = K4 {
            lo: [_mm256_setzero_si256(); 4],
            hi: [_mm256_setzero_si256(); 4],
            sc: [0; 8],
            mn: _mm256_setzero_si256(),
            d: f16_to_f32(self.d),
            dmin: f16_to_f32(self.dmin),
        };
        for c in 0..4 {
            let v = loadu8(&self.qs[32 * c..]);
            // Bit 2c (low nibbles) and 2c+1 (high nibbles) of each qh byte, moved to bit 4.
            let h0 = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32)),
                one,
            );
            let h1 = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32 + 1)),
                one,
            );
            k.lo[c] = _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_slli_epi16(h0, 4));
            k.hi[c] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                _mm256_slli_epi16(h1, 4),
            );
        }
        k4_scales(&self.scales, &mut k.sc, &mut k.mn);
        k
    }
}

/// Q4_K/Q5_K tile: Σ_j sc_j·Σ q·y over 8 sub-blocks, minus the mins term
/// Σ_j m_j·(bsum_2j + bsum_2j+1) (kept in a separate scalar accumulator).
#[inline(always)]
unsafe fn tile_k4<D: Int8Dot, W: KQuant4, const NR: usize, const NT: usize>(
    w: [&[W]; NR],
    a: [&[BlockQ8K]; NT],
) -> [[f32; NT]; NR] {
    let nb = tile_blocks(&w, &a);
    let mut acc = [[_mm256_setzero_ps(); NT]; NR];
    let mut accm = [[_mm256_setzero_ps(); NT]; NR];
    let ahead = prefetch_distance(NR * nb * std::mem::size_of::<W>());
    for i in 0..nb {
        for r in 0..NR {
            prefetch(w[r].as_ptr().add(i) as *const u8, ahead);
        }
        let mut k = [w[0].get_unchecked(i).unpack(); NR];
        for r in 1..NR {
            k[r] = w[r].get_unchecked(i).unpack();
        }
        for t in 0..NT {
            let y = a[t].get_unchecked(i);
            // bsums of each 32-element sub-block: adjacent pairs of the 16 sums.
            let b16 = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let bs = _mm256_madd_epi16(b16, _mm256_set1_epi16(1));
            for r in 0..NR {
                let kr = &k[r];
                let mut sumi = _mm256_setzero_si256();
                for c in 0..4 {
                    let p0 = D::dot_us(kr.lo[c], load(&y.qs[64 * c..]));
                    let p1 = D::dot_us(kr.hi[c], load(&y.qs[64 * c + 32..]));
                    sumi = _mm256_add_epi32(
                        sumi,
                        _mm256_mullo_epi32(p0, _mm256_set1_epi32(kr.sc[2 * c])),
                    );
                    sumi = _mm256_add_epi32(
                        sumi,
                        _mm256_mullo_epi32(p1, _mm256_set1_epi32(kr.sc[2 * c + 1])),
                    );
                }
                let m = _mm256_mullo_epi32(kr.mn, bs);
                acc[r][t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(kr.d * y.d),
                    _mm256_cvtepi32_ps(sumi),
                    acc[r][t],
                );
                accm[r][t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(kr.dmin * y.d),
                    _mm256_cvtepi32_ps(m),
                    accm[r][t],
                );
            }
        }
    }
    let mut out = [[0.0f32; NT]; NR];
    for r in 0..NR {
        for t in 0..NT {
            out[r][t] = hsum_ps(acc[r][t]) - hsum_ps(accm[r][t]);
        }
    }
    out
}

#[inline(always)]
unsafe fn q4k<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ4K]; NR],
    a: [&[BlockQ8K]; NT],
) -> [[f32; NT]; NR] {
    tile_k4::<D, _, NR, NT>(w, a)
}

#[inline(always)]
unsafe fn q5k<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ5K]; NR],
    a: [&[BlockQ8K]; NT],
) -> [[f32; NT]; NR] {
    tile_k4::<D, _, NR, NT>(w, a)
}

#[inline(always)]
unsafe fn q6k<D: Int8Dot, const NR: usize, const NT: usize>(
    w: [&[BlockQ6K]; NR],
    a: [&[BlockQ8K]; NT],
) -> [[f32; NT]; NR] {
    let nb = tile_blocks(&w, &a);
    let mut acc = [[_mm256_setzero_ps(); NT]; NR];
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let m32 = _mm256_set1_epi8(32);
    for i in 0..nb {
        // Per row: 8 groups of 32 unsigned 6-bit quants (0..63) in element
        // order, and the scales of each group's two 16-element halves (one
        // per 128-bit lane).
        let mut q = [[_mm256_setzero_si256(); 8]; NR];
        let mut sc = [[_mm256_setzero_si256(); 8]; NR];
        let mut d = [0.0f32; NR];
        for r in 0..NR {
            prefetch(
                w[r].as_ptr().add(i) as *const u8,
                prefetch_distance(NR * nb * std::mem::size_of::<BlockQ6K>()),
            );
            let b = w[r].get_unchecked(i);
            for n in 0..2 {
                let ql0 = loadu8(&b.ql[64 * n..]);
                let ql1 = loadu8(&b.ql[64 * n + 32..]);
                let qh = loadu8(&b.qh[32 * n..]);
                q[r][4 * n] = _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                );
                q[r][4 * n + 1] = _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                );
                q[r][4 * n + 2] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(qh, m30),
                );
                q[r][4 * n + 3] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                );
            }
            for g in 0..8 {
                sc[r][g] = _mm256_set_m128i(
                    _mm_set1_epi32(b.scales[2 * g + 1] as i32),
                    _mm_set1_epi32(b.scales[2 * g] as i32),
                );
            }
            d[r] = f16_to_f32(b.d);
        }
        for t in 0..NT {
            let y = a[t].get_unchecked(i);
            for r in 0..NR {
                let mut sumi = _mm256_setzero_si256();
                for g in 0..8 {
                    let yv = load(&y.qs[32 * g..]);
                    // Σ (q - 32)·y = Σ q·y - 32·Σ y, both exact in i32.
                    let p = _mm256_sub_epi32(D::dot_us(q[r][g], yv), D::dot_us(m32, yv));
                    sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, sc[r][g]));
                }
                acc[r][t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d[r] * y.d),
                    _mm256_cvtepi32_ps(sumi),
                    acc[r][t],
                );
            }
        }
    }
    let mut out = [[0.0f32; NT]; NR];
    for r in 0..NR {
        for t in 0..NT {
            out[r][t] = hsum_ps(acc[r][t]);
        }
    }
    out
}

// ---------------------------------------------------------------- tables

/// Safe entry points: per (kernel, table, token count) a `#[target_feature]`
/// function into which the generic kernel is inlined, running a task's rows
/// in 4-row tiles (1-row tail), and a safe wrapper that is only placed in a
/// table after the CPU features were detected.
macro_rules! rows_entry {
    ($name:ident, $kernel:ident, $d:ty, $feat:literal, $w:ty, $a:ty, $nt:literal) => {
        fn $name(w: &[$w], nb: usize, a: [&[$a]; $nt], out: &mut [f32]) {
            #[target_feature(enable = $feat)]
            unsafe fn inner(w: &[$w], nb: usize, a: [&[$a]; $nt], out: &mut [f32]) {
                assert!(nb > 0 && w.len() % nb == 0, "rows of {nb} blocks");
                let nrows = w.len() / nb;
                assert!(out.len() >= nrows * $nt);
                let mut r = 0;
                while r + 4 <= nrows {
                    let ws = [
                        &w[r * nb..(r + 1) * nb],
                        &w[(r + 1) * nb..(r + 2) * nb],
                        &w[(r + 2) * nb..(r + 3) * nb],
                        &w[(r + 3) * nb..(r + 4) * nb],
                    ];
                    let v = $kernel::<$d, 4, $nt>(ws, a);
                    for i in 0..4 {
                        for t in 0..$nt {
                            out[(r + i) * $nt + t] = v[i][t];
                        }
                    }
                    r += 4;
                }
                while r < nrows {
                    let v = $kernel::<$d, 1, $nt>([&w[r * nb..(r + 1) * nb]], a);
                    for t in 0..$nt {
                        out[r * $nt + t] = v[0][t];
                    }
                    r += 1;
                }
            }
            // SAFETY: this function is only reachable through a kernel table
            // that `simd::available` returns after detecting `$feat`.
            unsafe { inner(w, nb, a, out) }
        }
    };
}

rows_entry!(
    avx2_q8_0_rows1,
    q8_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ8_0,
    BlockQ8_0,
    1
);
rows_entry!(
    avx2_q8_0_rows4,
    q8_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ8_0,
    BlockQ8_0,
    4
);
rows_entry!(
    avx2_q4_0_rows1,
    q4_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4_0,
    BlockQ8_0,
    1
);
rows_entry!(
    avx2_q4_0_rows4,
    q4_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4_0,
    BlockQ8_0,
    4
);
rows_entry!(
    avx2_q5_0_rows1,
    q5_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5_0,
    BlockQ8_0,
    1
);
rows_entry!(
    avx2_q5_0_rows4,
    q5_0,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5_0,
    BlockQ8_0,
    4
);
rows_entry!(
    avx2_q4k_rows1,
    q4k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4K,
    BlockQ8K,
    1
);
rows_entry!(
    avx2_q4k_rows4,
    q4k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ4K,
    BlockQ8K,
    4
);
rows_entry!(
    avx2_q5k_rows1,
    q5k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5K,
    BlockQ8K,
    1
);
rows_entry!(
    avx2_q5k_rows4,
    q5k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ5K,
    BlockQ8K,
    4
);
rows_entry!(
    avx2_q6k_rows1,
    q6k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ6K,
    BlockQ8K,
    1
);
rows_entry!(
    avx2_q6k_rows4,
    q6k,
    Avx2,
    "avx2,fma,f16c",
    BlockQ6K,
    BlockQ8K,
    4
);
rows_entry!(
    vnni_q8_0_rows1,
    q8_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ8_0,
    BlockQ8_0,
    1
);
rows_entry!(
    vnni_q8_0_rows4,
    q8_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ8_0,
    BlockQ8_0,
    4
);
rows_entry!(
    vnni_q4_0_rows1,
    q4_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ4_0,
    BlockQ8_0,
    1
);
rows_entry!(
    vnni_q4_0_rows4,
    q4_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ4_0,
    BlockQ8_0,
    4
);
rows_entry!(
    vnni_q5_0_rows1,
    q5_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ5_0,
    BlockQ8_0,
    1
);
rows_entry!(
    vnni_q5_0_rows4,
    q5_0_512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ5_0,
    BlockQ8_0,
    4
);
rows_entry!(
    vnni_q4k_rows1,
    q4k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ4K,
    BlockQ8K,
    1
);
rows_entry!(
    vnni_q4k_rows4,
    q4k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ4K,
    BlockQ8K,
    4
);
rows_entry!(
    vnni_q5k_rows1,
    q5k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ5K,
    BlockQ8K,
    1
);
rows_entry!(
    vnni_q5k_rows4,
    q5k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ5K,
    BlockQ8K,
    4
);
rows_entry!(
    vnni_q6k_rows1,
    q6k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ6K,
    BlockQ8K,
    1
);
rows_entry!(
    vnni_q6k_rows4,
    q6k,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,avx512vl",
    BlockQ6K,
    BlockQ8K,
    4
);

pub const AVX2: DotKernels = DotKernels {
    name: "avx2",
    level: crate::simd::Level::Avx2,
    q8_0: Tiles {
        rows1: avx2_q8_0_rows1,
        rows4: avx2_q8_0_rows4,
    },
    q4_0: Tiles {
        rows1: avx2_q4_0_rows1,
        rows4: avx2_q4_0_rows4,
    },
    q5_0: Tiles {
        rows1: avx2_q5_0_rows1,
        rows4: avx2_q5_0_rows4,
    },
    q4_1: crate::simd::Q4_1_SCALAR,
    q5_1: crate::simd::Q5_1_SCALAR,
    iq4nl: crate::simd::IQ4NL_SCALAR,
    iq4xs: crate::simd::IQ4XS_SCALAR,
    q3k: crate::simd::Q3K_SCALAR,
    q4k: Tiles {
        rows1: avx2_q4k_rows1,
        rows4: avx2_q4k_rows4,
    },
    q5k: Tiles {
        rows1: avx2_q5k_rows1,
        rows4: avx2_q5k_rows4,
    },
    q6k: Tiles {
        rows1: avx2_q6k_rows1,
        rows4: avx2_q6k_rows4,
    },
    packed: crate::packed_x86::PACKED_AVX2,
};

pub const VNNI: DotKernels = DotKernels {
    name: "avx512-vnni",
    level: crate::simd::Level::Avx512,
    q8_0: Tiles {
        rows1: vnni_q8_0_rows1,
        rows4: vnni_q8_0_rows4,
    },
    q4_0: Tiles {
        rows1: vnni_q4_0_rows1,
        rows4: vnni_q4_0_rows4,
    },
    q5_0: Tiles {
        rows1: vnni_q5_0_rows1,
        rows4: vnni_q5_0_rows4,
    },
    q4_1: crate::simd::Q4_1_SCALAR,
    q5_1: crate::simd::Q5_1_SCALAR,
    iq4nl: crate::simd::IQ4NL_SCALAR,
    iq4xs: crate::simd::IQ4XS_SCALAR,
    q3k: crate::simd::Q3K_SCALAR,
    q4k: Tiles {
        rows1: vnni_q4k_rows1,
        rows4: vnni_q4k_rows4,
    },
    q5k: Tiles {
        rows1: vnni_q5k_rows1,
        rows4: vnni_q5k_rows4,
    },
    q6k: Tiles {
        rows1: vnni_q6k_rows1,
        rows4: vnni_q6k_rows4,
    },
    packed: crate::packed_x86::PACKED_AVX512,
};

/// [`VNNI`] with prompts' groups in pairs (see [`pairs_pay`]).
pub const VNNI_PAIRS: DotKernels = DotKernels {
    name: "avx512-vnni-pairs",
    packed: crate::packed_x86::PACKED_AVX512_PAIRS,
    ..VNNI
};

/// [`VNNI`] whose packed kernels also use GFNI (fewer operations to
/// unpack Q5_0's and Q6_K's high bits).
pub const VNNI_GFNI: DotKernels = DotKernels {
    name: "avx512-vnni-gfni",
    packed: crate::packed_x86::PACKED_GFNI,
    ..VNNI
};

/// [`VNNI_GFNI`] with prompts' groups in pairs (see [`pairs_pay`]).
pub const VNNI_GFNI_PAIRS: DotKernels = DotKernels {
    name: "avx512-vnni-gfni-pairs",
    packed: crate::packed_x86::PACKED_GFNI_PAIRS,
    ..VNNI_GFNI
};

/// [`VNNI_GFNI`] whose packed kernels multiply batches of 16 tokens and
/// more on AMX tiles ([`crate::packed_amx`]).
pub const VNNI_GFNI_AMX: DotKernels = DotKernels {
    name: "avx512-vnni-gfni-amx",
    packed: crate::packed_amx::PACKED_AMX,
    ..VNNI
};

// ---------------------------------------------------------------- f16

/// `ops::to_f16`, 16 at a time (cvtps2ph rounds to nearest even, as the
/// scalar conversion does).
pub(crate) fn to_f16_avx512(src: &[f32], dst: &mut [half::f16]) {
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn inner(src: &[f32], dst: &mut [half::f16]) {
        let n16 = src.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let x = _mm512_loadu_ps(src.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        }
        for i in n16..src.len() {
            dst[i] = half::f16::from_f32(src[i]);
        }
    }
    assert_eq!(src.len(), dst.len());
    // SAFETY: reached only when the AVX-512 table was detected; lengths
    // checked above.
    unsafe { inner(src, dst) }
}

/// `ops::round_to_f16`, 16 at a time.
pub(crate) fn round_f16_avx512(x: &mut [f32]) {
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn inner(x: &mut [f32]) {
        let n16 = x.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_storeu_ps(x.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        for v in &mut x[n16..] {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }
    // SAFETY: reached only when the AVX-512 table was detected.
    unsafe { inner(x) }
}

// ---------------------------------------------------------------- GeGLU

/// `ops::read_sum` with 64-byte loads: four lines of a stream, or one line
/// of each of 2 or 4 streams, into four independent sums.
pub(crate) fn read_sum_avx512(bytes: &[u8], streams: usize) -> u64 {
    crate::ops::check_read_sum(bytes, streams);
    #[target_feature(enable = "avx512f")]
    unsafe fn inner(bytes: &[u8], streams: usize) -> u64 {
        let part = bytes.len() / streams;
        let p = bytes.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        let load = |at: usize| _mm512_loadu_si512(p.add(at) as *const _);
        // Lines (of each stream) per step: 4 sums in all.
        let per = 4 / streams;
        let mut i = 0;
        while i + 64 * per <= part {
            for j in 0..per {
                for k in 0..streams {
                    let a = &mut acc[j * streams + k];
                    *a = _mm512_add_epi64(*a, load(k * part + i + 64 * j));
                }
            }
            i += 64 * per;
        }
        // (A stream's last lines, fewer than a step.)
        while i < part {
            for k in 0..streams {
                acc[k] = _mm512_add_epi64(acc[k], load(k * part + i));
            }
            i += 64;
        }
        let s = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        _mm512_reduce_add_epi64(s) as u64
    }
    // SAFETY: called only when the AVX-512 level was detected; every load
    // lies within `bytes` (checked above: each of 1, 2 or 4 streams holds
    // whole lines).
    unsafe { inner(bytes, streams) }
}

/// `gate = gelu(gate) · up` 16 at a time, as `ops::geglu_inplace_ref`: the
/// f16 rounding (nearest even) indexes the same table through a gather,
/// with the same ±10 cut-offs and the same final multiply.
pub(crate) fn geglu_avx512(gate: &mut [f32], up: &[f32], table: &[f32; 65536]) {
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn inner(gate: &mut [f32], up: &[f32], table: &[f32; 65536]) {
        let n16 = gate.len() / 16 * 16;
        let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
        for i in (0..n16).step_by(16) {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let idx = _mm512_cvtepu16_epi32(h);
            let g = _mm512_i32gather_ps::<4>(idx, table.as_ptr());
            let g = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
            let g = _mm512_mask_mov_ps(
                g,
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo),
                _mm512_setzero_ps(),
            );
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(g, u));
        }
        crate::ops::geglu_inplace_ref(&mut gate[n16..], &up[n16..]);
    }
    assert!(up.len() >= gate.len());
    // SAFETY: only called when the VNNI table was selected, which
    // `simd::available` returns after detecting AVX-512 F/BW/VL (and AVX2,
    // FMA, F16C); every index is below gate.len() ≤ up.len(), and gathered
    // indices are u16 values, inside the 65536-entry table.
    unsafe { inner(gate, up, table) }
}

/// [`geglu_avx512`] 8 at a time with AVX2's gather: the same bits. On a
/// Zen 3, the plain version's table lookups were 1.2–1.7% of generation
/// and prompt time.
pub(crate) fn geglu_avx2(gate: &mut [f32], up: &[f32], table: &[f32; 65536]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn inner(gate: &mut [f32], up: &[f32], table: &[f32; 65536]) {
        let n8 = gate.len() / 8 * 8;
        let (lo, hi) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
        for i in (0..n8).step_by(8) {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            let idx = _mm256_cvtepu16_epi32(h);
            let g = _mm256_i32gather_ps::<4>(table.as_ptr(), idx);
            let g = _mm256_blendv_ps(g, x, _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi));
            let g = _mm256_blendv_ps(g, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LE_OQ>(x, lo));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(g, u));
        }
        crate::ops::geglu_inplace_ref(&mut gate[n8..], &up[n8..]);
    }
    assert!(up.len() >= gate.len());
    // SAFETY: only called when an AVX2 or better table was selected, which
    // `simd::available` returns after detecting AVX2, FMA and F16C; every
    // index is below gate.len() ≤ up.len(), and gathered indices are u16
    // values, inside the 65536-entry table.
    unsafe { inner(gate, up, table) }
}

// ---------------------------------------------------------------- f16 attention ops
//
// Keys are vector lanes in `qk` (a K tile holds 16 keys per element d) and
// head columns are lanes in `pv`; rows go in chunks of 8, 4 and 1 so the
// accumulators stay in registers. Each lane runs the scalar reference's fma
// chain, so every table gives the same bits.

use crate::simd::{F16Ops, KEY_BLOCK, MAX_ROWS};

/// Run `$body` for rows `r` in 0..`$rows` in chunks of NR = 8, then 4,
/// then 1 (a const in `$body`), so a kernel's NR accumulators stay in
/// registers.
macro_rules! by_rows {
    ($rows:expr, |$r:ident, $nr:ident| $body:expr) => {{
        let mut $r = 0;
        while $r + 8 <= $rows {
            const $nr: usize = 8;
            $body;
            $r += 8;
        }
        while $r + 4 <= $rows {
            const $nr: usize = 4;
            $body;
            $r += 4;
        }
        while $r + 2 <= $rows {
            const $nr: usize = 2;
            $body;
            $r += 2;
        }
        while $r < $rows {
            const $nr: usize = 1;
            $body;
            $r += 1;
        }
    }};
}

/// Scores of NR rows against the 16 keys of the tile (two vectors of 8):
/// 2·NR fma chains side by side, each score still one chain over d in
/// order. With `ahead`, the tile that many elements further is prefetched
/// line by line as this one is read.
#[inline(always)]
unsafe fn qk_rows_avx2<const NR: usize>(
    q: *const f32,
    hd: usize,
    kt: *const u16,
    s: *mut f32,
    ahead: usize,
) {
    let mut a = [[_mm256_setzero_ps(); 2]; NR];
    for d in 0..hd {
        if ahead != 0 && d % 2 == 0 {
            prefetch_line(kt.wrapping_add(d * KEY_BLOCK + ahead));
        }
        for k in 0..2 {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(
                kt.add(d * KEY_BLOCK + 8 * k) as *const __m128i
            ));
            for r in 0..NR {
                a[r][k] = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(r * hd + d)), kv, a[r][k]);
            }
        }
    }
    for r in 0..NR {
        for k in 0..2 {
            _mm256_storeu_ps(s.add(r * KEY_BLOCK + 8 * k), a[r][k]);
        }
    }
}

fn check_qk(q: &[f32], kt: &[half::f16], s: &[f32]) -> (usize, usize) {
    let hd = kt.len() / KEY_BLOCK;
    assert!(hd > 0 && kt.len() == hd * KEY_BLOCK && q.len().is_multiple_of(hd));
    let rows = q.len() / hd;
    assert!(rows <= MAX_ROWS && s.len() >= rows * KEY_BLOCK);
    (hd, rows)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_avx2(q: &[f32], kt: &[half::f16], s: &mut [f32], ahead: usize) {
    let (hd, rows) = check_qk(q, kt, s);
    let (qp, kp, sp) = (q.as_ptr(), kt.as_ptr() as *const u16, s.as_mut_ptr());
    // At most 4 rows a pass: 8 fma chains (an FMA waits about four cycles
    // on the one before it in its chain, and two issue per cycle), and per
    // element of the head two conversions and 4 broadcasts for 8 FMAs.
    // Before, rows × 8 keys a pass (2 or 4 rows: 2 or 4 chains, waiting on
    // their FMAs' latency; 8 rows: 8 broadcasts per conversion). On the Zen
    // 3, in cache (criterion), multiply-adds/s went 13.5 → 25.9 G for
    // 2 rows, 25.6 → 49.5 G for 4 and 41.1 → 47.4 G for 16.
    by_rows!(rows, |r, NR| {
        // The prefetch once per tile: in the first rows' pass.
        let ahead = |row: usize| if row == 0 { ahead } else { 0 };
        if NR >= 4 {
            for h in (r..r + NR).step_by(4) {
                qk_rows_avx2::<4>(qp.add(h * hd), hd, kp, sp.add(h * KEY_BLOCK), ahead(h));
            }
        } else {
            qk_rows_avx2::<NR>(qp.add(r * hd), hd, kp, sp.add(r * KEY_BLOCK), ahead(r))
        }
    });
}

/// Ask for the line at `p` into L2 (a hint: never faults, whatever the
/// address). L2 and two blocks ahead measured faster than L1 and one block
/// ahead (see `attend_tile`); why (more misses in flight than L1 tracks?)
/// was not measured.
#[inline(always)]
unsafe fn prefetch_line(p: *const u16) {
    _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
}

/// Scores of NR rows against all 16 keys of the tile; the tile `ahead`
/// elements further is prefetched line by line as this one is read.
#[inline(always)]
unsafe fn qk_rows16<const NR: usize>(
    q: *const f32,
    hd: usize,
    kt: *const u16,
    s: *mut f32,
    ahead: usize,
) {
    let mut a = [_mm512_setzero_ps(); NR];
    for d in 0..hd {
        if ahead != 0 && d % 2 == 0 {
            prefetch_line(kt.wrapping_add(d * KEY_BLOCK + ahead));
        }
        let kv = _mm512_cvtph_ps(_mm256_loadu_si256(kt.add(d * KEY_BLOCK) as *const __m256i));
        for r in 0..NR {
            a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(r * hd + d)), kv, a[r]);
        }
    }
    for r in 0..NR {
        _mm512_storeu_ps(s.add(r * KEY_BLOCK), a[r]);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn qk_avx512(q: &[f32], kt: &[half::f16], s: &mut [f32], ahead: usize) {
    let (hd, rows) = check_qk(q, kt, s);
    let (qp, kp, sp) = (q.as_ptr(), kt.as_ptr() as *const u16, s.as_mut_ptr());
    if rows == 16 {
        // A whole prefill tile in one pass: each key column is converted
        // once for 16 multiply-adds, whose query operands are broadcast from
        // memory inside the FMA.
        return qk_rows16::<16>(qp, hd, kp, sp, ahead);
    }
    by_rows!(rows, |r, NR| qk_rows16::<NR>(
        qp.add(r * hd),
        hd,
        kp,
        sp.add(r * KEY_BLOCK),
        // Once per tile: the first rows' pass.
        if r == 0 { ahead } else { 0 }
    ));
}

/// Scores of a multiple of 8 rows against two K tiles, 8 rows a pass:
/// per element d of the head, each query element broadcast once into a
/// register for its two FMAs (one per tile), where `qk_rows16` folds a
/// broadcast into each FMA as a memory operand: 2 tile loads and 8
/// broadcasts for 16 FMAs instead of 1 and 16 (the loads bound the 16-row
/// pass on the Zen 5, as in `pv_rows8_reg`). Each score is the same fma
/// chain over d in order, so the same bits as `qk_rows16`.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn qk2_avx512(
    q: &[f32],
    kt: [&[half::f16]; 2],
    s0: &mut [f32],
    s1: &mut [f32],
    ahead: usize,
) {
    let hd = kt[0].len() / KEY_BLOCK;
    let rows = q.len() / hd;
    let (k0, k1) = (kt[0].as_ptr() as *const u16, kt[1].as_ptr() as *const u16);
    for r0 in (0..rows).step_by(8) {
        let qp = q.as_ptr().add(r0 * hd);
        let mut a0 = [_mm512_setzero_ps(); 8];
        let mut a1 = [_mm512_setzero_ps(); 8];
        for d in 0..hd {
            // The prefetch once per tile: in the first rows' pass.
            if ahead != 0 && r0 == 0 && d % 2 == 0 {
                prefetch_line(k0.wrapping_add(d * KEY_BLOCK + ahead));
                prefetch_line(k1.wrapping_add(d * KEY_BLOCK + ahead));
            }
            let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(k0.add(d * KEY_BLOCK) as *const __m256i));
            let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(k1.add(d * KEY_BLOCK) as *const __m256i));
            for r in 0..8 {
                let mut qb = _mm512_set1_ps(*qp.add(r * hd + d));
                // (Opaque to the compiler: it must hold qb in a register.)
                std::arch::asm!("/* {0} */", inout(zmm_reg) qb, options(pure, nomem, nostack, preserves_flags));
                a0[r] = _mm512_fmadd_ps(qb, v0, a0[r]);
                a1[r] = _mm512_fmadd_ps(qb, v1, a1[r]);
            }
        }
        for r in 0..8 {
            _mm512_storeu_ps(s0.as_mut_ptr().add((r0 + r) * KEY_BLOCK), a0[r]);
            _mm512_storeu_ps(s1.as_mut_ptr().add((r0 + r) * KEY_BLOCK), a1[r]);
        }
    }
}

fn check_pv(acc: &[f32], p: &[f32], v: &[half::f16], offs: &[usize], hd: usize) -> usize {
    assert!(hd > 0 && acc.len().is_multiple_of(hd) && offs.len() <= KEY_BLOCK);
    let rows = acc.len() / hd;
    assert!(rows <= MAX_ROWS);
    if rows > 0 {
        assert!(p.len() >= (rows - 1) * KEY_BLOCK + offs.len());
    }
    for &o in offs {
        assert!(o + hd <= v.len());
    }
    rows
}

/// NR rows × 8·CH columns at c of P·V: NR·CH fma chains side by side,
/// each (row, column) still adding its keys in key order; the same columns
/// `ahead` elements further are prefetched as these are read.
#[inline(always)]
unsafe fn pv_rows8<const NR: usize, const CH: usize>(
    acc: *mut f32,
    hd: usize,
    c: usize,
    p: *const f32,
    v: *const u16,
    offs: &[usize],
    ahead: usize,
) {
    let mut a = [[_mm256_setzero_ps(); CH]; NR];
    for r in 0..NR {
        for k in 0..CH {
            a[r][k] = _mm256_loadu_ps(acc.add(r * hd + c + 8 * k));
        }
    }
    for (j, &o) in offs.iter().enumerate() {
        for k in 0..CH {
            // One line (32 halves) per 4 chunks.
            if ahead != 0 && (c + 8 * k).is_multiple_of(32) {
                prefetch_line(v.wrapping_add(o + c + 8 * k + ahead));
            }
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.add(o + c + 8 * k) as *const __m128i));
            for r in 0..NR {
                a[r][k] = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(r * KEY_BLOCK + j)), vv, a[r][k]);
            }
        }
    }
    for r in 0..NR {
        for k in 0..CH {
            _mm256_storeu_ps(acc.add(r * hd + c + 8 * k), a[r][k]);
        }
    }
}

/// NR rows × all `hd` columns of P·V, CH 8-column chunks at a time (then
/// one at a time for the tail).
#[inline(always)]
unsafe fn pv_rows<const NR: usize, const CH: usize>(
    acc: *mut f32,
    hd: usize,
    p: *const f32,
    v: *const u16,
    offs: &[usize],
    ahead: usize,
) {
    let mut c = 0;
    while c + 8 * CH <= hd {
        pv_rows8::<NR, CH>(acc, hd, c, p, v, offs, ahead);
        c += 8 * CH;
    }
    while c < hd {
        pv_rows8::<NR, 1>(acc, hd, c, p, v, offs, ahead);
        c += 8;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_avx2(
    acc: &mut [f32],
    p: &[f32],
    v: &[half::f16],
    offs: &[usize],
    hd: usize,
    ahead: usize,
) {
    let rows = check_pv(acc, p, v, offs, hd);
    let (ap, pp, vp) = (acc.as_mut_ptr(), p.as_ptr(), v.as_ptr() as *const u16);
    // Eight chains (accumulators) a pass, as in `qk_avx2`: 4 rows × 2
    // chunks, 2 × 4 or 1 × 8. Before, one chunk a pass for up to 8 rows:
    // on the Zen 3, in cache, 19.0 → 42.1 G multiply-adds/s for 2 rows,
    // 25.9 → 41.3 G for 4 and 35.7 → 42.7 G for 16.
    by_rows!(rows, |r, NR| {
        // The prefetch once per block: in the first rows' pass.
        let ahead = |row: usize| if row == 0 { ahead } else { 0 };
        let (a, pr) = (
            |row: usize| ap.add(row * hd),
            |row: usize| pp.add(row * KEY_BLOCK),
        );
        if NR >= 4 {
            for h in (r..r + NR).step_by(4) {
                pv_rows::<4, 2>(a(h), hd, pr(h), vp, offs, ahead(h));
            }
        } else if NR >= 2 {
            pv_rows::<NR, 4>(a(r), hd, pr(r), vp, offs, ahead(r))
        } else {
            pv_rows::<NR, 8>(a(r), hd, pr(r), vp, offs, ahead(r))
        }
    });
}

/// NR rows × 16·CH columns at c of P·V; the same columns `ahead` elements
/// further are prefetched as these are read.
#[inline(always)]
unsafe fn pv_chunk<const NR: usize, const CH: usize>(
    acc: *mut f32,
    hd: usize,
    c: usize,
    p: *const f32,
    v: *const u16,
    offs: &[usize],
    ahead: usize,
) {
    let mut a = [[_mm512_setzero_ps(); CH]; NR];
    for r in 0..NR {
        for k in 0..CH {
            a[r][k] = _mm512_loadu_ps(acc.add(r * hd + c + 16 * k));
        }
    }
    for (j, &o) in offs.iter().enumerate() {
        for k in 0..CH {
            if ahead != 0 && k % 2 == 0 {
                prefetch_line(v.wrapping_add(o + c + 16 * k + ahead));
            }
            let vv = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(o + c + 16 * k) as *const __m256i));
            for r in 0..NR {
                a[r][k] = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(r * KEY_BLOCK + j)), vv, a[r][k]);
            }
        }
    }
    for r in 0..NR {
        for k in 0..CH {
            _mm512_storeu_ps(acc.add(r * hd + c + 16 * k), a[r][k]);
        }
    }
}

/// 8 rows × 32 columns at c of P·V, as `pv_chunk::<8, 2>` but with each
/// probability broadcast once into a register for its two FMAs, where the
/// compiler had folded a broadcast into each FMA as a memory operand: per
/// key 8 broadcasts and 2 value loads for 16 FMAs instead of 16 and 1.
/// On the Zen 5, whose two FMA pipes take 512-bit operands whole, the loads
/// were what bound the 16-row tile's pass (16 broadcasts a key for 16
/// FMAs): one thread, in cache, one process, old and new in turn
/// (best of 15 × 20000 calls), 94.6–99.1 → 108.6–112.2 G multiply-adds/s.
/// The same FMAs in the same order: the same bits.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
unsafe fn pv_rows8_reg(
    acc: *mut f32,
    hd: usize,
    c: usize,
    p: *const f32,
    v: *const u16,
    offs: &[usize],
    ahead: usize,
) {
    const NR: usize = 8;
    const CH: usize = 2;
    let mut a = [[_mm512_setzero_ps(); CH]; NR];
    for r in 0..NR {
        for k in 0..CH {
            a[r][k] = _mm512_loadu_ps(acc.add(r * hd + c + 16 * k));
        }
    }
    for (j, &o) in offs.iter().enumerate() {
        let mut vv = [_mm512_setzero_ps(); CH];
        for k in 0..CH {
            if ahead != 0 && k % 2 == 0 {
                prefetch_line(v.wrapping_add(o + c + 16 * k + ahead));
            }
            vv[k] = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(o + c + 16 * k) as *const __m256i));
        }
        for r in 0..NR {
            let mut pb = _mm512_set1_ps(*p.add(r * KEY_BLOCK + j));
            // (Opaque to the compiler: it must hold pb in a register.)
            std::arch::asm!("/* {0} */", inout(zmm_reg) pb, options(pure, nomem, nostack, preserves_flags));
            for k in 0..CH {
                a[r][k] = _mm512_fmadd_ps(pb, vv[k], a[r][k]);
            }
        }
    }
    for r in 0..NR {
        for k in 0..CH {
            _mm512_storeu_ps(acc.add(r * hd + c + 16 * k), a[r][k]);
        }
    }
}

/// P·V for NR rows over all `hd` columns, CH 16-column chunks at a time:
/// each value row is then read in runs of CH·64 bytes, so a block's rows
/// are fetched in fewer rounds of cache misses (what one token's attention
/// waits on), and each (row, column) still adds its keys in key order.
#[inline(always)]
unsafe fn pv_rows16<const NR: usize, const CH: usize>(
    acc: *mut f32,
    hd: usize,
    p: *const f32,
    v: *const u16,
    offs: &[usize],
    ahead: usize,
) {
    let mut c = 0;
    while c + 16 * CH <= hd {
        pv_chunk::<NR, CH>(acc, hd, c, p, v, offs, ahead);
        c += 16 * CH;
    }
    while c < hd {
        pv_chunk::<NR, 1>(acc, hd, c, p, v, offs, ahead);
        c += 16;
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn pv_avx512(
    acc: &mut [f32],
    p: &[f32],
    v: &[half::f16],
    offs: &[usize],
    hd: usize,
    ahead: usize,
) {
    let rows = check_pv(acc, p, v, offs, hd);
    let (ap, pp, vp) = (acc.as_mut_ptr(), p.as_ptr(), v.as_ptr() as *const u16);
    if rows == 16 {
        // A whole prefill tile as two passes of 8 rows × 32 columns: each
        // probability broadcast once into a register for two FMAs, each
        // value row converted once for 16 of them (see `pv_rows8_reg`).
        for r in [0, 8] {
            let (a, pr) = (ap.add(r * hd), pp.add(r * KEY_BLOCK));
            // Once per block: the first rows' pass.
            let ahead = if r == 0 { ahead } else { 0 };
            let mut c = 0;
            while c + 32 <= hd {
                pv_rows8_reg(a, hd, c, pr, vp, offs, ahead);
                c += 32;
            }
            while c < hd {
                pv_chunk::<8, 1>(a, hd, c, pr, vp, offs, ahead);
                c += 16;
            }
        }
        return;
    }
    // 16 accumulators at most: CH = 16 / NR chunks (8 for a single row).
    by_rows!(rows, |r, NR| {
        let (a, pr) = (ap.add(r * hd), pp.add(r * KEY_BLOCK));
        // Once per block: the first rows' pass.
        let ahead = if r == 0 { ahead } else { 0 };
        if NR >= 8 {
            pv_rows16::<NR, 2>(a, hd, pr, vp, offs, ahead)
        } else if NR >= 4 {
            pv_rows16::<NR, 4>(a, hd, pr, vp, offs, ahead)
        } else {
            pv_rows16::<NR, 8>(a, hd, pr, vp, offs, ahead)
        }
    });
}

/// `exp_poly(s[j] − m)` for 16 lanes: the scalar steps, lane-wise.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn exp_sub_avx512(s: &mut [f32], m: f32) {
    use crate::simd::EXP_C;
    assert!(s.len() >= KEY_BLOCK);
    let x = _mm512_sub_ps(_mm512_loadu_ps(s.as_ptr()), _mm512_set1_ps(m));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(EXP_C.log2e));
    let magic = _mm512_set1_ps(EXP_C.magic);
    let n = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
    let nn = _mm512_sub_ps(_mm512_setzero_ps(), n);
    let r = _mm512_fmadd_ps(nn, _mm512_set1_ps(EXP_C.ln2_hi), x);
    let r = _mm512_fmadd_ps(nn, _mm512_set1_ps(EXP_C.ln2_lo), r);
    let mut p = _mm512_set1_ps(EXP_C.c[6]);
    for k in (0..6).rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C.c[k]));
    }
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(n, _mm512_set1_ps(-126.0));
    _mm512_storeu_ps(
        s.as_mut_ptr(),
        _mm512_mask_mov_ps(y, under, _mm512_setzero_ps()),
    );
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_sub_avx2(s: &mut [f32], m: f32) {
    use crate::simd::EXP_C;
    assert!(s.len() >= KEY_BLOCK);
    for h in [0, 8] {
        let x = _mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(h)), _mm256_set1_ps(m));
        let t = _mm256_mul_ps(x, _mm256_set1_ps(EXP_C.log2e));
        let magic = _mm256_set1_ps(EXP_C.magic);
        let n = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
        let nn = _mm256_sub_ps(_mm256_setzero_ps(), n);
        let r = _mm256_fmadd_ps(nn, _mm256_set1_ps(EXP_C.ln2_hi), x);
        let r = _mm256_fmadd_ps(nn, _mm256_set1_ps(EXP_C.ln2_lo), r);
        let mut p = _mm256_set1_ps(EXP_C.c[6]);
        for k in (0..6).rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C.c[k]));
        }
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(n, _mm256_set1_ps(-126.0));
        _mm256_storeu_ps(s.as_mut_ptr().add(h), _mm256_andnot_ps(under, y));
    }
}

fn exp_sub_f16(s: &mut [f32], m: f32) {
    // SAFETY: as for qk_f16; length checked inside.
    unsafe { exp_sub_avx2(s, m) }
}

fn exp_sub_wide(s: &mut [f32], m: f32) {
    // SAFETY: as for qk_f16_wide; length checked inside.
    unsafe { exp_sub_avx512(s, m) }
}

fn qk_f16(q: &[f32], kt: &[half::f16], s: &mut [f32], ahead: usize) {
    // SAFETY: only reachable through F16_AVX2/F16_AVX512, which
    // `simd::f16_available` returns after detecting avx2, fma and f16c;
    // shapes are checked inside.
    unsafe { qk_avx2(q, kt, s, ahead) }
}

fn qk_f16_wide(q: &[f32], kt: &[half::f16], s: &mut [f32], ahead: usize) {
    // SAFETY: only reachable through F16_AVX512, returned after detecting
    // avx512f (and avx2, fma, f16c); shapes are checked inside.
    unsafe { qk_avx512(q, kt, s, ahead) }
}

fn qk2_f16(q: &[f32], kt: [&[half::f16]; 2], s0: &mut [f32], s1: &mut [f32], ahead: usize) {
    qk_f16(q, kt[0], s0, ahead);
    qk_f16(q, kt[1], s1, ahead);
}

fn qk2_f16_wide(q: &[f32], kt: [&[half::f16]; 2], s0: &mut [f32], s1: &mut [f32], ahead: usize) {
    let (hd, rows) = check_qk(q, kt[0], s0);
    if !rows.is_multiple_of(8) {
        qk_f16_wide(q, kt[0], s0, ahead);
        return qk_f16_wide(q, kt[1], s1, ahead);
    }
    assert_eq!(check_qk(q, kt[1], s1), (hd, rows));
    // SAFETY: as for qk_f16_wide; the shapes are checked above.
    unsafe { qk2_avx512(q, kt, s0, s1, ahead) }
}

fn pv_f16(acc: &mut [f32], p: &[f32], v: &[half::f16], offs: &[usize], hd: usize, ahead: usize) {
    if !hd.is_multiple_of(8) {
        return (crate::simd::F16_SCALAR.pv)(acc, p, v, offs, hd, ahead);
    }
    // SAFETY: as for qk_f16.
    unsafe { pv_avx2(acc, p, v, offs, hd, ahead) }
}

fn pv_f16_wide(
    acc: &mut [f32],
    p: &[f32],
    v: &[half::f16],
    offs: &[usize],
    hd: usize,
    ahead: usize,
) {
    if !hd.is_multiple_of(16) {
        return pv_f16(acc, p, v, offs, hd, ahead);
    }
    // SAFETY: as for qk_f16_wide.
    unsafe { pv_avx512(acc, p, v, offs, hd, ahead) }
}

pub const F16_AVX2: F16Ops = F16Ops {
    name: "avx2-f16c",
    level: crate::simd::Level::Avx2,
    qk: qk_f16,
    qk2: qk2_f16,
    pv: pv_f16,
    exp_sub: exp_sub_f16,
};

pub const F16_AVX512: F16Ops = F16Ops {
    name: "avx512-f16c",
    level: crate::simd::Level::Avx512,
    qk: qk_f16_wide,
    qk2: qk2_f16_wide,
    pv: pv_f16_wide,
    exp_sub: exp_sub_wide,
};
