//! IOVA allocator: first-fit over a free list of disjoint ranges, merged on free.
//!
//! A device sees host memory at I/O virtual addresses that we choose. Devices often decode fewer
//! address bits than the CPU (QEMU's `edu` masks DMA addresses to 28 bits), so the window is a
//! parameter; allocations are aligned to at least the page size.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Hands out non-overlapping IOVA ranges inside `[base, end)`.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    base: u64,
    end: u64,
    min_align: u64,
    /// start -> length of each free range; ranges are disjoint and never adjacent.
    free: BTreeMap<u64, u64>,
    /// start -> length of each allocated range (to validate `free`).
    used: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// A window `[base, end)`; every allocation is aligned to `min_align` (a power of two, at
    /// least 1). `base` and `end` must be multiples of it.
    pub fn new(base: u64, end: u64, min_align: u64) -> Result<Self> {
        if !min_align.is_power_of_two() {
            return Err(Error::arg(format!(
                "IOVA alignment {min_align:#x} is not a power of two"
            )));
        }
        if base >= end || !base.is_multiple_of(min_align) || !end.is_multiple_of(min_align) {
            return Err(Error::arg(format!(
                "IOVA window [{base:#x}, {end:#x}) is empty or not {min_align:#x}-aligned"
            )));
        }
        let mut free = BTreeMap::new();
        free.insert(base, end - base);
        Ok(IovaAllocator {
            base,
            end,
            min_align,
            free,
            used: BTreeMap::new(),
        })
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// Allocate `size` bytes (rounded up to the minimum alignment) aligned to `align` (rounded
    /// up to the minimum alignment too).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64> {
        if size == 0 {
            return Err(Error::arg("IOVA allocation of 0 bytes"));
        }
        if align > 1 && !align.is_power_of_two() {
            return Err(Error::arg(format!(
                "IOVA alignment {align:#x} is not a power of two"
            )));
        }
        let align = align.max(self.min_align);
        let exhausted = || Error::IovaExhausted {
            size,
            base: self.base,
            end: self.end,
            free: self.free_bytes(),
        };
        let size = round_up(size, self.min_align).ok_or_else(exhausted)?;
        let mut found = None;
        for (&start, &len) in &self.free {
            let Some(a) = round_up(start, align) else {
                continue;
            };
            let pad = a - start;
            if pad.checked_add(size).is_some_and(|need| need <= len) {
                found = Some((start, len, a));
                break;
            }
        }
        let (start, len, a) = found.ok_or_else(exhausted)?;
        self.free.remove(&start);
        if a > start {
            self.free.insert(start, a - start);
        }
        let tail = start + len - (a + size);
        if tail > 0 {
            self.free.insert(a + size, tail);
        }
        self.used.insert(a, size);
        Ok(a)
    }

    /// Return a range handed out by `alloc` (the `iova` it returned).
    pub fn free(&mut self, iova: u64) -> Result<()> {
        let size = self
            .used
            .remove(&iova)
            .ok_or_else(|| Error::arg(format!("IOVA {iova:#x} is not allocated")))?;
        let mut start = iova;
        let mut len = size;
        // merge with the previous free range if adjacent
        if let Some((&ps, &pl)) = self.free.range(..iova).next_back() {
            if ps + pl == iova {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        // and with the next one
        if let Some(&nl) = self.free.get(&(iova + size)) {
            self.free.remove(&(iova + size));
            len += nl;
        }
        self.free.insert(start, len);
        Ok(())
    }
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn alignment_and_no_overlap() {
        let mut a = IovaAllocator::new(0x10_0000, 0x1000_0000, PAGE).unwrap();
        let x = a.alloc(100, 1).unwrap();
        assert_eq!(x, 0x10_0000);
        let y = a.alloc(PAGE, 0x10_0000).unwrap();
        assert_eq!(y % 0x10_0000, 0);
        assert!(y >= x + PAGE, "second range overlaps the first");
        let z = a.alloc(1, 1).unwrap();
        // first fit: the gap between x and y is used
        assert_eq!(z, x + PAGE);
        assert!(
            a.alloc(10, 3).is_err(),
            "non power-of-two alignment must fail"
        );
        assert!(a.alloc(0, 1).is_err());
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let mut a = IovaAllocator::new(0, 4 * PAGE, PAGE).unwrap();
        a.alloc(3 * PAGE, 1).unwrap();
        let e = a.alloc(2 * PAGE, 1).unwrap_err();
        assert!(matches!(e, Error::IovaExhausted { free, .. } if free == PAGE));
        let msg = e.to_string();
        assert!(msg.contains("IOVA space exhausted"), "{msg}");
        assert!(msg.contains("0x1000 bytes free"), "{msg}");
        // the last page still fits
        assert_eq!(a.alloc(PAGE, 1).unwrap(), 3 * PAGE);
        assert!(a.alloc(1, 1).is_err());
    }

    #[test]
    fn free_merges_and_allows_reuse() {
        let mut a = IovaAllocator::new(0, 8 * PAGE, PAGE).unwrap();
        let r: Vec<u64> = (0..8).map(|_| a.alloc(PAGE, 1).unwrap()).collect();
        assert!(a.alloc(PAGE, 1).is_err());
        a.free(r[2]).unwrap();
        a.free(r[4]).unwrap();
        // two single pages free, not adjacent: a two-page request fails
        assert!(a.alloc(2 * PAGE, 1).is_err());
        a.free(r[3]).unwrap();
        // now 2..5 merged into one range of three pages
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.alloc(3 * PAGE, 1).unwrap(), r[2]);
        assert!(
            a.free(r[2] + 1).is_err(),
            "freeing an unknown IOVA must fail"
        );
        a.free(r[0]).unwrap();
        assert!(a.free(r[0]).is_err(), "double free must fail");
        for &x in &[r[1], r[2], r[5], r[6], r[7]] {
            a.free(x).unwrap();
        }
        assert_eq!(a.free_bytes(), 8 * PAGE);
        assert_eq!(a.free.len(), 1);
    }

    #[test]
    fn bad_windows_rejected() {
        assert!(IovaAllocator::new(10, 5, PAGE).is_err());
        assert!(IovaAllocator::new(1, 2 * PAGE, PAGE).is_err());
        assert!(IovaAllocator::new(0, PAGE, 3).is_err());
        let mut a = IovaAllocator::new(0, !(PAGE - 1), PAGE).unwrap();
        assert!(
            a.alloc(u64::MAX, 1).is_err(),
            "overflowing size must fail, not wrap"
        );
    }
}
