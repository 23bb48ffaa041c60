//! Ops: shape manipulation and data movement (`Reshape`, `Transpose`, `Concat`, `Slice`,
//! `Pad`, ...), constants, and index-driven ops (in [`gather`]) and `Einsum` (in [`einsum`]).
//!
//! Data movement never looks at element values: tensors are reinterpreted as the unsigned
//! integer of the same width (no copy) and moved with [`strided_copy`], whose inner loop is a
//! slice copy whenever the innermost axis is contiguous. Reshape-like ops (`Reshape`,
//! `Flatten`, `Squeeze`, `Unsqueeze`) share storage with their input.

mod einsum;
mod gather;

use edgehal_core::dtype::Elem;
use edgehal_core::tensor::{broadcast_shapes, checked_numel, contiguous_strides};
use edgehal_core::{bail, ensure, with_dtype, DType, Error, Result, Tensor};

use super::{i64_tensor, input, norm_axis, opt_input, OpCtx, Registry};

/// Run `$body` with `$T` bound to the unsigned integer type as wide as `$t`'s elements.
macro_rules! by_width {
    ($t:expr, $T:ident => $body:expr) => {
        match $t.dtype().size() {
            1 => {
                type $T = u8;
                $body
            }
            2 => {
                type $T = u16;
                $body
            }
            4 => {
                type $T = u32;
                $body
            }
            _ => {
                type $T = u64;
                $body
            }
        }
    };
}
pub(crate) use by_width;

/// The same bytes seen as unsigned integers of the element width (no copy).
pub(crate) fn as_bits(t: &Tensor) -> Result<Tensor> {
    let d = match t.dtype().size() {
        1 => DType::U8,
        2 => DType::U16,
        4 => DType::U32,
        _ => DType::U64,
    };
    Tensor::from_bytes(d, t.shape().to_vec(), t.bytes().clone())
}

/// Copy the elements of a strided layout (`shape`, `strides` in elements, `offset`) out in
/// row-major order. Axes are merged where the layout allows so the inner loop stays long.
pub(crate) fn strided_copy<T: Copy>(
    src: &[T],
    shape: &[usize],
    strides: &[isize],
    offset: isize,
) -> Result<Vec<T>> {
    let n = checked_numel(shape, DType::U64)?;
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok(out);
    }
    // Merge axes: drop size-1 axes, fuse neighbours whose strides chain.
    let mut dims: Vec<usize> = Vec::new();
    let mut st: Vec<isize> = Vec::new();
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        if let (Some(ld), Some(ls)) = (dims.last_mut(), st.last_mut()) {
            if *ls == s * d as isize {
                *ld *= d;
                *ls = s;
                continue;
            }
        }
        dims.push(d);
        st.push(s);
    }
    if dims.is_empty() {
        dims.push(1);
        st.push(1);
    }
    // Bounds check once: the lowest and highest positions the layout touches.
    let (mut lo, mut hi) = (offset, offset);
    for (&d, &s) in dims.iter().zip(&st) {
        let span = s * (d as isize - 1);
        if span < 0 {
            lo += span;
        } else {
            hi += span;
        }
    }
    if lo < 0 || hi as usize >= src.len() {
        bail!("strided access out of bounds");
    }
    let r = dims.len();
    let inner = dims[r - 1];
    let is = st[r - 1];
    let outer = n / inner;
    let mut idx = vec![0usize; r];
    let mut pos = offset;
    for _ in 0..outer {
        let p = pos as usize;
        if is == 1 {
            out.extend_from_slice(&src[p..p + inner]);
        } else {
            let mut q = pos;
            for _ in 0..inner {
                out.push(src[q as usize]);
                q += is;
            }
        }
        for ax in (0..r - 1).rev() {
            idx[ax] += 1;
            pos += st[ax];
            if idx[ax] < dims[ax] {
                break;
            }
            pos -= st[ax] * dims[ax] as isize;
            idx[ax] = 0;
        }
    }
    Ok(out)
}

/// A new tensor with `t`'s dtype holding `t`'s elements read through a strided layout.
pub(crate) fn restride(
    t: &Tensor,
    shape: Vec<usize>,
    strides: &[isize],
    offset: isize,
) -> Result<Tensor> {
    let bits = as_bits(t)?;
    by_width!(t, T => {
        let src = bits.as_slice::<T>()?;
        let v = strided_copy(&src, &shape, strides, offset)?;
        Tensor::from_vec_dtype(t.dtype(), shape, v)
    })
}

/// Permute axes (a copy).
pub(crate) fn permute(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let r = t.rank();
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        bail!("bad permutation {perm:?} for rank {r}");
    }
    let st = contiguous_strides(t.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape()[p]).collect();
    if let Some((rows, cols)) = as_2d_transpose(t.shape(), perm) {
        let bits = as_bits(t)?;
        return by_width!(t, T => {
            let src = bits.as_slice::<T>()?;
            ensure!(src.len() == rows * cols, "Transpose: data does not match the shape");
            Tensor::from_vec_dtype(t.dtype(), shape, transpose_2d(&src, rows, cols))
        });
    }
    let strides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
    restride(t, shape, &strides, 0)
}

/// `Some((rows, cols))` when permuting `shape` by `perm` moves a `rows x cols` matrix to
/// `cols x rows` (as NHWC to NCHW does with `rows = H*W`, `cols = C` for one image): size-1
/// axes dropped and axes that stay adjacent merged, two groups are left, swapped.
fn as_2d_transpose(shape: &[usize], perm: &[usize]) -> Option<(usize, usize)> {
    // Positions of the non-unit input axes, in output order.
    let kept: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] != 1).collect();
    let order: Vec<usize> = perm
        .iter()
        .filter(|&&a| shape[a] != 1)
        .map(|&a| kept.iter().position(|&k| k == a))
        .collect::<Option<_>>()?;
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for &i in &order {
        match groups.last_mut() {
            Some(g) if g.1 + 1 == i => g.1 = i,
            _ => groups.push((i, i)),
        }
    }
    let size = |g: (usize, usize)| (g.0..=g.1).map(|i| shape[kept[i]]).product::<usize>();
    match groups[..] {
        [second, first] if first.0 == 0 && second.0 == first.1 + 1 => {
            Some((size(first), size(second)))
        }
        _ => None,
    }
}

/// `src` (`rows x cols`, row-major) transposed, in 16x16 tiles so both sides stay in cache.
pub(crate) fn transpose_2d<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const B: usize = 16;
    let mut out = vec![T::default(); rows * cols];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// An attribute-or-input list of integers: input `i` when present, else attribute `name`.
fn ints_in(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], i: usize, name: &str) -> Option<Vec<i64>> {
    match opt_input(ins, i) {
        Some(t) => Some(t.to_i64_vec()),
        None => ctx.ints(name),
    }
}

fn to_dim(v: i64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::arg(format!("{what}: negative dimension {v}")))
}

fn reshape(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let spec = ints_in(ctx, ins, 1, "shape").ok_or_else(|| Error::arg("Reshape: no shape"))?;
    let allowzero = ctx.i("allowzero", 0) != 0;
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            0 if !allowzero => shape.push(
                *t.shape()
                    .get(i)
                    .ok_or_else(|| Error::arg(format!("Reshape: 0 at axis {i} copies no dim")))?,
            ),
            -1 => {
                ensure!(infer.is_none(), "Reshape: more than one -1 in {spec:?}");
                infer = Some(i);
                shape.push(1);
            }
            d => shape.push(to_dim(d, "Reshape")?),
        }
    }
    if let Some(i) = infer {
        let known = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::TooLarge(format!("Reshape: shape {spec:?} overflows")))?;
        ensure!(
            known != 0 && t.len() % known == 0,
            "Reshape: cannot infer -1 of {spec:?} for {:?}",
            t.shape()
        );
        shape[i] = t.len() / known;
    }
    Ok(vec![t.reshape(shape)?])
}

fn flatten(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank() as i64;
    let mut axis = ctx.i("axis", 1);
    if axis < 0 {
        axis += r;
    }
    ensure!((0..=r).contains(&axis), "Flatten: axis out of range");
    let a = axis as usize;
    let outer: usize = t.shape()[..a].iter().product();
    let inner: usize = t.shape()[a..].iter().product();
    Ok(vec![t.reshape(vec![outer, inner])?])
}

fn squeeze(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let shape: Vec<usize> = match ints_in(ctx, ins, 1, "axes") {
        Some(axes) if !axes.is_empty() => {
            let mut drop = vec![false; r];
            for a in axes {
                let a = norm_axis(a, r)?;
                ensure!(
                    t.shape()[a] == 1,
                    "Squeeze: axis {a} has size {}",
                    t.shape()[a]
                );
                drop[a] = true;
            }
            (0..r).filter(|&i| !drop[i]).map(|i| t.shape()[i]).collect()
        }
        _ => t.shape().iter().copied().filter(|&d| d != 1).collect(),
    };
    Ok(vec![t.reshape(shape)?])
}

fn unsqueeze(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let axes = ints_in(ctx, ins, 1, "axes").ok_or_else(|| Error::arg("Unsqueeze: no axes"))?;
    let r = t.rank() + axes.len();
    let mut ins_at = vec![false; r];
    for a in axes {
        let a = norm_axis(a, r)?;
        ensure!(!ins_at[a], "Unsqueeze: axis {a} given twice");
        ins_at[a] = true;
    }
    let mut src = t.shape().iter();
    let shape = ins_at
        .iter()
        .map(|&new| {
            if new {
                1
            } else {
                src.next().copied().unwrap_or(1)
            }
        })
        .collect();
    Ok(vec![t.reshape(shape)?])
}

fn transpose(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let perm: Vec<usize> = match ctx.ints("perm") {
        Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?,
        None => (0..r).rev().collect(),
    };
    Ok(vec![permute(t, &perm)?])
}

fn concat(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let first = *ts.first().ok_or_else(|| Error::arg("Concat: no inputs"))?;
    let r = first.rank();
    let axis = norm_axis(ctx.i("axis", 0), r)?;
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for t in &ts {
        ensure!(
            t.dtype() == first.dtype(),
            "Concat: mixed types {} and {}",
            first.dtype(),
            t.dtype()
        );
        ensure!(
            t.rank() == r && (0..r).all(|i| i == axis || t.shape()[i] == first.shape()[i]),
            "Concat: shape {:?} does not match {:?} off axis {axis}",
            t.shape(),
            first.shape()
        );
        shape[axis] += t.shape()[axis];
    }
    let outer: usize = shape[..axis].iter().product();
    let bits: Vec<Tensor> = ts.iter().map(|t| as_bits(t)).collect::<Result<_>>()?;
    by_width!(first, T => {
        let srcs: Vec<_> = bits.iter().map(|b| b.as_slice::<T>()).collect::<Result<_>>()?;
        let chunks: Vec<usize> = ts.iter().map(|t| t.shape()[axis..].iter().product()).collect();
        let mut out: Vec<T> = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for (s, &c) in srcs.iter().zip(&chunks) {
                out.extend_from_slice(&s[o * c..(o + 1) * c]);
            }
        }
        Ok(vec![Tensor::from_vec_dtype(first.dtype(), shape, out)?])
    })
}

/// Slice `t` along `axis` into pieces of the given lengths.
fn split_lengths(t: &Tensor, axis: usize, lens: &[usize]) -> Result<Vec<Tensor>> {
    let st = contiguous_strides(t.shape());
    let mut start = 0usize;
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        let mut shape = t.shape().to_vec();
        shape[axis] = l;
        out.push(restride(t, shape, &st, start as isize * st[axis])?);
        start += l;
    }
    Ok(out)
}

fn split(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let axis = norm_axis(ctx.i("axis", 0), t.rank())?;
    let d = t.shape()[axis];
    let lens: Vec<usize> = match ints_in(ctx, ins, 1, "split") {
        Some(s) if !s.is_empty() => s
            .iter()
            .map(|&x| to_dim(x, "Split"))
            .collect::<Result<_>>()?,
        _ => {
            let n = match ctx.node.attr_i("num_outputs") {
                Some(n) => n.max(1) as usize,
                None => ctx.node.outputs.len().max(1),
            };
            let chunk = d.div_ceil(n);
            if ctx.node.attr_i("num_outputs").is_none() {
                ensure!(
                    d % n == 0,
                    "Split: axis of {d} does not split into {n} parts"
                );
            }
            (0..n)
                .map(|i| chunk.min(d.saturating_sub(i * chunk)))
                .collect()
        }
    };
    ensure!(
        lens.iter().try_fold(0usize, |a, &l| a.checked_add(l)) == Some(d),
        "Split: lengths {lens:?} do not add up to {d}"
    );
    split_lengths(t, axis, &lens)
}

fn slice(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let starts = ints_in(ctx, ins, 1, "starts").ok_or_else(|| Error::arg("Slice: no starts"))?;
    let ends = ints_in(ctx, ins, 2, "ends").ok_or_else(|| Error::arg("Slice: no ends"))?;
    ensure!(
        starts.len() == ends.len(),
        "Slice: starts and ends differ in length"
    );
    let axes = ints_in(ctx, ins, 3, "axes").unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = opt_input(ins, 4)
        .map(|s| s.to_i64_vec())
        .unwrap_or_else(|| vec![1; starts.len()]);
    ensure!(
        axes.len() == starts.len() && steps.len() == starts.len(),
        "Slice: starts/ends/axes/steps lengths differ"
    );
    let mut shape = t.shape().to_vec();
    let mut strides = contiguous_strides(t.shape());
    let mut offset = 0isize;
    for i in 0..starts.len() {
        let a = norm_axis(axes[i], r)?;
        let d = shape[a] as i64;
        let step = steps[i];
        ensure!(step != 0, "Slice: step 0");
        let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = (norm(starts[i]), norm(ends[i]));
        let len = if step > 0 {
            let (s, e) = (s.clamp(0, d) as i128, e.clamp(0, d) as i128);
            if e > s {
                (e - s + step as i128 - 1) / step as i128
            } else {
                0
            }
        } else {
            let (s, e) = (s.clamp(-1, d - 1) as i128, e.clamp(-1, d - 1) as i128);
            let st = -(step as i128);
            if s > e {
                (s - e + st - 1) / st
            } else {
                0
            }
        } as i64;
        let s = if step > 0 {
            s.clamp(0, d)
        } else {
            s.clamp(-1, d - 1)
        };
        if len > 0 {
            offset += s as isize * strides[a];
        }
        if len > 1 {
            // len > 1 means |step| < d, so this cannot overflow.
            strides[a] *= step as isize;
        }
        shape[a] = len as usize;
    }
    Ok(vec![restride(t, shape, &strides, offset)?])
}

/// Strides that read `t` broadcast to `shape` (0 on stretched axes).
fn broadcast_strides(t: &Tensor, shape: &[usize]) -> Result<Vec<isize>> {
    let st = contiguous_strides(t.shape());
    let pad = shape.len() - t.rank();
    let mut out = vec![0isize; shape.len()];
    for i in 0..t.rank() {
        let d = t.shape()[i];
        if d == shape[i + pad] {
            out[i + pad] = if d == 1 { 0 } else { st[i] };
        } else if d != 1 {
            bail!("cannot broadcast {:?} to {shape:?}", t.shape());
        }
    }
    Ok(out)
}

fn expand(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let want: Vec<usize> = input(ins, 1)?
        .to_i64_vec()
        .iter()
        .map(|&d| to_dim(d, "Expand"))
        .collect::<Result<_>>()?;
    let shape = broadcast_shapes(t.shape(), &want)?;
    let st = broadcast_strides(t, &shape)?;
    Ok(vec![restride(t, shape, &st, 0)?])
}

fn tile(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let reps = input(ins, 1)?.to_i64_vec();
    ensure!(
        reps.len() == t.rank(),
        "Tile: {} repeats for rank {}",
        reps.len(),
        t.rank()
    );
    let st = contiguous_strides(t.shape());
    let mut vshape = Vec::with_capacity(2 * t.rank());
    let mut vstrides = Vec::with_capacity(2 * t.rank());
    let mut shape = Vec::with_capacity(t.rank());
    for (i, &r) in reps.iter().enumerate() {
        let r = to_dim(r, "Tile")?;
        vshape.extend([r, t.shape()[i]]);
        vstrides.extend([0, st[i]]);
        shape.push(
            r.checked_mul(t.shape()[i])
                .ok_or_else(|| Error::TooLarge("Tile: output shape overflows".into()))?,
        );
    }
    let out = restride(t, vshape, &vstrides, 0)?;
    Ok(vec![out.reshape(shape)?])
}

fn shape_op(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank() as i64;
    let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
    let s = clamp(ctx.i("start", 0));
    let e = clamp(ctx.i("end", r));
    let dims: Vec<i64> = t.shape()[s.min(e)..e].iter().map(|&d| d as i64).collect();
    Ok(vec![i64_tensor(dims)])
}

fn size(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![Tensor::scalar(input(ins, 0)?.len() as i64)])
}

fn constant(ctx: &OpCtx<'_>, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let n = ctx.node;
    if let Some(t) = n.attr_t("value") {
        return Ok(vec![t.clone()]);
    }
    if let Some(v) = n.attr("value_float").and(n.attr_f("value_float")) {
        return Ok(vec![Tensor::scalar(v)]);
    }
    if let Some(v) = n.attr_i("value_int") {
        return Ok(vec![Tensor::scalar(v)]);
    }
    if let Some(v) = n.attr_floats("value_floats") {
        return Ok(vec![Tensor::from_vec(vec![v.len()], v.to_vec())?]);
    }
    if let Some(v) = n.attr_ints("value_ints") {
        return Ok(vec![i64_tensor(v.to_vec())]);
    }
    Err(Error::unsupported(
        "Constant without a numeric value (sparse and string constants)",
    ))
}

fn constant_of_shape(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let shape: Vec<usize> = input(ins, 0)?
        .to_i64_vec()
        .iter()
        .map(|&d| to_dim(d, "ConstantOfShape"))
        .collect::<Result<_>>()?;
    let value = match ctx.node.attr_t("value") {
        Some(v) => {
            ensure!(v.len() == 1, "ConstantOfShape: value must hold one element");
            v.clone()
        }
        None => Tensor::scalar(0f32),
    };
    let one = value.reshape(vec![1])?;
    let st = vec![0isize; shape.len()];
    Ok(vec![restride(&one, shape, &st, 0)?])
}

fn range(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (s, l, d) = (input(ins, 0)?, input(ins, 1)?, input(ins, 2)?);
    let dt = s.dtype();
    ensure!(
        l.dtype() == dt && d.dtype() == dt,
        "Range: start, limit and delta must share a type"
    );
    ensure!(
        s.len() == 1 && l.len() == 1 && d.len() == 1,
        "Range: inputs must be scalars"
    );
    if dt.is_float() {
        let (s, l, d) = (s.to_f64_vec()[0], l.to_f64_vec()[0], d.to_f64_vec()[0]);
        ensure!(
            d != 0.0 && d.is_finite(),
            "Range: delta must be finite and nonzero"
        );
        let n = ((l - s) / d).ceil().max(0.0);
        ensure!(n < 1e15, "Range: {n} elements is too many");
        let n = n as usize;
        checked_numel(&[n], dt)?;
        with_dtype!(dt, T => {
            // Accumulate in the element type as numpy's arange does for the first two values.
            let start = T::from_f64(s);
            let delta = T::from_f64(d);
            let v: Vec<T> = (0..n).map(|i| T::from_f64(start.to_f64() + i as f64 * delta.to_f64())).collect();
            Ok(vec![Tensor::from_vec_dtype(dt, vec![n], v)?])
        })
    } else {
        let (s, l, d) = (s.to_i64_vec()[0], l.to_i64_vec()[0], d.to_i64_vec()[0]);
        ensure!(d != 0, "Range: delta must be nonzero");
        let span = l as i128 - s as i128;
        let n = if (span > 0) == (d > 0) && span != 0 {
            ((span.abs() + d.unsigned_abs() as i128 - 1) / d.unsigned_abs() as i128) as usize
        } else {
            0
        };
        checked_numel(&[n], dt)?;
        with_dtype!(dt, T => {
            let v: Vec<T> = (0..n).map(|i| T::from_i64(s.wrapping_add((i as i64).wrapping_mul(d)))).collect();
            Ok(vec![Tensor::from_vec_dtype(dt, vec![n], v)?])
        })
    }
}

fn pad(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let mode = ctx.s("mode", "constant");
    let raw = match opt_input(ins, 1) {
        Some(p) => p.to_i64_vec(),
        None => ctx
            .ints("pads")
            .or_else(|| ctx.ints("paddings"))
            .ok_or_else(|| Error::arg("Pad: no pads"))?,
    };
    let axes: Vec<usize> = match opt_input(ins, 3) {
        Some(a) => a
            .to_i64_vec()
            .iter()
            .map(|&a| norm_axis(a, r))
            .collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    ensure!(
        raw.len() == 2 * axes.len(),
        "Pad: {} pads for {} axes",
        raw.len(),
        axes.len()
    );
    let mut begin = vec![0i64; r];
    let mut end = vec![0i64; r];
    for (i, &a) in axes.iter().enumerate() {
        begin[a] = raw[i];
        end[a] = raw[i + axes.len()];
    }
    let mut shape = Vec::with_capacity(r);
    for a in 0..r {
        let d = (t.shape()[a] as i64)
            .checked_add(begin[a])
            .and_then(|d| d.checked_add(end[a]))
            .ok_or_else(|| Error::arg("Pad: pads overflow"))?;
        shape.push(to_dim(d, "Pad")?);
    }
    // Per axis, the source index of every output index (None: the constant).
    let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(r);
    for a in 0..r {
        let n = t.shape()[a] as i64;
        let m = (0..shape[a] as i64)
            .map(|o| {
                let i = o - begin[a];
                if (0..n).contains(&i) {
                    return Ok(Some(i as usize));
                }
                match mode.as_str() {
                    "constant" => Ok(None),
                    _ if n == 0 => bail!("Pad: {mode} padding of an empty axis"),
                    "edge" => Ok(Some(i.clamp(0, n - 1) as usize)),
                    "wrap" => Ok(Some(i.rem_euclid(n) as usize)),
                    "reflect" => {
                        if n == 1 {
                            return Ok(Some(0));
                        }
                        let p = 2 * (n - 1);
                        let k = i.rem_euclid(p);
                        Ok(Some(if k < n { k } else { p - k } as usize))
                    }
                    m => Err(Error::unsupported(format!("Pad mode {m:?}"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        maps.push(m);
    }
    let value = opt_input(ins, 2).filter(|v| !v.is_empty());
    let dt = t.dtype();
    with_dtype!(dt, T => {
        let cv: T = match value {
            Some(v) => {
                ensure!(v.dtype() == dt, "Pad: constant_value type {} differs from {dt}", v.dtype());
                v.as_slice::<T>()?[0]
            }
            None => T::from_f64(ctx.f("value", 0.0) as f64),
        };
        let src = t.as_slice::<T>()?;
        let st = contiguous_strides(t.shape());
        let n = checked_numel(&shape, dt)?;
        let mut out = Vec::with_capacity(n);
        if n > 0 {
            let mut idx = vec![0usize; r];
            for _ in 0..n {
                let mut p = 0isize;
                let mut hit = true;
                for a in 0..r {
                    match maps[a][idx[a]] {
                        Some(i) => p += i as isize * st[a],
                        None => {
                            hit = false;
                            break;
                        }
                    }
                }
                out.push(if hit { src[p as usize] } else { cv });
                for a in (0..r).rev() {
                    idx[a] += 1;
                    if idx[a] < shape[a] {
                        break;
                    }
                    idx[a] = 0;
                }
            }
        }
        Ok(vec![Tensor::from_vec_dtype(dt, shape, out)?])
    })
}

fn nchw(op: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => bail!("{op}: expected a 4-d input, got {:?}", t.shape()),
    }
}

fn depth_to_space(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let [n, c, h, w] = nchw("DepthToSpace", t)?;
    let b = ctx.i("blocksize", 0);
    ensure!(b > 0, "DepthToSpace: blocksize must be positive");
    let b = b as usize;
    ensure!(
        c % (b * b) == 0,
        "DepthToSpace: {c} channels not divisible by {}",
        b * b
    );
    let co = c / (b * b);
    let crd = ctx.s("mode", "DCR") == "CRD";
    let (v, perm) = if crd {
        (t.reshape(vec![n, co, b, b, h, w])?, [0, 1, 4, 2, 5, 3])
    } else {
        (t.reshape(vec![n, b, b, co, h, w])?, [0, 3, 4, 1, 5, 2])
    };
    Ok(vec![permute(&v, &perm)?.reshape(vec![
        n,
        co,
        h * b,
        w * b,
    ])?])
}

fn space_to_depth(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let [n, c, h, w] = nchw("SpaceToDepth", t)?;
    let b = ctx.i("blocksize", 0);
    ensure!(b > 0, "SpaceToDepth: blocksize must be positive");
    let b = b as usize;
    ensure!(
        h % b == 0 && w % b == 0,
        "SpaceToDepth: {h}x{w} not divisible by {b}"
    );
    let v = t.reshape(vec![n, c, h / b, b, w / b, b])?;
    let perm = if ctx.s("mode", "DCR") == "CRD" {
        [0, 1, 3, 5, 2, 4]
    } else {
        [0, 3, 5, 1, 2, 4]
    };
    Ok(vec![permute(&v, &perm)?.reshape(vec![
        n,
        c * b * b,
        h / b,
        w / b,
    ])?])
}

fn trilu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    ensure!(t.rank() >= 2, "Trilu: input must have rank >= 2");
    let k = match opt_input(ins, 1) {
        Some(k) => *k
            .to_i64_vec()
            .first()
            .ok_or_else(|| Error::arg("Trilu: empty k"))?,
        None => 0,
    };
    let upper = ctx.i("upper", 1) != 0;
    let r = t.rank();
    let (rows, cols) = (t.shape()[r - 2], t.shape()[r - 1]);
    let bits = as_bits(t)?;
    by_width!(t, T => {
        let mut v = bits.as_slice::<T>()?.into_owned();
        for (p, x) in v.iter_mut().enumerate() {
            let j = (p % cols.max(1)) as i64;
            let i = ((p / cols.max(1)) % rows.max(1)) as i64;
            let keep = if upper { j - i >= k } else { j - i <= k };
            if !keep {
                *x = 0;
            }
        }
        Ok(vec![Tensor::from_vec_dtype(t.dtype(), t.shape().to_vec(), v)?])
    })
}

fn compress(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let cond = input(ins, 1)?.to_i64_vec();
    let (t, axis) = match ctx.node.attr_i("axis") {
        Some(a) => (t.clone(), norm_axis(a, t.rank())?),
        None => (t.reshape(vec![t.len()])?, 0),
    };
    let d = t.shape()[axis];
    ensure!(
        cond.iter().skip(d).all(|&c| c == 0),
        "Compress: condition selects past the end of the axis"
    );
    let keep: Vec<usize> = (0..d.min(cond.len())).filter(|&i| cond[i] != 0).collect();
    let outer: usize = t.shape()[..axis].iter().product();
    let inner: usize = t.shape()[axis + 1..].iter().product();
    let mut shape = t.shape().to_vec();
    shape[axis] = keep.len();
    let bits = as_bits(&t)?;
    by_width!(t, T => {
        let s = bits.as_slice::<T>()?;
        let mut out = Vec::with_capacity(outer * keep.len() * inner);
        for o in 0..outer {
            for &k in &keep {
                let p = (o * d + k) * inner;
                out.extend_from_slice(&s[p..p + inner]);
            }
        }
        Ok(vec![Tensor::from_vec_dtype(t.dtype(), shape, out)?])
    })
}

fn reverse_sequence(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let lens = input(ins, 1)?.to_i64_vec();
    let r = t.rank();
    let ba = norm_axis(ctx.i("batch_axis", 1), r)?;
    let ta = norm_axis(ctx.i("time_axis", 0), r)?;
    ensure!(ba != ta, "ReverseSequence: batch_axis equals time_axis");
    let (nb, nt) = (t.shape()[ba], t.shape()[ta]);
    ensure!(
        lens.len() == nb,
        "ReverseSequence: {} lengths for batch {nb}",
        lens.len()
    );
    let st = contiguous_strides(t.shape());
    let bits = as_bits(t)?;
    by_width!(t, T => {
        let s = bits.as_slice::<T>()?;
        let mut out = s.to_vec();
        let n = t.len();
        let mut idx = vec![0usize; r];
        for _ in 0..n {
            let (b, ti) = (idx[ba], idx[ta]);
            let l = (lens[b].clamp(0, nt as i64)) as usize;
            if ti < l {
                let mut dst = 0isize;
                for a in 0..r {
                    dst += idx[a] as isize * st[a];
                }
                let src = dst + (l - 1 - ti) as isize * st[ta] - ti as isize * st[ta];
                out[dst as usize] = s[src as usize];
            }
            for a in (0..r).rev() {
                idx[a] += 1;
                if idx[a] < t.shape()[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        Ok(vec![Tensor::from_vec_dtype(t.dtype(), t.shape().to_vec(), out)?])
    })
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("Reshape", reshape);
    r.add("Flatten", flatten);
    r.add("Squeeze", squeeze);
    r.add("Unsqueeze", unsqueeze);
    r.add("Transpose", transpose);
    r.add("Concat", concat);
    r.add("Split", split);
    r.add("Slice", slice);
    r.add("Expand", expand);
    r.add("Tile", tile);
    r.add("Shape", shape_op);
    r.add("Size", size);
    r.add("Constant", constant);
    r.add("ConstantOfShape", constant_of_shape);
    r.add("Range", range);
    r.add("Pad", pad);
    r.add("DepthToSpace", depth_to_space);
    r.add("SpaceToDepth", space_to_depth);
    r.add("Trilu", trilu);
    r.add("Compress", compress);
    r.add("ReverseSequence", reverse_sequence);
    gather::register(r);
    einsum::register(r);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use edgehal_core::{Attr, Node};

    pub(crate) fn run(
        op: &str,
        attrs: Vec<(&str, Attr)>,
        ins: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let mut node = Node {
            op: op.into(),
            ..Default::default()
        };
        node.outputs = vec![None; 2];
        for (k, v) in attrs {
            node.attrs.insert(k.into(), v);
        }
        let ctx = OpCtx {
            node: &node,
            opset: 21,
            subgraph: None,
            dest: None,
        };
        let mut r = Registry::new();
        register(&mut r);
        let f = r.get("", op).ok_or_else(|| Error::unsupported(op))?;
        f(&ctx, ins)
    }

    pub(crate) fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn reshape_shares_storage_and_infers() {
        let x = t(&[2, 3, 4], (0..24).map(|i| i as f32).collect());
        let s = i64_tensor(vec![0, -1]);
        let o = run("Reshape", vec![], &[Some(&x), Some(&s)]).unwrap();
        assert_eq!(o[0].shape(), &[2, 12]);
        assert_eq!(o[0].bytes().as_ptr(), x.bytes().as_ptr());
        let u = run(
            "Unsqueeze",
            vec![],
            &[Some(&x), Some(&i64_tensor(vec![0, -1]))],
        )
        .unwrap();
        assert_eq!(u[0].shape(), &[1, 2, 3, 4, 1]);
        let q = run("Squeeze", vec![], &[Some(&u[0])]).unwrap();
        assert_eq!(q[0].shape(), &[2, 3, 4]);
    }

    #[test]
    fn transpose_slice_concat() {
        let x = t(&[2, 3], vec![1i32, 2, 3, 4, 5, 6]);
        let o = run("Transpose", vec![], &[Some(&x)]).unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![1, 4, 2, 5, 3, 6]);
        // x[:, ::-2]
        let o = run(
            "Slice",
            vec![],
            &[
                Some(&x),
                Some(&i64_tensor(vec![-1])),
                Some(&i64_tensor(vec![i64::MIN])),
                Some(&i64_tensor(vec![1])),
                Some(&i64_tensor(vec![-2])),
            ],
        )
        .unwrap();
        assert_eq!(o[0].shape(), &[2, 2]);
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![3, 1, 6, 4]);
        // Huge steps and bounds clamp instead of overflowing.
        let o = run(
            "Slice",
            vec![],
            &[
                Some(&x),
                Some(&i64_tensor(vec![i64::MIN])),
                Some(&i64_tensor(vec![i64::MAX])),
                Some(&i64_tensor(vec![1])),
                Some(&i64_tensor(vec![i64::MAX])),
            ],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![1, 4]);
        let c = run(
            "Concat",
            vec![("axis", Attr::Int(1))],
            &[Some(&x), Some(&x)],
        )
        .unwrap();
        assert_eq!(
            c[0].to_vec::<i32>().unwrap(),
            vec![1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
        );
        let s = run(
            "Split",
            vec![("axis", Attr::Int(1))],
            &[Some(&x), Some(&i64_tensor(vec![1, 2]))],
        )
        .unwrap();
        assert_eq!(s[1].to_vec::<i32>().unwrap(), vec![2, 3, 5, 6]);
    }

    #[test]
    fn pad_modes_tile_expand() {
        let x = t(&[3], vec![1f32, 2., 3.]);
        let p = i64_tensor(vec![2, 2]);
        let m = |mode: &str| {
            run(
                "Pad",
                vec![("mode", Attr::String(mode.as_bytes().to_vec()))],
                &[Some(&x), Some(&p)],
            )
            .unwrap()[0]
                .to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(m("constant"), vec![0., 0., 1., 2., 3., 0., 0.]);
        assert_eq!(m("reflect"), vec![3., 2., 1., 2., 3., 2., 1.]);
        assert_eq!(m("edge"), vec![1., 1., 1., 2., 3., 3., 3.]);
        assert_eq!(m("wrap"), vec![2., 3., 1., 2., 3., 1., 2.]);
        let y = t(&[2, 1], vec![1u8, 2]);
        let o = run("Tile", vec![], &[Some(&y), Some(&i64_tensor(vec![2, 2]))]).unwrap();
        assert_eq!(o[0].to_vec::<u8>().unwrap(), vec![1, 1, 2, 2, 1, 1, 2, 2]);
        let o = run(
            "Expand",
            vec![],
            &[Some(&y), Some(&i64_tensor(vec![2, 1, 3]))],
        )
        .unwrap();
        assert_eq!(o[0].shape(), &[2, 2, 3]);
        assert_eq!(
            o[0].to_vec::<u8>().unwrap(),
            vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2]
        );
        // Hostile shapes are refused before allocating.
        let huge = i64_tensor(vec![1 << 30, 1 << 30, 2]);
        assert!(run("Expand", vec![], &[Some(&y), Some(&huge)]).is_err());
        assert!(run("ConstantOfShape", vec![], &[Some(&huge)]).is_err());
        let reps = i64_tensor(vec![1 << 62, 1 << 20]);
        assert!(run("Tile", vec![], &[Some(&y), Some(&reps)]).is_err());
    }
    #[test]
    fn two_dimensional_permutations_take_the_tiled_transpose() {
        // NHWC -> NCHW of one image, the reverse, and a 3-axis rotation: 2D transposes.
        assert_eq!(
            as_2d_transpose(&[1, 7, 5, 33], &[0, 3, 1, 2]),
            Some((35, 33))
        );
        assert_eq!(
            as_2d_transpose(&[1, 33, 7, 5], &[0, 2, 3, 1]),
            Some((33, 35))
        );
        assert_eq!(as_2d_transpose(&[4, 6], &[1, 0]), Some((4, 6)));
        // Batched, identity, three groups: not 2D.
        assert_eq!(as_2d_transpose(&[2, 7, 5, 3], &[0, 3, 1, 2]), None);
        assert_eq!(as_2d_transpose(&[3, 4], &[0, 1]), None);
        assert_eq!(as_2d_transpose(&[2, 3, 4], &[2, 1, 0]), None);
        // Every layout against the strided copy, for 1-, 2- and 4-byte elements.
        for (shape, perm) in [
            (vec![1, 7, 5, 33], vec![0, 3, 1, 2]),
            (vec![1, 33, 7, 5], vec![0, 2, 3, 1]),
            (vec![17, 19], vec![1, 0]),
            (vec![3, 1, 40], vec![2, 1, 0]),
        ] {
            let n: usize = shape.iter().product();
            let st = contiguous_strides(&shape);
            let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let strides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
            let ts = [
                Tensor::from_vec(shape.clone(), (0..n).map(|i| i as u8).collect::<Vec<_>>()),
                Tensor::from_vec(shape.clone(), (0..n).map(|i| i as i16).collect::<Vec<_>>()),
                Tensor::from_vec(shape.clone(), (0..n).map(|i| i as f32).collect::<Vec<_>>()),
            ];
            for t in ts {
                let t = t.unwrap();
                let want = restride(&t, oshape.clone(), &strides, 0).unwrap();
                let got = permute(&t, &perm).unwrap();
                assert_eq!(got.shape(), want.shape());
                assert_eq!(&got.bytes()[..], &want.bytes()[..], "{shape:?} {perm:?}");
            }
        }
    }
}
