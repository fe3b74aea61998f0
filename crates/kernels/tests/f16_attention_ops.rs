//! The f16 attention ops (scores of query rows against a K tile, and P·V over a block of
//! keys): every table this CPU runs against a plain f64 computation written here, and
//! bit for bit against the scalar table (each output is one fma chain in a fixed order, so
//! attention cannot depend on the vector width), for 1..=16 rows and a head width with a
//! tail (hd = 40), and one that is a multiple of 16 but not of the wide kernels' chunks (48);
//! and scores against two tiles at once (`qk2`) bit for bit against two single ones.

use gemma3_kernels::simd::{f16_available, KEY_BLOCK};
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

fn halves(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

#[test]
fn qk_and_pv_match_f64_and_every_table_gives_the_scalar_bits() {
    let tables = f16_available();
    assert_eq!(tables[0].name, "scalar");
    for hd in [256usize, 48, 40] {
        for rows in 1..=16usize {
            let q = data(rows * hd, rows as u64);
            let kt = halves(&data(hd * KEY_BLOCK, 2));
            // A "cache" of 20 rows; P·V over rows 5, 0, 3, 19, 7 (keys 0..5 of the block).
            let cache = halves(&data(20 * hd, 3));
            let offs = [5 * hd, 0, 3 * hd, 19 * hd, 7 * hd];
            let p = data(rows * KEY_BLOCK, 4);
            let acc0 = data(rows * hd, 5);

            let mut scalar: Option<(Vec<u32>, Vec<u32>)> = None;
            for ops in &tables {
                let mut s = vec![f32::NAN; rows * KEY_BLOCK];
                (ops.qk)(&q, &kt, &mut s, if rows % 2 == 0 { kt.len() } else { 0 });
                // Two tiles at once: each tile's scores, the same bits as
                // one at a time (the second tile another key block).
                let kt1 = halves(&data(hd * KEY_BLOCK, 6));
                let mut s1 = vec![f32::NAN; rows * KEY_BLOCK];
                (ops.qk)(&q, &kt1, &mut s1, 0);
                let (mut t0, mut t1) = (
                    vec![f32::NAN; rows * KEY_BLOCK],
                    vec![f32::NAN; rows * KEY_BLOCK],
                );
                (ops.qk2)(
                    &q,
                    [&kt, &kt1],
                    &mut t0,
                    &mut t1,
                    if rows % 2 == 0 { kt.len() } else { 0 },
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&t0) == bits(&s) && bits(&t1) == bits(&s1),
                    "{} qk2 differs in bits from qk (hd {hd}, rows {rows})",
                    ops.name
                );
                for r in 0..rows {
                    for j in 0..KEY_BLOCK {
                        let terms =
                            (0..hd).map(|d| q[r * hd + d] as f64 * kt[d * KEY_BLOCK + j].to_f64());
                        let want: f64 = terms.clone().sum();
                        let mag: f64 = terms.map(f64::abs).sum();
                        let got = s[r * KEY_BLOCK + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag.max(1e-3),
                            "{} qk hd {hd} rows {rows} ({r}, {j}): {got} vs {want}",
                            ops.name
                        );
                    }
                }
                let mut acc = acc0.clone();
                (ops.pv)(
                    &mut acc,
                    &p,
                    &cache,
                    &offs,
                    hd,
                    if rows % 2 == 0 { hd * 16 } else { 0 },
                );
                for r in 0..rows {
                    for c in 0..hd {
                        let want = acc0[r * hd + c] as f64
                            + offs
                                .iter()
                                .enumerate()
                                .map(|(j, &o)| p[r * KEY_BLOCK + j] as f64 * cache[o + c].to_f64())
                                .sum::<f64>();
                        let got = acc[r * hd + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5,
                            "{} pv hd {hd} rows {rows} ({r}, {c}): {got} vs {want}",
                            ops.name
                        );
                    }
                }
                // exp(s − max) over the row's scores, and over a spread of
                // arguments down to underflow.
                let mut e: Vec<f32> = s[..KEY_BLOCK].to_vec();
                let m = e.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                (ops.exp_sub)(&mut e, m);
                let mut wide: Vec<f32> = (0..KEY_BLOCK)
                    .map(|j| -(j as f32).powi(3) * 0.031 * rows as f32)
                    .collect();
                (ops.exp_sub)(&mut wide, 0.0);
                for j in 0..KEY_BLOCK {
                    for (got, x) in [
                        (e[j], s[j] - m),
                        (wide[j], -(j as f32).powi(3) * 0.031 * rows as f32),
                    ] {
                        let want = (x as f64).exp();
                        assert!(
                            (got as f64 - want).abs() <= 4e-7 * want + 1e-37,
                            "{} exp({x}) = {got}, want {want}",
                            ops.name
                        );
                    }
                }
                e.extend_from_slice(&wide);
                let bits = (
                    s.iter().chain(&e).map(|v| v.to_bits()).collect::<Vec<_>>(),
                    acc.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                );
                match &scalar {
                    None => scalar = Some(bits),
                    Some(first) => {
                        assert!(
                            first.0 == bits.0,
                            "{} qk differs in bits from scalar (hd {hd}, rows {rows})",
                            ops.name
                        );
                        assert!(
                            first.1 == bits.1,
                            "{} pv differs in bits from scalar (hd {hd}, rows {rows})",
                            ops.name
                        );
                    }
                }
            }
        }
    }
}

/// GeGLU through the dispatched path (AVX-512 or AVX2 where the CPU has them) gives the plain
/// version's bits, across the f16 range, the ±10 cut-offs and a ragged tail.
#[test]
fn geglu_dispatch_gives_the_reference_bits() {
    use gemma3_kernels::ops::{geglu_inplace, geglu_inplace_ref};
    let mut gate: Vec<f32> = data(4099, 11).iter().map(|&v| v * 14.0).collect();
    gate.extend([
        -10.0, 10.0, -9.999, 9.999, -10.001, 10.001, 0.0, -0.0, 1e-8, -1e-8, 65504.0, -7e4,
    ]);
    let up = data(gate.len(), 12);
    let (mut a, mut b) = (gate.clone(), gate.clone());
    geglu_inplace(&mut a, &up);
    geglu_inplace_ref(&mut b, &up);
    for i in 0..gate.len() {
        assert_eq!(
            a[i].to_bits(),
            b[i].to_bits(),
            "gelu({}) · {}: {} vs {}",
            gate[i],
            up[i],
            a[i],
            b[i]
        );
    }
}
