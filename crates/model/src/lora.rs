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
//! is the base model. A and B are kept in f32 (an adapter is a few MB); the
//! activations they multiply are first rounded as ggml rounds them for the
//! file's type (f16 for F16, Q8_0 blocks for Q8_0, ...), so the products are
//! llama.cpp's up to the order of additions.

use crate::{Model, ModelError};
use gemma3_gguf::{GgufError, GgufFile, TensorInfo};
use gemma3_kernels::{quant, vectorized, QMatrix, WeightFormat};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The layer matrices an adapter may change, by their GGUF names, in the
/// order of `Layer::matrix`.
const MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// One adapted matrix's low-rank update, `out += scale · B·(A·x)`.
#[derive(Debug)]
pub struct LoraDelta {
    rank: usize,
    n_in: usize,
    n_out: usize,
    /// A, rank × n_in.
    a: Vec<f32>,
    /// B transposed, rank × n_out.
    bt: Vec<f32>,
    /// The file's types of A and B: how the activations they multiply are
    /// rounded (see [`quant::round_activations`]).
    a_format: WeightFormat,
    b_format: WeightFormat,
    /// The user's scale times alpha / rank.
    scale: f32,
}

/// Tokens per task of [`LoraDelta::add_to`]: each task reuses its buffers.
const TOKENS_PER_TASK: usize = 4;
/// Output lanes accumulated together over the rank.
const LANES: usize = 16;

impl LoraDelta {
    /// `out += scale · B·(A·x)` for n rows of x (n × n_in) and out (n × n_out).
    pub fn add_to(&self, x: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.n_in);
        debug_assert_eq!(out.len(), n * self.n_out);
        let (xs, outs) = (
            x.chunks(TOKENS_PER_TASK * self.n_in),
            out.chunks_mut(TOKENS_PER_TASK * self.n_out),
        );
        // Per token, so splitting the work cannot change a value.
        if n > TOKENS_PER_TASK && rayon::current_num_threads() > 1 {
            let xs = x.par_chunks(TOKENS_PER_TASK * self.n_in);
            let outs = out.par_chunks_mut(TOKENS_PER_TASK * self.n_out);
            xs.zip(outs).for_each(|(x, out)| self.add_rows(x, out));
        } else {
            xs.zip(outs).for_each(|(x, out)| self.add_rows(x, out));
        }
    }

    fn add_rows(&self, x: &[f32], out: &mut [f32]) {
        let (n_in, n_out, r) = (self.n_in, self.n_out, self.rank);
        let mut xr = vec![0.0f32; n_in];
        let mut h = vec![0.0f32; r];
        let mut d = vec![0.0f32; n_out];
        for (x, out) in x.chunks_exact(n_in).zip(out.chunks_exact_mut(n_out)) {
            xr.copy_from_slice(x);
            quant::round_activations(self.a_format, &mut xr);
            for (h, a) in h.iter_mut().zip(self.a.chunks_exact(n_in)) {
                *h = dot(a, &xr);
            }
            quant::round_activations(self.b_format, &mut h);
            b_times(&self.bt, &h, &mut d);
            // ggml_scale, then ggml_add.
            for (o, &v) in out.iter_mut().zip(&d) {
                *o += self.scale * v;
            }
        }
    }
}

/// Σ a·b, over 16 partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    vectorized!(fn(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    })
}

/// `d = B·h` with B given transposed (`bt`: rank rows of d.len()).
fn b_times(bt: &[f32], h: &[f32], d: &mut [f32]) {
    vectorized!(fn(bt: &[f32], h: &[f32], d: &mut [f32]) {
        let n_out = d.len();
        let mut o = 0;
        while o + LANES <= n_out {
            let mut acc = [0.0f32; LANES];
            for (j, &hj) in h.iter().enumerate() {
                let row = &bt[j * n_out + o..j * n_out + o + LANES];
                for i in 0..LANES {
                    acc[i] += hj * row[i];
                }
            }
            d[o..o + LANES].copy_from_slice(&acc);
            o += LANES;
        }
        for (k, v) in d[o..].iter_mut().enumerate() {
            *v = h.iter().enumerate().map(|(j, &hj)| hj * bt[j * n_out + o + k]).sum();
        }
    })
}

/// An adapter as loaded: what `gemma3 info` and the server report.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    pub path: PathBuf,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    /// The user's scale (`--lora-scaled`; 1 for `--lora`).
    pub scale: f32,
    /// `adapter.lora.alpha` (0: none, the scale used as it is).
    pub alpha: f32,
    /// Matrices adapted, and the smallest and largest rank among them.
    pub matrices: usize,
    pub ranks: (usize, usize),
    /// Tensors llama.cpp skips as well (norm weights), by name.
    pub skipped: Vec<String>,
}

impl Model {
    /// Apply the LoRA adapter at `path` with the user's `scale`, as
    /// `llama-cli --lora-scaled FILE SCALE` does; several adapters add up.
    /// The file is checked whole first: an adapter that fails leaves the
    /// model as it was. A scale of 0 checks the file and changes nothing.
    pub fn load_lora(&mut self, path: &Path, scale: f32) -> Result<&LoraInfo, ModelError> {
        let err = |why: String| ModelError::Lora {
            path: path.display().to_string(),
            why,
        };
        if !scale.is_finite() {
            return Err(err(format!("its scale {scale} is not a finite number")));
        }
        // (The file is named once, by `err`.)
        let file = GgufFile::open(path).map_err(|e| {
            err(match e {
                GgufError::InFile { error, .. } => error.to_string(),
                GgufError::Io { error, .. } => format!("cannot read it: {error}"),
                e => e.to_string(),
            })
        })?;
        let general_type = file.get_str("general.type").unwrap_or("");
        if general_type != "adapter" {
            return Err(err(format!(
                "not a LoRA adapter: its general.type is {} (a model is given with --model)",
                if general_type.is_empty() {
                    "missing".to_string()
                } else {
                    format!("'{general_type}', not 'adapter'")
                }
            )));
        }
        let arch = file.get_str("general.architecture").unwrap_or("");
        if arch != "gemma3" {
            return Err(err(format!(
                "it is an adapter for '{arch}', not for this gemma3 model"
            )));
        }
        let kind = file.get_str("adapter.type").unwrap_or("");
        if kind != "lora" {
            return Err(err(format!(
                "its adapter.type is '{kind}'; only 'lora' adapters are supported"
            )));
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
            let a_m = self.lora_matrix(&file, a, rank, n_in).map_err(&err)?;
            let b_m = self.lora_matrix(&file, b, n_out, rank).map_err(&err)?;
            let mut bt = vec![0.0f32; rank * n_out];
            for (o, row) in b_m.chunks_exact(rank).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    bt[j * n_out + o] = v;
                }
            }
            // llama.cpp's `get_scale`, in its order of operations.
            let s = if alpha != 0.0 {
                scale * alpha / rank as f32
            } else {
                scale
            };
            let delta = LoraDelta {
                rank,
                n_in,
                n_out,
                a: a_m,
                bt,
                a_format: crate::weights::weight_format(&a.name, a.ggml_type)?,
                b_format: crate::weights::weight_format(&b.name, b.ggml_type)?,
                scale: s,
            };
            deltas.push((l, m, delta));
        }
        let ranks = deltas.iter().map(|(_, _, d)| d.rank);
        let info = LoraInfo {
            path: path.to_path_buf(),
            name: file.get_str("general.name").ok().map(str::to_string),
            scale,
            alpha,
            matrices: deltas.len(),
            ranks: (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0)),
            skipped,
        };
        // As llama.cpp's llama_set_adapters_lora: an adapter at scale 0 is not run.
        if scale != 0.0 {
            for (l, m, delta) in deltas {
                self.layers[l].matrix_mut(m).lora.push(Arc::new(delta));
            }
        }
        self.loras.push(info);
        Ok(self.loras.last().expect("just pushed"))
    }

    /// Layer and matrix index of `blk.N.<matrix>.weight`, or why an adapter
    /// cannot change `base`.
    fn adapted_matrix(&self, base: &str) -> Result<(usize, usize), String> {
        if base == "token_embd.weight" || base == "output.weight" {
            return Err(format!(
                "it adapts '{base}'; adapters of the embedding or output head are not supported"
            ));
        }
        let parsed = base
            .strip_prefix("blk.")
            .and_then(|s| s.strip_suffix(".weight"))
            .and_then(|s| s.split_once('.'))
            .and_then(|(l, name)| Some((l.parse::<usize>().ok()?, name)));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The update against its definition in f64, for F32 A and B (no
    /// rounding of the activations): out += s · Σ_j B[o][j] · Σ_i A[j][i]·x[i].
    #[test]
    fn delta_is_scale_times_b_a_x() {
        let (n_in, n_out, rank, n) = (96, 40, 3, 7);
        let val = |k: usize| ((k * 7919 % 1000) as f32 / 500.0) - 1.0;
        let a: Vec<f32> = (0..rank * n_in).map(val).collect();
        let b: Vec<f32> = (0..n_out * rank).map(|k| val(k + 12345)).collect();
        let x: Vec<f32> = (0..n * n_in).map(|k| val(k + 777)).collect();
        let mut bt = vec![0.0; rank * n_out];
        for o in 0..n_out {
            for j in 0..rank {
                bt[j * n_out + o] = b[o * rank + j];
            }
        }
        let d = LoraDelta {
            rank,
            n_in,
            n_out,
            a: a.clone(),
            bt,
            a_format: WeightFormat::F32,
            b_format: WeightFormat::F32,
            scale: 0.75,
        };
        let base: Vec<f32> = (0..n * n_out).map(|k| val(k + 4242)).collect();
        let mut out = base.clone();
        d.add_to(&x, n, &mut out);
        for t in 0..n {
            for o in 0..n_out {
                let mut want = 0.0f64;
                for j in 0..rank {
                    let ax: f64 = (0..n_in)
                        .map(|i| a[j * n_in + i] as f64 * x[t * n_in + i] as f64)
                        .sum();
                    want += b[o * rank + j] as f64 * ax;
                }
                let want = base[t * n_out + o] as f64 + 0.75 * want;
                let got = out[t * n_out + o] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "token {t} row {o}: {got} vs {want}"
                );
            }
        }
    }
}
