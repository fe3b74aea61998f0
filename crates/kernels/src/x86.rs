//! x86-64 SIMD kernels (AVX2 + FMA), selected at run time.

use crate::simd::DotKernels;

pub fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Placeholder until the AVX2 kernels land: the scalar table under another name.
pub const AVX2: DotKernels = DotKernels {
    name: "avx2",
    ..crate::simd::SCALAR
};
