//! The sampler: a small value type with its own seeded RNG, so results for a
//! seed do not shift when a dependency changes.
//!
//! Order of operations follows llama.cpp's default chain: penalties → top-k →
//! top-p → min-p → temperature → draw. Temperature ≤ 0 is greedy (argmax).

/// Sampling settings. `validate` rejects absurd values with a message naming
/// the field.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: usize,
    /// 1 = no limit.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off. Divides positive logits (multiplies negative ones) of tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    /// How many of the latest tokens (prompt included) the three penalties
    /// look at, as llama.cpp's `--repeat-last-n`: 0 = none (the penalties
    /// are off), [`ALL_HISTORY`] = all of them (llama.cpp's −1).
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token seen (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of every token seen (OpenAI semantics).
    pub frequency_penalty: f32,
    /// (token, bias) added to that token's logit before anything else
    /// (OpenAI's `logit_bias`, −100..=100: −100 bans a token in practice,
    /// +100 all but forces it; or −∞, which bans it outright). Ids are checked against the vocabulary by
    /// whoever builds the params.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

/// [`SamplingParams::repeat_last_n`] for the whole history (llama.cpp's −1).
pub const ALL_HISTORY: usize = usize::MAX;

impl Default for SamplingParams {
    fn default() -> Self {
        Self::chat_default()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }

    /// Gemma 3's own generation config: top-k 64, top-p 0.95, temperature 1.
    pub fn chat_default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            ..Self::greedy()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number, got {v}"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repeat_penalty", self.repeat_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be between 0 and 100, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        // Not below 0.01: a logit divided by 1e-38 overflows to infinity.
        if !(0.01..=10.0).contains(&self.repeat_penalty) {
            return Err(format!(
                "repeat_penalty must be in [0.01, 10], got {}",
                self.repeat_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            // −∞: the token is never drawn (llama.cpp's `false` bias; the
            // server's `ignore_eos` bans the end tokens so).
            .find(|(_, b)| !(-100.0..=100.0).contains(b) && *b != f32::NEG_INFINITY)
        {
            return Err(format!(
                "logit_bias must be in [-100, 100] (or -inf), got {b} for token {id}"
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A seed for a request that asked for a random one (`-1`, or none given):
/// the clock's nanoseconds, mixed with a process-wide count so that two
/// requests in the same nanosecond still differ.
pub fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// xorshift64* — tiny, fast, and ours (stable across dependency updates).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 scrambles the seed so that 0, 1, 2… give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A NaN or +∞ logit, found before sampling: the model's output is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonFiniteLogit {
    /// The first token whose logit is NaN or +∞.
    pub token: u32,
}

/// A sampler for one sequence.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// (token, logit) candidates, reused between calls.
    cand: Vec<(u32, f32)>,
    /// Penalised copy of the logits, reused between calls.
    work: Vec<f32>,
}

/// The chosen token and its log-probability under the unmodified model
/// distribution, plus the top alternatives if asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            cand: Vec::new(),
            work: Vec::new(),
        }
    }

    /// Choose the next token from `logits`, given the tokens generated (and
    /// prompted) so far for penalties.
    ///
    /// A NaN or +∞ logit is an error naming the first such token (a broken
    /// model), where a NaN among the candidates would otherwise make every
    /// probability NaN and the draw fall through to an arbitrary token. A
    /// −∞ logit is a token that cannot be drawn; a row where every token is
    /// −∞ (after the penalties and biases) is the same error, naming token 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, NonFiniteLogit> {
        if let Some(i) = first_invalid(logits) {
            return Err(NonFiniteLogit { token: i as u32 });
        }
        self.sample_checked(logits, history)
    }

    /// [`Sampler::sample`] of logits known to hold no NaN or +∞ (a pass
    /// over the vocabulary saved); an error only where every token is −∞.
    pub(crate) fn sample_checked(
        &mut self,
        logits: &[f32],
        history: &[u32],
    ) -> Result<u32, NonFiniteLogit> {
        let p = &self.params;
        let penalties =
            (p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
                && p.repeat_last_n > 0
                && !history.is_empty();
        let logits: &[f32] = if penalties || !p.logit_bias.is_empty() {
            self.work.clear();
            self.work.extend_from_slice(logits);
            for &(id, b) in &p.logit_bias {
                if let Some(l) = self.work.get_mut(id as usize) {
                    *l += b;
                }
            }
            apply_penalties(&mut self.work, history, p);
            &self.work
        } else {
            logits
        };
        let none_left = || NonFiniteLogit { token: 0 };
        if p.is_greedy() {
            let t = argmax(logits);
            return match logits.get(t as usize) {
                Some(&l) if l > f32::NEG_INFINITY => Ok(t),
                _ => Err(none_left()),
            };
        }
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            p.top_k.min(logits.len())
        };
        top_k_into(logits, k, &mut self.cand);
        // Softmax at temperature 1 for top-p / min-p (as llama.cpp does).
        let max = match self.cand.first() {
            Some(&(_, l)) if l > f32::NEG_INFINITY => l,
            _ => return Err(none_left()),
        };
        let mut probs: Vec<f32> = self.cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let thresh = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&x| x >= thresh).count().max(1));
        }
        self.cand.truncate(keep);
        // Temperature, then draw.
        let t = p.temperature;
        let mut w: Vec<f32> = self.cand.iter().map(|c| ((c.1 - max) / t).exp()).collect();
        let total: f32 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= total);
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (c, &pr) in self.cand.iter().zip(&w) {
            acc += pr;
            if r < acc {
                return Ok(c.0);
            }
        }
        // The rounded weights summed to a little under r: the last candidate
        // that can be drawn (never a −∞ one, such as a token banned by a
        // logit bias; the first candidate's weight is 1 before scaling).
        let drawable = (self.cand.iter().zip(&w)).rev().find(|(_, &pr)| pr > 0.0);
        Ok(drawable.map_or(self.cand[0].0, |(c, _)| c.0))
    }
}

/// The `k` best (id, logit) pairs, logit descending then id ascending, in
/// that order, into `cand`.
fn top_k_into(logits: &[f32], k: usize, cand: &mut Vec<(u32, f32)>) {
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    cand.clear();
    if k == 0 {
        return;
    }
    if k < logits.len() {
        // One pass that keeps only logits above the k-th best seen so far,
        // selecting down to k whenever 4k have gathered: a logit equal to
        // that k-th best comes later, so has a higher id, and loses to it.
        // The same k as selecting over all 262144, without moving them all.
        let mut kth: Option<f32> = None;
        for (i, &l) in logits.iter().enumerate() {
            if kth.is_none_or(|t| l.total_cmp(&t).is_gt()) {
                cand.push((i as u32, l));
                if cand.len() == 4 * k {
                    cand.select_nth_unstable_by(k - 1, desc);
                    cand.truncate(k);
                    kth = Some(cand[k - 1].1);
                }
            }
        }
        if cand.len() > k {
            cand.select_nth_unstable_by(k - 1, desc);
            cand.truncate(k);
        }
    } else {
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
    }
    cand.sort_unstable_by(desc);
}

/// The index of the first NaN or +∞, if any (−∞ is a banned token, not an
/// error): a search only when [`all_finite`] found something.
fn first_invalid(v: &[f32]) -> Option<usize> {
    if all_finite(v) {
        None
    } else {
        v.iter().position(|&x| x.is_nan() || x == f32::INFINITY)
    }
}

/// Whether every value is finite (no NaN, +∞ or −∞), in one pass that
/// vectorizes: x·0 is 0 for a finite x and NaN for an infinite one or a
/// NaN, so the lanes' sums stay finite exactly when every value is.
pub fn all_finite(v: &[f32]) -> bool {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            lanes[l] += c[l] * 0.0;
        }
    }
    lanes.iter().chain(tail).all(|x| x.is_finite())
}

fn apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    let window = p.repeat_last_n.min(history.len());
    let recent = &history[history.len() - window..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in recent {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &n) in &counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if p.repeat_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / p.repeat_penalty
            } else {
                *l * p.repeat_penalty
            };
        }
        *l -= p.presence_penalty + p.frequency_penalty * n as f32;
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value first, in 16 independent lanes (branch-free, so it
    // vectorizes: 262144 logits per generated token), then its first index.
    // NaNs never win here; all-NaN (or empty) gives 0. (`Sampler::sample`
    // returns a non-finite logit's token before it gets here.)
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let max = (lanes.iter().chain(tail)).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let Some(c) = (logits.chunks(16)).position(|c| c.iter().fold(false, |a, &v| a | (v == max)))
    else {
        return 0;
    };
    (16 * c + logits[16 * c..].iter().position(|&v| v == max).unwrap_or(0)) as u32
}

/// log-softmax of one entry: `logits[i] - logsumexp(logits)`.
pub fn logprob(logits: &[f32], i: u32) -> f32 {
    logits[i as usize] - logsumexp(logits)
}

/// log Σ exp(logits), the log-softmax normaliser: vectorized, within a few
/// 10⁻⁷ relative of its f64 value ([`gemma3_kernels::ops::logsumexp`]).
pub fn logsumexp(logits: &[f32]) -> f32 {
    gemma3_kernels::ops::logsumexp(logits)
}

/// The `k` most likely tokens and their log-probabilities (`logit - lse`,
/// with `lse` = [`logsumexp`] of the same logits), most likely first; ties
/// go to the lower id.
pub fn top_logprobs(logits: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    let mut cand = Vec::new();
    top_k_into(logits, k.min(logits.len()), &mut cand);
    cand.into_iter().map(|(t, l)| (t, l - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
    }

    /// The one-pass top-k equals sorting everything and taking k, with many
    /// ties (which the id order breaks) and for k around the 4k batches.
    #[test]
    fn top_k_matches_a_full_sort() {
        let mut rng = Rng::new(5);
        let mut cand = Vec::new();
        for len in [1usize, 5, 64, 1000, 20_000] {
            let v: Vec<f32> = (0..len)
                .map(|_| (rng.next_u64() % 50) as f32 - 25.0)
                .collect();
            let mut all: Vec<(u32, f32)> =
                v.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for k in [1usize, 2, 3, 40, 64, 999, 1000, 5000] {
                let k = k.min(len);
                top_k_into(&v, k, &mut cand);
                assert_eq!(cand, all[..k], "len {len} k {k}");
            }
        }
    }

    /// The chunked argmax equals the first index of the maximum, on lengths
    /// around the 16-lane chunks, with ties across chunks, NaNs and tails.
    #[test]
    fn argmax_is_the_first_index_of_the_maximum() {
        let naive = |v: &[f32]| {
            let mut best = None;
            for (i, &x) in v.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b: usize| x > v[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut rng = Rng::new(3);
        for len in [0usize, 1, 15, 16, 17, 33, 100, 262_144] {
            for _ in 0..4 {
                // Few distinct values, so the maximum is often tied.
                let mut v: Vec<f32> = (0..len).map(|_| (rng.next_u64() % 7) as f32).collect();
                if len > 20 {
                    v[len / 3] = f32::NAN;
                }
                assert_eq!(argmax(&v), naive(&v), "len {len}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }

    #[test]
    fn seed_reproducible_and_distribution_plausible() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
            ..SamplingParams::greedy()
        };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let mut counts = [0usize; 4];
        for _ in 0..60000 {
            let t = a.sample(&logits, &[]).unwrap();
            assert_eq!(t, b.sample(&logits, &[]).unwrap());
            counts[t as usize] += 1;
        }
        // Probabilities 1/6, 2/6, 3/6, 0 (hand-computed).
        assert_eq!(counts[3], 0);
        for (c, p) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((*c as f64 / 60000.0 - p).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        let logits = [2.0f32, 1.9, 0.0];
        let biased = |logit_bias: Vec<(u32, f32)>, temperature: f32| SamplingParams {
            temperature,
            top_k: 0,
            logit_bias,
            seed: 5,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            Sampler::new(biased(vec![], 0.0))
                .sample(&logits, &[])
                .unwrap(),
            0
        );
        assert_eq!(
            Sampler::new(biased(vec![(0, -0.2)], 0.0))
                .sample(&logits, &[])
                .unwrap(),
            1
        );
        assert_eq!(
            Sampler::new(biased(vec![(2, 2.5)], 0.0))
                .sample(&logits, &[])
                .unwrap(),
            2
        );
        // Sampling: −100 bans tokens 0 and 1 (e^−98 against e^0).
        let mut s = Sampler::new(biased(vec![(0, -100.0), (1, -100.0)], 1.0));
        assert!((0..500).all(|_| s.sample(&logits, &[]).unwrap() == 2));
        // An id past the logits is skipped; out of range is refused.
        assert_eq!(
            Sampler::new(biased(vec![(9, 5.0)], 0.0))
                .sample(&logits, &[])
                .unwrap(),
            0
        );
        let e = biased(vec![(1, 101.0)], 1.0).validate().unwrap_err();
        assert!(e.starts_with("logit_bias"), "{e}");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: 3,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        for _ in 0..100 {
            assert_eq!(s.sample(&[1.0, 2.0, 1.9], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probs ∝ 8, 4, 2, 1, 1 → 0.5, 0.25, 0.125, 0.0625, 0.0625
        let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0]
            .iter()
            .map(|x| x.ln())
            .collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.75,
            seed: 1,
            ..SamplingParams::greedy()
        });
        for _ in 0..2000 {
            assert!(
                s.sample(&logits, &[]).unwrap() <= 1,
                "top_p 0.75 keeps the first two"
            );
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: 1,
            ..SamplingParams::greedy()
        });
        for _ in 0..2000 {
            assert!(
                s.sample(&logits, &[]).unwrap() <= 2,
                "min_p 0.2 keeps probs >= 0.1"
            );
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let logits = [2.0f32, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.1,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 1, "2.0/1.1 < 1.9");
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.06,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0, 0]).unwrap(), 1, "2.0 - 0.12 < 1.9");
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 0, "2.0 - 0.06 > 1.9");
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.2,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 1);
    }

    #[test]
    fn repeat_last_n_counts_as_llama_cpp() {
        // The repeated token 0 is 3 tokens back: a window of 2 misses it,
        // 3 and the whole history (llama.cpp's −1) see it, 0 turns the
        // penalties off (llama.cpp's 0, where it had meant "all" here).
        let logits = [2.0f32, 1.9, 0.0];
        let history = [0, 2, 2];
        for (n, expect) in [(2, 0), (3, 1), (ALL_HISTORY, 1), (0, 0)] {
            let mut s = Sampler::new(SamplingParams {
                repeat_penalty: 1.1,
                repeat_last_n: n,
                ..SamplingParams::greedy()
            });
            assert_eq!(
                s.sample(&logits, &history).unwrap(),
                expect,
                "repeat_last_n {n}"
            );
            // Penalties that cannot apply leave the logits uncopied (262144 floats a token).
            assert_eq!(s.work.is_empty(), n == 0, "repeat_last_n {n}");
        }
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
        assert!(s.work.is_empty(), "no history, nothing to penalise");
    }

    #[test]
    fn a_nan_or_infinite_logit_is_returned_not_sampled() {
        // An error, not a token. A positive NaN
        // sorts first under total_cmp, and a NaN anywhere in the kept
        // candidates made every probability NaN, so sampling fell through
        // to the last candidate: a plausible token from a broken model.
        let mut logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.1).collect();
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY] {
            for at in [3usize, 500, 999] {
                let saved = logits[at];
                logits[at] = bad;
                for params in [
                    SamplingParams::greedy(),
                    SamplingParams::chat_default(),
                    SamplingParams {
                        top_k: 0,
                        ..SamplingParams::chat_default()
                    },
                ] {
                    let t = Sampler::new(params).sample(&logits, &[1, 2]);
                    assert_eq!(t, Err(NonFiniteLogit { token: at as u32 }), "{bad} at {at}");
                }
                logits[at] = saved;
            }
        }
        // Every token −∞ (none can be drawn): the same error, not token 0.
        let banned = vec![f32::NEG_INFINITY; 100];
        for params in [SamplingParams::greedy(), SamplingParams::chat_default()] {
            let t = Sampler::new(params).sample(&banned, &[]);
            assert_eq!(t, Err(NonFiniteLogit { token: 0 }));
        }
        // −∞ is a banned token: never drawn, not an error.
        logits[16] = f32::NEG_INFINITY; // the largest logit, 1.6
        assert_eq!(first_invalid(&logits), None);
        assert_eq!(
            Sampler::new(SamplingParams::greedy())
                .sample(&logits, &[])
                .unwrap(),
            33
        );
        assert_eq!(first_invalid(&[]), None);
        assert_eq!(first_invalid(&[1.0, f32::NAN, f32::INFINITY]), Some(1));
        assert_eq!(first_invalid(&[f32::NEG_INFINITY, f32::INFINITY]), Some(1));
    }

    #[test]
    fn validate_names_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::greedy()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
    }

    #[test]
    fn top_logprobs_sorted_and_normalised() {
        // probs 1/8, 4/8, 2/8, 1/8
        let l: Vec<f32> = [1.0f32, 4.0, 2.0, 1.0].iter().map(|x| x.ln()).collect();
        let lse = logsumexp(&l);
        let top = top_logprobs(&l, 3, lse);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0], "descending, ties to the lower id");
        assert!((top[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert!((top[2].1 - 0.125f32.ln()).abs() < 1e-6);
        assert!((logprob(&l, 3) - (l[3] - lse)).abs() < 1e-6);
        assert_eq!(top_logprobs(&l, 0, lse), vec![]);
        assert_eq!(top_logprobs(&l, 10, lse).len(), 4);
    }

    #[test]
    fn logprob_hand_computed() {
        let l = [0.0f32, (3.0f32).ln()];
        assert!((logprob(&l, 1) - (0.75f32).ln()).abs() < 1e-6);
    }
}
