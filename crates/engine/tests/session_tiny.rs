//! `Session` on the tiny synthetic Gemma 3 (crates/model/tests/common/tiny.rs: F32 weights,
//! sliding window 8, so a cache ring of 8 + 512 slots): prefix reuse must give the same bits
//! as evaluating from scratch, including when the ring has moved past the shared prefix, and
//! greedy `generate` must follow the argmax of the logits.

#[path = "../../model/tests/common/tiny.rs"]
mod tiny;

use gemma3_engine::{GenerateParams, Session, SessionError};
use gemma3_gguf::GgufFile;
use gemma3_model::Model;
use tiny::{tiny_writer, Rng, TinySpec};

fn model() -> Model {
    let (w, _) = tiny_writer(&TinySpec::default());
    Model::from_gguf(GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap()
}

/// The tiny model's tokenizer.
fn tokenizer() -> gemma3_tokenizer::Tokenizer {
    let f = GgufFile::from_bytes(tiny_writer(&TinySpec::default()).0.to_bytes()).unwrap();
    gemma3_engine::tokenizer_from_gguf(&f).unwrap()
}

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 6 + rng.below(290) as u32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Logits after `prompt` in a fresh session.
fn fresh(m: &Model, prompt: &[u32]) -> Vec<u32> {
    let mut s = Session::new(m, 1024);
    bits(s.eval_prompt(prompt, false).unwrap().0)
}

#[test]
fn prefix_reuse_gives_the_same_logits_as_a_fresh_session() {
    let m = model();
    let a = tokens(1, 30);
    let mut ab = a.clone();
    ab.extend(tokens(2, 12));
    let mut s = Session::new(&m, 1024);
    s.eval_prompt(&a, false).unwrap();
    let (logits, evaluated) = s.eval_prompt(&ab, false).unwrap();
    assert_eq!(evaluated, 12, "only the new tokens are evaluated");
    assert_eq!(bits(logits), fresh(&m, &ab));
    // A shorter prompt sharing a prefix: rewinds, evaluates the last token again.
    let (logits, evaluated) = s.eval_prompt(&ab[..20], false).unwrap();
    assert_eq!(evaluated, 1);
    assert_eq!(bits(logits), fresh(&m, &ab[..20]));
    // After steps, too.
    let mut s = Session::new(&m, 1024);
    s.eval_prompt(&a, false).unwrap();
    for &t in &ab[30..] {
        s.step(t).unwrap();
    }
    let (logits, evaluated) = s.eval_prompt(&ab, false).unwrap();
    assert_eq!(evaluated, 1);
    assert_eq!(bits(logits), fresh(&m, &ab));
}

#[test]
fn prefix_reuse_after_the_window_ring_moved_on() {
    // 560 tokens overwrite ring slots of positions < 40 in the local layers (8 + 512 slots),
    // so a new prompt sharing only the first 30 tokens cannot reuse them.
    let m = model();
    let long = tokens(3, 560);
    let mut other = long[..30].to_vec();
    other.extend(tokens(4, 10));
    let mut s = Session::new(&m, 1024);
    s.eval_prompt(&long, false).unwrap();
    let (logits, _) = s.eval_prompt(&other, false).unwrap();
    assert_eq!(bits(logits), fresh(&m, &other));
    // Sharing nearly all of it is fine to reuse.
    let mut s = Session::new(&m, 1024);
    s.eval_prompt(&long, false).unwrap();
    let mut more = long.clone();
    more.extend(tokens(5, 3));
    let (logits, evaluated) = s.eval_prompt(&more, false).unwrap();
    assert_eq!(evaluated, 3);
    assert_eq!(bits(logits), fresh(&m, &more));
}

#[test]
fn greedy_generate_follows_the_argmax() {
    let m = model();
    let f = GgufFile::from_bytes(tiny_writer(&TinySpec::default()).0.to_bytes()).unwrap();
    let tok = gemma3_engine::tokenizer_from_gguf(&f).unwrap();
    let prompt = tokens(6, 9);
    let params = GenerateParams::greedy(12);
    let mut s = Session::new(&m, 64);
    let g = s.generate(&tok, &prompt, &params, |_| true).unwrap();
    assert_eq!(g.tokens.len(), 12);
    let mut s = Session::new(&m, 64);
    let mut logits = s.eval_prompt(&prompt, false).unwrap().0.to_vec();
    for (i, &t) in g.tokens.iter().enumerate() {
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        assert_eq!(t, best, "generated token {i}");
        logits = s.step(t).unwrap().to_vec();
    }
}

#[test]
fn prompt_errors() {
    let m = model();
    let mut s = Session::new(&m, 16);
    assert!(matches!(
        s.eval_prompt(&tokens(7, 17), false),
        Err(SessionError::PromptTooLong {
            prompt: 17,
            ctx: 16
        })
    ));
    assert!(matches!(
        s.eval_prompt(&[], false),
        Err(SessionError::EmptyPrompt)
    ));
    // A full context: stepping past it is an error, not a panic.
    s.eval_prompt(&tokens(8, 16), false).unwrap();
    assert!(s.step(7).is_err());
}

/// NaN weights give NaN logits and hidden states: the session and the
/// scheduler each end a generation or an embedding with an error naming
/// that, where greedy decoding had returned token 0 forever. (A NaN in a
/// matrix: one in a norm weight is refused when the model loads.)
#[test]
fn non_finite_logits_end_with_an_error() {
    use gemma3_engine::scheduler::{Event, Request, RequestError, Scheduler, SchedulerConfig};
    use gemma3_engine::Pooling;
    use std::sync::{mpsc, Arc};
    let spec = TinySpec::default();
    let (_, mut weights) = tiny_writer(&spec);
    weights.get_mut("blk.0.attn_q.weight").unwrap().data[0] = f32::NAN;
    let mut w = gemma3_gguf::GgufWriter::new();
    tiny::tiny_metadata(&mut w, &spec, "gemma3");
    for (name, t) in &weights {
        let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor(name, &t.dims, gemma3_gguf::GgmlType::F32, bytes)
            .unwrap();
    }
    let m = Model::from_gguf(GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap();
    let params = GenerateParams::greedy(4);
    let tok = tokenizer();
    let prompt = tokens(3, 5);
    let e = Session::new(&m, 64)
        .generate(&tok, &prompt, &params, |_| true)
        .unwrap_err();
    assert!(matches!(e, SessionError::NonFiniteLogits), "{e}");
    let e = Session::new(&m, 64)
        .embed(&prompt, Pooling::Mean, true)
        .unwrap_err();
    assert!(matches!(e, SessionError::NonFiniteHidden), "{e}");

    let (sched, thread) =
        Scheduler::start(Arc::new(m), Arc::new(tok), SchedulerConfig::default()).unwrap();
    // (The third: the prompt's tokens scored and none generated, where each
    // scored token's log-probability had been NaN, sent as `null`.)
    let score_only = GenerateParams::greedy(0);
    for (embed, scored, params, what) in [
        (None, None, &params, "logits"),
        (Some(Pooling::Last), None, &params, "hidden states"),
        (None, Some(1), &score_only, "logits"),
    ] {
        let (tx, rx) = mpsc::channel();
        sched
            .submit(Request {
                prompt: prompt.clone(),
                params: params.clone(),
                logprobs: None,
                embed,
                prompt_logprobs: scored,
                lora: None,
                own_lora: false,
                events: Box::new(move |ev: Event| tx.send(ev).is_ok()),
            })
            .unwrap();
        match rx.recv().unwrap() {
            Event::Error(RequestError::Model(m)) => {
                assert!(m.contains(&format!("{what} are not finite")), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
    drop(sched);
    thread.join().unwrap();
}

/// A NaN or infinite norm weight is refused when the model loads, naming the
/// tensor: through the 8-bit activation quantizers (which read a NaN as 0) it
/// gave a plausible wrong answer on the real model, not NaN logits.
#[test]
fn a_non_finite_norm_weight_is_refused_at_load() {
    let spec = TinySpec::default();
    for (name, value) in [
        ("blk.2.ffn_norm.weight", f32::NAN),
        ("output_norm.weight", f32::INFINITY),
    ] {
        let (_, mut weights) = tiny_writer(&spec);
        weights.get_mut(name).unwrap().data[5] = value;
        let mut w = gemma3_gguf::GgufWriter::new();
        tiny::tiny_metadata(&mut w, &spec, "gemma3");
        for (n, t) in &weights {
            let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.add_tensor(n, &t.dims, gemma3_gguf::GgmlType::F32, bytes)
                .unwrap();
        }
        let e = Model::from_gguf(GgufFile::from_bytes(w.to_bytes()).unwrap())
            .err()
            .expect("refused");
        let msg = e.to_string();
        assert!(
            msg.contains(name) && msg.contains("index 5") && msg.contains("finite"),
            "{msg}"
        );
    }
}

/// A request's place is free by the time its last event (done or error) is
/// sent, so a client that sends its next request as soon as it has the
/// answer is never refused as over the limit. The sink looks at the
/// scheduler's counts when the last event arrives, on the scheduler's own
/// thread, for each way a request ends: generated to its length, asked for
/// no tokens, and refused as invalid. (Sent before the place was freed, a
/// sequential client's next request was sometimes a 429 in the server tests.)
#[test]
fn a_request_has_left_the_queue_when_its_last_event_arrives() {
    use gemma3_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use std::sync::{mpsc, Arc};
    let tok = tokenizer();
    let cfg = SchedulerConfig {
        parallel: 1,
        ctx: 64,
        max_queue: 0,
        prefill_chunk: 256,
    };
    let (sched, thread) = Scheduler::start(Arc::new(model()), Arc::new(tok), cfg).unwrap();
    let cases = [
        (
            "generated to its length",
            tokens(5, 6),
            GenerateParams::greedy(3),
        ),
        (
            "no tokens asked for",
            tokens(6, 6),
            GenerateParams::greedy(0),
        ),
        (
            "a prompt over the context",
            tokens(7, 65),
            GenerateParams::greedy(3),
        ),
    ];
    for (label, prompt, params) in cases {
        let (tx, rx) = mpsc::channel();
        let seen = sched.clone();
        sched
            .submit(Request {
                prompt,
                params,
                logprobs: None,
                embed: None,
                prompt_logprobs: None,
                lora: None,
                own_lora: false,
                events: Box::new(move |ev: Event| {
                    if matches!(ev, Event::Token { .. }) {
                        return true;
                    }
                    let s = seen.stats();
                    tx.send((ev, s.active + s.waiting)).is_ok()
                }),
            })
            .unwrap();
        let (ev, in_system) = rx.recv().unwrap();
        assert_eq!(
            in_system, 0,
            "{label}: still counted at its last event {ev:?}"
        );
    }
    drop(sched);
    thread.join().unwrap();
}

/// Embeddings through the scheduler, read over several steps (a prompt chunk
/// of 16) side by side with a generating request, equal `Session::embed`'s
/// bit for bit, for each pooling; mean pooling is the average of the hidden
/// states the forward pass gives (itself checked against the reference in
/// the model's tests), and a text may fill the context.
#[test]
fn scheduler_embeddings_equal_the_session_s() {
    use gemma3_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use gemma3_engine::Pooling;
    use gemma3_model::{Batch, ForwardState, KvCache, Output};
    use std::sync::{mpsc, Arc};
    let m = model();
    let tok = tokenizer();
    let texts = [tokens(31, 3), tokens(32, 40), tokens(33, 64)];
    let poolings = [Pooling::Mean, Pooling::Last, Pooling::Cls];
    let mut s = Session::new(&m, 64);
    let alone: Vec<Vec<Vec<f32>>> = poolings
        .iter()
        .map(|&p| {
            texts
                .iter()
                .map(|t| s.embed(t, p, false).unwrap())
                .collect()
        })
        .collect();
    // Mean pooling by hand, from the forward pass's hidden states.
    let d = m.config.d_model;
    let mut cache = KvCache::new(&m.config, 64);
    let mut st = ForwardState::new();
    let mut b = Batch::default();
    for (i, &t) in texts[1].iter().enumerate() {
        b.push_out(t, i, 0, Output::Hidden);
    }
    m.forward(&b, std::slice::from_mut(&mut cache), &mut st)
        .unwrap();
    let mean: Vec<f32> = (0..d)
        .map(|k| {
            let sum: f64 = st.hidden().chunks(d).map(|r| r[k] as f64).sum();
            (sum / 40.0) as f32
        })
        .collect();
    assert_eq!(bits(&alone[0][1]), bits(&mean), "mean pooling");
    assert_eq!(
        bits(&alone[1][1]),
        bits(&st.hidden()[39 * d..]),
        "last pooling"
    );
    assert_eq!(bits(&alone[2][1]), bits(&st.hidden()[..d]), "cls pooling");
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let unit = s.embed(&texts[1], Pooling::Mean, true).unwrap();
    assert!(
        (norm(&unit) - 1.0).abs() < 1e-6,
        "unit length: {}",
        norm(&unit)
    );
    let scale = norm(&mean);
    assert!(
        unit.iter()
            .zip(&mean)
            .all(|(&u, &x)| (u as f64 - x as f64 / scale).abs() < 1e-6),
        "the normalized mean"
    );

    let cfg = SchedulerConfig {
        parallel: 4,
        ctx: 64,
        max_queue: 8,
        prefill_chunk: 16,
    };
    let tok_solo = tok.clone();
    let (sched, thread) = Scheduler::start(Arc::new(model()), Arc::new(tok), cfg).unwrap();
    let greedy = GenerateParams::greedy(20);
    let solo = Session::new(&m, 64)
        .generate(&tok_solo, &tokens(34, 10), &greedy, |_| true)
        .unwrap();
    assert_eq!(solo.tokens.len(), 20);
    for (p, want) in poolings.iter().zip(&alone) {
        let (tx, rx) = mpsc::channel();
        let gen_tx = tx.clone();
        // A generation first, so that the embeddings share its steps.
        let mut reqs = vec![Request {
            prompt: tokens(34, 10),
            params: greedy.clone(),
            logprobs: None,
            embed: None,
            prompt_logprobs: None,
            lora: None,
            own_lora: false,
            events: Box::new(move |ev: Event| gen_tx.send((usize::MAX, ev)).is_ok()),
        }];
        for (i, t) in texts.iter().enumerate() {
            let tx = tx.clone();
            reqs.push(Request {
                prompt: t.clone(),
                params: greedy.clone(),
                logprobs: None,
                embed: Some(*p),
                prompt_logprobs: None,
                lora: None,
                own_lora: false,
                events: Box::new(move |ev: Event| tx.send((i, ev)).is_ok()),
            });
        }
        drop(tx);
        sched.submit_many(reqs).unwrap();
        let mut got = vec![None; texts.len()];
        let mut generated = Vec::new();
        for (i, ev) in rx.iter() {
            match ev {
                Event::Embedding { vector, usage } if i < texts.len() => {
                    assert_eq!(usage.prompt_tokens, texts[i].len());
                    assert_eq!(usage.cached_tokens, 0, "no prefix reused");
                    got[i] = Some(vector);
                }
                Event::Token { id, .. } if i == usize::MAX => generated.push(id),
                Event::Done { .. } if i == usize::MAX => {}
                other => panic!("request {i}: {other:?}"),
            }
        }
        // The generation beside them gives its tokens alone.
        assert_eq!(
            generated, solo.tokens,
            "{p}: the generation beside the embeddings"
        );
        for (i, w) in want.iter().enumerate() {
            let g = got[i].as_ref().expect("an embedding");
            assert_eq!(bits(g), bits(w), "{p} pooling, text {i}");
        }
    }
    drop(sched);
    thread.join().unwrap();
}

/// An embedding request whose client went away (its sink closed) is dropped
/// between steps without a word, and its place is free again: the one place
/// of a scheduler without a queue takes the next request.
#[test]
fn a_cancelled_embedding_frees_its_place() {
    use gemma3_engine::scheduler::{Event, EventSink, Request, Scheduler, SchedulerConfig};
    use gemma3_engine::Pooling;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    struct Gone {
        closed: Arc<AtomicBool>,
        sent: Arc<AtomicUsize>,
    }
    impl EventSink for Gone {
        fn send(&mut self, _: Event) -> bool {
            self.sent.fetch_add(1, Ordering::SeqCst);
            false
        }
        fn is_closed(&self) -> bool {
            self.closed.load(Ordering::SeqCst)
        }
    }
    let tok = tokenizer();
    let cfg = SchedulerConfig {
        parallel: 1,
        ctx: 64,
        max_queue: 0,
        prefill_chunk: 4,
    };
    let (sched, thread) = Scheduler::start(Arc::new(model()), Arc::new(tok), cfg).unwrap();
    let greedy = GenerateParams::greedy(2);
    let (closed, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    sched
        .submit(Request {
            prompt: tokens(40, 64),
            params: greedy.clone(),
            logprobs: None,
            embed: Some(Pooling::Mean),
            prompt_logprobs: None,
            lora: None,
            own_lora: false,
            events: Box::new(Gone {
                closed: closed.clone(),
                sent: sent.clone(),
            }),
        })
        .unwrap();
    closed.store(true, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    while sched.stats().active + sched.stats().waiting > 0 {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the cancelled embedding kept its place"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (tx, rx) = mpsc::channel();
    sched
        .submit(Request {
            prompt: tokens(41, 5),
            params: greedy,
            logprobs: None,
            embed: None,
            prompt_logprobs: None,
            lora: None,
            own_lora: false,
            events: Box::new(move |ev: Event| tx.send(ev).is_ok()),
        })
        .unwrap();
    assert!(rx.iter().any(|ev| matches!(ev, Event::Done { .. })));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        0,
        "nothing sent to a closed sink"
    );
    drop(sched);
    thread.join().unwrap();
}

/// `embed_texts` (several texts to a forward pass, a text longer than a group
/// alone) gives each text the bits `Session::embed` gives it alone, in order;
/// `out` returning false stops it; an empty text is refused.
#[test]
fn batched_embeddings_equal_each_alone() {
    use gemma3_engine::embed::{embed_texts, GROUP_TOKENS};
    use gemma3_engine::Pooling;
    let m = model();
    let lens = [3, 40, 1, 200, 300, GROUP_TOKENS + 88, 7, 64];
    let texts: Vec<Vec<u32>> = (lens.iter().enumerate())
        .map(|(i, &n)| tokens(50 + i as u64, n))
        .collect();
    let mut s = Session::new(&m, 1024);
    for pooling in [Pooling::Mean, Pooling::Last] {
        let mut got = Vec::new();
        embed_texts(&m, &texts, pooling, true, |v| {
            got.push(v);
            true
        })
        .unwrap();
        assert_eq!(got.len(), texts.len());
        for (i, (g, t)) in got.iter().zip(&texts).enumerate() {
            let alone = s.embed(t, pooling, true).unwrap();
            assert_eq!(
                bits(g),
                bits(&alone),
                "{pooling}, text {i} ({} tokens)",
                t.len()
            );
        }
    }
    let mut n = 0;
    embed_texts(&m, &texts, Pooling::Mean, false, |_| {
        n += 1;
        n < 2
    })
    .unwrap();
    assert_eq!(n, 2, "stopped when asked");
    let e = embed_texts(&m, &[vec![5], vec![]], Pooling::Mean, false, |_| true).unwrap_err();
    assert!(matches!(e, SessionError::EmptyPrompt), "{e}");
}

/// A prefix copied from a busy slot gives the sliding-window layers only the window before
/// its end; a later prompt sharing a shorter prefix with that slot must not be continued
/// from it, where the positions it needs were never written there. (A review found the
/// server answering such a prompt wrongly, without a word, after a copy of 799 positions:
/// the check of a reusable prefix looked only at whether the ring had wrapped.)
#[test]
fn a_shorter_prefix_of_a_copied_one_is_not_reused() {
    use gemma3_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use std::sync::{mpsc, Arc};
    let m = Arc::new(model());
    let cfg = SchedulerConfig {
        parallel: 2,
        ctx: 2048,
        max_queue: 4,
        prefill_chunk: 256,
    };
    let (sched, thread) = Scheduler::start(m.clone(), Arc::new(tokenizer()), cfg).unwrap();
    // Each generated token's id and log-probability, sent on as they come.
    let submit = |prompt: Vec<u32>, n: usize| {
        let (tx, rx) = mpsc::channel();
        sched
            .submit(Request {
                prompt,
                params: GenerateParams::greedy(n),
                logprobs: Some(0),
                embed: None,
                prompt_logprobs: None,
                lora: None,
                own_lora: false,
                events: Box::new(move |ev: Event| match ev {
                    Event::Token { id, logprob, .. } => tx.send((id, logprob)).is_ok(),
                    _ => true,
                }),
            })
            .unwrap();
        rx
    };
    // A, 40 tokens (the window is 8), keeps slot 0 busy for 2000 tokens.
    let long = tokens(11, 40);
    let a = submit(long.clone(), 2000);
    a.recv().unwrap();
    // B shares A's first 39 tokens: copied from busy slot 0 into slot 1.
    let mut b_prompt = long[..39].to_vec();
    b_prompt.push(7);
    let b = submit(b_prompt, 1);
    b.recv().unwrap();
    while b.recv().is_ok() {}
    // C shares only 12 with slot 1's copy, whose local layers hold positions 31.. alone.
    let mut c_prompt = long[..12].to_vec();
    c_prompt.extend([9, 10]);
    let (id, logprob) = submit(c_prompt.clone(), 1).recv().unwrap();
    let mut s = Session::new(&m, 64);
    let (logits, _) = s.eval_prompt(&c_prompt, false).unwrap();
    let best = gemma3_engine::sampler::argmax(logits);
    assert_eq!(id, best, "C's token against a fresh session's");
    let want = gemma3_engine::sampler::logprob(logits, best);
    assert!(
        (logprob.unwrap() - want).abs() < 1e-5,
        "{logprob:?} vs {want}"
    );
    // (A still ran: B was a copy, and C found slot 0 busy.)
    let a_tokens = 1 + a.try_iter().count();
    eprintln!("A had generated {a_tokens} tokens");
    assert!(
        a_tokens < 2000,
        "A ended before C was placed: nothing was tested"
    );
    drop(a);
    drop(sched);
    thread.join().unwrap();
}
