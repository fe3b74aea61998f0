//! Prompt processing on AMX tiles (Intel Sapphire Rapids and later): the
//! packed kernels' integer block sums for 16 tokens × 16 rows at a time
//! from one `tdpbssd`, instead of 8 `vpdpbusd`s per token.
//!
//! The interleaved layout of [`crate::packed`] is already what a tile
//! multiply wants of its right operand (row k of the tile holds elements
//! 4k..4k + 4 of each of the 16 weight rows side by side). Each group's
//! blocks are unpacked once per call into plain signed bytes (w itself, so
//! no −16·Σy, −128·Σy or −32·Σy correction is needed) and then multiplied
//! by the activations of every 16 tokens, which the tile loads read in
//! place with the stride between two tokens' blocks.
//!
//! **Numerics** are the packed kernels' ([`crate::packed::spec_dot`]): a
//! block's (or a K-quant sub-block's) integer sum is exact in a tile's i32
//! lanes, the K-quant sub-block scales are applied in i32 as the other
//! tables do, and the float work is the same multiply and fused
//! multiply-add per block, in block order. So the results equal every
//! other table's bit for bit.
//!
//! **Testing.** The kernels are written against `TileUnit`, the five tile
//! instructions they use. `Amx` issues them; `Emulated` carries them
//! out in plain Rust (with the hardware's checks of the tile shapes), so
//! `tests/packed_kernels.rs` runs the same kernel code bit for bit against
//! the specification on any CPU with the AVX-512 table, and on the real
//! tiles where the CPU has them.
//!
//! Tiles: tmm0/tmm1 hold activations (16 tokens × K bytes), tmm2/tmm3
//! weights (K/4 rows × 64 bytes), tmm4..tmm7 sums (16 tokens × 16 rows of
//! i32). K is 32 (a block of a 32-element format; a Q4_K, Q5_K or IQ4_XS
//! sub-block) or 16 (a Q6_K or coded-format sub-block).
//!
//! Linux grants a process the tile state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); [`available`]
//! asks once and reports false where the CPU lacks AMX-INT8, the request
//! is refused, or `GEMMA3_NO_AMX` is set.

use crate::formats::*;
use crate::packed::{
    block_offsets, min_sums, q4k_pair, ActRow, Isa, PackedFormat, PackedKernels, LANES,
};
use crate::packed_x86::Avx512;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Tokens per tile (its rows).
const TOKENS: usize = crate::packed::TILE_TOKENS;

/// Whether the AMX table may run here: AMX-TILE and AMX-INT8 in CPUID, the
/// AVX-512 features the float part uses, the OS's permission granted, and
/// `GEMMA3_NO_AMX` not set. Asked once. (`GEMMA3_FORCE_SCALAR` is
/// `simd::best`'s to apply, as for every other table.)
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let off = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
        if off("GEMMA3_NO_AMX") || !crate::x86::gfni_available() {
            return false;
        }
        // (`__cpuid_count` is an unsafe fn in older toolchains.)
        // SAFETY: leaf 7 exists on every CPU with the AVX-512 checked above.
        #[allow(unused_unsafe)]
        let l7 = unsafe { __cpuid_count(7, 0) };
        let (tile, int8) = ((l7.edx >> 24) & 1 == 1, (l7.edx >> 25) & 1 == 1);
        tile && int8 && request_tile_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call; on refusal (an old kernel, a seccomp
    // policy) it returns an error and nothing changes.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// tmm0/1: 16 × k bytes; tmm2/3: k/4 × 64 bytes; tmm4..7: 16 × 64 bytes.
    fn new(k: usize) -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            let (rows, colsb) = match t {
                0 | 1 => (TOKENS, k),
                2 | 3 => (k / 4, 64),
                _ => (TOKENS, 64),
            };
            c.rows[t] = rows as u8;
            c.colsb[t] = colsb as u16;
        }
        c
    }
}

/// The tile instructions the kernels use, on tiles named by number.
pub(crate) trait TileUnit {
    /// `ldtilecfg`: set every tile's shape (and zero the tiles).
    unsafe fn config(cfg: &TileConfig);
    /// `tileloadd`: tile T's rows from `p`, `stride` bytes apart.
    unsafe fn load<const T: u8>(p: *const u8, stride: isize);
    /// `tilezero`.
    unsafe fn zero<const T: u8>();
    /// `tdpbssd`: C += A · B, signed bytes, i32 sums.
    unsafe fn dp<const C: u8, const A: u8, const B: u8>();
    /// `tilestored`: tile T's rows to `p`, 64 bytes apart.
    unsafe fn store<const T: u8>(p: *mut u8);
    /// `tilerelease`: give the tile state back.
    unsafe fn release();
}

/// The tile unit of the CPU.
pub(crate) struct Amx;

impl TileUnit for Amx {
    #[inline(always)]
    unsafe fn config(cfg: &TileConfig) {
        asm!("ldtilecfg [{}]", in(reg) cfg, options(nostack, readonly, preserves_flags));
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(p: *const u8, stride: isize) {
        asm!(
            "tileloadd tmm{t}, [{p} + {s}*1]",
            t = const T,
            p = in(reg) p,
            s = in(reg) stride,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>() {
        asm!("tilezero tmm{t}", t = const T, options(nomem, nostack, preserves_flags));
    }
    #[inline(always)]
    unsafe fn dp<const C: u8, const A: u8, const B: u8>() {
        asm!(
            "tdpbssd tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nomem, nostack, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(p: *mut u8) {
        asm!(
            "tilestored [{p} + {s}*1], tmm{t}",
            t = const T,
            p = in(reg) p,
            s = in(reg) 64usize,
            options(nostack, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn release() {
        asm!("tilerelease", options(nomem, nostack, preserves_flags));
    }
}

/// The tile unit carried out in plain Rust, one thread's tiles in a
/// thread-local, with the shape checks under which the CPU would fault
/// (so a kernel that configures or combines tiles wrongly fails here too).
pub(crate) struct Emulated;

struct EmuTiles {
    rows: [usize; 8],
    colsb: [usize; 8],
    data: [[u8; 1024]; 8],
}

thread_local! {
    static EMU: std::cell::RefCell<EmuTiles> = const {
        std::cell::RefCell::new(EmuTiles { rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] })
    };
}

impl TileUnit for Emulated {
    unsafe fn config(cfg: &TileConfig) {
        assert_eq!(cfg.palette, 1);
        EMU.with_borrow_mut(|e| {
            for t in 0..8 {
                assert!(cfg.rows[t] <= 16 && cfg.colsb[t] <= 64);
                e.rows[t] = cfg.rows[t] as usize;
                e.colsb[t] = cfg.colsb[t] as usize;
                e.data[t] = [0; 1024];
            }
        })
    }
    unsafe fn load<const T: u8>(p: *const u8, stride: isize) {
        EMU.with_borrow_mut(|e| {
            let t = T as usize;
            assert!(e.rows[t] > 0, "tile {t} not configured");
            for r in 0..e.rows[t] {
                let src = p.offset(r as isize * stride);
                std::ptr::copy_nonoverlapping(src, e.data[t][64 * r..].as_mut_ptr(), e.colsb[t]);
            }
        })
    }
    unsafe fn zero<const T: u8>() {
        EMU.with_borrow_mut(|e| e.data[T as usize] = [0; 1024])
    }
    unsafe fn dp<const C: u8, const A: u8, const B: u8>() {
        EMU.with_borrow_mut(|e| {
            let (c, a, b) = (C as usize, A as usize, B as usize);
            // The shapes `tdpbssd` requires: M × K, K/4 × 4N, M × 4N.
            assert!(e.rows[c] == e.rows[a] && e.colsb[c] == e.colsb[b]);
            assert!(e.colsb[a] == 4 * e.rows[b] && e.rows[a] > 0);
            for m in 0..e.rows[c] {
                for n in 0..e.colsb[c] / 4 {
                    let mut sum =
                        i32::from_le_bytes(e.data[c][64 * m + 4 * n..][..4].try_into().unwrap());
                    for k in 0..e.rows[b] {
                        for i in 0..4 {
                            let x = e.data[a][64 * m + 4 * k + i] as i8 as i32;
                            let y = e.data[b][64 * k + 4 * n + i] as i8 as i32;
                            sum = sum.wrapping_add(x * y);
                        }
                    }
                    e.data[c][64 * m + 4 * n..][..4].copy_from_slice(&sum.to_le_bytes());
                }
            }
        })
    }
    unsafe fn store<const T: u8>(p: *mut u8) {
        EMU.with_borrow(|e| {
            let t = T as usize;
            for r in 0..e.rows[t] {
                std::ptr::copy_nonoverlapping(
                    e.data[t][64 * r..].as_ptr(),
                    p.add(64 * r),
                    e.colsb[t],
                );
            }
        })
    }
    unsafe fn release() {
        EMU.with_borrow_mut(|e| {
            e.rows = [0; 8];
            e.colsb = [0; 8];
        })
    }
}

/// Sums of up to 4 tiles, 16 tokens × 16 lanes of i32 each.
#[repr(C, align(64))]
struct Sums([[i32; 256]; 4]);

/// A tile kernel's arguments: `acts[i]` and `out[i]` are token i's
/// activations and outputs for the groups of `w` (as for `t1`/`t4`); the
/// token count is a multiple of `TOKENS`, and the tokens of each 16 are
/// equally spaced in memory (the tile loads read them at one stride).
fn tiles<U: TileUnit>(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    acts: &[ActRow],
    out: &mut [&mut [f32]],
) {
    assert!(acts.len() == out.len() && acts.len().is_multiple_of(TOKENS));
    assert!(f.has_tiles(), "no tile kernels for {f:?}");
    assert!(
        crate::x86::gfni_available(),
        "the tile kernels' vector parts need AVX-512 and GFNI"
    );
    let groups = w.len() / gb;
    for (a, o) in acts.iter().zip(out.iter()) {
        assert!(o.len() >= groups * LANES);
        match *a {
            ActRow::Q8_0 { blocks, d, .. } => assert!(blocks.len() >= nb && d.len() >= nb),
            ActRow::Q8K { blocks, .. } => assert!(blocks.len() >= nb),
            ActRow::F32 { .. } => panic!("f32 activations for an integer format"),
        }
    }
    let stride_of = |c: &[ActRow]| -> Option<isize> {
        let p = |a: &ActRow| match *a {
            ActRow::Q8_0 { blocks, .. } => blocks.as_ptr() as isize,
            ActRow::Q8K { blocks, .. } => blocks.as_ptr() as isize,
            ActRow::F32 { x } => x.as_ptr() as isize,
        };
        let s = p(&c[1]) - p(&c[0]);
        (c.iter().enumerate())
            .all(|(i, a)| p(a) == p(&c[0]) + i as isize * s)
            .then_some(s)
    };
    let strides: Vec<isize> = acts
        .chunks_exact(TOKENS)
        .map(|c| stride_of(c).expect("the tokens of a tile must be equally spaced"))
        .collect();
    // SAFETY: the table that holds `tiles::<Amx>` is offered only where
    // `available()` found the CPU features and the permission; every index
    // read without checks is within the lengths asserted above.
    unsafe { tiles_inner::<U>(f, w, gb, nb, acts, out, &strides) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c")]
unsafe fn tiles_inner<U: TileUnit>(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    acts: &[ActRow],
    out: &mut [&mut [f32]],
    strides: &[isize],
) {
    // Sub-blocks of 16 (Q6_K, the coded formats) or 32 elements.
    let k = if matches!(f, PackedFormat::Q6K | PackedFormat::Coded(_)) {
        16
    } else {
        32
    };
    U::config(&TileConfig::new(k));
    // One group's blocks as signed bytes, B-tile rows 64 bytes apart.
    let per_block = if f.block_cols() == 32 { 512 } else { 4096 };
    let mut wbuf = vec![0u8; nb * per_block];
    let mut sums = Box::new(Sums([[0; 256]; 4]));
    for g in 0..w.len() / gb {
        let gp = w.as_ptr().add(g * gb);
        unpack_group(f, gp, nb, wbuf.as_mut_ptr());
        for (c, &stride) in strides.iter().enumerate() {
            let chunk = &acts[TOKENS * c..TOKENS * (c + 1)];
            let wb = wbuf.as_ptr();
            let acc = match (f.block_cols(), k) {
                (32, _) => chunk_b32::<U>(f, gp, nb, wb, chunk, stride, &mut sums),
                (_, 32) => chunk_k::<U, 32, 8>(f, gp, nb, wb, chunk, stride, &mut sums),
                _ => chunk_k::<U, 16, 16>(f, gp, nb, wb, chunk, stride, &mut sums),
            };
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[TOKENS * c + t].as_mut_ptr().add(g * LANES), *a);
            }
        }
    }
    U::release();
}

type V = Avx512<true>;

/// IQ4_NL's table and each code table as signed bytes, in each 16-byte lane.
static IQ4NL_I8: [u8; 64] = crate::formats::lut_lanes(crate::formats::KVALUES_IQ4NL, 0);
static CODE_TABLES_I8: [[u8; 64]; 6] = crate::coded::CodeTable::all_lanes(0);

/// Write group `gp`'s blocks to `dst` as signed weights, in B-tile rows:
/// for the 32-element formats 512 bytes a block (8 rows of 4 elements × 16
/// weight rows); for the 256-element ones their 8 sub-blocks of 32 (Q4_K,
/// Q5_K, IQ4_XS) or 16 of 16 (Q6_K, the coded formats) one after another
/// (4096 bytes a super-block).
#[inline(always)]
unsafe fn unpack_group(f: PackedFormat, gp: *const u8, nb: usize, dst: *mut u8) {
    let (core, sb) = (f.core_bytes(), f.scale_bytes());
    let m4 = V::splat8(0x0F);
    let st = |i: usize, v: __m512i| _mm512_storeu_si512(dst.add(64 * i) as *mut _, v);
    for b in 0..nb {
        let p = gp.add(block_offsets(core, sb, nb, b).0);
        match f {
            PackedFormat::Q8_0 => {
                // Stored as w + 128: flipping the top bit gives w.
                for i in 0..8 {
                    let v = V::load(p.add(64 * i));
                    st(8 * b + i, _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
                }
            }
            PackedFormat::Q5_0 => {
                let h = V::load(p);
                let sixteen = _mm512_set1_epi8(16);
                for c in 0..4 {
                    let v = V::load(p.add(64 + 64 * c));
                    let lo = V::and_or(v, m4, V::fifth_bits(h, c));
                    let hi = V::and_or(V::shr::<4>(v), m4, V::fifth_bits(h, 4 + c));
                    st(8 * b + c, _mm512_sub_epi8(lo, sixteen));
                    st(8 * b + 4 + c, _mm512_sub_epi8(hi, sixteen));
                }
            }
            PackedFormat::Q5_1 => {
                // Q5_0's bits with u = q itself (0..32; the minimum is a float step).
                let h = V::load(p);
                for c in 0..4 {
                    let v = V::load(p.add(64 + 64 * c));
                    st(8 * b + c, V::and_or(v, m4, V::fifth_bits(h, c)));
                    st(
                        8 * b + 4 + c,
                        V::and_or(V::shr::<4>(v), m4, V::fifth_bits(h, 4 + c)),
                    );
                }
            }
            PackedFormat::Q4_0 => {
                let eight = _mm512_set1_epi8(8);
                for c in 0..4 {
                    let v = V::load(p.add(64 * c));
                    st(8 * b + c, _mm512_sub_epi8(V::and(v, m4), eight));
                    st(
                        8 * b + 4 + c,
                        _mm512_sub_epi8(V::and(V::shr::<4>(v), m4), eight),
                    );
                }
            }
            PackedFormat::IQ4NL => {
                // The table's signed values, looked up directly.
                let table = V::load(IQ4NL_I8.as_ptr());
                for c in 0..4 {
                    let v = V::load(p.add(64 * c));
                    st(8 * b + c, V::lut16(table, V::and(v, m4)));
                    st(8 * b + 4 + c, V::lut16(table, V::and(V::shr::<4>(v), m4)));
                }
            }
            // Sub-block j's vectors g = 0..8, as the other tables' kernels read them.
            PackedFormat::Q4K | PackedFormat::Q5K => {
                for c in 0..4 {
                    for g in 0..8 {
                        let (lo, hi) = if f == PackedFormat::Q5K {
                            q4k_pair::<V, true>(p, c, g)
                        } else {
                            q4k_pair::<V, false>(p, c, g)
                        };
                        st(64 * b + 8 * (2 * c) + g, lo);
                        st(64 * b + 8 * (2 * c + 1) + g, hi);
                    }
                }
            }
            PackedFormat::IQ4XS => {
                // Sub-block j: vectors (j, 0..4), elements 4g.. in the low nibbles,
                // 16 + 4g.. in the high; IQ4_NL's table, signed.
                let table = V::load(IQ4NL_I8.as_ptr());
                for j in 0..8 {
                    for g in 0..4 {
                        let v = V::load(p.add(128 + 64 * (4 * j + g)));
                        st(64 * b + 8 * j + g, V::lut16(table, V::and(v, m4)));
                        st(
                            64 * b + 8 * j + 4 + g,
                            V::lut16(table, V::and(V::shr::<4>(v), m4)),
                        );
                    }
                }
            }
            PackedFormat::Coded(t) => {
                // Sub-block 2c in the low nibbles of vectors (c, 0..4), 2c + 1 in the high.
                let table = V::load(CODE_TABLES_I8[t as usize].as_ptr());
                let codes = PackedFormat::CODED_CODES;
                for c in 0..8 {
                    for g in 0..4 {
                        let v = V::load(p.add(codes + 64 * (4 * c + g)));
                        st(64 * b + 4 * (2 * c) + g, V::lut16(table, V::and(v, m4)));
                        st(
                            64 * b + 4 * (2 * c + 1) + g,
                            V::lut16(table, V::and(V::shr::<4>(v), m4)),
                        );
                    }
                }
            }
            PackedFormat::Q6K => {
                let thirty_two = _mm512_set1_epi8(32);
                for j in 0..16 {
                    let base = p.add(256 + 192 * j);
                    let (va, vb, vc) =
                        (V::load(base), V::load(base.add(64)), V::load(base.add(128)));
                    let u = [
                        V::and_or(va, m4, V::two_bits(vc, 0)),
                        V::and_or(V::shr::<4>(va), m4, V::two_bits(vc, 1)),
                        V::and_or(vb, m4, V::two_bits(vc, 2)),
                        V::and_or(V::shr::<4>(vb), m4, V::two_bits(vc, 3)),
                    ];
                    for (i, u) in u.into_iter().enumerate() {
                        st(64 * b + 4 * j + i, _mm512_sub_epi8(u, thirty_two));
                    }
                }
            }
            _ => unreachable!("checked by the caller"),
        }
    }
}

/// Tile products in flight ahead of the one whose sums are being used.
///
/// Using a product's sums right after storing them made every block wait
/// for its tile product and store (a 5th-generation Xeon, one thread, 512
/// tokens: attn_q's shape at 100 G multiply-adds/s, ffn_gate's at 125).
/// With the next products issued first, their tile work runs while earlier
/// sums are finished: 152 and 173 G/s in the next run. 2 and 3 ahead
/// measured alike (1 ahead: 117 and 89); the VM's noise was ±30%.
const AHEAD: usize = 2;

/// One tile product: 16 tokens of K bytes at `a` (`stride` bytes apart)
/// times the K/4 B rows at `b`, stored as 16 × 16 i32 at `dst`. Slot
/// `s % 4` picks the sums tile (tmm4 + s), `s % 2` the operand tiles, so
/// that products in flight do not share a sums tile.
#[inline(always)]
unsafe fn issue<U: TileUnit>(
    slot: usize,
    a: *const u8,
    stride: isize,
    b: *const u8,
    dst: *mut i32,
) {
    let dst = dst as *mut u8;
    match slot % 4 {
        0 => product::<U, 0, 2, 4>(a, stride, b, dst),
        1 => product::<U, 1, 3, 5>(a, stride, b, dst),
        2 => product::<U, 0, 2, 6>(a, stride, b, dst),
        _ => product::<U, 1, 3, 7>(a, stride, b, dst),
    }
}

/// Tiles A and B loaded, C = A · B, C stored.
#[inline(always)]
unsafe fn product<U: TileUnit, const A: u8, const B: u8, const C: u8>(
    a: *const u8,
    stride: isize,
    b: *const u8,
    dst: *mut u8,
) {
    U::load::<A>(a, stride);
    U::load::<B>(b, 64);
    U::zero::<C>();
    U::dp::<C, A, B>();
    U::store::<C>(dst);
}

/// `units` tile products, unit u from activations at `a(u)` and weights
/// at `b(u)`, handed to `consume(u, sums)` in order, with the products of
/// the next [`AHEAD`] units already issued.
#[inline(always)]
unsafe fn pipeline<U: TileUnit>(
    units: usize,
    a: impl Fn(usize) -> *const u8,
    stride: isize,
    b: impl Fn(usize) -> *const u8,
    sums: &mut Sums,
    mut consume: impl FnMut(usize, *const i32),
) {
    let buf = sums.0.as_mut_ptr() as *mut i32;
    let slot = |u: usize| buf.add(256 * (u % 4));
    for u in 0..AHEAD.min(units) {
        issue::<U>(u, a(u), stride, b(u), slot(u));
    }
    for u in 0..units {
        if u + AHEAD < units {
            let v = u + AHEAD;
            issue::<U>(v, a(v), stride, b(v), slot(v));
        }
        consume(u, slot(u));
    }
}

/// 16 tokens × one group of a Q8_0, Q5_0, Q4_0, IQ4_NL or Q5_1 matrix: per block, its
/// exact integer sums from one tile product, then `acc = fma(dw · dy, S, acc)` (Q5_1:
/// then `acc = fma(m, dy·Σy, acc)`).
#[inline(always)]
unsafe fn chunk_b32<U: TileUnit>(
    f: PackedFormat,
    gp: *const u8,
    nb: usize,
    wbuf: *const u8,
    chunk: &[ActRow],
    stride: isize,
    sums: &mut Sums,
) -> [__m512; TOKENS] {
    let (core, sb) = (f.core_bytes(), f.scale_bytes());
    let min = f == PackedFormat::Q5_1;
    let mut dy = [std::ptr::null::<f32>(); TOKENS];
    let mut dys = [std::ptr::null::<f32>(); TOKENS];
    let mut y0 = std::ptr::null::<u8>();
    for (t, a) in chunk.iter().enumerate() {
        let ActRow::Q8_0 { blocks, d, ds, .. } = *a else {
            unreachable!("the 32-element formats take Q8_0 activations")
        };
        dy[t] = d.as_ptr();
        dys[t] = ds.as_ptr();
        if t == 0 {
            y0 = blocks.as_ptr() as *const u8;
        }
    }
    let qs = std::mem::offset_of!(BlockQ8_0, qs);
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    pipeline::<U>(
        nb,
        |b| y0.add(std::mem::size_of::<BlockQ8_0>() * b + qs),
        stride,
        |b| wbuf.add(512 * b),
        sums,
        |b, s| {
            let scales = gp.add(block_offsets(core, sb, nb, b).1);
            let dw = V::load_f16(scales);
            for t in 0..TOKENS {
                let is = _mm512_load_si512(s.add(16 * t) as *const _);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*dy[t].add(b)));
                acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(is), acc[t]);
            }
            if min {
                let m = V::load_f16(scales.add(32));
                for t in 0..TOKENS {
                    acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(*dys[t].add(b)), acc[t]);
                }
            }
        },
    );
    acc
}

/// The Q8_K activation blocks of every token of a chunk.
#[inline(always)]
unsafe fn q8k_blocks(chunk: &[ActRow]) -> [*const BlockQ8K; TOKENS] {
    let mut y = [std::ptr::null(); TOKENS];
    for (t, a) in chunk.iter().enumerate() {
        let ActRow::Q8K { blocks, .. } = *a else {
            unreachable!("K-quant weights take Q8_K activations")
        };
        y[t] = blocks.as_ptr();
    }
    y
}

/// 16 tokens × one group of a Q4_K, Q5_K or IQ4_XS (`K` = 32, 8 sub-blocks)
/// or Q6_K or coded (`K` = 16, 16 sub-blocks) matrix: S = Σ_j sc_j ·
/// (sub-block j's tile sum), then the super-block's float steps
/// ([`finish_q4k`], [`finish_q6k`], and Q2_K's minimums), and a coded
/// table's 2^−k at the end.
#[inline(always)]
unsafe fn chunk_k<U: TileUnit, const K: usize, const SUBS: usize>(
    f: PackedFormat,
    gp: *const u8,
    nb: usize,
    wbuf: *const u8,
    chunk: &[ActRow],
    stride: isize,
    sums: &mut Sums,
) -> [__m512; TOKENS] {
    // Q4_K's and Q5_K's sub-block scales are unsigned 6-bit, the others' signed bytes.
    let q4k = matches!(f, PackedFormat::Q4K | PackedFormat::Q5K);
    let table = match f {
        PackedFormat::Coded(t) => Some(t),
        _ => None,
    };
    let y = q8k_blocks(chunk);
    let y0 = y[0];
    let (core_bytes, sb) = (f.core_bytes(), f.scale_bytes());
    let qs = std::mem::offset_of!(BlockQ8K, qs);
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    let mut s = [_mm512_setzero_si512(); TOKENS];
    pipeline::<U>(
        nb * SUBS,
        |u| (y0.add(u / SUBS) as *const u8).add(qs + K * (u % SUBS)),
        stride,
        |u| wbuf.add(64 * (K / 4) * u),
        sums,
        |u, p| {
            let (b, j) = (u / SUBS, u % SUBS);
            let (co, so) = block_offsets(core_bytes, sb, nb, b);
            let sc = if q4k {
                V::widen_u8(gp.add(co + 16 * j))
            } else {
                V::widen_i8(gp.add(co + 16 * j))
            };
            for (t, s) in s.iter_mut().enumerate() {
                let is = _mm512_load_si512(p.add(16 * t) as *const _);
                *s = _mm512_add_epi32(*s, _mm512_mullo_epi32(is, sc));
            }
            if j == SUBS - 1 {
                if q4k {
                    finish_q4k(b, gp.add(co), gp.add(so), &y, &s, &mut acc);
                } else {
                    finish_q6k(b, gp.add(so), &y, &s, &mut acc);
                    if table.is_some_and(|t| t.has_min()) {
                        finish_q2k_min(b, gp.add(co), gp.add(so), &y, &mut acc);
                    }
                }
                s = [_mm512_setzero_si512(); TOKENS];
            }
        },
    );
    if let Some(t) = table.filter(|t| t.post() != 1.0) {
        for a in acc.iter_mut() {
            *a = _mm512_mul_ps(*a, _mm512_set1_ps(t.post()));
        }
    }
    acc
}

/// Q2_K's minimums for super-block `b` of 16 tokens: acc −= (dmin·dy)·M
/// with M = Σ_j m_j · Σy_j over its 16 sub-blocks.
#[inline(always)]
unsafe fn finish_q2k_min(
    b: usize,
    core: *const u8,
    scales: *const u8,
    y: &[*const BlockQ8K; TOKENS],
    acc: &mut [__m512; TOKENS],
) {
    let dmin = V::load_f16(scales.add(32));
    for t in 0..TOKENS {
        let yb = &*y[t].add(b);
        let m = min_sums::<V>(core.add(PackedFormat::CODED_MINS), 8, |j| yb.bsums[j]);
        let dy = _mm512_set1_ps(yb.d);
        acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dy), _mm512_cvtepi32_ps(m), acc[t]);
    }
}

/// Q4_K's float steps for super-block `b` of 16 tokens: acc += (d·dy)·S,
/// then acc −= (dmin·dy)·M with M = Σ_j m_j · Σy_j.
#[inline(always)]
unsafe fn finish_q4k(
    b: usize,
    core: *const u8,
    scales: *const u8,
    y: &[*const BlockQ8K; TOKENS],
    s: &[__m512i; TOKENS],
    acc: &mut [__m512; TOKENS],
) {
    let d = V::load_f16(scales);
    let dmin = V::load_f16(scales.add(32));
    for t in 0..TOKENS {
        let yb = &*y[t].add(b);
        let m = min_sums::<V>(core.add(128), 4, |j| yb.bsums[2 * j] + yb.bsums[2 * j + 1]);
        let dy = _mm512_set1_ps(yb.d);
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, dy), _mm512_cvtepi32_ps(s[t]), acc[t]);
        acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dy), _mm512_cvtepi32_ps(m), acc[t]);
    }
}

/// Q6_K's float step for super-block `b` of 16 tokens: acc += (d·dy)·S.
#[inline(always)]
unsafe fn finish_q6k(
    b: usize,
    scales: *const u8,
    y: &[*const BlockQ8K; TOKENS],
    s: &[__m512i; TOKENS],
    acc: &mut [__m512; TOKENS],
) {
    let d = V::load_f16(scales);
    for t in 0..TOKENS {
        let dy = _mm512_set1_ps((*y[t].add(b)).d);
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, dy), _mm512_cvtepi32_ps(s[t]), acc[t]);
    }
}

/// The GFNI pair table's kernels with tiles for batches of 16 tokens and more.
pub const PACKED_AMX: PackedKernels = PackedKernels {
    tiles: Some(tiles::<Amx>),
    ..crate::packed_x86::PACKED_GFNI_PAIRS
};

/// [`PACKED_AMX`] with the tile instructions emulated (`Emulated`), for
/// testing the tile kernels on CPUs without AMX; None where the CPU lacks
/// the AVX-512 and GFNI their vector parts use. Far slower than any table.
pub fn emulated() -> Option<PackedKernels> {
    crate::x86::gfni_available().then_some(PackedKernels {
        tiles: Some(tiles::<Emulated>),
        ..crate::packed_x86::PACKED_GFNI_PAIRS
    })
}
