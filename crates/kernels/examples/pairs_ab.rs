//! The AVX-512 prompt kernels with one group a pass and with pairs of
//! groups (the `avx512-vnni-gfni` and `avx512-vnni-gfni-pairs` tables, or
//! the two without GFNI), in turn in one process, at the model's shapes and
//! 512 tokens (`N=64` for another count): `RAYON_NUM_THREADS=1 cargo run
//! --release -p gemma3-kernels --example pairs_ab [name filter]`. The bits
//! must match. (The weights stay in cache here, unlike in the model.)

#[path = "../tests/common/mod.rs"]
mod common;
use gemma3_kernels::packed::{matmul_packed, PackedMatrix};
use gemma3_kernels::{simd, MatmulScratch, QMatrix, WeightFormat};
use std::time::Instant;

fn main() {
    // The GFNI tables where the CPU has them (their Q6_K and stored Q5_0
    // go in pairs only there).
    let tables = simd::available();
    let find = |name: &str| tables.iter().find(|k| k.name == name);
    let (one, pairs) = match (find("avx512-vnni-gfni"), find("avx512-vnni-gfni-pairs")) {
        (Some(a), Some(b)) => (a, b),
        _ => (
            find("avx512-vnni").expect("an AVX-512 table"),
            find("avx512-vnni-pairs").expect("an AVX-512 table"),
        ),
    };
    let n: usize = std::env::var("N").map_or(512, |v| v.parse().unwrap());
    for (name, format, rows, cols) in [
        ("ffn_gate", WeightFormat::Q5_0, 2048, 640),
        ("attn_q", WeightFormat::Q5_0, 1024, 640),
        ("attn_v q8", WeightFormat::Q8_0, 256, 640),
        ("attn_output q4k", WeightFormat::Q4K, 640, 1024),
        ("ffn_down q4k", WeightFormat::Q4K, 640, 2048),
        ("ffn_down q6k", WeightFormat::Q6K, 640, 2048),
    ] {
        if std::env::args().nth(1).is_some_and(|f| !name.contains(&f)) {
            continue;
        }
        let bytes = common::random_rows(&mut common::Rng::new(7), format, rows, cols);
        let w = QMatrix::new(format, rows, cols, &bytes).unwrap();
        let p = PackedMatrix::pack(&w).unwrap();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7919 % 2001) as f32 / 1000.0) - 1.0)
            .collect();
        let mut out = vec![0.0f32; n * rows];
        let mut out2 = vec![0.0f32; n * rows];
        let mut scratch = MatmulScratch::default();
        let mut best = [f64::MAX; 2];
        let mut sum = [0.0f64; 2];
        let rounds = 40;
        for r in 0..rounds {
            for (i, k) in [(0, one), (1, pairs)] {
                let o = if i == 1 { &mut out2 } else { &mut out };
                let t = Instant::now();
                matmul_packed(&k.packed, &p, &x, n, o, &mut scratch);
                let e = t.elapsed().as_secs_f64();
                if r > 0 {
                    best[i] = best[i].min(e);
                    sum[i] += e;
                }
            }
        }
        assert!(
            out.iter()
                .zip(&out2)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "bits differ"
        );
        let macs = (n * rows * cols) as f64;
        println!(
            "{name}: one group best {:.1} G/s mean {:.1}; pairs best {:.1} mean {:.1}",
            macs / best[0] / 1e9,
            macs / (sum[0] / (rounds - 1) as f64) / 1e9,
            macs / best[1] / 1e9,
            macs / (sum[1] / (rounds - 1) as f64) / 1e9
        );
    }
}
