//! Shared helpers of the kernel tests: the gguf-py fixtures in `tests/data/` (see its
//! README.md for provenance), a seeded PRNG, random weight blocks and ggml's synthetic data.

#![allow(dead_code)]

use gemma3_kernels::formats::CodedFormat;
use gemma3_kernels::WeightFormat;
use half::{bf16, f16};
use std::path::PathBuf;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn read(name: &str) -> Vec<u8> {
    let p = data_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading fixture {}: {e}", p.display()))
}

pub fn read_f32(name: &str) -> Vec<f32> {
    let b = read(name);
    assert_eq!(b.len() % 4, 0, "{name}: not a whole number of f32");
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn format_from_name(s: &str) -> WeightFormat {
    match s {
        "F32" => WeightFormat::F32,
        "F16" => WeightFormat::F16,
        "BF16" => WeightFormat::BF16,
        "Q8_0" => WeightFormat::Q8_0,
        "Q4_0" => WeightFormat::Q4_0,
        "Q5_0" => WeightFormat::Q5_0,
        "Q4_1" => WeightFormat::Q4_1,
        "Q5_1" => WeightFormat::Q5_1,
        "IQ4_NL" => WeightFormat::IQ4NL,
        "IQ4_XS" => WeightFormat::IQ4XS,
        "Q3_K" => WeightFormat::Q3K,
        "Q4_K" => WeightFormat::Q4K,
        "Q5_K" => WeightFormat::Q5K,
        "Q6_K" => WeightFormat::Q6K,
        other => match CodedFormat::ALL.into_iter().find(|c| c.name() == other) {
            Some(c) => WeightFormat::Coded(c),
            None => panic!("unknown format {other} in the manifest"),
        },
    }
}

/// Rows of one format with gguf-py's dequantization of them.
pub struct DequantFixture {
    pub name: String,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub raw: Vec<u8>,
    /// rows × cols, from `gguf.quants.dequantize`.
    pub expected: Vec<f32>,
}

/// A synthetic input and gguf-py's quantization of it.
pub struct QuantFixture {
    pub format: WeightFormat,
    pub input: Vec<f32>,
    pub raw: Vec<u8>,
}

fn manifest() -> serde_json::Value {
    let text = String::from_utf8(read("manifest.json")).expect("manifest is UTF-8");
    serde_json::from_str(&text).expect("manifest.json parses")
}

pub fn dequant_fixtures() -> Vec<DequantFixture> {
    let m = manifest();
    let list = m["dequantize"].as_array().expect("dequantize list");
    list.iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_else(|| panic!("{k}")).to_string();
            let u = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
            let f = DequantFixture {
                name: s("name"),
                format: format_from_name(&s("format")),
                rows: u("rows"),
                cols: u("cols"),
                raw: read(&s("raw")),
                expected: read_f32(&s("f32")),
            };
            assert_eq!(
                f.raw.len(),
                f.rows * f.format.row_bytes(f.cols),
                "{}",
                f.name
            );
            assert_eq!(f.expected.len(), f.rows * f.cols, "{}", f.name);
            f
        })
        .collect()
}

pub fn quant_fixtures() -> Vec<QuantFixture> {
    let m = manifest();
    let list = m["quantize"].as_array().expect("quantize list");
    list.iter()
        .map(|e| QuantFixture {
            format: format_from_name(e["format"].as_str().unwrap()),
            input: read_f32(e["input"].as_str().unwrap()),
            raw: read(e["raw"].as_str().unwrap()),
        })
        .collect()
}

/// SplitMix64: a tiny seeded generator, so fixtures never shift with a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Byte offsets of the f16 scale fields in a block (ggml-common.h layouts).
pub fn scale_offsets(format: WeightFormat) -> &'static [usize] {
    match format {
        WeightFormat::Q8_0
        | WeightFormat::Q4_0
        | WeightFormat::Q5_0
        | WeightFormat::IQ4NL
        | WeightFormat::IQ4XS
        | WeightFormat::Coded(
            CodedFormat::IQ2XXS
            | CodedFormat::IQ2XS
            | CodedFormat::IQ2S
            | CodedFormat::IQ3XXS
            | CodedFormat::IQ3S
            | CodedFormat::IQ1S,
        ) => &[0],
        WeightFormat::Coded(CodedFormat::Q2K) => &[80, 82],
        WeightFormat::Coded(CodedFormat::TQ1_0) => &[52],
        WeightFormat::Coded(CodedFormat::TQ2_0) => &[64],
        WeightFormat::Q4_1 | WeightFormat::Q5_1 | WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        WeightFormat::Q6K => &[208],
        WeightFormat::Q3K => &[108],
        _ => &[],
    }
}

/// `rows` random rows of `cols` elements in `format`: random quant bytes with finite f16
/// scales (0.01–0.1 for the 32-element formats, 0.001–0.005 for K-quants, whose 6/8-bit
/// sub-block scales multiply d), or random floats in [-2, 2] for the float formats.
pub fn random_rows(rng: &mut Rng, format: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match format {
        WeightFormat::F32 => (0..n)
            .flat_map(|_| rng.range(-2.0, 2.0).to_le_bytes())
            .collect(),
        WeightFormat::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.range(-2.0, 2.0)).to_bits().to_le_bytes())
            .collect(),
        WeightFormat::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.range(-2.0, 2.0)).to_bits().to_le_bytes())
            .collect(),
        _ => {
            let bb = format.block_bytes();
            let mut out = rng.bytes(format.row_bytes(cols) * rows);
            let (lo, hi) = if format.block_size() == 32 {
                (0.01, 0.1)
            } else {
                (0.001, 0.005)
            };
            for block in out.chunks_exact_mut(bb) {
                for &off in scale_offsets(format) {
                    let d = f16::from_f32(rng.range(lo, hi)).to_bits().to_le_bytes();
                    block[off..off + 2].copy_from_slice(&d);
                }
                if format == WeightFormat::Coded(CodedFormat::IQ1M) {
                    // d's four nibbles are the top nibbles of the 4 u16 scale words at 48.
                    let d = f16::from_f32(rng.range(lo, hi)).to_bits();
                    for i in 0..4 {
                        let o = 48 + 2 * i + 1;
                        block[o] = (block[o] & 0x0F) | (((d >> (4 * i)) & 0x0F) as u8) << 4;
                    }
                }
            }
            out
        }
    }
}

/// ggml test-quantize-fns.cpp `generate_data`: `0.1 + amplitude·cosf(i + offset)`.
pub fn ggml_synthetic(offset: f32, n: usize, amplitude: f32) -> Vec<f32> {
    (0..n)
        .map(|i| 0.1 + amplitude * (i as f32 + offset).cos())
        .collect()
}

/// Random activations in [-2, 2].
pub fn random_acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(-2.0, 2.0)).collect()
}
