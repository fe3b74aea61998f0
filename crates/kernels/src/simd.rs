//! Run-time kernel selection. A [`DotKernels`] table holds, per quantized
//! format, a dot product of one weight row with 1 and with 4 activation rows;
//! [`best`] picks the fastest table the CPU supports, once.
//! `GEMMA3_FORCE_SCALAR=1` forces the scalar references, and
//! `GEMMA3_KERNELS=<name>` names a table (`avx2` on an AVX-512 machine runs
//! what an AVX2-only CPU would). The table's [`Level`] then sets what the
//! attention ops, the activation quantizers and the element-wise ops use.

use crate::dot;
use crate::formats::*;
use std::sync::OnceLock;

/// A format's kernels: every row of `w` (rows of `nb` blocks, contiguous)
/// times 1 or 4 activation rows, `out[r · NT + t]`. Inside, rows go in
/// tiles of 4 (1-row tail); a (row, token) result must not depend on the
/// tile or the token count that computed it.
#[derive(Clone, Copy)]
#[allow(clippy::type_complexity)]
pub struct Tiles<W: 'static, A: 'static> {
    pub rows1: fn(w: &[W], nb: usize, a: [&[A]; 1], out: &mut [f32]),
    pub rows4: fn(w: &[W], nb: usize, a: [&[A]; 4], out: &mut [f32]),
}

/// The widest instructions a kernel table uses, which the other
/// dispatched code (attention, activation quantizers, element-wise ops)
/// follows, so that one choice sets the whole forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/DQ/VL and VNNI, besides AVX2's.
    Avx512,
}

/// One set of tiles per format.
#[derive(Clone, Copy)]
pub struct DotKernels {
    pub name: &'static str,
    pub level: Level,
    pub q8_0: Tiles<BlockQ8_0, BlockQ8_0>,
    pub q4_0: Tiles<BlockQ4_0, BlockQ8_0>,
    pub q5_0: Tiles<BlockQ5_0, BlockQ8_0>,
    /// Q4_1, Q5_1, IQ4_NL, IQ4_XS and Q3_K run row-major only for shapes that cannot be
    /// packed (every table takes the scalar tiles).
    pub q4_1: Tiles<BlockQ4_1, BlockQ8_0>,
    pub q5_1: Tiles<BlockQ5_1, BlockQ8_0>,
    pub iq4nl: Tiles<BlockIQ4NL, BlockQ8_0>,
    pub iq4xs: Tiles<BlockIQ4XS, BlockQ8K>,
    pub q3k: Tiles<BlockQ3K, BlockQ8K>,
    pub q4k: Tiles<BlockQ4K, BlockQ8K>,
    pub q5k: Tiles<BlockQ5K, BlockQ8K>,
    pub q6k: Tiles<BlockQ6K, BlockQ8K>,
    /// Kernels for the interleaved layout of [`crate::packed`].
    pub packed: crate::packed::PackedKernels,
}

/// Scalar tiles with the table's shapes around the references in [`dot`].
macro_rules! scalar_tiles {
    ($mod:ident, $f:path, $w:ty, $a:ty) => {
        mod $mod {
            use super::*;
            fn rows<const NT: usize>(w: &[$w], nb: usize, a: [&[$a]; NT], out: &mut [f32]) {
                for (r, row) in w.chunks_exact(nb).enumerate() {
                    for t in 0..NT {
                        out[r * NT + t] = $f(row, a[t]);
                    }
                }
            }
            pub const TILES: Tiles<$w, $a> = Tiles {
                rows1: rows::<1>,
                rows4: rows::<4>,
            };
        }
    };
}
scalar_tiles!(s_q8_0, dot::dot_q8_0_ref, BlockQ8_0, BlockQ8_0);
scalar_tiles!(s_q4_0, dot::dot_q4_0_ref, BlockQ4_0, BlockQ8_0);
scalar_tiles!(s_q5_0, dot::dot_q5_0_ref, BlockQ5_0, BlockQ8_0);
scalar_tiles!(s_q4_1, dot::dot_q4_1_ref, BlockQ4_1, BlockQ8_0);
scalar_tiles!(s_q5_1, dot::dot_q5_1_ref, BlockQ5_1, BlockQ8_0);
scalar_tiles!(s_iq4nl, dot::dot_iq4nl_ref, BlockIQ4NL, BlockQ8_0);
scalar_tiles!(s_iq4xs, dot::dot_iq4xs_ref, BlockIQ4XS, BlockQ8K);
scalar_tiles!(s_q3k, dot::dot_q3k_ref, BlockQ3K, BlockQ8K);

/// The scalar Q4_1, Q5_1, IQ4_NL, IQ4_XS and Q3_K tiles, for the SIMD tables.
pub(crate) const Q4_1_SCALAR: Tiles<BlockQ4_1, BlockQ8_0> = s_q4_1::TILES;
pub(crate) const Q5_1_SCALAR: Tiles<BlockQ5_1, BlockQ8_0> = s_q5_1::TILES;
pub(crate) const IQ4NL_SCALAR: Tiles<BlockIQ4NL, BlockQ8_0> = s_iq4nl::TILES;
pub(crate) const IQ4XS_SCALAR: Tiles<BlockIQ4XS, BlockQ8K> = s_iq4xs::TILES;
pub(crate) const Q3K_SCALAR: Tiles<BlockQ3K, BlockQ8K> = s_q3k::TILES;
scalar_tiles!(s_q4k, dot::dot_q4k_ref, BlockQ4K, BlockQ8K);
scalar_tiles!(s_q5k, dot::dot_q5k_ref, BlockQ5K, BlockQ8K);
scalar_tiles!(s_q6k, dot::dot_q6k_ref, BlockQ6K, BlockQ8K);

/// The scalar reference kernels (every fast path's twin).
pub const SCALAR: DotKernels = DotKernels {
    name: "scalar",
    level: Level::Scalar,
    q8_0: s_q8_0::TILES,
    q4_0: s_q4_0::TILES,
    q5_0: s_q5_0::TILES,
    q4_1: s_q4_1::TILES,
    q5_1: s_q5_1::TILES,
    iq4nl: s_iq4nl::TILES,
    iq4xs: s_iq4xs::TILES,
    q3k: s_q3k::TILES,
    q4k: s_q4k::TILES,
    q5k: s_q5k::TILES,
    q6k: s_q6k::TILES,
    packed: crate::packed::PACKED_SCALAR,
};

/// Every kernel table this machine can run, scalar first, fastest last.
pub fn available() -> Vec<DotKernels> {
    #[allow(unused_mut)]
    let mut v = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if crate::x86::avx2_available() {
            v.push(crate::x86::AVX2);
        }
        // Of each pair of tables, the one this CPU runs faster last
        // (see `x86::pairs_pay`).
        let ordered = |one, pairs| match crate::x86::pairs_pay() {
            true => [one, pairs],
            false => [pairs, one],
        };
        if crate::x86::vnni_available() {
            v.extend(ordered(crate::x86::VNNI, crate::x86::VNNI_PAIRS));
        }
        if crate::x86::gfni_available() {
            v.extend(ordered(crate::x86::VNNI_GFNI, crate::x86::VNNI_GFNI_PAIRS));
        }
        if crate::packed_amx::available() {
            v.push(crate::x86::VNNI_GFNI_AMX);
        }
    }
    v
}

/// Whether `GEMMA3_FORCE_SCALAR` (set, not empty, not "0") asks every
/// dispatched kernel to use its scalar reference.
pub fn force_scalar() -> bool {
    std::env::var("GEMMA3_FORCE_SCALAR").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The environment variable that names the kernel table to run.
pub const KERNELS_VAR: &str = "GEMMA3_KERNELS";

/// The table [`KERNELS_VAR`] names, if it is set and not empty.
pub fn requested_table() -> Option<String> {
    std::env::var(KERNELS_VAR).ok().filter(|v| !v.is_empty())
}

/// The table to run among `available` (scalar first, fastest last): the one
/// `requested` names, the scalar one if `scalar` (`GEMMA3_FORCE_SCALAR`),
/// else the fastest. An unknown or unavailable name, or a name that
/// contradicts `scalar`, is an error that says what this CPU runs.
pub fn choose(
    available: &[DotKernels],
    scalar: bool,
    requested: Option<&str>,
) -> Result<DotKernels, String> {
    let names = || {
        available
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match requested {
        Some(r) => {
            let Some(k) = available.iter().find(|k| k.name == r) else {
                return Err(format!(
                    "{KERNELS_VAR}={r:?} is not a kernel table this CPU runs; it runs: {}",
                    names()
                ));
            };
            if scalar && k.level != Level::Scalar {
                return Err(format!(
                    "GEMMA3_FORCE_SCALAR asks for the scalar kernels but {KERNELS_VAR}={r:?}"
                ));
            }
            Ok(*k)
        }
        None if scalar => Ok(SCALAR),
        None => Ok(*available.last().unwrap_or(&SCALAR)),
    }
}

/// Whether the environment's kernel choice is valid here; front ends call
/// this first to refuse a bad `GEMMA3_KERNELS` with its message ([`best`]
/// would otherwise fall back to the default table).
pub fn check_request() -> Result<(), String> {
    choose(&available(), force_scalar(), requested_table().as_deref()).map(|_| ())
}

/// The kernels this process runs, chosen once: [`choose`] on this CPU's
/// tables and the environment (the default choice if that is invalid).
pub fn best() -> &'static DotKernels {
    static BEST: OnceLock<DotKernels> = OnceLock::new();
    BEST.get_or_init(|| {
        let avail = available();
        let scalar = force_scalar();
        choose(&avail, scalar, requested_table().as_deref())
            .or_else(|_| choose(&avail, scalar, None))
            .unwrap_or(SCALAR)
    })
}

/// The [`Level`] of [`best`]'s table, which every other dispatched kernel follows.
pub fn level() -> Level {
    best().level
}

/// Runs a block compiled for the chosen table's [`Level`]:
/// `vectorized!(fn(a: A, b: B) -> R { body })` defines the body as a
/// function three times (for AVX-512, for AVX2 and plain) and calls the
/// one the table's level allows with the variables `a` and `b` of the
/// caller. Plain Rust loops in it (the forward pass's norms, residual adds
/// and attention bookkeeping) are then vectorized with that level's
/// registers instead of the baseline's SSE2, and so are the functions it
/// calls where the compiler inlines them (`#[inline]` is a hint; a call left
/// out of line keeps its own compilation). The same operations in the same
/// order, so the same bits: Rust never reassociates floats or fuses a
/// multiply and an add on its own. Off x86-64 only the plain function
/// exists. (The three functions are named `__vectorized_…`, so that a call
/// in a body to an outer function named `plain` or `avx2` still reaches it.)
///
/// (A function taking a closure does not do this: the compiler calls a
/// large closure instead of inlining it into the function with the target
/// features, and the closure keeps the baseline's.)
#[macro_export]
macro_rules! vectorized {
    (fn($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
        unsafe fn __vectorized_avx512($($a: $t),*) $(-> $r)? $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn __vectorized_avx2($($a: $t),*) $(-> $r)? $body
        fn __vectorized_plain($($a: $t),*) $(-> $r)? $body
        match $crate::simd::level() {
            // SAFETY: `level` is the level of the table `best` chose, and
            // `best` (through `choose`) only picks among `available`'s
            // tables, each listed only where the CPU has its features.
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Level::Avx512 => unsafe { __vectorized_avx512($($a),*) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Level::Avx2 => unsafe { __vectorized_avx2($($a),*) },
            _ => __vectorized_plain($($a),*),
        }
    }};
}

/// Keys per block of the attention kernels: the width of a K-cache tile.
pub const KEY_BLOCK: usize = 16;

/// Attention's inner loops over an f16 KV cache, for up to [`MAX_ROWS`]
/// query rows (tokens × query heads of one KV head) at once. Every output
/// element is one chain of fused multiply-adds in a fixed order, the same in
/// every table and for any number of rows, so attention results depend on
/// neither the vector width nor the batch.
#[derive(Clone, Copy)]
#[allow(clippy::type_complexity)]
pub struct F16Ops {
    pub name: &'static str,
    /// The kernel tables these ops go with.
    pub level: Level,
    /// Scores of R query rows (`q`: R × hd) against a K tile (`kt`: hd ×
    /// 16, `kt[d·16 + j]` = key j's element d): `s[r·16 + j] = Σ_d
    /// q[r·hd + d]·kt[d·16 + j]`, accumulated with fma in increasing d from 0.
    /// If `ahead` is not 0, the memory `ahead` halves past the tile (a
    /// later tile, which need not exist) is prefetched while it is read.
    pub qk: fn(q: &[f32], kt: &[half::f16], s: &mut [f32], ahead: usize),
    /// `qk` of the same rows against two K tiles at once (`kt0` into `s0`,
    /// `kt1` into `s1`), the same bits as two calls; `ahead` as in `qk`,
    /// for each tile.
    #[allow(clippy::type_complexity)]
    pub qk2: fn(q: &[f32], kt: [&[half::f16]; 2], s0: &mut [f32], s1: &mut [f32], ahead: usize),
    /// `acc[r·hd + c] = fma(p[r·16 + j], v[offs[j] + c], acc[r·hd + c])` for
    /// each key j of `offs` in order (R = acc.len() / hd); prefetching
    /// `ahead` halves past each row read, as `qk` does.
    #[allow(clippy::type_complexity)]
    pub pv:
        fn(acc: &mut [f32], p: &[f32], v: &[half::f16], offs: &[usize], hd: usize, ahead: usize),
    /// `s[j] = exp_poly(s[j] − m)` for the [`KEY_BLOCK`] scores of a row.
    pub exp_sub: fn(s: &mut [f32], m: f32),
}

/// e^x for the softmax, in single-rounded f32 steps that SIMD code repeats
/// exactly: n = round(x·log2 e), r = x − n·ln 2 (two-part ln 2), a degree-6
/// Taylor polynomial for e^r (|r| ≤ ln2/2, error below 2·10⁻⁷), times 2ⁿ;
/// 0 below 2⁻¹²⁶. For x ≤ 0 (scores minus their max) and finite x.
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    let t = x * EXP_C.log2e;
    // `shifted`'s low bits hold n (the rounding's integer): its exponent is
    // that of `magic`, 1.5·2²³, whose mantissa's low 9 bits are 0.
    let shifted = t + EXP_C.magic;
    let n = shifted - EXP_C.magic;
    let r = (-n).mul_add(EXP_C.ln2_hi, x);
    let r = (-n).mul_add(EXP_C.ln2_lo, r);
    let mut p = EXP_C.c[6];
    for &c in EXP_C.c[..6].iter().rev() {
        p = p.mul_add(r, c);
    }
    if n < -126.0 {
        return 0.0;
    }
    // 2ⁿ from n + 127 in the exponent field: the same bits as `(n as i32
    // + 127) << 23` for n in [−126, 0], without the saturating float-to-int
    // conversion, which the compiler cannot vectorize.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    p * scale
}

/// The constants of [`exp_poly`] (shared with the SIMD versions).
pub(crate) struct ExpConsts {
    pub log2e: f32,
    pub magic: f32,
    pub ln2_hi: f32,
    pub ln2_lo: f32,
    /// 1/k! for k = 0..=6.
    pub c: [f32; 7],
}

pub(crate) const EXP_C: ExpConsts = ExpConsts {
    log2e: std::f32::consts::LOG2_E,
    magic: 12_582_912.0,
    ln2_hi: 0.693_145_75,
    ln2_lo: 1.428_606_8e-6,
    c: [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
    ],
};

fn exp_sub_ref(s: &mut [f32], m: f32) {
    for x in s.iter_mut().take(KEY_BLOCK) {
        *x = exp_poly(*x - m);
    }
}

/// Most query rows per call of [`F16Ops`].
pub const MAX_ROWS: usize = 16;

fn qk_ref(q: &[f32], kt: &[half::f16], s: &mut [f32], _ahead: usize) {
    let hd = kt.len() / KEY_BLOCK;
    let rows = q.len() / hd;
    for r in 0..rows {
        for j in 0..KEY_BLOCK {
            let mut a = 0.0f32;
            for d in 0..hd {
                a = q[r * hd + d].mul_add(kt[d * KEY_BLOCK + j].to_f32(), a);
            }
            s[r * KEY_BLOCK + j] = a;
        }
    }
}

fn qk2_ref(q: &[f32], kt: [&[half::f16]; 2], s0: &mut [f32], s1: &mut [f32], ahead: usize) {
    qk_ref(q, kt[0], s0, ahead);
    qk_ref(q, kt[1], s1, ahead);
}

fn pv_ref(acc: &mut [f32], p: &[f32], v: &[half::f16], offs: &[usize], hd: usize, _ahead: usize) {
    let rows = acc.len() / hd;
    for r in 0..rows {
        for (j, &o) in offs.iter().enumerate() {
            let pj = p[r * KEY_BLOCK + j];
            for (a, &b) in acc[r * hd..(r + 1) * hd].iter_mut().zip(&v[o..o + hd]) {
                *a = pj.mul_add(b.to_f32(), *a);
            }
        }
    }
}

pub const F16_SCALAR: F16Ops = F16Ops {
    name: "scalar",
    level: Level::Scalar,
    qk: qk_ref,
    qk2: qk2_ref,
    pv: pv_ref,
    exp_sub: exp_sub_ref,
};

/// Every f16 table this machine can run, scalar first.
pub fn f16_available() -> Vec<F16Ops> {
    #[allow(unused_mut)]
    let mut v = vec![F16_SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if crate::x86::avx2_available() {
            v.push(crate::x86::F16_AVX2);
        }
        if crate::x86::vnni_available() {
            v.push(crate::x86::F16_AVX512);
        }
    }
    v
}

/// The f16 attention ops of [`level`] (scalar under `GEMMA3_FORCE_SCALAR`).
pub fn f16_best() -> &'static F16Ops {
    static BEST: OnceLock<F16Ops> = OnceLock::new();
    BEST.get_or_init(|| f16_for(level()))
}

/// The f16 attention ops a kernel table of `level` goes with: this CPU's
/// ops of that level (the scalar ones if it has none, so that safe code
/// cannot get ops the CPU lacks).
pub fn f16_for(level: Level) -> F16Ops {
    f16_available()
        .into_iter()
        .find(|o| o.level == level)
        .unwrap_or(F16_SCALAR)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// Each AVX-512 table is listed next to its `-pairs` twin, and the one
    /// listed later (the default of the two) is the pair table exactly where
    /// `x86::pairs_pay` says pairs pay on this CPU.
    #[test]
    fn pair_twins_are_ordered_by_the_cpu() {
        let names: Vec<&str> = super::available().iter().map(|k| k.name).collect();
        for base in ["avx512-vnni", "avx512-vnni-gfni"] {
            let Some(i) = names.iter().position(|&n| n == base) else {
                continue;
            };
            let twin = format!("{base}-pairs");
            let j = (names.iter().position(|&n| n == twin))
                .unwrap_or_else(|| panic!("{twin} in {names:?}"));
            assert_eq!(i.abs_diff(j), 1, "{names:?}");
            assert_eq!(j > i, crate::x86::pairs_pay(), "{names:?}");
        }
    }
}
