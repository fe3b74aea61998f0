//! Training a LoRA adapter on the tiny synthetic model, checked against the independent f64
//! reference (`common/reference.rs`, which shares no code with the engine) on merged weights
//! `W + alpha / rank · B·A`:
//!
//! - the training pass's loss is the reference's cross-entropy;
//! - its gradients are the reference loss's central differences, for A and B of every matrix
//!   kind, on sliding-window and global layers;
//! - a few AdamW steps lower the loss, and the adapter written out runs in the inference
//!   forward pass (`Model::load_lora`) as the reference runs the trained pairs merged.

mod common;

use common::reference::Reference;
use common::tiny::{tiny_writer, Rng, TinySpec, TinyTensor};
use gemma3_gguf::GgufFile;
use gemma3_model::train::{AdamW, DenseModel, Example, Precision, TrainableLora};
use gemma3_model::Model;
use std::collections::BTreeMap;

use gemma3_model::lora::MATRICES as KINDS;

fn open(spec: &TinySpec) -> (Model, BTreeMap<String, TinyTensor>) {
    let (w, weights) = tiny_writer(spec);
    let f = GgufFile::from_bytes(w.to_bytes()).expect("tiny model parses");
    (Model::from_gguf(f).expect("tiny model loads"), weights)
}

/// The base weights with every pair of `lora` merged in at its scale.
fn merged(
    weights: &BTreeMap<String, TinyTensor>,
    lora: &TrainableLora,
) -> BTreeMap<String, TinyTensor> {
    let mut out = weights.clone();
    for p in &lora.pairs {
        let base = format!("blk.{}.{}.weight", p.layer, KINDS[p.matrix]);
        common::merge(&mut out, &base, p.rank, &p.a, &p.b, p.scale);
    }
    out
}

/// The reference's mean cross-entropy over the targets of `batch`, each example a sequence
/// of its own, on `lora` merged (f64).
fn reference_loss(
    spec: &TinySpec,
    weights: &BTreeMap<String, TinyTensor>,
    lora: &TrainableLora,
    batch: &[&Example],
) -> f64 {
    let w = merged(weights, lora);
    let r = Reference {
        spec,
        w: &w,
        ggml_rounding: false,
    };
    let (mut sum, mut count) = (0.0, 0);
    for ex in batch {
        let logits = r.logits(&ex.tokens);
        for i in (1..ex.tokens.len()).filter(|&i| ex.target[i]) {
            let z = &logits[i - 1];
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            sum += lse - z[ex.tokens[i] as usize];
            count += 1;
        }
    }
    sum / count as f64
}

/// `len` tokens, from the 6th on targets but the 10th (14 and more: past the tiny model's
/// window of 8).
fn example(spec: &TinySpec, seed: u64, len: usize) -> Example {
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..len).map(|_| rng.below(spec.vocab) as u32).collect();
    let target = (0..len).map(|i| i >= 5 && i != 9).collect();
    Example { tokens, target }
}

/// A rank-2 adapter on every matrix of every layer, with B drawn too (a fresh one's B is 0,
/// which would leave A's gradients 0).
fn adapter(m: &Model, seed: u64) -> TrainableLora {
    let mut lora = TrainableLora::new(m, &[0, 1, 2, 3, 4, 5, 6], 2, 3.0, seed);
    let mut rng = Rng::new(seed + 1);
    for p in &mut lora.pairs {
        p.b.iter_mut().for_each(|b| *b = rng.range(-0.3, 0.3));
    }
    lora
}

#[test]
fn the_training_loss_and_its_gradients_match_the_reference() {
    // Three threads: the products split the weights' rows unevenly (the tiny model's q has
    // 128, its vocabulary 300), and the two examples attend on threads of their own.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(gradients_match);
}

fn gradients_match() {
    let spec = TinySpec::default();
    let (m, w) = open(&spec);
    let dense = DenseModel::new(&m);
    let lora = adapter(&m, 7);
    let (one, two) = (example(&spec, 3, 14), example(&spec, 9, 11));
    let batch = [&one, &two];
    let pass = dense.pass(&lora, &batch, true);
    assert_eq!(pass.targets, 8 + 5);
    let ours = pass.loss_sum / pass.targets as f64;
    let want = reference_loss(&spec, &w, &lora, &batch);
    eprintln!("loss: ours {ours:.6}, reference {want:.6}");
    assert!((ours - want).abs() < 1e-4 * want, "{ours} against {want}");
    let grads = pass.grads.expect("gradients asked for");
    // The same in two groups (one example each) whose gradients add up.
    let mut grouped = DenseModel::new(&m);
    grouped.max_rows = 16;
    let apart = grouped.pass(&lora, &batch, true);
    assert!((apart.loss_sum - pass.loss_sum).abs() < 1e-4 * pass.loss_sum);
    let ga = apart.grads.unwrap();
    for (x, y) in grads.a.iter().chain(&grads.b).zip(ga.a.iter().chain(&ga.b)) {
        for (x, y) in x.iter().zip(y) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-2),
                "{x} in one group, {y} in two"
            );
        }
    }

    // For each pair, A's and B's coordinate of largest gradient and one drawn at random,
    // against the reference loss's central difference there.
    let (eps, mut rng, mut worst) = (1e-3f32, Rng::new(11), 0.0f64);
    let mut checked = 0;
    for (i, p) in lora.pairs.iter().enumerate() {
        for (is_a, g) in [(true, &grads.a[i]), (false, &grads.b[i])] {
            let largest = (0..g.len())
                .max_by(|&x, &y| g[x].abs().total_cmp(&g[y].abs()))
                .unwrap();
            for j in [largest, rng.below(g.len())] {
                let moved = |by: f32| {
                    let mut l = lora.clone();
                    let q = &mut l.pairs[i];
                    if is_a {
                        q.a[j] += by;
                    } else {
                        q.b[j] += by;
                    }
                    reference_loss(&spec, &w, &l, &batch)
                };
                let num = (moved(eps) - moved(-eps)) / (2.0 * eps as f64);
                let ana = g[j] as f64;
                let err = (num - ana).abs() / (ana.abs() + 1e-3);
                worst = worst.max(err);
                checked += 1;
                assert!(
                    err < 2e-2,
                    "layer {} {} {} [{j}]: analytic {ana:e}, central difference {num:e}",
                    p.layer,
                    KINDS[p.matrix],
                    if is_a { "A" } else { "B" }
                );
            }
        }
    }
    eprintln!("{checked} coordinates, worst relative error {worst:.2e}");
    // The check must be able to fail: gradients of another example are far off.
    let other = dense
        .pass(&lora, &[&example(&spec, 4, 14)], true)
        .grads
        .unwrap();
    let (g, o) = (&grads.b[0], &other.b[0]);
    let diff = g
        .iter()
        .zip(o)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let size = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(diff > 0.1 * size, "the examples' gradients barely differ");
}

/// The bf16 products (`Precision::Bf16`: weights and activations rounded to 8 significant
/// bits, sums in f32): the loss near the reference's, every pair's gradients near the exact
/// passes' in norm (those matched the reference's central differences above), and AdamW on
/// them trains as well.
#[test]
fn bf16_passes_follow_the_exact_ones() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(|| {
        let spec = TinySpec::default();
        let (m, w) = open(&spec);
        let (exact, bf16) = (
            DenseModel::new(&m),
            DenseModel::with_precision(&m, Precision::Bf16),
        );
        let lora = adapter(&m, 7);
        let (one, two) = (example(&spec, 3, 14), example(&spec, 9, 11));
        let batch = [&one, &two];
        let (p, q) = (
            exact.pass(&lora, &batch, true),
            bf16.pass(&lora, &batch, true),
        );
        let want = reference_loss(&spec, &w, &lora, &batch);
        let ours = q.loss_sum / q.targets as f64;
        eprintln!("bf16 loss {ours:.5}, reference {want:.5}");
        assert!((ours - want).abs() < 1e-2 * want, "{ours} against {want}");
        let (g, h) = (p.grads.unwrap(), q.grads.unwrap());
        let mut worst = 0.0f64;
        for (x, y) in g.a.iter().chain(&g.b).zip(h.a.iter().chain(&h.b)) {
            let norm = |v: &mut dyn Iterator<Item = f32>| {
                v.map(|t| (t as f64).powi(2)).sum::<f64>().sqrt()
            };
            let diff = norm(&mut x.iter().zip(y).map(|(a, b)| a - b));
            worst = worst.max(diff / norm(&mut x.iter().copied()));
        }
        eprintln!("bf16 gradients: worst relative difference of a matrix's {worst:.2e}");
        // (Measured 1.0e-2 to 3.2e-2 over the 84 matrices: bf16's rounding, spread evenly;
        // a wrong product would be off by its whole size.)
        assert!(worst < 5e-2, "{worst}");
        // Trained from a fresh adapter, as the exact test below trains.
        let mut lora = TrainableLora::new(&m, &[0, 2, 4, 6], 4, 8.0, 5);
        let start = bf16.pass(&lora, &[&one], false).loss_sum;
        let mut opt = AdamW::new(&lora, 0.0);
        for _ in 0..30 {
            let g = bf16.pass(&lora, &[&one], true).grads.unwrap();
            opt.step(&mut lora, g, 1e-2, 1.0);
        }
        let end = reference_loss(&spec, &w, &lora, &[&one]) * 8.0;
        eprintln!("bf16: loss {start:.4} → {end:.4} (the reference's) after 30 steps");
        assert!(end < 0.5 * start, "{start} → {end}");
    });
}

#[test]
fn adamw_steps_lower_the_loss_and_the_written_adapter_runs_as_trained() {
    let spec = TinySpec::default();
    let (m, w) = open(&spec);
    let dense = DenseModel::new(&m);
    // A fresh adapter (B = 0): at first exactly the base model.
    let mut lora = TrainableLora::new(&m, &[0, 2, 4, 6], 4, 8.0, 5);
    let ex = example(&spec, 3, 14);
    let start = dense.pass(&lora, &[&ex], false).loss_sum / 8.0;
    let base = reference_loss(&spec, &w, &TrainableLora::new(&m, &[], 1, 1.0, 0), &[&ex]);
    assert!((start - base).abs() < 1e-4 * base, "{start} against {base}");
    // Whether every target is the reference's likeliest token given what precedes it.
    let reference_exact = |lora: &TrainableLora| {
        let w = merged(&w, lora);
        let r = Reference {
            spec: &spec,
            w: &w,
            ggml_rounding: false,
        };
        let logits = r.logits(&ex.tokens);
        (1..ex.tokens.len()).filter(|&i| ex.target[i]).all(|i| {
            let z = &logits[i - 1];
            let y = ex.tokens[i] as usize;
            (0..z.len()).all(|j| j == y || z[j] < z[y])
        })
    };
    let before = dense.pass(&lora, &[&ex], false).exact;
    assert_eq!(before, reference_exact(&lora) as usize);
    let mut opt = AdamW::new(&lora, 0.0);
    for _ in 0..30 {
        let g = dense.pass(&lora, &[&ex], true).grads.unwrap();
        opt.step(&mut lora, g, 1e-2, 1.0);
    }
    let after = dense.pass(&lora, &[&ex], false);
    let end = after.loss_sum / 8.0;
    assert_eq!(
        (before, after.exact),
        (0, 1),
        "exact before and after training"
    );
    assert!(
        reference_exact(&lora),
        "the reference's greedy tokens are not all the targets"
    );
    eprintln!("loss {start:.4} → {end:.4} after 30 steps");
    assert!(end < 0.5 * start, "{start} → {end}");
    // The reference agrees on the trained pairs.
    let want = reference_loss(&spec, &w, &lora, &[&ex]);
    assert!((end - want).abs() < 1e-3 * want, "{end} against {want}");

    // Written as a GGUF adapter and applied by the inference forward pass: the reference's
    // logits on the merged weights.
    let path = std::env::temp_dir().join(format!("gemma3-train-{}.gguf", std::process::id()));
    lora.to_gguf("trained").write_to_path(&path).unwrap();
    let mut adapted = open(&spec).0;
    let info = adapted
        .load_lora(&path, 1.0)
        .expect("the trained adapter loads");
    let _ = std::fs::remove_file(&path);
    assert_eq!((info.matrices, info.ranks, info.alpha), (24, (4, 4), 8.0));
    let ours = common::prefill(&adapted, &ex.tokens, 64);
    let mw = merged(&w, &lora);
    let reference = Reference {
        spec: &spec,
        w: &mw,
        ggml_rounding: true,
    }
    .logits(&ex.tokens);
    let positions: Vec<usize> = (0..ex.tokens.len()).collect();
    let (max, rms) = common::compare(&ours, &reference, spec.vocab, &positions);
    eprintln!("inference with the written adapter: max {max:.2e}, rms {rms:.2e}");
    assert!(max < 2e-3 && rms < 6e-4, "max {max:e}, rms {rms:e}");
}
