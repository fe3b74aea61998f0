use thiserror::Error;

/// Why a model file cannot be used, naming the key or tensor at fault.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gemma3_gguf::GgufError),
    #[error("unsupported architecture '{0}': this engine runs gemma3 models only")]
    Architecture(String),
    #[error("metadata key '{key}': {why}")]
    BadConfig { key: String, why: String },
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("the file has {found} tensors where the metadata describes {used} (for example '{example}'): is gemma3.block_count right?")]
    ExtraTensors {
        found: usize,
        used: usize,
        example: String,
    },
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    /// A shape whose fault is said in words (no one expected shape to give).
    #[error("tensor '{name}' has shape {found:?}: {why}")]
    BadShape {
        name: String,
        found: Vec<u64>,
        why: String,
    },
    #[error("tensor '{name}' has type {ty}, which this engine cannot compute with (supported: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S, TQ2_0, TQ1_0)")]
    UnsupportedType { name: String, ty: String },
    #[error("tensor '{name}' holds {value} at index {index}: its values must be finite numbers (the file is damaged)")]
    NonFiniteWeight {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("LoRA adapter {path}: {why}")]
    Lora { path: String, why: String },
    #[error("control vector {path}: {why}")]
    Control { path: String, why: String },
    #[error("the control vectors' directions have {found} values, but this model's layers are {expected} wide (vectors made for another model?)")]
    ControlWidth { found: usize, expected: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("context overflow: position {pos} is beyond the context of {ctx} tokens")]
    ContextOverflow { pos: usize, ctx: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("invalid batch: {0}")]
    BadBatch(String),
    #[error("the KV cache for a context of {ctx} tokens needs {mib} MiB, which could not be allocated: use a smaller context (--ctx)")]
    KvCacheAlloc { ctx: usize, mib: usize },
}
