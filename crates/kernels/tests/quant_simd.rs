//! Every activation quantizer this CPU runs (and the dispatched
//! `quantize_q8_0` / `quantize_q8_k`) gives the scalar references' bytes,
//! bit for bit: random rows of 1..=64 blocks at many magnitudes, and the
//! edge cases of scale and rounding (zeros, signed zeros, outliers, tiny and
//! subnormal values, exact halves, ±max ties, infinities and NaN).

mod common;

use common::Rng;
use gemma3_kernels::formats::{BlockQ8K, BlockQ8_0, QK, QK_K};
use gemma3_kernels::quant::{
    act_quantizers, act_quantizers_available, quantize_q8_0, quantize_q8_0_ref, quantize_q8_k,
    quantize_q8_k_ref, ActQuantizers,
};

fn q8_0_bytes(b: &[BlockQ8_0]) -> Vec<u8> {
    b.iter()
        .flat_map(|b| b.d.into_iter().chain(b.qs.iter().map(|&q| q as u8)))
        .collect()
}

fn q8_k_bytes(b: &[BlockQ8K]) -> Vec<u8> {
    b.iter()
        .flat_map(|b| {
            b.d.to_bits()
                .to_le_bytes()
                .into_iter()
                .chain(b.qs.iter().map(|&q| q as u8))
                .chain(b.bsums.iter().flat_map(|s| s.to_le_bytes()))
        })
        .collect()
}

/// Output blocks full of junk, so that a field left unwritten shows.
fn junk_q8_0(n: usize) -> Vec<BlockQ8_0> {
    vec![
        BlockQ8_0 {
            d: [0xA5, 0x5A],
            qs: [0x33; QK],
        };
        n
    ]
}

fn junk_q8_k(n: usize) -> Vec<BlockQ8K> {
    vec![
        BlockQ8K {
            d: f32::from_bits(0x7FC1_2345),
            qs: [-0x33; QK_K],
            bsums: [0x1234; QK_K / 16],
        };
        n
    ]
}

/// Every quantizer table (each must match the reference on its own) and the
/// dispatched entry points.
fn check(x: &[f32], what: &str) {
    let tables = act_quantizers_available();
    if x.len().is_multiple_of(QK) {
        let n = x.len() / QK;
        let mut want = junk_q8_0(n);
        quantize_q8_0_ref(x, &mut want);
        let want = q8_0_bytes(&want);
        let run = |name: &str, f: fn(&[f32], &mut [BlockQ8_0])| {
            let mut got = junk_q8_0(n);
            f(x, &mut got);
            let got = q8_0_bytes(&got);
            if got != want {
                let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "q8_0 {name} differs from the reference on {what} ({n} blocks): \
                     first at byte {i} (block {}), got {} want {}",
                    i / 34,
                    got[i],
                    want[i]
                );
            }
        };
        for t in &tables {
            run(t.name, t.q8_0);
        }
        run("dispatched", quantize_q8_0);
    }
    if x.len().is_multiple_of(QK_K) {
        let n = x.len() / QK_K;
        let mut want = junk_q8_k(n);
        quantize_q8_k_ref(x, &mut want);
        let want = q8_k_bytes(&want);
        let run = |name: &str, f: fn(&[f32], &mut [BlockQ8K])| {
            let mut got = junk_q8_k(n);
            f(x, &mut got);
            let got = q8_k_bytes(&got);
            if got != want {
                let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "q8_K {name} differs from the reference on {what} ({n} blocks): \
                     first at byte {i} (block {}, offset {}), got {} want {}",
                    i / 292,
                    i % 292,
                    got[i],
                    want[i]
                );
            }
        };
        for t in &tables {
            run(t.name, t.q8_k);
        }
        run("dispatched", quantize_q8_k);
    }
}

/// A random value at a random scale: mostly unit-range, some blocks tiny or
/// huge, occasional outliers.
fn random_row(rng: &mut Rng, n: usize) -> Vec<f32> {
    let scale = match rng.next_u64() % 8 {
        0 => 1e-30,
        1 => 1e30,
        2 => 1e-3,
        3 => 1e3,
        _ => 1.0,
    };
    (0..n)
        .map(|_| {
            let v = rng.range(-1.0, 1.0) * scale;
            match rng.next_u64() % 64 {
                0 => v * 1000.0,
                1 => 0.0,
                2 => -0.0,
                _ => v,
            }
        })
        .collect()
}

#[test]
fn tables_listed_and_dispatch_picks_one() {
    let tables = act_quantizers_available();
    assert_eq!(tables[0].name, "scalar");
    let names: Vec<&str> = tables.iter().map(|t: &ActQuantizers| t.name).collect();
    eprintln!(
        "activation quantizers on this CPU: {names:?}, dispatched: {}",
        act_quantizers().name
    );
    assert!(names.contains(&act_quantizers().name));
}

#[test]
fn random_rows_match_reference() {
    let mut rng = Rng::new(0x51_4D_D0_0D);
    for nblocks in 1..=64 {
        for rep in 0..4 {
            let x = random_row(&mut rng, nblocks * QK);
            check(&x, &format!("random q8_0 row {nblocks}/{rep}"));
        }
        for rep in 0..2 {
            let x = random_row(&mut rng, nblocks * QK_K);
            check(&x, &format!("random q8_K row {nblocks}/{rep}"));
        }
    }
}

#[test]
fn bit_patterns_match_reference() {
    // Random f32 bit patterns (finite): every exponent, subnormals included.
    let mut rng = Rng::new(7);
    for rep in 0..200 {
        let x: Vec<f32> = (0..QK_K * 2)
            .map(|_| loop {
                let v = f32::from_bits(rng.next_u64() as u32);
                if v.is_finite() {
                    break v;
                }
            })
            .collect();
        check(&x, &format!("bit patterns {rep}"));
        // The same with the exponent range of one block narrowed.
        let e = (rng.next_u64() % 250) as i32 - 125;
        let y: Vec<f32> = x
            .iter()
            .map(|v| f32::from_bits(v.to_bits() & 0x807F_FFFF | (((e + 127) as u32) << 23)))
            .collect();
        check(&y, &format!("bit patterns, exponent {e}, {rep}"));
    }
}

/// One Q8_K-sized row (8 Q8_0 blocks) of `f(i)`.
fn row(f: impl Fn(usize) -> f32) -> Vec<f32> {
    (0..QK_K).map(f).collect()
}

#[test]
fn edge_cases_match_reference() {
    let mut rng = Rng::new(99);
    let base: Vec<f32> = (0..QK_K).map(|_| rng.range(-1.0, 1.0)).collect();
    let cases: Vec<(&str, Vec<f32>)> = vec![
        ("zeros", vec![0.0; QK_K]),
        ("negative zeros", vec![-0.0; QK_K]),
        (
            "mixed signed zeros",
            row(|i| if i % 3 == 0 { -0.0 } else { 0.0 }),
        ),
        (
            "one huge outlier",
            row(|i| if i == 77 { 3e38 } else { base[i] }),
        ),
        (
            "one huge negative outlier",
            row(|i| if i == 200 { -f32::MAX } else { base[i] }),
        ),
        ("all f32::MAX", vec![f32::MAX; QK_K]),
        ("tiny 1e-30", row(|i| base[i] * 1e-30)),
        ("tiny 1e-37 (scale overflows)", row(|i| base[i] * 1e-37)),
        ("subnormal", row(|i| base[i] * 1e-42)),
        (
            "smallest subnormal",
            row(|i| f32::from_bits(1) * (i % 3) as f32),
        ),
        ("single nonzero", row(|i| if i == 5 { 1e-3 } else { 0.0 })),
        // Scale 1: every element an exact half after scaling.
        (
            "halves, +127 max",
            row(|i| {
                if i % 32 == 0 {
                    127.0
                } else {
                    ((i % 254) as f32 - 127.0) + 0.5
                }
            }),
        ),
        (
            "halves, -127 max",
            row(|i| {
                if i % 32 == 3 {
                    -127.0
                } else {
                    ((i % 253) as f32 - 126.0) - 0.5
                }
            }),
        ),
        // Scale 1/2 and 2: halves after the product.
        (
            "halves, 254 max",
            row(|i| {
                if i % 32 == 1 {
                    254.0
                } else {
                    (i % 127) as f32 * 2.0 - 125.0
                }
            }),
        ),
        (
            "halves, 63.5 max",
            row(|i| {
                if i % 32 == 2 {
                    -63.5
                } else {
                    (i % 127) as f32 * 0.5 - 31.75
                }
            }),
        ),
        // ±max ties: which comes first decides the sign of Q8_K's scale.
        (
            "tie, + first",
            row(|i| match i {
                10 => 2.0,
                20 => -2.0,
                _ => base[i],
            }),
        ),
        (
            "tie, - first",
            row(|i| match i {
                10 => -2.0,
                20 => 2.0,
                _ => base[i],
            }),
        ),
        (
            "tie, - first across vectors",
            row(|i| match i {
                3 => -2.0,
                250 => 2.0,
                100 => -2.0,
                _ => base[i],
            }),
        ),
        (
            "tie, + last lane",
            row(|i| match i {
                255 => 2.0,
                17 => -2.0,
                _ => base[i] * 0.1,
            }),
        ),
        (
            "all +-1 alternating",
            row(|i| if i % 2 == 0 { 1.0 } else { -1.0 }),
        ),
        (
            "all -+1 alternating",
            row(|i| if i % 2 == 0 { -1.0 } else { 1.0 }),
        ),
        ("constant", vec![0.37; QK_K]),
        ("constant negative", vec![-1e-5; QK_K]),
        ("ramp", row(|i| i as f32 - 128.0)),
        // Non-finite inputs: the SIMD code falls back to the reference.
        (
            "infinity",
            row(|i| if i == 9 { f32::INFINITY } else { base[i] }),
        ),
        (
            "-infinity",
            row(|i| if i == 40 { f32::NEG_INFINITY } else { base[i] }),
        ),
        ("NaN", row(|i| if i == 33 { f32::NAN } else { base[i] })),
        (
            "NaN first, zeros",
            row(|i| if i == 0 { f32::NAN } else { 0.0 }),
        ),
        (
            "NaN, bigger than the rest",
            row(|i| if i % 50 == 0 { f32::NAN } else { base[i] }),
        ),
        ("all NaN", vec![f32::NAN; QK_K]),
    ];
    for (what, x) in &cases {
        check(x, what);
        // And placed in the middle of a longer row.
        let mut long = base.clone();
        long.extend_from_slice(x);
        long.extend_from_slice(&base);
        check(&long, &format!("{what} (middle block)"));
    }
    // Each Q8_0 block of a row by itself too (a block's own max and ties).
    for (what, x) in &cases {
        for (k, b) in x.chunks_exact(QK).enumerate() {
            check(b, &format!("{what}, q8_0 block {k}"));
        }
    }
}

#[test]
fn exact_halves_at_every_scale() {
    // Each block has max m and the other elements at (k + 0.5)·m/127 — the
    // products sit at or within an ulp of .5, for both signs of max.
    let mut rng = Rng::new(3);
    for rep in 0..500 {
        let m = rng.range(0.5, 2.0) * 2f32.powi((rng.next_u64() % 60) as i32 - 30);
        let sign = if rep % 2 == 0 { 1.0 } else { -1.0 };
        let x = row(|i| {
            if i % 64 == rep % 64 {
                sign * m
            } else {
                let k = (i * 37 + rep) % 254;
                (k as f32 - 127.0 + 0.5) * (m / 127.0)
            }
        });
        check(&x, &format!("halves, max {}, rep {rep}", sign * m));
    }
}

/// A block holding a NaN gets a NaN scale from every table (a NaN read as 0
/// let a damaged weight's NaN vanish from the model's output); the blocks
/// around it keep theirs.
#[test]
fn a_nan_gives_its_block_a_nan_scale() {
    let mut x: Vec<f32> = (0..2 * QK_K).map(|i| (i as f32 * 0.37).sin()).collect();
    x[40] = f32::NAN;
    for t in act_quantizers_available() {
        let mut q0 = vec![BlockQ8_0::default(); x.len() / QK];
        (t.q8_0)(&x, &mut q0);
        let d = |b: &BlockQ8_0| half::f16::from_le_bytes(b.d).to_f32();
        assert!(d(&q0[1]).is_nan(), "{}: q8_0 block 1", t.name);
        assert!(q0
            .iter()
            .enumerate()
            .all(|(i, b)| i == 1 || d(b).is_finite()));
        let mut qk = vec![BlockQ8K::default(); x.len() / QK_K];
        (t.q8_k)(&x, &mut qk);
        assert!(qk[0].d.is_nan() && qk[1].d.is_finite(), "{}: q8_k", t.name);
    }
}
