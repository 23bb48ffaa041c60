//! Index-driven ops: `Gather`, `GatherElements`, `GatherND`, `ScatterElements`, `ScatterND`,
//! `OneHot`. Every index is range-checked (negative indices count from the end) before use.

use edgehal_core::tensor::{checked_numel, contiguous_strides};
use edgehal_core::{bail, ensure, with_dtype, Error, Result, Tensor};

use super::super::elementwise::Num;
use super::super::{input, norm_axis, OpCtx, Registry};
use super::{as_bits, by_width};

/// Resolve a possibly negative index against an axis of `n`.
fn fix_index(i: i64, n: usize, op: &str) -> Result<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        bail!("{op}: index {i} out of range for an axis of {n}");
    }
    Ok(j as usize)
}

fn indices(t: &Tensor, op: &str) -> Result<Vec<i64>> {
    ensure!(
        t.dtype().is_int(),
        "{op}: indices must be integers, got {}",
        t.dtype()
    );
    Ok(t.to_i64_vec())
}

fn gather(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let data = input(ins, 0)?;
    let it = input(ins, 1)?;
    let idx = indices(it, "Gather")?;
    let axis = norm_axis(ctx.i("axis", 0), data.rank())?;
    let ds = data.shape();
    let n = ds[axis];
    let outer: usize = ds[..axis].iter().product();
    let inner: usize = ds[axis + 1..].iter().product();
    let idx: Vec<usize> = idx
        .iter()
        .map(|&i| fix_index(i, n, "Gather"))
        .collect::<Result<_>>()?;
    let mut shape: Vec<usize> = ds[..axis].to_vec();
    shape.extend_from_slice(it.shape());
    shape.extend_from_slice(&ds[axis + 1..]);
    checked_numel(&shape, data.dtype())?;
    let bits = as_bits(data)?;
    by_width!(data, T => {
        let s = bits.as_slice::<T>()?;
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &i in &idx {
                let p = (o * n + i) * inner;
                out.extend_from_slice(&s[p..p + inner]);
            }
        }
        Ok(vec![Tensor::from_vec_dtype(data.dtype(), shape, out)?])
    })
}

/// Iterate the multi-indices of `shape` in row-major order.
fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize]) -> Result<()>) -> Result<()> {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        f(&idx)?;
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    Ok(())
}

/// Flat positions in `data` addressed by `indices` along `axis` (GatherElements/ScatterElements).
fn element_positions(
    data_shape: &[usize],
    ishape: &[usize],
    idx: &[i64],
    axis: usize,
    op: &str,
) -> Result<Vec<usize>> {
    ensure!(
        ishape.len() == data_shape.len(),
        "{op}: indices rank {} differs from data rank {}",
        ishape.len(),
        data_shape.len()
    );
    let st = contiguous_strides(data_shape);
    let mut pos = Vec::with_capacity(idx.len());
    let mut k = 0usize;
    for_each_index(ishape, |ix| {
        let mut p = 0usize;
        for a in 0..ix.len() {
            let i = if a == axis {
                fix_index(idx[k], data_shape[a], op)?
            } else {
                ensure!(
                    ix[a] < data_shape[a],
                    "{op}: indices shape exceeds data shape"
                );
                ix[a]
            };
            p += i * st[a] as usize;
        }
        pos.push(p);
        k += 1;
        Ok(())
    })?;
    Ok(pos)
}

fn gather_elements(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let data = input(ins, 0)?;
    let it = input(ins, 1)?;
    let idx = indices(it, "GatherElements")?;
    let axis = norm_axis(ctx.i("axis", 0), data.rank())?;
    let pos = element_positions(data.shape(), it.shape(), &idx, axis, "GatherElements")?;
    let bits = as_bits(data)?;
    by_width!(data, T => {
        let s = bits.as_slice::<T>()?;
        let out: Vec<T> = pos.iter().map(|&p| s[p]).collect();
        Ok(vec![Tensor::from_vec_dtype(data.dtype(), it.shape().to_vec(), out)?])
    })
}

/// For GatherND/ScatterND: the flat offsets (in elements of `data`) of each addressed slice,
/// and the slice length.
fn nd_offsets(
    dshape: &[usize],
    ishape: &[usize],
    idx: &[i64],
    batch_dims: usize,
    op: &str,
) -> Result<(Vec<usize>, usize)> {
    let k = *ishape
        .last()
        .ok_or_else(|| Error::arg(format!("{op}: indices must have rank >= 1")))?;
    ensure!(
        batch_dims < ishape.len() && batch_dims + k <= dshape.len(),
        "{op}: index depth {k} with {batch_dims} batch dims exceeds data rank {}",
        dshape.len()
    );
    ensure!(
        dshape[..batch_dims] == ishape[..batch_dims],
        "{op}: batch dims of data and indices differ"
    );
    let st = contiguous_strides(dshape);
    let batch: usize = dshape[..batch_dims].iter().product();
    let batch_stride: usize = dshape[batch_dims..].iter().product();
    let per_batch: usize = ishape[batch_dims..ishape.len() - 1].iter().product();
    let slice: usize = dshape[batch_dims + k..].iter().product();
    let mut offs = Vec::with_capacity(batch * per_batch);
    for b in 0..batch {
        for m in 0..per_batch {
            let row = &idx[(b * per_batch + m) * k..(b * per_batch + m + 1) * k];
            let mut p = b * batch_stride;
            for (j, &i) in row.iter().enumerate() {
                let a = batch_dims + j;
                p += fix_index(i, dshape[a], op)? * st[a] as usize;
            }
            offs.push(p);
        }
    }
    Ok((offs, slice))
}

fn gather_nd(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let data = input(ins, 0)?;
    let it = input(ins, 1)?;
    let idx = indices(it, "GatherND")?;
    let b = ctx.i("batch_dims", 0).max(0) as usize;
    let (offs, slice) = nd_offsets(data.shape(), it.shape(), &idx, b, "GatherND")?;
    let k = it.shape()[it.rank() - 1];
    let mut shape = it.shape()[..it.rank() - 1].to_vec();
    shape.extend_from_slice(&data.shape()[b + k..]);
    checked_numel(&shape, data.dtype())?;
    let bits = as_bits(data)?;
    by_width!(data, T => {
        let s = bits.as_slice::<T>()?;
        let mut out = Vec::with_capacity(offs.len() * slice);
        for &p in &offs {
            out.extend_from_slice(&s[p..p + slice]);
        }
        Ok(vec![Tensor::from_vec_dtype(data.dtype(), shape, out)?])
    })
}

#[derive(Clone, Copy)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(ctx: &OpCtx<'_>) -> Result<Reduction> {
    Ok(match ctx.s("reduction", "none").as_str() {
        "none" => Reduction::None,
        "add" => Reduction::Add,
        "mul" => Reduction::Mul,
        "max" => Reduction::Max,
        "min" => Reduction::Min,
        r => bail!("unknown scatter reduction {r:?}"),
    })
}

#[inline]
fn combine<T: Num>(r: Reduction, old: T, new: T) -> T {
    match r {
        Reduction::None => new,
        Reduction::Add => old.add(new),
        Reduction::Mul => old.mul(new),
        Reduction::Max => {
            if new > old {
                new
            } else {
                old
            }
        }
        Reduction::Min => {
            if new < old {
                new
            } else {
                old
            }
        }
    }
}

fn scatter_elements(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let data = input(ins, 0)?;
    let it = input(ins, 1)?;
    let upd = input(ins, 2)?;
    ensure!(
        upd.shape() == it.shape(),
        "ScatterElements: updates and indices shapes differ"
    );
    ensure!(
        upd.dtype() == data.dtype(),
        "ScatterElements: updates type differs from data"
    );
    let idx = indices(it, "ScatterElements")?;
    let axis = norm_axis(ctx.i("axis", 0), data.rank())?;
    let red = reduction(ctx)?;
    let pos = element_positions(data.shape(), it.shape(), &idx, axis, "ScatterElements")?;
    let dt = data.dtype();
    with_dtype!(dt, T => {
        let mut out = data.as_slice::<T>()?.into_owned();
        let u = upd.as_slice::<T>()?;
        for (&p, &v) in pos.iter().zip(u.iter()) {
            out[p] = combine(red, out[p], v);
        }
        Ok(vec![Tensor::from_vec_dtype(dt, data.shape().to_vec(), out)?])
    })
}

fn scatter_nd(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let data = input(ins, 0)?;
    let it = input(ins, 1)?;
    let upd = input(ins, 2)?;
    ensure!(
        upd.dtype() == data.dtype(),
        "ScatterND: updates type differs from data"
    );
    let idx = indices(it, "ScatterND")?;
    let red = reduction(ctx)?;
    let (offs, slice) = nd_offsets(data.shape(), it.shape(), &idx, 0, "ScatterND")?;
    ensure!(
        upd.len() == offs.len() * slice,
        "ScatterND: updates hold {} elements, expected {}",
        upd.len(),
        offs.len() * slice
    );
    let dt = data.dtype();
    with_dtype!(dt, T => {
        let mut out = data.as_slice::<T>()?.into_owned();
        let u = upd.as_slice::<T>()?;
        for (j, &p) in offs.iter().enumerate() {
            for q in 0..slice {
                out[p + q] = combine(red, out[p + q], u[j * slice + q]);
            }
        }
        Ok(vec![Tensor::from_vec_dtype(dt, data.shape().to_vec(), out)?])
    })
}

fn one_hot(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let it = input(ins, 0)?;
    let depth = input(ins, 1)?.to_f64_vec();
    let values = input(ins, 2)?;
    let depth = match depth.as_slice() {
        [d] if *d >= 0.0 && *d < 1e9 => *d as usize,
        _ => bail!("OneHot: depth must be one non-negative value"),
    };
    ensure!(values.len() == 2, "OneHot: values must hold [off, on]");
    let idx = it.to_f64_vec();
    let r = it.rank() + 1;
    let axis = norm_axis(ctx.i("axis", -1), r)?;
    let outer: usize = it.shape()[..axis].iter().product();
    let inner: usize = it.shape()[axis..].iter().product();
    let mut shape = it.shape().to_vec();
    shape.insert(axis, depth);
    let dt = values.dtype();
    checked_numel(&shape, dt)?;
    with_dtype!(dt, T => {
        let v = values.as_slice::<T>()?;
        let (off, on) = (v[0], v[1]);
        let mut out = vec![off; outer * depth * inner];
        for o in 0..outer {
            for i in 0..inner {
                let mut k = idx[o * inner + i] as i64;
                if k < 0 {
                    k += depth as i64;
                }
                if (0..depth as i64).contains(&k) {
                    out[(o * depth + k as usize) * inner + i] = on;
                }
            }
        }
        Ok(vec![Tensor::from_vec_dtype(dt, shape, out)?])
    })
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("Gather", gather);
    r.add("GatherElements", gather_elements);
    r.add("GatherND", gather_nd);
    r.add("ScatterElements", scatter_elements);
    r.add("Scatter", scatter_elements);
    r.add("ScatterND", scatter_nd);
    r.add("OneHot", one_hot);
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, t};
    use edgehal_core::Attr;

    #[test]
    fn gathers() {
        let x = t(&[3, 2], vec![1f32, 2., 3., 4., 5., 6.]);
        let i = t(&[2], vec![2i64, -3]);
        let o = run("Gather", vec![], &[Some(&x), Some(&i)]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![5., 6., 1., 2.]);
        let o = run(
            "Gather",
            vec![("axis", Attr::Int(1))],
            &[Some(&x), Some(&i)],
        );
        assert!(o.is_err(), "index -3 is out of range for an axis of 2");
        let ge = t(&[3, 1], vec![1i64, 0, 1]);
        let o = run(
            "GatherElements",
            vec![("axis", Attr::Int(1))],
            &[Some(&x), Some(&ge)],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![2., 3., 6.]);
        let nd = t(&[2, 2], vec![0i64, 1, 2, 0]);
        let o = run("GatherND", vec![], &[Some(&x), Some(&nd)]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![2., 5.]);
    }

    #[test]
    fn scatters_and_one_hot() {
        let x = t(&[1, 5], vec![1f32, 2., 3., 4., 5.]);
        let i = t(&[1, 2], vec![1i64, 1]);
        let u = t(&[1, 2], vec![1.1f32, 2.1]);
        let o = run(
            "ScatterElements",
            vec![
                ("axis", Attr::Int(1)),
                ("reduction", Attr::String(b"add".to_vec())),
            ],
            &[Some(&x), Some(&i), Some(&u)],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![1., 5.2, 3., 4., 5.]);
        let d = t(&[4], vec![1i32, 2, 3, 4]);
        let ni = t(&[2, 1], vec![3i64, 0]);
        let nu = t(&[2], vec![10i32, 20]);
        let o = run("ScatterND", vec![], &[Some(&d), Some(&ni), Some(&nu)]).unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![20, 2, 3, 10]);
        let idx = t(&[2], vec![0i64, -1]);
        let depth = t(&[1], vec![3i64]);
        let vals = t(&[2], vec![0f32, 1.]);
        let o = run("OneHot", vec![], &[Some(&idx), Some(&depth), Some(&vals)]).unwrap();
        assert_eq!(o[0].shape(), &[2, 3]);
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![1., 0., 0., 0., 0., 1.]);
    }
}
