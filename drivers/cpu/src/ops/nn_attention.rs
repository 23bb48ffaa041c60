//! Attention (opset 23+): scaled dot-product attention with grouped KV heads, KV cache
//! (past/present), boolean or additive masks, causal and sliding-window masking, softcap and the
//! `qk_matmul_output_mode` side output. A reference implementation computing in f64.

use edgehal_core::tensor::View;
use edgehal_core::{DType, Error, Result, Tensor};

use crate::ops::{input, opt_input, OpCtx, Registry};

pub(super) fn register(r: &mut Registry) {
    r.add("Attention", attention);
}

/// A [B, H, S, D] array in f64.
struct Heads {
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    v: Vec<f64>,
}

impl Heads {
    fn at(&self, b: usize, h: usize, s: usize) -> &[f64] {
        let o = ((b * self.h + h) * self.s + s) * self.d;
        &self.v[o..o + self.d]
    }
}

fn to_heads(t: &Tensor, heads: Option<i64>, what: &str) -> Result<Heads> {
    let v = t.to_f64_vec();
    match t.shape() {
        &[b, s, hid] => {
            let h = match heads {
                Some(h) if h > 0 && hid % h as usize == 0 => h as usize,
                _ => {
                    return Err(Error::arg(format!(
                        "Attention: 3-d {what} {:?} needs a num_heads attribute dividing {hid}",
                        t.shape()
                    )))
                }
            };
            let d = hid / h;
            let mut out = vec![0f64; v.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..h {
                        let src = (bi * s + si) * hid + hi * d;
                        let dst = ((bi * h + hi) * s + si) * d;
                        out[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
            }
            Ok(Heads { b, h, s, d, v: out })
        }
        &[b, h, s, d] => Ok(Heads { b, h, s, d, v }),
        s => Err(Error::arg(format!(
            "Attention: {what} has shape {s:?}, expected 3-d or 4-d"
        ))),
    }
}

/// Concatenate a cache in front of new keys/values along the sequence axis.
fn concat(past: Option<&Tensor>, cur: Heads, what: &str) -> Result<Heads> {
    let Some(p) = past else { return Ok(cur) };
    let p = to_heads(p, None, what)?;
    if p.b != cur.b || p.h != cur.h || p.d != cur.d {
        return Err(Error::arg(format!(
            "Attention: {what} [{}, {}, {}, {}] does not fit the new [{}, {}, {}, {}]",
            p.b, p.h, p.s, p.d, cur.b, cur.h, cur.s, cur.d
        )));
    }
    let s = p.s + cur.s;
    let mut v = Vec::with_capacity(cur.b * cur.h * s * cur.d);
    for b in 0..cur.b {
        for h in 0..cur.h {
            for si in 0..p.s {
                v.extend_from_slice(p.at(b, h, si));
            }
            for si in 0..cur.s {
                v.extend_from_slice(cur.at(b, h, si));
            }
        }
    }
    Ok(Heads {
        b: cur.b,
        h: cur.h,
        s,
        d: cur.d,
        v,
    })
}

fn heads_tensor(dt: DType, h: &Heads) -> Result<Tensor> {
    Tensor::from_vec(vec![h.b, h.h, h.s, h.d], h.v.clone())?.cast(dt)
}

fn attention(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let qt = input(ins, 0)?;
    let kt = input(ins, 1)?;
    let vt = input(ins, 2)?;
    if !qt.dtype().is_float() {
        return Err(Error::arg(format!(
            "Attention: Q must be float, got {}",
            qt.dtype()
        )));
    }
    let three_d = qt.rank() == 3;
    let qh = ctx.node.attr_i("q_num_heads");
    let kvh = ctx.node.attr_i("kv_num_heads");
    let q = to_heads(qt, qh, "Q")?;
    let k = concat(opt_input(ins, 4), to_heads(kt, kvh, "K")?, "past_key")?;
    let v = concat(opt_input(ins, 5), to_heads(vt, kvh, "V")?, "past_value")?;
    let past_len = opt_input(ins, 4).map(|p| p.shape().get(2).copied().unwrap_or(0));
    if k.b != q.b || v.b != q.b || k.d != q.d || v.h != k.h || v.s != k.s {
        return Err(Error::arg("Attention: Q, K and V shapes do not agree"));
    }
    if k.h == 0 || q.h % k.h != 0 {
        return Err(Error::arg(format!(
            "Attention: {} query heads are not a multiple of {} kv heads",
            q.h, k.h
        )));
    }
    let (bn, hn, qs, kvs, dv) = (q.b, q.h, q.s, k.s, v.d);
    let rep = hn / k.h;
    let nonpad: Option<Vec<i64>> = opt_input(ins, 6).map(|t| t.to_i64_vec());
    if let Some(np) = &nonpad {
        if np.len() != bn {
            return Err(Error::arg(
                "Attention: nonpad_kv_seqlen must have one entry per batch",
            ));
        }
    }
    // Additive bias [B, H, q, kv].
    let mut bias = vec![0f64; bn * hn * qs * kvs];
    if let Some(m) = opt_input(ins, 3) {
        let is_bool = m.dtype() == DType::Bool;
        let mv: Vec<f64> = if is_bool {
            m.to_bools()?
                .into_iter()
                .map(|b| if b { 0.0 } else { f64::NEG_INFINITY })
                .collect()
        } else {
            m.to_f64_vec()
        };
        let mut ms = m.shape().to_vec();
        let last = ms.last().copied().unwrap_or(1);
        let mv = if last < kvs && !ms.is_empty() {
            // Pad the key axis with masked positions.
            let rows = mv.len() / last.max(1);
            let mut p = Vec::with_capacity(rows * kvs);
            for r in 0..rows {
                p.extend_from_slice(&mv[r * last..(r + 1) * last]);
                p.extend(std::iter::repeat_n(f64::NEG_INFINITY, kvs - last));
            }
            if let Some(l) = ms.last_mut() {
                *l = kvs;
            }
            p
        } else {
            mv
        };
        let view = View::contiguous(mv.into(), ms.clone())
            .broadcast_to(&[bn, hn, qs, kvs])
            .map_err(|_| {
                Error::arg(format!(
                    "Attention: attn_mask {ms:?} does not broadcast to [{bn}, {hn}, {qs}, {kvs}]"
                ))
            })?;
        for (o, x) in bias.iter_mut().zip(view.iter()) {
            *o += x;
        }
    }
    let offset = |b: usize| -> i64 {
        match (past_len, &nonpad) {
            (None, Some(np)) => np[b] - qs as i64,
            (Some(p), _) => p as i64,
            (None, None) => 0,
        }
    };
    let causal = ctx.i("is_causal", 0) != 0;
    let left = ctx.i("left_window_size", -1);
    let right = ctx.i("right_window_size", -1);
    for b in 0..bn {
        let off = offset(b);
        for h in 0..hn {
            for i in 0..qs {
                for j in 0..kvs {
                    let diff = i as i64 + off - j as i64;
                    let mut masked = causal && diff < 0;
                    masked |= left >= 0 && diff > left;
                    masked |= right >= 0 && -diff > right;
                    if let Some(np) = &nonpad {
                        masked |= j as i64 >= np[b];
                    }
                    if masked {
                        bias[((b * hn + h) * qs + i) * kvs + j] = f64::NEG_INFINITY;
                    }
                }
            }
        }
    }
    let scale = match ctx.node.attr_f("scale") {
        Some(s) => s as f64,
        None => 1.0 / (q.d as f64).sqrt(),
    };
    let softcap = ctx.f("softcap", 0.0) as f64;
    // Half-precision inputs are computed as the reference does: every intermediate rounded to
    // the input type.
    let dt = qt.dtype();
    let rd = |x: f64| -> f64 {
        match dt {
            DType::BF16 => edgehal_core::half::bf16::from_f64(x).to_f64(),
            DType::F16 => edgehal_core::half::f16::from_f64(x).to_f64(),
            _ => x,
        }
    };
    let sq = rd(scale.sqrt());
    let q = Heads {
        v: q.v.iter().map(|&x| rd(x * sq)).collect(),
        ..q
    };
    let ks = Heads {
        v: k.v.iter().map(|&x| rd(x * sq)).collect(),
        b: k.b,
        h: k.h,
        s: k.s,
        d: k.d,
    };
    let mode = ctx.i("qk_matmul_output_mode", 0);
    let mut qk_out = vec![0f64; bn * hn * qs * kvs];
    let mut y = vec![0f64; bn * hn * qs * dv];
    let mut row = vec![0f64; kvs];
    for b in 0..bn {
        for h in 0..hn {
            let kh = h / rep;
            for i in 0..qs {
                let qv = q.at(b, h, i);
                let base = ((b * hn + h) * qs + i) * kvs;
                let brow = &bias[base..base + kvs];
                for (j, r) in row.iter_mut().enumerate() {
                    // Matrix products accumulate in wide precision and round once.
                    let mut s = rd(qv.iter().zip(ks.at(b, kh, j)).map(|(a, c)| a * c).sum());
                    if softcap > 0.0 {
                        s = rd(softcap * rd(rd(s / softcap).tanh()));
                    }
                    *r = s;
                }
                if mode == 0 || mode == 1 {
                    qk_out[base..base + kvs].copy_from_slice(&row);
                }
                for (r, &bb) in row.iter_mut().zip(brow) {
                    *r = rd(*r + bb);
                }
                if mode == 2 {
                    qk_out[base..base + kvs].copy_from_slice(&row);
                }
                let all_masked = brow.iter().all(|&x| x == f64::NEG_INFINITY);
                let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let safe = if mx == f64::NEG_INFINITY { 0.0 } else { mx };
                let mut sum = 0.0;
                for r in row.iter_mut() {
                    *r = rd(rd(*r - safe).exp());
                    // numpy sums float16 in float32 but bfloat16 (ml_dtypes) element by element.
                    sum = if dt == DType::BF16 {
                        rd(sum + *r)
                    } else {
                        sum + *r
                    };
                }
                sum = rd(sum);
                if sum == 0.0 {
                    sum = 1.0;
                }
                for r in row.iter_mut() {
                    *r = if all_masked { 0.0 } else { rd(*r / sum) };
                }
                if mode == 3 {
                    qk_out[base..base + kvs].copy_from_slice(&row);
                }
                let yo = ((b * hn + h) * qs + i) * dv;
                for (j, &p) in row.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    for (o, &vv) in y[yo..yo + dv].iter_mut().zip(v.at(b, kh, j)) {
                        *o += p * vv;
                    }
                }
            }
        }
    }
    let y: Vec<f64> = y.into_iter().map(rd).collect();
    let yt = if three_d {
        let mut t = vec![0f64; y.len()];
        for b in 0..bn {
            for h in 0..hn {
                for i in 0..qs {
                    let src = ((b * hn + h) * qs + i) * dv;
                    let dst = (b * qs + i) * hn * dv + h * dv;
                    t[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                }
            }
        }
        Tensor::from_vec(vec![bn, qs, hn * dv], t)?
    } else {
        Tensor::from_vec(vec![bn, hn, qs, dv], y)?
    };
    Ok(vec![
        yt.cast(dt)?,
        heads_tensor(dt, &k)?,
        heads_tensor(dt, &v)?,
        Tensor::from_vec(vec![bn, hn, qs, kvs], qk_out)?.cast(dt)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use edgehal_core::graph::Attr;

    #[test]
    fn causal_attention_hides_future_keys() {
        // Equal scores: row 0 sees only key 0, row 1 averages both values.
        let q = t(&[1, 1, 2, 1], &[1., 1.]);
        let k = t(&[1, 1, 2, 1], &[1., 1.]);
        let v = t(&[1, 1, 2, 1], &[10., 20.]);
        let y = run_op(
            "Attention",
            23,
            vec![("is_causal", Attr::Int(1))],
            &[Some(&q), Some(&k), Some(&v)],
            1,
        )
        .unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[10., 15.]);
    }
}
