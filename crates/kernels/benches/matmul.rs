//! Kernel micro-benchmarks at Gemma 3 270M's real shapes (rows × cols of
//! each matrix, in the format the shipped Q4_K_M file stores it) and batch
//! sizes 1, 64 and 512, for every kernel table this CPU runs, row-major and
//! (for the layer matrices) in the interleaved layout the model uses.
//!
//! `cargo bench -p gemma3-kernels` (add `-- 'q8_0'` to filter). The other formats other
//! GGUFs of the model use (float exports, Q8_0/Q4_0/Q4_1/Q5_1, the IQ and remaining K-quants) are
//! benchmarked in their packed form at one FFN shape each (`other formats`), and every
//! quantized format at one token through a matrix too large for the caches (`streaming`).

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gemma3_kernels::formats::{BlockQ8K, BlockQ8_0, CodedFormat, QK, QK_K};
use gemma3_kernels::matmul::matmul_with;
use gemma3_kernels::packed::{matmul_packed, PackedMatrix};
use gemma3_kernels::quant::act_quantizers_available;
use gemma3_kernels::{simd, MatmulScratch, QMatrix, WeightFormat};

/// Deterministic pseudo-random activations in [-1, 1).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The bytes of a `rows × cols` matrix of pseudo-random weights in `format`
/// (the kernel tests' random blocks with finite scales: the byte patterns
/// exercise the same instructions as real weights).
fn weight_bytes(format: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    common::random_rows(&mut common::Rng::new(7), format, rows, cols)
}

/// One token through about 100 MB of packed weights per quantized format
/// (larger than the caches, so read from memory as in generation), on one
/// thread, with each SIMD kernel table: bytes per second, to set against a
/// plain read of memory (`gemma3 bench` measures one; two threads generate
/// on the model's spinning pool, which `gemma3 bench` measures too).
/// Generation is bound by this rate; a kernel that reads its blocks out of
/// address order loses the CPU's prefetchers and shows here (Q2_K and Q5_K
/// read 11 GB/s on one thread where the others read 26-32, until their
/// layouts were reordered).
fn bench_streaming(c: &mut Criterion) {
    // Every SIMD table: the one-token rate rides on how each table's code
    // reads memory (the AVX-512 table without GFNI read Q5_K at 8-10 GB/s
    // while the GFNI one read 28).
    let tables: Vec<_> = simd::available()
        .into_iter()
        .filter(|k| k.name != "scalar")
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let mut g = c.benchmark_group("streaming one token, 100 MB, one thread");
    g.sample_size(10);
    let quantized = WeightFormat::ALL.into_iter().filter(|f| {
        !matches!(
            f,
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16
        )
    });
    for format in quantized {
        let cols = if format.block_size() == QK_K {
            2048
        } else {
            640
        };
        let rows = (100 << 20) / format.row_bytes(cols) / 16 * 16;
        let bytes = weight_bytes(format, rows, cols);
        let w = QMatrix::new(format, rows, cols, &bytes).expect("shape");
        let p = PackedMatrix::pack(&w).expect("packable");
        p.collapse_huge_pages();
        let x = data(cols, 2);
        let mut out = vec![0.0f32; rows];
        let mut scratch = MatmulScratch::default();
        g.throughput(Throughput::Bytes(p.size_bytes() as u64));
        for k in &tables {
            g.bench_function(format!("{format} {}", k.name), |b| {
                pool.install(|| {
                    b.iter(|| matmul_packed(&k.packed, &p, &x, 1, &mut out, &mut scratch))
                })
            });
        }
    }
    g.finish();
}

/// The packed kernels of the formats the shipped file does not use, at one FFN shape each
/// (640→2048, or 2048→640 where the format's blocks are 256 wide), 1 and 512 tokens.
fn bench_other_formats(c: &mut Criterion) {
    let formats = [
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::F32,
        // All of a Q8_0 file's matrices (the Q4_K_M file's only at attn_v).
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_1,
        WeightFormat::IQ4NL,
        WeightFormat::IQ4XS,
        WeightFormat::Q3K,
        WeightFormat::Q5K,
        // One of each code table (the IQ2 and IQ1 types share theirs).
        WeightFormat::Coded(CodedFormat::Q2K),
        WeightFormat::Coded(CodedFormat::IQ3S),
        WeightFormat::Coded(CodedFormat::IQ3XXS),
        WeightFormat::Coded(CodedFormat::IQ2XXS),
        WeightFormat::Coded(CodedFormat::IQ1S),
        WeightFormat::Coded(CodedFormat::TQ2_0),
    ];
    for format in formats {
        let (rows, cols) = if format.block_size() == QK_K {
            (640, 2048)
        } else {
            (2048, 640)
        };
        let bytes = weight_bytes(format, rows, cols);
        let w = QMatrix::new(format, rows, cols, &bytes).expect("shape");
        let p = PackedMatrix::pack(&w).expect("packable");
        let mut g = c.benchmark_group(format!("other formats {format} {cols}→{rows}"));
        g.sample_size(10);
        for n in [1usize, 512] {
            let x = data(n * cols, 2);
            let mut out = vec![0.0f32; n * rows];
            let mut scratch = MatmulScratch::default();
            g.throughput(Throughput::Elements((n * rows * cols) as u64));
            for k in simd::available() {
                g.bench_with_input(
                    BenchmarkId::new(format!("packed {}", k.name), n),
                    &n,
                    |b, &n| b.iter(|| matmul_packed(&k.packed, &p, &x, n, &mut out, &mut scratch)),
                );
            }
        }
        g.finish();
    }
}

fn bench(c: &mut Criterion) {
    // (name, format, rows, cols): the shapes of one layer and the output head.
    let shapes = [
        ("attn_q 640→1024", WeightFormat::Q5_0, 1024, 640),
        ("attn_k 640→256", WeightFormat::Q5_0, 256, 640),
        ("attn_v 640→256", WeightFormat::Q8_0, 256, 640),
        ("attn_output 1024→640", WeightFormat::Q4K, 640, 1024),
        ("ffn_gate 640→2048", WeightFormat::Q5_0, 2048, 640),
        ("ffn_down 2048→640", WeightFormat::Q6K, 640, 2048),
        ("ffn_down 2048→640", WeightFormat::Q4K, 640, 2048),
        ("head 640→262144", WeightFormat::Q8_0, 262144, 640),
    ];
    for (name, format, rows, cols) in shapes {
        let bytes = weight_bytes(format, rows, cols);
        let w = QMatrix::new(format, rows, cols, &bytes).expect("shape");
        let mut g = c.benchmark_group(format!("{name} {format}"));
        g.sample_size(10);
        let batches: &[usize] = if rows > 100_000 {
            &[1, 2, 3, 4]
        } else {
            &[1, 2, 3, 16, 64, 512]
        };
        for &n in batches {
            let x = data(n * cols, 2);
            let mut out = vec![0.0f32; n * rows];
            let mut scratch = MatmulScratch::default();
            g.throughput(Throughput::Elements((n * rows * cols) as u64));
            for k in simd::available() {
                g.bench_with_input(BenchmarkId::new(k.name, n), &n, |b, &n| {
                    b.iter(|| matmul_with(&k, &w, &x, n, &mut out, &mut scratch))
                });
                // The interleaved layout the model uses for its layer matrices.
                if let Some(p) = PackedMatrix::pack(&w) {
                    g.bench_with_input(
                        BenchmarkId::new(format!("packed {}", k.name), n),
                        &n,
                        |b, &n| {
                            b.iter(|| matmul_packed(&k.packed, &p, &x, n, &mut out, &mut scratch))
                        },
                    );
                }
            }
        }
        g.finish();
    }
}

/// Activation quantization of a 512-token prompt: Q8_0 at the model width
/// (640), Q8_K at the FFN width (2048), for every quantizer set this CPU runs.
fn bench_quantize(c: &mut Criterion) {
    let mut g = c.benchmark_group("quantize activations 512 tokens");
    g.sample_size(20);
    let x = data(512 * 640, 3);
    let mut q8_0 = vec![BlockQ8_0::default(); x.len() / QK];
    g.throughput(Throughput::Elements(x.len() as u64));
    for k in act_quantizers_available() {
        g.bench_function(BenchmarkId::new("q8_0 ×640", k.name), |b| {
            b.iter(|| (k.q8_0)(&x, &mut q8_0))
        });
    }
    let x = data(512 * 2048, 4);
    let mut q8k = vec![BlockQ8K::default(); x.len() / QK_K];
    g.throughput(Throughput::Elements(x.len() as u64));
    for k in act_quantizers_available() {
        g.bench_function(BenchmarkId::new("q8_K ×2048", k.name), |b| {
            b.iter(|| (k.q8_k)(&x, &mut q8k))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_quantize,
    bench,
    bench_other_formats,
    bench_streaming
);
criterion_main!(benches);
