//! Control flow: If, Loop, Scan. Bodies run through the executor's subgraph runner, which
//! resolves names the body captures from the enclosing scope.

use edgehal_core::{DType, Error, Graph, Result, Tensor};

use super::{input, norm_axis, opt_input, OpCtx, Registry};

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("If", if_op);
    r.add("Loop", loop_op);
    r.add("Scan", scan);
}

fn body<'a>(ctx: &'a OpCtx<'_>, name: &str) -> Result<&'a Graph> {
    ctx.node
        .attr_g(name)
        .ok_or_else(|| Error::arg(format!("missing graph attribute '{name}'")))
}

fn run_body(ctx: &OpCtx<'_>, g: &Graph, args: &[Tensor]) -> Result<Vec<Tensor>> {
    let f = ctx
        .subgraph
        .ok_or_else(|| Error::unsupported("subgraphs cannot run in this context"))?;
    f(g, args)
}

fn truthy(t: &Tensor) -> Result<bool> {
    if t.len() != 1 {
        return Err(Error::arg(format!(
            "condition must have one element, got shape {:?}",
            t.shape()
        )));
    }
    Ok(t.to_f64_vec().first().copied().unwrap_or(0.0) != 0.0)
}

fn if_op(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let c = truthy(input(ins, 0)?)?;
    let g = body(ctx, if c { "then_branch" } else { "else_branch" })?;
    run_body(ctx, g, &[])
}

/// Stack equally shaped tensors along a new leading axis.
pub fn stack(parts: &[Tensor], dtype: DType, elem_shape: &[usize]) -> Result<Tensor> {
    let mut bytes = Vec::new();
    for p in parts {
        if p.shape() != elem_shape || p.dtype() != dtype {
            return Err(Error::arg(format!(
                "scan output changes shape across iterations: {:?} vs {elem_shape:?}",
                p.shape()
            )));
        }
        bytes.extend_from_slice(p.bytes());
    }
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(elem_shape);
    Tensor::from_bytes(dtype, shape, bytes.into())
}

/// Move axis 0 of `t` to position `axis`.
fn move_leading_axis(t: &Tensor, axis: usize) -> Result<Tensor> {
    if axis == 0 {
        return Ok(t.clone());
    }
    let r = t.rank();
    let mut perm: Vec<usize> = (1..r).collect();
    perm.insert(axis, 0);
    permute(t, &perm)
}

/// Materialised transpose.
pub fn permute(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    edgehal_core::with_dtype!(t.dtype(), T => {
        let v = t.view::<T>()?.permute(perm)?;
        let shape = v.shape().to_vec();
        Tensor::from_vec_dtype(t.dtype(), shape, v.to_vec())
    })
}

/// Slice `t` at index `i` along `axis`, dropping the axis.
fn take(t: &Tensor, axis: usize, i: usize) -> Result<Tensor> {
    edgehal_core::with_dtype!(t.dtype(), T => {
        let v = t.view::<T>()?.slice_axis(axis, i, 1, 1)?;
        let mut shape = v.shape().to_vec();
        shape.remove(axis);
        Tensor::from_vec_dtype(t.dtype(), shape, v.to_vec())
    })
}

fn loop_op(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let g = body(ctx, "body")?;
    let max_trip = opt_input(ins, 0).map(|t| t.to_i64_vec().first().copied().unwrap_or(0));
    let mut cond = match opt_input(ins, 1) {
        Some(t) => truthy(t)?,
        None => true,
    };
    let mut carried: Vec<Tensor> = Vec::new();
    for k in 2..ins.len() {
        carried.push(input(ins, k)?.clone());
    }
    let n_carried = carried.len();
    let n_scan = g
        .outputs
        .len()
        .checked_sub(1 + n_carried)
        .ok_or_else(|| Error::arg("Loop body has too few outputs"))?;
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    while cond && max_trip.is_none_or(|m| i < m) {
        let mut args = vec![Tensor::scalar(i), Tensor::from_bools(vec![], vec![cond])?];
        args.extend(carried.iter().cloned());
        // Bodies may declare fewer inputs when cond/iteration are unused names; keep the order.
        let outs = run_body(ctx, g, &args[..g.inputs.len().min(args.len())])?;
        if outs.len() != 1 + n_carried + n_scan {
            return Err(Error::arg("Loop body returned the wrong number of outputs"));
        }
        cond = truthy(&outs[0])?;
        carried = outs[1..1 + n_carried].to_vec();
        for (s, t) in scans.iter_mut().zip(&outs[1 + n_carried..]) {
            s.push(t.clone());
        }
        i += 1;
        if i > 100_000_000 {
            return Err(Error::arg("Loop ran more than 1e8 iterations"));
        }
    }
    let mut out = carried;
    for (k, s) in scans.into_iter().enumerate() {
        let t = if let Some(first) = s.first() {
            stack(&s, first.dtype(), first.shape())?
        } else {
            // No iteration ran: an empty scan output; take dtype from the body's declaration.
            let vid = g.outputs[1 + n_carried + k];
            let dt = g.values[vid].dtype.unwrap_or(DType::F32);
            let shape: Vec<usize> = std::iter::once(0)
                .chain(
                    g.values[vid]
                        .shape
                        .iter()
                        .flatten()
                        .map(|d| d.fixed().unwrap_or(0)),
                )
                .collect();
            Tensor::zeros(dt, shape)?
        };
        out.push(t);
    }
    Ok(out)
}

fn scan(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    if ctx.opset < 9 {
        return Err(Error::unsupported("Scan before opset 9 (batched form)"));
    }
    let g = body(ctx, "body")?;
    let m = ctx.i("num_scan_inputs", 0).max(0) as usize;
    let n_in = ins.len();
    let n_state = n_in
        .checked_sub(m)
        .ok_or_else(|| Error::arg("Scan: num_scan_inputs exceeds inputs"))?;
    let mut states: Vec<Tensor> = (0..n_state)
        .map(|k| input(ins, k).cloned())
        .collect::<Result<_>>()?;
    let scan_ins: Vec<&Tensor> = (n_state..n_in)
        .map(|k| input(ins, k))
        .collect::<Result<_>>()?;
    let in_axes = ctx.ints("scan_input_axes").unwrap_or_else(|| vec![0; m]);
    let in_dirs = ctx
        .ints("scan_input_directions")
        .unwrap_or_else(|| vec![0; m]);
    let n_out_scan = g
        .outputs
        .len()
        .checked_sub(n_state)
        .ok_or_else(|| Error::arg("Scan body has too few outputs"))?;
    let out_axes = ctx
        .ints("scan_output_axes")
        .unwrap_or_else(|| vec![0; n_out_scan]);
    let out_dirs = ctx
        .ints("scan_output_directions")
        .unwrap_or_else(|| vec![0; n_out_scan]);
    if in_axes.len() != m
        || in_dirs.len() != m
        || out_axes.len() != n_out_scan
        || out_dirs.len() != n_out_scan
    {
        return Err(Error::arg(
            "Scan: axis/direction attribute lengths do not match the inputs/outputs",
        ));
    }
    let axes: Vec<usize> = scan_ins
        .iter()
        .zip(&in_axes)
        .map(|(t, &a)| norm_axis(a, t.rank()))
        .collect::<Result<_>>()?;
    let len = match scan_ins.first() {
        Some(t) => t.shape()[axes[0]],
        None => 0,
    };
    for (t, &a) in scan_ins.iter().zip(&axes) {
        if t.shape()[a] != len {
            return Err(Error::arg(
                "Scan: scan inputs have different sequence lengths",
            ));
        }
    }
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); n_out_scan];
    for it in 0..len {
        let mut args = states.clone();
        for (k, t) in scan_ins.iter().enumerate() {
            let i = if in_dirs[k] != 0 { len - 1 - it } else { it };
            args.push(take(t, axes[k], i)?);
        }
        let res = run_body(ctx, g, &args)?;
        if res.len() != n_state + n_out_scan {
            return Err(Error::arg("Scan body returned the wrong number of outputs"));
        }
        states = res[..n_state].to_vec();
        for (o, t) in outs.iter_mut().zip(&res[n_state..]) {
            o.push(t.clone());
        }
    }
    let mut result = states;
    for (k, mut parts) in outs.into_iter().enumerate() {
        if out_dirs[k] != 0 {
            parts.reverse();
        }
        let first = parts
            .first()
            .ok_or_else(|| Error::unsupported("Scan over an empty sequence"))?;
        let (dt, shape) = (first.dtype(), first.shape().to_vec());
        let stacked = stack(&parts, dt, &shape)?;
        let axis = norm_axis(out_axes[k], stacked.rank())?;
        result.push(move_leading_axis(&stacked, axis)?);
    }
    Ok(result)
}
