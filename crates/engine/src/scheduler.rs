//! The scheduler: one thread owns the model and every sequence's KV cache and
//! serves many requests at once with continuous batching.
//!
//! Each step is ONE [`Model::forward`] over a batch that holds the next token
//! of every generating sequence plus up to `prefill_chunk` prompt tokens of
//! sequences still reading their prompt (oldest request first), so a long
//! prompt is spread over several steps instead of stalling running streams.
//! Requests join between steps as slots free up.
//!
//! Batching does not change results: the forward pass computes each token's
//! row on its own (its own activations, its own sequence's cache), and each
//! sequence samples from its own row of logits.
//!
//! Prefix cache: a slot keeps the tokens its cache holds after its request
//! ends. A new request takes the free slot whose tokens share the longest
//! prefix with its prompt (or copies that prefix from a busy slot's cache with
//! [`KvCache::copy_prefix_from`]) and evaluates only the rest; at least the
//! last prompt token is always evaluated, to get its logits. A request whose
//! prompt shares such a prefix with one still being read waits for that read
//! rather than reading the same tokens beside it.
//!
//! Front ends talk to it through a [`Scheduler`] handle: [`Scheduler::submit`]
//! a [`Request`] of token ids and receive [`Event`]s through the request's
//! sink, a callback that returns false once nobody is listening (the request
//! is then dropped within one step). Nothing here knows HTTP or JSON.

use crate::embed::{Pooler, Pooling};
use crate::grammar::Constraint;
use crate::sampler::{logsumexp, top_logprobs, Sampler};
use crate::session::{FinishReason, GenerateParams};
use crate::stop::StopMatcher;
use gemma3_model::{Batch, ForwardState, KvCache, Model, Output};
use gemma3_tokenizer::{StreamDecoder, Tokenizer};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A prefix is worth taking a particular slot for when it is at least this
/// long or more than half the prompt; otherwise a request takes the least
/// recently used free slot, so that slots holding long shared prefixes
/// (system prompts, few-shot examples) survive. (The chat template's own
/// header is a handful of tokens that every chat request shares.)
pub const MIN_PREFIX_REUSE: usize = 32;

/// Generation rate ([`Stats::tokens_per_second`]) is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences generating at once (one KV cache each, allocated at start).
    pub parallel: usize,
    /// Context of each sequence in tokens (clamped to the model's).
    pub ctx: usize,
    /// Most requests waiting for a slot, beyond the `parallel` running ones.
    pub max_queue: usize,
    /// Most prompt tokens evaluated per step.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            parallel: 16,
            ctx: 4096,
            max_queue: 64,
            prefill_chunk: 256,
        }
    }
}

/// Where a request's events go. Any `FnMut(Event) -> bool + Send` closure is
/// one (returning false once the receiver is gone).
pub trait EventSink: Send {
    /// Deliver an event; false when nobody is listening any more (the request
    /// is then dropped).
    fn send(&mut self, ev: Event) -> bool;

    /// Whether the receiver is gone, checked between steps so that a request
    /// still waiting or reading its prompt is dropped before it sends anything.
    fn is_closed(&self) -> bool {
        false
    }
}

impl<F: FnMut(Event) -> bool + Send> EventSink for F {
    fn send(&mut self, ev: Event) -> bool {
        self(ev)
    }
}

/// One job, in token ids: a generation, or an embedding of the prompt.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// `Some(k)`: report each generated token's log-probability and the `k`
    /// most likely alternatives at its position.
    pub logprobs: Option<usize>,
    /// `Some(pooling)`: no generation; the prompt's final hidden states,
    /// pooled, come back in one [`Event::Embedding`] (`params` unused). The
    /// whole prompt is evaluated (no prefix is reused: every position's
    /// hidden state may be needed), so it may fill the context.
    pub embed: Option<Pooling>,
    /// `Some(k)`: before any token, one [`Event::Prompt`] with each prompt
    /// token's log-probability given the tokens before it and the `k` most
    /// likely alternatives there (what OpenAI's `echo` with `logprobs`
    /// reports, and what scoring a continuation needs). Every prompt
    /// position's logits are computed (no prefix is reused), and
    /// `max_tokens` may be 0: the prompt is read, scored, and the job ends.
    pub prompt_logprobs: Option<usize>,
    /// The scale of each of the model's LoRA adapters for this request
    /// (`Model::loras.len()` of them), or None: the scheduler's current
    /// ones ([`Scheduler::lora_scales`]). A cached prefix is reused only
    /// from a sequence computed at the same scales.
    pub lora: Option<Vec<f32>>,
    /// The client chose `lora` (rather than taking the server's scales):
    /// logits or hidden states that are not finite at those scales are then
    /// this request's error ([`RequestError::Lora`]), not the model's.
    pub own_lora: bool,
    pub events: Box<dyn EventSink>,
}

/// A prompt token as [`Event::Prompt`] reports it: its log-probability
/// under the model given the tokens before it (None for the first), and the
/// most likely tokens there, (id, logprob), most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What a request hears back, in order: `Token`s, then one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it releases (possibly empty: part of a
    /// UTF-8 character, or text held back because it may start a stop string).
    /// `logprob` is under the unmodified model distribution (log-softmax of
    /// the logits); `top_logprobs` are (id, logprob), most likely first.
    Token {
        id: u32,
        text: String,
        /// The text the decoder made of this token, before a stop string
        /// held any back (empty for a special token, or for a byte that does
        /// not yet end a UTF-8 character): the reply's text is these pieces,
        /// then the end's, less what a stop string cut.
        piece: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The end. `text` is what was still held back (to append to the tokens'
    /// text). The stop token itself is neither sent nor counted.
    Done {
        finish: FinishReason,
        text: String,
        usage: Usage,
    },
    /// The prompt's tokens scored (see [`Request::prompt_logprobs`]), once
    /// it is read, before any `Token`.
    Prompt(Vec<PromptToken>),
    /// The end of an embedding request: the pooled vector (`d_model` floats,
    /// not normalized).
    Embedding {
        vector: Vec<f32>,
        usage: Usage,
    },
    Error(RequestError),
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache (not evaluated).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Submission to admission into a slot.
    pub queue_time: Duration,
    /// Admission to the first token's logits.
    pub prompt_time: Duration,
    /// First token to the end.
    pub gen_time: Duration,
}

#[derive(Clone, Debug, Error, PartialEq)]
pub enum RequestError {
    #[error("empty prompt: there must be at least one token")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {ctx}")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("model error: {0}")]
    Model(String),
    #[error("LoRA scales: {0}")]
    Lora(String),
    /// The request's grammar cannot go on (see [`crate::GrammarError`]).
    #[error("{0}")]
    Grammar(String),
    #[error("the server is shutting down")]
    Shutdown,
}

#[derive(Clone, Debug, Error, PartialEq)]
pub enum SubmitError {
    #[error("too many requests: {in_system} running or waiting plus {asked} asked for is over the limit of {limit}; retry later")]
    QueueFull {
        limit: usize,
        in_system: usize,
        asked: usize,
    },
    #[error("shutting down: no new requests are taken")]
    Stopped,
}

/// A snapshot of the scheduler's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub parallel: usize,
    /// Sequences in a slot (reading their prompt or generating).
    pub active: usize,
    /// Requests submitted and not yet in a slot.
    pub waiting: usize,
    pub requests_done: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub generated_tokens: u64,
    pub steps: u64,
    /// Tokens generated per second over the last 10 s (all sequences together).
    pub tokens_per_second: f64,
}

#[derive(Default)]
struct Shared {
    /// Submitted and not yet finished (waiting + active).
    in_system: AtomicUsize,
    active: AtomicUsize,
    requests_done: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    steps: AtomicU64,
    /// (end of step, tokens generated in it) over the last RATE_WINDOW.
    recent: Mutex<VecDeque<(Instant, u32)>>,
    /// The LoRA scales of requests that give none.
    lora: Mutex<Vec<f32>>,
    /// Set by [`Scheduler::cancel_all`]: no request is taken after it.
    closed: AtomicBool,
}

enum Msg {
    Request(Box<Request>, Instant),
    CancelAll,
}

/// A handle to the scheduler thread; cheap to clone. The thread ends once
/// every handle is dropped and the requests in flight have finished.
#[derive(Clone)]
pub struct Scheduler {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    ctx: usize,
    parallel: usize,
    limit: usize,
}

impl Scheduler {
    /// Allocate `parallel` KV caches and start the scheduler thread.
    pub fn start(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        mut cfg: SchedulerConfig,
    ) -> std::io::Result<(Scheduler, JoinHandle<()>)> {
        cfg.parallel = cfg.parallel.max(1);
        cfg.ctx = cfg.ctx.clamp(1, model.config.ctx_len);
        cfg.prefill_chunk = cfg.prefill_chunk.max(1);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            lora: Mutex::new(model.loras.iter().map(|l| l.scale).collect()),
            ..Shared::default()
        });
        let handle = Scheduler {
            tx,
            shared: shared.clone(),
            ctx: cfg.ctx,
            parallel: cfg.parallel,
            limit: cfg.parallel.saturating_add(cfg.max_queue),
        };
        // The worker loop runs inside a pool of as many threads as the
        // caller's: its thread count sizes the forward pass's spin pool and
        // the split of each step, and sampling's parallel loops fork and
        // join from a pool thread (cheap) rather than from outside it.
        let threads = rayon::current_num_threads();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("gemma3-worker-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        // The caches first, here, so that one the allocator refuses is the
        // caller's error rather than a dead scheduler thread.
        let caches = (0..cfg.parallel)
            .map(|_| KvCache::try_new(&model.config, cfg.ctx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(std::io::Error::other)?;
        let thread = std::thread::Builder::new()
            .name("gemma3-scheduler".into())
            .spawn(move || {
                pool.install(|| Worker::new(&model, &tokenizer, cfg, caches, shared).run(rx))
            })?;
        Ok((handle, thread))
    }

    /// Queue a request. Fails at once when `parallel + max_queue` requests are
    /// already running or waiting.
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        self.submit_many(vec![req])
    }

    /// Queue several requests (a batch of prompts) as one: all of them, or
    /// none when fewer places than their number are free. Taken one at a
    /// time, two batches racing for the last places could each get some and
    /// both be refused, and a refused batch's cancelled requests held their
    /// places for a step, refusing others.
    pub fn submit_many(&self, reqs: Vec<Request>) -> Result<(), SubmitError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        let (limit, n) = (self.limit, reqs.len());
        self.shared
            .in_system
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                (k.saturating_add(n) <= limit).then_some(k + n)
            })
            .map_err(|in_system| SubmitError::QueueFull {
                limit,
                in_system,
                asked: n,
            })?;
        for (i, req) in reqs.into_iter().enumerate() {
            if self
                .tx
                .send(Msg::Request(Box::new(req), Instant::now()))
                .is_err()
            {
                // The worker is gone: the places not sent are given back.
                self.shared.in_system.fetch_sub(n - i, Ordering::SeqCst);
                return Err(SubmitError::Stopped);
            }
        }
        Ok(())
    }

    /// The LoRA scales a request without its own runs at (one per adapter
    /// of the model; at start, those it was loaded with).
    pub fn lora_scales(&self) -> Vec<f32> {
        self.shared
            .lora
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Set [`Scheduler::lora_scales`] for requests admitted from now on
    /// (llama-server's `POST /lora-adapters`); one per adapter, each finite.
    pub fn set_lora_scales(&self, scales: Vec<f32>) -> Result<(), String> {
        let mut cur = self.shared.lora.lock().unwrap_or_else(|e| e.into_inner());
        check_scales(&scales, cur.len())?;
        *cur = scales;
        Ok(())
    }

    /// End every running and waiting request with [`RequestError::Shutdown`],
    /// and refuse every later one ([`SubmitError::Stopped`]): a request whose
    /// body arrived after a server's grace period had been run in full.
    pub fn cancel_all(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::CancelAll);
    }

    /// Context of each sequence in tokens.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// Most requests running and waiting at once (`parallel + max_queue`).
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let in_system = s.in_system.load(Ordering::SeqCst);
        let active = s.active.load(Ordering::SeqCst);
        let tokens_per_second = {
            let mut recent = s.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                recent.pop_front();
            }
            let n: u64 = recent.iter().map(|(_, n)| *n as u64).sum();
            n as f64 / RATE_WINDOW.as_secs_f64()
        };
        Stats {
            parallel: self.parallel,
            active,
            waiting: in_system.saturating_sub(active),
            requests_done: s.requests_done.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: s.cached_tokens.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
            tokens_per_second,
        }
    }
}

/// One KV cache's sequence: the tokens the cache holds, and the request
/// using it, if any.
struct Slot<'a> {
    /// Tokens whose K/V are in this slot's cache, in position order.
    tokens: Vec<u32>,
    /// The LoRA scales those K/V were computed at.
    lora: Vec<f32>,
    /// Step at which the slot was last released (for LRU eviction).
    last_used: u64,
    job: Option<Job<'a>>,
}

struct Job<'a> {
    events: Box<dyn EventSink>,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    logprobs: Option<usize>,
    sampler: Sampler,
    /// The request's grammar, and the row of logits it masks.
    constraint: Option<Constraint>,
    masked: Vec<f32>,
    stops: StopMatcher,
    dec: StreamDecoder<'a>,
    /// Prompt and generated tokens, for the penalties.
    history: Vec<u32>,
    generated: usize,
    /// The sampled token to feed next step; None while the prompt is read.
    next: Option<u32>,
    /// Admission order: prompts are read oldest first.
    order: u64,
    /// An embedding job's pooling of its prompt's hidden states.
    pooler: Option<Pooler>,
    /// The request chose its own LoRA scales: logits or hidden states that
    /// are not finite are then an error of the request (its `lora`), not of
    /// the model or the server.
    own_lora: bool,
    /// See [`Request::prompt_logprobs`]: k, and the prompt's tokens scored
    /// so far (from admission, the first, which has no score).
    prompt_logprobs: Option<usize>,
    scored: Vec<PromptToken>,
    usage: Usage,
    t_admit: Instant,
    t_first: Option<Instant>,
}

/// A token chosen from one row of logits.
struct Pick {
    token: u32,
    logprob: Option<f32>,
    top: Vec<(u32, f32)>,
    /// The grammar is complete with this token: nothing may follow.
    done: bool,
}

/// How a job's turn ended.
enum End {
    Finish(FinishReason, String),
    Cancelled,
}

impl Job<'_> {
    /// The next token (one the grammar allows, if there is one), or an
    /// error where the row holds a NaN or +∞ logit or the grammar fails.
    fn pick(&mut self, row: &[f32]) -> Result<Pick, RequestError> {
        let (token, done) = crate::session::draw(
            &mut self.sampler,
            row,
            &self.history,
            self.constraint.as_mut(),
            &self.stop_tokens,
            &mut self.masked,
        )
        .map_err(|e| match e {
            crate::SessionError::Grammar(g @ crate::GrammarError::Internal(_)) => {
                RequestError::Model(g.to_string())
            }
            crate::SessionError::Grammar(g) => RequestError::Grammar(g.to_string()),
            crate::SessionError::NonFiniteLogits => self.non_finite_logits(),
            crate::SessionError::Sampling(m) => RequestError::Sampling(m),
            other => RequestError::Model(other.to_string()),
        })?;
        let (logprob, top) = match self.logprobs {
            None => (None, Vec::new()),
            Some(k) => {
                let lse = logsumexp(row);
                (Some(row[token as usize] - lse), top_logprobs(row, k, lse))
            }
        };
        Ok(Pick {
            token,
            logprob,
            top,
            done,
        })
    }

    /// The error for logits that are not finite: the request's own LoRA
    /// scales are too large, or else the model is broken.
    fn non_finite_logits(&self) -> RequestError {
        if self.own_lora {
            RequestError::Lora(non_finite_at_scales("logits"))
        } else {
            RequestError::Model(crate::session::NON_FINITE.into())
        }
    }

    /// Take a chosen token: stop, or send it and queue it for the next step.
    /// `cached` is how many positions the cache holds, `ctx` how many it can.
    fn deliver(&mut self, p: Pick, cached: usize, ctx: usize) -> Option<End> {
        let now = Instant::now();
        if self.t_first.is_none() {
            self.t_first = Some(now);
            self.usage.prompt_time = now.duration_since(self.t_admit);
        }
        if self.stop_tokens.contains(&p.token) {
            return Some(self.flush(FinishReason::Stop));
        }
        self.generated += 1;
        self.history.push(p.token);
        // The id came from a row of vocab logits, so the decoder knows it.
        let piece = self.dec.push(p.token).unwrap_or_default();
        let (text, hit) = self.stops.push(&piece);
        let alive = self.events.send(Event::Token {
            id: p.token,
            text,
            piece,
            logprob: p.logprob,
            top_logprobs: p.top,
        });
        if !alive {
            return Some(End::Cancelled);
        }
        if hit {
            return Some(End::Finish(FinishReason::Stop, String::new()));
        }
        if p.done {
            return Some(self.flush(FinishReason::Stop));
        }
        if self.generated >= self.max_tokens || cached >= ctx {
            return Some(self.flush(FinishReason::Length));
        }
        self.next = Some(p.token);
        None
    }

    /// Release what the decoder and the stop matcher still hold.
    fn flush(&mut self, finish: FinishReason) -> End {
        let (mut tail, hit) = self.stops.push(&self.dec.finish());
        if hit {
            return End::Finish(FinishReason::Stop, tail);
        }
        tail.push_str(&self.stops.finish());
        End::Finish(finish, tail)
    }
}

/// Whether `scales` are `adapters` finite LoRA scales.
fn check_scales(scales: &[f32], adapters: usize) -> Result<(), String> {
    if scales.len() != adapters {
        return Err(format!(
            "{} scales given for {adapters} adapters",
            scales.len()
        ));
    }
    match scales.iter().find(|s| !s.is_finite()) {
        Some(s) => Err(format!("a scale of {s}")),
        None => Ok(()),
    }
}

/// A request's error where the model, at the LoRA scales the request chose,
/// computes `what` that are not finite numbers.
fn non_finite_at_scales(what: &str) -> String {
    format!(
        "the model's {what} are not finite numbers (NaN or infinity) at the scales this request \
         gives: an adapter's scale is too large for its values; try a smaller one"
    )
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Worker<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: SchedulerConfig,
    shared: Arc<Shared>,
    /// One per slot: `Model::forward` takes them all, indexed by `Batch::seq`.
    caches: Vec<KvCache>,
    slots: Vec<Slot<'a>>,
    waiting: VecDeque<(Request, Instant)>,
    state: ForwardState,
    batch: Batch,
    /// Steps run so far.
    clock: u64,
    admitted: u64,
}

impl<'a> Worker<'a> {
    fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        cfg: SchedulerConfig,
        caches: Vec<KvCache>,
        shared: Arc<Shared>,
    ) -> Self {
        let slots = (0..cfg.parallel)
            .map(|_| Slot {
                tokens: Vec::new(),
                lora: Vec::new(),
                last_used: 0,
                job: None,
            })
            .collect();
        Worker {
            model,
            tok,
            cfg,
            shared,
            caches,
            slots,
            waiting: VecDeque::new(),
            state: ForwardState::new(),
            batch: Batch::default(),
            clock: 0,
            admitted: 0,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let mut open = true;
        loop {
            let busy = !self.waiting.is_empty() || self.slots.iter().any(|s| s.job.is_some());
            if !busy {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(m) => self.accept(m),
                    Err(_) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(m) => self.accept(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_closed();
            self.admit();
            if self.slots.iter().any(|s| s.job.is_some()) {
                self.step();
            }
        }
    }

    fn accept(&mut self, m: Msg) {
        match m {
            // (Sent just before the flag was set, arrived after the cancel.)
            Msg::Request(r, _) if self.shared.closed.load(Ordering::SeqCst) => {
                self.end_waiting(*r, Event::Error(RequestError::Shutdown));
            }
            Msg::Request(r, t) => self.waiting.push_back((*r, t)),
            Msg::CancelAll => {
                for (r, _) in std::mem::take(&mut self.waiting) {
                    self.end_waiting(r, Event::Error(RequestError::Shutdown));
                }
                for i in 0..self.slots.len() {
                    self.end_slot(i, |_| Event::Error(RequestError::Shutdown));
                }
            }
        }
    }

    /// Forget requests whose receiver has gone away.
    fn drop_closed(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|(r, _)| !r.events.is_closed());
        for _ in self.waiting.len()..before {
            self.finished(false);
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .job
                .as_ref()
                .is_some_and(|j| j.events.is_closed())
            {
                self.slots[i].job = None;
                self.release(i);
            }
        }
    }

    /// A request left the system (`active`: it held a slot). Called before
    /// the request's last event is sent: a client that sends its next
    /// request as soon as it has the answer must find the place free (sent
    /// first, a sequential client's next request was sometimes refused as
    /// over the queue limit while the scheduler had not yet counted the
    /// last one out).
    fn finished(&self, active: bool) {
        if active {
            self.shared.active.fetch_sub(1, Ordering::SeqCst);
        }
        self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
        self.shared.requests_done.fetch_add(1, Ordering::Relaxed);
    }

    /// End waiting request `r` with its last event `ev`, counted out first
    /// (see `finished`).
    fn end_waiting(&self, mut r: Request, ev: Event) {
        self.finished(false);
        r.events.send(ev);
    }

    /// End slot `i`'s job, if it has one, with the last event `ev` makes
    /// of it, the slot freed first (see `finished`).
    fn end_slot(&mut self, i: usize, ev: impl FnOnce(&mut Job) -> Event) {
        if let Some(mut job) = self.slots[i].job.take() {
            self.release(i);
            let ev = ev(&mut job);
            job.events.send(ev);
        }
    }

    /// Free slot `i` (its job already taken); its tokens stay for reuse.
    fn release(&mut self, i: usize) {
        self.slots[i].last_used = self.clock;
        self.finished(true);
    }

    /// The LoRA scales `req` runs at: its own, else the current defaults.
    fn scales_of(&self, req: &Request) -> Vec<f32> {
        match &req.lora {
            Some(l) => l.clone(),
            None => (self.shared.lora.lock())
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn validate(&self, r: &Request) -> Result<(), RequestError> {
        if r.prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if r.prompt.len() > self.cfg.ctx {
            return Err(RequestError::PromptTooLong {
                prompt: r.prompt.len(),
                ctx: self.cfg.ctx,
            });
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RequestError::BadToken { id, vocab });
        }
        if let Some(l) = &r.lora {
            check_scales(l, self.model.loras.len()).map_err(RequestError::Lora)?;
        }
        if r.embed.is_some() {
            return Ok(());
        }
        r.params.sampling.validate().map_err(RequestError::Sampling)
    }

    /// Move waiting requests into free slots, oldest first. The oldest
    /// waits (and those behind it with it) while a prefix of its prompt is
    /// still being read by another slot: see [`Self::awaits_shared_read`].
    fn admit(&mut self) {
        while self.slots.iter().any(|s| s.job.is_none()) {
            if (self.waiting.front()).is_some_and(|(r, _)| self.awaits_shared_read(r)) {
                return;
            }
            let Some((req, t_submit)) = self.waiting.pop_front() else {
                return;
            };
            if let Err(e) = self.validate(&req) {
                self.end_waiting(req, Event::Error(e));
                continue;
            }
            let now = Instant::now();
            let mut usage = Usage {
                prompt_tokens: req.prompt.len(),
                queue_time: now.duration_since(t_submit),
                ..Usage::default()
            };
            if req.params.max_tokens == 0 && req.embed.is_none() && req.prompt_logprobs.is_none() {
                let done = Event::Done {
                    finish: FinishReason::Length,
                    text: String::new(),
                    usage,
                };
                self.end_waiting(req, done);
                continue;
            }
            // (Reused positions would have no logits to score.)
            let reuse = req.embed.is_none() && req.prompt_logprobs.is_none();
            let lora = self.scales_of(&req);
            let (i, kept) = self.place(&req.prompt, reuse, &lora);
            usage.cached_tokens = kept;
            self.shared
                .prompt_tokens
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            self.shared
                .cached_tokens
                .fetch_add(kept as u64, Ordering::Relaxed);
            self.shared.active.fetch_add(1, Ordering::SeqCst);
            self.admitted += 1;
            let params = req.params;
            // (A scoring job's first token has nothing before it to be
            // scored by; validate made sure the prompt has one.)
            let scored = (req.prompt_logprobs.iter())
                .map(|_| PromptToken {
                    id: req.prompt[0],
                    logprob: None,
                    top_logprobs: Vec::new(),
                })
                .collect();
            self.slots[i].job = Some(Job {
                events: req.events,
                history: req.prompt.clone(),
                prompt: req.prompt,
                max_tokens: params.max_tokens,
                stop_tokens: params.stop_tokens,
                logprobs: req.logprobs,
                sampler: Sampler::new(params.sampling),
                constraint: params.constraint,
                masked: Vec::new(),
                stops: StopMatcher::new(params.stop_strings),
                dec: self.tok.stream_decoder(false),
                generated: 0,
                next: None,
                order: self.admitted,
                pooler: (req.embed).map(|p| Pooler::new(p, self.model.config.d_model)),
                own_lora: req.own_lora,
                prompt_logprobs: req.prompt_logprobs,
                scored,
                usage,
                t_admit: now,
                t_first: None,
            });
        }
    }

    /// Whether `req` should wait for a slot that is still reading a prompt
    /// sharing a prefix with `req`'s worth reusing (as [`Self::place`]
    /// judges it) beyond what that slot's cache holds yet. Once it is read,
    /// `place` copies the prefix; admitted now, `req` would read the same
    /// tokens again side by side (the `n` choices of one prompt, or clients
    /// sharing a long system prompt or few-shot examples arriving together).
    fn awaits_shared_read(&self, req: &Request) -> bool {
        if req.embed.is_some() || req.prompt_logprobs.is_some() || req.prompt.len() < 2 {
            return false;
        }
        let limit = req.prompt.len() - 1;
        let lora = self.scales_of(req);
        (self.slots.iter().zip(&self.caches)).any(|(s, cache)| {
            let Some(j) = &s.job else { return false };
            if s.lora != lora {
                return false;
            }
            let reading = j.next.is_none() && j.pooler.is_none() && s.tokens.len() < j.prompt.len();
            let n = common_prefix(&j.prompt, &req.prompt).min(limit);
            let worth = n >= MIN_PREFIX_REUSE || 2 * n > req.prompt.len();
            // Once the read passes n it is at most a chunk beyond: the
            // sliding-window rings must still hold what a copy at n needs
            // (with the default chunk they always do), or the wait is for
            // nothing.
            let copyable = || cache.holds_prefix(n, n + self.cfg.prefill_chunk - 1);
            reading && worth && n > s.tokens.len() && copyable()
        })
    }

    /// Choose a free slot for `prompt` and make its cache hold the longest
    /// usable prefix of it (none unless `reuse`); returns (slot, tokens
    /// kept). Leaves at least one prompt token to evaluate.
    fn place(&mut self, prompt: &[u32], reuse: bool, lora: &[f32]) -> (usize, usize) {
        let limit = if reuse { prompt.len() - 1 } else { 0 };
        let usable = |slots: &[Slot], caches: &[KvCache], i: usize| {
            let s = &slots[i];
            // (K/V computed at other LoRA scales are another model's.)
            let limit = if s.lora == lora { limit } else { 0 };
            let n = common_prefix(&s.tokens, prompt).min(limit);
            if n > 0 && caches[i].holds_prefix(n, s.tokens.len()) {
                n
            } else {
                0
            }
        };
        // The slot holding the longest usable prefix; free slots win ties.
        let (best_n, best) = (0..self.slots.len())
            .map(|i| (usable(&self.slots, &self.caches, i), i))
            .max_by_key(|&(n, i)| (n, self.slots[i].job.is_none(), std::cmp::Reverse(i)))
            .unwrap_or((0, 0));
        let worth = best_n >= MIN_PREFIX_REUSE || 2 * best_n > prompt.len();
        if worth && self.slots[best].job.is_none() {
            // Reuse a free slot's cache in place.
            self.slots[best].tokens.truncate(best_n);
            return (best, best_n);
        }
        let placed = |slot: &mut Slot| slot.lora = lora.to_vec();
        // Otherwise the least recently used free slot: keep its own prefix,
        // or copy a longer one from the busy slot that has it.
        let target = (0..self.slots.len())
            .filter(|&i| self.slots[i].job.is_none())
            .min_by_key(|&i| (self.slots[i].last_used, i))
            .expect("admit only places requests when a slot is free");
        let own = usable(&self.slots, &self.caches, target);
        if worth && best_n > own {
            let (dst, src) = two_mut(&mut self.caches, target, best);
            let n = if dst.copy_prefix_from(src, best_n, self.slots[best].tokens.len()) {
                best_n
            } else {
                // A partial copy may have overwritten the slot's own prefix.
                0
            };
            self.slots[target].tokens.clear();
            self.slots[target].tokens.extend_from_slice(&prompt[..n]);
            placed(&mut self.slots[target]);
            return (target, n);
        }
        self.slots[target].tokens.truncate(own);
        placed(&mut self.slots[target]);
        (target, own)
    }

    /// One forward pass over every active sequence, then sampling.
    fn step(&mut self) {
        self.clock += 1;
        self.batch.clear();
        // Decode tokens of generating sequences, one each (with their
        // sequence's LoRA scales, where the model has adapters).
        let adapters = !self.model.loras.is_empty();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(t) = s.job.as_ref().and_then(|j| j.next) {
                self.batch.push(t, s.tokens.len(), i, true);
                if adapters {
                    self.batch.lora.extend_from_slice(&s.lora);
                }
            }
        }
        // Prompt chunks of the others, oldest request first, within the budget.
        let mut reading: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].job.as_ref().is_some_and(|j| j.next.is_none()))
            .collect();
        reading.sort_by_key(|&i| self.slots[i].job.as_ref().map(|j| j.order));
        let mut budget = self.cfg.prefill_chunk;
        let mut chunks: Vec<(usize, usize)> = Vec::new(); // (slot, tokens)
        for i in reading {
            if budget == 0 {
                break;
            }
            let s = &self.slots[i];
            let Some(job) = s.job.as_ref() else { continue };
            let done = s.tokens.len();
            let n = (job.prompt.len() - done).min(budget);
            let len = job.prompt.len();
            for p in done..done + n {
                let out = match &job.pooler {
                    Some(pooler) => pooler.pooling().output_at(p, len),
                    None if p + 1 == len || job.prompt_logprobs.is_some() => Output::Logits,
                    None => Output::None,
                };
                self.batch.push_out(job.prompt[p], p, i, out);
                if adapters {
                    self.batch.lora.extend_from_slice(&s.lora);
                }
            }
            chunks.push((i, n));
            budget -= n;
        }
        if self.batch.is_empty() {
            return;
        }
        // Row r of the logits is sampled for slot row_of[..] == Some(r) (a
        // generated token's, or a prompt's last one, where the job goes on
        // to generate); a scoring job's other prompt rows are scored_rows
        // (slot, position, row).
        let mut row_of: Vec<Option<usize>> = vec![None; self.slots.len()];
        let mut scored_rows: Vec<(usize, usize, usize)> = Vec::new();
        let mut rows = 0;
        for k in 0..self.batch.len() {
            if self.batch.out[k] != Output::Logits {
                continue;
            }
            let (i, p) = (self.batch.seq[k], self.batch.pos[k]);
            let job = self.slots[i].job.as_ref();
            let prompt_len = job.map_or(0, |j| j.prompt.len());
            if job.is_some_and(|j| j.prompt_logprobs.is_some()) && p + 1 < prompt_len {
                scored_rows.push((i, p, rows));
            } else if job.is_some_and(|j| j.max_tokens > 0) {
                row_of[i] = Some(rows);
            }
            rows += 1;
        }

        let logits = match self
            .model
            .forward(&self.batch, &mut self.caches, &mut self.state)
        {
            Ok(l) => l,
            Err(e) => {
                // The caches of these sequences are now in an unknown state.
                let mut hit: Vec<usize> = self.batch.seq.clone();
                hit.sort_unstable();
                hit.dedup();
                for i in hit {
                    self.slots[i].tokens.clear();
                    self.end_slot(i, |_| Event::Error(RequestError::Model(e.to_string())));
                }
                return;
            }
        };

        // The cache now holds the tokens just run.
        for s in self.slots.iter_mut() {
            if let Some(t) = s.job.as_mut().and_then(|j| j.next.take()) {
                s.tokens.push(t);
            }
        }
        for &(i, n) in &chunks {
            let s = &mut self.slots[i];
            if let Some(job) = s.job.as_ref() {
                let done = s.tokens.len();
                s.tokens.extend_from_slice(&job.prompt[done..done + n]);
            }
        }

        let vocab = self.model.config.vocab_size;
        // Score the scoring jobs' prompt tokens: row r at position p gives
        // the log-probability of the prompt's token p + 1.
        let tasks: Vec<(usize, u32, usize, usize)> = (scored_rows.iter())
            .filter_map(|&(i, p, r)| {
                let job = self.slots[i].job.as_ref()?;
                Some((i, job.prompt[p + 1], job.prompt_logprobs?, r))
            })
            .collect();
        // (None: the row is not finite, and the request ends with an error.)
        let scored: Vec<(usize, Option<PromptToken>)> = tasks
            .par_iter()
            .map(|&(i, id, k, r)| {
                let row = &logits[r * vocab..(r + 1) * vocab];
                if !crate::sampler::all_finite(row) {
                    return (i, None);
                }
                let lse = logsumexp(row);
                let logprob = Some(row[id as usize] - lse);
                let top_logprobs = top_logprobs(row, k, lse);
                (
                    i,
                    Some(PromptToken {
                        id,
                        logprob,
                        top_logprobs,
                    }),
                )
            })
            .collect();

        // Sample every sequence from its own row, in parallel.
        let picks: Vec<(usize, Result<Pick, RequestError>)> = self
            .slots
            .par_iter_mut()
            .enumerate()
            .filter_map(|(i, s)| {
                let r = row_of[i]?;
                let job = s.job.as_mut()?;
                Some((i, job.pick(&logits[r * vocab..(r + 1) * vocab])))
            })
            .collect();

        self.take_scores(scored, &chunks);

        let mut generated = 0u32;
        let ctx = self.cfg.ctx;
        for (i, p) in picks {
            let s = &mut self.slots[i];
            let Some(job) = s.job.as_mut() else { continue };
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    self.end_slot(i, |_| Event::Error(e));
                    continue;
                }
            };
            let before = job.generated;
            let end = job.deliver(p, s.tokens.len(), ctx);
            generated += (job.generated - before) as u32;
            match end {
                None => {}
                Some(End::Cancelled) => {
                    s.job = None;
                    self.release(i);
                }
                Some(End::Finish(finish, text)) => {
                    self.end_slot(i, |job| {
                        let now = Instant::now();
                        job.usage.completion_tokens = job.generated;
                        job.usage.gen_time = now.duration_since(job.t_first.unwrap_or(now));
                        Event::Done {
                            finish,
                            text,
                            usage: std::mem::take(&mut job.usage),
                        }
                    });
                }
            }
        }

        self.pool_embeddings(&chunks);

        let sh = &self.shared;
        sh.steps.fetch_add(1, Ordering::Relaxed);
        sh.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        if generated > 0 {
            let mut recent = sh.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            recent.push_back((now, generated));
            while recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                recent.pop_front();
            }
        }
    }
}

impl Worker<'_> {
    /// After a step: add the scoring jobs' newly scored prompt tokens, and
    /// for each of `chunks` whose prompt is now read send its
    /// [`Event::Prompt`] (before any token); a job that asked for no tokens
    /// then ends. A job with a row that is not finite ends with an error.
    fn take_scores(
        &mut self,
        scored: Vec<(usize, Option<PromptToken>)>,
        chunks: &[(usize, usize)],
    ) {
        for (i, t) in scored {
            let Some(job) = self.slots[i].job.as_mut() else {
                continue;
            };
            match t {
                Some(t) => job.scored.push(t),
                None => {
                    let e = job.non_finite_logits();
                    self.end_slot(i, |_| Event::Error(e));
                }
            }
        }
        for &(i, _) in chunks {
            let s = &mut self.slots[i];
            let Some(job) = s.job.as_mut() else { continue };
            if job.prompt_logprobs.is_none() || s.tokens.len() < job.prompt.len() {
                continue;
            }
            let tokens = std::mem::take(&mut job.scored);
            if !job.events.send(Event::Prompt(tokens)) {
                s.job = None;
                self.release(i);
                continue;
            }
            if job.max_tokens == 0 {
                self.end_slot(i, |job| {
                    job.usage.prompt_time = job.t_admit.elapsed();
                    Event::Done {
                        finish: FinishReason::Length,
                        text: String::new(),
                        usage: std::mem::take(&mut job.usage),
                    }
                });
            }
        }
    }

    /// After a step: pool the hidden states it computed for embedding jobs
    /// (row h of [`ForwardState::hidden`] is the batch's h-th token with an
    /// output), and end each such job of `chunks` whose prompt is now read
    /// with its vector.
    fn pool_embeddings(&mut self, chunks: &[(usize, usize)]) {
        let d = self.model.config.d_model;
        let hidden = self.state.hidden();
        let outputs = (0..self.batch.len()).filter(|&k| self.batch.out[k] != Output::None);
        for (h, k) in outputs.enumerate() {
            if self.batch.out[k] != Output::Hidden {
                continue;
            }
            let job = self.slots[self.batch.seq[k]].job.as_mut();
            if let Some(pooler) = job.and_then(|j| j.pooler.as_mut()) {
                pooler.add(&hidden[h * d..(h + 1) * d]);
            }
        }
        for &(i, _) in chunks {
            let s = &self.slots[i];
            let read = s
                .job
                .as_ref()
                .is_some_and(|j| j.pooler.is_some() && s.tokens.len() == j.prompt.len());
            if !read {
                continue;
            }
            self.end_slot(i, |job| {
                let vector = job.pooler.as_ref().and_then(|p| p.finish(false));
                match vector.filter(|v| v.iter().all(|x| x.is_finite())) {
                    Some(vector) => {
                        job.usage.prompt_time = job.t_admit.elapsed();
                        Event::Embedding {
                            vector,
                            usage: std::mem::take(&mut job.usage),
                        }
                    }
                    None if job.own_lora => {
                        Event::Error(RequestError::Lora(non_finite_at_scales("hidden states")))
                    }
                    None => Event::Error(RequestError::Model(
                        crate::session::NON_FINITE_HIDDEN.into(),
                    )),
                }
            });
        }
    }
}

/// `&mut v[a]` and `&v[b]` for a ≠ b.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    assert_ne!(a, b);
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_len() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
    }

    #[test]
    fn two_mut_either_order() {
        let mut v = [1, 2, 3];
        let (a, b) = two_mut(&mut v, 2, 0);
        *a += *b;
        let (a, b) = two_mut(&mut v, 0, 2);
        *a += *b;
        assert_eq!(v, [5, 2, 4]);
    }
}
