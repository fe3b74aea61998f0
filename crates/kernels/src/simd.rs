//! Run-time kernel selection. A [`DotKernels`] table holds, per quantized
//! format, a dot product of one weight row with 1 and with 4 activation rows;
//! [`best`] picks the fastest table the CPU supports, once.
//! `GEMMA3_FORCE_SCALAR=1` forces the scalar references.

use crate::dot;
use crate::formats::*;
use std::sync::OnceLock;

/// Weight row × 1 activation row, and weight row × 4 activation rows. A
/// token's result must not depend on which of the two computed it.
pub type DotPair<W, A> = (
    fn(&[W], [&[A]; 1]) -> [f32; 1],
    fn(&[W], [&[A]; 4]) -> [f32; 4],
);

/// One dot-product pair per format.
#[derive(Clone, Copy)]
pub struct DotKernels {
    pub name: &'static str,
    pub q8_0: DotPair<BlockQ8_0, BlockQ8_0>,
    pub q4_0: DotPair<BlockQ4_0, BlockQ8_0>,
    pub q5_0: DotPair<BlockQ5_0, BlockQ8_0>,
    pub q4k: DotPair<BlockQ4K, BlockQ8K>,
    pub q5k: DotPair<BlockQ5K, BlockQ8K>,
    pub q6k: DotPair<BlockQ6K, BlockQ8K>,
}

/// Scalar wrappers with the table's shapes around the references in [`dot`].
macro_rules! scalar_pair {
    ($one:ident, $four:ident, $f:path, $w:ty, $a:ty) => {
        fn $one(w: &[$w], a: [&[$a]; 1]) -> [f32; 1] {
            [$f(w, a[0])]
        }
        fn $four(w: &[$w], a: [&[$a]; 4]) -> [f32; 4] {
            a.map(|a| $f(w, a))
        }
    };
}
scalar_pair!(s_q8_0_1, s_q8_0_4, dot::dot_q8_0_ref, BlockQ8_0, BlockQ8_0);
scalar_pair!(s_q4_0_1, s_q4_0_4, dot::dot_q4_0_ref, BlockQ4_0, BlockQ8_0);
scalar_pair!(s_q5_0_1, s_q5_0_4, dot::dot_q5_0_ref, BlockQ5_0, BlockQ8_0);
scalar_pair!(s_q4k_1, s_q4k_4, dot::dot_q4k_ref, BlockQ4K, BlockQ8K);
scalar_pair!(s_q5k_1, s_q5k_4, dot::dot_q5k_ref, BlockQ5K, BlockQ8K);
scalar_pair!(s_q6k_1, s_q6k_4, dot::dot_q6k_ref, BlockQ6K, BlockQ8K);

/// The scalar reference kernels (every fast path's twin).
pub const SCALAR: DotKernels = DotKernels {
    name: "scalar",
    q8_0: (s_q8_0_1, s_q8_0_4),
    q4_0: (s_q4_0_1, s_q4_0_4),
    q5_0: (s_q5_0_1, s_q5_0_4),
    q4k: (s_q4k_1, s_q4k_4),
    q5k: (s_q5k_1, s_q5k_4),
    q6k: (s_q6k_1, s_q6k_4),
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
        if crate::x86::vnni_available() {
            v.push(crate::x86::VNNI);
        }
    }
    v
}

/// The fastest kernels for this CPU, chosen once.
pub fn best() -> &'static DotKernels {
    static BEST: OnceLock<DotKernels> = OnceLock::new();
    BEST.get_or_init(|| {
        let force_scalar = std::env::var("GEMMA3_FORCE_SCALAR")
            .map(|v| !v.is_empty() && v != "0")
            .unwrap_or(false);
        if force_scalar {
            return SCALAR;
        }
        *available().last().unwrap_or(&SCALAR)
    })
}
