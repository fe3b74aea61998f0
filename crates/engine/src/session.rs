//! A session: one sequence's KV cache and the tokens in it, with prompt
//! evaluation and the generation loop (sampling, stop tokens, stop strings,
//! token budget), streaming text as it is decoded.

use crate::embed::Pooling;
use crate::grammar::{Constraint, GrammarError};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use gemma3_model::{Batch, ForwardState, KvCache, Model, ModelError};
use gemma3_tokenizer::Tokenizer;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the prompt has {prompt} tokens but the context holds {ctx}; use a shorter prompt or a larger --ctx")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("empty prompt: there must be at least one token")]
    EmptyPrompt,
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{NON_FINITE}")]
    NonFiniteLogits,
    #[error("{NON_FINITE_HIDDEN}")]
    NonFiniteHidden,
    #[error(transparent)]
    Grammar(#[from] GrammarError),
}

/// Why a model that computes NaN or infinite logits (broken weights or
/// metadata) gets an error instead of a reply of token 0 after token 0.
pub const NON_FINITE: &str =
    "the model's logits are not finite numbers (NaN or infinity): its weights or metadata are broken, or a LoRA adapter's or control vector's values or scale are too large";

/// The same for an embedding's hidden states.
pub const NON_FINITE_HIDDEN: &str =
    "the model's hidden states are not finite numbers (NaN or infinity): its weights or metadata are broken, or a LoRA adapter's or control vector's values or scale are too large";

#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends generation (not included in the output).
    pub stop_strings: Vec<String>,
    /// Token ids that end generation (eos, `<end_of_turn>`).
    pub stop_tokens: Vec<u32>,
    /// A grammar the output must follow (compiled, at its start): tokens it
    /// does not allow are never drawn, the stop tokens only where it may
    /// end, and generation stops once nothing more can follow.
    pub constraint: Option<Constraint>,
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens`, with no stop token or string.
    pub fn greedy(max_tokens: usize) -> Self {
        GenerateParams {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            stop_tokens: Vec::new(),
            constraint: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// The token budget or the context ran out.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens actually evaluated (the rest came from the cache).
    pub prompt_evaluated: usize,
    pub prompt_time: Duration,
    pub gen_time: Duration,
}

/// One sequence: the model, its cache, and the tokens the cache holds.
pub struct Session<'m> {
    pub model: &'m Model,
    cache: KvCache,
    state: ForwardState,
    batch: Batch,
    /// Tokens whose K/V are in the cache, in position order.
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    /// Panics where the KV cache's memory cannot be had; [`Session::try_new`]
    /// says so instead.
    pub fn new(model: &'m Model, ctx: usize) -> Self {
        Self::try_new(model, ctx).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A session with a KV cache of `ctx` positions, or an error naming its
    /// size when the allocator refuses it.
    pub fn try_new(model: &'m Model, ctx: usize) -> Result<Self, gemma3_model::ModelError> {
        Ok(Session {
            model,
            cache: KvCache::try_new(&model.config, ctx)?,
            state: ForwardState::new(),
            batch: Batch::default(),
            tokens: Vec::new(),
        })
    }

    pub fn ctx(&self) -> usize {
        self.cache.ctx
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn state_mut(&mut self) -> &mut ForwardState {
        &mut self.state
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Keep the first `n` tokens if the cache still holds what continuing
    /// after them needs; otherwise start over. Returns the tokens kept.
    fn rewind(&mut self, n: usize) -> usize {
        let keep = if self.cache.holds_prefix(n, self.tokens.len()) {
            n
        } else {
            0
        };
        self.tokens.truncate(keep);
        keep
    }

    /// A prompt must hold at least one token and fit the cache.
    fn check_prompt(&self, prompt: &[u32]) -> Result<(), SessionError> {
        if prompt.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        if prompt.len() > self.cache.ctx {
            return Err(SessionError::PromptTooLong {
                prompt: prompt.len(),
                ctx: self.cache.ctx,
            });
        }
        Ok(())
    }

    /// Make the cache hold exactly `prompt`, reusing the longest common
    /// prefix already evaluated, and return the logits after its last token.
    /// Returns (logits, tokens evaluated).
    pub fn eval_prompt(
        &mut self,
        prompt: &[u32],
        all_logits: bool,
    ) -> Result<(&[f32], usize), SessionError> {
        self.check_prompt(prompt)?;
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last token is evaluated, to get its logits.
        let keep = if all_logits {
            0
        } else {
            self.rewind(common.min(prompt.len() - 1))
        };
        if all_logits {
            self.tokens.clear();
        }
        let todo = &prompt[keep..];
        self.batch = Batch::for_sequence(todo, keep, all_logits);
        let logits = self.model.forward(
            &self.batch,
            std::slice::from_mut(&mut self.cache),
            &mut self.state,
        )?;
        self.tokens.clear();
        self.tokens.extend_from_slice(prompt);
        Ok((logits, todo.len()))
    }

    /// The embedding of `text` (token ids, as the tokenizer gives them, BOS
    /// first): its final hidden states pooled by `pooling`, scaled to unit
    /// length when `normalize`. The whole text is evaluated afresh (every
    /// position's hidden state is needed); the cache then holds it.
    pub fn embed(
        &mut self,
        text: &[u32],
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>, SessionError> {
        self.check_prompt(text)?;
        self.tokens.clear();
        let mut vectors = crate::embed::pool_texts(
            self.model,
            &[text],
            std::slice::from_mut(&mut self.cache),
            &mut self.batch,
            &mut self.state,
            pooling,
            normalize,
        )?;
        self.tokens.extend_from_slice(text);
        Ok(vectors.remove(0))
    }

    /// Append one token and return the logits after it.
    pub fn step(&mut self, token: u32) -> Result<&[f32], SessionError> {
        let pos = self.tokens.len();
        if pos >= self.cache.ctx {
            return Err(ModelError::ContextOverflow {
                pos,
                ctx: self.cache.ctx,
            }
            .into());
        }
        self.batch.clear();
        self.batch.push(token, pos, 0, true);
        let logits = self.model.forward(
            &self.batch,
            std::slice::from_mut(&mut self.cache),
            &mut self.state,
        )?;
        self.tokens.push(token);
        Ok(logits)
    }

    /// Generate after `prompt`, calling `on_text` with each piece of released
    /// text (return false from it to stop).
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, SessionError> {
        params.sampling.validate().map_err(SessionError::Sampling)?;
        let t0 = Instant::now();
        let (logits, evaluated) = self.eval_prompt(prompt, false)?;
        let mut logits = logits.to_vec();
        let prompt_time = t0.elapsed();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut stops = StopMatcher::new(params.stop_strings.clone());
        let mut dec = tok.stream_decoder(false);
        let mut out_tokens = Vec::new();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut history: Vec<u32> = prompt.to_vec();
        let mut hit_stop_string = false;
        let mut constraint = params.constraint.clone();
        let mut masked = Vec::new();
        while out_tokens.len() < params.max_tokens {
            let (t, done) = draw(
                &mut sampler,
                &logits,
                &history,
                constraint.as_mut(),
                &params.stop_tokens,
                &mut masked,
            )?;
            if params.stop_tokens.contains(&t) {
                finish = FinishReason::Stop;
                break;
            }
            out_tokens.push(t);
            history.push(t);
            let piece = dec
                .push(t)
                .map_err(|e| SessionError::Tokenizer(e.to_string()))?;
            let (release, hit) = stops.push(&piece);
            text.push_str(&release);
            if !release.is_empty() && !on_text(&release) {
                finish = FinishReason::Cancelled;
                break;
            }
            if hit {
                finish = FinishReason::Stop;
                hit_stop_string = true;
                break;
            }
            if done {
                finish = FinishReason::Stop;
                break;
            }
            if out_tokens.len() >= params.max_tokens || self.tokens.len() >= self.cache.ctx {
                break;
            }
            logits.copy_from_slice(self.step(t)?);
        }
        if !hit_stop_string && finish != FinishReason::Cancelled {
            // Release what the decoder and the stop matcher still hold.
            let (mut tail, hit) = stops.push(&dec.finish());
            if hit {
                finish = FinishReason::Stop;
            } else {
                tail.push_str(&stops.finish());
            }
            if !tail.is_empty() {
                on_text(&tail);
                text.push_str(&tail);
            }
        }
        Ok(Generation {
            tokens: out_tokens,
            text,
            finish,
            prompt_tokens: prompt.len(),
            prompt_evaluated: evaluated,
            prompt_time,
            gen_time: t1.elapsed(),
        })
    }
}

/// Draw the next token from `row` (a stop token among `ends`), under
/// `constraint` if there is one, as llama.cpp's sampler does: a token drawn
/// from the row as it is stands if the grammar allows it (checking one
/// token is cheap); only otherwise is the row masked to what the grammar
/// allows (a pass over the whole vocabulary) and drawn from again. Greedy,
/// either way the best token the grammar allows. Returns the token and
/// whether the grammar is complete with it.
pub(crate) fn draw(
    sampler: &mut Sampler,
    row: &[f32],
    history: &[u32],
    constraint: Option<&mut Constraint>,
    ends: &[u32],
    masked: &mut Vec<f32>,
) -> Result<(u32, bool), SessionError> {
    // The model's own row holds no −∞ either: its logits are finite dot
    // products, so one is overflow (broken weights, or an adapter's or
    // control vector's scale), not a banned token. (−∞ after a bias or the
    // grammar's mask is a ban, which the sampler reads as such.)
    if !crate::sampler::all_finite(row) {
        return Err(SessionError::NonFiniteLogits);
    }
    let first = sampler.sample_checked(row, history);
    let Some(c) = constraint else {
        return first.map(|t| (t, false)).map_err(|_| {
            SessionError::Sampling("logit_bias bans every token of the vocabulary".into())
        });
    };
    let started = std::time::Instant::now();
    let token = match first {
        Ok(t) if c.allows(t, ends)? => t,
        _ => {
            masked.clear();
            masked.extend_from_slice(row);
            c.mask(masked, ends)?;
            // (The row with −∞ where the grammar says no: still no NaN or +∞.)
            sampler.sample_checked(masked, history).map_err(|_| {
                GrammarError::Matcher(
                    "every token the grammar allows next is banned (by logit_bias, or ignore_eos where only the end may come)".into(),
                )
            })?
        }
    };
    if !ends.contains(&token) {
        c.accept(token)?;
    }
    c.charge(started.elapsed())?;
    Ok((token, !ends.contains(&token) && c.is_done()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplingParams;

    /// A −∞ in the model's own row is a broken model (its logits are finite
    /// dot products), as NaN and +∞ are; a −∞ put there by a logit bias is a
    /// ban the draw goes around; a bias banning every token is an error
    /// saying so, not a broken model.
    #[test]
    fn draw_tells_a_broken_row_from_a_ban() {
        let row = [0.5f32, 2.0, 1.0, -3.0];
        let mut masked = Vec::new();
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let drawn = draw(&mut greedy, &row, &[], None, &[], &mut masked);
        assert_eq!(drawn.unwrap(), (1, false));
        for bad in [f32::NEG_INFINITY, f32::INFINITY, f32::NAN] {
            for at in [0, 1, 3] {
                let mut broken = row;
                broken[at] = bad;
                let e = draw(&mut greedy, &broken, &[], None, &[], &mut masked).unwrap_err();
                assert!(
                    matches!(e, SessionError::NonFiniteLogits),
                    "{bad} at {at}: {e}"
                );
            }
        }
        let mut banned = Sampler::new(SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY)],
            ..SamplingParams::greedy()
        });
        let drawn = draw(&mut banned, &row, &[], None, &[], &mut masked);
        assert_eq!(drawn.unwrap(), (2, false));
        let mut all = Sampler::new(SamplingParams {
            logit_bias: (0..4).map(|t| (t, f32::NEG_INFINITY)).collect(),
            ..SamplingParams::greedy()
        });
        let e = draw(&mut all, &row, &[], None, &[], &mut masked).unwrap_err();
        assert!(e.to_string().contains("bans every token"), "{e}");
    }
}
