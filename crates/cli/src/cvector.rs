//! `gemma3 cvector-generate`: a control vector made from pairs of prompts, as
//! `llama-cvector-generator` makes one. Each positive prompt and its negative
//! twin run through the model; at every layer but the last, the difference of
//! their hidden states (the layer's output, one row per token, the shorter
//! prompt padded with a space token) is gathered, and the rows of all pairs
//! reduce to one unit direction per layer: their first principal direction
//! (`--method pca`, the default) or their mean (`--method mean`).
//!
//! Numbered as llama.cpp numbers them: `direction.N` is made from the output
//! of layer N − 1 (counting from 0) and, applied with `--control-vector`, is
//! added to the output of layer N, one layer later.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use gemma3_model::control::{DiffStats, Reduce};
use gemma3_model::{Batch, ControlVector, ForwardState, KvCache, Model, Output};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, ValueEnum)]
enum Method {
    /// The first principal direction of the differences (power iteration).
    Pca,
    /// The differences' mean.
    Mean,
}

#[derive(Args)]
pub struct CvectorArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    #[command(flatten)]
    lora: gemma3_server::LoraArgs,
    /// The positive prompts, one a line (blank lines skipped; `\n`, `\t`, `\\`,
    /// `\"`, `\'` and `\xHH` escapes read as llama.cpp reads them; the `\r` of a
    /// CRLF line end is not part of a prompt, where llama.cpp keeps it).
    #[arg(long, value_name = "FILE")]
    positive_file: PathBuf,
    /// The negative prompts, as many as the positive ones, paired line by line.
    #[arg(long, value_name = "FILE")]
    negative_file: PathBuf,
    /// The control vector's file: written whole to a new temporary file beside it, then
    /// renamed over it (an existing FILE must be a regular file, and not an input).
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "control_vector.gguf"
    )]
    output: PathBuf,
    /// How each layer's differences become one direction.
    #[arg(long, value_enum, default_value = "pca")]
    method: Method,
    /// Power iteration steps at most (pca).
    #[arg(long, default_value_t = 1000)]
    pca_iter: usize,
    /// llama.cpp's steps per graph (pca): taken and checked as llama.cpp checks it
    /// (--pca-iter a multiple of it), but convergence is checked at every step here, so it
    /// changes nothing else.
    #[arg(long, default_value_t = 100)]
    pca_batch: usize,
}

/// Most bytes a prompt file may hold.
const MAX_PROMPTS_BYTES: u64 = 16 << 20;
/// Most power iteration steps (a layer's step is 640² multiply-adds).
const MAX_PCA_ITER: usize = 1_000_000;

/// The prompts of a file: its non-empty lines, escapes processed.
fn read_prompts(path: &std::path::Path, what: &str) -> Result<Vec<String>> {
    let (text, name) =
        crate::generate::read_input(path, MAX_PROMPTS_BYTES, what, "use fewer prompts")?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let prompts: Vec<String> = (text.lines())
        .filter(|l| !l.is_empty())
        .map(gemma3_engine::process_escapes)
        .collect();
    if prompts.is_empty() {
        bail!("{name} holds no prompt (every line is empty)");
    }
    Ok(prompts)
}

/// The outputs of layers 0 to n_layers − 2 (the residual stream after each,
/// one row of `d_model` per token) for `ids` run from a fresh cache.
fn layer_outputs(model: &Model, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let keep = model.config.n_layers - 1;
    let seen: Arc<Mutex<Vec<Vec<f32>>>> = Arc::new(Mutex::new(vec![Vec::new(); keep]));
    let mut st = ForwardState::new();
    let sink = seen.clone();
    st.trace = Some(Box::new(move |l, name, v: &[f32]| {
        // (Micro-batches arrive in order: each appends its rows.)
        if name == "l_out" && l < keep {
            sink.lock().unwrap()[l].extend_from_slice(v);
        }
    }));
    let mut cache = KvCache::new(&model.config, ids.len());
    let mut batch = Batch::default();
    for (i, &t) in ids.iter().enumerate() {
        let out = if i + 1 == ids.len() {
            Output::Hidden
        } else {
            Output::None
        };
        batch.push_out(t, i, 0, out);
    }
    model.forward(&batch, std::slice::from_mut(&mut cache), &mut st)?;
    st.trace = None;
    let out = std::mem::take(&mut *seen.lock().unwrap());
    // (A NaN row would read as "no difference" and be left out of the
    // direction, which would then come from the other rows alone.)
    if !out.iter().all(|l| gemma3_engine::sampler::all_finite(l)) {
        bail!("{}", gemma3_engine::session::NON_FINITE_HIDDEN);
    }
    Ok(out)
}

pub fn run(a: CvectorArgs) -> Result<()> {
    let reduce = match a.method {
        Method::Mean => Reduce::Mean,
        Method::Pca => {
            if a.pca_batch == 0 || a.pca_iter == 0 || a.pca_iter > MAX_PCA_ITER {
                bail!("--pca-iter must be between 1 and {MAX_PCA_ITER} and --pca-batch at least 1");
            }
            if !a.pca_iter.is_multiple_of(a.pca_batch) {
                bail!(
                    "--pca-iter {} is not a multiple of --pca-batch {}",
                    a.pca_iter,
                    a.pca_batch
                );
            }
            Reduce::Pca {
                iterations: a.pca_iter,
            }
        }
    };
    let positive = read_prompts(&a.positive_file, "the positive prompts")?;
    let negative = read_prompts(&a.negative_file, "the negative prompts")?;
    if positive.len() != negative.len() {
        bail!(
            "{} positive prompts but {} negative ones: they pair line by line",
            positive.len(),
            negative.len()
        );
    }
    let path = crate::model_path::resolve(a.model.model.clone(), true)?;
    let lora = a.lora.specs()?;
    let inputs: Vec<(&str, &std::path::Path)> = [
        ("the model file", path.as_path()),
        ("the positive prompts", a.positive_file.as_path()),
        ("the negative prompts", a.negative_file.as_path()),
    ]
    .into_iter()
    .chain(lora.iter().map(|s| ("an adapter", s.path.as_path())))
    .collect();
    crate::write_gguf::check_output(&a.output, &inputs)?;
    let (model, tok) = crate::load(&path, &a.lora, &Default::default())?;
    let (layers, width) = (model.config.n_layers, model.config.d_model);
    if layers < 2 {
        bail!("the model has {layers} layer(s): a control vector needs two or more");
    }
    let ctx_len = model.config.ctx_len;
    // Each layer's difference rows, all pairs, summed as they come.
    let mut stats: Vec<DiffStats> = (1..layers).map(|_| DiffStats::new(width)).collect();
    let mut tokens = 0;
    for (i, (p, n)) in positive.iter().zip(&negative).enumerate() {
        // (The shorter padded with the space token, as llama.cpp pads it.)
        let (p, n) = gemma3_engine::cvector_pair(&tok, p, n);
        let len = p.len();
        if len > ctx_len {
            bail!(
                "pair {} has {len} tokens but the model's context holds {ctx_len}",
                i + 1
            );
        }
        tokens += 2 * len;
        let (hp, hn) = (layer_outputs(&model, &p)?, layer_outputs(&model, &n)?);
        for ((hp, hn), stats) in hp.iter().zip(&hn).zip(&mut stats) {
            let d: Vec<f32> = hp.iter().zip(hn).map(|(a, b)| a - b).collect();
            stats.add(&d);
        }
        eprintln!("pair {}/{}: {len} tokens each", i + 1, positive.len());
    }
    let mut cv = ControlVector {
        n_embd: width,
        layers: Vec::with_capacity(layers - 1),
    };
    let mut report = Vec::new();
    for (l, stats) in stats.iter_mut().enumerate() {
        let rows = stats.rows();
        if rows == 0 {
            bail!(
                "every positive prompt has the same hidden states as its negative twin at layer {l}: \
                 there is no difference to find a direction in"
            );
        }
        let dir = stats.direction(reduce);
        if !dir.converged {
            eprintln!(
                "warning: direction.{}: power iteration did not converge in {} steps (raise --pca-iter)",
                l + 1,
                dir.steps
            );
        }
        report.push(format!(
            "direction.{:<2} from layer {l:>2}'s output: {} rows, {:.1}% of their squared length along it",
            l + 1,
            rows,
            100.0 * dir.share
        ));
        cv.layers.push(dir.v);
    }
    let hint = model
        .file
        .get_str("general.architecture")
        .ok()
        .unwrap_or("gemma3")
        .to_string();
    let out = cv.to_gguf(&hint);
    crate::write_gguf::write_new(&out, &a.output, |tmp| {
        let mut back = ControlVector::default();
        back.add_file(tmp, 1.0)?;
        if back != cv {
            bail!("the written control vector does not read back as made");
        }
        Ok(())
    })?;
    for line in report {
        eprintln!("{line}");
    }
    outln!(
        "{}: {} directions (unit length) from {} prompt pairs ({tokens} tokens), by {}",
        a.output.display(),
        cv.layers.len(),
        positive.len(),
        match a.method {
            Method::Pca => "PCA",
            Method::Mean => "the mean",
        }
    )?;
    Ok(())
}
