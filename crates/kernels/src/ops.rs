//! Element-wise and small vector operations of the forward pass.

/// `out = x / sqrt(mean(x²) + eps) * w` (the norm weight already holds
/// Gemma's `1 + w` in GGUF files).
#[inline]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// In-place RMSNorm.
#[inline]
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// `gate[i] = gelu(gate[i]) * up[i]` (GeGLU), with GELU evaluated as ggml
/// evaluates it by default: for |x| < 10, the input is rounded to f16 and the
/// result is `f16(gelu_tanh(f16(x)))` from a 65536-entry table; below -10 it
/// is 0 and above 10 it is x. Following llama.cpp's rounding here keeps our
/// greedy outputs on its tokens at near-ties, and a table lookup is much
/// cheaper than tanh. ref: ggml-cpu vec.h ggml_vec_geglu_f32 (GGML_GELU_FP16).
pub fn geglu_inplace(gate: &mut [f32], up: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    let table = gelu_f16_table();
    let mut h = [half::f16::ZERO; 256];
    for (g, u) in gate.chunks_mut(256).zip(up.chunks(256)) {
        let h = &mut h[..g.len()];
        h.convert_from_f32_slice(g);
        for ((x, &u), hx) in g.iter_mut().zip(u).zip(h.iter()) {
            let v = if *x <= -10.0 {
                0.0
            } else if *x >= 10.0 {
                *x
            } else {
                table[hx.to_bits() as usize]
            };
            *x = v * u;
        }
    }
}

/// f16(gelu_tanh(x)) for every f16 bit pattern x, as f32.
fn gelu_f16_table() -> &'static [f32; 65536] {
    static TABLE: std::sync::OnceLock<Box<[f32; 65536]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0.0f32; 65536]);
        for (i, v) in t.iter_mut().enumerate() {
            let x = half::f16::from_bits(i as u16).to_f32();
            *v = half::f16::from_f32(gelu_tanh(x)).to_f32();
        }
        t
    })
}

/// `y += x`.
#[inline]
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}
