//! The f16 attention ops (q·k over the f16 cache, and P·V over a block of
//! keys): every table this CPU runs against a plain f64 computation written
//! here, for group sizes 1..=8 and a head width with a tail (hd = 40).

use gemma3_kernels::simd::f16_available;
use half::f16;

/// Deterministic values in [-1, 1).
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

#[test]
fn dots_and_pv_match_f64_for_every_table() {
    for hd in [256usize, 40] {
        for g in 1..=8usize {
            let q = data(g * hd, 1);
            let k: Vec<f16> = data(hd, 2).iter().map(|&v| f16::from_f32(v)).collect();
            // Exact dot products in f64 of the same (f16-rounded) values.
            let want: Vec<f64> = (0..g)
                .map(|h| (0..hd).map(|c| q[h * hd + c] as f64 * k[c].to_f64()).sum())
                .collect();
            // A "cache" of 7 rows; P·V over rows 5, 0, 3.
            let cache: Vec<f16> = data(7 * hd, 3).iter().map(|&v| f16::from_f32(v)).collect();
            let offs = [5 * hd, 0, 3 * hd];
            let p = data(offs.len() * g, 4);
            let acc0 = data(g * hd, 5);
            let want_pv: Vec<f64> = (0..g * hd)
                .map(|i| {
                    let (h, c) = (i / hd, i % hd);
                    acc0[i] as f64
                        + offs
                            .iter()
                            .enumerate()
                            .map(|(j, &o)| p[j * g + h] as f64 * cache[o + c].to_f64())
                            .sum::<f64>()
                })
                .collect();
            // The SIMD tables do the same fused multiply-adds per element in
            // the same key order: their P·V results must agree bit for bit
            // (attention results must not depend on the vector width).
            let mut simd_pv: Option<Vec<u32>> = None;
            for ops in f16_available() {
                let mut out = vec![0.0f32; g];
                (ops.dots)(&q, &k, &mut out);
                for h in 0..g {
                    let scale: f64 = (0..hd)
                        .map(|c| (q[h * hd + c] as f64 * k[c].to_f64()).abs())
                        .sum();
                    assert!(
                        (out[h] as f64 - want[h]).abs() <= 1e-5 * scale.max(1.0),
                        "{} dots hd {hd} g {g} head {h}: {} vs {}",
                        ops.name,
                        out[h],
                        want[h]
                    );
                }
                let mut acc = acc0.clone();
                (ops.pv)(&mut acc, &p, &cache, &offs, hd);
                for i in 0..g * hd {
                    assert!(
                        (acc[i] as f64 - want_pv[i]).abs() <= 1e-5,
                        "{} pv hd {hd} g {g} at {i}: {} vs {}",
                        ops.name,
                        acc[i],
                        want_pv[i]
                    );
                }
                if ops.name != "scalar" {
                    let bits: Vec<u32> = acc.iter().map(|v| v.to_bits()).collect();
                    match &simd_pv {
                        None => simd_pv = Some(bits),
                        Some(first) => assert_eq!(
                            first, &bits,
                            "{} P·V differs in bits from the first SIMD table",
                            ops.name
                        ),
                    }
                }
            }
        }
    }
}
