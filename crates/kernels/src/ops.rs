//! Element-wise and small vector operations of the forward pass.

/// `out = x / sqrt(mean(x²) + eps) * w` (the norm weight already holds
/// Gemma's `1 + w` in GGUF files).
#[inline]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// 1/sqrt(mean(x²) + eps) as ggml computes it: f32 squares summed in f64,
/// the mean rounded to f32. The sum runs in 8 independent lanes (which the
/// compiler vectorizes) instead of one long dependent chain; in f64 the
/// order changes the f32 mean only in the rarest ties.
///
/// NaN where the mean is not finite (a square, or the mean, past f32's
/// range: values above about 1.8·10¹⁹), where ggml's scale is 0 and the
/// norm's output all zeros: with NaN the logits' and hidden states' checks
/// name the broken input (a control vector or LoRA adapter far too
/// strong, say), where zeros gave uniform logits and a reply of `<pad>`s.
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mut lanes = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += (c[i] * c[i]) as f64;
        }
    }
    let mut sum = lanes.iter().sum::<f64>();
    for &v in tail {
        sum += (v * v) as f64;
    }
    let mean = (sum / x.len() as f64) as f32;
    if !mean.is_finite() {
        return f32::NAN;
    }
    1.0 / (mean + eps).sqrt()
}

/// In-place RMSNorm.
#[inline]
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
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
    assert!(up.len() >= gate.len(), "geglu: up shorter than gate");
    #[cfg(target_arch = "x86_64")]
    match crate::simd::level() {
        crate::simd::Level::Avx512 => return crate::x86::geglu_avx512(gate, up, gelu_f16_table()),
        crate::simd::Level::Avx2 => return crate::x86::geglu_avx2(gate, up, gelu_f16_table()),
        crate::simd::Level::Scalar => {}
    }
    geglu_inplace_ref(gate, up)
}

/// Whether the element-wise AVX-512 paths run: the chosen kernel table is
/// an AVX-512 one (so `GEMMA3_FORCE_SCALAR` and `GEMMA3_KERNELS=avx2` turn
/// them off). Decided by the table's level, not by its name, which a new
/// table changed once (GeGLU then silently ran its twin).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| crate::simd::level() == crate::simd::Level::Avx512)
}

/// The wrapping sum of `bytes` as little-endian u64 words, read as
/// `streams` (1, 2 or 4) equal parts side by side, one 64-byte line of each
/// in turn: a loop that only reads, for `gemma3 bench`'s measure of the
/// memory's read rate. The length must be a multiple of 64 × `streams`.
///
/// With the AVX-512 level it reads a 64-byte line per load into four sums:
/// on the Zen 5, one thread, it read 40 GB/s where the portable loop (one
/// sum of eight words a line) read 35.
pub fn read_sum(bytes: &[u8], streams: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        return crate::x86::read_sum_avx512(bytes, streams);
    }
    read_sum_ref(bytes, streams)
}

/// [`read_sum`]'s conditions on its arguments.
pub(crate) fn check_read_sum(bytes: &[u8], streams: usize) {
    assert!(
        matches!(streams, 1 | 2 | 4),
        "read_sum: 1, 2 or 4 streams, not {streams}"
    );
    assert_eq!(
        bytes.len() % (64 * streams),
        0,
        "read_sum: whole lines per stream"
    );
}

/// [`read_sum`] in portable code.
pub fn read_sum_ref(bytes: &[u8], streams: usize) -> u64 {
    check_read_sum(bytes, streams);
    let part = bytes.len() / streams;
    let mut acc = [[0u64; 8]; 4];
    for i in (0..part).step_by(64) {
        for (k, a) in acc.iter_mut().enumerate().take(streams) {
            let line = &bytes[k * part + i..k * part + i + 64];
            for (a, w) in a.iter_mut().zip(line.chunks_exact(8)) {
                *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
            }
        }
    }
    acc.iter().flatten().fold(0, |s, &w| s.wrapping_add(w))
}

/// `dst[i] = src[i]` rounded to the nearest f16 (ties to even), as
/// `half::f16::from_f32` rounds.
pub fn to_f16(src: &[f32], dst: &mut [half::f16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        return crate::x86::to_f16_avx512(src, dst);
    }
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src)
}

/// Each value rounded to the nearest f16 (ties to even), in place.
pub fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        return crate::x86::round_f16_avx512(x);
    }
    use half::slice::HalfFloatSliceExt;
    let mut buf = [half::f16::ZERO; 64];
    for chunk in x.chunks_mut(64) {
        let b = &mut buf[..chunk.len()];
        b.convert_from_f32_slice(chunk);
        b.convert_to_f32_slice(chunk);
    }
}

/// [`geglu_inplace`] in plain Rust (the SIMD version's twin: same bits).
pub fn geglu_inplace_ref(gate: &mut [f32], up: &[f32]) {
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
pub(crate) fn gelu_f16_table() -> &'static [f32; 65536] {
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

/// ln Σᵢ e^xᵢ, the log-softmax normaliser of a row of logits, to within a
/// few 10⁻⁷ relative to its f64 value: the max m first, then e^(xᵢ − m)
/// through [`exp_poly`](crate::simd::exp_poly) in 16 lanes of f32, each
/// 1024-entry block's lanes added in f64. A vocabulary row (262 144 logits)
/// had taken ~1.3 ms with one f64 `exp` per entry; a classifier scoring
/// labels needs one per label token. −∞ entries add nothing; an empty row
/// or one whose max is ±∞ or NaN gives that max, and a NaN elsewhere gives NaN.
pub fn logsumexp(x: &[f32]) -> f32 {
    crate::vectorized!(fn(x: &[f32]) -> f32 {
        let max = max_lanes(x);
        if !max.is_finite() {
            return max;
        }
        max + sum_exp_sub(x, max).ln() as f32
    })
}

/// The largest entry (NaNs ignored as by `f32::max`), in 16 lanes.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    (lanes.iter().chain(tail)).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Σᵢ e^(xᵢ − m) for xᵢ ≤ m: f32 lanes within a block, f64 across blocks.
#[inline(always)]
fn sum_exp_sub(x: &[f32], m: f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(1024) {
        let mut lanes = [0.0f32; 16];
        let chunks = block.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                lanes[i] += crate::simd::exp_poly(c[i] - m);
            }
        }
        total += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
        total += (tail.iter())
            .map(|&v| f64::from(crate::simd::exp_poly(v - m)))
            .sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::rms_scale;

    /// 1/sqrt(mean(x²) + eps), computed by hand; NaN once the squares
    /// pass f32's range (where a zero scale would silently zero the norm).
    #[test]
    fn rms_scale_by_hand_and_nan_past_f32_range() {
        // mean((3, 4)²) = 12.5.
        assert_eq!(rms_scale(&[3.0, 4.0], 0.0), 1.0 / 12.5f32.sqrt());
        // 640 values of 2 (80 chunks of 8): mean 4, plus eps 1e-6.
        assert_eq!(rms_scale(&[2.0; 640], 1e-6), 1.0 / 4.000001f32.sqrt());
        // 1e19² = 1e38 is still an f32; 2e19² is not.
        assert!(rms_scale(&[1e19; 640], 1e-6).is_finite());
        for x in [[2e19f32; 640], [-1e20; 640]] {
            assert!(rms_scale(&x, 1e-6).is_nan());
        }
        let mut one = [0.5f32; 641];
        one[640] = 3e19; // in the tail past the 8-wide chunks
        assert!(rms_scale(&one, 1e-6).is_nan());
    }
}
