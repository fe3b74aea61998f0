//! Kernels: ggml weight formats as types, their dequantization, quantized dot
//! products and the matrix multiply the model is built on.
//!
//! Layering: this crate knows nothing of GGUF files, Gemma or tokens. It sees
//! rows of bytes in a [`WeightFormat`] and rows of `f32` activations.
//!
//! Every kernel has a plain scalar reference (`*_ref`, in [`dot`] and
//! [`quant`]); SIMD versions are chosen at run time in [`simd`] and tested
//! against the reference. `GEMMA3_FORCE_SCALAR=1` forces the scalar paths.

pub mod bf16mm;
pub mod coded;
pub mod dot;
pub mod formats;
mod iq_grids;
pub mod matmul;
pub mod ops;
pub mod packed;
#[cfg(target_arch = "x86_64")]
pub mod packed_amx;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
pub mod pool;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_x86;
pub mod simd;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use formats::{ActFormat, WeightFormat};
pub use matmul::{matmul, MatmulScratch, QMatrix};
pub use packed::PackedMatrix;
