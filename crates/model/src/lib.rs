//! Gemma 3: configuration from GGUF metadata, weights (memory-mapped, in their
//! quantized form), the KV cache and the one forward pass.
//!
//! The model speaks token ids; it knows nothing of text, templates or HTTP.

pub mod config;
pub mod control;
pub mod error;
pub mod forward;
pub mod kv_cache;
pub mod lora;
pub mod train;
pub mod weights;

pub use config::Config;
pub use control::{ControlInfo, ControlVector};
pub use error::ModelError;
pub use forward::{Batch, ForwardState, Output};
pub use kv_cache::KvCache;
pub use lora::{LoraFile, LoraInfo, LoraPair};
pub use weights::{Model, Tensor};
