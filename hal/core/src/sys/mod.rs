//! The one place for raw system calls and memory mapping. Trust model: the kernel is trusted to
//! honour its documented contracts; files and callers are not, so every length and offset that
//! comes from them is checked before it is used.

pub mod cpu;
pub mod dl;
pub mod mem;

use bytes::Bytes;

use crate::{Error, Result};

/// Map a file read-only and return its contents as [`Bytes`] that keep the mapping alive.
/// Slicing the result (e.g. initializer data) never copies.
pub fn map_file(path: &std::path::Path) -> Result<Bytes> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path.display().to_string(), e))?
        .len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only and private to this process. The file could still be
    // truncated or rewritten by another process while mapped, which would make reads fault or
    // see new bytes; model files are treated as immutable while loaded (the same contract
    // onnxruntime and LiteRT use for their mapped models), and every parser re-checks lengths.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    Ok(Bytes::from_owner(map))
}
