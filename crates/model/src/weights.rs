//! The weights of a Gemma 3 model, viewed in place in the memory-mapped GGUF
//! file (quantized matrices are never expanded), with every tensor's type and
//! shape checked against the config when the file is opened.

use crate::lora::{LoraDelta, LoraInfo};
use crate::{Config, ModelError};
use gemma3_gguf::{GgmlType, GgufFile, TensorInfo};
use gemma3_kernels::formats::CodedFormat;
use gemma3_kernels::{MatmulScratch, PackedMatrix, QMatrix, WeightFormat};
use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// A weight matrix inside the file: `rows` × `cols` in `format`.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    info: TensorInfo,
    /// The rows interleaved for the int8 kernels (every matrix whose format
    /// and shape have a packed form); None: computed from the file in place.
    pub packed: Option<Arc<PackedMatrix>>,
    /// LoRA updates added to this matrix's products (see [`crate::lora`]).
    pub lora: Vec<Arc<LoraDelta>>,
}

/// One transformer block. Matrices are stored as (out, in): a row per output.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// (n_heads·head_dim, d_model)
    pub wq: Tensor,
    /// (n_kv·head_dim, d_model)
    pub wk: Tensor,
    /// (n_kv·head_dim, d_model)
    pub wv: Tensor,
    /// (d_model, n_heads·head_dim)
    pub wo: Tensor,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub post_attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// (d_ff, d_model)
    pub w_gate: Tensor,
    /// (d_ff, d_model)
    pub w_up: Tensor,
    /// (d_model, d_ff)
    pub w_down: Tensor,
    pub post_ffn_norm: Vec<f32>,
    /// Inverse RoPE frequencies (head_dim/2), local or global base.
    pub rope_inv_freq: Vec<f32>,
    pub is_global: bool,
}

impl Layer {
    /// The 7 weight matrices, by index (q, k, v, o, gate, up, down).
    pub fn matrix(&self, i: usize) -> &Tensor {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ][i]
    }

    pub(crate) fn matrix_mut(&mut self, i: usize) -> &mut Tensor {
        match i {
            0 => &mut self.wq,
            1 => &mut self.wk,
            2 => &mut self.wv,
            3 => &mut self.wo,
            4 => &mut self.w_gate,
            5 => &mut self.w_up,
            _ => &mut self.w_down,
        }
    }
}

/// A loaded model: the mapped file, its config and its weights.
pub struct Model {
    pub config: Config,
    pub file: GgufFile,
    /// (vocab, d_model), also the output head when `output` is None (tied).
    pub embed: Tensor,
    pub output: Option<Tensor>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    /// The LoRA adapters applied, in order (see [`Model::load_lora`]).
    pub loras: Vec<LoraInfo>,
    /// The control vector added to each layer's output (index = layer; see
    /// [`Model::set_control`]), or empty.
    pub control: Vec<Option<Box<[f32]>>>,
}

pub(crate) fn weight_format(name: &str, ty: GgmlType) -> Result<WeightFormat, ModelError> {
    Ok(match ty {
        GgmlType::F32 => WeightFormat::F32,
        GgmlType::F16 => WeightFormat::F16,
        GgmlType::BF16 => WeightFormat::BF16,
        GgmlType::Q8_0 => WeightFormat::Q8_0,
        GgmlType::Q4_0 => WeightFormat::Q4_0,
        GgmlType::Q5_0 => WeightFormat::Q5_0,
        GgmlType::Q4_1 => WeightFormat::Q4_1,
        GgmlType::Q5_1 => WeightFormat::Q5_1,
        GgmlType::IQ4NL => WeightFormat::IQ4NL,
        GgmlType::IQ4XS => WeightFormat::IQ4XS,
        GgmlType::Q3K => WeightFormat::Q3K,
        GgmlType::Q4K => WeightFormat::Q4K,
        GgmlType::Q5K => WeightFormat::Q5K,
        GgmlType::Q6K => WeightFormat::Q6K,
        GgmlType::Q2K => WeightFormat::Coded(CodedFormat::Q2K),
        GgmlType::IQ2XXS => WeightFormat::Coded(CodedFormat::IQ2XXS),
        GgmlType::IQ2XS => WeightFormat::Coded(CodedFormat::IQ2XS),
        GgmlType::IQ2S => WeightFormat::Coded(CodedFormat::IQ2S),
        GgmlType::IQ3XXS => WeightFormat::Coded(CodedFormat::IQ3XXS),
        GgmlType::IQ3S => WeightFormat::Coded(CodedFormat::IQ3S),
        GgmlType::IQ1S => WeightFormat::Coded(CodedFormat::IQ1S),
        GgmlType::IQ1M => WeightFormat::Coded(CodedFormat::IQ1M),
        GgmlType::TQ1_0 => WeightFormat::Coded(CodedFormat::TQ1_0),
        GgmlType::TQ2_0 => WeightFormat::Coded(CodedFormat::TQ2_0),
        other => {
            return Err(ModelError::UnsupportedType {
                name: name.to_string(),
                ty: other.name().to_string(),
            })
        }
    })
}

impl Model {
    /// Open and validate a GGUF model file, with every matrix interleaved.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    /// [`Model::open`], running `side(&file)` on another thread while the
    /// output head is interleaved (about 0.1 s, most of the time before a
    /// first token; building the tokenizer takes about as long).
    pub fn open_alongside<T: Send>(
        path: impl AsRef<Path>,
        side: impl FnOnce(&GgufFile) -> T + Send,
    ) -> Result<(Self, T), ModelError> {
        let mut m = Self::with_packed_layers(GgufFile::open(path)?)?;
        let (head, t) = rayon::join(|| m.pack(m.head()), || side(&m.file));
        m.head_mut().packed = head.map(Arc::new);
        Ok((m, t))
    }

    /// Build the model over an opened GGUF file, with every matrix interleaved.
    pub fn from_gguf(file: GgufFile) -> Result<Self, ModelError> {
        let mut m = Self::with_packed_layers(file)?;
        m.head_mut().packed = m.pack(m.head()).map(Arc::new);
        Ok(m)
    }

    /// The model with its layer matrices interleaved but not yet its output
    /// head (the callers above finish it).
    fn with_packed_layers(file: GgufFile) -> Result<Self, ModelError> {
        let mut config = Config::from_gguf(&file)?;
        let c = config.clone();
        let embed_info = file
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab = match embed_info.dims.as_slice() {
            [d, v] if *d as usize == c.d_model && *v > 0 && *v <= (1 << 24) => *v as usize,
            dims => {
                // The vocabulary is this tensor's second dimension: where it
                // is in range, the width is what is wrong.
                let found = dims.to_vec();
                let name = "token_embd.weight".to_string();
                return Err(match dims {
                    [_, v] if *v > 0 && *v <= (1 << 24) => ModelError::Shape {
                        name,
                        found,
                        expected: vec![c.d_model as u64, *v],
                    },
                    [_, _] => ModelError::BadShape {
                        name,
                        found,
                        why: "its second dimension, the vocabulary, must be from 1 to 16777216"
                            .into(),
                    },
                    _ => ModelError::BadShape {
                        name,
                        found,
                        why: format!(
                            "it must have two dimensions, the width ({}) and the vocabulary",
                            c.d_model
                        ),
                    },
                });
            }
        };
        config.vocab_size = vocab;
        // The names of the tensors the model reads: any other in the file is
        // refused below.
        let read = RefCell::new(HashSet::new());
        let fetch = |name: &str| {
            read.borrow_mut().insert(name.to_string());
            file.tensor(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
        };
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<Tensor, ModelError> {
            let info = fetch(name)?;
            let expected = vec![cols as u64, rows as u64];
            if info.dims != expected {
                return Err(ModelError::Shape {
                    name: name.into(),
                    found: info.dims.clone(),
                    expected,
                });
            }
            let format = weight_format(name, info.ggml_type)?;
            // The reader already checked the extent; check our own view agrees.
            if QMatrix::new(format, rows, cols, file.tensor_data(info)).is_none() {
                return Err(ModelError::Shape {
                    name: name.into(),
                    found: info.dims.clone(),
                    expected: vec![cols as u64, rows as u64],
                });
            }
            Ok(Tensor {
                name: name.to_string(),
                format,
                rows,
                cols,
                info: info.clone(),
                packed: None,
                lora: Vec::new(),
            })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let info = fetch(name)?;
            if info.dims != [len as u64] {
                return Err(ModelError::Shape {
                    name: name.into(),
                    found: info.dims.clone(),
                    expected: vec![len as u64],
                });
            }
            let format = weight_format(name, info.ggml_type)?;
            if !len.is_multiple_of(format.block_size()) {
                return Err(ModelError::UnsupportedType {
                    name: name.into(),
                    ty: info.ggml_type.name().into(),
                });
            }
            let mut out = vec![0.0; len];
            gemma3_kernels::quant::dequantize_row(format, file.tensor_data(info), &mut out);
            // A NaN or infinite norm weight would not reach the logits as
            // one: the 8-bit activation quantizers read a NaN as 0, so the
            // model would answer, wrongly, instead of failing.
            if let Some(index) = out.iter().position(|x| !x.is_finite()) {
                return Err(ModelError::NonFiniteWeight {
                    name: name.into(),
                    index,
                    value: out[index],
                });
            }
            Ok(out)
        };
        let embed = matrix("token_embd.weight", c.d_model, vocab)?;
        let output = if file.tensor("output.weight").is_some() {
            Some(matrix("output.weight", c.d_model, vocab)?)
        } else {
            None
        };
        let final_norm = vector("output_norm.weight", c.d_model)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm"), c.d_model)?,
                wq: matrix(&n("attn_q"), c.d_model, c.q_dim())?,
                wk: matrix(&n("attn_k"), c.d_model, c.kv_dim())?,
                wv: matrix(&n("attn_v"), c.d_model, c.kv_dim())?,
                wo: matrix(&n("attn_output"), c.q_dim(), c.d_model)?,
                q_norm: vector(&n("attn_q_norm"), c.head_dim)?,
                k_norm: vector(&n("attn_k_norm"), c.head_dim)?,
                post_attn_norm: vector(&n("post_attention_norm"), c.d_model)?,
                ffn_norm: vector(&n("ffn_norm"), c.d_model)?,
                w_gate: matrix(&n("ffn_gate"), c.d_model, c.d_ff)?,
                w_up: matrix(&n("ffn_up"), c.d_model, c.d_ff)?,
                w_down: matrix(&n("ffn_down"), c.d_ff, c.d_model)?,
                post_ffn_norm: vector(&n("post_ffw_norm"), c.d_model)?,
                rope_inv_freq: c.rope_inv_freq(l),
                is_global: c.is_global(l),
            });
        }
        // Every tensor in the file is one the model reads (llama.cpp refuses
        // a file with others: "wrong number of tensors"): a file whose
        // block_count leaves out some of its layers is not run on the rest.
        let read = read.into_inner();
        if let Some(extra) = file.tensors().iter().find(|t| !read.contains(&t.name)) {
            return Err(ModelError::ExtraTensors {
                found: file.tensors().len(),
                used: read.len(),
                example: extra.name.clone(),
            });
        }
        let mut model = Model {
            config,
            file,
            embed,
            output,
            final_norm,
            layers,
            loras: Vec::new(),
            control: Vec::new(),
        };
        model.pack_layers();
        Ok(model)
    }

    /// Interleave every layer matrix that has a packed form (see
    /// `gemma3_kernels::packed`): about 70 MB for Gemma 3 270M, a copy in
    /// the same quantized form.
    ///
    /// All of them share one mapping, in the order a forward pass reads
    /// them (layer by layer, q k v o gate up down), so that a token's pass
    /// over the weights is one ascending stream: the hardware prefetchers
    /// then carry on from one matrix into the next instead of starting
    /// cold at each of the 126.
    fn pack_layers(&mut self) {
        let tensors: Vec<&Tensor> = self.layer_matrices().collect();
        let mats: Vec<QMatrix> = tensors.iter().map(|t| self.mat(t)).collect();
        let packed = PackedMatrix::pack_many(&mats, &|i, r| self.file.release(&tensors[i].info, r));
        let mut packed = packed.into_iter();
        for l in 0..self.layers.len() {
            for m in 0..7 {
                self.layers[l].matrix_mut(m).packed = packed.next().flatten().map(Arc::new);
            }
        }
    }

    /// Every layer's 7 weight matrices in the order a forward pass uses
    /// them: layer by layer, q k v o gate up down.
    fn layer_matrices(&self) -> impl Iterator<Item = &Tensor> {
        (self.layers.iter()).flat_map(|l| (0..7).map(move |m| l.matrix(m)))
    }

    /// `t` interleaved, or None if its format or shape has no packed form.
    /// The file's pages of it are released as they are packed, so the two
    /// copies are never resident together (a later read of the file, such
    /// as an embedding lookup, faults back in only what it reads).
    fn pack(&self, t: &Tensor) -> Option<PackedMatrix> {
        PackedMatrix::pack_releasing(&self.mat(t), &|r| self.file.release(&t.info, r))
    }

    fn head_mut(&mut self) -> &mut Tensor {
        match &mut self.output {
            Some(o) => o,
            None => &mut self.embed,
        }
    }

    /// One packed matrix from each mapping that holds packed weights (the
    /// layers' and the head's), for [`PackedMatrix::collapse_huge_pages`]:
    /// collapsing them, in a background thread if need be, makes a token's
    /// pass over the weights about 15% faster on one core.
    pub fn packed_mappings(&self) -> Vec<Arc<PackedMatrix>> {
        let all = self.layer_matrices().chain(std::iter::once(self.head()));
        let mut maps: Vec<Arc<PackedMatrix>> = Vec::new();
        for p in all.filter_map(|t| t.packed.as_ref()) {
            if !maps.iter().any(|m| m.shares_mapping(p)) {
                maps.push(p.clone());
            }
        }
        maps
    }

    /// [`Model::packed_mappings`] moved to 2 MB pages by a background thread
    /// at the lowest CPU priority, starting a second from now (see
    /// `gemma3_kernels::packed::collapse_in_background`).
    pub fn collapse_huge_pages_in_background(&self) {
        let delay = std::time::Duration::from_secs(1);
        gemma3_kernels::packed::collapse_in_background(self.packed_mappings(), delay);
    }

    /// `out = x · tᵀ` for n rows of x, through the packed copy when there is
    /// one, plus the updates of t's LoRA adapters: row r's scale of adapter
    /// a is `lora[r · loras.len() + a]` (`lora` empty: each adapter's own).
    pub fn matmul(
        &self,
        t: &Tensor,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        mm: &mut MatmulScratch,
        lora: &[f32],
    ) {
        self.matmul_base(t, x, n, out, mm);
        self.add_lora(t, x, n, out, mm, lora);
    }

    /// The updates of t's LoRA adapters, added to its product `out`.
    fn add_lora(
        &self,
        t: &Tensor,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        mm: &mut MatmulScratch,
        lora: &[f32],
    ) {
        for d in &t.lora {
            d.add_to(x, n, out, mm, lora, self.loras.len());
        }
    }

    /// [`Model::matmul`] without the adapters.
    fn matmul_base(
        &self,
        t: &Tensor,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        mm: &mut MatmulScratch,
    ) {
        match &t.packed {
            Some(p) => gemma3_kernels::packed::matmul_packed(
                &gemma3_kernels::simd::best().packed,
                p,
                x,
                n,
                out,
                mm,
            ),
            None => gemma3_kernels::matmul(&self.mat(t), x, n, out, mm),
        }
    }

    /// [`Model::matmul`] of each of `ts` with the same `x` into the
    /// matching `outs`; when all are packed, `x` is quantized once for all
    /// that consume the same activation format. Results are those of
    /// [`Model::matmul`].
    pub fn matmul_many<const N: usize>(
        &self,
        ts: [&Tensor; N],
        x: &[f32],
        n: usize,
        mut outs: [&mut [f32]; N],
        mm: &mut MatmulScratch,
        lora: &[f32],
    ) {
        let ps = ts.map(|t| t.packed.as_deref());
        if ps.iter().all(Option::is_some) {
            let ps = ps.map(Option::unwrap);
            gemma3_kernels::packed::matmul_packed_many(
                &gemma3_kernels::simd::best().packed,
                &ps,
                &mut outs,
                x,
                n,
                mm,
            );
            for (t, out) in ts.into_iter().zip(outs) {
                self.add_lora(t, x, n, out, mm, lora);
            }
        } else {
            for (t, out) in ts.into_iter().zip(outs) {
                self.matmul(t, x, n, out, mm, lora);
            }
        }
    }

    /// A matrix view of a tensor.
    pub fn mat(&self, t: &Tensor) -> QMatrix<'_> {
        QMatrix {
            format: t.format,
            rows: t.rows,
            cols: t.cols,
            data: self.file.tensor_data(&t.info),
        }
    }

    /// The output head (tied to the embedding unless the file has its own).
    pub fn head(&self) -> &Tensor {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Number of parameters (elements of all tensors).
    pub fn n_params(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.n_elements).sum()
    }

    /// Bytes of weights per tensor type: (type name, tensors, bytes).
    pub fn bytes_by_type(&self) -> Vec<(String, usize, u64)> {
        let mut v: Vec<(String, usize, u64)> = Vec::new();
        for t in self.file.tensors() {
            let name = t.ggml_type.name().to_string();
            match v.iter_mut().find(|e| e.0 == name) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += t.n_bytes;
                }
                None => v.push((name, 1, t.n_bytes)),
            }
        }
        v
    }

    /// Bytes of weights read to produce one token (every layer matrix + the
    /// head, in the form the kernels read: the interleaved copy where there
    /// is one, which for Q3_K and the coded formats is larger than the
    /// file's; one embedding row is negligible).
    pub fn bytes_per_token(&self) -> u64 {
        self.matrices().map(|t| self.read_bytes(t)).sum::<u64>() + self.lora_bytes()
    }

    /// Bytes the LoRA adapters' matrices take (all of them read per token).
    pub fn lora_bytes(&self) -> u64 {
        self.loras.iter().map(|l| l.bytes).sum()
    }

    /// Bytes the weights take once loaded: every tensor as stored, except
    /// that each interleaved matrix counts at its packed size (the file's
    /// pages of it are released as it is packed), plus the LoRA adapters.
    pub fn loaded_weight_bytes(&self) -> u64 {
        let stored = self.bytes_by_type().iter().map(|e| e.2).sum::<u64>() + self.lora_bytes();
        self.matrices().fold(stored, |b, t| {
            b - self.file.tensor_data(&t.info).len() as u64 + self.read_bytes(t)
        })
    }

    /// The head and every layer matrix, each once.
    fn matrices(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(self.head()).chain(
            self.layers
                .iter()
                .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]),
        )
    }

    /// Bytes of `t` in the form the kernels read.
    fn read_bytes(&self, t: &Tensor) -> u64 {
        match &t.packed {
            Some(p) => p.size_bytes() as u64,
            None => self.file.tensor_data(&t.info).len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each ggml type the engine computes with maps to the weight format of the same name
    /// and block geometry; the others (Q8_1, Q8_K: activation formats) are refused by name.
    #[test]
    fn ggml_types_map_to_the_same_weight_format() {
        let mut supported = 0;
        for t in GgmlType::ALL {
            match weight_format("w", t) {
                Ok(f) => {
                    assert_eq!(f.name(), t.name());
                    assert_eq!(f.block_size() as u64, t.block_size(), "{t}");
                    assert_eq!(f.block_bytes() as u64, t.type_size(), "{t}");
                    supported += 1;
                }
                Err(e) => {
                    assert!(matches!(t, GgmlType::Q8_1 | GgmlType::Q8K), "{t}: {e}");
                    assert!(e.to_string().contains(t.name()), "{e}");
                }
            }
        }
        assert_eq!(supported, WeightFormat::ALL.len());
    }
}
