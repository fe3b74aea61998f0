//! The f16 conversions of the forward pass (K/V cache writes, queries
//! rounded to f16) give exactly `half::f16::from_f32`'s bits — round to
//! nearest, ties to even — whichever path this CPU takes: ties, values
//! that round up to the next binade or to infinity, f16 subnormals and
//! zeros of both signs, and lengths with a tail.

use gemma3_kernels::ops::{round_to_f16, to_f16};
use half::f16;

fn values() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e9,
        -1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        6.1035156e-5,
        5.9604645e-8,
        2.9802322e-8,
        2.9802326e-8,
        1e-10,
        -3.0e-6,
    ];
    // Exact halfway points between neighbouring f16 values (ties), and
    // their float neighbours, across the normal and subnormal range.
    for bits in (0u16..0x7C00).step_by(97) {
        let (a, b) = (
            f16::from_bits(bits).to_f32(),
            f16::from_bits(bits + 1).to_f32(),
        );
        let mid = (a + b) / 2.0;
        for x in [
            mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ] {
            v.push(x);
            v.push(-x);
        }
    }
    // Ordinary values.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..1000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.push(((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 300.0);
    }
    v
}

#[test]
fn conversions_round_like_half() {
    let all = values();
    for len in [all.len(), 1, 15, 16, 17, 33] {
        let src = &all[all.len() - len..];
        let mut got = vec![f16::ZERO; len];
        to_f16(src, &mut got);
        let mut rounded = src.to_vec();
        round_to_f16(&mut rounded);
        for (i, &x) in src.iter().enumerate() {
            let want = f16::from_f32(x);
            assert_eq!(got[i].to_bits(), want.to_bits(), "to_f16({x:e})");
            assert_eq!(
                rounded[i].to_bits(),
                want.to_f32().to_bits(),
                "round_to_f16({x:e})"
            );
        }
    }
}
