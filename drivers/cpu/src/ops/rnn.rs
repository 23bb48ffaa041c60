//! Ops: recurrent layers (RNN, GRU, LSTM) with ONNX semantics.
//!
//! - One routine runs all three: the input projection `X * W^T` for every time step is a single
//!   sgemm, and each step does one sgemm `H * R^T` for the whole batch.
//! - Computation is in f32; f16/f64 inputs are converted in and out. `layout = 1`
//!   (batch-major) is handled by transposing inputs and outputs around the time-major core.
//! - `sequence_lens` is honoured per batch entry: steps past the length leave `Y` at zero and the
//!   state unchanged, and a reverse direction runs over the first `len` steps reversed.

use edgehal_core::graph::Attr;
use edgehal_core::{Error, Result, Tensor};
use edgehal_kernels::gemm::{sgemm, MatRef};

use super::nn::{ftensor, fvec};
use super::{input, opt_input, OpCtx, Registry};
use crate::vmath;

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("RNN", rnn);
    r.add("GRU", gru);
    r.add("LSTM", lstm);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Rnn,
    Gru,
    Lstm,
}

impl Kind {
    fn gates(self) -> usize {
        match self {
            Kind::Rnn => 1,
            Kind::Gru => 3,
            Kind::Lstm => 4,
        }
    }
    fn n_act(self) -> usize {
        match self {
            Kind::Rnn => 1,
            Kind::Gru => 2,
            Kind::Lstm => 3,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Rnn => "RNN",
            Kind::Gru => "GRU",
            Kind::Lstm => "LSTM",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Relu,
    Tanh,
    Sigmoid,
    Affine(f32, f32),
    LeakyRelu(f32),
    ThresholdedRelu(f32),
    ScaledTanh(f32, f32),
    HardSigmoid(f32, f32),
    Elu(f32),
    Softsign,
    Softplus,
}

impl Act {
    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Tanh => x.tanh(),
            Act::Sigmoid => {
                if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                }
            }
            Act::Affine(a, b) => a * x + b,
            Act::LeakyRelu(a) => {
                if x < 0.0 {
                    a * x
                } else {
                    x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Elu(a) => {
                if x < 0.0 {
                    a * (x.exp() - 1.0)
                } else {
                    x
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => {
                if x > 30.0 {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }
}

/// The activation list for all directions (`n_act` per direction).
fn parse_acts(ctx: &OpCtx<'_>, kind: Kind, ndir: usize) -> Result<Vec<Act>> {
    let names: Vec<String> = match ctx.node.attr("activations") {
        Some(Attr::Strings(v)) => v
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        _ => {
            let d: &[&str] = match kind {
                Kind::Rnn => &["Tanh"],
                Kind::Gru => &["Sigmoid", "Tanh"],
                Kind::Lstm => &["Sigmoid", "Tanh", "Tanh"],
            };
            d.iter().map(|s| s.to_string()).collect()
        }
    };
    let names = if names.len() == kind.n_act() && ndir == 2 {
        [names.clone(), names].concat()
    } else {
        names
    };
    if names.len() != kind.n_act() * ndir {
        return Err(Error::arg(format!(
            "{}: {} activations given, expected {}",
            kind.name(),
            names.len(),
            kind.n_act() * ndir
        )));
    }
    let alphas = ctx.floats("activation_alpha").unwrap_or_default();
    let betas = ctx.floats("activation_beta").unwrap_or_default();
    let (mut ai, mut bi) = (0usize, 0usize);
    let mut alpha = |d: f32| {
        let v = alphas.get(ai).copied().unwrap_or(d);
        ai += 1;
        v
    };
    let mut beta = |d: f32| {
        let v = betas.get(bi).copied().unwrap_or(d);
        bi += 1;
        v
    };
    names
        .iter()
        .map(|n| {
            Ok(match n.to_ascii_lowercase().as_str() {
                "relu" => Act::Relu,
                "tanh" => Act::Tanh,
                "sigmoid" => Act::Sigmoid,
                "affine" => Act::Affine(alpha(1.0), beta(0.0)),
                "leakyrelu" => Act::LeakyRelu(alpha(0.01)),
                "thresholdedrelu" => Act::ThresholdedRelu(alpha(1.0)),
                "scaledtanh" => Act::ScaledTanh(alpha(1.0), beta(1.0)),
                "hardsigmoid" => Act::HardSigmoid(alpha(0.2), beta(0.5)),
                "elu" => Act::Elu(alpha(1.0)),
                "softsign" => Act::Softsign,
                "softplus" => Act::Softplus,
                o => {
                    return Err(Error::unsupported(format!(
                        "{}: activation {o}",
                        kind.name()
                    )))
                }
            })
        })
        .collect()
}

/// Swap the first two axes of a 3-d (or 4-d with trailing dims folded) f32 array.
fn swap01(v: &[f32], a: usize, b: usize, rest: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for i in 0..a {
        for j in 0..b {
            let src = (i * b + j) * rest;
            let dst = (j * a + i) * rest;
            out[dst..dst + rest].copy_from_slice(&v[src..src + rest]);
        }
    }
    out
}

fn expect_shape(t: &Tensor, want: &[usize], what: &str) -> Result<()> {
    if t.shape() != want {
        return Err(Error::arg(format!(
            "{what} has shape {:?}, expected {want:?}",
            t.shape()
        )));
    }
    Ok(())
}

/// Recurrent weights prepared once per session: `R` per direction in panels of [`PANEL`] gate
/// rows, so each step's `H * R^T` (batch <= 4) is a register-blocked matrix-vector product
/// streaming contiguous memory instead of an sgemm over a transposed view.
pub struct RnnPlan {
    kind: Kind,
    /// `R` of the node as the plan saw it, to check the run-time input is the same shape.
    r_shape: Vec<usize>,
    /// `R` per direction in panels of [`PANEL`] gate rows: `[gh / PANEL][hid][PANEL]`
    /// (the last panel zero-padded), for [`gemv_panels`].
    panels: Vec<f32>,
}

/// Gate rows per panel of [`RnnPlan::panels`]: 32 accumulators stay in vector registers.
const PANEL: usize = 32;

/// `y[j] = sum_k x[k] * R[j][k]` for `j < y.len()` from `R` in panels (see
/// [`RnnPlan::panels`]); `false` when a slice is too short.
fn gemv_panels(panels: &[f32], x: &[f32], y: &mut [f32]) -> bool {
    let k = x.len();
    for (pi, yb) in y.chunks_mut(PANEL).enumerate() {
        let Some(p) = panels.get(pi * k * PANEL..(pi + 1) * k * PANEL) else {
            return false;
        };
        let mut acc = [0f32; PANEL];
        for (row, &xv) in p.chunks_exact(PANEL).zip(x) {
            for l in 0..PANEL {
                acc[l] += xv * row[l];
            }
        }
        yb.copy_from_slice(&acc[..yb.len()]);
    }
    true
}

impl RnnPlan {
    /// A plan for an RNN/GRU/LSTM node whose `R` is a float initializer; `None` otherwise.
    pub fn new(node: &edgehal_core::Node, r: &Tensor) -> Option<RnnPlan> {
        let kind = match node.op.as_str() {
            "RNN" => Kind::Rnn,
            "GRU" => Kind::Gru,
            "LSTM" => Kind::Lstm,
            _ => return None,
        };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") || !r.dtype().is_float() {
            return None;
        }
        let [ndir, gh, hid] = *r.shape() else {
            return None;
        };
        let rv = r.to_f32();
        if rv.len() != ndir.checked_mul(gh)?.checked_mul(hid)? {
            return None;
        }
        let np = gh.div_ceil(PANEL);
        let mut panels = vec![0f32; ndir.checked_mul(np * PANEL)?.checked_mul(hid)?];
        for d in 0..ndir {
            let src = &rv[d * gh * hid..(d + 1) * gh * hid];
            let dst = &mut panels[d * np * PANEL * hid..(d + 1) * np * PANEL * hid];
            for g in 0..gh {
                let (pi, l) = (g / PANEL, g % PANEL);
                for k in 0..hid {
                    dst[(pi * hid + k) * PANEL + l] = src[g * hid + k];
                }
            }
        }
        Some(RnnPlan {
            kind,
            r_shape: r.shape().to_vec(),
            panels,
        })
    }

    /// Run the node with the prepared `R^T`.
    pub fn run(&self, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let r = input(ins, 2)?;
        if r.shape() != self.r_shape.as_slice() {
            return Err(Error::arg(format!(
                "{}: R has shape {:?}, prepared for {:?}",
                self.kind.name(),
                r.shape(),
                self.r_shape
            )));
        }
        run_with(self.kind, ctx, ins, Some(&self.panels))
    }
}

fn run(kind: Kind, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run_with(kind, ctx, ins, None)
}

/// The recurrence; `panels` is `R` in panels when prepared (see [`RnnPlan`]).
fn run_with(
    kind: Kind,
    ctx: &OpCtx<'_>,
    ins: &[Option<&Tensor>],
    panels: Option<&[f32]>,
) -> Result<Vec<Tensor>> {
    let name = kind.name();
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let r = input(ins, 2)?;
    if x.rank() != 3 || w.rank() != 3 || r.rank() != 3 {
        return Err(Error::arg(format!(
            "{name}: X {:?}, W {:?} and R {:?} must all be 3-d",
            x.shape(),
            w.shape(),
            r.shape()
        )));
    }
    let layout = ctx.i("layout", 0);
    let (seq, batch, inp) = if layout == 0 {
        (x.shape()[0], x.shape()[1], x.shape()[2])
    } else {
        (x.shape()[1], x.shape()[0], x.shape()[2])
    };
    let direction = ctx.s("direction", "forward");
    let ndir = match direction.as_str() {
        "forward" | "reverse" => 1,
        "bidirectional" => 2,
        o => return Err(Error::arg(format!("{name}: unknown direction {o}"))),
    };
    let g = kind.gates();
    let hid = match ctx.node.attr_i("hidden_size") {
        Some(h) if h > 0 => h as usize,
        _ => r.shape()[2],
    };
    let gh = g * hid;
    expect_shape(w, &[ndir, gh, inp], &format!("{name} W"))?;
    expect_shape(r, &[ndir, gh, hid], &format!("{name} R"))?;
    let acts = parse_acts(ctx, kind, ndir)?;
    let clip = ctx.node.attr_f("clip");
    let cl = |v: f32| match clip {
        Some(c) => v.clamp(-c, c),
        None => v,
    };
    let linear_before_reset = ctx.i("linear_before_reset", 0) != 0;
    let input_forget = ctx.i("input_forget", 0) != 0;

    let xv = fvec(x, &format!("{name} X"))?;
    let xv: Vec<f32> = if layout == 0 {
        xv.into_owned()
    } else {
        swap01(&xv, batch, seq, inp)
    };
    let wv = fvec(w, &format!("{name} W"))?;
    let rv = fvec(r, &format!("{name} R"))?;
    let bv: Vec<f32> = match opt_input(ins, 3) {
        Some(b) => {
            expect_shape(b, &[ndir, 2 * gh], &format!("{name} B"))?;
            fvec(b, "B")?.into_owned()
        }
        None => vec![0.0; ndir * 2 * gh],
    };
    let lens: Vec<usize> = match opt_input(ins, 4) {
        Some(l) => {
            let v = l.to_i64_vec();
            if v.len() != batch || v.iter().any(|&s| s < 0 || s as usize > seq) {
                return Err(Error::arg(format!(
                    "{name}: sequence_lens {v:?} must have {batch} entries in 0..={seq}"
                )));
            }
            v.into_iter().map(|s| s as usize).collect()
        }
        None => vec![seq; batch],
    };
    let state = |i: usize, what: &str| -> Result<Vec<f32>> {
        match opt_input(ins, i) {
            Some(t) => {
                let want = if layout == 0 {
                    [ndir, batch, hid]
                } else {
                    [batch, ndir, hid]
                };
                expect_shape(t, &want, &format!("{name} {what}"))?;
                let v = fvec(t, what)?;
                Ok(if layout == 0 {
                    v.into_owned()
                } else {
                    swap01(&v, batch, ndir, hid)
                })
            }
            None => Ok(vec![0.0; ndir * batch * hid]),
        }
    };
    let h0 = state(5, "initial_h")?;
    let c0 = if kind == Kind::Lstm {
        state(6, "initial_c")?
    } else {
        Vec::new()
    };
    let pv: Vec<f32> = match (kind, opt_input(ins, 7)) {
        (Kind::Lstm, Some(p)) => {
            expect_shape(p, &[ndir, 3 * hid], &format!("{name} P"))?;
            fvec(p, "P")?.into_owned()
        }
        _ => vec![0.0; ndir * 3 * hid],
    };

    // The default LSTM activations run vectorized on whole gate slices (see `lstm_cell`).
    let lstm_fast = kind == Kind::Lstm
        && acts
            .chunks(3)
            .all(|a| a == [Act::Sigmoid, Act::Tanh, Act::Tanh]);
    let mut y = vec![0f32; seq * ndir * batch * hid];
    let mut yh = vec![0f32; ndir * batch * hid];
    let mut yc = vec![0f32; ndir * batch * hid];
    let mut xw = vec![0f32; seq * batch * gh];
    let mut hr = vec![0f32; batch * gh];
    for d in 0..ndir {
        let reverse = direction == "reverse" || d == 1;
        let wd = &wv[d * gh * inp..(d + 1) * gh * inp];
        let rd = &rv[d * gh * hid..(d + 1) * gh * hid];
        let wb = &bv[d * 2 * gh..d * 2 * gh + gh];
        let rb = &bv[d * 2 * gh + gh..(d + 1) * 2 * gh];
        let pd = &pv[d * 3 * hid..(d + 1) * 3 * hid];
        let acts = &acts[d * kind.n_act()..(d + 1) * kind.n_act()];
        if !sgemm(
            1.0,
            MatRef::row_major(&xv, seq * batch, inp),
            MatRef::row_major(wd, gh, inp).t(),
            0.0,
            &mut xw,
            gh,
        ) {
            return Err(Error::arg(format!("{name}: X and W do not fit")));
        }
        if lstm_fast {
            // Fold both biases into the input projection once, not per step and gate.
            for row in xw.chunks_exact_mut(gh) {
                for ((v, &a), &b) in row.iter_mut().zip(wb).zip(rb) {
                    *v += a + b;
                }
            }
        }
        let mut h = h0[d * batch * hid..(d + 1) * batch * hid].to_vec();
        let mut c = if kind == Kind::Lstm {
            c0[d * batch * hid..(d + 1) * batch * hid].to_vec()
        } else {
            Vec::new()
        };
        let mut tmp = vec![0f32; hid];
        let mut gates = vec![0f32; gh];
        let (mut z, mut rg) = (vec![0f32; hid], vec![0f32; hid]);
        for step in 0..seq {
            let np = gh.div_ceil(PANEL) * PANEL * hid;
            let prepared = panels.and_then(|p| p.get(d * np..(d + 1) * np));
            let ok = match prepared {
                // Few rows: one register-blocked matrix-vector product per batch entry.
                Some(pd) if batch <= 4 => h
                    .chunks_exact(hid)
                    .zip(hr.chunks_exact_mut(gh))
                    .all(|(hb, ob)| gemv_panels(pd, hb, ob)),
                _ => sgemm(
                    1.0,
                    MatRef::row_major(&h, batch, hid),
                    MatRef::row_major(rd, gh, hid).t(),
                    0.0,
                    &mut hr,
                    gh,
                ),
            };
            if !ok {
                return Err(Error::arg(format!("{name}: H and R do not fit")));
            }
            for b in 0..batch {
                let len = lens[b];
                if step >= len {
                    continue;
                }
                let t = if reverse { len - 1 - step } else { step };
                let xg = &xw[(t * batch + b) * gh..(t * batch + b + 1) * gh];
                let hg = &hr[b * gh..(b + 1) * gh];
                let hb = &mut h[b * hid..(b + 1) * hid];
                match kind {
                    Kind::Rnn => {
                        for j in 0..hid {
                            hb[j] = acts[0].apply(cl(xg[j] + wb[j] + hg[j] + rb[j]));
                        }
                    }
                    Kind::Gru => {
                        // gates z, r, h
                        let (f, gact) = (acts[0], acts[1]);
                        for j in 0..hid {
                            z[j] = f.apply(cl(xg[j] + wb[j] + hg[j] + rb[j]));
                            let k = hid + j;
                            rg[j] = f.apply(cl(xg[k] + wb[k] + hg[k] + rb[k]));
                        }
                        let rh = &rd[2 * hid * hid..3 * hid * hid];
                        if linear_before_reset {
                            for j in 0..hid {
                                let k = 2 * hid + j;
                                tmp[j] = gact.apply(cl(xg[k] + wb[k] + rg[j] * (hg[k] + rb[k])));
                            }
                        } else {
                            for j in 0..hid {
                                let k = 2 * hid + j;
                                let row = &rh[j * hid..(j + 1) * hid];
                                let s: f32 = row
                                    .iter()
                                    .zip(hb.iter())
                                    .zip(&rg)
                                    .map(|((&wr, &hp), &rr)| wr * rr * hp)
                                    .sum();
                                tmp[j] = gact.apply(cl(xg[k] + wb[k] + s + rb[k]));
                            }
                        }
                        for j in 0..hid {
                            hb[j] = (1.0 - z[j]) * tmp[j] + z[j] * hb[j];
                        }
                    }
                    Kind::Lstm if lstm_fast => {
                        let cb = &mut c[b * hid..(b + 1) * hid];
                        lstm_cell(xg, hg, pd, clip, input_forget, &mut gates, cb, hb);
                    }
                    Kind::Lstm => {
                        // gates i, o, f, c; peepholes i, o, f
                        let (f, gact, hact) = (acts[0], acts[1], acts[2]);
                        let cb = &mut c[b * hid..(b + 1) * hid];
                        for j in 0..hid {
                            let pre = |k: usize| xg[k] + wb[k] + hg[k] + rb[k];
                            let cp = cb[j];
                            let ig = f.apply(cl(pre(j) + pd[j] * cp));
                            let fg = if input_forget {
                                1.0 - ig
                            } else {
                                f.apply(cl(pre(2 * hid + j) + pd[2 * hid + j] * cp))
                            };
                            let cc = gact.apply(cl(pre(3 * hid + j)));
                            let cn = fg * cp + ig * cc;
                            let og = f.apply(cl(pre(hid + j) + pd[hid + j] * cn));
                            cb[j] = cn;
                            hb[j] = og * hact.apply(cn);
                        }
                    }
                }
                let yo = ((t * ndir + d) * batch + b) * hid;
                y[yo..yo + hid].copy_from_slice(hb);
            }
        }
        yh[d * batch * hid..(d + 1) * batch * hid].copy_from_slice(&h);
        if kind == Kind::Lstm {
            yc[d * batch * hid..(d + 1) * batch * hid].copy_from_slice(&c);
        }
    }
    let dt = x.dtype();
    let (y, yshape, yh, yc, hshape) = if layout == 0 {
        (
            y,
            vec![seq, ndir, batch, hid],
            yh,
            yc,
            vec![ndir, batch, hid],
        )
    } else {
        // [seq, ndir, batch, hid] -> [batch, seq, ndir, hid]
        let mut yt = vec![0f32; y.len()];
        for t in 0..seq {
            for d in 0..ndir {
                for b in 0..batch {
                    let src = ((t * ndir + d) * batch + b) * hid;
                    let dst = ((b * seq + t) * ndir + d) * hid;
                    yt[dst..dst + hid].copy_from_slice(&y[src..src + hid]);
                }
            }
        }
        (
            yt,
            vec![batch, seq, ndir, hid],
            swap01(&yh, ndir, batch, hid),
            if kind == Kind::Lstm {
                swap01(&yc, ndir, batch, hid)
            } else {
                yc
            },
            vec![batch, ndir, hid],
        )
    };
    let mut out = vec![ftensor(dt, yshape, y)?, ftensor(dt, hshape.clone(), yh)?];
    if kind == Kind::Lstm {
        out.push(ftensor(dt, hshape, yc)?);
    }
    Ok(out)
}

/// One LSTM step for one batch entry with the default activations (sigmoid, tanh, tanh):
/// `xg` is the input projection with both biases added, `hg` is `H * R^T`, both `4 * hid` in
/// gate order i, o, f, c; `p` the peepholes (i, o, f); `c` and `h` the state, updated in place.
#[allow(clippy::too_many_arguments)]
fn lstm_cell(
    xg: &[f32],
    hg: &[f32],
    p: &[f32],
    clip: Option<f32>,
    input_forget: bool,
    gates: &mut [f32],
    c: &mut [f32],
    h: &mut [f32],
) {
    let hid = c.len();
    for ((g, &a), &b) in gates.iter_mut().zip(xg).zip(hg) {
        *g = a + b;
    }
    let (gi, rest) = gates.split_at_mut(hid);
    let (go, rest) = rest.split_at_mut(hid);
    let (gf, gc) = rest.split_at_mut(hid);
    let (pi, rest) = p.split_at(hid);
    let (po, pf) = rest.split_at(hid);
    for j in 0..hid {
        gi[j] += pi[j] * c[j];
        gf[j] += pf[j] * c[j];
    }
    if let Some(cl) = clip {
        for v in gi.iter_mut().chain(gf.iter_mut()).chain(gc.iter_mut()) {
            *v = v.clamp(-cl, cl);
        }
    }
    vmath::sigmoid_inplace(gi);
    if input_forget {
        for (f, &i) in gf.iter_mut().zip(gi.iter()) {
            *f = 1.0 - i;
        }
    } else {
        vmath::sigmoid_inplace(gf);
    }
    vmath::tanh_inplace(gc);
    for j in 0..hid {
        let cn = gf[j] * c[j] + gi[j] * gc[j];
        c[j] = cn;
        go[j] += po[j] * cn;
    }
    if let Some(cl) = clip {
        for v in go.iter_mut() {
            *v = v.clamp(-cl, cl);
        }
    }
    vmath::sigmoid_inplace(go);
    h.copy_from_slice(c);
    vmath::tanh_inplace(h);
    for (hv, &o) in h.iter_mut().zip(go.iter()) {
        *hv *= o;
    }
}

fn rnn(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(Kind::Rnn, ctx, ins)
}
fn gru(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(Kind::Gru, ctx, ins)
}
fn lstm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(Kind::Lstm, ctx, ins)
}

#[cfg(test)]
mod tests {
    use super::super::nn::test_util::*;
    use edgehal_core::graph::Attr;

    #[test]
    fn bidirectional_lstm_matches_hand_computation() {
        // hidden 1, input 1, seq 2, batch 1; all weights 1 except W_c = 0.5; no bias.
        // Gates order i, o, f, c.
        let x = t(&[2, 1, 1], &[1.0, -1.0]);
        let w = t(&[2, 4, 1], &[1., 1., 1., 0.5, 1., 1., 1., 0.5]);
        let r = t(&[2, 4, 1], &[0.0; 8]);
        let y = run_op(
            "LSTM",
            14,
            vec![
                ("hidden_size", Attr::Int(1)),
                ("direction", Attr::String(b"bidirectional".to_vec())),
            ],
            &[Some(&x), Some(&w), Some(&r)],
            3,
        )
        .unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let cell = |xv: f32, c: f32| {
            let (i, o, f, g) = (sig(xv), sig(xv), sig(xv), (0.5 * xv).tanh());
            let cn = f * c + i * g;
            (o * cn.tanh(), cn)
        };
        // forward: x=1 then x=-1
        let (h1, c1) = cell(1.0, 0.0);
        let (h2, c2) = cell(-1.0, c1);
        // reverse: x=-1 (t=1) then x=1 (t=0)
        let (r1, rc1) = cell(-1.0, 0.0);
        let (r2, rc2) = cell(1.0, rc1);
        assert_eq!(y[0].shape(), &[2, 2, 1, 1]);
        close(&y[0].to_vec::<f32>().unwrap(), &[h1, r2, h2, r1]);
        close(&y[1].to_vec::<f32>().unwrap(), &[h2, r2]);
        close(&y[2].to_vec::<f32>().unwrap(), &[c2, rc2]);
    }

    #[test]
    fn prepared_lstm_equals_the_unprepared_op() {
        use edgehal_core::Node;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * s + 1) % 23) as f32 * 0.05 - 0.55)
                .collect()
        };
        // hid 37 leaves a partly filled panel; batch 2 takes the panel GEMV, batch 6 the sgemm.
        for (batch, dir, clip) in [(2, "forward", None), (6, "bidirectional", Some(0.8f32))] {
            let (seq, inp, hid) = (5, 9, 37);
            let nd = if dir == "bidirectional" { 2 } else { 1 };
            let x = t(&[seq, batch, inp], &vals(seq * batch * inp, 3));
            let w = t(&[nd, 4 * hid, inp], &vals(nd * 4 * hid * inp, 5));
            let r = t(&[nd, 4 * hid, hid], &vals(nd * 4 * hid * hid, 7));
            let b = t(&[nd, 8 * hid], &vals(nd * 8 * hid, 11));
            let h0 = t(&[nd, batch, hid], &vals(nd * batch * hid, 13));
            let c0 = t(&[nd, batch, hid], &vals(nd * batch * hid, 17));
            let p = t(&[nd, 3 * hid], &vals(nd * 3 * hid, 19));
            let mut attrs = vec![
                ("hidden_size", Attr::Int(hid as i64)),
                ("direction", Attr::String(dir.as_bytes().to_vec())),
            ];
            if let Some(c) = clip {
                attrs.push(("clip", Attr::Float(c)));
            }
            let ins = [
                Some(&x),
                Some(&w),
                Some(&r),
                Some(&b),
                None,
                Some(&h0),
                Some(&c0),
                Some(&p),
            ];
            let want = run_op("LSTM", 14, attrs.clone(), &ins, 3).unwrap();
            let node = Node {
                op: "LSTM".into(),
                attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                ..Default::default()
            };
            let plan = super::RnnPlan::new(&node, &r).expect("plan");
            let ctx = super::OpCtx {
                node: &node,
                opset: 14,
                subgraph: None,
                dest: None,
            };
            let got = plan.run(&ctx, &ins).unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.shape(), b.shape());
                close(&b.to_vec::<f32>().unwrap(), &a.to_vec::<f32>().unwrap());
            }
            // A different R shape at run time is refused.
            let r2 = t(&[nd, 4 * hid, hid - 1], &vals(nd * 4 * hid * (hid - 1), 7));
            let mut bad = ins;
            bad[2] = Some(&r2);
            assert!(plan.run(&ctx, &bad).is_err());
        }
    }

    #[test]
    fn lstm_fast_cell_matches_scalar_formulas() {
        // hid 3, one step, peepholes and clip, against the formulas written out in f64.
        let (xg, hg) = (
            [
                0.3f32, -1.2, 2.5, 0.1, 0.7, -0.4, 1.1, -2.2, 0.05, 3.0, -0.6, 0.9,
            ],
            [0.1f32; 12],
        );
        let p = [0.2f32, -0.1, 0.3, 0.05, 0.4, -0.2, 0.1, 0.1, 0.1];
        let (mut c, mut h, mut g) = ([0.5f32, -0.3, 0.8], [0f32; 3], [0f32; 12]);
        let c_prev = c;
        super::lstm_cell(&xg, &hg, &p, Some(2.0), false, &mut g, &mut c, &mut h);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let cl = |v: f64| v.clamp(-2.0, 2.0);
        for j in 0..3 {
            let pre = |k: usize| (xg[k] + hg[k]) as f64;
            let cp = c_prev[j] as f64;
            let i = sig(cl(pre(j) + p[j] as f64 * cp));
            let f = sig(cl(pre(6 + j) + p[6 + j] as f64 * cp));
            let cc = cl(pre(9 + j)).tanh();
            let cn = f * cp + i * cc;
            let o = sig(cl(pre(3 + j) + p[3 + j] as f64 * cn));
            assert!((c[j] as f64 - cn).abs() < 1e-6, "c[{j}]");
            assert!((h[j] as f64 - o * cn.tanh()).abs() < 1e-6, "h[{j}]");
        }
    }

    #[test]
    fn rnn_sequence_lens_hold_state_and_zero_y() {
        // hidden 1: h_t = tanh(x_t + h_{t-1}), batch 2 with lengths 2 and 1.
        let x = t(&[2, 2, 1], &[0.5, 1.0, 0.25, 9.0]);
        let w = t(&[1, 1, 1], &[1.0]);
        let r = t(&[1, 1, 1], &[1.0]);
        let lens = edgehal_core::Tensor::from_vec(vec![2], vec![2i32, 1]).unwrap();
        let y = run_op(
            "RNN",
            14,
            vec![("hidden_size", Attr::Int(1))],
            &[Some(&x), Some(&w), Some(&r), None, Some(&lens)],
            2,
        )
        .unwrap();
        let a1 = 0.5f32.tanh();
        let a2 = (0.25 + a1).tanh();
        let b1 = 1.0f32.tanh();
        close(&y[0].to_vec::<f32>().unwrap(), &[a1, b1, a2, 0.0]);
        close(&y[1].to_vec::<f32>().unwrap(), &[a2, b1]);
    }
}
