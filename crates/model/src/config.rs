//! Hyper-parameters read from the GGUF metadata (`gemma3.*` keys), with named
//! defaults for what Gemma 3 GGUF files do not store.

use crate::ModelError;
use gemma3_gguf::{Array, GgufFile, Value};

/// Every 6th layer is global (layers 5, 11, 17 of 18); the others use a
/// sliding window. llama.cpp hard-codes this for gemma3 (LLAMA_SWA_TYPE_STANDARD,
/// pattern 6) since the GGUF does not carry it.
pub const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers (HF `rope_local_base_freq`);
/// `gemma3.rope.freq_base` in the file is the global layers' base.
pub const DEFAULT_ROPE_LOCAL_BASE: f32 = 10_000.0;

/// Most values a token's queries (heads × width), or its keys, may take.
pub const MAX_ATTENTION_WIDTH: usize = 65_536;

/// Largest attention score scale (1/√query_pre_attn_scalar) accepted:
/// Gemma's is 1/16, and one past this is a broken file's, not a model's.
pub const MAX_ATTN_SCALE: f32 = 16.0;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layers: usize,
    /// Residual stream width (640).
    pub d_model: usize,
    /// GeGLU hidden width (2048).
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Per-head query/key width (256).
    pub head_dim: usize,
    /// Per-head value width (256).
    pub value_dim: usize,
    pub vocab_size: usize,
    /// Training context (32768).
    pub ctx_len: usize,
    pub rms_eps: f32,
    pub rope_base_global: f32,
    pub rope_base_local: f32,
    /// Linear RoPE scaling factor on global layers (1 = none).
    pub rope_scale_global: f32,
    /// A local layer's query at p sees keys p-window+1..=p.
    pub sliding_window: usize,
    /// (n_layers,) true for a global (full-context) layer: every
    /// [`DEFAULT_SLIDING_WINDOW_PATTERN`]-th one, unless the file's
    /// `attention.sliding_window_pattern` gives another period or one bool
    /// per layer (true for a sliding-window layer, as gguf-py writes it).
    pub global_layers: Vec<bool>,
    /// Query scale (1/sqrt(head_dim) for the 270M model).
    pub attn_scale: f32,
}

impl Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f.get_str("general.architecture")?;
        if arch != "gemma3" {
            return Err(ModelError::Architecture(arch.to_string()));
        }
        let key = |k: &str| format!("gemma3.{k}");
        let u = |k: &str| -> Result<usize, ModelError> { Ok(f.get_u32(&key(k))? as usize) };
        // An optional key may be absent; present with another type, it is
        // an error (as llama.cpp's `get_key` makes it), not the default.
        let opt_u = |k: &str| -> Result<Option<usize>, ModelError> {
            match f.get(&key(k)) {
                None => Ok(None),
                Some(_) => Ok(Some(f.get_u32(&key(k))? as usize)),
            }
        };
        let opt_f = |k: &str| -> Result<Option<f32>, ModelError> {
            match f.get(&key(k)) {
                None => Ok(None),
                Some(_) => Ok(Some(f.get_f32(&key(k))?)),
            }
        };
        let n_layers = u("block_count")?;
        let n_heads = u("attention.head_count")?;
        let head_dim = opt_u("attention.key_length")?.unwrap_or(256);
        // llama.cpp reads the type as "linear" when the file has none, and a
        // factor of 0 as no scaling.
        let factor = opt_f("rope.scaling.factor")?;
        let scaling = match f.get(&key("rope.scaling.type")) {
            None => "linear",
            Some(_) => f.get_str(&key("rope.scaling.type"))?,
        };
        let rope_scale_global = match scaling {
            "linear" => factor.filter(|&x| x != 0.0).unwrap_or(1.0),
            "none" => 1.0,
            other => {
                return Err(ModelError::BadConfig {
                    key: key("rope.scaling.type"),
                    why: format!("RoPE scaling '{other}' is not supported"),
                })
            }
        };
        let pattern_key = key("attention.sliding_window_pattern");
        let global_layers = match f.get(&pattern_key) {
            Some(Value::Array(Array::Bool(swa))) => {
                if swa.len() != n_layers {
                    return Err(ModelError::BadConfig {
                        key: pattern_key,
                        why: format!("{} entries for {n_layers} layers", swa.len()),
                    });
                }
                swa.iter().map(|&sliding| !sliding).collect()
            }
            _ => {
                let period = opt_u("attention.sliding_window_pattern")?
                    .unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN);
                if period == 0 {
                    return Err(ModelError::BadConfig {
                        key: pattern_key,
                        why: "must be at least 1".into(),
                    });
                }
                // `validate` refuses more than 1024 layers; the bound only
                // keeps an absurd block_count from allocating before it.
                (0..n_layers.min(1 << 20))
                    .map(|l| (l + 1).is_multiple_of(period))
                    .collect()
            }
        };
        let query_pre_attn_scalar = opt_f("attention.query_pre_attn_scalar")?;
        let cfg = Config {
            n_layers,
            d_model: u("embedding_length")?,
            d_ff: u("feed_forward_length")?,
            n_heads,
            n_kv_heads: opt_u("attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            value_dim: opt_u("attention.value_length")?.unwrap_or(head_dim),
            vocab_size: 0, // set from the embedding tensor by the loader
            ctx_len: u("context_length")?,
            rms_eps: opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            rope_base_global: opt_f("rope.freq_base")?.unwrap_or(1_000_000.0),
            rope_base_local: opt_f("rope.local.freq_base")?.unwrap_or(DEFAULT_ROPE_LOCAL_BASE),
            rope_scale_global,
            sliding_window: opt_u("attention.sliding_window")?.unwrap_or(512),
            global_layers,
            attn_scale: 1.0 / query_pre_attn_scalar.unwrap_or(head_dim as f32).sqrt(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &str, why: String| {
            Err(ModelError::BadConfig {
                key: format!("gemma3.{key}"),
                why,
            })
        };
        let limits: [(&str, usize, usize); 8] = [
            ("block_count", self.n_layers, 1024),
            ("embedding_length", self.d_model, 65536),
            ("feed_forward_length", self.d_ff, 1 << 20),
            ("attention.head_count", self.n_heads, 1024),
            ("attention.head_count_kv", self.n_kv_heads, 1024),
            ("attention.key_length", self.head_dim, 4096),
            ("context_length", self.ctx_len, 1 << 24),
            ("attention.sliding_window", self.sliding_window, 1 << 24),
        ];
        for (k, v, max) in limits {
            if v == 0 || v > max {
                return bad(k, format!("value {v} is outside 1..={max}"));
            }
        }
        // Each head count and width is bounded alone; their products size a
        // token's activations (1024 × 4096 had taken 16.6 GB for a 200-token
        // prompt). Gemma 3 27B's widest is 32 × 128.
        for (k, heads, what) in [
            ("attention.head_count", self.n_heads, "query"),
            ("attention.head_count_kv", self.n_kv_heads, "key/value"),
        ] {
            if heads * self.head_dim > MAX_ATTENTION_WIDTH {
                return bad(
                    k,
                    format!(
                        "{heads} {what} heads of width {} make {} values a token, more than {MAX_ATTENTION_WIDTH}",
                        self.head_dim,
                        heads * self.head_dim
                    ),
                );
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "attention.head_count_kv",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) || self.value_dim != self.head_dim {
            return bad(
                "attention.key_length",
                format!(
                    "key {} / value {} widths: need equal, even widths",
                    self.head_dim, self.value_dim
                ),
            );
        }
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            return bad(
                "attention.query_pre_attn_scalar",
                "must be a positive number".into(),
            );
        }
        if !(self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(
                "attention.layer_norm_rms_epsilon",
                format!("{} is not in (0, 1)", self.rms_eps),
            );
        }
        for (k, v) in [
            ("rope.freq_base", self.rope_base_global),
            ("rope.local.freq_base", self.rope_base_local),
            ("rope.scaling.factor", self.rope_scale_global),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(k, format!("{v} is not a positive number"));
            }
        }
        // Positive but so small that the rotation's frequencies overflow (a
        // base of 1e-45), which had passed here and made every logit NaN.
        for l in 0..self.n_layers {
            if !self.rope_inv_freq(l).iter().all(|f| f.is_finite()) {
                let k = if self.is_global(l) {
                    "rope.freq_base"
                } else {
                    "rope.local.freq_base"
                };
                return bad(
                    k,
                    format!("layer {l}'s rotation frequencies are not finite with this base (and scaling)"),
                );
            }
        }
        if self.attn_scale > MAX_ATTN_SCALE {
            return bad(
                "attention.query_pre_attn_scalar",
                format!(
                    "gives scores a scale of {}, more than {MAX_ATTN_SCALE} (Gemma's is 1/16)",
                    self.attn_scale
                ),
            );
        }
        Ok(())
    }

    /// Whether `layer` is global (full-context); see `global_layers`.
    pub fn is_global(&self, layer: usize) -> bool {
        self.global_layers.get(layer).copied().unwrap_or(false)
    }

    /// Inverse RoPE frequencies for a layer: base^(-2i/d) (÷ scale on global layers).
    pub fn rope_inv_freq(&self, layer: usize) -> Vec<f32> {
        let (base, scale) = if self.is_global(layer) {
            (self.rope_base_global, self.rope_scale_global)
        } else {
            (self.rope_base_local, 1.0)
        };
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| base.powf(-((2 * i) as f32) / d as f32) / scale)
            .collect()
    }

    /// Query width (n_heads × head_dim).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value width (n_kv_heads × head_dim).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
