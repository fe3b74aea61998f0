//! Dequantization and weight quantization against an independent implementation of the ggml
//! block formats: the Python `gguf` package 0.19.0 (`gguf.quants`), through the fixtures in
//! `tests/data/` (provenance in its README.md and manifest.json; regenerate with
//! `python3 scripts/make_kernel_fixtures.py`).
//!
//! Both sides compute `f16 scale × small integer` (K-quants: `d·sc·q − dmin·m`) with the same
//! f32 operations, so the values must agree exactly, not merely closely.

mod common;

use common::{dequant_fixtures, quant_fixtures};
use gemma3_kernels::quant::{
    dequantize_row, encode_float_weights, quantize_weights_q4_0, quantize_weights_q5_0,
    quantize_weights_q8_0,
};
use gemma3_kernels::{QMatrix, WeightFormat};

#[test]
fn dequantize_row_equals_gguf_py() {
    let fixtures = dequant_fixtures();
    // Every format the engine supports appears at least once (real rows or random blocks).
    for f in WeightFormat::ALL {
        if f != WeightFormat::F32 {
            assert!(
                fixtures.iter().any(|x| x.format == f),
                "no fixture for {f}: regenerate tests/data"
            );
        }
    }
    for fx in &fixtures {
        let rb = fx.format.row_bytes(fx.cols);
        for r in 0..fx.rows {
            let mut out = vec![f32::NAN; fx.cols];
            dequantize_row(fx.format, &fx.raw[r * rb..(r + 1) * rb], &mut out);
            let want = &fx.expected[r * fx.cols..(r + 1) * fx.cols];
            for (i, (&got, &exp)) in out.iter().zip(want).enumerate() {
                assert!(
                    got == exp,
                    "{} ({}) row {r} element {i}: ours {got:e}, gguf-py {exp:e}",
                    fx.name,
                    fx.format
                );
            }
        }
        // The matrix view reads the same rows.
        let m = QMatrix::new(fx.format, fx.rows, fx.cols, &fx.raw).expect("valid matrix");
        let mut out = vec![0.0; fx.cols];
        m.dequantize_row(fx.rows - 1, &mut out);
        assert_eq!(
            out.as_slice(),
            &fx.expected[(fx.rows - 1) * fx.cols..],
            "{} via QMatrix",
            fx.name
        );
    }
}

#[test]
fn weight_quantizers_equal_gguf_py_bit_for_bit() {
    // gguf-py's Q8_0/Q4_0/Q5_0 quantizers port ggml's quantize_row_*_ref; F16 is numpy's
    // round-to-nearest-even and BF16 ggml_compute_fp32_to_bf16 (also nearest-even).
    let fixtures = quant_fixtures();
    assert_eq!(fixtures.len(), 5);
    for fx in &fixtures {
        let ours = match fx.format {
            WeightFormat::Q8_0 => quantize_weights_q8_0(&fx.input),
            WeightFormat::Q4_0 => quantize_weights_q4_0(&fx.input),
            WeightFormat::Q5_0 => quantize_weights_q5_0(&fx.input),
            f @ (WeightFormat::F16 | WeightFormat::BF16) => {
                encode_float_weights(f, &fx.input).expect("float format")
            }
            f => panic!("unexpected quantize fixture format {f}"),
        };
        assert_eq!(ours.len(), fx.raw.len(), "{}: byte length", fx.format);
        let bb = fx.format.block_bytes();
        for (b, (x, y)) in ours.chunks(bb).zip(fx.raw.chunks(bb)).enumerate() {
            assert_eq!(
                x,
                y,
                "{}: block {b} differs from gguf-py (input {:?})",
                fx.format,
                &fx.input[b * fx.format.block_size()..(b + 1) * fx.format.block_size()]
            );
        }
    }
}

#[test]
fn float_formats_round_trip() {
    // F32 is stored as is; dequantizing what encode_float_weights wrote gives the input back
    // (F32) or the input rounded to the format (checked against gguf-py above).
    let x: Vec<f32> = common::ggml_synthetic(0.0, 257, 2.0);
    let bytes = encode_float_weights(WeightFormat::F32, &x).unwrap();
    let mut out = vec![0.0; x.len()];
    dequantize_row(WeightFormat::F32, &bytes, &mut out);
    assert_eq!(out, x);
    assert!(encode_float_weights(WeightFormat::Q8_0, &x).is_none());
}
