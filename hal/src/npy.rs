//! NumPy `.npy` files (format versions 1.0, 2.0 and 3.0), little-endian, C order.

use edgehal_core::tensor::checked_numel;
use edgehal_core::{DType, Error, Result, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";

fn descr(d: DType) -> &'static str {
    match d {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::F64 => "<f8",
        DType::BF16 => "<V2", // numpy has no bfloat16; stored as raw 2-byte void
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
    }
}

fn parse_descr(s: &str) -> Result<DType> {
    let d = match s {
        "<f4" | "f4" => DType::F32,
        "<f2" | "f2" => DType::F16,
        "<f8" | "f8" => DType::F64,
        "|i1" | "i1" | "<i1" => DType::I8,
        "|u1" | "u1" | "<u1" => DType::U8,
        "<i2" => DType::I16,
        "<u2" => DType::U16,
        "<i4" => DType::I32,
        "<u4" => DType::U32,
        "<i8" => DType::I64,
        "<u8" => DType::U64,
        "|b1" | "b1" => DType::Bool,
        other => {
            return Err(Error::unsupported(format!(
                "npy dtype '{other}' (big-endian, strings and objects are not supported)"
            )))
        }
    };
    Ok(d)
}

/// Serialize a tensor as `.npy` bytes (version 1.0 header).
pub fn to_npy(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape().len() {
        0 => "()".to_string(),
        1 => format!("({},)", t.shape()[0]),
        _ => format!(
            "({})",
            t.shape()
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        descr(t.dtype()),
        shape
    );
    // Pad so that magic(6)+version(2)+len(2)+header+'\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.bytes().len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(t.bytes());
    out
}

/// Parse `.npy` bytes.
pub fn from_npy(bytes: bytes::Bytes) -> Result<Tensor> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(Error::parse("not a .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(Error::parse(".npy header truncated"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(Error::unsupported(format!(".npy format version {v}"))),
    };
    let hend = hstart
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| Error::parse(".npy header truncated"))?;
    let header = std::str::from_utf8(&bytes[hstart..hend])
        .map_err(|_| Error::parse(".npy header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let k = format!("'{key}':");
        let at = header
            .find(&k)
            .ok_or_else(|| Error::parse(format!(".npy header has no '{key}'")))?;
        Ok(header[at + k.len()..].trim_start())
    };
    let d = field("descr")?;
    let d = d
        .strip_prefix('\'')
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| Error::parse(".npy descr"))?;
    let dtype = parse_descr(d)?;
    if field("fortran_order")?.starts_with("True") {
        return Err(Error::unsupported(".npy in Fortran order"));
    }
    let s = field("shape")?;
    let s = s
        .strip_prefix('(')
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| Error::parse(".npy shape"))?;
    let shape = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| Error::parse(format!(".npy shape entry '{p}'")))
        })
        .collect::<Result<Vec<_>>>()?;
    let n = checked_numel(&shape, dtype)?;
    let data = bytes.slice(hend..);
    if data.len() != n * dtype.size() {
        return Err(Error::parse(format!(
            ".npy data has {} bytes, shape {shape:?} of {dtype} needs {}",
            data.len(),
            n * dtype.size()
        )));
    }
    Tensor::from_bytes(dtype, shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = Tensor::from_vec(vec![2, 3], vec![1f32, 2., 3., 4., 5., 6.]).unwrap();
        let b = to_npy(&t);
        assert_eq!((b.len() - t.bytes().len()) % 64, 0);
        let back = from_npy(b.clone().into()).unwrap();
        assert_eq!(back.shape(), &[2, 3]);
        assert_eq!(back.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
        let s = from_npy(to_npy(&Tensor::scalar(7i64)).into()).unwrap();
        assert_eq!(s.shape(), &[] as &[usize]);
        assert!(from_npy(b[..b.len() - 1].to_vec().into()).is_err());
        assert!(from_npy(b"hello".to_vec().into()).is_err());
    }
}
