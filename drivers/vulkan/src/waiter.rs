//! One completion thread for every Vulkan device in the process.
//!
//! `submit` hands each in-flight submission here and returns at once with a pending core
//! `Fence` (an eventfd the scheduler's io_uring reactor can wait on). The thread finishes a
//! submission (reads back staged outputs, ends the buffer leases) and signals its fence:
//!
//! - where the device exports its `VkFence` as a sync_file fd (`VK_KHR_external_fence_fd`,
//!   SYNC_FD), the thread sleeps in one `poll(2)` over all those fds plus a wake-up eventfd
//!   and does no Vulkan call to learn about completions;
//! - otherwise (lavapipe in Debian 12's Mesa 22.3 offers `VK_KHR_external_fence` but no
//!   `_fd`), it waits on the oldest such `VkFence` in slices of [`SLICE`] and checks the rest.
//!
//! Either way there is one thread for all devices, not one per device, and a submission's
//! fence signals only after every earlier submission of the same queue finished (jobs are
//! completed in the order they were handed in when several are done at once).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgehal_core::driver::FenceSignal;
use edgehal_core::sys::mem;
use edgehal_core::{Error, Result};

use crate::raw::{self, Recording, Submitted};

/// Longest time the thread blocks in `vkWaitForFences` before looking at new work.
const SLICE: Duration = Duration::from_millis(1);

/// What a finished submission still has to do on the host (read back staged outputs).
pub type Finish = Box<dyn FnOnce() -> Result<()> + Send>;

/// One submission in flight.
pub struct Job {
    /// The recording submitted (kept alive, and polled when there is no sync fd).
    pub rec: Arc<Recording>,
    pub how: Submitted,
    /// Everything the device uses until completion: buffers, pipelines, leases.
    pub keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
    pub leases: Vec<raw::HeldLease>,
    pub finish: Finish,
    pub signal: FenceSignal,
    /// Fail the fence when the work has not finished by then.
    pub deadline: Instant,
}

struct Waiter {
    queue: Mutex<Vec<Job>>,
    wake: OwnedFd,
}

fn waiter() -> Result<&'static Waiter> {
    static W: OnceLock<std::result::Result<&'static Waiter, String>> = OnceLock::new();
    W.get_or_init(|| {
        let wake = mem::eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let w: &'static Waiter = Box::leak(Box::new(Waiter {
            queue: Mutex::new(Vec::new()),
            wake,
        }));
        std::thread::Builder::new()
            .name("edgehal-vkwait".into())
            .spawn(move || run(w))
            .map_err(|e| format!("cannot start the Vulkan completion thread: {e}"))?;
        Ok(w)
    })
    .clone()
    .map_err(|msg| Error::Device {
        device: "vulkan".into(),
        msg,
    })
}

/// Start the completion thread if it is not running (call before submitting, so a job never
/// exists without a thread to finish it).
pub fn ensure() -> Result<()> {
    waiter().map(|_| ())
}

/// Hand a submitted job to the completion thread. The job is queued even when the wake-up
/// write fails (the error is returned; the thread still finds the job at its next wake-up).
pub fn hand_over(job: Job) -> Result<()> {
    let w = waiter()?;
    w.queue.lock().unwrap_or_else(|p| p.into_inner()).push(job);
    mem::eventfd_signal(w.wake.as_fd()).map_err(|e| Error::io("eventfd write", e))
}

fn complete(j: Job, r: Result<()>) {
    let r = r.and_then(|()| (j.finish)());
    drop(j.leases);
    drop(j.keep);
    j.signal.signal(r);
}

fn run(w: &'static Waiter) {
    let mut live: Vec<Job> = Vec::new();
    loop {
        live.extend(w.queue.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
        // Block: in poll(2) on the sync fds, or a slice of vkWaitForFences on the oldest
        // fence-only job (then a non-blocking poll for the rest).
        let oldest_fence = live.iter().position(|j| matches!(j.how, Submitted::Fence));
        let mut fence_done = vec![false; live.len()];
        let timeout_ms = match oldest_fence {
            Some(i) => {
                let ns = SLICE.as_nanos() as u64;
                match live[i].rec.done(ns) {
                    Ok(true) => fence_done[i] = true,
                    Ok(false) => {}
                    Err(e) => {
                        let j = live.remove(i);
                        complete(j, Err(e));
                        continue;
                    }
                }
                0
            }
            None if live.iter().any(|j| matches!(j.how, Submitted::Signalled)) => 0,
            // Sync fds only: sleep until one signals, new work arrives, or a deadline passes.
            None => live
                .iter()
                .map(|j| j.deadline.saturating_duration_since(Instant::now()))
                .min()
                .map_or(-1, |d| d.as_millis().clamp(1, i32::MAX as u128) as i32),
        };
        let mut fds: Vec<BorrowedFd<'_>> = vec![w.wake.as_fd()];
        let mut which: Vec<usize> = Vec::new();
        for (i, j) in live.iter().enumerate() {
            if let Submitted::SyncFd(fd) = &j.how {
                fds.push(fd.as_fd());
                which.push(i);
            }
        }
        let ready = match raw::poll_readable(&fds, timeout_ms) {
            Ok(r) => r,
            Err(_) => {
                std::thread::sleep(SLICE);
                continue;
            }
        };
        if ready.first().copied().unwrap_or(false) {
            raw::drain_eventfd(w.wake.as_fd());
        }
        let mut done = fence_done;
        for (k, &i) in which.iter().enumerate() {
            if ready.get(k + 1).copied().unwrap_or(false) {
                done[i] = true;
            }
        }
        let now = Instant::now();
        let mut i = 0;
        let mut k = 0;
        while i < live.len() {
            let finished = done[k]
                || matches!(live[i].how, Submitted::Signalled)
                || (matches!(live[i].how, Submitted::Fence)
                    && Some(k) != oldest_fence
                    && live[i].rec.done(0).unwrap_or(false));
            k += 1;
            if finished {
                let j = live.remove(i);
                complete(j, Ok(()));
            } else if now >= live[i].deadline {
                let j = live.remove(i);
                // The device still owns the buffers: keep them (and the recording) alive
                // for the life of the process rather than free memory a GPU may write.
                let msg = "submission did not finish before its deadline; its buffers are \
                           leaked to stay safe";
                let Job {
                    rec,
                    leases,
                    keep,
                    signal,
                    ..
                } = j;
                std::mem::forget((rec, leases, keep));
                signal.signal(Err(Error::Device {
                    device: "vulkan".into(),
                    msg: msg.into(),
                }));
            } else {
                i += 1;
            }
        }
    }
}
