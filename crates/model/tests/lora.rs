//! LoRA adapters on the tiny synthetic model: the adapted forward pass against the
//! independent f64 reference (`common/reference.rs`) run on merged weights
//! `W + scale · alpha / rank · B·A` (a LoRA update is that merge, computed apart), and every
//! malformed adapter refused by name, leaving the model as it was.
//!
//! The real model's adapters are checked against llama.cpp in the CLI's tests (`lora.rs`).

mod common;

use common::compare;
use common::reference::Reference;
use common::tiny::{tiny_writer, Rng, TinySpec, TinyTensor};
use gemma3_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use gemma3_model::{Batch, ForwardState, KvCache, Model};
use std::collections::BTreeMap;
use std::path::PathBuf;

// The layer matrices an adapter may change.
use gemma3_model::lora::MATRICES as KINDS;

/// As forward_reference.rs: ~4 f16 ulps of the largest logit, and 2× its largest rms.
const TOL_MAX: f64 = 2e-3;
const TOL_RMS: f64 = 6e-4;

fn open(spec: &TinySpec) -> (Model, BTreeMap<String, TinyTensor>) {
    let (w, weights) = tiny_writer(spec);
    let f = GgufFile::from_bytes(w.to_bytes()).expect("tiny model parses");
    (Model::from_gguf(f).expect("tiny model loads"), weights)
}

/// All-position logits of `toks` in a context of 64.
fn prefill(m: &Model, toks: &[u32]) -> Vec<f32> {
    common::prefill(m, toks, 64)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One adapted matrix: its base name, A (rank × n_in) and B (n_out × rank), row-major.
struct Pair {
    base: String,
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// Random A and B for `base` (a tensor of `weights`), entries of size about `size`.
fn pair(weights: &BTreeMap<String, TinyTensor>, base: &str, rank: usize, seed: u64) -> Pair {
    let t = &weights[base];
    let (n_in, n_out) = (t.dims[0] as usize, t.dims[1] as usize);
    let mut rng = Rng::new(seed);
    let a = (0..rank * n_in).map(|_| rng.range(-0.5, 0.5)).collect();
    let b = (0..n_out * rank).map(|_| rng.range(-0.5, 0.5)).collect();
    Pair {
        base: base.into(),
        rank,
        a,
        b,
    }
}

/// An adapter file's writer, as llama.cpp's converter writes one.
fn adapter(pairs: &[Pair], alpha: Option<f32>) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("gemma3".into()));
    w.add_kv("general.type", Value::String("adapter".into()));
    w.add_kv("adapter.type", Value::String("lora".into()));
    if let Some(a) = alpha {
        w.add_kv("adapter.lora.alpha", Value::F32(a));
    }
    for p in pairs {
        let (n_in, n_out) = (p.a.len() / p.rank, p.b.len() / p.rank);
        let dims_a = [n_in as u64, p.rank as u64];
        let dims_b = [p.rank as u64, n_out as u64];
        w.add_tensor(
            &format!("{}.lora_a", p.base),
            &dims_a,
            GgmlType::F32,
            f32_bytes(&p.a),
        )
        .unwrap();
        w.add_tensor(
            &format!("{}.lora_b", p.base),
            &dims_b,
            GgmlType::F32,
            f32_bytes(&p.b),
        )
        .unwrap();
    }
    w
}

/// A file private to this test process.
fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gemma3-lora-{}-{name}.gguf", std::process::id()))
}

fn write(w: &GgufWriter, name: &str) -> PathBuf {
    let p = temp(name);
    w.write_to_path(&p).unwrap();
    p
}

/// `weights` with each pair merged in: W += scale · B·A (f64, stored as f32).
fn merged(
    weights: &BTreeMap<String, TinyTensor>,
    adapters: &[(&[Pair], f32)],
) -> BTreeMap<String, TinyTensor> {
    let mut out = weights.clone();
    for (pairs, scale) in adapters {
        for p in *pairs {
            common::merge(&mut out, &p.base, p.rank, &p.a, &p.b, *scale);
        }
    }
    out
}

#[test]
fn adapted_logits_match_the_reference_on_merged_weights() {
    let spec = TinySpec::default();
    let (mut m, w) = open(&spec);
    // 40 tokens: on two threads or more, a prefill's rows are split between them (32 and up).
    let toks: Vec<u32> = (0..40).map(|i| (i * 37 % spec.vocab) as u32).collect();
    let positions: Vec<usize> = (0..toks.len()).collect();
    // Adapter one: rank 4, alpha 2 (scale · 0.5), every matrix kind, a local and the
    // global layer. Adapter two: rank 2, no alpha, q again (the updates add up) and down.
    let one: Vec<Pair> = [1usize, 5]
        .iter()
        .flat_map(|l| KINDS.iter().map(move |k| (*l, *k)))
        .enumerate()
        .map(|(i, (l, k))| pair(&w, &format!("blk.{l}.{k}.weight"), 4, 100 + i as u64))
        .collect();
    let two: Vec<Pair> = ["blk.1.attn_q.weight", "blk.3.ffn_down.weight"]
        .iter()
        .enumerate()
        .map(|(i, b)| pair(&w, b, 2, 200 + i as u64))
        .collect();
    let (p1, p2) = (
        write(&adapter(&one, Some(2.0)), "one"),
        write(&adapter(&two, None), "two"),
    );
    let base = prefill(&m, &toks);
    let info = m.load_lora(&p1, 0.8).expect("adapter one loads");
    assert_eq!((info.matrices, info.ranks, info.alpha), (14, (4, 4), 2.0));
    m.load_lora(&p2, -0.6).expect("adapter two loads");
    let ours = prefill(&m, &toks);
    let reference = |adapters: &[(&[Pair], f32)]| {
        let w = merged(&w, adapters);
        Reference {
            spec: &spec,
            w: &w,
            ggml_rounding: true,
        }
        .logits(&toks)
    };
    // Scales: 0.8 · alpha 2 / rank 4 = 0.4; no alpha: −0.6 as it is.
    let want = reference(&[(&one, 0.4), (&two, -0.6)]);
    let (max, rms) = compare(&ours, &want, spec.vocab, &positions);
    eprintln!("adapted: max {max:.2e}, rms {rms:.2e} (tolerances {TOL_MAX:e}, {TOL_RMS:e})");
    assert!(max < TOL_MAX && rms < TOL_RMS, "max {max:e}, rms {rms:e}");
    // The adapters must matter, and their scales: the base model's reference, and one with
    // adapter one at llama.cpp's scale without alpha / rank, are far off.
    for (label, other) in [
        ("no adapter", reference(&[])),
        ("alpha ignored", reference(&[(&one, 0.8), (&two, -0.6)])),
    ] {
        let (max, _) = compare(&ours, &other, spec.vocab, &positions);
        eprintln!("  vs {label}: max {max:.2e}");
        assert!(
            max > 10.0 * TOL_MAX,
            "{label}: {max:e}: the test is too weak"
        );
    }
    // Decoding one token at a time takes the same path (n = 1) as the prefill's rows.
    let mut cache = KvCache::new(&m.config, 64);
    let mut st = ForwardState::new();
    let vocab = spec.vocab;
    for (i, &t) in toks.iter().enumerate() {
        let mut b = Batch::default();
        b.push(t, i, 0, true);
        let row = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .unwrap();
        let (max, _) = compare(row, &want[i..=i], vocab, &[0]);
        assert!(max < TOL_MAX, "decode position {i}: {max:e}");
    }
    // An adapter at scale 0 is checked and changes nothing.
    let (mut m0, _) = open(&spec);
    m0.load_lora(&p1, 0.0).expect("scale 0 loads");
    assert_eq!(prefill(&m0, &toks), base);
    for p in [p1, p2] {
        std::fs::remove_file(p).ok();
    }
}

#[test]
fn malformed_adapters_are_refused_by_name_and_leave_the_model_as_it_was() {
    let spec = TinySpec::default();
    let (mut m, w) = open(&spec);
    let toks: Vec<u32> = (0..8).map(|i| (i * 11 % spec.vocab) as u32).collect();
    let base = prefill(&m, &toks);
    let good = pair(&w, "blk.0.attn_q.weight", 2, 7);
    let good2 = pair(&w, "blk.2.ffn_up.weight", 2, 8);
    let with_kv = |key: &str, v: Value| {
        let mut a = adapter(&[pair(&w, "blk.0.attn_q.weight", 2, 7)], None);
        a.add_kv(key, v);
        a
    };
    let q = |name: &str, dims: &[u64], data: Vec<f32>| {
        // `good2` plus one extra tensor.
        let mut a = adapter(std::slice::from_ref(&good2), None);
        a.add_tensor(name, dims, GgmlType::F32, f32_bytes(&data))
            .unwrap();
        a
    };
    let (n_in, n_out) = (spec.d_model as u64, (spec.n_heads * spec.head_dim) as u64);
    let mut nan = pair(&w, "blk.0.attn_q.weight", 2, 9);
    nan.b[5] = f32::NAN;
    let (model_file, _) = tiny_writer(&spec);
    let cases: Vec<(&str, GgufWriter, &str)> = vec![
        ("model", model_file, "it has no general.type"),
        (
            "control-vector",
            {
                let mut cv = GgufWriter::new();
                let d = vec![0.5f32; spec.d_model];
                cv.add_tensor("direction.1", &[spec.d_model as u64], GgmlType::F32, f32_bytes(&d))
                    .unwrap();
                cv
            },
            "not a LoRA adapter but a control vector (its tensors are direction.N): give it with --control-vector",
        ),
        (
            "type-u32",
            with_kv("general.type", Value::U32(5)),
            "general.type",
        ),
        (
            "no-arch",
            {
                let mut a = adapter(&[pair(&w, "blk.0.attn_q.weight", 2, 7)], None);
                a.add_kv("general.architecture", Value::U32(1));
                a
            },
            "general.architecture",
        ),
        (
            "type",
            with_kv("general.type", Value::String("model".into())),
            "general.type is 'model', not 'adapter'",
        ),
        (
            "arch",
            with_kv("general.architecture", Value::String("llama".into())),
            "an adapter for 'llama'",
        ),
        (
            "kind",
            with_kv("adapter.type", Value::String("control_vector".into())),
            "adapter.type is 'control_vector'",
        ),
        (
            "alora",
            with_kv(
                "adapter.alora.invocation_tokens",
                Value::Array(gemma3_gguf::Array::U32(vec![1, 2])),
            ),
            "activated LoRA",
        ),
        (
            "alpha",
            with_kv("adapter.lora.alpha", Value::F32(f32::INFINITY)),
            "alpha inf is not finite",
        ),
        (
            "alpha-type",
            with_kv("adapter.lora.alpha", Value::String("8".into())),
            "adapter.lora.alpha",
        ),
        ("empty", adapter(&[], None), "holds no .lora_a / .lora_b"),
        (
            "half",
            q(
                "blk.0.attn_k.weight.lora_a",
                &[n_in, 2],
                vec![0.0; 2 * n_in as usize],
            ),
            "'blk.0.attn_k.weight' has no lora_b",
        ),
        (
            "suffix",
            q("blk.0.attn_k.weight.lora_c", &[4], vec![0.0; 4]),
            "neither a .lora_a nor a .lora_b",
        ),
        (
            "layer",
            adapter(
                &[Pair {
                    base: "blk.99.attn_q.weight".into(),
                    ..pair(&w, "blk.0.attn_q.weight", 2, 7)
                }],
                None,
            ),
            "'blk.99.attn_q.weight', which does not exist in this model",
        ),
        (
            "leading-zero",
            adapter(
                &[Pair {
                    base: "blk.01.attn_q.weight".into(),
                    ..pair(&w, "blk.1.attn_q.weight", 2, 7)
                }],
                None,
            ),
            "'blk.01.attn_q.weight', which does not exist in this model",
        ),
        (
            "matrix",
            adapter(
                &[Pair {
                    base: "blk.0.attn_qkv.weight".into(),
                    ..pair(&w, "blk.0.attn_q.weight", 2, 7)
                }],
                None,
            ),
            "'blk.0.attn_qkv.weight', which this model does not have",
        ),
        (
            "embedding",
            adapter(
                &[Pair {
                    base: "token_embd.weight".into(),
                    ..pair(&w, "blk.0.attn_q.weight", 2, 7)
                }],
                None,
            ),
            "adapters of the embedding or output head are not supported",
        ),
        (
            "shape",
            adapter(
                &[Pair {
                    base: "blk.0.attn_k.weight".into(),
                    ..pair(&w, "blk.0.attn_q.weight", 2, 7)
                }],
                None,
            ),
            "another model",
        ),
        ("nan", adapter(&[nan], None), "lora_b' holds NaN at index 5"),
    ];
    for (label, file, want) in cases {
        let p = write(&file, label);
        let e = m
            .load_lora(&p, 1.0)
            .map(|_| ())
            .expect_err(label)
            .to_string();
        assert!(e.contains(want), "{label}: {e}");
        assert!(e.contains(&p.display().to_string()), "{label}: {e}");
        std::fs::remove_file(&p).ok();
    }
    // Not there, cut short, and an absurd scale.
    let p = write(&adapter(&[good], Some(4.0)), "cut");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = m.load_lora(&p, 1.0).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("LoRA adapter")
            && e.contains("past the end of the file")
            && !e.contains("model file"),
        "{e}"
    );
    std::fs::write(&p, &bytes).unwrap();
    let e = m
        .load_lora(&p, f32::NAN)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a finite number"), "{e}");
    std::fs::remove_file(&p).ok();
    let e = m
        .load_lora(&temp("absent"), 1.0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA adapter") && e.contains("absent"), "{e}");
    // Nothing was applied on the way.
    assert!(m.loras.is_empty());
    assert_eq!(prefill(&m, &toks), base);
    let _ = n_out;
}

/// Scales per token: an adapter loaded at scale 0 changes nothing until a batch asks for it;
/// a sequence at scale s equals the model loaded at s, and two sequences at different
/// scales in one batch each equal their own run alone, to the bit.
#[test]
fn scales_per_token_follow_the_batch() {
    let spec = TinySpec::default();
    let (mut base, w) = open(&spec);
    let kinds = ["attn_q", "attn_v", "attn_output", "ffn_up", "ffn_down"];
    let pairs: Vec<Pair> = (kinds.iter().enumerate())
        .map(|(i, k)| pair(&w, &format!("blk.{}.{k}.weight", i % 6), 3, 300 + i as u64))
        .collect();
    let p = write(&adapter(&pairs, Some(6.0)), "per-token");
    let toks: Vec<u32> = (0..40).map(|i| (i * 53 % spec.vocab) as u32).collect();
    let plain = prefill(&base, &toks);
    let (mut at, _) = open(&spec);
    at.load_lora(&p, 0.7).unwrap();
    let adapted = prefill(&at, &toks);
    assert_ne!(plain, adapted, "the adapter changes the logits");
    base.load_lora(&p, 0.0).unwrap();
    assert_eq!(prefill(&base, &toks), plain, "loaded at scale 0: unchanged");
    let m = &base;
    let vocab = spec.vocab;
    // Sequence 0 at 0.7, sequence 1 at 0, sequence 2 at the model's own (0): one batch.
    let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&m.config, 64)).collect();
    let mut b = Batch::default();
    for (i, &t) in toks.iter().enumerate() {
        for (seq, s) in [(0, 0.7f32), (1, 0.0), (2, 0.0)] {
            b.push(t, i, seq, true);
            b.lora.push(s);
        }
    }
    let mut st = ForwardState::new();
    let rows = m.forward(&b, &mut caches, &mut st).unwrap();
    for (seq, want) in [(0, &adapted), (1, &plain), (2, &plain)] {
        for i in 0..toks.len() {
            let r = &rows[(i * 3 + seq) * vocab..(i * 3 + seq + 1) * vocab];
            assert_eq!(
                r,
                &want[i * vocab..(i + 1) * vocab],
                "seq {seq} position {i}"
            );
        }
    }
    // A batch whose scales do not fit is refused.
    let mut bad = Batch::for_sequence(&toks[..2], 0, true);
    bad.lora = vec![1.0];
    let mut cache = KvCache::new(&m.config, 64);
    let e = m
        .forward(&bad, std::slice::from_mut(&mut cache), &mut st)
        .unwrap_err();
    assert!(e.to_string().contains("LoRA scales"), "{e}");
    std::fs::remove_file(p).ok();
}

/// Per-token scales across micro-batches and the last layer's compacted rows: three
/// sequences of 350 tokens at three pairs of scales (two adapters on every matrix of every
/// layer), 1050 tokens in one batch (more than one micro-batch of 512), in blocks and
/// interleaved, logits at every 37th position and the last only: each row equals its
/// sequence's run alone on a model loaded at those scales, to the bit.
#[test]
fn scales_per_token_hold_across_micro_batches_and_compacted_rows() {
    use gemma3_model::Output;
    let spec = TinySpec::default();
    let (_, w) = open(&spec);
    let pairs = |seed: u64| -> Vec<Pair> {
        (0..spec.n_layers)
            .flat_map(|l| KINDS.iter().enumerate().map(move |(i, k)| (l, i, *k)))
            .map(|(l, i, k)| {
                pair(
                    &w,
                    &format!("blk.{l}.{k}.weight"),
                    3,
                    seed + (l * 10 + i) as u64,
                )
            })
            .collect()
    };
    let (pa, pb) = (
        write(&adapter(&pairs(1000), Some(6.0)), "ubatch-a"),
        write(&adapter(&pairs(5000), None), "ubatch-b"),
    );
    let scales: [[f32; 2]; 3] = [[0.7, 0.0], [0.0, 1.3], [0.5, -0.4]];
    let len = 350usize;
    let toks: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            (0..len)
                .map(|i| ((i * 53 + s * 7) % spec.vocab) as u32)
                .collect()
        })
        .collect();
    let wants = |i: usize| i.is_multiple_of(37) || i + 1 == len;
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|s| {
            let (mut m, _) = open(&spec);
            m.load_lora(&pa, scales[s][0]).unwrap();
            m.load_lora(&pb, scales[s][1]).unwrap();
            let mut b = Batch::default();
            for (i, &t) in toks[s].iter().enumerate() {
                b.push(t, i, 0, wants(i));
            }
            let mut cache = KvCache::new(&m.config, 1024);
            let mut st = ForwardState::new();
            let rows = m.forward(&b, std::slice::from_mut(&mut cache), &mut st);
            rows.unwrap().to_vec()
        })
        .collect();
    let (mut m, _) = open(&spec);
    m.load_lora(&pa, 0.0).unwrap();
    m.load_lora(&pb, 0.0).unwrap();
    let vocab = spec.vocab;
    let blocks: Vec<(usize, usize)> = (0..3).flat_map(|s| (0..len).map(move |i| (s, i))).collect();
    let interleaved: Vec<(usize, usize)> =
        (0..len).flat_map(|i| (0..3).map(move |s| (s, i))).collect();
    for order in [blocks, interleaved] {
        let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&m.config, 1024)).collect();
        let mut b = Batch::default();
        for &(s, i) in &order {
            let out = if wants(i) {
                Output::Logits
            } else {
                Output::None
            };
            b.push_out(toks[s][i], i, s, out);
            b.lora.extend_from_slice(&scales[s]);
        }
        let mut st = ForwardState::new();
        let rows = m.forward(&b, &mut caches, &mut st).unwrap().to_vec();
        let (mut r, mut k) = (0, [0usize; 3]);
        for &(s, i) in order.iter().filter(|&&(_, i)| wants(i)) {
            let want = &alone[s][k[s] * vocab..(k[s] + 1) * vocab];
            assert_eq!(
                &rows[r * vocab..(r + 1) * vocab],
                want,
                "sequence {s} position {i}"
            );
            r += 1;
            k[s] += 1;
        }
    }
    for p in [pa, pb] {
        std::fs::remove_file(p).ok();
    }
}
