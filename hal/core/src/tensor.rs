//! Tensors: dtype + shape + shared byte storage, and strided views over them.

use std::borrow::Cow;

use bytes::Bytes;

use crate::dtype::{DType, Elem};
use crate::{Error, Result, MAX_TENSOR_BYTES};

/// Quantization parameters: `real = scale * (q - zero_point)`. One entry means per-tensor;
/// several mean per-axis along `axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quant {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
    pub axis: Option<usize>,
}

impl Quant {
    /// Per-tensor parameters.
    pub fn per_tensor(scale: f32, zero_point: i32) -> Self {
        Quant {
            scale: vec![scale],
            zero_point: vec![zero_point],
            axis: None,
        }
    }
    /// True when one scale covers the whole tensor.
    pub fn is_per_tensor(&self) -> bool {
        self.scale.len() == 1
    }
}

/// Keeps a `Vec<T>` alive inside [`Bytes`] while exposing it as bytes (alignment of `T` kept).
struct PodVec<T: bytemuck::Pod>(Vec<T>);
impl<T: bytemuck::Pod> AsRef<[u8]> for PodVec<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Number of elements of a shape, checked against overflow and [`MAX_TENSOR_BYTES`].
pub fn checked_numel(shape: &[usize], dtype: DType) -> Result<usize> {
    let mut n: u64 = 1;
    for &d in shape {
        n = n
            .checked_mul(d as u64)
            .ok_or_else(|| Error::TooLarge(format!("shape {shape:?} overflows")))?;
    }
    let bytes = n.saturating_mul(dtype.size() as u64);
    if bytes > MAX_TENSOR_BYTES {
        return Err(Error::TooLarge(format!(
            "tensor of shape {shape:?} ({dtype}) needs {bytes} bytes, over the {} byte budget",
            MAX_TENSOR_BYTES
        )));
    }
    Ok(n as usize)
}

/// A dense, row-major tensor. Storage is shared ([`Bytes`]): clones and reshapes are free, and a
/// tensor may point into a memory-mapped model file.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
    /// Quantization parameters when the tensor holds quantized integers (TFLite carries them on
    /// tensors; ONNX passes them as separate inputs).
    pub quant: Option<Quant>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// Build from bytes already in memory (e.g. a slice of a mapped file). Fails when the byte
    /// count does not match the shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Bytes) -> Result<Self> {
        let n = checked_numel(&shape, dtype)?;
        if data.len() != n * dtype.size() {
            return Err(Error::parse(format!(
                "tensor {dtype} {shape:?} needs {} bytes, got {}",
                n * dtype.size(),
                data.len()
            )));
        }
        Ok(Tensor {
            dtype,
            shape,
            data,
            quant: None,
        })
    }

    /// Build from a typed vector. Panics never; fails when `v.len()` does not match the shape.
    pub fn from_vec<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Result<Self> {
        Self::from_vec_dtype(T::DTYPE, shape, v)
    }

    /// Like [`Tensor::from_vec`] but with an explicit dtype of the same element size (used for
    /// bool stored as `u8`).
    pub fn from_vec_dtype<T: Elem>(dtype: DType, shape: Vec<usize>, v: Vec<T>) -> Result<Self> {
        if dtype.size() != std::mem::size_of::<T>() {
            return Err(Error::arg(format!(
                "dtype {dtype} does not match element type {}",
                T::DTYPE
            )));
        }
        let n = checked_numel(&shape, dtype)?;
        if v.len() != n {
            return Err(Error::arg(format!(
                "shape {shape:?} needs {n} elements, got {}",
                v.len()
            )));
        }
        Ok(Tensor {
            dtype,
            shape,
            data: Bytes::from_owner(PodVec(v)),
            quant: None,
        })
    }

    /// A bool tensor.
    pub fn from_bools(shape: Vec<usize>, v: Vec<bool>) -> Result<Self> {
        Self::from_vec_dtype(
            DType::Bool,
            shape,
            v.into_iter().map(u8::from).collect::<Vec<u8>>(),
        )
    }

    /// A 0-d tensor holding `v`.
    pub fn scalar<T: Elem>(v: T) -> Self {
        Tensor {
            dtype: T::DTYPE,
            shape: vec![],
            data: Bytes::from_owner(PodVec(vec![v])),
            quant: None,
        }
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Self> {
        let n = checked_numel(&shape, dtype)?;
        Ok(Tensor {
            dtype,
            shape,
            data: Bytes::from(vec![0u8; n * dtype.size()]),
            quant: None,
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape (empty for scalars).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
    /// Same data, new shape (no copy). Fails when the element counts differ.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Self> {
        let n = checked_numel(&shape, self.dtype)?;
        if n != self.len() {
            return Err(Error::arg(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
            quant: self.quant.clone(),
        })
    }
    /// Rows `start..end` of the outermost axis, without copying.
    pub fn slice_outer(&self, start: usize, end: usize) -> Result<Self> {
        let outer = *self
            .shape
            .first()
            .ok_or_else(|| Error::arg("cannot slice a scalar"))?;
        if start > end || end > outer {
            return Err(Error::arg(format!(
                "slice {start}..{end} out of range for axis of {outer}"
            )));
        }
        let row = self.len() / outer.max(1) * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.slice(start * row..end * row),
            quant: self.quant.clone(),
        })
    }

    /// Typed read access. Borrowed when the storage is aligned for `T`, copied otherwise
    /// (e.g. raw data at an odd offset inside a protobuf file). Fails on a dtype mismatch.
    pub fn as_slice<T: Elem>(&self) -> Result<Cow<'_, [T]>> {
        let ok = T::DTYPE == self.dtype || (self.dtype == DType::Bool && T::DTYPE == DType::U8);
        if !ok {
            return Err(Error::arg(format!(
                "expected a {} tensor, got {}",
                T::DTYPE,
                self.dtype
            )));
        }
        match bytemuck::try_cast_slice::<u8, T>(&self.data) {
            Ok(s) => Ok(Cow::Borrowed(s)),
            Err(_) => Ok(Cow::Owned(bytemuck::pod_collect_to_vec::<u8, T>(
                &self.data,
            ))),
        }
    }

    /// Copy out as a typed vector.
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.into_owned())
    }

    /// Bool tensor contents.
    pub fn to_bools(&self) -> Result<Vec<bool>> {
        if self.dtype != DType::Bool {
            return Err(Error::arg(format!(
                "expected a bool tensor, got {}",
                self.dtype
            )));
        }
        Ok(self.data.iter().map(|&b| b != 0).collect())
    }

    /// Every element converted to f64 (any dtype).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        crate::with_dtype!(self.dtype, T => {
            match self.as_slice::<T>() {
                Ok(s) => s.iter().map(|v| v.to_f64()).collect(),
                Err(_) => Vec::new(),
            }
        })
    }

    /// Every element converted to f32 (any dtype); borrowed for aligned f32 tensors.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        if self.dtype == DType::F32 {
            if let Ok(s) = self.as_slice::<f32>() {
                return s;
            }
        }
        Cow::Owned(self.to_f64_vec().into_iter().map(|v| v as f32).collect())
    }

    /// Every element converted to i64 (floats truncated); for shape-like inputs.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        crate::with_dtype!(self.dtype, T => {
            match self.as_slice::<T>() {
                Ok(s) => s.iter().map(|v| v.to_i64()).collect(),
                Err(_) => Vec::new(),
            }
        })
    }

    /// Convert to another dtype with C-cast semantics (float->int truncates; to bool is `!= 0`).
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        if to == self.dtype {
            return Ok(self.clone());
        }
        let shape = self.shape.clone();
        if to == DType::Bool {
            let v: Vec<bool> = self.to_f64_vec().into_iter().map(|x| x != 0.0).collect();
            return Tensor::from_bools(shape, v);
        }
        // Integer to integer goes through i64 so 64-bit values stay exact.
        if self.dtype.is_int() || self.dtype == DType::Bool {
            let src = self.to_i64_vec();
            if to.is_int() {
                return crate::with_dtype!(to, T => Tensor::from_vec_dtype(to, shape, src.into_iter().map(T::from_i64).collect::<Vec<T>>()));
            }
        }
        let src = self.to_f64_vec();
        crate::with_dtype!(to, T => Tensor::from_vec_dtype(to, shape, src.into_iter().map(T::from_f64).collect::<Vec<T>>()))
    }

    /// A strided view of the whole tensor (contiguous strides).
    pub fn view<T: Elem>(&self) -> Result<View<'_, T>> {
        let data = self.as_slice::<T>()?;
        Ok(View::contiguous(data, self.shape.clone()))
    }
}

/// Row-major strides (in elements) for a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i] as isize;
    }
    s
}

/// A strided view over tensor elements: transposes, broadcasts (stride 0), slices and flips
/// are index arithmetic, never copies.
#[derive(Clone, Debug)]
pub struct View<'a, T: Elem> {
    data: Cow<'a, [T]>,
    shape: Vec<usize>,
    strides: Vec<isize>,
    offset: isize,
}

impl<'a, T: Elem> View<'a, T> {
    /// A contiguous view.
    pub fn contiguous(data: Cow<'a, [T]>, shape: Vec<usize>) -> Self {
        let strides = contiguous_strides(&shape);
        View {
            data,
            shape,
            strides,
            offset: 0,
        }
    }
    /// Shape of the view.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }
    /// Permute axes.
    pub fn permute(mut self, perm: &[usize]) -> Result<Self> {
        let r = self.shape.len();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::arg(format!("bad permutation {perm:?} for rank {r}")));
        }
        self.shape = perm.iter().map(|&p| self.shape[p]).collect();
        self.strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(self)
    }
    /// Numpy-style broadcast to `shape` (stride 0 on stretched axes).
    pub fn broadcast_to(mut self, shape: &[usize]) -> Result<Self> {
        if shape.len() < self.shape.len() {
            return Err(Error::arg(format!(
                "cannot broadcast {:?} to {shape:?}",
                self.shape
            )));
        }
        let pad = shape.len() - self.shape.len();
        let mut strides = vec![0isize; shape.len()];
        for (i, &d) in shape.iter().enumerate() {
            if i < pad {
                continue;
            }
            let (sd, ss) = (self.shape[i - pad], self.strides[i - pad]);
            if sd == d {
                strides[i] = ss;
            } else if sd == 1 {
                strides[i] = 0;
            } else {
                return Err(Error::arg(format!(
                    "cannot broadcast {:?} to {shape:?}",
                    self.shape
                )));
            }
        }
        self.shape = shape.to_vec();
        self.strides = strides;
        Ok(self)
    }
    /// Keep `start..start+len*step` (step may be negative) of one axis.
    pub fn slice_axis(
        mut self,
        axis: usize,
        start: usize,
        len: usize,
        step: isize,
    ) -> Result<Self> {
        if axis >= self.shape.len() {
            return Err(Error::arg(format!("axis {axis} out of range")));
        }
        if len > 0 {
            let last = start as isize + (len as isize - 1) * step;
            if start >= self.shape[axis] || last < 0 || last as usize >= self.shape[axis] {
                return Err(Error::arg("slice out of range"));
            }
        }
        self.offset += start as isize * self.strides[axis];
        self.strides[axis] *= step;
        self.shape[axis] = len;
        Ok(self)
    }
    /// Iterate elements in row-major order of the view.
    pub fn iter(&self) -> ViewIter<'_, 'a, T> {
        let n = self.shape.iter().product();
        ViewIter {
            view: self,
            idx: vec![0; self.shape.len()],
            pos: self.offset,
            remaining: n,
        }
    }
    /// Materialise into a contiguous vector.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().collect()
    }
    /// Element at a multi-index.
    pub fn at(&self, idx: &[usize]) -> T {
        let mut p = self.offset;
        for (i, &x) in idx.iter().enumerate() {
            p += x as isize * self.strides[i];
        }
        self.data[p as usize]
    }
}

/// Row-major iterator over a [`View`].
pub struct ViewIter<'v, 'a, T: Elem> {
    view: &'v View<'a, T>,
    idx: Vec<usize>,
    pos: isize,
    remaining: usize,
}

impl<T: Elem> Iterator for ViewIter<'_, '_, T> {
    type Item = T;
    #[inline]
    fn next(&mut self) -> Option<T> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let v = self.view.data[self.pos as usize];
        // advance the multi-index
        let shape = &self.view.shape;
        let strides = &self.view.strides;
        for ax in (0..shape.len()).rev() {
            self.idx[ax] += 1;
            self.pos += strides[ax];
            if self.idx[ax] < shape[ax] {
                break;
            }
            self.pos -= strides[ax] * shape[ax] as isize;
            self.idx[ax] = 0;
        }
        Some(v)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// Numpy broadcast of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::arg(format!(
                "shapes {a:?} and {b:?} do not broadcast"
            )));
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_and_slice_share_storage() {
        let t = Tensor::from_vec(vec![2, 3], vec![1f32, 2., 3., 4., 5., 6.]).unwrap();
        let r = t.reshape(vec![3, 2]).unwrap();
        assert_eq!(r.bytes().as_ptr(), t.bytes().as_ptr());
        let s = t.slice_outer(1, 2).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![4., 5., 6.]);
        assert!(t.reshape(vec![4]).is_err());
    }

    #[test]
    fn views_transpose_and_broadcast() {
        let t = Tensor::from_vec(vec![2, 3], vec![1i32, 2, 3, 4, 5, 6]).unwrap();
        let v = t.view::<i32>().unwrap().permute(&[1, 0]).unwrap();
        assert_eq!(v.to_vec(), vec![1, 4, 2, 5, 3, 6]);
        let b = Tensor::from_vec(vec![3], vec![1i32, 2, 3]).unwrap();
        let bv = b.view::<i32>().unwrap().broadcast_to(&[2, 3]).unwrap();
        assert_eq!(bv.to_vec(), vec![1, 2, 3, 1, 2, 3]);
        let rv = t.view::<i32>().unwrap().slice_axis(1, 2, 3, -1).unwrap();
        assert_eq!(rv.to_vec(), vec![3, 2, 1, 6, 5, 4]);
        assert_eq!(
            broadcast_shapes(&[2, 1, 3], &[4, 1]).unwrap(),
            vec![2, 4, 3]
        );
        assert!(broadcast_shapes(&[2], &[3]).is_err());
    }

    #[test]
    fn unaligned_bytes_are_copied_not_misread() {
        let raw = Bytes::from(vec![0u8, 0, 0, 128, 63, 0, 0, 0, 64]);
        let t = Tensor::from_bytes(DType::F32, vec![2], raw.slice(1..9)).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn huge_declared_sizes_are_refused() {
        assert!(matches!(
            Tensor::zeros(DType::F32, vec![1 << 20, 1 << 20]),
            Err(Error::TooLarge(_))
        ));
        assert!(checked_numel(&[usize::MAX, 2], DType::U8).is_err());
    }

    #[test]
    fn cast_semantics() {
        let t = Tensor::from_vec(vec![3], vec![-1.7f32, 0.0, 2.9]).unwrap();
        assert_eq!(
            t.cast(DType::I32).unwrap().to_vec::<i32>().unwrap(),
            vec![-1, 0, 2]
        );
        assert_eq!(
            t.cast(DType::Bool).unwrap().to_bools().unwrap(),
            vec![true, false, true]
        );
        let big = Tensor::from_vec(vec![1], vec![i64::MAX]).unwrap();
        assert_eq!(
            big.cast(DType::I64).unwrap().to_vec::<i64>().unwrap(),
            vec![i64::MAX]
        );
    }
}
