//! Q2_K, ggml's lattice formats (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
//! IQ3_XXS, IQ3_S) and its ternary ones (TQ1_0, TQ2_0), decoded into one form: each element takes one of at
//! most 16 small integers, so it becomes a 4-bit code into its format's
//! [`CodeTable`], with an integer scale per 16 elements and the block's f16
//! scale d (Q2_K: also an integer minimum per 16 and an f16 dmin):
//!
//! `x[e] = d · scale[e / 16] · TABLE[code[e]] · 2^−k − dmin · min[e / 16]`
//!
//! d has 11 significant bits, the scales at most 5 and the table values at
//! most 6, so every product there is exact in f32 and this is ggml's
//! dequantization bit for bit (the tests check it against gguf-py's). The
//! int8 kernels use the same integers (see `packed`), the lattice formats
//! in one packed form per table, decoded once when a model is loaded.
//!
//! ref: ggml-common.h (block_iq2_xxs … block_iq1_m, the grids and
//! ksigns_iq2xs) and ggml-quants.c dequantize_row_iq*, read through
//! gguf-py's gguf/quants.py; the grids are in `iq_grids.rs`.

use crate::formats::{f16_le, lut_lanes, QK_K};
use crate::iq_grids::*;

/// The formats read through this module (as [`crate::WeightFormat::Coded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodedFormat {
    Q2K,
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ3XXS,
    IQ3S,
    IQ1S,
    IQ1M,
    TQ1_0,
    TQ2_0,
}

impl CodedFormat {
    pub const ALL: [CodedFormat; 10] = [
        CodedFormat::Q2K,
        CodedFormat::IQ2XXS,
        CodedFormat::IQ2XS,
        CodedFormat::IQ2S,
        CodedFormat::IQ3XXS,
        CodedFormat::IQ3S,
        CodedFormat::IQ1S,
        CodedFormat::IQ1M,
        CodedFormat::TQ1_0,
        CodedFormat::TQ2_0,
    ];

    /// Bytes per 256-element block.
    pub const fn block_bytes(self) -> usize {
        match self {
            CodedFormat::Q2K => 84,
            CodedFormat::IQ2XXS => 66,
            CodedFormat::IQ2XS => 74,
            CodedFormat::IQ2S => 82,
            CodedFormat::IQ3XXS => 98,
            CodedFormat::IQ3S => 110,
            CodedFormat::IQ1S => 50,
            CodedFormat::IQ1M => 56,
            CodedFormat::TQ1_0 => 54,
            CodedFormat::TQ2_0 => 66,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            CodedFormat::Q2K => "Q2_K",
            CodedFormat::IQ2XXS => "IQ2_XXS",
            CodedFormat::IQ2XS => "IQ2_XS",
            CodedFormat::IQ2S => "IQ2_S",
            CodedFormat::IQ3XXS => "IQ3_XXS",
            CodedFormat::IQ3S => "IQ3_S",
            CodedFormat::IQ1S => "IQ1_S",
            CodedFormat::IQ1M => "IQ1_M",
            CodedFormat::TQ1_0 => "TQ1_0",
            CodedFormat::TQ2_0 => "TQ2_0",
        }
    }

    /// The table its codes index.
    pub const fn table(self) -> CodeTable {
        match self {
            CodedFormat::IQ2XXS | CodedFormat::IQ2XS | CodedFormat::IQ2S => CodeTable::IQ2,
            CodedFormat::IQ3XXS => CodeTable::IQ3XXS,
            CodedFormat::IQ3S => CodeTable::IQ3S,
            CodedFormat::IQ1S | CodedFormat::IQ1M => CodeTable::IQ1,
            CodedFormat::Q2K => CodeTable::Q2K,
            CodedFormat::TQ1_0 | CodedFormat::TQ2_0 => CodeTable::TQ,
        }
    }
}

/// A lattice format's values, indexed by code; each has a power-of-two
/// factor 2^−k applied after the integer sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeTable {
    /// IQ2_XXS, IQ2_XS, IQ2_S: ±8, ±25, ±43 (code = magnitude index | sign << 3); k = 3.
    IQ2,
    /// IQ3_XXS: ±4, ±12, …, ±52, ±62; k = 2.
    IQ3XXS,
    /// IQ3_S: ±1, ±3, …, ±15; k = 0.
    IQ3S,
    /// IQ1_S, IQ1_M: 8g ± 1 for g ∈ {−1, 0, 1} (code = g + 1 | (delta < 0) << 3); k = 3.
    IQ1,
    /// Q2_K: 0..=3 (code = q), with minimums; k = 0.
    Q2K,
    /// TQ1_0, TQ2_0: −1, 0, 1 (and TQ2_0's 2), code = q + 1; k = 0.
    TQ,
}

impl CodeTable {
    /// Every table, in declaration order (`t as usize` indexes it).
    pub const ALL: [CodeTable; 6] = [
        CodeTable::IQ2,
        CodeTable::IQ3XXS,
        CodeTable::IQ3S,
        CodeTable::IQ1,
        CodeTable::Q2K,
        CodeTable::TQ,
    ];

    /// Every table's values plus `offset` as [`lut_lanes`] lays them out,
    /// indexed by `t as usize`.
    pub(crate) const fn all_lanes(offset: i32) -> [[u8; 64]; 6] {
        let mut t = [[0u8; 64]; 6];
        let mut k = 0;
        while k < 6 {
            t[k] = lut_lanes(CodeTable::ALL[k].values(), offset);
            k += 1;
        }
        t
    }

    /// The value of each code (unused codes are 0).
    pub const fn values(self) -> [i8; 16] {
        match self {
            CodeTable::IQ2 => signed(&[8, 25, 43]),
            CodeTable::IQ3XXS => signed(&[4, 12, 20, 28, 36, 44, 52, 62]),
            CodeTable::IQ3S => signed(&[1, 3, 5, 7, 9, 11, 13, 15]),
            CodeTable::IQ1 => [-7, 1, 9, 0, 0, 0, 0, 0, -9, -1, 7, 0, 0, 0, 0, 0],
            CodeTable::Q2K => [0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            CodeTable::TQ => [-1, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// 2^−k: the factor applied to a row's sum after its blocks.
    pub const fn post(self) -> f32 {
        match self {
            CodeTable::IQ2 | CodeTable::IQ1 => 0.125,
            CodeTable::IQ3XXS => 0.25,
            CodeTable::IQ3S | CodeTable::Q2K | CodeTable::TQ => 1.0,
        }
    }

    /// Whether the blocks have minimums (dmin · min).
    pub const fn has_min(self) -> bool {
        matches!(self, CodeTable::Q2K)
    }
}

/// `m` at codes 0.., −m at codes 8.. (up to 8 magnitudes).
const fn signed(m: &[i8]) -> [i8; 16] {
    let mut t = [0i8; 16];
    let mut i = 0;
    while i < m.len() {
        t[i] = m[i];
        t[8 + i] = -m[i];
        i += 1;
    }
    t
}

/// One 256-element block, decoded.
#[derive(Clone, Copy, Debug)]
pub struct Coded {
    /// Element e's code into the format's [`CodeTable`].
    pub code: [u8; QK_K],
    /// Sub-block j's scale (elements 16j..16j + 16), 1..=31 (Q2_K: 0..=15;
    /// TQ1_0, TQ2_0: 1).
    pub scale: [i8; 16],
    /// Q2_K: sub-block j's minimum, 0..=15 (otherwise 0).
    pub min: [u8; 16],
    /// The f16 scale, as stored.
    pub d: [u8; 2],
    /// Q2_K: the f16 scale of the minimums (otherwise 0).
    pub dmin: [u8; 2],
}

/// ggml's `ksigns_iq2xs`: 7 stored sign bits and an eighth that makes
/// their number even.
#[inline]
fn ksigns(i: u32) -> u8 {
    let i = i & 0x7F;
    (i | (i.count_ones() & 1) << 7) as u8
}

/// Element e of grid entry `entry` (`bits` per element).
#[inline]
fn grid_at(entry: u16, e: usize, bits: usize) -> u8 {
    ((entry >> (bits * e)) & ((1 << bits) - 1)) as u8
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Decode one block of `f` (`blk` is its `block_bytes()` bytes).
///
/// Panics if `blk` is not one block (callers pass whole blocks of checked
/// tensors).
pub fn decode(f: CodedFormat, blk: &[u8]) -> Coded {
    assert_eq!(blk.len(), f.block_bytes(), "decode: one {} block", f.name());
    let mut c = Coded {
        code: [0; QK_K],
        scale: [0; 16],
        min: [0; 16],
        d: [blk[0], blk[1]],
        dmin: [0; 2],
    };
    // A 32-element sub-block's scale 2·ls + 1 for both its halves.
    let both = |c: &mut Coded, ib: usize, ls: u32| {
        c.scale[2 * ib] = (2 * ls + 1) as i8;
        c.scale[2 * ib + 1] = (2 * ls + 1) as i8;
    };
    // 8 elements from a 2-bit grid entry with 8 sign bits (IQ2 codes).
    let put8 = |c: &mut Coded, e0: usize, entry: u16, signs: u8| {
        for e in 0..8 {
            c.code[e0 + e] = grid_at(entry, e, 2) | ((signs >> e) & 1) << 3;
        }
    };
    match f {
        CodedFormat::IQ2XXS => {
            // d, then per 32 elements two u32: 4 grid indices (bytes), and
            // 4 × 7 sign bits with the scale in the top 4.
            for ib in 0..8 {
                let (a0, a1) = (u32_at(blk, 2 + 8 * ib), u32_at(blk, 6 + 8 * ib));
                both(&mut c, ib, a1 >> 28);
                for l in 0..4 {
                    let entry = IQ2XXS_GRID[((a0 >> (8 * l)) & 0xFF) as usize];
                    put8(&mut c, 32 * ib + 8 * l, entry, ksigns(a1 >> (7 * l)));
                }
            }
        }
        CodedFormat::IQ2XS => {
            // d, 32 u16 (9-bit grid index, 7 sign bits), 8 bytes of two
            // 4-bit scales (one per 16).
            for ib in 0..8 {
                let sc = blk[66 + ib];
                c.scale[2 * ib] = (2 * (sc & 0x0F) + 1) as i8;
                c.scale[2 * ib + 1] = (2 * (sc >> 4) + 1) as i8;
                for l in 0..4 {
                    let q = u16_at(blk, 2 + 2 * (4 * ib + l));
                    let entry = IQ2XS_GRID[(q & 511) as usize];
                    put8(&mut c, 32 * ib + 8 * l, entry, ksigns(q as u32 >> 9));
                }
            }
        }
        CodedFormat::IQ2S => {
            // d, 32 low index bytes, 32 sign bytes, 8 bytes of 4 × 2 high
            // index bits, 8 bytes of scales as IQ2_XS.
            for ib in 0..8 {
                let sc = blk[74 + ib];
                c.scale[2 * ib] = (2 * (sc & 0x0F) + 1) as i8;
                c.scale[2 * ib + 1] = (2 * (sc >> 4) + 1) as i8;
                let qh = blk[66 + ib] as usize;
                for l in 0..4 {
                    let i = blk[2 + 4 * ib + l] as usize | ((qh >> (2 * l)) & 3) << 8;
                    put8(&mut c, 32 * ib + 8 * l, IQ2S_GRID[i], blk[34 + 4 * ib + l]);
                }
            }
        }
        CodedFormat::IQ3XXS => {
            // d, 64 grid index bytes (4 elements each), then per 32
            // elements a u32 of 4 × 7 sign bits and the scale in the top 4.
            for ib in 0..8 {
                let a = u32_at(blk, 66 + 4 * ib);
                both(&mut c, ib, a >> 28);
                for l in 0..4 {
                    let signs = ksigns(a >> (7 * l));
                    for e in 0..8 {
                        let entry = IQ3XXS_GRID[blk[2 + 8 * ib + 2 * l + e / 4] as usize];
                        c.code[32 * ib + 8 * l + e] =
                            grid_at(entry, e % 4, 3) | ((signs >> e) & 1) << 3;
                    }
                }
            }
        }
        CodedFormat::IQ3S => {
            // d, 64 low index bytes, 8 bytes of ninth index bits, 32 sign
            // bytes, 4 bytes of two 4-bit scales (one per 32).
            for ib in 0..8 {
                both(
                    &mut c,
                    ib,
                    (blk[106 + ib / 2] as u32 >> (4 * (ib % 2))) & 0x0F,
                );
                for e in 0..32 {
                    let j = e / 4;
                    let i = blk[2 + 8 * ib + j] as usize | ((blk[66 + ib] as usize >> j) & 1) << 8;
                    let sign = (blk[74 + 4 * ib + e / 8] >> (e % 8)) & 1;
                    c.code[32 * ib + e] = grid_at(IQ3S_GRID[i], e % 4, 3) | sign << 3;
                }
            }
        }
        CodedFormat::IQ1S => {
            // d, 32 low index bytes, then per 32 elements a u16: 4 × 3 high
            // index bits, a 3-bit scale, the delta's sign in the top bit.
            for ib in 0..8 {
                let h = u16_at(blk, 34 + 2 * ib) as usize;
                both(&mut c, ib, ((h >> 12) & 7) as u32);
                let neg = ((h >> 15) as u8) << 3;
                for l in 0..4 {
                    let entry = IQ1S_GRID[blk[2 + 4 * ib + l] as usize | ((h >> (3 * l)) & 7) << 8];
                    for e in 0..8 {
                        c.code[32 * ib + 8 * l + e] = grid_at(entry, e, 2) | neg;
                    }
                }
            }
        }
        CodedFormat::IQ1M => {
            // 32 low index bytes; 16 bytes of two nibbles (3 high index
            // bits, the delta's sign) per 16 elements; 4 u16 of four 3-bit
            // scales (one per 16), d spread over their top nibbles.
            let s: [u16; 4] = std::array::from_fn(|i| u16_at(blk, 48 + 2 * i));
            let d =
                (s[0] >> 12) | ((s[1] >> 8) & 0x00F0) | ((s[2] >> 4) & 0x0F00) | (s[3] & 0xF000);
            c.d = d.to_le_bytes();
            for (m, sc) in c.scale.iter_mut().enumerate() {
                *sc = (2 * ((s[m / 4] >> (3 * (m % 4))) & 7) + 1) as i8;
            }
            for q in 0..32 {
                let nib = (blk[32 + q / 2] >> (4 * (q % 2))) as usize & 0x0F;
                let entry = IQ1S_GRID[blk[q] as usize | (nib & 7) << 8];
                let neg = ((nib >> 3) as u8) << 3;
                for e in 0..8 {
                    c.code[8 * q + e] = grid_at(entry, e, 2) | neg;
                }
            }
        }
        CodedFormat::Q2K => {
            // 16 bytes of scale | min << 4 (one per 16), 64 bytes of 2-bit
            // quants (element 128h + 32s + l in bits 2s of byte 32h + l), d, dmin.
            for (j, &b) in blk[..16].iter().enumerate() {
                c.scale[j] = (b & 0x0F) as i8;
                c.min[j] = b >> 4;
            }
            for e in 0..QK_K {
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                c.code[e] = (blk[16 + 32 * h + l] >> (2 * s)) & 3;
            }
            c.d = [blk[80], blk[81]];
            c.dmin = [blk[82], blk[83]];
        }
        CodedFormat::TQ2_0 => {
            // 64 bytes of 2-bit q (element 128h + 32s + l in bits 2s of byte
            // 32h + l), then d; x = d·(q − 1), one scale for all 256.
            c.scale = [1; 16];
            for e in 0..QK_K {
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                c.code[e] = (blk[32 * h + l] >> (2 * s)) & 3;
            }
            c.d = [blk[64], blk[65]];
        }
        CodedFormat::TQ1_0 => {
            // 48 bytes of 5 base-3 digits and 4 of 4, then d; x = d·(t − 1).
            // Digit k of byte b is the top digit of b·3^k mod 256 (ggml stores
            // each byte as ⌈n·256 / 243⌉ of its digits' number n): ⌊3·(b·3^k mod 256) / 256⌋.
            // Elements: bytes 0..32 give 32k + m (k < 5), bytes 32..48 give
            // 160 + 16k + m, the 4 high bytes 240 + 4k + m (k < 4).
            c.scale = [1; 16];
            let digit = |b: u8, k: u32| ((b.wrapping_mul(3u8.pow(k)) as u16 * 3) >> 8) as u8;
            // (first element, bytes, digits per byte) of the three runs.
            for (e0, bytes, digits) in [
                (0, &blk[0..32], 5),
                (160, &blk[32..48], 5),
                (240, &blk[48..52], 4),
            ] {
                for k in 0..digits {
                    for (m, &b) in bytes.iter().enumerate() {
                        c.code[e0 + bytes.len() * k + m] = digit(b, k as u32);
                    }
                }
            }
            c.d = [blk[52], blk[53]];
        }
    }
    c
}

/// Dequantize one block of `f` into `out` (256 values), exactly as ggml.
pub fn dequantize_block(f: CodedFormat, blk: &[u8], out: &mut [f32]) {
    let table = f.table();
    let c = decode(f, blk);
    let (d, dmin, values, post) = (f16_le(c.d), f16_le(c.dmin), table.values(), table.post());
    for (j, o) in out[..QK_K].chunks_exact_mut(16).enumerate() {
        let dl = d * c.scale[j] as f32;
        let ml = dmin * c.min[j] as f32;
        for (o, &code) in o.iter_mut().zip(&c.code[16 * j..16 * j + 16]) {
            // Exact products (see the module docs); Q2_K's difference is
            // ggml's one rounding.
            *o = dl * values[code as usize] as f32 * post - ml;
        }
    }
}
