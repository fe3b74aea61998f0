//! `gemma3 convert-lora`: a PEFT LoRA adapter (a directory holding `adapter_config.json` and
//! `adapter_model.safetensors`, as Hugging Face's `peft` saves one) as a GGUF adapter, in the
//! form llama.cpp's `convert_lora_to_gguf.py` writes: `blk.N.<matrix>.weight.lora_a` (PEFT's
//! `lora_A`, [rank, n_in], the same bytes read as ggml's [n_in, rank]) and `.lora_b`, and
//! `adapter.lora.alpha` from the config's `lora_alpha`. The values keep their type (F32, F16
//! or BF16). The result is then read back against the model, as `--lora` would read it.
//!
//! Unlike llama.cpp's converter, `use_rslora` is honoured: PEFT scales such an adapter by
//! alpha / √rank, which a GGUF's alpha / rank gives with alpha · √rank written as its alpha.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_gguf::{GgmlType, GgufWriter, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertLoraArgs {
    /// The PEFT adapter's directory (adapter_config.json, adapter_model.safetensors).
    dir: PathBuf,
    /// The GGUF adapter to write.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// The model the adapter is checked against once written (as --lora reads it).
    #[command(flatten)]
    model: crate::ModelArg,
}

/// Hugging Face's Gemma 3 module names and the GGUF matrices they become.
const MODULES: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// `base_model.model.model.layers.N.<module>.lora_A.weight` as (GGUF base name, is A).
fn gguf_name(name: &str) -> Option<(String, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    // (Adapters trained on the multimodal class name the text model so.)
    let rest = rest.strip_prefix("language_model.").unwrap_or(rest);
    let rest = rest.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let l: usize = layer
        .parse()
        .ok()
        .filter(|l: &usize| l.to_string() == layer)?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    let (_, gguf) = MODULES.iter().find(|(hf, _)| *hf == module)?;
    Some((format!("blk.{l}.{gguf}.weight"), is_a))
}

/// `path`'s bytes, if it is a regular file of at most `max` bytes (a pipe or
/// a device would be read for ever).
fn read_file(path: &std::path::Path, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > max {
        bail!("{} is larger than {} MiB", path.display(), max >> 20);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A boolean setting of the config: absent or null is false, anything but
/// a boolean an error (`"true"` read as false would be a silent wrong scale).
fn flag(cfg: &Json, key: &str) -> Result<bool, String> {
    match cfg.get(key) {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("{key} must be true or false, got {v}")),
    }
}

pub fn run(a: ConvertLoraArgs) -> Result<()> {
    let config_path = a.dir.join("adapter_config.json");
    let weights_path = a.dir.join("adapter_model.safetensors");
    // Nothing read may be written over; the model is loaded first, so that
    // the result is checked before it replaces anything.
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    crate::write_gguf::check_output(
        &a.output,
        &[
            ("the model file", &path),
            ("the adapter's config", &config_path),
            ("the adapter's weights", &weights_path),
        ],
    )?;
    let model =
        gemma3_model::Model::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = read_file(&config_path, 1 << 20)?;
    let text = String::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8", config_path.display()))?;
    let cfg: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let bad = |why: String| anyhow::anyhow!("{}: {why}", config_path.display());
    if let Some(t) = cfg.get("peft_type").and_then(Json::as_str) {
        if t != "LORA" {
            return Err(bad(format!(
                "its peft_type is {t}; only LORA adapters convert"
            )));
        }
    }
    for (key, what) in [
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out weights"),
    ] {
        if flag(&cfg, key).map_err(&bad)? {
            return Err(bad(format!("{what} ({key}) is not supported")));
        }
    }
    if cfg
        .get("alpha_pattern")
        .and_then(Json::as_object)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(bad(
            "a per-module alpha (alpha_pattern) is not supported: a GGUF adapter has one alpha"
                .into(),
        ));
    }
    let alpha = cfg.get("lora_alpha").and_then(Json::as_f64);
    let rank = cfg.get("r").and_then(Json::as_u64);
    let (Some(alpha), Some(rank)) = (alpha, rank) else {
        return Err(bad("it needs a numeric lora_alpha and r".into()));
    };
    let rslora = flag(&cfg, "use_rslora").map_err(&bad)?;
    // Without a per-module rank every matrix has the config's r (PEFT's
    // scale is lora_alpha / r; a GGUF's alpha / the matrix's rank).
    let one_rank = cfg
        .get("rank_pattern")
        .and_then(Json::as_object)
        .is_none_or(|m| m.is_empty());
    if alpha <= 0.0 {
        return Err(bad(format!(
            "lora_alpha {alpha} gives the adapter no effect: it must be above 0"
        )));
    }
    // The GGUF alpha whose alpha / rank is PEFT's scale.
    let gguf_alpha = if rslora {
        alpha * (rank as f64).sqrt()
    } else {
        alpha
    } as f32;
    if !gguf_alpha.is_finite() || gguf_alpha == 0.0 || rank == 0 {
        return Err(bad(format!(
            "lora_alpha {alpha:.3e} and r {rank} give no usable scale"
        )));
    }

    let bytes = read_file(&weights_path, 4 << 30)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", weights_path.display()))?;
    let mut out = GgufWriter::new();
    out.add_kv("general.architecture", Value::String("gemma3".into()));
    out.add_kv("general.type", Value::String("adapter".into()));
    out.add_kv("adapter.type", Value::String("lora".into()));
    out.add_kv("adapter.lora.alpha", Value::F32(gguf_alpha));
    let name = a.dir.file_name().map(|n| n.to_string_lossy().into_owned());
    out.add_kv(
        "general.name",
        Value::String(name.unwrap_or_else(|| "lora".into())),
    );
    // (Sorted: the file's order is the tensors' names'.) Each with the
    // source tensor it came from, so that two that map to one name (say
    // `model.layers.0…` and `model.language_model.layers.0…`) are refused
    // rather than one silently taken.
    let mut tensors: BTreeMap<String, _> = BTreeMap::new();
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some((base, is_a)) = gguf_name(&name) else {
            bail!(
                "{}: tensor '{name}' is not the lora_A or lora_B of a Gemma 3 layer's q, k, v, o, gate, up or down projection",
                weights_path.display()
            );
        };
        let ty = match view.dtype() {
            safetensors::Dtype::F32 => GgmlType::F32,
            safetensors::Dtype::F16 => GgmlType::F16,
            safetensors::Dtype::BF16 => GgmlType::BF16,
            other => bail!(
                "{}: tensor '{name}' is {other:?}; F32, F16 or BF16 convert",
                weights_path.display()
            ),
        };
        let [rows, cols] = view.shape() else {
            bail!(
                "{}: tensor '{name}' has shape {:?}, not a matrix",
                weights_path.display(),
                view.shape()
            );
        };
        let r = if is_a { *rows } else { *cols };
        if (rslora || one_rank) && r as u64 != rank {
            bail!("{}: tensor '{name}' has rank {r}, not the config's r {rank} (and no rank_pattern allows it{})", weights_path.display(), if rslora { "; with use_rslora one alpha gives one rank its scale" } else { "" });
        }
        let suffix = if is_a { "lora_a" } else { "lora_b" };
        let gguf = format!("{base}.{suffix}");
        if let Some(first) = sources.insert(gguf.clone(), name.clone()) {
            let (a, b) = if first < name {
                (first, name)
            } else {
                (name, first)
            };
            bail!(
                "{}: tensors '{a}' and '{b}' are both {gguf}: the file holds one projection's matrix twice",
                weights_path.display()
            );
        }
        // (PEFT's [rows, cols] row-major is ggml's [cols, rows].)
        tensors.insert(
            gguf,
            ([*cols as u64, *rows as u64], ty, view.data().to_vec()),
        );
    }
    if tensors.is_empty() {
        bail!("{}: no lora_A / lora_B tensors", weights_path.display());
    }
    for (name, (dims, ty, data)) in tensors {
        out.add_tensor(&name, &dims, ty, data)?;
    } // Read back as --lora reads it (a pair missing, a shape of another
      // model, …) before it replaces anything.
    let mut matrices = 0;
    crate::write_gguf::write_new(&out, &a.output, |tmp| {
        let f = model.read_lora(tmp).map_err(|e| {
            anyhow::Error::new(e)
                .context("the converted adapter does not fit the model (nothing written)")
        })?;
        matrices = f.pairs.len();
        Ok(())
    })?;
    outln!(
        "{}: {} matrices, alpha {gguf_alpha}{}, checked against {}",
        a.output.display(),
        matrices,
        if rslora {
            " (lora_alpha · √r: use_rslora)"
        } else {
            ""
        },
        path.display()
    )?;
    Ok(())
}
