//! Logits of the real model against two independent references (tests/data/README.md):
//!
//! - llama.cpp (`reference.json`: its top-5 logits at every position of 3 prompts, and
//!   `llama_cpp_path_logits.json`: its logits along the 10 greedy paths);
//! - the exact logits (`exact_logits.json`: a float64 forward pass over the weights as the
//!   `gguf` package dequantizes them, no activation quantization, no f16 KV cache).
//!
//! Both engines quantize activations to 8 bits (ggml's Q8_0 / Q8_K blocks) and keep K/V in
//! f16, so both are noisy relative to the exact logits, and this model is sensitive: one
//! activation rounding that flips early in a layer shifts later logits by tenths (forcing the
//! scalar kernels instead of the SIMD ones, which differ only in the order of f32 additions,
//! moves a logit of "Q: What is 12 + 7?" by 1.77). Measured on the 10 greedy paths, llama.cpp's logits are up
//! to 1.49 from the exact ones (rms 0.32); the differences between a token's logit and the best
//! token's logit, which are what sampling sees, up to 1.33 (rms 0.234). So:
//!
//! 1. accuracy: our relative logits are no further from the exact ones than llama.cpp's, with
//!    a margin (rms ≤ 1.2×, max ≤ 1.5× llama.cpp's, on the same 1,280 relative logits;
//!    observed: ours rms 0.208–0.230, max 1.10–1.60 across kernel tables and versions;
//!    llama.cpp rms 0.234, max 1.33);
//! 2. top-1 at every prompt position: the exact best token, unless its exact lead is below
//!    `NEAR_TIE` = 0.25 (llama.cpp's rms error on relative logits, rounded up);
//! 3. llama.cpp's top-5 logits within `TOL_VS_LLAMA` of ours, and its top-1 ours unless its
//!    lead is below 0.1 or the exact logits rank our token within `NEAR_TIE` of its.

mod common;

use common::{all_logits, argmax, data_dir, max_abs, model, pairs, reference, rms};
use serde_json::Value;

/// Largest |ours − llama.cpp| for one of llama.cpp's top-5 prompt logits. On these very
/// logits llama.cpp is up to 1.14 from the exact values and we up to 1.14 (rms 0.30 and
/// 0.27): neither is the truth, so the bound is their typical disagreement plus llama.cpp's
/// worst deviation: 1.5 (observed: 0.76–0.84 with the scalar kernels, 1.19–1.26 with three
/// successive versions of the AVX-512 VNNI ones).
const TOL_VS_LLAMA: f64 = 1.5;
/// An exact lead below this may be reversed by 8-bit activation noise.
const NEAR_TIE: f64 = 0.25;
/// llama.cpp's own top-2 gap below which it calls a near-tie (the reference's convention).
const LLAMA_NEAR_TIE: f64 = 0.1;

fn json(name: &str) -> Value {
    let p = data_dir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{name}: {e}")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn relative_logits_are_as_accurate_as_llama_cpp() {
    let Some((m, _)) = model("relative_logits_are_as_accurate_as_llama_cpp") else {
        return;
    };
    let exact = json("exact_logits.json");
    let llama = json("llama_cpp_path_logits.json");
    let vocab = m.config.vocab_size;
    let (mut ours_rel, mut llama_rel, mut ours_abs) = (Vec::new(), Vec::new(), Vec::new());
    for (ci, case) in reference()["greedy32"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let e = &exact["cases"][ci];
        let l = &llama["cases"][ci];
        assert_eq!(e["prompt"], case["prompt"]);
        assert_eq!(l["prompt"], case["prompt"]);
        // The prompt, then llama.cpp's first 31 greedy tokens: position n_prompt − 1 + s
        // predicts generated token s.
        let mut ids = common::ids(&case["prompt_ids"]);
        let n_prompt = ids.len();
        ids.extend(&common::ids(&case["ids"])[..31]);
        let logits = all_logits(m, &ids);
        for (s, step) in e["greedy_steps"].as_array().unwrap().iter().enumerate() {
            let row = &logits[(n_prompt - 1 + s) * vocab..(n_prompt + s) * vocab];
            let top5 = pairs(&step["top5"]);
            let at_llama = pairs(&l["at_exact_top5"][s]);
            let (id0, e0) = top5[0];
            for (j, &(id, ev)) in top5.iter().enumerate() {
                assert_eq!(at_llama[j].0, id);
                ours_abs.push(row[id as usize] as f64 - ev);
                if j > 0 {
                    ours_rel.push((row[id as usize] - row[id0 as usize]) as f64 - (ev - e0));
                    llama_rel.push((at_llama[j].1 - at_llama[0].1) - (ev - e0));
                }
            }
        }
    }
    assert_eq!(ours_rel.len(), 10 * 32 * 4);
    let (r_o, r_l, m_o, m_l) = (
        rms(&ours_rel),
        rms(&llama_rel),
        max_abs(&ours_rel),
        max_abs(&llama_rel),
    );
    eprintln!(
        "relative logits (logit − best token's) vs exact over {} logits: ours rms {r_o:.3} max \
         {m_o:.3}; llama.cpp rms {r_l:.3} max {m_l:.3}. Absolute logits: ours rms {:.3} max {:.3}",
        ours_rel.len(),
        rms(&ours_abs),
        max_abs(&ours_abs)
    );
    assert!(
        r_o <= 1.2 * r_l,
        "our relative logits are less accurate than llama.cpp's: rms {r_o:.3} vs {r_l:.3}"
    );
    assert!(
        m_o <= 1.5 * m_l,
        "our relative logits are less accurate than llama.cpp's: max {m_o:.3} vs {m_l:.3}"
    );
}

#[test]
fn prompt_logits_match_llama_cpp_top5_and_exact_top1() {
    let Some((m, _)) = model("prompt_logits_match_llama_cpp_top5_and_exact_top1") else {
        return;
    };
    let exact = json("exact_logits.json");
    let vocab = m.config.vocab_size;
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (ci, case) in reference()["greedy32"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let Some(top5) = case.get("prompt_top5_logits") else {
            continue;
        };
        let name = case["prompt"].as_str().unwrap();
        let prompt = common::ids(&case["prompt_ids"]);
        let top5 = top5.as_array().unwrap();
        let ex = exact["cases"][ci]["prompt_positions"].as_array().unwrap();
        assert_eq!(top5.len(), prompt.len());
        assert_eq!(ex.len(), prompt.len());
        let logits = all_logits(m, &prompt);
        for (i, pos) in top5.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let ours = argmax(row);
            let llama = pairs(pos);
            let ex_top = pairs(&ex[i]["top5"]);
            let ex_at_llama = pairs(&ex[i]["at_llama_cpp_top5"]);
            // The exact logit of `id`, when the fixture has it.
            let exact_of = |id: u32| {
                ex_top
                    .iter()
                    .chain(&ex_at_llama)
                    .find(|p| p.0 == id)
                    .map(|p| p.1)
            };
            // (2) the exact best token, unless its exact lead is a near-tie.
            let exact_lead = ex_top[0].1 - ex_top[1].1;
            if exact_lead >= NEAR_TIE {
                assert_eq!(
                    ours, ex_top[0].0,
                    "{name:?} position {i}: our best token {ours}, the exact best {} (lead {exact_lead:.3})",
                    ex_top[0].0
                );
            }
            // (3) llama.cpp's best token, unless a near-tie for it or for the exact logits.
            let llama_lead = llama[0].1 - llama[1].1;
            if ours != llama[0].0 && llama_lead >= LLAMA_NEAR_TIE {
                let ok = match (exact_of(ours), exact_of(llama[0].0)) {
                    (Some(a), Some(b)) => a >= b - NEAR_TIE,
                    _ => false,
                };
                assert!(
                    ok,
                    "{name:?} position {i}: our best token {ours}, llama.cpp's {} (its lead \
                     {llama_lead:.3}), and the exact logits do not call it a near-tie",
                    llama[0].0
                );
            }
            for &(id, want) in &llama {
                let got = row[id as usize] as f64;
                let d = (got - want).abs();
                worst = worst.max(d);
                assert!(
                    d <= TOL_VS_LLAMA,
                    "{name:?} position {i} token {id}: ours {got:.4}, llama.cpp {want:.4} (|Δ| {d:.4} > {TOL_VS_LLAMA})"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        (6 + 7 + 11) * 5,
        "all 3 prompts' positions were checked"
    );
    eprintln!(
        "max |ours − llama.cpp| over {checked} top-5 prompt logits: {worst:.4} (tolerance {TOL_VS_LLAMA})"
    );
}
