//! A plain, slow, independent Gemma 3 forward pass in f64, written from the Hugging Face
//! description (transformers `modeling_gemma3.py`: `Gemma3DecoderLayer`, `Gemma3Attention`,
//! `Gemma3RMSNorm`, `Gemma3MLP`) with llama.cpp's GGUF conventions (`llm_build_gemma3`):
//!
//! - embedding × sqrt(d_model);
//! - RMSNorm `x / sqrt(mean(x²) + eps) · g`, where the GGUF norm weight g already holds
//!   Gemma's `1 + w`;
//! - per head q_norm / k_norm, then NeoX RoPE (dimension i pairs with i + d/2, θ_i =
//!   pos · base^(−2i/d)), base 10000 on sliding-window layers (HF `rope_local_base_freq`) and
//!   `rope.freq_base` on global ones; queries scaled by 1/sqrt(head_dim)
//!   (`query_pre_attn_scalar` = head_dim when the file does not say);
//! - every 6th layer (l + 1 ≡ 0 mod 6) global, the others see keys p − window + 1 ..= p;
//! - grouped KV heads (query head h reads KV head h / (n_heads / n_kv_heads));
//! - post-attention and post-FFN norms before each residual add; GeGLU with tanh-GELU;
//! - final norm, tied head (or `output.weight`).
//!
//! It shares no code with the engine. Its concessions to the engine's design, which follows
//! llama.cpp's (ggml's) rounding, are optional (`ggml_rounding`): the scaled queries, K and V
//! rounded to f16 (an f16 KV cache, and llama.cpp's f16 q·K with flash attention off), and
//! GELU evaluated as ggml does by default (GGML_GELU_FP16: 0 below −10, x above 10, else
//! f16(gelu_tanh(f16(x))); ref: ggml-cpu vec.h `ggml_vec_gelu_f32`).

#![allow(dead_code)]

use super::tiny::{TinySpec, TinyTensor};
use half::f16;
use std::collections::BTreeMap;

pub struct Reference<'a> {
    pub spec: &'a TinySpec,
    pub w: &'a BTreeMap<String, TinyTensor>,
    /// Round the scaled queries, K and V to f16 and evaluate GELU through f16, as ggml does.
    pub ggml_rounding: bool,
}

fn matvec(w: &TinyTensor, x: &[f64]) -> Vec<f64> {
    let (cols, rows) = (w.dims[0] as usize, w.dims[1] as usize);
    assert_eq!(x.len(), cols);
    (0..rows)
        .map(|r| {
            w.data[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(&a, &b)| a as f64 * b)
                .sum()
        })
        .collect()
}

fn rms_norm(x: &[f64], g: &TinyTensor, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(&g.data)
        .map(|(&v, &g)| v * s * g as f64)
        .collect()
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn rope_neox(x: &mut [f64], pos: usize, base: f64) {
    let d = x.len();
    for i in 0..d / 2 {
        let theta = pos as f64 * base.powf(-((2 * i) as f64) / d as f64);
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[i], x[i + d / 2]);
        x[i] = a * c - b * s;
        x[i + d / 2] = a * s + b * c;
    }
}

fn f16(x: f64) -> f64 {
    f16::from_f32(x as f32).to_f32() as f64
}

/// GELU as ggml evaluates it by default (GGML_GELU_FP16).
fn gelu_ggml(x: f64) -> f64 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16(gelu_tanh(f16(x)))
    }
}

fn to_f16(v: &mut [f64]) {
    for x in v {
        *x = f16::from_f32(*x as f32).to_f32() as f64;
    }
}

impl Reference<'_> {
    fn t(&self, name: &str) -> &TinyTensor {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// Logits (vocab) at every position of one sequence starting at position 0.
    pub fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        self.logits_traced(tokens, &mut |_, _, _| {})
    }

    /// [`Self::logits`], reporting the intermediates the engine's trace hook names:
    /// (layer, name, n × width values) for "q" (normed, rotated, scaled), "k" (normed,
    /// rotated), "attn" (before Wo), "attn_out" and "l_out" (residual stream after each half),
    /// and, as layer n_layers, "out_norm" (the final hidden states).
    pub fn logits_traced(
        &self,
        tokens: &[u32],
        trace: &mut dyn FnMut(usize, &'static str, Vec<f64>),
    ) -> Vec<Vec<f64>> {
        let s = self.spec;
        let (d, hd) = (s.d_model, s.head_dim);
        let eps = s.rms_eps as f64;
        let n = tokens.len();
        let embed = self.t("token_embd.weight");
        let mut h: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                let row = &embed.data[t as usize * d..(t as usize + 1) * d];
                row.iter().map(|&v| v as f64 * (d as f64).sqrt()).collect()
            })
            .collect();
        let group = s.n_heads / s.n_kv_heads;
        for l in 0..s.n_layers {
            let name = |x: &str| format!("blk.{l}.{x}.weight");
            let global = (l + 1) % 6 == 0;
            let base = if global {
                s.rope_base_global as f64
            } else {
                10_000.0
            };
            // q: n × heads × hd, k/v: n × kv_heads × hd
            let mut q = Vec::with_capacity(n);
            let mut k = Vec::with_capacity(n);
            let mut v = Vec::with_capacity(n);
            let (mut q_flat, mut k_flat) = (Vec::new(), Vec::new());
            for (p, hp) in h.iter().enumerate() {
                let x = rms_norm(hp, self.t(&name("attn_norm")), eps);
                let qp = matvec(self.t(&name("attn_q")), &x);
                let kp = matvec(self.t(&name("attn_k")), &x);
                let mut vp = matvec(self.t(&name("attn_v")), &x);
                let mut qh: Vec<Vec<f64>> = qp
                    .chunks(hd)
                    .map(|c| rms_norm(c, self.t(&name("attn_q_norm")), eps))
                    .collect();
                let mut kh: Vec<Vec<f64>> = kp
                    .chunks(hd)
                    .map(|c| rms_norm(c, self.t(&name("attn_k_norm")), eps))
                    .collect();
                for x in qh.iter_mut() {
                    rope_neox(x, p, base);
                    x.iter_mut().for_each(|v| *v /= (hd as f64).sqrt());
                    if self.ggml_rounding {
                        to_f16(x);
                    }
                }
                for x in kh.iter_mut() {
                    rope_neox(x, p, base);
                    if self.ggml_rounding {
                        to_f16(x);
                    }
                }
                if self.ggml_rounding {
                    to_f16(&mut vp);
                }
                let vh: Vec<Vec<f64>> = vp.chunks(hd).map(|c| c.to_vec()).collect();
                q_flat.extend(qh.iter().flatten());
                k_flat.extend(kh.iter().flatten());
                q.push(qh);
                k.push(kh);
                v.push(vh);
            }
            trace(l, "q", q_flat);
            trace(l, "k", k_flat);
            let (mut attn_flat, mut attn_out) = (Vec::new(), Vec::new());
            for p in 0..n {
                let lo = if global {
                    0
                } else {
                    (p + 1).saturating_sub(s.sliding_window)
                };
                let mut attn = Vec::with_capacity(s.n_heads * hd);
                for (head, qh) in q[p].iter().enumerate() {
                    let g = head / group;
                    let scores: Vec<f64> = (lo..=p)
                        .map(|j| qh.iter().zip(&k[j][g]).map(|(a, b)| a * b).sum())
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let mut o = vec![0.0; hd];
                    for (j, ej) in (lo..=p).zip(&e) {
                        for (oi, vi) in o.iter_mut().zip(&v[j][g]) {
                            *oi += ej / z * vi;
                        }
                    }
                    attn.extend(o);
                }
                attn_flat.extend(&attn);
                let o = matvec(self.t(&name("attn_output")), &attn);
                let o = rms_norm(&o, self.t(&name("post_attention_norm")), eps);
                for (a, b) in h[p].iter_mut().zip(&o) {
                    *a += b;
                }
                attn_out.extend(&h[p]);
                let x = rms_norm(&h[p], self.t(&name("ffn_norm")), eps);
                let gate = matvec(self.t(&name("ffn_gate")), &x);
                let up = matvec(self.t(&name("ffn_up")), &x);
                let gelu = if self.ggml_rounding {
                    gelu_ggml
                } else {
                    gelu_tanh
                };
                let act: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| gelu(g) * u).collect();
                let o = matvec(self.t(&name("ffn_down")), &act);
                let o = rms_norm(&o, self.t(&name("post_ffw_norm")), eps);
                for (a, b) in h[p].iter_mut().zip(&o) {
                    *a += b;
                }
            }
            trace(l, "attn", attn_flat);
            trace(l, "attn_out", attn_out);
            trace(l, "l_out", h.iter().flatten().copied().collect());
        }
        let normed: Vec<Vec<f64>> = h
            .iter()
            .map(|hp| rms_norm(hp, self.t("output_norm.weight"), eps))
            .collect();
        trace(
            s.n_layers,
            "out_norm",
            normed.iter().flatten().copied().collect(),
        );
        let head = self
            .w
            .get("output.weight")
            .unwrap_or_else(|| self.t("token_embd.weight"));
        normed.iter().map(|x| matvec(head, x)).collect()
    }

    /// The final hidden states (after the output norm, d_model each) at every position.
    pub fn hidden(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let d = self.spec.d_model;
        let mut out = Vec::new();
        self.logits_traced(tokens, &mut |_, name, v| {
            if name == "out_norm" {
                out = v.chunks(d).map(|c| c.to_vec()).collect();
            }
        });
        out
    }
}
