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
use gemma3_gguf::{GgmlType, GgufFile};
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
        let file = GgufFile::open(path).map_err(|e| err(crate::lora::open_reason(e)))?;
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
            if layer > MAX_LAYER {
                return Err(err(format!(
                    "tensor '{}' is for layer {layer}: no model this reads has more than {MAX_LAYER} layers",
                    t.name
                )));
            }
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
            // (One dimension, or more of size 1 after it, as ggml counts
            // dimensions.)
            let width = t.dims.first().copied().unwrap_or(0);
            if t.dims.len() > 1 && t.dims[1..].iter().any(|&d| d != 1) {
                return Err(err(format!(
                    "tensor '{}' has shape {:?}; a direction is one vector",
                    t.name, t.dims
                )));
            }
            let width = width as usize;
            if width == 0 {
                return Err(err(format!("tensor '{}' holds no values", t.name)));
            }
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
                if !d.is_finite() {
                    return Err(err(format!(
                        "tensor '{}' times the strength {strength}, added to the vectors before it, is {d} at index {i}: lower the strengths",
                        t.name
                    )));
                }
            }
            // Added to a layer's output, the vector's squares enter the
            // next norm: where the norm of the vector alone overflows (its
            // scale NaN; the values are finite here), that norm, and every
            // logit, would be NaN.
            if gemma3_kernels::ops::rms_scale(dst, 0.0).is_nan() {
                let max = dst.iter().fold(0.0f32, |m, &d| m.max(d.abs()));
                return Err(err(format!(
                    "tensor '{}' times the strength {strength}, added to the vectors before it, has values up to {max:e}: their squares pass f32's range, so the next layer's norm would overflow; lower the strengths",
                    t.name
                )));
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
    /// The layers whose output takes a control vector, and each one's
    /// length (Euclidean).
    pub fn steered_layers(&self) -> Vec<(usize, f32)> {
        (self.control.iter().enumerate())
            .filter_map(|(l, v)| Some((l, v.as_deref()?.iter().map(|x| x * x).sum::<f32>().sqrt())))
            .collect()
    }

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

/// How [`DiffStats::direction`] reduces a layer's differences (positive minus negative
/// hidden states, one row per token) to one direction, as
/// `llama-cvector-generator --method` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// The rows' mean, scaled to length 1.
    Mean,
    /// The first principal direction of the rows (uncentred, as llama.cpp
    /// takes it: the top eigenvector of DᵀD), by power iteration: at most
    /// `iterations` steps, stopping at the first step that moves the vector
    /// by less than 1e-7 (llama.cpp checks it step by step too, taking the
    /// vector of that step). Its sign is chosen so that the rows' mean
    /// projects positively on it (llama.cpp leaves it to chance), so that a
    /// positive strength steers towards the positive prompts.
    Pca { iterations: usize },
}

/// A layer's direction from its difference rows, and how well it sums them.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// Length 1 (all zeros when every row is).
    pub v: Vec<f32>,
    /// The share of the rows' squared length along `v` (Σ (row·v)² / Σ |row|²):
    /// how much of the difference one direction holds.
    pub share: f64,
    /// Power iteration steps taken (0 for the mean).
    pub steps: usize,
    /// Whether power iteration met its tolerance within its steps (true for
    /// the mean).
    pub converged: bool,
}

/// The highest layer a `direction.N` may name: a bound far above any model
/// this engine runs, so that a malformed file cannot make the vector's
/// per-layer table (N × width values) take the memory.
pub const MAX_LAYER: usize = 4096;

/// The tolerance of llama.cpp's power iteration: the distance between two
/// successive unit vectors at which it stops.
pub const PCA_TOLERANCE: f64 = 1e-7;

/// Rows of `diff` (`width` values each) whose values are all within 1e-6 of
/// zero are left out, as llama.cpp leaves them out: the positions where the
/// two prompts still agree (the BOS, a shared prefix) carry no difference.
/// llama.cpp's test reads `x > 1e-6` without the absolute value, so it would
/// also drop a row of small and negative values; this one does not.
pub fn nonzero_rows(diff: &[f32], width: usize) -> Vec<&[f32]> {
    diff.chunks_exact(width)
        .filter(|r| r.iter().any(|x| x.abs() > 1e-6))
        .collect()
}

/// One layer's difference rows, summed as they come (nothing else of them
/// is kept, so that any number of prompt pairs fits in memory): their count,
/// their sum and DᵀD, in f64.
#[derive(Clone, Debug)]
pub struct DiffStats {
    width: usize,
    rows: usize,
    sum: Vec<f64>,
    /// DᵀD, row-major; the rows are added in blocks (see `pending`).
    gram: Vec<f64>,
    /// Rows not yet added to `gram`, which takes them a block at a time.
    pending: Vec<f32>,
}

/// Rows added to DᵀD at a time (one product per block).
const GRAM_BLOCK: usize = 256;

impl DiffStats {
    pub fn new(width: usize) -> Self {
        Self {
            width,
            rows: 0,
            sum: vec![0.0; width],
            gram: vec![0.0; width * width],
            pending: Vec::new(),
        }
    }

    /// The rows taken so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes the rows of `diff` (`width` values each) that [`nonzero_rows`]
    /// keeps.
    pub fn add(&mut self, diff: &[f32]) {
        for r in nonzero_rows(diff, self.width) {
            self.rows += 1;
            for (s, &x) in self.sum.iter_mut().zip(r) {
                *s += x as f64;
            }
            self.pending.extend_from_slice(r);
            if self.pending.len() == GRAM_BLOCK * self.width {
                self.flush();
            }
        }
    }

    /// Adds the pending rows P to DᵀD (DᵀD += PᵀP, in f64, by
    /// `matrixmultiply`'s blocked product: the plain loop it replaces took a
    /// third of a 500-pair run).
    fn flush(&mut self) {
        let w = self.width;
        let m = self.pending.len() / w;
        if m == 0 {
            return;
        }
        let p: Vec<f64> = self.pending.iter().map(|&x| x as f64).collect();
        // SAFETY: Pᵀ is w × m over `p` (element (i, k) at k·w + i), P is
        // m × w row-major over `p`, and the w × w product goes to `gram`,
        // row-major; every index stays inside its buffer.
        unsafe {
            matrixmultiply::dgemm(
                w,
                m,
                w,
                1.0,
                p.as_ptr(),
                1,
                w as isize,
                p.as_ptr(),
                w as isize,
                1,
                1.0,
                self.gram.as_mut_ptr(),
                w as isize,
                1,
            );
        }
        self.pending.clear();
    }

    /// The layer's direction (see [`Reduce`]).
    pub fn direction(&mut self, how: Reduce) -> Direction {
        self.flush();
        let width = self.width;
        let n = self.rows.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let (v, steps, converged) = match how {
            Reduce::Mean => (unit(mean.clone()), 0, true),
            Reduce::Pca { iterations } => {
                // A fixed start, so that a run is repeatable: llama.cpp starts
                // from uniform random numbers in [0, 1), here from a fixed
                // sequence of them.
                let mut state = 0x9E37_79B9_7F4A_7C15u64;
                let start = (0..width)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 11) as f64 / (1u64 << 53) as f64
                    })
                    .collect();
                let (mut v, steps, converged) =
                    power_iteration(&self.gram, width, unit(start), iterations);
                if dot(&v, &mean) < 0.0 {
                    v.iter_mut().for_each(|x| *x = -*x);
                }
                (v, steps, converged)
            }
        };
        // Σ (row·v)² = vᵀ(DᵀD)v, and Σ |row|² = trace(DᵀD).
        let total: f64 = (0..width).map(|i| self.gram[i * width + i]).sum();
        let along: f64 = (self.gram.chunks_exact(width))
            .zip(&v)
            .map(|(row, &vi)| vi * dot(row, &v))
            .sum();
        Direction {
            v: v.iter().map(|&x| x as f32).collect(),
            share: if total > 0.0 { along / total } else { 0.0 },
            steps,
            converged,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `v` scaled to length 1 (left as it is when all zeros).
fn unit(mut v: Vec<f64>) -> Vec<f64> {
    let n = dot(&v, &v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// The top eigenvector of the symmetric `s` from `v`: v ← s·v / |s·v|, at
/// most `iterations` steps, stopping at the first shorter than
/// [`PCA_TOLERANCE`]. Returns it, the steps taken and whether it converged.
fn power_iteration(
    s: &[f64],
    width: usize,
    mut v: Vec<f64>,
    iterations: usize,
) -> (Vec<f64>, usize, bool) {
    let mut next = vec![0.0f64; width];
    for step in 1..=iterations {
        for (o, row) in next.iter_mut().zip(s.chunks_exact(width)) {
            *o = dot(row, &v);
        }
        let n = dot(&next, &next).sqrt();
        if n == 0.0 {
            // Every row is zero: no direction to find.
            return (vec![0.0; width], step, true);
        }
        next.iter_mut().for_each(|x| *x /= n);
        let moved = (next.iter().zip(&v))
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        std::mem::swap(&mut v, &mut next);
        if moved < PCA_TOLERANCE {
            return (v, step, true);
        }
    }
    (v, iterations, false)
}

impl ControlVector {
    /// The vector as llama-cvector-generator writes it: a GGUF of
    /// architecture `controlvector` with `controlvector.model_hint` (the
    /// model's architecture) and `controlvector.layer_count`, and a 1-D F32
    /// tensor `direction.N` for each layer N that has one.
    pub fn to_gguf(&self, model_hint: &str) -> gemma3_gguf::GgufWriter {
        use gemma3_gguf::Value;
        let mut w = gemma3_gguf::GgufWriter::new();
        w.add_kv(
            "general.architecture",
            Value::String("controlvector".into()),
        );
        w.add_kv("controlvector.model_hint", Value::String(model_hint.into()));
        let count = self.layers.iter().filter(|l| !l.is_empty()).count();
        w.add_kv("controlvector.layer_count", Value::I32(count as i32));
        for (i, v) in self.layers.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.add_tensor(
                &format!("direction.{}", i + 1),
                &[v.len() as u64],
                GgmlType::F32,
                bytes,
            )
            .expect("a 1-D F32 tensor of its own length");
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One layer's direction from its difference rows.
    fn direction(rows: &[&[f32]], width: usize, how: Reduce) -> Direction {
        let mut stats = DiffStats::new(width);
        for r in rows {
            stats.add(r);
        }
        stats.direction(how)
    }

    fn close(a: &[f32], b: &[f64], tol: f64) -> bool {
        a.iter().zip(b).all(|(&x, &y)| (x as f64 - y).abs() < tol)
    }

    #[test]
    fn zero_rows_are_left_out() {
        let d = [0.0, 0.0, 1e-7, -1e-7, 0.0, -0.5, 2.0, 0.0];
        let rows = nonzero_rows(&d, 2);
        assert_eq!(rows, vec![&[0.0f32, -0.5][..], &[2.0, 0.0][..]]);
    }

    #[test]
    fn mean_direction_is_the_normalised_mean() {
        // Rows (3, 0), (1, 4): mean (2, 2), unit (1/√2, 1/√2).
        let rows: Vec<&[f32]> = vec![&[3.0, 0.0], &[1.0, 4.0]];
        let d = direction(&rows, 2, Reduce::Mean);
        let h = 0.5f64.sqrt();
        assert!(close(&d.v, &[h, h], 1e-7), "{:?}", d.v);
        // Along (h, h): (3h)² + (5h)² = 17, of 9 + 17 = 26.
        assert!((d.share - 17.0 / 26.0).abs() < 1e-12, "{}", d.share);
        assert_eq!((d.steps, d.converged), (0, true));
    }

    #[test]
    fn pca_finds_the_top_eigenvector_with_the_mean_s_sign() {
        // Rows ±(2, 1) twice and (0.1, -0.2) twice: DᵀD = 4·(2,1)(2,1)ᵀ + 2·(0.1,-0.2)(0.1,-0.2)ᵀ
        // = [[16.02, 7.96], [7.96, 4.08]], eigenvalues from the trace 20.1 and
        // determinant 65.3616 - 63.3616 = 2: λ = (20.1 ± √(404.01 - 8)) / 2 = 20 and 0.1
        // ((2, 1) and (0.1, -0.2) are orthogonal).
        let rows: Vec<&[f32]> = vec![
            &[2.0, 1.0],
            &[-2.0, -1.0],
            &[2.0, 1.0],
            &[-2.0, -1.0],
            &[0.1, -0.2],
            &[0.1, -0.2],
        ];
        let d = direction(&rows, 2, Reduce::Pca { iterations: 1000 });
        let l1 = (20.1 + (404.01f64 - 8.0).sqrt()) / 2.0;
        // Eigenvector of [[a, b], [b, c]] for λ: (b, λ - a), normalised.
        let (a, b) = (16.02, 7.96);
        let e = [b, l1 - a];
        let n = (e[0] * e[0] + e[1] * e[1]).sqrt();
        // The mean, (0.2/6, -0.4/6), projects negatively on (+, +): the sign flips.
        let want = [-e[0] / n, -e[1] / n];
        assert!(close(&d.v, &want, 1e-7), "{:?} vs {want:?}", d.v);
        assert!(d.converged && d.steps < 100, "{} steps", d.steps);
        assert!(
            (d.share - l1 / 20.1).abs() < 1e-9,
            "{} vs {}",
            d.share,
            l1 / 20.1
        );
    }

    #[test]
    fn pca_stops_after_its_iterations() {
        // Two eigenvalues almost equal: a few steps cannot converge.
        let rows: Vec<&[f32]> = vec![&[1.0, 0.0], &[0.0, 0.999]];
        let d = direction(&rows, 2, Reduce::Pca { iterations: 3 });
        assert_eq!((d.steps, d.converged), (3, false));
    }

    /// A tensor: name, dimensions, values.
    type Spec<'a> = (&'a str, &'a [u64], Vec<f32>);

    /// A file of `tensors` at a fresh temporary path.
    fn vector_file(tag: &str, tensors: &[Spec]) -> std::path::PathBuf {
        let mut w = gemma3_gguf::GgufWriter::new();
        for (name, dims, v) in tensors {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.add_tensor(name, dims, GgmlType::F32, bytes).unwrap();
        }
        let path =
            std::env::temp_dir().join(format!("gemma3-cv-{tag}-{}.gguf", std::process::id()));
        w.write_to_path(&path).unwrap();
        path
    }

    #[test]
    fn malformed_directions_are_refused_by_name() {
        let cases: Vec<(&str, Vec<Spec>, f32, &str)> = vec![
            // A layer number that would size the table to gigabytes.
            (
                "huge",
                vec![("direction.100000000", &[2], vec![1.0, 2.0])],
                1.0,
                "layer 100000000",
            ),
            (
                "overflow",
                vec![("direction.18446744073709551615", &[2], vec![1.0, 2.0])],
                1.0,
                "layer 18446744073709551615",
            ),
            (
                "empty",
                vec![("direction.1", &[0], vec![])],
                1.0,
                "holds no values",
            ),
            (
                "matrix",
                vec![("direction.1", &[2, 2], vec![1.0; 4])],
                1.0,
                "a direction is one vector",
            ),
            // A finite value whose product with the strength is not.
            (
                "scaled",
                vec![("direction.2", &[2], vec![1e36, 1.0])],
                1000.0,
                "lower the strengths",
            ),
        ];
        for (tag, tensors, strength, want) in cases {
            let path = vector_file(tag, &tensors);
            let e = ControlVector::default()
                .add_file(&path, strength)
                .unwrap_err();
            let _ = std::fs::remove_file(&path);
            assert!(e.to_string().contains(want), "{tag}: {e}");
        }
        // A vector whose squares pass f32's range (3e38² is no f32), and
        // two files each of which is normable (1e19² = 1e38) but whose sum
        // is not (2e19).
        let path = vector_file("huge", &[("direction.1", &[2], vec![3e38, 1.0])]);
        let e = ControlVector::default().add_file(&path, 1.0).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            e.to_string()
                .contains("has values up to 3e38: their squares pass f32's range"),
            "{e}"
        );
        let path = vector_file("sum", &[("direction.1", &[2], vec![1e19, 1.0])]);
        let mut cv = ControlVector::default();
        cv.add_file(&path, 1.0).unwrap();
        let e = cv.add_file(&path, 1.0).unwrap_err();
        let _ = std::fs::remove_file(&path);
        let e = e.to_string();
        assert!(
            e.contains("added to the vectors before it, has values up to 2e19"),
            "{e}"
        );
        assert!(e.contains("lower the strengths"), "{e}");
        // A [n, 1] tensor is one vector, as ggml counts dimensions.
        let path = vector_file("column", &[("direction.1", &[2, 1], vec![0.5, -1.0])]);
        let mut cv = ControlVector::default();
        cv.add_file(&path, 2.0).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(cv.layers, vec![vec![1.0, -2.0]]);
    }

    #[test]
    fn written_vectors_read_back() {
        let cv = ControlVector {
            n_embd: 3,
            layers: vec![vec![1.0, -2.0, 0.5], vec![], vec![0.25, 0.0, 3.0]],
        };
        let path = std::env::temp_dir().join(format!("gemma3-cv-{}.gguf", std::process::id()));
        cv.to_gguf("gemma3").write_to_path(&path).unwrap();
        let mut back = ControlVector::default();
        back.add_file(&path, 2.0).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(back.n_embd, 3);
        assert_eq!(
            back.layers,
            vec![vec![2.0, -4.0, 1.0], vec![], vec![0.5, 0.0, 6.0]]
        );
    }
}
