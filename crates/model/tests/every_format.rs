//! The whole forward pass with its matrices in each weight format the engine supports, against
//! the plain f64 reference (`common/reference.rs`) run on the same weights dequantized.
//!
//! A tiny Gemma 3 256 wide (so that the 256-element formats fit every matrix: d_model, the
//! query width and d_ff are 256), with every matrix, the embedding and tied head included,
//! stored as random blocks of one format whose f16 scale is set so that the weights have the
//! F32 model's spread. The reference reads the dequantization of those blocks (checked against
//! gguf-py bit for bit in the kernel tests), so what is tested here is the rest: that a format's
//! tensors load as that format, pack (the layer matrices) or stay row-major (the 300-row head),
//! take the activations their kernels expect, and that the embedding rows dequantize.
//!
//! Tolerance, relative to a position's largest |logit|: the quantized formats' kernels
//! multiply 8-bit activations (as ggml does), which on these untrained random weights moves
//! the logits by up to 5.8% (max) and 1.8% (rms, Q6_K; 0.06–1.8% over the formats, measured);
//! the float formats' kernels take f32 activations and agree to 4.4e-4 / 1.4e-4. The results
//! are the same bits on every machine and thread count, so the bounds sit close above what
//! was measured: 8% / 2.5% and 2e-3 / 6e-4. Errors they catch: dropping the IQ2 table's 2^-3
//! (34% / 7.5%), counting Q2_K's minimum term twice (17% / 4.8%).

mod common;

use common::compare;
use common::reference::Reference;
use common::tiny::{tiny_metadata, tiny_weights, Rng, TinySpec};
use gemma3_gguf::{GgmlType, GgufFile, GgufWriter};
use gemma3_kernels::formats::CodedFormat;
use gemma3_kernels::quant::dequantize_row;
use gemma3_kernels::WeightFormat;
use gemma3_model::{Batch, ForwardState, KvCache, Model};
use half::f16;

/// Byte offsets of the f16 scales that multiply every value of a block (d, and dmin where
/// there is one); IQ1_M spreads its d over the top nibbles of its 4 scale words instead.
fn scale_offsets(f: WeightFormat) -> &'static [usize] {
    match f {
        WeightFormat::Q4_1 | WeightFormat::Q5_1 | WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        WeightFormat::Q3K => &[108],
        WeightFormat::Q6K => &[208],
        WeightFormat::Coded(CodedFormat::Q2K) => &[80, 82],
        WeightFormat::Coded(CodedFormat::TQ1_0) => &[52],
        WeightFormat::Coded(CodedFormat::TQ2_0) => &[64],
        WeightFormat::Coded(CodedFormat::IQ1M) => &[],
        _ => &[0],
    }
}

fn set_scale(f: WeightFormat, block: &mut [u8], d: f16) {
    let bits = d.to_bits();
    for &o in scale_offsets(f) {
        block[o..o + 2].copy_from_slice(&bits.to_le_bytes());
    }
    if f == WeightFormat::Coded(CodedFormat::IQ1M) {
        for i in 0..4 {
            let o = 49 + 2 * i;
            block[o] = (block[o] & 0x0F) | (((bits >> (4 * i)) & 0x0F) as u8) << 4;
        }
    }
}

/// `rows` × `cols` of `f`: random values in ±`a` for the float formats, else random blocks
/// with every block's scale set to one d chosen so that the rms is about `a` / √3 (that of
/// uniform ±a). Returns the bytes and their dequantization.
fn random_matrix(
    rng: &mut Rng,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    a: f32,
) -> (Vec<u8>, Vec<f32>) {
    let n = rows * cols;
    let dequant = |bytes: &[u8]| {
        let mut out = vec![0.0f32; n];
        let rb = f.row_bytes(cols);
        for (r, o) in out.chunks_exact_mut(cols).enumerate() {
            dequantize_row(f, &bytes[r * rb..(r + 1) * rb], o);
        }
        out
    };
    let mut bytes: Vec<u8> = match f {
        WeightFormat::F32 => (0..n)
            .flat_map(|_| rng.range(-a, a).to_le_bytes())
            .collect(),
        WeightFormat::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.range(-a, a)).to_bits().to_le_bytes())
            .collect(),
        WeightFormat::BF16 => (0..n)
            .flat_map(|_| {
                half::bf16::from_f32(rng.range(-a, a))
                    .to_bits()
                    .to_le_bytes()
            })
            .collect(),
        _ => (0..f.row_bytes(cols) * rows)
            .map(|_| rng.next_u64() as u8)
            .collect(),
    };
    if f.block_size() > 1 {
        let bb = f.block_bytes();
        let with_d = |bytes: &mut Vec<u8>, d: f32| {
            for blk in bytes.chunks_exact_mut(bb) {
                set_scale(f, blk, f16::from_f32(d));
            }
        };
        with_d(&mut bytes, 1.0);
        let v = dequant(&bytes);
        let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
        with_d(&mut bytes, (a as f64 / 3f64.sqrt() / rms) as f32);
    }
    let v = dequant(&bytes);
    (bytes, v)
}

fn ggml_type(f: WeightFormat) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == f.name())
        .expect("a ggml type of that name")
}

#[test]
fn every_format_runs_the_model_as_its_dequantized_weights() {
    let spec = TinySpec {
        d_model: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        d_ff: 256,
        n_layers: 6,
        ..TinySpec::default()
    };
    let mut rng = Rng::new(0x666f_726d);
    let toks: Vec<u32> = (0..24).map(|_| rng.below(spec.vocab) as u32).collect();
    let mut report = Vec::new();
    for f in WeightFormat::ALL {
        let mut weights = tiny_weights(&spec);
        let mut w = GgufWriter::new();
        tiny_metadata(&mut w, &spec, "gemma3");
        for (name, t) in weights.iter_mut() {
            let (ty, bytes) = if t.dims.len() == 2 {
                let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
                let a = (3.0 / cols as f32).sqrt();
                let (bytes, values) = random_matrix(&mut rng, f, rows, cols, a);
                t.data = values;
                (ggml_type(f), bytes)
            } else {
                let b = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (GgmlType::F32, b)
            };
            w.add_tensor(name, &t.dims, ty, bytes)
                .expect("valid tensor");
        }
        let m = Model::from_gguf(GgufFile::from_bytes(w.to_bytes()).expect("parses"))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.layers[0].w_down.format, f);
        let mut cache = KvCache::new(&m.config, 64);
        let mut st = ForwardState::new();
        let ours = m
            .forward(
                &Batch::for_sequence(&toks, 0, true),
                std::slice::from_mut(&mut cache),
                &mut st,
            )
            .expect("forward")
            .to_vec();
        let reference = Reference {
            spec: &spec,
            w: &weights,
            ggml_rounding: true,
        }
        .logits(&toks);
        let positions: Vec<usize> = (0..toks.len()).collect();
        let (max, rms) = compare(&ours, &reference, spec.vocab, &positions);
        report.push(format!("{f}: max {max:.2e}, rms {rms:.2e}"));
        let (tol_max, tol_rms) = if f.block_size() == 1 {
            (2e-3, 6e-4)
        } else {
            (8e-2, 2.5e-2)
        };
        assert!(
            max < tol_max && rms < tol_rms,
            "{f}: logits differ from the reference on its dequantized weights: max {max:e}, \
             rms {rms:e}\n{}",
            report.join("\n")
        );
    }
    eprintln!("{}", report.join("\n"));
}
