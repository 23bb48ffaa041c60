//! A persistent worker pool for splitting one kernel call across threads.
//!
//! [`run_parts`]`(parts, f)` runs `f(0)`..`f(parts - 1)` on the calling thread and a pool of
//! `parts - 1` worker threads (built once per process for that size) and returns when all are
//! done. Callers (the CPU driver's `par` module) hand each part a disjoint slice of the output.
//!
//! The pool is built for a stream of small jobs (a network is a hundred convolutions of tens to
//! hundreds of microseconds each):
//! - A worker that finished a job spins for a while ([`spin_budget`], `EDGEHAL_SPIN_US`,
//!   default 200 µs) watching for the next one before it sleeps on a condition variable. Waking
//!   a sleeping thread costs tens of microseconds on a virtual machine, more than a second
//!   thread saves on a small op; a spinning worker picks the next job up at once.
//! - Parts are claimed, not assigned: the caller and the workers take the next unclaimed part
//!   from one atomic word until none is left. When a worker is late (asleep, or descheduled
//!   because the machine is busy with other processes), the caller runs its parts itself instead
//!   of waiting for it, so an oversubscribed machine degrades to one thread, not to a stall.

use std::any::Any;
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One part-runner handed to the workers; the lifetime is erased (see [`Pool::run`]).
type Job = *const (dyn Fn(usize) + Sync);

/// `state` packs the job's epoch (high 32 bits), its part count (16 bits) and the next
/// unclaimed part (low 16 bits), so a claim is one compare-and-swap that fails when the job
/// changed under it.
const PART_BITS: u32 = 16;
const PART_MASK: u64 = (1 << PART_BITS) - 1;
/// Most parts one job may have.
pub const MAX_PARTS: usize = PART_MASK as usize;

fn pack(epoch: u64, parts: u64, next: u64) -> u64 {
    (epoch << (2 * PART_BITS)) | (parts << PART_BITS) | next
}

fn unpack(s: u64) -> (u64, u64, u64) {
    (
        s >> (2 * PART_BITS),
        (s >> PART_BITS) & PART_MASK,
        s & PART_MASK,
    )
}

/// State shared by a pool's caller side and its workers.
struct Shared {
    state: AtomicU64,
    /// The current job, written before `state` publishes its epoch.
    job: UnsafeCell<Option<Job>>,
    /// Parts of the current job finished.
    done: AtomicUsize,
    /// The first panic of a worker part, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Workers asleep (or about to sleep) on `wake`.
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Held by the caller for the duration of a job: one job at a time per pool.
    busy: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding `busy`: before it publishes a new epoch
// in `state` (release) and after all parts of the previous job are finished (`done`, acquire).
// A worker reads it only after claiming a part of the current epoch (acquire on the claim) and
// before it counts that part in `done` (release), so reads and writes never overlap.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is the only non-Send field; it is shared under the same rule.
unsafe impl Send for Shared {}

struct Pool {
    shared: Arc<Shared>,
}

/// How long a worker spins for the next job before it sleeps.
fn spin_budget() -> Duration {
    static US: OnceLock<u64> = OnceLock::new();
    Duration::from_micros(*US.get_or_init(|| {
        std::env::var("EDGEHAL_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(200)
    }))
}

impl Shared {
    /// Claims the next part of the job of `epoch`, if one is left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut cur = self.state.load(Acquire);
        loop {
            let (e, parts, next) = unpack(cur);
            if e != epoch || next >= parts {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
            {
                Ok(_) => return Some(next as usize),
                Err(now) => cur = now,
            }
        }
    }

    /// Runs part `i` of the current job, keeping the first panic.
    fn run_part(&self, i: usize) {
        // SAFETY: the caller claimed part `i` of the current epoch, so the job is published and
        // stays alive until `done` counts this part (see `Pool::run`).
        let job = unsafe { *self.job.get() };
        if let Some(job) = job {
            // SAFETY: as above; the pointer was made from a live `&dyn Fn` by `Pool::run`.
            let f = unsafe { &*job };
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
        self.done.fetch_add(1, Release);
    }
}

impl Pool {
    fn new(workers: usize) -> Option<Pool> {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
        });
        for w in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("edgehal-cpu-{w}"))
                .spawn(move || worker(&s))
                .ok()?;
        }
        Some(Pool { shared })
    }

    /// Runs `f(0..parts)` on the caller and the workers; returns when all are done. Returns
    /// `false` without running anything when another caller holds the pool.
    fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let s = &*self.shared;
        if s.busy
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            return false;
        }
        // SAFETY: only the lifetime is changed. A part runs only after being claimed in this
        // job's epoch, and this function does not return (or unwind) before every part is
        // counted in `done`, so `f` outlives every call.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: `busy` is ours and every part of the previous job was counted in `done`.
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Relaxed);
        let (epoch, _, _) = unpack(s.state.load(Relaxed));
        let epoch = (epoch + 1) & 0xffff_ffff;
        // Part 0 is the caller's from the start: a spinning worker would otherwise often
        // claim it first, and which thread wrote which part of a layer's output would change
        // from layer to layer (the next layer's part 0 then reading what another core wrote).
        s.state.store(pack(epoch, parts as u64, 1), SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        s.run_part(0);
        while let Some(i) = s.claim(epoch) {
            s.run_part(i);
        }
        let mut spins = 0u32;
        while s.done.load(Acquire) != parts {
            spins = spins.saturating_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every part is finished, so no worker reads the job any more.
        unsafe { *s.job.get() = None };
        let panic = s.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        s.busy.store(false, Release);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        true
    }
}

fn worker(s: &Shared) {
    // Epoch 0 is "no job yet": a job posted before this thread started is still seen.
    let mut seen = 0;
    loop {
        // Spin for the next job, then sleep until one comes.
        let start = Instant::now();
        let budget = spin_budget();
        let mut n = 0u32;
        let mut now = unpack(s.state.load(Acquire)).0;
        while now == seen {
            // Yielding (not just pausing) hands the core to any other runnable thread: on an
            // idle machine it returns at once, on a busy one the spin costs others nothing.
            if n % 16 == 15 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            n = n.wrapping_add(1);
            if n & 255 == 0 && start.elapsed() >= budget {
                let mut g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                now = unpack(s.state.load(SeqCst)).0;
                while now == seen {
                    g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                    now = unpack(s.state.load(SeqCst)).0;
                }
                s.sleeping.fetch_sub(1, SeqCst);
                break;
            }
            now = unpack(s.state.load(Acquire)).0;
        }
        seen = now;
        while let Some(i) = s.claim(seen) {
            s.run_part(i);
        }
    }
}

/// Runs `f(0)`..`f(parts - 1)` on the calling thread and a pool of `parts - 1` threads,
/// returning when every part is done; a panic in any part is re-raised here after all parts
/// finished. Returns `false`, having run nothing, when the pool cannot be built (thread
/// limit), `parts` exceeds [`MAX_PARTS`], or the pool is running another caller's job (nested
/// or concurrent use): the caller then runs the parts itself.
pub fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    if parts == 0 || parts > MAX_PARTS {
        return parts == 0;
    }
    if parts == 1 {
        f(0);
        return true;
    }
    pool(parts - 1).is_some_and(|p| p.run(parts, f))
}

/// The pool of `workers` threads, built on first use and kept for the process.
fn pool(workers: usize) -> Option<Arc<Pool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Option<Arc<Pool>>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    pools
        .entry(workers)
        .or_insert_with(|| Pool::new(workers).map(Arc::new))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    // Each test uses its own part counts: tests run in parallel and a pool runs one job at a
    // time (a busy pool refuses, which the nested test checks on purpose).

    #[test]
    fn every_part_runs_once_per_job() {
        for parts in [1, 6, 7, 9] {
            for _ in 0..200 {
                let hits: Vec<AtomicU32> = (0..parts).map(|_| AtomicU32::new(0)).collect();
                assert!(run_parts(parts, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                }));
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "parts {parts}");
            }
        }
    }

    #[test]
    fn nested_use_is_refused_not_deadlocked() {
        let inner_ran = AtomicU32::new(0);
        assert!(run_parts(2, &|_| {
            if !run_parts(2, &|_| {
                inner_ran.fetch_add(1, Relaxed);
            }) {
                inner_ran.fetch_add(10, Relaxed);
            }
        }));
        // The pool of one worker is busy with the outer job: both inner calls are refused.
        assert_eq!(inner_ran.load(Relaxed), 20);
    }

    #[test]
    fn a_panicking_part_is_reraised_after_all_parts_finish() {
        let finished = AtomicU32::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_parts(3, &|i| {
                if i == 2 {
                    panic!("part two");
                }
                finished.fetch_add(1, Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(finished.load(Relaxed), 2);
        // The pool still works afterwards.
        let n = AtomicU32::new(0);
        assert!(run_parts(3, &|_| {
            n.fetch_add(1, Relaxed);
        }));
        assert_eq!(n.load(Relaxed), 3);
    }

    #[test]
    fn a_sleeping_pool_wakes_up() {
        let n = AtomicU32::new(0);
        assert!(run_parts(4, &|_| {
            n.fetch_add(1, Relaxed);
        }));
        // Longer than the spin budget: the workers are asleep on the condition variable now.
        std::thread::sleep(spin_budget() * 3 + Duration::from_millis(5));
        assert!(run_parts(4, &|_| {
            n.fetch_add(1, Relaxed);
        }));
        assert_eq!(n.load(Relaxed), 8);
    }
}
