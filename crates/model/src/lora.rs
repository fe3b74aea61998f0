//! LoRA adapters in llama.cpp's GGUF form (what `convert_lora_to_gguf.py`
//! makes of a PEFT adapter, and what `llama-cli --lora` reads): for each
//! adapted matrix W a pair `<W's name>.lora_a` (ggml shape [n_in, rank]) and
//! `.lora_b` ([rank, n_out]), and the file's `adapter.lora.alpha`.
//!
//! Applied as llama.cpp applies them (`build_lora_mm`): the matrix's product
//! first, then for each adapter `scale · B·(A·x)` added to it, with
//! `scale = user_scale · alpha / rank` (the user's scale alone when the file
//! has no alpha). The adapters stay beside the weights, never merged into
//! them, so the base model's bits are untouched and an adapter's scale of 0
//! is the base model. The scale may differ from token to token (see
//! `Batch::lora`): one batch can run sequences under different adapters. A and B keep their file's float type (F32 for a
//! quantized one; an adapter is a few MB) and go through the float kernels;
//! the activations they multiply are first rounded as ggml rounds them for
//! the file's type (f16 for F16, Q8_0 blocks for Q8_0, ...), so the products
//! are llama.cpp's up to the order of additions.

use crate::{Model, ModelError};
use gemma3_gguf::{GgufError, GgufFile, TensorInfo};
use gemma3_kernels::packed::{matmul_packed, FLOAT_BLOCK};
use gemma3_kernels::{quant, vectorized, MatmulScratch, PackedMatrix, QMatrix, WeightFormat};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The layer matrices an adapter may change, by their GGUF names, in the
/// order of `Layer::matrix`.
pub const MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// One adapted matrix's low-rank update, `out += scale · B·(A·x)`.
///
/// A and B are kept in the interleaved form of the float kernels
/// ([`PackedMatrix`]), in their file's type where that is a float type (the
/// values as they are) and in F32 otherwise. Their shapes are padded with
/// zeros, which add nothing to a sum: columns to a multiple of 32 (the
/// kernels' block), rows to one of 16 (their row group).
#[derive(Debug)]
pub struct LoraDelta {
    rank: usize,
    n_in: usize,
    n_out: usize,
    /// A, rank × n_in (padded).
    a: PackedMatrix,
    /// B, n_out × rank (padded).
    b: PackedMatrix,
    /// The file's types of A and B: how the activations they multiply are
    /// rounded first (see [`quant::round_activations`]).
    a_format: WeightFormat,
    b_format: WeightFormat,
    /// Which of the model's adapters this is (its index in `Model::loras`),
    /// and the scale tokens run it at unless their batch says otherwise.
    adapter: usize,
    default_scale: f32,
    /// `adapter.lora.alpha` (0: none).
    alpha: f32,
}

/// Buffers of [`LoraDelta::add_to`], per thread (the forward pass's).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    hb: Vec<f32>,
    d: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
}

/// `f` with this thread's buffers, or fresh ones where they are in use: a
/// thread waiting inside a kernel's parallel loop may run another task of
/// the pool, such as another part of the same prompt.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|c| match c.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

impl LoraDelta {
    /// `out += scale · B·(A·x)` for n rows of x (n × n_in) and out (n ×
    /// n_out), where row t's user scale is `scales[t · stride + adapter]`
    /// (`scales` empty: the adapter's default for every row) and `scale` is
    /// that times alpha / rank as llama.cpp's `get_scale` computes it. Rows
    /// at scale 0 are left as they are and cost nothing.
    pub fn add_to(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        mm: &mut MatmulScratch,
        scales: &[f32],
        stride: usize,
    ) {
        let user = |t: usize| match scales {
            [] => self.default_scale,
            s => s[t * stride + self.adapter],
        };
        let scale: Vec<f32> = (0..n)
            .map(|t| get_scale(user(t), self.alpha, self.rank))
            .collect();
        let live: Vec<usize> = (0..n).filter(|&t| scale[t] != 0.0).collect();
        if live.len() == n {
            return self.run(x, &scale, out, mm);
        }
        if live.is_empty() {
            return;
        }
        // Only the rows that run the adapter (a batch mixing requests under
        // different adapters): gathered, updated, put back. Each row's
        // result does not depend on the others in its batch.
        let (n_in, n_out) = (self.n_in, self.n_out);
        let xg: Vec<f32> = (live.iter())
            .flat_map(|&t| &x[t * n_in..(t + 1) * n_in])
            .copied()
            .collect();
        let mut og: Vec<f32> = (live.iter())
            .flat_map(|&t| &out[t * n_out..(t + 1) * n_out])
            .copied()
            .collect();
        let sg: Vec<f32> = live.iter().map(|&t| scale[t]).collect();
        self.run(&xg, &sg, &mut og, mm);
        for (&t, row) in live.iter().zip(og.chunks_exact(n_out)) {
            out[t * n_out..(t + 1) * n_out].copy_from_slice(row);
        }
    }

    /// [`LoraDelta::add_to`] for rows that all run the adapter, at `scale`.
    fn run(&self, x: &[f32], scale: &[f32], out: &mut [f32], mm: &mut MatmulScratch) {
        let n = scale.len();
        // A has few rows (the rank), which the kernels would give one
        // thread: many tokens are split between the threads instead (per
        // token, so the split cannot change a value).
        let threads = gemma3_kernels::pool::threads();
        if threads > 1 && n >= 16 * threads {
            let per = n.div_ceil(threads);
            let items = (x.chunks(per * self.n_in))
                .zip(out.chunks_mut(per * self.n_out))
                .zip(scale.chunks(per));
            gemma3_kernels::pool::for_each_item(items, 1, &|((x, out), scale)| {
                self.add_rows(x, scale, out, &mut MatmulScratch::default())
            });
        } else {
            self.add_rows(x, scale, out, mm);
        }
    }

    fn add_rows(&self, x: &[f32], scale: &[f32], out: &mut [f32], mm: &mut MatmulScratch) {
        let n = scale.len();
        let k = &gemma3_kernels::simd::best().packed;
        let (n_in, n_out) = (self.n_in, self.n_out);
        let (in_pad, out_pad) = (self.a.cols, self.b.rows);
        let (ra, rb, r) = (self.a.rows, self.b.cols, self.rank);
        with_scratch(|s| {
            let x = if rounds(self.a_format) || in_pad != n_in {
                s.x.clear();
                s.x.resize(n * in_pad, 0.0);
                for (dst, src) in s.x.chunks_exact_mut(in_pad).zip(x.chunks_exact(n_in)) {
                    dst[..n_in].copy_from_slice(src);
                    quant::round_activations(self.a_format, &mut dst[..n_in]);
                }
                &s.x[..]
            } else {
                x
            };
            s.h.resize(n * ra, 0.0);
            matmul_packed(k, &self.a, x, n, &mut s.h, mm);
            // A's rows are padded to 16, B's columns to 32.
            let h = if ra == rb {
                &mut s.h
            } else {
                s.hb.clear();
                s.hb.resize(n * rb, 0.0);
                for (dst, src) in s.hb.chunks_exact_mut(rb).zip(s.h.chunks_exact(ra)) {
                    dst[..r].copy_from_slice(&src[..r]);
                }
                &mut s.hb
            };
            if rounds(self.b_format) {
                for row in h.chunks_exact_mut(rb) {
                    quant::round_activations(self.b_format, &mut row[..r]);
                }
            }
            s.d.resize(n * out_pad, 0.0);
            matmul_packed(k, &self.b, h, n, &mut s.d, mm);
            // ggml_scale, then ggml_add (not at all at scale 0).
            let d = &s.d[..];
            vectorized!(fn(out: &mut [f32], d: &[f32], scale: &[f32], n_out: usize, out_pad: usize) {
                let rows = out.chunks_exact_mut(n_out).zip(d.chunks_exact(out_pad));
                for ((out, d), &scale) in rows.zip(scale).filter(|(_, &s)| s != 0.0) {
                    for (o, &v) in out.iter_mut().zip(d) {
                        *o += scale * v;
                    }
                }
            })
        });
    }
}

/// Whether activations are rounded before a product with `format`.
fn rounds(format: WeightFormat) -> bool {
    format != WeightFormat::F32
}

/// `values` (rows of `cols`, row-major), padded with zeros to `rows` ×
/// `cols_pad` and interleaved for the float kernels, in `format` if it is a
/// float type and F32 otherwise.
fn pack_float(
    format: WeightFormat,
    values: &[f32],
    cols: usize,
    rows: usize,
    cols_pad: usize,
) -> PackedMatrix {
    let stored = match format {
        WeightFormat::F16 | WeightFormat::BF16 => format,
        _ => WeightFormat::F32,
    };
    let mut padded = vec![0.0f32; rows * cols_pad];
    for (dst, src) in padded
        .chunks_exact_mut(cols_pad)
        .zip(values.chunks_exact(cols))
    {
        dst[..cols].copy_from_slice(src);
    }
    let bytes = quant::encode_float_weights(stored, &padded).expect("a float format");
    let q = QMatrix::new(stored, rows, cols_pad, &bytes).expect("the shape of its values");
    PackedMatrix::pack(&q).expect("rows a multiple of 16 and columns of 32")
}

/// An adapter as loaded: what `gemma3 info` and the server report.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    pub path: PathBuf,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    /// The user's scale (`--lora-scaled`; 1 for `--lora`): tokens run the
    /// adapter at this unless their batch gives another.
    pub scale: f32,
    /// `adapter.lora.alpha` (0: none, the scale used as it is).
    pub alpha: f32,
    /// Matrices adapted, and the smallest and largest rank among them.
    pub matrices: usize,
    pub ranks: (usize, usize),
    /// Tensors llama.cpp skips as well (norm weights), by name.
    pub skipped: Vec<String>,
    /// Bytes its matrices take in memory.
    pub bytes: u64,
}

/// An adapter file read and checked against a model (see
/// [`Model::read_lora`]): its pairs of matrices as f32.
pub struct LoraFile {
    pub name: Option<String>,
    /// `adapter.lora.alpha` (0: none).
    pub alpha: f32,
    pub pairs: Vec<LoraPair>,
    /// Tensors llama.cpp leaves out (norm weights), by name.
    pub skipped: Vec<String>,
}

/// One adapted matrix of a [`LoraFile`].
pub struct LoraPair {
    /// The layer, and the matrix by its index in q k v o gate up down.
    pub layer: usize,
    pub matrix: usize,
    pub rank: usize,
    /// A (rank × n_in) and B (n_out × rank), row-major, and their file types.
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub a_format: WeightFormat,
    pub b_format: WeightFormat,
}

impl LoraPair {
    /// llama.cpp's `get_scale`: the user's scale times alpha / rank (alone
    /// without an alpha), in its order of operations.
    pub fn scale(&self, user: f32, alpha: f32) -> f32 {
        get_scale(user, alpha, self.rank)
    }
}

/// llama.cpp's `get_scale`: `user` times alpha / rank, or `user` alone
/// where the adapter has no alpha (0), in its order of operations.
fn get_scale(user: f32, alpha: f32, rank: usize) -> f32 {
    if alpha != 0.0 {
        user * alpha / rank as f32
    } else {
        user
    }
}

impl Model {
    /// Apply the LoRA adapter at `path` with the user's `scale`, as
    /// `llama-cli --lora-scaled FILE SCALE` does; several adapters add up.
    /// The file is checked whole first: an adapter that fails leaves the
    /// model as it was. At scale 0 it changes nothing until a batch asks for
    /// it (`Batch::lora`), as `llama-server --lora-init-without-apply`.
    pub fn load_lora(&mut self, path: &Path, scale: f32) -> Result<&LoraInfo, ModelError> {
        if !scale.is_finite() {
            return Err(ModelError::Lora {
                path: path.display().to_string(),
                why: format!("its scale {scale} is not a finite number"),
            });
        }
        let f = self.read_lora(path)?;
        let mut deltas = Vec::with_capacity(f.pairs.len());
        for p in f.pairs {
            let t = self.layers[p.layer].matrix(p.matrix);
            let (n_in, n_out, rank) = (t.cols, t.rows, p.rank);
            // Rows padded to the kernels' row group, columns to their block.
            let (rows, cols) = (
                |r: usize| r.next_multiple_of(16),
                |c: usize| c.next_multiple_of(FLOAT_BLOCK),
            );
            let delta = LoraDelta {
                rank,
                n_in,
                n_out,
                a: pack_float(p.a_format, &p.a, n_in, rows(rank), cols(n_in)),
                b: pack_float(p.b_format, &p.b, rank, rows(n_out), cols(rank)),
                a_format: p.a_format,
                b_format: p.b_format,
                adapter: self.loras.len(),
                default_scale: scale,
                alpha: f.alpha,
            };
            deltas.push((p.layer, p.matrix, delta));
        }
        let ranks = deltas.iter().map(|(_, _, d)| d.rank);
        let bytes = (deltas.iter())
            .map(|(_, _, d)| (d.a.size_bytes() + d.b.size_bytes()) as u64)
            .sum();
        let info = LoraInfo {
            path: path.to_path_buf(),
            name: f.name,
            scale,
            alpha: f.alpha,
            matrices: deltas.len(),
            ranks: (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0)),
            skipped: f.skipped,
            bytes,
        };
        // (At scale 0 it is loaded but not run, unless a batch asks for it.)
        for (l, m, delta) in deltas {
            self.layers[l].matrix_mut(m).lora.push(Arc::new(delta));
        }
        self.loras.push(info);
        Ok(self.loras.last().expect("just pushed"))
    }

    /// The LoRA adapter at `path`, read whole and checked against this
    /// model (the errors of [`Model::load_lora`]), not applied.
    pub fn read_lora(&self, path: &Path) -> Result<LoraFile, ModelError> {
        let err = |why: String| ModelError::Lora {
            path: path.display().to_string(),
            why,
        };
        // (The file is named once, by `err`.)
        let file = GgufFile::open(path).map_err(|e| err(open_reason(e)))?;
        // A string key: None where it is missing, an error where it is not a string.
        let text = |key: &str| match file.get(key) {
            None => Ok(None),
            Some(_) => file.get_str(key).map(Some).map_err(|e| err(e.to_string())),
        };
        match text("general.type")? {
            Some("adapter") => {}
            Some(t) => {
                return Err(err(format!(
                    "not a LoRA adapter: its general.type is '{t}', not 'adapter' (a model is given with --model)"
                )))
            }
            // (A control vector has no general.type either.)
            None if file.tensors().iter().any(|t| t.name.starts_with("direction.")) => {
                return Err(err(
                    "not a LoRA adapter but a control vector (its tensors are direction.N): give it with --control-vector"
                        .into(),
                ))
            }
            None => {
                return Err(err(
                    "not a LoRA adapter: it has no general.type (an adapter's is 'adapter', as llama.cpp's convert_lora_to_gguf.py writes it; a model is given with --model)"
                        .into(),
                ))
            }
        }
        match text("general.architecture")? {
            Some("gemma3") => {}
            Some(arch) => {
                return Err(err(format!(
                    "it is an adapter for '{arch}', not for this gemma3 model"
                )))
            }
            None => return Err(err("it has no general.architecture".into())),
        }
        match text("adapter.type")? {
            Some("lora") => {}
            Some(kind) => {
                return Err(err(format!(
                    "its adapter.type is '{kind}'; only 'lora' adapters are supported"
                )))
            }
            None => return Err(err("it has no adapter.type (expected 'lora')".into())),
        }
        if file.get("adapter.alora.invocation_tokens").is_some() {
            return Err(err(
                "it is an activated LoRA (adapter.alora.invocation_tokens), which is not supported"
                    .into(),
            ));
        }
        let alpha = match file.get("adapter.lora.alpha") {
            None => 0.0,
            Some(_) => file
                .get_f32("adapter.lora.alpha")
                .map_err(|e| err(e.to_string()))?,
        };
        if !alpha.is_finite() {
            return Err(err(format!("its adapter.lora.alpha {alpha} is not finite")));
        }

        // Pair each matrix's A and B (by the base tensor's name).
        let mut pairs: BTreeMap<&str, [Option<&TensorInfo>; 2]> = BTreeMap::new();
        let mut skipped = Vec::new();
        for t in file.tensors() {
            if let Some(base) = t.name.strip_suffix(".lora_a") {
                pairs.entry(base).or_default()[0] = Some(t);
            } else if let Some(base) = t.name.strip_suffix(".lora_b") {
                pairs.entry(base).or_default()[1] = Some(t);
            } else if t.name.ends_with("_norm.weight") {
                // As llama.cpp: adapted norm weights are left out.
                skipped.push(t.name.clone());
            } else {
                return Err(err(format!(
                    "tensor '{}' is neither a .lora_a nor a .lora_b tensor",
                    t.name
                )));
            }
        }
        if pairs.is_empty() {
            return Err(err("it holds no .lora_a / .lora_b tensors".into()));
        }
        let mut deltas = Vec::with_capacity(pairs.len());
        for (base, [a, b]) in &pairs {
            let (Some(a), Some(b)) = (a, b) else {
                let missing = if a.is_none() { "lora_a" } else { "lora_b" };
                return Err(err(format!("'{base}' has no {missing} tensor")));
            };
            let (l, m) = self.adapted_matrix(base).map_err(err)?;
            let t = self.layers[l].matrix(m);
            let (n_in, n_out) = (t.cols, t.rows);
            let rank = match (a.dims.as_slice(), b.dims.as_slice()) {
                ([ai, ar], [br, bo])
                    if *ai == n_in as u64 && *bo == n_out as u64 && ar == br && *ar > 0 =>
                {
                    *ar as usize
                }
                (ad, bd) => {
                    return Err(err(format!(
                        "'{base}' is {n_out} × {n_in} in the model, but its lora_a has shape {ad:?} and lora_b {bd:?} (expected [{n_in}, rank] and [rank, {n_out}]: an adapter for another model?)"
                    )))
                }
            };
            if rank > n_in.min(n_out) {
                return Err(err(format!(
                    "'{base}' has rank {rank}, above its smaller side ({}): such an update is no low-rank one",
                    n_in.min(n_out)
                )));
            }
            let a_m = self.lora_matrix(&file, a, rank, n_in).map_err(&err)?;
            let b_m = self.lora_matrix(&file, b, n_out, rank).map_err(&err)?;
            deltas.push(LoraPair {
                layer: l,
                matrix: m,
                rank,
                a: a_m,
                b: b_m,
                a_format: crate::weights::weight_format(&a.name, a.ggml_type)?,
                b_format: crate::weights::weight_format(&b.name, b.ggml_type)?,
            });
        }
        Ok(LoraFile {
            name: file.get_str("general.name").ok().map(str::to_string),
            alpha,
            pairs: deltas,
            skipped,
        })
    }

    /// Layer and matrix index of `blk.N.<matrix>.weight`, or why an adapter
    /// cannot change `base`.
    fn adapted_matrix(&self, base: &str) -> Result<(usize, usize), String> {
        if base == "token_embd.weight" || base == "output.weight" {
            return Err(format!(
                "it adapts '{base}'; adapters of the embedding or output head are not supported"
            ));
        }
        // (The layer number exactly as llama.cpp names it: no sign, no leading zero.)
        let parsed = base
            .strip_prefix("blk.")
            .and_then(|s| s.strip_suffix(".weight"))
            .and_then(|s| s.split_once('.'))
            .and_then(|(l, name)| Some((l.parse::<usize>().ok()?, l, name)))
            .filter(|(l, text, _)| l.to_string() == *text)
            .map(|(l, _, name)| (l, name));
        match parsed {
            Some((l, name)) if l < self.layers.len() => {
                match MATRICES.iter().position(|&m| m == name) {
                    Some(m) => Ok((l, m)),
                    None => Err(format!("it adapts '{base}', which this model does not have as a matrix (an adapter for another model?)")),
                }
            }
            _ => Err(format!(
                "it adapts '{base}', which does not exist in this model (an adapter for another model?)"
            )),
        }
    }

    /// An adapter tensor as f32 (rows × cols), checked.
    fn lora_matrix(
        &self,
        file: &GgufFile,
        t: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, String> {
        let format =
            crate::weights::weight_format(&t.name, t.ggml_type).map_err(|e| e.to_string())?;
        let m = QMatrix::new(format, rows, cols, file.tensor_data(t)).ok_or_else(|| {
            format!(
                "tensor '{}' is {rows} × {cols}, which type {} cannot hold (its rows must be whole blocks of {})",
                t.name,
                format.name(),
                format.block_size()
            )
        })?;
        let mut out = vec![0.0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            m.dequantize_row(r, row);
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "tensor '{}' holds {} at index {i}: its values must be finite numbers",
                t.name, out[i]
            ));
        }
        Ok(out)
    }
}

/// Why a GGUF an adapter or control vector came in could not be opened,
/// without the path (the caller's error names the file once).
pub(crate) fn open_reason(e: GgufError) -> String {
    match e {
        GgufError::InFile { error, .. } => error.to_string(),
        GgufError::Io { error, .. } => format!("cannot read it: {error}"),
        e => e.to_string(),
    }
}
