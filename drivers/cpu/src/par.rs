//! Splitting kernel work across threads.
//!
//! Work is cut into contiguous ranges of "units" (row panels, channels, Winograd positions)
//! whose outputs are disjoint slices, so each thread gets `&mut` to its own part in safe Rust.
//! One thread runs inline on the caller (no spawn, no synchronisation); more run on a
//! persistent worker pool per thread count (rayon's, built once per process), so a network of
//! a hundred small convolutions does not pay a thread spawn per op.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// The pool of `threads` workers, built on first use and kept for the process.
fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Some(p.clone());
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("edgehal-cpu-{i}"))
            .build()
            .ok()?,
    );
    pools.insert(threads, p.clone());
    Some(p)
}

/// The thread count for a requested number: 0 means one per available core.
pub fn resolve_threads(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        requested
    }
}

/// Runs `f(units, part)` over `threads` contiguous ranges of `0..units`, where unit `u` owns
/// `out[u * unit_len .. (u + 1) * unit_len]` (the last unit may be shorter). Returns the first
/// error.
pub fn for_parts<T: Send, E: Send>(
    threads: usize,
    units: usize,
    unit_len: usize,
    out: &mut [T],
    f: impl Fn(Range<usize>, &mut [T]) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let parts = threads.clamp(1, units.max(1));
    if parts == 1 {
        return f(0..units, out);
    }
    let per = units.div_ceil(parts);
    let mut chunks = Vec::with_capacity(parts);
    let mut rest = out;
    let mut u = 0;
    while u < units {
        let end = (u + per).min(units);
        let len = ((end - u) * unit_len).min(rest.len());
        let (head, tail) = rest.split_at_mut(len);
        chunks.push((u..end, head));
        rest = tail;
        u = end;
    }
    // The caller runs the first part itself; the others go to a pool of `parts - 1` workers,
    // so `threads` threads work in all and the caller never sleeps while a worker wakes up to
    // run what it could have run.
    let Some(pool) = pool(parts - 1) else {
        // No pool could be built (thread limit): run the parts one after another.
        for (r, c) in chunks {
            f(r, c)?;
        }
        return Ok(());
    };
    let results: Vec<Mutex<Option<Result<(), E>>>> =
        (0..chunks.len()).map(|_| Mutex::new(None)).collect();
    let mut chunks = chunks.into_iter().zip(&results);
    let first = chunks.next();
    pool.in_place_scope(|s| {
        for ((r, c), slot) in chunks {
            let f = &f;
            s.spawn(move |_| {
                let r = f(r, c);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
        if let Some(((r, c), slot)) = first {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(f(r, c));
        }
    });
    // The first error in part order; a part that never reported (its worker panicked, which
    // rayon re-raises from `scope`) cannot reach here.
    for slot in results {
        if let Some(Err(e)) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    Ok(())
}

/// Elements below which splitting an elementwise loop across threads costs more than it saves
/// (a hand-off to a pool worker is a few microseconds; measured with `EDGEHAL_OP_PROFILE`).
pub const MIN_PARALLEL_ELEMS: usize = 1 << 15;

/// Runs `f(offset, part)` over contiguous parts of `out` (one per thread, `out` split at
/// multiples of 16 elements) when `out` has at least [`MIN_PARALLEL_ELEMS`] elements and
/// `threads > 1`; otherwise `f(0, out)` on the caller's thread.
pub fn for_slices<T: Send, E: Send>(
    threads: usize,
    out: &mut [T],
    f: impl Fn(usize, &mut [T]) -> Result<(), E> + Sync,
) -> Result<(), E> {
    const BLOCK: usize = 16;
    let n = out.len();
    if threads <= 1 || n < MIN_PARALLEL_ELEMS {
        return f(0, out);
    }
    for_parts(threads, n.div_ceil(BLOCK), BLOCK, out, |blocks, part| {
        f(blocks.start * BLOCK, part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_unit_once() {
        for threads in [1, 2, 3, 8] {
            for units in [0, 1, 5, 16] {
                let mut out = vec![0f32; units * 3];
                for_parts::<f32, ()>(threads, units, 3, &mut out, |r, part| {
                    assert_eq!(part.len(), r.len() * 3);
                    for (k, u) in r.enumerate() {
                        part[k * 3..k * 3 + 3]
                            .iter_mut()
                            .for_each(|v| *v += u as f32);
                    }
                    Ok(())
                })
                .unwrap();
                for (i, v) in out.iter().enumerate() {
                    assert_eq!(*v, (i / 3) as f32);
                }
            }
        }
        for threads in [1, 2, 3] {
            for n in [0, 1, 17, MIN_PARALLEL_ELEMS - 1, MIN_PARALLEL_ELEMS + 33] {
                let mut out = vec![0u32; n];
                for_slices::<u32, ()>(threads, &mut out, |off, part| {
                    for (k, v) in part.iter_mut().enumerate() {
                        *v += (off + k) as u32;
                    }
                    Ok(())
                })
                .unwrap();
                assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32));
            }
        }
        assert_eq!(
            for_parts(2, 4, 1, &mut [0f32; 4], |r, _| if r.start > 0 {
                Err("second")
            } else {
                Ok(())
            }),
            Err("second")
        );
    }
}
