//! Test helpers: the tiny synthetic model and the independent f64 reference forward pass.

#![allow(dead_code)]

pub mod reference;
pub mod tiny;

/// The largest and the rms difference of `ours` (rows of `vocab` logits, one per entry of
/// `positions`) from the reference's rows at those positions, each relative to that row's
/// largest |reference logit|; the worst over the rows. Panics on a non-finite logit.
pub fn compare(
    ours: &[f32],
    reference: &[Vec<f64>],
    vocab: usize,
    positions: &[usize],
) -> (f64, f64) {
    let (mut worst, mut worst_rms) = (0.0f64, 0.0f64);
    for (row, &p) in positions.iter().enumerate() {
        let r = &reference[p];
        let o = &ours[row * vocab..(row + 1) * vocab];
        assert!(
            o.iter().all(|v| v.is_finite()),
            "position {p}: non-finite logits"
        );
        let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = o
            .iter()
            .zip(r)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let ss: f64 = o.iter().zip(r).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
        worst = worst.max(err / scale);
        worst_rms = worst_rms.max((ss / vocab as f64).sqrt() / scale);
    }
    (worst, worst_rms)
}

/// All-position logits of one prefill of `toks` (n × vocab) into a fresh cache of `ctx`.
pub fn prefill(m: &gemma3_model::Model, toks: &[u32], ctx: usize) -> Vec<f32> {
    let mut cache = gemma3_model::KvCache::new(&m.config, ctx);
    let mut st = gemma3_model::ForwardState::new();
    m.forward(
        &gemma3_model::Batch::for_sequence(toks, 0, true),
        std::slice::from_mut(&mut cache),
        &mut st,
    )
    .expect("forward")
    .to_vec()
}

/// `W += scale · B·A` on the tensor `base` of `weights` (f64 products, stored as f32):
/// A is rank × n_in and B n_out × rank, row-major. A LoRA pair's update, merged.
pub fn merge(
    weights: &mut std::collections::BTreeMap<String, tiny::TinyTensor>,
    base: &str,
    rank: usize,
    a: &[f32],
    b: &[f32],
    scale: f32,
) {
    let t = weights.get_mut(base).expect("the pair's matrix");
    let (n_in, n_out) = (t.dims[0] as usize, t.dims[1] as usize);
    for o in 0..n_out {
        for i in 0..n_in {
            let ba: f64 = (0..rank)
                .map(|j| b[o * rank + j] as f64 * a[j * n_in + i] as f64)
                .sum();
            let w = &mut t.data[o * n_in + i];
            *w = (*w as f64 + scale as f64 * ba) as f32;
        }
    }
}
