//! A small, bounds-checked flatbuffer reader: tables, vectors, strings and scalars.
//!
//! Every offset read from the file is checked against the buffer before use, so a truncated or
//! hostile file yields `Err(Error::Parse)`, never a panic or an allocation sized by the file.

use edgehal_core::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Parse(msg.into())
}

/// Read `N` bytes at `pos`.
fn arr<const N: usize>(buf: &[u8], pos: usize) -> Result<[u8; N]> {
    let end = pos
        .checked_add(N)
        .ok_or_else(|| err(format!("offset {pos} overflows")))?;
    let s = buf.get(pos..end).ok_or_else(|| {
        err(format!(
            "offset {pos} (+{N}) is outside the {}-byte file",
            buf.len()
        ))
    })?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}

pub fn read_u16(buf: &[u8], pos: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(arr(buf, pos)?))
}
pub fn read_u32(buf: &[u8], pos: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(arr(buf, pos)?))
}
pub fn read_i32(buf: &[u8], pos: usize) -> Result<i32> {
    Ok(i32::from_le_bytes(arr(buf, pos)?))
}

/// Follow a `uoffset_t` stored at `pos` (relative to `pos`).
fn follow(buf: &[u8], pos: usize) -> Result<usize> {
    let off = read_u32(buf, pos)? as usize;
    let target = pos
        .checked_add(off)
        .ok_or_else(|| err(format!("offset at {pos} overflows")))?;
    if target >= buf.len() {
        return Err(err(format!(
            "offset at {pos} points to {target}, outside the {}-byte file",
            buf.len()
        )));
    }
    Ok(target)
}

/// A flatbuffer table.
#[derive(Clone, Copy)]
pub struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vt: usize,
    vt_len: usize,
}

impl<'a> Table<'a> {
    /// The root table of a buffer.
    pub fn root(buf: &'a [u8]) -> Result<Self> {
        if buf.len() < 8 {
            return Err(err(format!(
                "file of {} bytes is too short for a flatbuffer",
                buf.len()
            )));
        }
        let pos = follow(buf, 0)?;
        Table::at(buf, pos)
    }

    /// The table starting at `pos`.
    pub fn at(buf: &'a [u8], pos: usize) -> Result<Self> {
        let soff = read_i32(buf, pos)? as i64;
        let vt = pos as i64 - soff;
        if vt < 0 || vt as u64 >= buf.len() as u64 {
            return Err(err(format!(
                "table at {pos} has its vtable at {vt}, outside the file"
            )));
        }
        let vt = vt as usize;
        let vt_len = read_u16(buf, vt)? as usize;
        if vt_len < 4 || vt_len & 1 != 0 || vt.saturating_add(vt_len) > buf.len() {
            return Err(err(format!(
                "table at {pos} has a bad vtable of {vt_len} bytes"
            )));
        }
        Ok(Table {
            buf,
            pos,
            vt,
            vt_len,
        })
    }

    /// Absolute position of field `id`, when present.
    fn field(&self, id: usize) -> Result<Option<usize>> {
        let slot = 4 + 2 * id;
        if slot + 2 > self.vt_len {
            return Ok(None);
        }
        let voff = read_u16(self.buf, self.vt + slot)? as usize;
        if voff == 0 {
            return Ok(None);
        }
        Ok(Some(self.pos + voff))
    }

    fn scalar<const N: usize>(&self, id: usize) -> Result<Option<[u8; N]>> {
        match self.field(id)? {
            Some(p) => Ok(Some(arr::<N>(self.buf, p)?)),
            None => Ok(None),
        }
    }
    pub fn i8(&self, id: usize, default: i8) -> Result<i8> {
        Ok(self.scalar::<1>(id)?.map(|b| b[0] as i8).unwrap_or(default))
    }
    pub fn i32(&self, id: usize, default: i32) -> Result<i32> {
        Ok(self
            .scalar::<4>(id)?
            .map(i32::from_le_bytes)
            .unwrap_or(default))
    }
    pub fn u32(&self, id: usize, default: u32) -> Result<u32> {
        Ok(self
            .scalar::<4>(id)?
            .map(u32::from_le_bytes)
            .unwrap_or(default))
    }
    pub fn u64(&self, id: usize, default: u64) -> Result<u64> {
        Ok(self
            .scalar::<8>(id)?
            .map(u64::from_le_bytes)
            .unwrap_or(default))
    }
    pub fn f32(&self, id: usize, default: f32) -> Result<f32> {
        Ok(self
            .scalar::<4>(id)?
            .map(f32::from_le_bytes)
            .unwrap_or(default))
    }

    /// A sub-table field.
    pub fn table(&self, id: usize) -> Result<Option<Table<'a>>> {
        match self.field(id)? {
            Some(p) => Ok(Some(Table::at(self.buf, follow(self.buf, p)?)?)),
            None => Ok(None),
        }
    }

    /// A vector field whose elements are `elem` bytes wide (4 for offsets to tables).
    pub fn vector(&self, id: usize, elem: usize) -> Result<Option<Vector<'a>>> {
        let Some(p) = self.field(id)? else {
            return Ok(None);
        };
        let v = follow(self.buf, p)?;
        let len = read_u32(self.buf, v)? as usize;
        let start = v + 4;
        let bytes = (len as u64) * elem as u64;
        if start as u64 + bytes > self.buf.len() as u64 {
            return Err(err(format!(
                "vector at {v} claims {len} elements of {elem} bytes, past the end of the {}-byte file",
                self.buf.len()
            )));
        }
        Ok(Some(Vector {
            buf: self.buf,
            start,
            len,
            elem,
        }))
    }

    /// A string field (lossy UTF-8).
    pub fn string(&self, id: usize) -> Result<Option<String>> {
        Ok(self
            .vector(id, 1)?
            .map(|v| String::from_utf8_lossy(v.bytes()).into_owned()))
    }

    /// Byte range of a `[ubyte]` vector field within the buffer.
    pub fn byte_range(&self, id: usize) -> Result<Option<std::ops::Range<usize>>> {
        Ok(self.vector(id, 1)?.map(|v| v.start..v.start + v.len))
    }

    /// Vector of tables.
    pub fn tables(&self, id: usize) -> Result<Vec<Table<'a>>> {
        match self.vector(id, 4)? {
            Some(v) => (0..v.len).map(|i| v.table(i)).collect(),
            None => Ok(Vec::new()),
        }
    }
    /// Vector of i32.
    pub fn i32s(&self, id: usize) -> Result<Option<Vec<i32>>> {
        Ok(self.vector(id, 4)?.map(|v| {
            v.bytes()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }))
    }
    /// Vector of f32.
    pub fn f32s(&self, id: usize) -> Result<Option<Vec<f32>>> {
        Ok(self.vector(id, 4)?.map(|v| {
            v.bytes()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }))
    }
    /// Vector of i64.
    pub fn i64s(&self, id: usize) -> Result<Option<Vec<i64>>> {
        Ok(self.vector(id, 8)?.map(|v| {
            v.bytes()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        }))
    }
}

/// A vector inside the buffer (bounds already checked against the buffer).
#[derive(Clone, Copy)]
pub struct Vector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
    elem: usize,
}

impl<'a> Vector<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
            .get(self.start..self.start + self.len * self.elem)
            .unwrap_or(&[])
    }
    /// Element `i` as a table (for vectors of offsets).
    pub fn table(&self, i: usize) -> Result<Table<'a>> {
        if i >= self.len || self.elem != 4 {
            return Err(err(format!("vector index {i} out of range")));
        }
        Table::at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// root -> table with vtable [6, 8, 4] and one i32 field = 7.
    fn tiny() -> Vec<u8> {
        let mut b = vec![];
        b.extend_from_slice(&12u32.to_le_bytes()); // root offset -> 12
        b.extend_from_slice(&[0, 0]); // pad
        b.extend_from_slice(&6u16.to_le_bytes()); // vtable at 6: len 6
        b.extend_from_slice(&8u16.to_le_bytes()); // object size
        b.extend_from_slice(&4u16.to_le_bytes()); // field 0 at +4
        b.extend_from_slice(&6i32.to_le_bytes()); // table at 12: soffset -> vtable at 6
        b.extend_from_slice(&7i32.to_le_bytes());
        b
    }

    #[test]
    fn reads_fields_and_defaults() {
        let b = tiny();
        let t = Table::root(&b).unwrap();
        assert_eq!(t.i32(0, 0).unwrap(), 7);
        assert_eq!(t.i32(1, 42).unwrap(), 42);
        assert!(t.vector(1, 4).unwrap().is_none());
    }

    #[test]
    fn out_of_range_is_an_error() {
        let mut b = tiny();
        b[0] = 200; // root offset beyond the end
        assert!(Table::root(&b).is_err());
        let mut b = tiny();
        b[12] = 100; // soffset to a vtable before the start
        assert!(Table::root(&b).is_err());
        let b = tiny();
        assert!(Table::root(&b[..14]).is_err());
        // A field read as a vector pointing past the end.
        let t = Table::root(&b).unwrap();
        assert!(t.vector(0, 4).is_err());
    }
}
