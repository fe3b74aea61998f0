//! ggml block layouts as `#[repr(C)]` types.
//!
//! ref: ggml/src/ggml-common.h (block_q8_0, block_q4_0, block_q5_0, block_q4_1,
//! block_q5_1, block_q4_K,
//! block_q5_K, block_q6_K, block_q8_K). Weight blocks hold their f16 scales as
//! `[u8; 2]` so that every weight block has alignment 1 and can be viewed in
//! place inside a memory-mapped file at any offset.

pub use crate::coded::CodedFormat;
use half::f16;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Elements per legacy (Q4_0, Q5_0, Q8_0) block.
pub const QK: usize = 32;

#[inline]
pub(crate) fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// 8-bit weights, one f16 scale per 32: `x = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; QK],
}

/// 4-bit weights, one f16 scale per 32: `x = d * (q - 8)`; element j < 16 is
/// the low nibble of `qs[j]`, element j + 16 its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// 5-bit weights: the low 4 bits as in Q4_0, the fifth bit of element j in
/// bit j of the little-endian u32 `qh`; `x = d * (q - 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 4-bit weights with a minimum: `x = d * q + m`, q in 0..16 stored as in
/// Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// 5-bit weights with a minimum: the bits as in Q5_0; `x = d * q + m`, q in
/// 0..32.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 4-bit indices into the fixed non-linear table [`KVALUES_IQ4NL`], one f16
/// scale per 32: `x = d * KVALUES_IQ4NL[q]`, nibbles stored as in Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockIQ4NL {
    pub d: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// A 16-entry table plus `offset`, as bytes, in each 16-byte lane of a
/// 64-byte vector: the operand of a `pshufb` lookup (`offset` 128 gives
/// the unsigned bytes `dpbusd` wants).
pub(crate) const fn lut_lanes(values: [i8; 16], offset: i32) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        t[i] = (values[i % 16] as i32 + offset) as u8;
        i += 1;
    }
    t
}

/// IQ4_NL's 16 levels (ref: ggml-common.h `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL's table in 256-element super-blocks: 8 sub-blocks of 32 with
/// 6-bit scales (low 4 bits in `scales_l`, high 2 in `scales_h`);
/// `x = d * (ls − 32) * KVALUES_IQ4NL[q]`, sub-block j's nibbles in
/// `qs[16j..16j + 16]` as in IQ4_NL.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockIQ4XS {
    pub d: [u8; 2],
    pub scales_h: [u8; 2],
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}

impl BlockIQ4XS {
    /// Sub-block j's scale, ls − 32 (−32..=31).
    #[inline]
    pub fn scale(&self, j: usize) -> i32 {
        let h = u16::from_le_bytes(self.scales_h);
        let ls =
            ((self.scales_l[j / 2] >> (4 * (j % 2))) & 0x0F) as u16 | ((h >> (2 * j)) & 3) << 4;
        ls as i32 - 32
    }
}

/// 4-bit K-quant: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12
/// bytes; `x = d * sc * q - dmin * m`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// 5-bit K-quant: Q4_K plus one high bit per element in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 3-bit K-quant: 16 sub-blocks of 16 with 6-bit scales packed in 12 bytes;
/// `x = d * (sc − 32) * q`, q in −4..=3 from 2 low bits in `qs` and a high
/// bit in `hmask` (see `quant::q3_k_unpack`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: [u8; 2],
}

/// 6-bit K-quant: 16 sub-blocks of 16 with signed 8-bit scales;
/// `x = d * sc * (q - 32)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: [u8; 2],
}

/// 8-bit activations for the 32-element formats (ggml's block_q8_0, with the
/// scale kept as f16 exactly as ggml rounds it).
pub type BlockQ8_0Act = BlockQ8_0;

/// 8-bit activations for K-quant weights: f32 scale and the sums of each 16
/// quants (`bsums`), which fold the weights' mins into one multiply.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

impl Default for BlockQ8_0 {
    fn default() -> Self {
        BlockQ8_0 {
            d: [0; 2],
            qs: [0; QK],
        }
    }
}

// Compile-time layout checks: sizes are ggml's, weight blocks have alignment 1.
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ4_1>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5_1>() == 1);
const _: () = assert!(std::mem::align_of::<BlockIQ4NL>() == 1);
const _: () = assert!(std::mem::align_of::<BlockIQ4XS>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ3K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ4K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ6K>() == 1);

/// A weight block type that may be viewed in place over raw bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, alignment 1, and valid for every bit
/// pattern (only integer arrays).
pub unsafe trait RawBlock: Copy {}
// SAFETY: all are repr(C) byte/i8 arrays, alignment 1 (checked above), any bits valid.
unsafe impl RawBlock for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ4_0 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ5_0 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ4_1 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ5_1 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockIQ4NL {}
// SAFETY: as above.
unsafe impl RawBlock for BlockIQ4XS {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ4K {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ3K {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ5K {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ6K {}

/// View `bytes` as a slice of blocks. Panics (a programming error, never an
/// input error: callers check sizes when the tensor is loaded) if the length
/// is not a whole number of blocks.
#[inline]
pub fn as_blocks<B: RawBlock>(bytes: &[u8]) -> &[B] {
    let size = std::mem::size_of::<B>();
    assert!(
        bytes.len().is_multiple_of(size),
        "byte length {} is not a multiple of block size {size}",
        bytes.len()
    );
    // SAFETY: B has alignment 1 and every bit pattern is valid (RawBlock
    // contract); the length is a whole number of blocks (asserted above), and
    // the returned slice borrows `bytes` so it cannot outlive it.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) }
}

/// The weight formats this engine computes with. A closed set, matched in one
/// place per operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q5_0,
    Q4_1,
    Q5_1,
    IQ4NL,
    IQ4XS,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// Q2_K and the lattice formats: 256-element blocks read through
    /// [`crate::coded`].
    Coded(CodedFormat),
}

/// The form activations take for a dot product with a weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Plain f32 (float weight formats).
    F32,
    /// ggml block_q8_0 (for Q8_0, Q4_0, Q5_0 weights; and for Q4_1, Q5_1,
    /// where ggml's block_q8_1 adds d·Σq, which the kernels compute).
    Q8_0,
    /// ggml block_q8_K (for K-quant weights).
    Q8K,
}

impl WeightFormat {
    /// Every weight format.
    pub const ALL: [WeightFormat; 24] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q5_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_1,
        WeightFormat::IQ4NL,
        WeightFormat::IQ4XS,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
        WeightFormat::Coded(CodedFormat::Q2K),
        WeightFormat::Coded(CodedFormat::IQ2XXS),
        WeightFormat::Coded(CodedFormat::IQ2XS),
        WeightFormat::Coded(CodedFormat::IQ2S),
        WeightFormat::Coded(CodedFormat::IQ3XXS),
        WeightFormat::Coded(CodedFormat::IQ3S),
        WeightFormat::Coded(CodedFormat::IQ1S),
        WeightFormat::Coded(CodedFormat::IQ1M),
        WeightFormat::Coded(CodedFormat::TQ1_0),
        WeightFormat::Coded(CodedFormat::TQ2_0),
    ];

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => 1,
            WeightFormat::Q8_0
            | WeightFormat::Q4_0
            | WeightFormat::Q5_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_1
            | WeightFormat::IQ4NL => QK,
            WeightFormat::Q3K
            | WeightFormat::Q4K
            | WeightFormat::Q5K
            | WeightFormat::Q6K
            | WeightFormat::IQ4XS
            | WeightFormat::Coded(_) => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::BF16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 | WeightFormat::IQ4NL => 18,
            WeightFormat::Q5_0 => 22,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q5_1 => 24,
            WeightFormat::Q3K => 110,
            WeightFormat::Q4K => 144,
            WeightFormat::Q5K => 176,
            WeightFormat::Q6K => 210,
            WeightFormat::IQ4XS => 136,
            WeightFormat::Coded(c) => c.block_bytes(),
        }
    }

    /// Bytes of one row of `n` elements (`n` must be a multiple of the block size).
    pub const fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }

    /// The activation format its dot product consumes (as in ggml's `vec_dot_type`).
    pub const fn act_format(self) -> ActFormat {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => ActFormat::F32,
            WeightFormat::Q8_0
            | WeightFormat::Q4_0
            | WeightFormat::Q5_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_1
            | WeightFormat::IQ4NL => ActFormat::Q8_0,
            WeightFormat::Q3K
            | WeightFormat::Q4K
            | WeightFormat::Q5K
            | WeightFormat::Q6K
            | WeightFormat::IQ4XS
            | WeightFormat::Coded(_) => ActFormat::Q8K,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "F32",
            WeightFormat::F16 => "F16",
            WeightFormat::BF16 => "BF16",
            WeightFormat::Q8_0 => "Q8_0",
            WeightFormat::Q4_0 => "Q4_0",
            WeightFormat::Q5_0 => "Q5_0",
            WeightFormat::Q4_1 => "Q4_1",
            WeightFormat::Q5_1 => "Q5_1",
            WeightFormat::IQ4NL => "IQ4_NL",
            WeightFormat::IQ4XS => "IQ4_XS",
            WeightFormat::Q3K => "Q3_K",
            WeightFormat::Q4K => "Q4_K",
            WeightFormat::Q5K => "Q5_K",
            WeightFormat::Q6K => "Q6_K",
            WeightFormat::Coded(c) => c.name(),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Unpack the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
/// ref: ggml-quants.c get_scale_min_k4.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
