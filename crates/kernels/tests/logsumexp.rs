//! `ops::logsumexp` against ln Σ e^x summed in f64 with libm's `exp`: rows
//! shaped like the model's logits (a vocabulary's worth, spread over ±30
//! with a few large ones), lengths around the 16-lane and 1024-entry block
//! edges, −∞ entries (a logit bias of −∞), and the empty and non-finite rows.

mod common;
use common::Rng;
use gemma3_kernels::ops::logsumexp;

fn reference(x: &[f32]) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let m = f64::from(m);
    m + x
        .iter()
        .map(|&v| (f64::from(v) - m).exp())
        .sum::<f64>()
        .ln()
}

#[test]
fn logsumexp_is_within_1e_6_of_f64() {
    let mut rng = Rng::new(7);
    for n in [1, 2, 15, 16, 17, 1023, 1024, 1025, 4099, 262_144] {
        let mut x: Vec<f32> = (0..n).map(|_| rng.range(-30.0, 12.0)).collect();
        // A peaked row, as after a confident prediction.
        x[n / 2] = 40.0;
        let want = reference(&x);
        let got = f64::from(logsumexp(&x));
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "n {n}: {got} against {want}"
        );
        // A flat row: every term counts, the sum is largest.
        let flat: Vec<f32> = (0..n).map(|_| rng.range(-0.5, 0.5)).collect();
        let want = reference(&flat);
        let got = f64::from(logsumexp(&flat));
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "flat n {n}: {got} against {want}"
        );
    }
}

#[test]
fn logsumexp_edges() {
    // Two equal entries: ln 2 above them.
    assert!((logsumexp(&[3.0, 3.0]) - (3.0 + 2f32.ln())).abs() < 1e-6);
    // −∞ entries add nothing, wherever they sit.
    let mut x = vec![f32::NEG_INFINITY; 37];
    x[20] = 1.5;
    assert_eq!(logsumexp(&x), 1.5);
    x[3] = 1.5;
    assert!((logsumexp(&x) - (1.5 + 2f32.ln())).abs() < 1e-6);
    // Entries far below the max underflow to nothing.
    assert_eq!(logsumexp(&[0.0, -200.0, -1e30]), 0.0);
    // No finite max: the max itself.
    assert_eq!(logsumexp(&[]), f32::NEG_INFINITY);
    assert_eq!(logsumexp(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY);
    assert_eq!(logsumexp(&[1.0, f32::INFINITY, 2.0]), f32::INFINITY);
    // A NaN among finite logits makes the sum NaN (it is not hidden).
    let mut y = vec![0.5f32; 40];
    y[33] = f32::NAN;
    assert!(logsumexp(&y).is_nan());
}
