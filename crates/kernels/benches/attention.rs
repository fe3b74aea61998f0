//! Micro-benchmarks of the f16 attention ops (`simd::F16Ops`) at Gemma 3
//! 270M's head width (256), one key block (16 keys) per call, for the tiles
//! the model uses: 16 query rows (a prefill tile: 4 tokens × 4 query heads),
//! 4 (one generated token on one thread) and 2 (its half on two threads).
//! Hot in cache: this measures the arithmetic, not the cache's stream.
//!
//! `cargo bench -p gemma3-kernels --bench attention` (add `-- 'rows 16'` to filter).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gemma3_kernels::simd::{f16_available, KEY_BLOCK};
use half::f16;

const HD: usize = 256;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32
                - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let kt: Vec<f16> = data(HD * KEY_BLOCK, 1)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    // Value rows as the cache holds them: one KV head's rows, kv_dim apart.
    let v: Vec<f16> = data(KEY_BLOCK * HD, 2)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let offs: Vec<usize> = (0..KEY_BLOCK).map(|j| j * HD).collect();
    for rows in [16, 4, 2] {
        let mut g = c.benchmark_group(format!("attention rows {rows} hd {HD}"));
        // Multiply-adds per call: rows × hd × 16 keys.
        g.throughput(Throughput::Elements((rows * HD * KEY_BLOCK) as u64));
        let q = data(rows * HD, 3);
        let mut s = data(rows * KEY_BLOCK, 4);
        let mut acc = vec![0.0f32; rows * HD];
        for ops in f16_available() {
            g.bench_function(BenchmarkId::new("q·k", ops.name), |b| {
                b.iter(|| (ops.qk)(&q, &kt, &mut s, 0))
            });
            g.bench_function(BenchmarkId::new("p·v", ops.name), |b| {
                b.iter(|| (ops.pv)(&mut acc, &s, &v, &offs, HD, 0))
            });
        }
        g.finish();
    }
    let mut g = c.benchmark_group("attention exp_sub 16 scores");
    g.throughput(Throughput::Elements(KEY_BLOCK as u64));
    let mut s = data(KEY_BLOCK, 5);
    for ops in f16_available() {
        g.bench_function(ops.name, |b| {
            b.iter(|| {
                (ops.exp_sub)(&mut s, 1.0);
                s.iter_mut().for_each(|x| *x -= 0.5);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
