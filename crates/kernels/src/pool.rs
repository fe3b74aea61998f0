//! A small fork-join pool for the many short parallel steps of the forward
//! pass: its workers spin between jobs instead of sleeping.
//!
//! Why not rayon there: a token at batch 1 runs about 90 parallel matrix
//! products of 10-100 µs each, with a few µs of serial work between them.
//! On the 2-vCPU Zen 4 VM this project runs on, a rayon region of two
//! tasks cost 0.7-2 µs more than its work while the workers were awake and
//! about 9 µs once they had gone to sleep (after some 40 µs without work);
//! a worker spinning on an atomic costs 0.07 µs. Together with one
//! contiguous part of the weights per thread (`packed::run_packed`), the
//! layers' matrix products took about 10% less time than on rayon with small
//! interleaved tasks, and tg128 on 2 threads went from 113.9 to 126.1 tok/s
//! (medians of six alternating pairs).
//!
//! Prefill's steps run here too. Each is longer (about 80 µs on average in
//! a 64-token prompt on two threads, derived from its time over its some 160
//! steps, not timed one by one), but between them rayon's second worker often
//! went to sleep and woke late, and the spin pool's worker, spinning after
//! the last token's output head, took its core meanwhile: on the Zen 5,
//! the same binary switching between the two in one process, pp64 on two
//! threads ran 5–6% faster on this pool and pp512 about 3%.
//!
//! Workers spin for 300 µs (`SPIN`) after their last job, then park until
//! the next one, so an idle process burns no CPU.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// Batches of at most this many tokens (generation) stream the weights once
/// a token: `packed::run_packed` cuts them into contiguous parts per thread.
pub const SMALL_BATCH: usize = 4;

/// The job being run: tasks `0..n`, claimed one at a time through `next`.
struct Job {
    /// The caller's closure, its lifetime erased: valid while the job is
    /// published or any worker is inside it (see [`SpinPool::run`]).
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

// SAFETY: the closure is Sync, and `run` keeps it alive while any worker
// can reach it.
unsafe impl Send for Job {}

struct Shared {
    /// The published job, if any; workers take a reference under the lock.
    job: Mutex<Option<Job>>,
    /// Bumped when a job is published; what idle workers spin on.
    epoch: AtomicUsize,
    next: AtomicUsize,
    finished: AtomicUsize,
    /// Workers currently holding the job's closure.
    active: AtomicUsize,
    stop: AtomicBool,
    /// One flag per worker: set while it is parked (or about to be).
    parked: Vec<AtomicBool>,
    /// The first panic of a task on a worker, for the caller to resume.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    panicked: AtomicBool,
}

/// Caller plus `workers` spinning threads; see the module docs.
pub struct SpinPool {
    /// Threads asked for (the caller included).
    size: usize,
    shared: Arc<Shared>,
    /// Worker w's thread (None if it could not be started).
    threads: Vec<Option<std::thread::JoinHandle<()>>>,
    /// One caller at a time (a second one runs its job inline).
    busy: Mutex<()>,
}

impl SpinPool {
    /// A pool of `threads` in all: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> Self {
        let workers = threads.saturating_sub(1);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            panic: Mutex::new(None),
            panicked: AtomicBool::new(false),
        });
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("spin-{w}"))
                    .spawn(move || worker(&s, w))
                    .ok()
            })
            .collect();
        SpinPool {
            size: threads.max(1),
            shared,
            threads: handles,
            busy: Mutex::new(()),
        }
    }

    /// Threads asked for, the caller included (fewer run a job if a
    /// worker could not be started).
    pub fn threads(&self) -> usize {
        self.size
    }

    /// Run `f(i)` for every i in `0..n`, on the caller and the workers,
    /// and return when all have finished. Tasks are claimed one at a time,
    /// so uneven ones balance. If a task panics, the remaining ones are
    /// skipped and the panic resumes on the caller once no worker holds `f`.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) => Some(g),
            // A task's panic unwound through an earlier `run`; the pool is
            // consistent again (its job was retired).
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let parallel = n > 1 && self.threads.iter().any(Option::is_some) && !IN_WORKER.get();
        let _guard = match guard {
            Some(g) if parallel => g,
            _ => {
                // Release the lock before running inline, so that another
                // caller meanwhile gets the workers.
                drop(guard);
                return (0..n).for_each(f);
            }
        };
        let s = &*self.shared;
        // SAFETY (of the lifetime erasure): `Retire` below, dropped before
        // `run` returns or unwinds, unpublishes the job and waits until no
        // worker holds it.
        let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        {
            let mut job = s.job.lock().unwrap_or_else(|e| e.into_inner());
            s.next.store(0, Ordering::Relaxed);
            s.finished.store(0, Ordering::Relaxed);
            s.panicked.store(false, Ordering::Relaxed);
            *job = Some(Job { f: f_static, n });
            // SeqCst here and on the workers' side of parking: a worker
            // either sees the new epoch or is seen parked (and unparked).
            s.epoch.fetch_add(1, Ordering::SeqCst);
        }
        let retire = Retire(s);
        for (w, p) in s.parked.iter().enumerate() {
            if p.swap(false, Ordering::SeqCst) {
                if let Some(t) = &self.threads[w] {
                    t.thread().unpark();
                }
            }
        }
        let mut mine = 0;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
            mine += 1;
        }));
        if r.is_err() {
            // Claim the remaining tasks so that the workers stop.
            s.next.store(n, Ordering::Relaxed);
        } else {
            s.finished.fetch_add(mine, Ordering::AcqRel);
            wait_until(|| {
                s.finished.load(Ordering::Acquire) >= n || s.panicked.load(Ordering::Acquire)
            });
        }
        drop(retire);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
        if s.panicked.load(Ordering::Acquire) {
            let e = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
            std::panic::resume_unwind(e.unwrap_or_else(|| Box::new("a pool task panicked")));
        }
    }
}

/// Unpublishes the current job and waits for the workers that took it:
/// after its drop no worker can reach the job's closure.
struct Retire<'a>(&'a Shared);

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        *self.0.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        wait_until(|| self.0.active.load(Ordering::Acquire) == 0);
    }
}

/// Spin until `done()`, yielding the CPU after long waits (some 100s of
/// µs: a thread we wait for may have been descheduled when there are more
/// threads than cores; a normal wait, for a worker to finish its part, is
/// far shorter and never makes the system call).
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins.is_multiple_of(8192) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for t in self.threads.iter().flatten() {
            t.thread().unpark();
        }
        for t in self.threads.drain(..).flatten() {
            let _ = t.join();
        }
    }
}

thread_local! {
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

fn worker(s: &Shared, w: usize) {
    IN_WORKER.set(true);
    // Epoch 0 is before any job: a worker that starts late still joins a
    // job in progress, and sees a stop that came before it started.
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                s.parked[w].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                s.parked[w].store(false, Ordering::Release);
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        // Take the current job, if it has not been retired.
        let (f, n) = {
            let job = s.job.lock().unwrap_or_else(|e| e.into_inner());
            match &*job {
                Some(j) => {
                    s.active.fetch_add(1, Ordering::AcqRel);
                    (j.f, j.n)
                }
                None => continue,
            }
        };
        let mut mine = 0;
        loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            // SAFETY: the job is live while `active` counts this worker.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*f)(i) }));
            if let Err(e) = r {
                // Skip the rest; the caller resumes the panic.
                s.next.store(n, Ordering::Relaxed);
                s.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
                s.panicked.store(true, Ordering::Release);
                break;
            }
            mine += 1;
        }
        s.finished.fetch_add(mine, Ordering::AcqRel);
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `f(i)` for every i in `0..tasks`, a parallel step of the forward pass,
/// on the spin pool of the calling rayon pool's thread count (inline for
/// one task or one thread). Tasks are independent, so the split never
/// changes a result.
pub fn for_each_task(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if tasks <= 1 || threads() <= 1 {
        (0..tasks).for_each(f);
    } else {
        current().run(tasks, f);
    }
}

/// `f` on every item, `per_task` consecutive items a task, shared out as
/// [`for_each_task`] shares tasks. Items are independent, so the split
/// never changes a result.
pub fn for_each_item<T: Send>(
    items: impl IntoIterator<Item = T>,
    per_task: usize,
    f: &(dyn Fn(T) + Sync),
) {
    if threads() <= 1 {
        return items.into_iter().for_each(f);
    }
    // Slot i is taken once, by the one task whose range holds i: its lock
    // is never contended.
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|x| Mutex::new(Some(x))).collect();
    let per = per_task.max(1);
    let task = |t: usize| {
        for s in &slots[t * per..((t + 1) * per).min(slots.len())] {
            let item = s.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(x) = item {
                f(x);
            }
        }
    };
    for_each_task(slots.len().div_ceil(per), &task);
}

/// The threads a parallel step may use: the calling rayon pool's count, or
/// 1 inside a spin pool task (a step nested in another runs inline, and
/// asking rayon there would start its global pool).
pub fn threads() -> usize {
    if IN_WORKER.get() {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// The pool for the calling thread's rayon thread count (so `-t 2` gives
/// the caller and one worker), created on first use and kept for the
/// process's lifetime.
pub fn current() -> &'static SpinPool {
    thread_local! {
        static CACHED: Cell<Option<&'static SpinPool>> = const { Cell::new(None) };
    }
    static POOLS: Mutex<Vec<&'static SpinPool>> = Mutex::new(Vec::new());
    let want = rayon::current_num_threads().max(1);
    if let Some(p) = CACHED.get().filter(|p| p.threads() == want) {
        return p;
    }
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let p = match pools.iter().find(|p| p.threads() == want) {
        Some(p) => *p,
        None => {
            // Never freed: its workers park when idle.
            let p: &'static SpinPool = Box::leak(Box::new(SpinPool::new(want)));
            pools.push(p);
            p
        }
    };
    CACHED.set(Some(p));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Pools dropped at once, before their workers have even started,
    /// or after they have parked, shut down.
    #[test]
    fn pools_shut_down_whenever_dropped() {
        for _ in 0..200 {
            drop(SpinPool::new(3));
        }
        let p = SpinPool::new(2);
        p.run(4, &|_| {});
        std::thread::sleep(SPIN * 4);
        drop(p);
    }

    /// Every item is given to `f` once, whatever the task size, on one
    /// thread or several.
    #[test]
    fn for_each_item_visits_every_item_once() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (n, per) in [(0, 1), (1, 1), (5, 16), (100, 7), (1000, 1), (64, 16)] {
                    let seen: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                    for_each_item(0..n, per, &|i: usize| {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(
                        seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                        "{n} items, {per} a task, {threads} threads"
                    );
                }
            });
        }
    }

    /// A task's panic reaches the caller as a panic, whichever thread ran
    /// it, and the pool keeps working.
    #[test]
    fn a_panicking_task_unwinds_to_the_caller() {
        let pool = SpinPool::new(2);
        for round in 0..50 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|i| {
                    if i == 37 {
                        panic!("task {i} of round {round}");
                    }
                })
            }));
            assert!(r.is_err(), "round {round}: the panic was lost");
            let total = AtomicU64::new(0);
            pool.run(64, &|i| {
                total.fetch_add(i as u64, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), (0..64).sum::<u64>());
        }
    }

    #[test]
    fn every_task_runs_once() {
        let pool = SpinPool::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn parked_workers_wake_and_callers_share() {
        let pool = Arc::new(SpinPool::new(2));
        let total = AtomicU64::new(0);
        pool.run(64, &|i| {
            total.fetch_add(i as u64, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 4); // the worker parks
        pool.run(64, &|i| {
            total.fetch_add(i as u64, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 2 * (0..64).sum::<u64>());
        // Several callers at once: each job still runs every task once.
        let sum = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        pool.run(10, &|i| {
                            sum.fetch_add(i as u64, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4 * 200 * 45);
    }
}
