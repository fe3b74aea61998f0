//! `gemma3 export-lora`: the model with LoRA adapters merged into its weights, written as a new
//! GGUF, as `llama-export-lora` writes one: each adapted matrix becomes W + scale · B·A in F16
//! (W dequantized; scale the user's times alpha / rank), every other tensor and the metadata
//! are copied as they are. The result runs anywhere a GGUF of this model runs, without the
//! adapter files.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_gguf::{GgmlType, GgufWriter};
use gemma3_kernels::{quant, WeightFormat};
use gemma3_model::Model;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportLoraArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    #[command(flatten)]
    lora: gemma3_server::LoraArgs,
    /// The merged model's file: written whole to a new temporary file beside it, then renamed
    /// over it (an existing FILE must be a regular file, and neither the model nor an adapter).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
}

pub fn run(a: ExportLoraArgs) -> Result<()> {
    let specs = a.lora.specs()?;
    if specs.is_empty() {
        bail!("no adapter to merge: give --lora FILE or --lora-scaled FILE SCALE");
    }
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let inputs: Vec<(&str, &std::path::Path)> = std::iter::once(("the model file", path.as_path()))
        .chain(specs.iter().map(|s| ("an adapter", s.path.as_path())))
        .collect();
    crate::write_gguf::check_output(&a.output, &inputs)?;
    let model = Model::open(&path).with_context(|| format!("loading {}", path.display()))?;
    // Each adapted matrix's merged values, by tensor name.
    let mut merged: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for spec in &specs {
        let f = model.read_lora(&spec.path)?;
        for p in &f.pairs {
            let t = model.layers[p.layer].matrix(p.matrix);
            let (n_in, rank) = (t.cols, p.rank);
            let w = merged.entry(t.name.clone()).or_insert_with(|| {
                let m = model.mat(t);
                let mut w = vec![0.0f32; t.rows * n_in];
                for (r, row) in w.chunks_exact_mut(n_in).enumerate() {
                    m.dequantize_row(r, row);
                }
                w
            });
            let s = p.scale(spec.scale, f.alpha);
            for (row, b) in w.chunks_exact_mut(n_in).zip(p.b.chunks_exact(rank)) {
                for (j, &bj) in b.iter().enumerate() {
                    let c = s * bj;
                    for (v, &aj) in row.iter_mut().zip(&p.a[j * n_in..(j + 1) * n_in]) {
                        *v += c * aj;
                    }
                }
            }
        }
    }
    let mut out = GgufWriter::new();
    for (k, v) in model.file.metadata() {
        out.add_kv(k, v.clone());
    }
    for t in model.file.tensors() {
        let (ty, data) = match merged.get(&t.name) {
            Some(w) => {
                if let Some(i) = w.iter().position(|v| !v.is_finite() || v.abs() > 65504.0) {
                    bail!(
                        "merged, '{}' holds {} at index {i}, beyond F16's range: lower the scales",
                        t.name,
                        w[i]
                    );
                }
                let bytes = quant::encode_float_weights(WeightFormat::F16, w);
                (GgmlType::F16, bytes.expect("F16 is a float format"))
            }
            None => (t.ggml_type, model.file.tensor_data(t).to_vec()),
        };
        out.add_tensor(&t.name, &t.dims, ty, data)?;
    }
    crate::write_gguf::write_new(&out, &a.output, |_| Ok(()))?;
    outln!(
        "{}: {} with {} adapter(s) merged into {} matrices (F16)",
        a.output.display(),
        path.display(),
        specs.len(),
        merged.len()
    )?;
    Ok(())
}
