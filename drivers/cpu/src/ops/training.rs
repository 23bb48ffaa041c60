//! The optimizer ops of the `ai.onnx.preview.training` domain (Adagrad, Momentum, Adam): a
//! runtime on an edge box can fine-tune the last layers of a model with them.

// The updates walk several same-length arrays in lockstep; index loops read clearest.
#![allow(clippy::needless_range_loop)]

use edgehal_core::{Error, Result, Tensor};

use super::{input, OpCtx, Registry};

const DOMAIN: &str = "ai.onnx.preview.training";

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Adagrad", adagrad);
    r.add_domain(DOMAIN, "Momentum", momentum);
    r.add_domain(DOMAIN, "Adam", adam);
}

fn scalar(ins: &[Option<&Tensor>], i: usize) -> Result<f64> {
    input(ins, i)?
        .to_f64_vec()
        .first()
        .copied()
        .ok_or_else(|| Error::arg(format!("input {i} is empty")))
}

/// Inputs are R, T, then `groups` lists of n tensors each; returns the n-tuples.
fn groups<'a>(ins: &[Option<&'a Tensor>], groups: usize) -> Result<(usize, Vec<Vec<&'a Tensor>>)> {
    let rest = ins
        .len()
        .checked_sub(2)
        .filter(|r| r % groups == 0 && *r > 0)
        .ok_or_else(|| {
            Error::arg(format!(
                "expected R, T and {groups} equally long lists of tensors"
            ))
        })?;
    let n = rest / groups;
    let mut out = Vec::with_capacity(groups);
    for g in 0..groups {
        out.push(
            (0..n)
                .map(|i| input(ins, 2 + g * n + i))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    Ok((n, out))
}

fn same(t: &Tensor, v: Vec<f64>) -> Result<Tensor> {
    Tensor::from_vec(t.shape().to_vec(), v)?.cast(t.dtype())
}

fn adagrad(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (r, t) = (scalar(ins, 0)?, scalar(ins, 1)?);
    let (decay, eps, norm) = (
        ctx.f("decay_factor", 0.0) as f64,
        ctx.f("epsilon", 1e-6) as f64,
        ctx.f("norm_coefficient", 0.0) as f64,
    );
    let (n, g) = groups(ins, 3)?;
    let r_ = r / (1.0 + t * decay);
    let (mut xs, mut hs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (x, gr, h) = (
            g[0][i].to_f64_vec(),
            g[1][i].to_f64_vec(),
            g[2][i].to_f64_vec(),
        );
        let mut xn = Vec::with_capacity(x.len());
        let mut hn = Vec::with_capacity(x.len());
        for k in 0..x.len() {
            let greg = norm * x[k] + gr.get(k).copied().unwrap_or(0.0);
            let h2 = h.get(k).copied().unwrap_or(0.0) + greg * greg;
            xn.push(x[k] - r_ * greg / (h2.sqrt() + eps));
            hn.push(h2);
        }
        xs.push(same(g[0][i], xn)?);
        hs.push(same(g[2][i], hn)?);
    }
    xs.extend(hs);
    Ok(xs)
}

fn momentum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (r, t) = (scalar(ins, 0)?, scalar(ins, 1)?);
    let alpha = ctx
        .node
        .attr_f("alpha")
        .ok_or_else(|| Error::arg("attribute alpha is required"))? as f64;
    let beta = ctx
        .node
        .attr_f("beta")
        .ok_or_else(|| Error::arg("attribute beta is required"))? as f64;
    let norm = ctx.f("norm_coefficient", 0.0) as f64;
    let nesterov = match ctx.s("mode", "standard").as_str() {
        "standard" => false,
        "nesterov" => true,
        m => return Err(Error::arg(format!("unknown Momentum mode '{m}'"))),
    };
    let (n, g) = groups(ins, 3)?;
    let beta_adj = if t > 0.0 { beta } else { 1.0 };
    let (mut xs, mut vs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (x, gr, v) = (
            g[0][i].to_f64_vec(),
            g[1][i].to_f64_vec(),
            g[2][i].to_f64_vec(),
        );
        let mut xn = Vec::with_capacity(x.len());
        let mut vn = Vec::with_capacity(x.len());
        for k in 0..x.len() {
            let greg = norm * x[k] + gr.get(k).copied().unwrap_or(0.0);
            let v2 = alpha * v.get(k).copied().unwrap_or(0.0) + beta_adj * greg;
            xn.push(if nesterov {
                x[k] - r * (greg + alpha * v2)
            } else {
                x[k] - r * v2
            });
            vn.push(v2);
        }
        xs.push(same(g[0][i], xn)?);
        vs.push(same(g[2][i], vn)?);
    }
    xs.extend(vs);
    Ok(xs)
}

fn adam(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (r, t) = (scalar(ins, 0)?, scalar(ins, 1)?);
    let (alpha, beta, eps) = (
        ctx.f("alpha", 0.9) as f64,
        ctx.f("beta", 0.999) as f64,
        ctx.f("epsilon", 1e-6) as f64,
    );
    let (norm, post) = (
        ctx.f("norm_coefficient", 0.0) as f64,
        ctx.f("norm_coefficient_post", 0.0) as f64,
    );
    let (n, g) = groups(ins, 4)?;
    let r_adj = if t > 0.0 {
        r * (1.0 - beta.powf(t)).sqrt() / (1.0 - alpha.powf(t))
    } else {
        r
    };
    let (mut xs, mut vs, mut hs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (x, gr, v, h) = (
            g[0][i].to_f64_vec(),
            g[1][i].to_f64_vec(),
            g[2][i].to_f64_vec(),
            g[3][i].to_f64_vec(),
        );
        let (mut xn, mut vn, mut hn) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..x.len() {
            let greg = norm * x[k] + gr.get(k).copied().unwrap_or(0.0);
            let v2 = alpha * v.get(k).copied().unwrap_or(0.0) + (1.0 - alpha) * greg;
            let h2 = beta * h.get(k).copied().unwrap_or(0.0) + (1.0 - beta) * greg * greg;
            let x2 = x[k] - r_adj * (v2 / (h2.sqrt() + eps));
            xn.push((1.0 - post) * x2);
            vn.push(v2);
            hn.push(h2);
        }
        xs.push(same(g[0][i], xn)?);
        vs.push(same(g[2][i], vn)?);
        hs.push(same(g[3][i], hn)?);
    }
    xs.extend(vs);
    xs.extend(hs);
    Ok(xs)
}
