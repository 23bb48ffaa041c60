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
use edgehal_kernels::gemv::{gemv, gemv_many, gemv_ordered, GemvAdd, PackedGemv};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::nn::{ftensor, fvec};
use super::{input, opt_input, OpCtx, Registry};

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

/// Weights prepared once per session: `R` per direction packed for [`gemv`], so each step's
/// `H * R^T` (batch <= 4) is a matrix-vector product per batch entry streaming contiguous
/// panels instead of an sgemm over a transposed view; for an LSTM whose `W` is constant too,
/// the batch-1 steps run on [`Chunks`]: the gate rows of each chunk of hidden units packed
/// on their own, so a step is one product and one fused cell per chunk, chunks shared out to
/// threads (see [`lstm_batch1`]).
pub struct RnnPlan {
    kind: Kind,
    /// `R` of the node as the plan saw it, to check the run-time input is the same shape.
    r_shape: Vec<usize>,
    /// `R` per direction.
    r: Vec<PackedGemv>,
    /// `W`'s shape and the per-chunk weights (LSTM with a constant `W`).
    wr: Option<(Vec<usize>, Chunks)>,
    /// Step work (`gate rows * (input + hidden)`) from which batch-1 steps are shared out to
    /// threads (a smaller step does not pay for the per-step hand-off).
    split_min_work: usize,
}

/// Hidden units per chunk for `hid` units: up to four chunks of at least 64 units (a multiple
/// of 16, so a chunk is whole 64-row groups of the packed GEMV); `EDGEHAL_RNN_CHUNK` (a
/// multiple of 16) overrides it. Fewer chunks cost fewer calls per step; threads share the
/// chunks, so more than one lets two threads split a step.
fn chunk_units(hid: usize) -> usize {
    std::env::var("EDGEHAL_RNN_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v > 0 && v % 16 == 0)
        .unwrap_or_else(|| hid.div_ceil((hid / 64).clamp(1, 4)).next_multiple_of(16))
}

/// Whether threads alternate the order of their chunks and groups step by step (see
/// [`lstm_batch1`]); `EDGEHAL_RNN_ALTERNATE=0` turns it off.
fn alternate_order() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_RNN_ALTERNATE").map_or(true, |v| v != "0"))
}

/// Batch-1 LSTM weights per direction and chunk of hidden units `u0..u1`: the
/// chunk's rows of the four gates stacked (`i`, `o`, `f`, `c`, `u1 - u0` rows each), so its
/// product is the pre-activation block [`edgehal_kernels::rnn::lstm_cell`] takes.
struct Chunks {
    /// `Hoist`: `W` and `R` rows apart (the input projection of every step runs as one
    /// [`gemv_many`] before the steps, then a step streams `R` only); `Join`: `[W | R]` rows,
    /// one product of `[x_t; h]` per step.
    hoist: bool,
    /// Hidden units per chunk (the last may have fewer).
    units: usize,
    /// `[direction][chunk]`: `R` rows (hoist) or `[W | R]` rows (join).
    step: Vec<Vec<PackedGemv>>,
    /// `[direction][chunk]`: `W` rows (hoist only).
    proj: Vec<Vec<PackedGemv>>,
    /// Per thread of a run: the buffer of its hoisted projections, kept between runs (no
    /// allocation, zeroing or page faults per run; a run that finds one busy allocates).
    scratch: Vec<Mutex<Vec<f32>>>,
}

/// Whether the input projection is hoisted out of the steps for an input of `inp` values
/// (`EDGEHAL_RNN_HOIST=0|1` forces it): only where [`gemv_many`] has its multi-vector kernel
/// (AVX-512), where it reads `W` once per six steps instead of once per step.
fn hoist_projection(inp: usize) -> bool {
    match std::env::var("EDGEHAL_RNN_HOIST").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => {
            edgehal_kernels::dispatch::selected() == edgehal_kernels::dispatch::Variant::Avx512
                && inp >= 1
        }
    }
}

impl RnnPlan {
    /// A plan for an RNN/GRU/LSTM node whose `R` is a float initializer (`w`: its `W` when
    /// that is an initializer too); `None` otherwise.
    pub fn new(node: &edgehal_core::Node, r: &Tensor, w: Option<&Tensor>) -> Option<RnnPlan> {
        Self::with_chunk(node, r, w, None, None)
    }

    /// [`RnnPlan::new`] with `units` hidden units per batch-1 chunk (default: [`chunk_units`])
    /// and the input projection hoisted or not (default: [`hoist_projection`]).
    fn with_chunk(
        node: &edgehal_core::Node,
        r: &Tensor,
        w: Option<&Tensor>,
        units: Option<usize>,
        hoist: Option<bool>,
    ) -> Option<RnnPlan> {
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
        let rd = |d: usize| MatRef::row_major(&rv[d * gh * hid..(d + 1) * gh * hid], gh, hid);
        let packed = (0..ndir)
            .map(|d| PackedGemv::new(rd(d)))
            .collect::<Option<Vec<_>>>()?;
        let wr = match (kind, w) {
            (Kind::Lstm, Some(w)) if w.dtype().is_float() && w.rank() == 3 && gh == 4 * hid => {
                let [wn, wg, inp] = *w.shape() else {
                    return None;
                };
                let wv = w.to_f32();
                if wn != ndir || wg != gh || wv.len() != ndir * gh * inp {
                    None
                } else {
                    let hoist = hoist.unwrap_or_else(|| hoist_projection(inp));
                    let units = units.unwrap_or_else(|| chunk_units(hid)).max(1);
                    // The chunk's rows of a `[gh][cols]` matrix, gates stacked.
                    let rows = |m: &[f32], cols: usize, u0: usize, u1: usize| -> Vec<f32> {
                        (0..4)
                            .flat_map(|g| &m[(g * hid + u0) * cols..(g * hid + u1) * cols])
                            .copied()
                            .collect()
                    };
                    let mut step = Vec::with_capacity(ndir);
                    let mut proj = Vec::with_capacity(ndir);
                    for d in 0..ndir {
                        let wd = &wv[d * gh * inp..(d + 1) * gh * inp];
                        let rdv = &rv[d * gh * hid..(d + 1) * gh * hid];
                        let (mut sd, mut pd) = (Vec::new(), Vec::new());
                        for u0 in (0..hid).step_by(units) {
                            let u1 = (u0 + units).min(hid);
                            let n = 4 * (u1 - u0);
                            let (wc, rc) = (rows(wd, inp, u0, u1), rows(rdv, hid, u0, u1));
                            let (wm, rm) = (
                                MatRef::row_major(&wc, n, inp),
                                MatRef::row_major(&rc, n, hid),
                            );
                            if hoist {
                                sd.push(PackedGemv::new(rm)?);
                                pd.push(PackedGemv::new(wm)?);
                            } else {
                                sd.push(PackedGemv::hcat(&[wm, rm])?);
                            }
                        }
                        step.push(sd);
                        proj.push(pd);
                    }
                    Some((
                        w.shape().to_vec(),
                        Chunks {
                            hoist,
                            units,
                            scratch: (0..hid.div_ceil(units)).map(|_| Mutex::default()).collect(),
                            step,
                            proj,
                        },
                    ))
                }
            }
            _ => None,
        };
        Some(RnnPlan {
            kind,
            r_shape: r.shape().to_vec(),
            r: packed,
            wr,
            split_min_work: 1 << 16,
        })
    }

    /// Run the node with the prepared weights.
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
        run_with(self.kind, ctx, ins, Some(self))
    }
}

/// One direction of a batch-1 LSTM with default activations for [`lstm_batch1`].
struct Batch1<'a> {
    /// Per chunk: `R` rows (`proj` given) or `[W | R]` rows (see [`Chunks`]).
    step: &'a [PackedGemv],
    /// Per chunk: `W` rows, when the input projection is hoisted out of the steps.
    proj: Option<&'a [PackedGemv]>,
    /// `X` time-major, `inp` values per step.
    x: &'a [f32],
    inp: usize,
    hid: usize,
    /// Hidden units per chunk.
    units: usize,
    /// Steps to run (`sequence_lens`).
    len: usize,
    reverse: bool,
    h0: &'a [f32],
    c0: &'a [f32],
    /// `W` and `R` biases summed (`4 * hid`).
    bias: &'a [f32],
    /// Peepholes `i`, `o`, `f` (`3 * hid`).
    peep: &'a [f32],
    /// Per thread: a buffer for the hoisted projections (see [`Chunks::scratch`]).
    scratch: &'a [Mutex<Vec<f32>>],
    clip: Option<f32>,
    input_forget: bool,
}

/// How long the first thread of a run waits for the others to join before it runs every
/// chunk itself (a pool worker that went to sleep; see [`join_run`]).
const JOIN_WAIT: Duration = Duration::from_micros(100);
const FROZEN: usize = 1 << (usize::BITS - 1);

/// Joins a run: the first thread waits (at most [`JOIN_WAIT`]) for `want` threads, then
/// freezes the count; a thread arriving after that gets `None` and leaves (its chunks are
/// someone else's). Returns this thread's index and the frozen count.
fn join_run(reg: &AtomicUsize, want: usize) -> Option<(usize, usize)> {
    let id = loop {
        let v = reg.load(Ordering::Acquire);
        if v & FROZEN != 0 {
            return None;
        }
        if reg
            .compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break v;
        }
    };
    if id == 0 {
        let start = Instant::now();
        while reg.load(Ordering::Acquire) < want && start.elapsed() < JOIN_WAIT {
            std::hint::spin_loop();
        }
        return Some((0, reg.fetch_or(FROZEN, Ordering::AcqRel) & !FROZEN));
    }
    loop {
        let v = reg.load(Ordering::Acquire);
        if v & FROZEN != 0 {
            return Some((id, v & !FROZEN));
        }
        std::hint::spin_loop();
    }
}

/// Spins (yielding now and then) until `done` reaches `need`.
fn wait_for(done: &AtomicUsize, need: usize) {
    let mut n = 0u32;
    while done.load(Ordering::Acquire) < need {
        if n % 64 == 63 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        n = n.wrapping_add(1);
    }
}

/// Marks a run failed and releases every waiter unless disarmed (a participant that returns
/// early or unwinds must not leave the others spinning).
struct Abort<'a> {
    failed: &'a AtomicBool,
    done: &'a AtomicUsize,
    armed: bool,
}

impl Drop for Abort<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.failed.store(true, Ordering::Release);
            self.done.fetch_add(usize::MAX / 4, Ordering::AcqRel);
        }
    }
}

/// A batch-1 LSTM direction with default activations on the chunked weights: with the
/// projection hoisted, first `X * W^T` (biases folded in) for every step with one
/// [`gemv_many`] per chunk; then per step and chunk one product of the chunk's `R` rows with
/// `h` (or of its `[W | R]` rows with `[x_t; h]`), and one fused cell over a thread's chunks
/// ([`edgehal_kernels::rnn::lstm_cell_blocked`]). Steps depend on the whole previous `h`, chunks of a step do not: with
/// `threads > 1` the chunks are split into contiguous ranges, one per thread, each thread
/// keeping its range for every step (so its rows stay in its own core's caches), and a step
/// starts once every chunk of the previous one is done (a shared counter). Threads that
/// turn up late leave their chunks to the ones running ([`join_run`]), so a busy pool costs
/// speed, never a deadlock; every chunk is computed the same way by whichever thread, so
/// the result does not depend on the thread count. Each thread runs its chunks in
/// alternating order, forward on even steps and backward on odd ones, so a step starts on
/// the rows the previous one read last (still in L1). Returns `h` of every step (step
/// order), the last `h` and `c`; `None` when sizes disagree.
fn lstm_batch1(a: &Batch1<'_>, threads: usize) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (inp, hid, len, cu) = (a.inp, a.hid, a.len, a.units);
    let nch = a.step.len();
    let kx = if a.proj.is_some() { 0 } else { inp };
    let fits = cu > 0
        && nch == hid.div_ceil(cu)
        && a.x.len() >= len * inp
        && a.h0.len() == hid
        && a.c0.len() == hid
        && a.bias.len() == 4 * hid
        && a.peep.len() == 3 * hid
        && a.step.iter().enumerate().all(|(j, m)| {
            let nu = cu.min(hid - j * cu);
            m.rows() == 4 * nu && m.cols() == kx + hid
        })
        && a.proj.is_none_or(|p| {
            p.len() == nch
                && p.iter()
                    .zip(a.step)
                    .all(|(p, m)| p.rows() == m.rows() && p.cols() == inp)
        });
    if !fits {
        return None;
    }
    if len == 0 {
        return Some((Vec::new(), a.h0.to_vec(), a.c0.to_vec()));
    }
    let parts = threads.clamp(1, nch);
    // Shared by several threads: row s of `hs` is h before step s (row 0 is h0); `cs` the
    // final c. A thread alone keeps them in its own buffers and hands them over in `alone`.
    let shared = if parts > 1 { hid } else { 0 };
    let hs: Vec<AtomicU32> = a.h0[..shared]
        .iter()
        .map(|v| AtomicU32::new(v.to_bits()))
        .chain((0..len * shared).map(|_| AtomicU32::new(0)))
        .collect();
    let cs: Vec<AtomicU32> = (0..shared).map(|_| AtomicU32::new(0)).collect();
    let alone_out: Mutex<Option<(Vec<f32>, Vec<f32>)>> = Mutex::new(None);
    let (done, reg) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let failed = AtomicBool::new(false);
    let want = AtomicUsize::new(parts);
    let participant = |_: usize| {
        let Some((me, n)) = join_run(&reg, want.load(Ordering::Relaxed)) else {
            return;
        };
        let mut abort = Abort {
            failed: &failed,
            done: &done,
            armed: true,
        };
        // This thread's chunks lo..hi: units u_lo..u_hi, their gates blocked per chunk
        // (`lstm_cell_blocked` with block `cu`), in buffers of its own.
        let (lo, hi) = (me * nch / n, (me + 1) * nch / n);
        let (u_lo, u_hi) = (lo * cu, (hi * cu).min(hid));
        let rows = 4 * (u_hi - u_lo);
        let blocked = |v: &[f32], gates: usize| -> Vec<f32> {
            (lo..hi)
                .flat_map(|j| {
                    let (u0, u1) = (j * cu, ((j + 1) * cu).min(hid));
                    (0..gates).flat_map(move |g| g * hid + u0..g * hid + u1)
                })
                .map(|i| v[i])
                .collect()
        };
        let (peep, bias) = (blocked(a.peep, 3), blocked(a.bias, 4));
        let mut c = a.c0[u_lo..u_hi].to_vec();
        let mut h = vec![0f32; u_hi - u_lo];
        let mut gates = vec![0f32; rows];
        // Chunk j's gate rows within this thread's blocks.
        let span = |j: usize| 4 * (j * cu - u_lo)..4 * (((j + 1) * cu).min(hid) - u_lo);
        let mut fresh = Vec::new();
        let mut kept = a.scratch.get(me).and_then(|m| m.try_lock().ok());
        let xw: &mut Vec<f32> = kept.as_deref_mut().unwrap_or(&mut fresh);
        if let Some(proj) = a.proj {
            // Every row of every step is written below: what the buffer held is overwritten.
            xw.resize(len * rows, 0.0);
            for (j, pw) in proj.iter().enumerate().take(hi).skip(lo) {
                let r = span(j);
                let x = &a.x[..len * inp];
                if !gemv_many(pw, len, x, &mut xw[r.start..], rows, Some(&bias[r])) {
                    return;
                }
            }
        }
        let mut xh = vec![0f32; kx + hid];
        let alt = alternate_order();
        // Alone: h lives in xh (the cell writes it there once the step's products have read
        // it) and every step's h in ys; no counter, no atomics.
        let alone = n == 1;
        let mut ys = vec![0f32; if alone { len * hid } else { 0 }];
        if alone {
            xh[kx..].copy_from_slice(a.h0);
        }
        for s in 0..len {
            if !alone {
                wait_for(&done, s * nch);
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                for (v, h) in xh[kx..].iter_mut().zip(&hs[s * hid..(s + 1) * hid]) {
                    *v = f32::from_bits(h.load(Ordering::Relaxed));
                }
            }
            let t = if a.reverse { len - 1 - s } else { s };
            if kx > 0 {
                xh[..inp].copy_from_slice(&a.x[t * inp..(t + 1) * inp]);
            }
            let back = alt && s % 2 == 1;
            for i in 0..hi - lo {
                let j = if back { hi - 1 - i } else { lo + i };
                if !gemv_ordered(
                    &a.step[j],
                    &xh,
                    &mut gates[span(j)],
                    GemvAdd::default(),
                    back,
                ) {
                    return;
                }
            }
            let add = if kx == 0 {
                &xw[t * rows..(t + 1) * rows]
            } else {
                &bias[..]
            };
            let out = if alone { &mut xh[kx..] } else { &mut h[..] };
            if !edgehal_kernels::rnn::lstm_cell_blocked(
                &gates,
                add,
                &peep,
                a.clip,
                a.input_forget,
                cu,
                &mut c,
                out,
            ) {
                return;
            }
            if alone {
                ys[s * hid..(s + 1) * hid].copy_from_slice(&xh[kx..]);
                continue;
            }
            for (o, v) in hs[(s + 1) * hid + u_lo..].iter().zip(&h) {
                o.store(v.to_bits(), Ordering::Relaxed);
            }
            done.fetch_add(hi - lo, Ordering::Release);
        }
        if alone {
            *alone_out.lock().unwrap_or_else(|p| p.into_inner()) = Some((ys, c));
        } else {
            for (o, v) in cs[u_lo..].iter().zip(&c) {
                o.store(v.to_bits(), Ordering::Relaxed);
            }
        }
        abort.armed = false;
    };
    if parts == 1 || !edgehal_kernels::pool::run_parts(parts, &participant) {
        // One thread, or no pool free (nested or concurrent use): this thread runs them all.
        want.store(1, Ordering::Relaxed);
        participant(0);
    }
    // Every participant has returned (run_parts waits for all parts): plain reads now.
    if failed.load(Ordering::Acquire) || reg.load(Ordering::Acquire) & !FROZEN == 0 {
        return None;
    }
    let bits = |v: &[AtomicU32]| -> Vec<f32> {
        v.iter()
            .map(|v| f32::from_bits(v.load(Ordering::Relaxed)))
            .collect()
    };
    let (hs, c) = match alone_out.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(v) => v,
        None => (bits(&hs[hid..]), bits(&cs)),
    };
    let h = hs[(len - 1) * hid..].to_vec();
    Some((hs, h, c))
}

fn run(kind: Kind, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run_with(kind, ctx, ins, None)
}

/// The recurrence, with the prepared weights when there is a plan (see [`RnnPlan`]).
fn run_with(
    kind: Kind,
    ctx: &OpCtx<'_>,
    ins: &[Option<&Tensor>],
    plan: Option<&RnnPlan>,
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
    // Batch 1 with the chunked weights prepared (see `RnnPlan`, `lstm_batch1`).
    let chunked = match plan.and_then(|p| p.wr.as_ref().map(|wr| (wr, p.split_min_work))) {
        Some(((ws, ch), min)) if lstm_fast && batch == 1 && ws.as_slice() == w.shape() => {
            Some((ch, min))
        }
        _ => None,
    };
    // The chunked path reads its prepared weights only: no conversion of W and R per run.
    let (wv, rv) = if chunked.is_some() {
        let empty: &[f32] = &[];
        (Cow::Borrowed(empty), Cow::Borrowed(empty))
    } else {
        (
            fvec(w, &format!("{name} W"))?,
            fvec(r, &format!("{name} R"))?,
        )
    };
    let mut xw = vec![
        0f32;
        if chunked.is_some() {
            0
        } else {
            seq * batch * gh
        }
    ];
    let mut hr = vec![0f32; batch * gh];
    for d in 0..ndir {
        let reverse = direction == "reverse" || d == 1;
        let wb = &bv[d * 2 * gh..d * 2 * gh + gh];
        let rb = &bv[d * 2 * gh + gh..(d + 1) * 2 * gh];
        let pd = &pv[d * 3 * hid..(d + 1) * 3 * hid];
        let acts = &acts[d * kind.n_act()..(d + 1) * kind.n_act()];
        if let Some((ch, min_work)) = chunked {
            // Steps big enough to pay for the per-step hand-off are shared out to threads.
            let threads = if gh * (inp + hid) >= min_work {
                crate::arena::threads()
            } else {
                1
            };
            let bias: Vec<f32> = wb.iter().zip(rb).map(|(a, b)| a + b).collect();
            let args = Batch1 {
                step: &ch.step[d],
                proj: ch.hoist.then(|| &ch.proj[d][..]),
                units: ch.units,
                x: &xv,
                inp,
                hid,
                len: lens[0],
                reverse,
                h0: &h0[d * hid..(d + 1) * hid],
                c0: &c0[d * hid..(d + 1) * hid],
                bias: &bias,
                peep: pd,
                scratch: &ch.scratch,
                clip,
                input_forget,
            };
            let (hs, h, c) = lstm_batch1(&args, threads)
                .ok_or_else(|| Error::arg(format!("{name}: W, R and X do not fit")))?;
            for (s, row) in hs.chunks_exact(hid).enumerate() {
                let t = if reverse { lens[0] - 1 - s } else { s };
                let yo = (t * ndir + d) * hid;
                y[yo..yo + hid].copy_from_slice(row);
            }
            yh[d * hid..(d + 1) * hid].copy_from_slice(&h);
            yc[d * hid..(d + 1) * hid].copy_from_slice(&c);
            continue;
        }
        let wd = &wv[d * gh * inp..(d + 1) * gh * inp];
        let rd = &rv[d * gh * hid..(d + 1) * gh * hid];
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
        let (mut z, mut rg) = (vec![0f32; hid], vec![0f32; hid]);
        for step in 0..seq {
            let ok = match plan.and_then(|p| p.r.get(d)) {
                // Few rows: one matrix-vector product per batch entry.
                Some(pr) if batch <= 4 => h
                    .chunks_exact(hid)
                    .zip(hr.chunks_exact_mut(gh))
                    .all(|(hb, ob)| gemv(pr, hb, ob, GemvAdd::default())),
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
                        if !edgehal_kernels::rnn::lstm_cell(xg, hg, pd, clip, input_forget, cb, hb)
                        {
                            return Err(Error::arg(format!("{name}: gate sizes do not fit")));
                        }
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
    use edgehal_core::{Node, Tensor};

    /// Every input of one LSTM node, values from `vals(n, seed)` (one seed per input), the
    /// node with its attributes, and `sequence_lens` when given.
    struct LstmCase {
        x: Tensor,
        w: Tensor,
        r: Tensor,
        b: Tensor,
        lens: Option<Tensor>,
        h0: Tensor,
        c0: Tensor,
        p: Tensor,
        attrs: Vec<(&'static str, Attr)>,
        node: Node,
    }

    impl LstmCase {
        #[allow(clippy::too_many_arguments)]
        fn new(
            [seq, batch, inp, hid]: [usize; 4],
            dir: &str,
            len: Option<i64>,
            clip: Option<f32>,
            input_forget: bool,
            vals: impl Fn(usize, usize) -> Vec<f32>,
        ) -> LstmCase {
            let nd = if dir == "bidirectional" { 2 } else { 1 };
            let mut attrs = vec![
                ("hidden_size", Attr::Int(hid as i64)),
                ("direction", Attr::String(dir.as_bytes().to_vec())),
                ("input_forget", Attr::Int(input_forget as i64)),
            ];
            if let Some(c) = clip {
                attrs.push(("clip", Attr::Float(c)));
            }
            let node = Node {
                op: "LSTM".into(),
                attrs: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                ..Default::default()
            };
            LstmCase {
                x: t(&[seq, batch, inp], &vals(seq * batch * inp, 3)),
                w: t(&[nd, 4 * hid, inp], &vals(nd * 4 * hid * inp, 5)),
                r: t(&[nd, 4 * hid, hid], &vals(nd * 4 * hid * hid, 7)),
                b: t(&[nd, 8 * hid], &vals(nd * 8 * hid, 11)),
                lens: len.map(|l| Tensor::from_vec(vec![1], vec![l]).unwrap()),
                h0: t(&[nd, batch, hid], &vals(nd * batch * hid, 13)),
                c0: t(&[nd, batch, hid], &vals(nd * batch * hid, 17)),
                p: t(&[nd, 3 * hid], &vals(nd * 3 * hid, 19)),
                attrs,
                node,
            }
        }

        fn ins(&self) -> [Option<&Tensor>; 8] {
            [
                Some(&self.x),
                Some(&self.w),
                Some(&self.r),
                Some(&self.b),
                self.lens.as_ref(),
                Some(&self.h0),
                Some(&self.c0),
                Some(&self.p),
            ]
        }

        fn ctx(&self) -> super::OpCtx<'_> {
            super::OpCtx {
                node: &self.node,
                opset: 14,
                subgraph: None,
                dest: None,
            }
        }

        /// The op function's outputs (the reference).
        fn want(&self) -> Vec<Tensor> {
            run_op("LSTM", 14, self.attrs.clone(), &self.ins(), 3).unwrap()
        }
    }

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
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * s + 1) % 23) as f32 * 0.05 - 0.55)
                .collect()
        };
        // hid 37 leaves a partly filled panel; batch 1 takes the joined [W | R] product (also
        // with a short sequence_lens), batch 2 the R GEMV, batch 6 the sgemm.
        let cases = [
            (1, "bidirectional", Some(0.8f32), None),
            (1, "reverse", None, Some(3i64)),
            (1, "forward", None, Some(4)),
            (2, "forward", None, None),
            (6, "bidirectional", Some(0.8), None),
        ];
        for (batch, dir, clip, len) in cases {
            let (seq, inp, hid) = (5, 9, 37);
            let nd = if dir == "bidirectional" { 2 } else { 1 };
            let case = LstmCase::new([seq, batch, inp, hid], dir, len, clip, false, vals);
            let (ins, ctx) = (case.ins(), case.ctx());
            let want = case.want();
            let plan = super::RnnPlan::new(&case.node, &case.r, Some(&case.w)).expect("plan");
            assert!(plan.wr.is_some());
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

    /// A step large enough to split its joined product across threads (128 units, gate rows
    /// in two chunks): 2 and 3 threads give the 1-thread bits, and the op function's values.
    #[test]
    fn joined_lstm_steps_split_across_threads_exactly() {
        use edgehal_core::Node;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * s + 1) % 29) as f32 * 0.02 - 0.28)
                .collect()
        };
        let (seq, inp, hid) = (6, 40, 128);
        let x = t(&[seq, 1, inp], &vals(seq * inp, 3));
        let w = t(&[1, 4 * hid, inp], &vals(4 * hid * inp, 5));
        let r = t(&[1, 4 * hid, hid], &vals(4 * hid * hid, 7));
        let b = t(&[1, 8 * hid], &vals(8 * hid, 11));
        let attrs = vec![("hidden_size", Attr::Int(hid as i64))];
        let ins = [Some(&x), Some(&w), Some(&r), Some(&b)];
        let want = run_op("LSTM", 14, attrs.clone(), &ins, 3).unwrap();
        let node = Node {
            op: "LSTM".into(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        };
        let plan = super::RnnPlan::new(&node, &r, Some(&w)).expect("plan");
        assert_eq!(plan.wr.as_ref().map(|(_, p)| p.step[0].len()), Some(2));
        let ctx = super::OpCtx {
            node: &node,
            opset: 14,
            subgraph: None,
            dest: None,
        };
        let one = plan.run(&ctx, &ins).unwrap();
        for (a, b) in want.iter().zip(&one) {
            close(&b.to_vec::<f32>().unwrap(), &a.to_vec::<f32>().unwrap());
        }
        for threads in [2, 3] {
            let _scope = crate::arena::RunScope::enter(None, threads);
            let got = plan.run(&ctx, &ins).unwrap();
            for (a, b) in one.iter().zip(&got) {
                assert_eq!(&a.bytes()[..], &b.bytes()[..], "{threads} threads");
            }
        }
    }

    /// The chunked batch-1 path against the op function across its shapes: odd hidden sizes
    /// (a short last chunk), chunks of 16 and 32 units, the projection hoisted and joined,
    /// forward / reverse / bidirectional, short and zero `sequence_lens`, clip, peepholes and
    /// coupled gates; forced to split at any size, 2 and 3 threads give the 1-thread bits.
    #[test]
    fn chunked_lstm_matches_the_op_at_every_thread_count() {
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * s + 3) % 31) as f32 * 0.03 - 0.45)
                .collect()
        };
        let cases = [
            // (hid, inp, dir, len, clip, input_forget)
            (37, 9, "forward", None, None, false),
            (37, 9, "reverse", Some(4i64), Some(0.9f32), false),
            (50, 3, "bidirectional", None, None, true),
            (16, 20, "forward", Some(0), None, false),
            (70, 1, "bidirectional", Some(5), Some(2.0), false),
        ];
        for (hid, inp, dir, len, clip, cifg) in cases {
            let case = LstmCase::new([6, 1, inp, hid], dir, len, clip, cifg, vals);
            let (ins, ctx) = (case.ins(), case.ctx());
            let (node, r, w) = (&case.node, &case.r, &case.w);
            let want = case.want();
            for units in [16, 32] {
                for hoist in [false, true] {
                    let what = format!("hid {hid} {dir} len {len:?} units {units} hoist {hoist}");
                    let mut plan =
                        super::RnnPlan::with_chunk(node, r, Some(w), Some(units), Some(hoist))
                            .expect("plan");
                    plan.split_min_work = 0;
                    let chunks = plan.wr.as_ref().map(|(_, c)| c.step[0].len());
                    assert_eq!(chunks, Some(hid.div_ceil(units)), "{what}");
                    let one = plan.run(&ctx, &ins).unwrap();
                    for (a, b) in want.iter().zip(&one) {
                        assert_eq!(a.shape(), b.shape(), "{what}");
                        close(&b.to_vec::<f32>().unwrap(), &a.to_vec::<f32>().unwrap());
                    }
                    for threads in [2, 3] {
                        let _scope = crate::arena::RunScope::enter(None, threads);
                        let got = plan.run(&ctx, &ins).unwrap();
                        for (a, b) in one.iter().zip(&got) {
                            assert_eq!(&a.bytes()[..], &b.bytes()[..], "{what} {threads} threads");
                        }
                    }
                }
            }
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
