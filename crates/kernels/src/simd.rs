//! Run-time kernel selection. A [`DotKernels`] table holds one dot product per
//! quantized format; [`best`] picks the fastest the CPU supports, once.
//! `GEMMA3_FORCE_SCALAR=1` forces the scalar references.

use crate::dot;
use crate::formats::*;
use std::sync::OnceLock;

/// One dot product per format (weights row × activations row).
#[derive(Clone, Copy)]
pub struct DotKernels {
    pub name: &'static str,
    pub q8_0: fn(&[BlockQ8_0], &[BlockQ8_0]) -> f32,
    pub q4_0: fn(&[BlockQ4_0], &[BlockQ8_0]) -> f32,
    pub q5_0: fn(&[BlockQ5_0], &[BlockQ8_0]) -> f32,
    pub q4k: fn(&[BlockQ4K], &[BlockQ8K]) -> f32,
    pub q5k: fn(&[BlockQ5K], &[BlockQ8K]) -> f32,
    pub q6k: fn(&[BlockQ6K], &[BlockQ8K]) -> f32,
}

/// The scalar reference kernels (every fast path's twin).
pub const SCALAR: DotKernels = DotKernels {
    name: "scalar",
    q8_0: dot::dot_q8_0_ref,
    q4_0: dot::dot_q4_0_ref,
    q5_0: dot::dot_q5_0_ref,
    q4k: dot::dot_q4k_ref,
    q5k: dot::dot_q5k_ref,
    q6k: dot::dot_q6k_ref,
};

/// Every kernel table this machine can run, scalar first (for tests).
pub fn available() -> Vec<DotKernels> {
    #[allow(unused_mut)]
    let mut v = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if crate::x86::avx2_available() {
            v.push(crate::x86::AVX2);
        }
    }
    v
}

/// The fastest kernels for this CPU, chosen once.
pub fn best() -> &'static DotKernels {
    static BEST: OnceLock<DotKernels> = OnceLock::new();
    BEST.get_or_init(|| {
        let force_scalar = std::env::var("GEMMA3_FORCE_SCALAR")
            .map(|v| v != "0" && !v.is_empty())
            .unwrap_or(false);
        if force_scalar {
            return SCALAR;
        }
        *available().last().unwrap_or(&SCALAR)
    })
}
