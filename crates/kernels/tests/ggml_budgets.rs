//! ggml's published accuracy budgets for quantization and quantized dot products, on ggml's
//! own synthetic data, for every kernel table this machine can run.
//!
//! ref: llama.cpp tests/test-quantize-fns.cpp (ggml-org/llama.cpp), which defines
//! ```text
//! MAX_QUANTIZATION_TOTAL_ERROR       = 0.002   (every type not listed below: Q8_0, Q4_0, Q5_0, F16, BF16, Q4_K, Q5_K, Q6_K …)
//! MAX_QUANTIZATION_TOTAL_ERROR_3BITS = 0.0040  (Q3_K, IQ3_S only)
//! MAX_DOT_PRODUCT_ERROR              = 0.02    (every type above)
//! generate_data(offset, n) = 0.1 + 2·cosf(i + offset)      (test size 32·128 = 4096)
//! array_rmse(a, b)         = sqrt(Σ (a−b)²) / n            (sic: divided by n, not √n)
//! dot_product_error        = |vec_dot(q(x1), q8(x2)) − Σ x1·x2| / n
//! ```
//! and the nrc = 2 variant with `generate_data(3, n, 1.0)` and `generate_data(4, n, 1.5)`.
//! The formulas are reproduced here exactly; because the RMSE is divided by n, the budgets
//! only mean what ggml means at its test size, so the odd block counts used below (129 and 17
//! blocks) stay close to 4096 elements.

mod common;

use common::{ggml_synthetic, random_rows, Rng};
use gemma3_kernels::quant::{
    dequantize_row, encode_float_weights, quantize_weights_q4_0, quantize_weights_q5_0,
    quantize_weights_q8_0,
};
use gemma3_kernels::simd::available;
use gemma3_kernels::{matmul::matmul_with, MatmulScratch, QMatrix, WeightFormat};

const MAX_QUANTIZATION_TOTAL_ERROR: f32 = 0.002;
const MAX_DOT_PRODUCT_ERROR: f32 = 0.02;

/// ggml's test size (32·128) and an odd number of blocks of either block size near it.
const SIZES_LEGACY: [usize; 2] = [32 * 128, 32 * 129];
const SIZES_K: [usize; 2] = [256 * 16, 256 * 17];

/// ggml `array_rmse`.
fn ggml_rmse(a: &[f32], b: &[f32]) -> f32 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum();
    (sum.sqrt() as f32) / a.len() as f32
}

/// ggml `dot_product`: f32 products accumulated in f64.
fn ggml_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| (x * y) as f64).sum::<f64>() as f32
}

/// The weight quantizers we have (ggml `from_float` for these types).
fn quantize(format: WeightFormat, x: &[f32]) -> Vec<u8> {
    match format {
        WeightFormat::Q8_0 => quantize_weights_q8_0(x),
        WeightFormat::Q4_0 => quantize_weights_q4_0(x),
        WeightFormat::Q5_0 => quantize_weights_q5_0(x),
        f => encode_float_weights(f, x).expect("float format"),
    }
}

const QUANTIZABLE: [WeightFormat; 5] = [
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q5_0,
    WeightFormat::F16,
    WeightFormat::BF16,
];

#[test]
fn quantization_error_within_ggml_budget() {
    for format in QUANTIZABLE {
        for n in SIZES_LEGACY {
            let x = ggml_synthetic(0.0, n, 2.0);
            let q = quantize(format, &x);
            assert_eq!(q.len(), format.row_bytes(n));
            let mut back = vec![0.0; n];
            dequantize_row(format, &q, &mut back);
            let err = ggml_rmse(&x, &back);
            eprintln!("{format:>5} n={n}: quantization error {err:.6} (budget {MAX_QUANTIZATION_TOTAL_ERROR})");
            assert!(
                err < MAX_QUANTIZATION_TOTAL_ERROR,
                "{format} n={n}: quantization error {err} ≥ ggml's {MAX_QUANTIZATION_TOTAL_ERROR}"
            );
        }
    }
}

/// `out[t][r]` for weights `w` (rows × n) and activations `x` (tokens × n) with table `k`.
fn run(
    k: &gemma3_kernels::simd::DotKernels,
    format: WeightFormat,
    rows: usize,
    n: usize,
    w: &[u8],
    x: &[f32],
) -> Vec<f32> {
    let m = QMatrix::new(format, rows, n, w).expect("valid matrix");
    let tokens = x.len() / n;
    let mut out = vec![f32::NAN; tokens * rows];
    matmul_with(k, &m, x, tokens, &mut out, &mut MatmulScratch::default());
    out
}

#[test]
fn dot_product_error_within_ggml_budget() {
    for format in QUANTIZABLE {
        for n in SIZES_LEGACY {
            // Rows: q(data1), q(data3); tokens: data2, data4 (ggml's nrc = 1 and nrc = 2 cases).
            let x1 = ggml_synthetic(0.0, n, 2.0);
            let x2 = ggml_synthetic(1.0, n, 2.0);
            let x3 = ggml_synthetic(3.0, n, 1.0);
            let x4 = ggml_synthetic(4.0, n, 1.5);
            let mut w = quantize(format, &x1);
            w.extend(quantize(format, &x3));
            let acts: Vec<f32> = x2.iter().chain(&x4).copied().collect();
            let refs = [
                ggml_dot(&x1, &x2),
                ggml_dot(&x3, &x2),
                ggml_dot(&x1, &x4),
                ggml_dot(&x3, &x4),
            ];
            for k in available() {
                let out = run(&k, format, 2, n, &w, &acts);
                for (i, (&got, &want)) in out.iter().zip(&refs).enumerate() {
                    let err = (got - want).abs() / n as f32;
                    assert!(
                        err < MAX_DOT_PRODUCT_ERROR,
                        "{format} n={n} [{}] dot {i}: {got} vs f32 dot {want}: error {err} ≥ ggml's {MAX_DOT_PRODUCT_ERROR}",
                        k.name
                    );
                }
                let err = (out[0] - refs[0]).abs() / n as f32;
                eprintln!("{format:>5} n={n} [{}]: dot product error {err:.6}", k.name);
            }
        }
    }
}

/// K-quants: we have no quantizer, so the weights are K-quant rows (random blocks, and the
/// real rows of the fixtures) and their exact values are our dequantization (checked against
/// gguf-py bit for bit in reference_formats.rs). What remains is the error of the 8-bit
/// activations (block_q8_K), held to the same ggml budget.
#[test]
fn kquant_dot_product_error_within_ggml_budget() {
    let mut rng = Rng::new(0x6b71_7561_6e74);
    let mut cases: Vec<(String, WeightFormat, usize, Vec<u8>)> = Vec::new();
    for format in [WeightFormat::Q4K, WeightFormat::Q5K, WeightFormat::Q6K] {
        for n in SIZES_K {
            let w = random_rows(&mut rng, format, 2, n);
            cases.push((format!("random {format}"), format, n, w));
        }
    }
    for fx in common::dequant_fixtures() {
        if fx.format.block_size() == 256 {
            cases.push((fx.name.clone(), fx.format, fx.cols, fx.raw.clone()));
        }
    }
    assert!(cases.len() >= 6 + 5);
    for (name, format, n, w) in cases {
        let rows = w.len() / format.row_bytes(n);
        let mut exact = vec![0.0f32; rows * n];
        for r in 0..rows {
            let rb = format.row_bytes(n);
            dequantize_row(
                format,
                &w[r * rb..(r + 1) * rb],
                &mut exact[r * n..(r + 1) * n],
            );
        }
        let x2 = ggml_synthetic(1.0, n, 2.0);
        let x4 = ggml_synthetic(4.0, n, 1.5);
        let acts: Vec<f32> = x2.iter().chain(&x4).copied().collect();
        for k in available() {
            let out = run(&k, format, rows, n, &w, &acts);
            for t in 0..2 {
                for r in 0..rows {
                    let want = ggml_dot(&exact[r * n..(r + 1) * n], &acts[t * n..(t + 1) * n]);
                    let got = out[t * rows + r];
                    let err = (got - want).abs() / n as f32;
                    assert!(
                        err < MAX_DOT_PRODUCT_ERROR,
                        "{name} n={n} [{}] row {r} token {t}: {got} vs f32 dot {want}: error {err} ≥ ggml's {MAX_DOT_PRODUCT_ERROR}",
                        k.name
                    );
                }
            }
            let err = (out[0] - ggml_dot(&exact[..n], &acts[..n])).abs() / n as f32;
            eprintln!("{name:>14} n={n} [{}]: dot product error {err:.6}", k.name);
        }
    }
}

/// ggml's f32 `vec_dot` check (test_vec_dot_f32): odd lengths, error / n below
/// MAX_QUANTIZATION_REFERENCE_ERROR = 0.0001, here through the F32 weight format's matmul.
#[test]
fn f32_dot_within_ggml_reference_budget() {
    const MAX_QUANTIZATION_REFERENCE_ERROR: f32 = 0.0001;
    for n in [
        1usize, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 67, 127, 129, 193, 255, 1023,
    ] {
        let a = ggml_synthetic(0.0, n, 2.0);
        let b = ggml_synthetic(1.0, n, 2.0);
        let w = encode_float_weights(WeightFormat::F32, &a).unwrap();
        for k in available() {
            let got = run(&k, WeightFormat::F32, 1, n, &w, &b)[0];
            let want = ggml_dot(&a, &b);
            let err = (got - want).abs() / n as f32;
            assert!(
                err < MAX_QUANTIZATION_REFERENCE_ERROR,
                "F32 n={n} [{}]: {got} vs {want}",
                k.name
            );
        }
    }
}
