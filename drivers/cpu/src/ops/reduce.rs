//! Ops: reductions (`Reduce*`), `ArgMax`/`ArgMin`, `CumSum`, `TopK`, `NonZero`.
//!
//! A reduction permutes the kept axes in front of the reduced ones (no copy when the reduced
//! axes already trail) and folds each contiguous group. Floats accumulate in f64; integer sums
//! and products wrap in i64 like C; Max/Min stay in the element type so they are exact.

use std::borrow::Cow;
use std::cmp::Ordering;

use edgehal_core::dtype::Elem;
use edgehal_core::{bail, with_dtype, DType, Error, Result, Tensor};

use super::elementwise::Num;
use super::{input, norm_axis, opt_input, OpCtx, Registry};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

/// Which axes to reduce (a mask), or None for "no reduction" (noop with empty axes).
fn reduce_mask(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], rank: usize) -> Result<Vec<bool>> {
    let axes: Vec<i64> = match opt_input(ins, 1) {
        Some(a) => a.to_i64_vec(),
        None => ctx.ints("axes").unwrap_or_default(),
    };
    if axes.is_empty() {
        let noop = ctx.i("noop_with_empty_axes", 0) != 0;
        return Ok(vec![!noop; rank]);
    }
    let mut mask = vec![false; rank];
    for a in axes {
        mask[norm_axis(a, rank)?] = true;
    }
    Ok(mask)
}

/// The data reordered so each output element's inputs are one contiguous group, the number
/// of groups and the group size.
fn grouped<'a, T: Elem>(t: &'a Tensor, mask: &[bool]) -> Result<(Cow<'a, [T]>, usize, usize)> {
    let shape = t.shape();
    let kept: Vec<usize> = (0..shape.len()).filter(|&i| !mask[i]).collect();
    let red: Vec<usize> = (0..shape.len()).filter(|&i| mask[i]).collect();
    let groups: usize = kept.iter().map(|&i| shape[i]).product();
    let size: usize = red.iter().map(|&i| shape[i]).product();
    let perm: Vec<usize> = kept.iter().chain(red.iter()).copied().collect();
    let data = t.as_slice::<T>()?;
    // Axes of size 1 can move freely: only the order of the non-trivial ones matters.
    let nontrivial: Vec<usize> = perm.iter().copied().filter(|&p| shape[p] != 1).collect();
    if nontrivial.windows(2).all(|w| w[0] < w[1]) {
        return Ok((data, groups, size));
    }
    let v = t.view::<T>()?.permute(&perm)?.to_vec();
    Ok((Cow::Owned(v), groups, size))
}

fn out_shape(shape: &[usize], mask: &[bool], keepdims: bool) -> Vec<usize> {
    shape
        .iter()
        .zip(mask)
        .filter_map(|(&d, &m)| match (m, keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}

fn reduce_group<T: Num>(kind: Kind, g: &[T]) -> T {
    match kind {
        Kind::Max => {
            let mut m = T::lowest();
            for &x in g {
                if x.is_nan() {
                    return x;
                }
                if x > m {
                    m = x;
                }
            }
            m
        }
        Kind::Min => {
            let mut m = T::highest();
            for &x in g {
                if x.is_nan() {
                    return x;
                }
                if x < m {
                    m = x;
                }
            }
            m
        }
        Kind::Sum | Kind::Prod | Kind::SumSquare if !T::IS_FLOAT => {
            let mut acc: i64 = if kind == Kind::Prod { 1 } else { 0 };
            for &x in g {
                let x = x.to_i64();
                acc = match kind {
                    Kind::Sum => acc.wrapping_add(x),
                    Kind::Prod => acc.wrapping_mul(x),
                    _ => acc.wrapping_add(x.wrapping_mul(x)),
                };
            }
            T::from_i64(acc)
        }
        _ => {
            let it = g.iter().map(|x| x.to_f64());
            let v = match kind {
                Kind::Sum => it.sum::<f64>(),
                Kind::Mean => it.sum::<f64>() / g.len() as f64,
                Kind::Prod => it.product::<f64>(),
                Kind::L1 => it.map(f64::abs).sum::<f64>(),
                Kind::L2 => it.map(|x| x * x).sum::<f64>().sqrt(),
                Kind::SumSquare => it.map(|x| x * x).sum::<f64>(),
                Kind::LogSum => it.sum::<f64>().ln(),
                Kind::LogSumExp => {
                    let m = g
                        .iter()
                        .map(|x| x.to_f64())
                        .fold(f64::NEG_INFINITY, f64::max);
                    if m.is_infinite() {
                        m
                    } else {
                        m + it.map(|x| (x - m).exp()).sum::<f64>().ln()
                    }
                }
                Kind::Max | Kind::Min => 0.0,
            };
            T::from_f64(v)
        }
    }
}

fn reduce(kind: Kind, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let mask = reduce_mask(ctx, ins, t.rank())?;
    let keepdims = ctx.i("keepdims", 1) != 0;
    let shape = out_shape(t.shape(), &mask, keepdims);
    let dt = t.dtype();
    if dt == DType::Bool && !matches!(kind, Kind::Max | Kind::Min) {
        return Err(Error::unsupported(format!(
            "Reduce{kind:?} on bool tensors"
        )));
    }
    with_dtype!(dt, T => {
        let (data, groups, size) = grouped::<T>(t, &mask)?;
        let v: Vec<T> = if size == 0 {
            vec![reduce_group::<T>(kind, &[]); groups]
        } else {
            data.chunks_exact(size).map(|g| reduce_group(kind, g)).collect()
        };
        Ok(vec![Tensor::from_vec_dtype(dt, shape, v)?])
    })
}

macro_rules! reduce_op {
    ($name:ident, $kind:expr) => {
        fn $name(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
            reduce($kind, ctx, ins)
        }
    };
}
reduce_op!(reduce_sum, Kind::Sum);
reduce_op!(reduce_mean, Kind::Mean);
reduce_op!(reduce_max, Kind::Max);
reduce_op!(reduce_min, Kind::Min);
reduce_op!(reduce_prod, Kind::Prod);
reduce_op!(reduce_l1, Kind::L1);
reduce_op!(reduce_l2, Kind::L2);
reduce_op!(reduce_log_sum, Kind::LogSum);
reduce_op!(reduce_log_sum_exp, Kind::LogSumExp);
reduce_op!(reduce_sum_square, Kind::SumSquare);

/// `(outer, axis length, inner)` around one axis.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

fn arg_extreme(max: bool, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let axis = norm_axis(ctx.i("axis", 0), t.rank())?;
    let keepdims = ctx.i("keepdims", 1) != 0;
    let last = ctx.i("select_last_index", 0) != 0;
    let (outer, n, inner) = split_at_axis(t.shape(), axis);
    if n == 0 {
        bail!("ArgMax/ArgMin over an empty axis");
    }
    let mut shape = t.shape().to_vec();
    if keepdims {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    let out = with_dtype!(t.dtype(), T => {
        let d = t.as_slice::<T>()?;
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let base = o * n * inner + i;
                let mut best = d[base];
                let mut bi = 0usize;
                for k in 1..n {
                    let x = d[base + k * inner];
                    let better = if max { x > best || (last && x == best) } else { x < best || (last && x == best) };
                    if better {
                        best = x;
                        bi = k;
                    }
                }
                out.push(bi as i64);
            }
        }
        out
    });
    Ok(vec![Tensor::from_vec(shape, out)?])
}

fn arg_max(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg_extreme(true, ctx, ins)
}
fn arg_min(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg_extreme(false, ctx, ins)
}

fn cum_sum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    cumulative(false, ctx, ins)
}

fn cum_prod(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    cumulative(true, ctx, ins)
}

/// CumSum / CumProd along one axis.
fn cumulative(prod: bool, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let a = input(ins, 1)?.to_i64_vec();
    let axis = match a.as_slice() {
        [a] => norm_axis(*a, t.rank())?,
        _ => bail!("CumSum/CumProd: axis must be a single value"),
    };
    let exclusive = ctx.i("exclusive", 0) != 0;
    let reverse = ctx.i("reverse", 0) != 0;
    let (outer, n, inner) = split_at_axis(t.shape(), axis);
    let dt = t.dtype();
    if dt == DType::Bool {
        return Err(Error::unsupported("CumSum/CumProd on bool tensors"));
    }
    with_dtype!(dt, T => {
        let d = t.as_slice::<T>()?;
        let mut out = vec![T::ZERO; d.len()];
        for o in 0..outer {
            for i in 0..inner {
                let base = o * n * inner + i;
                let mut acc = if prod { T::ONE } else { T::ZERO };
                let step = |acc: T, x: T| if prod { Num::mul(acc, x) } else { Num::add(acc, x) };
                for j in 0..n {
                    let k = if reverse { n - 1 - j } else { j };
                    let p = base + k * inner;
                    if exclusive {
                        out[p] = acc;
                        acc = step(acc, d[p]);
                    } else {
                        acc = step(acc, d[p]);
                        out[p] = acc;
                    }
                }
            }
        }
        Ok(vec![Tensor::from_vec_dtype(dt, t.shape().to_vec(), out)?])
    })
}

/// Total order for TopK: NaN counts as the largest value.
fn cmp_f64(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn top_k(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let k = match opt_input(ins, 1) {
        Some(k) => match k.to_i64_vec().as_slice() {
            [k] => *k,
            _ => bail!("TopK: K must hold one value"),
        },
        None => ctx
            .node
            .attr_i("k")
            .ok_or_else(|| Error::arg("TopK: missing K"))?,
    };
    let axis = norm_axis(ctx.i("axis", -1), t.rank())?;
    let largest = ctx.i("largest", 1) != 0;
    let (outer, n, inner) = split_at_axis(t.shape(), axis);
    if k < 0 || k as usize > n {
        bail!("TopK: K={k} out of range for an axis of {n}");
    }
    let k = k as usize;
    let mut shape = t.shape().to_vec();
    shape[axis] = k;
    let dt = t.dtype();
    with_dtype!(dt, T => {
        let d = t.as_slice::<T>()?;
        let mut vals = vec![T::default(); outer * k * inner];
        let mut idxs = vec![0i64; outer * k * inner];
        let mut line: Vec<(f64, usize)> = Vec::with_capacity(n);
        for o in 0..outer {
            for i in 0..inner {
                let base = o * n * inner + i;
                line.clear();
                line.extend((0..n).map(|j| (d[base + j * inner].to_f64(), j)));
                // Stable sort: equal values keep the lower index first.
                if largest {
                    line.sort_by(|a, b| cmp_f64(b.0, a.0));
                } else {
                    line.sort_by(|a, b| cmp_f64(a.0, b.0));
                }
                for (j, &(_, src)) in line.iter().take(k).enumerate() {
                    let p = o * k * inner + j * inner + i;
                    vals[p] = d[base + src * inner];
                    idxs[p] = src as i64;
                }
            }
        }
        Ok(vec![
            Tensor::from_vec_dtype(dt, shape.clone(), vals)?,
            Tensor::from_vec(shape, idxs)?,
        ])
    })
}

fn non_zero(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let shape = t.shape();
    let r = shape.len();
    let nz: Vec<usize> = with_dtype!(t.dtype(), T => {
        t.as_slice::<T>()?.iter().enumerate().filter(|(_, x)| x.to_f64() != 0.0).map(|(i, _)| i).collect()
    });
    let n = nz.len();
    let mut out = vec![0i64; r * n];
    for (j, &flat) in nz.iter().enumerate() {
        let mut rem = flat;
        for ax in (0..r).rev() {
            out[ax * n + j] = (rem % shape[ax].max(1)) as i64;
            rem /= shape[ax].max(1);
        }
    }
    Ok(vec![Tensor::from_vec(vec![r, n], out)?])
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("ReduceSum", reduce_sum);
    r.add("ReduceMean", reduce_mean);
    r.add("ReduceMax", reduce_max);
    r.add("ReduceMin", reduce_min);
    r.add("ReduceProd", reduce_prod);
    r.add("ReduceL1", reduce_l1);
    r.add("ReduceL2", reduce_l2);
    r.add("ReduceLogSum", reduce_log_sum);
    r.add("ReduceLogSumExp", reduce_log_sum_exp);
    r.add("ReduceSumSquare", reduce_sum_square);
    r.add("ArgMax", arg_max);
    r.add("ArgMin", arg_min);
    r.add("CumSum", cum_sum);
    r.add("CumProd", cum_prod);
    r.add("TopK", top_k);
    r.add("NonZero", non_zero);
}

#[cfg(test)]
mod tests {
    use super::super::i64_tensor;
    use super::*;
    use edgehal_core::{Attr, Node};

    fn run(op: &str, attrs: Vec<(&str, Attr)>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let mut node = Node {
            op: op.into(),
            ..Default::default()
        };
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

    #[test]
    fn reduce_sum_and_mean_over_axes() {
        let x = Tensor::from_vec(vec![2, 3], vec![1f32, 2., 3., 4., 5., 6.]).unwrap();
        let ax = i64_tensor(vec![0]);
        let o = run("ReduceSum", vec![], &[Some(&x), Some(&ax)]).unwrap();
        assert_eq!(o[0].shape(), &[1, 3]);
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![5., 7., 9.]);
        let o = run(
            "ReduceMean",
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(0))],
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(o[0].shape(), &[2]);
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![2., 5.]);
        let o = run("ReduceMax", vec![("keepdims", Attr::Int(0))], &[Some(&x)]).unwrap();
        assert_eq!(o[0].shape(), &[] as &[usize]);
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![6.]);
        let empty = i64_tensor(vec![]);
        let o = run(
            "ReduceSumSquare",
            vec![("noop_with_empty_axes", Attr::Int(1))],
            &[Some(&x), Some(&empty)],
        )
        .unwrap();
        assert_eq!(
            o[0].to_vec::<f32>().unwrap(),
            vec![1., 4., 9., 16., 25., 36.]
        );
        let z = Tensor::zeros(DType::F32, vec![2, 0]).unwrap();
        let o = run("ReduceSum", vec![], &[Some(&z), Some(&i64_tensor(vec![1]))]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![0., 0.]);
    }

    #[test]
    fn argmax_topk_cumsum() {
        let x = Tensor::from_vec(vec![2, 3], vec![1i32, 5, 5, 7, 0, 7]).unwrap();
        let o = run("ArgMax", vec![("axis", Attr::Int(1))], &[Some(&x)]).unwrap();
        assert_eq!(o[0].to_vec::<i64>().unwrap(), vec![1, 0]);
        let o = run(
            "ArgMax",
            vec![("axis", Attr::Int(1)), ("select_last_index", Attr::Int(1))],
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<i64>().unwrap(), vec![2, 2]);
        let k = i64_tensor(vec![2]);
        let o = run("TopK", vec![], &[Some(&x), Some(&k)]).unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![5, 5, 7, 7]);
        assert_eq!(o[1].to_vec::<i64>().unwrap(), vec![1, 2, 0, 2]);
        let o = run(
            "TopK",
            vec![("largest", Attr::Int(0))],
            &[Some(&x), Some(&k)],
        )
        .unwrap();
        assert_eq!(o[1].to_vec::<i64>().unwrap(), vec![0, 1, 1, 0]);
        let ax = i64_tensor(vec![1]);
        let o = run(
            "CumSum",
            vec![("exclusive", Attr::Int(1)), ("reverse", Attr::Int(1))],
            &[Some(&x), Some(&ax)],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![10, 5, 0, 7, 7, 0]);
        let o = run("NonZero", vec![], &[Some(&x)]).unwrap();
        assert_eq!(o[0].shape(), &[2, 5]);
        assert_eq!(
            o[0].to_vec::<i64>().unwrap(),
            vec![0, 0, 0, 1, 1, 0, 1, 2, 0, 2]
        );
    }
}
