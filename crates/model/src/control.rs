//! Control vectors, as llama.cpp's `--control-vector`: a direction added to
//! the residual stream at the end of a layer, at every position (prompt and
//! generated tokens alike), to steer what the model writes.
//!
//! The file format is llama.cpp's (`llama-cvector-generator` and repeng
//! write it): a GGUF whose tensors are all named `direction.N`, each a 1-D
//! F32 vector of the model's width, N ≥ 1 the layer whose output it is
//! added to (layer 0's output never takes one). The metadata
//! (`controlvector.model_hint`, `controlvector.layer_count`) is not read,
//! as llama.cpp does not read it. Several files add up, each times its
//! strength, and `--control-vector-layer-range START END` limits the layers
//! (inclusive; by default 1 to the last).

use crate::{Model, ModelError};
use gemma3_gguf::{GgmlType, GgufError, GgufFile};
use std::path::Path;

/// The directions of one or more control vector files, summed, each times
/// its strength: `layers[N - 1]` is added after layer N (empty where no file
/// has a direction for it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControlVector {
    /// The vectors' width (the model's `d_model` for one that applies).
    pub n_embd: usize,
    /// Layer N's direction at index N - 1, as llama.cpp lays them out.
    pub layers: Vec<Vec<f32>>,
}

impl ControlVector {
    /// The file at `path` (its directions times `strength`) added to `self`,
    /// with errors naming the file: not a GGUF, a tensor that is not a
    /// `direction.N` with N ≥ 1, not F32, not 1-D, of a width other than the
    /// others', or holding a value that is not finite.
    pub fn add_file(&mut self, path: &Path, strength: f32) -> Result<(), ModelError> {
        let err = |why: String| ModelError::Control {
            path: path.display().to_string(),
            why,
        };
        if !strength.is_finite() {
            return Err(err(format!(
                "its strength {strength} is not a finite number"
            )));
        }
        let file = GgufFile::open(path).map_err(|e| {
            err(match e {
                GgufError::InFile { error, .. } => error.to_string(),
                GgufError::Io { error, .. } => format!("cannot read it: {error}"),
                e => e.to_string(),
            })
        })?;
        if file.tensors().is_empty() {
            return Err(err("it holds no direction.N tensors".into()));
        }
        for t in file.tensors() {
            let layer = t
                .name
                .strip_prefix("direction.")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    err(format!(
                        "tensor '{}' is not named direction.N (a model or a LoRA adapter is given with --model or --lora)",
                        t.name
                    ))
                })?;
            if layer == 0 {
                return Err(err(
                    "it has a direction.0, but layer 0's output takes none (directions start at direction.1)"
                        .into(),
                ));
            }
            if t.ggml_type != GgmlType::F32 {
                return Err(err(format!(
                    "tensor '{}' has type {:?}; control vectors are F32",
                    t.name, t.ggml_type
                )));
            }
            let [width] = t.dims[..] else {
                return Err(err(format!(
                    "tensor '{}' has shape {:?}; a direction is one vector",
                    t.name, t.dims
                )));
            };
            let width = width as usize;
            if self.n_embd == 0 {
                self.n_embd = width;
            } else if width != self.n_embd {
                return Err(err(format!(
                    "tensor '{}' has {width} values where the other directions have {}",
                    t.name, self.n_embd
                )));
            }
            let bytes = file.tensor_data(t);
            let values = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if self.layers.len() < layer {
                self.layers.resize(layer, Vec::new());
            }
            let dst = &mut self.layers[layer - 1];
            if dst.is_empty() {
                dst.resize(width, 0.0);
            }
            for (i, (d, v)) in dst.iter_mut().zip(values).enumerate() {
                if !v.is_finite() {
                    return Err(err(format!(
                        "tensor '{}' holds {v} at index {i}: its values must be finite numbers",
                        t.name
                    )));
                }
                *d += v * strength;
            }
        }
        Ok(())
    }
}

/// What [`Model::set_control`] applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlInfo {
    /// The layers whose output now takes a direction.
    pub layers: Vec<usize>,
    /// Directions for layers this model lacks (from direction.{n_layers} on),
    /// left out as llama.cpp leaves them out.
    pub beyond: Vec<usize>,
}

impl Model {
    /// Add `cv`'s direction for layer N to that layer's output, for N in
    /// `first..=last` (llama.cpp's `--control-vector-layer-range`; pass 1
    /// and the layer count for all), replacing any control vector set
    /// before. An empty `cv` removes it.
    pub fn set_control(
        &mut self,
        cv: &ControlVector,
        first: usize,
        last: usize,
    ) -> Result<ControlInfo, ModelError> {
        let n_layers = self.layers.len();
        let mut info = ControlInfo::default();
        let mut control = vec![None; n_layers];
        for (i, dir) in cv.layers.iter().enumerate() {
            let layer = i + 1;
            if dir.is_empty() {
                continue;
            }
            if cv.n_embd != self.config.d_model {
                return Err(ModelError::ControlWidth {
                    found: cv.n_embd,
                    expected: self.config.d_model,
                });
            }
            if layer >= n_layers {
                info.beyond.push(layer);
            } else if (first..=last).contains(&layer) {
                control[layer] = Some(dir.clone().into_boxed_slice());
                info.layers.push(layer);
            }
        }
        self.control = control;
        Ok(info)
    }
}
