//! The ggml tensor formats a GGUF file may name, with their block geometry.
//!
//! ref: ggml/src/ggml.c `type_traits` (blck_size, type_size) and ggml.h `enum ggml_type`.

use std::fmt;

/// A ggml tensor storage format. The discriminant is the id stored in GGUF tensor infos.
///
/// Quantized formats store `block_size()` consecutive elements of a row in `type_size()` bytes;
/// a row's length must therefore be a multiple of `block_size()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// 32 weights: f16 scale + 32 × 4-bit.
    Q4_0 = 2,
    /// 32 weights: f16 scale, f16 min + 32 × 4-bit.
    Q4_1 = 3,
    /// 32 weights: f16 scale, 32 high bits, 32 × 4-bit.
    Q5_0 = 6,
    /// 32 weights: f16 scale, f16 min, 32 high bits, 32 × 4-bit.
    Q5_1 = 7,
    /// 32 weights: f16 scale + 32 × i8.
    Q8_0 = 8,
    /// 32 weights: f32 scale, f32 sum + 32 × i8.
    Q8_1 = 9,
    /// k-quant, 256-weight super-blocks, 2-bit.
    Q2K = 10,
    /// k-quant, 256-weight super-blocks, 3-bit.
    Q3K = 11,
    /// k-quant, 256-weight super-blocks, 4-bit.
    Q4K = 12,
    /// k-quant, 256-weight super-blocks, 5-bit.
    Q5K = 13,
    /// k-quant, 256-weight super-blocks, 6-bit.
    Q6K = 14,
    /// k-quant, 256-weight super-blocks, 8-bit (used for activations).
    Q8K = 15,
    /// 256-weight super-blocks of 8-weight points on a 256-entry lattice, 2.06 bits per weight.
    IQ2XXS = 16,
    /// As IQ2_XXS with a 512-entry lattice and 4-bit scales per 16, 2.31 bits per weight.
    IQ2XS = 17,
    /// 256-weight super-blocks of 4-weight points on a 256-entry lattice, 3.06 bits per weight.
    IQ3XXS = 18,
    /// 256-weight super-blocks, ternary 8-weight lattice points and a shift, 1.56 bits per weight.
    IQ1S = 19,
    /// 32 weights: f16 scale + 32 × 4-bit indices into a fixed non-linear table.
    IQ4NL = 20,
    /// As IQ3_XXS with a 512-entry lattice and explicit signs, 3.44 bits per weight.
    IQ3S = 21,
    /// As IQ2_XS with a 1024-entry lattice and explicit signs, 2.56 bits per weight.
    IQ2S = 22,
    /// k-quant-like, 256-weight super-blocks: IQ4_NL's table with 6-bit sub-block scales.
    IQ4XS = 23,
    /// As IQ1_S with scales per 16 and a shift per 8 weights, 1.75 bits per weight.
    IQ1M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary: 256-weight super-blocks of base-3 digits (−1, 0, 1) and one f16 scale, 1.69 bits.
    TQ1_0 = 34,
    /// Ternary: 256-weight super-blocks of 2-bit values q − 1 and one f16 scale, 2.06 bits.
    TQ2_0 = 35,
}

impl GgmlType {
    /// Every type this crate knows, in id order.
    pub const ALL: [GgmlType; 26] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::IQ2XXS,
        GgmlType::IQ2XS,
        GgmlType::IQ3XXS,
        GgmlType::IQ1S,
        GgmlType::IQ4NL,
        GgmlType::IQ3S,
        GgmlType::IQ2S,
        GgmlType::IQ4XS,
        GgmlType::IQ1M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
    ];

    /// The type with ggml id `id`, or `None` if this crate does not know it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml id stored in GGUF files.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The ggml name, e.g. `"Q4_K"`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::IQ2XXS => "IQ2_XXS",
            GgmlType::IQ2XS => "IQ2_XS",
            GgmlType::IQ3XXS => "IQ3_XXS",
            GgmlType::IQ1S => "IQ1_S",
            GgmlType::IQ4NL => "IQ4_NL",
            GgmlType::IQ3S => "IQ3_S",
            GgmlType::IQ2S => "IQ2_S",
            GgmlType::IQ4XS => "IQ4_XS",
            GgmlType::IQ1M => "IQ1_M",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::IQ4NL => 32,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K
            | GgmlType::IQ2XXS
            | GgmlType::IQ2XS
            | GgmlType::IQ3XXS
            | GgmlType::IQ1S
            | GgmlType::IQ3S
            | GgmlType::IQ2S
            | GgmlType::IQ4XS
            | GgmlType::IQ1M
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 | GgmlType::IQ4NL => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
            GgmlType::IQ2XXS => 66,
            GgmlType::IQ2XS => 74,
            GgmlType::IQ3XXS => 98,
            GgmlType::IQ1S => 50,
            GgmlType::IQ3S => 110,
            GgmlType::IQ2S => 82,
            GgmlType::IQ4XS => 136,
            GgmlType::IQ1M => 56,
            GgmlType::TQ1_0 => 54,
            GgmlType::TQ2_0 => 66,
        }
    }

    /// Bytes taken by `n_elements` elements, or `None` if `n_elements` is not a whole number of
    /// blocks or the size overflows `u64`.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size();
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_none() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        // 24-28: integer and f64 types; 31-33: removed; 39: MXFP4.
        for id in [4, 5, 24, 28, 31, 39, 99, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
    }

    #[test]
    fn geometry_matches_ggml() {
        // (id, name, block_size, type_size) from ggml's type_traits table.
        let expected = [
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (3, "Q4_1", 32, 20),
            (6, "Q5_0", 32, 22),
            (7, "Q5_1", 32, 24),
            (8, "Q8_0", 32, 34),
            (9, "Q8_1", 32, 36),
            (10, "Q2_K", 256, 84),
            (11, "Q3_K", 256, 110),
            (12, "Q4_K", 256, 144),
            (13, "Q5_K", 256, 176),
            (14, "Q6_K", 256, 210),
            (15, "Q8_K", 256, 292),
            (16, "IQ2_XXS", 256, 66),
            (17, "IQ2_XS", 256, 74),
            (18, "IQ3_XXS", 256, 98),
            (19, "IQ1_S", 256, 50),
            (20, "IQ4_NL", 32, 18),
            (21, "IQ3_S", 256, 110),
            (22, "IQ2_S", 256, 82),
            (23, "IQ4_XS", 256, 136),
            (29, "IQ1_M", 256, 56),
            (30, "BF16", 1, 2),
            (34, "TQ1_0", 256, 54),
            (35, "TQ2_0", 256, 66),
        ];
        for (id, name, bs, ts) in expected {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!(t.name(), name);
            assert_eq!(t.to_string(), name);
            assert_eq!(t.block_size(), bs, "{name}");
            assert_eq!(t.type_size(), ts, "{name}");
        }
    }

    #[test]
    fn bytes_for_checks_blocks_and_overflow() {
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert_eq!(GgmlType::F32.bytes_for(0), Some(0));
    }
}
