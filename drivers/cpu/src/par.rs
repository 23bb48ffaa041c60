//! Splitting kernel work across threads.
//!
//! Work is cut into contiguous ranges of "units" (row panels, channels, Winograd positions)
//! whose outputs are disjoint slices, so each thread gets `&mut` to its own part in safe Rust.
//! One thread runs inline on the caller (no hand-off); more run on the persistent spinning
//! worker pool of `edgehal_kernels::pool` (one per thread count, built once per process), so a
//! network of a hundred small convolutions pays neither a thread spawn nor a wake-up per op.

use std::ops::Range;
use std::sync::Mutex;

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
    for_items(chunks, |_, (r, c)| f(r, c))
}

/// Runs `f(i, item)` for every item of `items`, one item per thread: the caller runs the
/// first itself and a pool of `items.len() - 1` workers the others, so the caller never
/// sleeps while a worker wakes up to run what it could have run. [`for_parts`] hands it the
/// slices of one output; other callers, items that are not one contiguous slice (a channel
/// range of each of the 36 Winograd planes). Returns the first error in item order.
pub fn for_items<W: Send, E: Send>(
    items: Vec<W>,
    f: impl Fn(usize, W) -> Result<(), E> + Sync,
) -> Result<(), E> {
    if items.len() <= 1 {
        return items.into_iter().try_for_each(|w| f(0, w));
    }
    let slots: Vec<Mutex<Option<W>>> = items.into_iter().map(|w| Mutex::new(Some(w))).collect();
    let results: Vec<Mutex<Option<Result<(), E>>>> =
        (0..slots.len()).map(|_| Mutex::new(None)).collect();
    let part = |i: usize| {
        let taken = slots[i].lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = taken {
            let res = f(i, w);
            *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(res);
        }
    };
    if !edgehal_kernels::pool::run_parts(slots.len(), &part) {
        // No pool (thread limit) or it is busy (nested or concurrent use): run them here.
        (0..slots.len()).for_each(part);
    }
    // A part that panicked was re-raised by the pool after all parts finished.
    for slot in results {
        if let Some(Err(e)) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    Ok(())
}

/// Channel ranges of `c` channels for `threads` threads, and for each range its part of every
/// plane of `v` (`planes` planes of `[c][t]`, back to back): what a per-channel transform
/// into `[planes][c][t]` needs to run on several threads in safe Rust.
pub fn plane_parts(
    threads: usize,
    c: usize,
    t: usize,
    planes: usize,
    v: &mut [f32],
) -> Vec<(Range<usize>, Vec<&mut [f32]>)> {
    let parts = threads.clamp(1, c.max(1));
    let per = c.div_ceil(parts).max(1);
    let ranges: Vec<Range<usize>> = (0..c).step_by(per).map(|s| s..(s + per).min(c)).collect();
    let mut out: Vec<(Range<usize>, Vec<&mut [f32]>)> = ranges
        .iter()
        .map(|r| (r.clone(), Vec::with_capacity(planes)))
        .collect();
    if c * t == 0 {
        return out;
    }
    for plane in v[..planes * c * t].chunks_exact_mut(c * t) {
        let mut rest = plane;
        for (r, ps) in out.iter_mut() {
            let (head, tail) = rest.split_at_mut(r.len() * t);
            ps.push(head);
            rest = tail;
        }
    }
    out
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
