//! `Einsum`: explicit and implicit outputs, repeated labels (diagonals) and ellipsis.
//!
//! Each label gets a size and, per operand, a stride (the sum over the axes that carry it, so a
//! repeated label walks the diagonal; 0 where the operand broadcasts). The result is then a
//! plain loop over output labels with an inner loop over the contracted ones, accumulated in
//! f64. It is a reference, not a matmul: graphs with big einsums want them rewritten.

use edgehal_core::dtype::Elem;
use edgehal_core::tensor::{checked_numel, contiguous_strides};
use edgehal_core::{bail, ensure, with_dtype, Error, Result, Tensor};

use super::super::{OpCtx, Registry};

/// A label: a letter, or the k-th ellipsis dimension (counted from the left of the ellipsis).
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Label {
    Ellipsis(usize),
    Letter(u8),
}

/// Parse one term into labels; `ell_rank` is how many dims the ellipsis stands for here.
fn parse_term(term: &str, rank: Option<usize>, ell_rank: usize) -> Result<Vec<Label>> {
    let bytes = term.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut seen_ell = false;
    let letters = bytes.iter().filter(|c| c.is_ascii_alphabetic()).count();
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'.' {
            ensure!(
                bytes.get(i..i + 3) == Some(b"..."),
                "Einsum: stray '.' in {term:?}"
            );
            ensure!(!seen_ell, "Einsum: two ellipses in {term:?}");
            seen_ell = true;
            let n = match rank {
                Some(r) => r.checked_sub(letters).ok_or_else(|| {
                    Error::arg(format!(
                        "Einsum: term {term:?} has more labels than rank {r}"
                    ))
                })?,
                None => ell_rank,
            };
            // Right-align this operand's ellipsis dims within the global ellipsis.
            let base = ell_rank.saturating_sub(n);
            out.extend((0..n).map(|k| Label::Ellipsis(base + k)));
            i += 3;
        } else if c.is_ascii_alphabetic() {
            out.push(Label::Letter(c));
            i += 1;
        } else {
            bail!("Einsum: bad character {:?} in {term:?}", c as char);
        }
    }
    if let Some(r) = rank {
        ensure!(
            out.len() == r,
            "Einsum: term {term:?} names {} axes, operand has {r}",
            out.len()
        );
    }
    Ok(out)
}

fn einsum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let eq: String = ctx
        .s("equation", "")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    ensure!(
        terms.len() == ts.len(),
        "Einsum: equation has {} operands, got {} inputs",
        terms.len(),
        ts.len()
    );
    let dt = ts
        .first()
        .ok_or_else(|| Error::arg("Einsum: no inputs"))?
        .dtype();
    // Global ellipsis rank = the largest an operand needs.
    let mut ell_rank = 0;
    for (term, t) in terms.iter().zip(&ts) {
        ensure!(t.dtype() == dt, "Einsum: mixed input types");
        if term.contains("...") {
            let letters = term.bytes().filter(|c| c.is_ascii_alphabetic()).count();
            ell_rank = ell_rank.max(t.rank().saturating_sub(letters));
        }
    }
    let in_labels: Vec<Vec<Label>> = terms
        .iter()
        .zip(&ts)
        .map(|(term, t)| parse_term(term, Some(t.rank()), ell_rank))
        .collect::<Result<_>>()?;
    let out_labels: Vec<Label> = match rhs {
        Some(r) => parse_term(r, None, ell_rank)?,
        None => {
            let mut v: Vec<Label> = (0..ell_rank).map(Label::Ellipsis).collect();
            let mut letters: Vec<u8> = Vec::new();
            for l in in_labels.iter().flatten() {
                if let Label::Letter(c) = l {
                    letters.push(*c);
                }
            }
            letters.sort_unstable();
            let mut uniq: Vec<u8> = Vec::new();
            for (i, &c) in letters.iter().enumerate() {
                let once = (i == 0 || letters[i - 1] != c) && letters.get(i + 1) != Some(&c);
                if once {
                    uniq.push(c);
                }
            }
            v.extend(uniq.into_iter().map(Label::Letter));
            v
        }
    };
    // Every label and its size.
    let mut labels: Vec<Label> = out_labels.clone();
    for l in in_labels.iter().flatten() {
        if !labels.contains(l) {
            labels.push(*l);
        }
    }
    let mut sizes = vec![1usize; labels.len()];
    for (ls, t) in in_labels.iter().zip(&ts) {
        for (ax, l) in ls.iter().enumerate() {
            let k = labels.iter().position(|x| x == l).unwrap_or(0);
            let d = t.shape()[ax];
            if d != 1 {
                ensure!(
                    sizes[k] == 1 || sizes[k] == d,
                    "Einsum: label {l:?} has sizes {} and {d}",
                    sizes[k]
                );
                sizes[k] = d;
            }
        }
    }
    for l in &out_labels {
        ensure!(
            in_labels.iter().flatten().any(|x| x == l),
            "Einsum: output label {l:?} is not in any input"
        );
    }
    // Per operand, per label, the stride.
    let strides: Vec<Vec<isize>> = in_labels
        .iter()
        .zip(&ts)
        .map(|(ls, t)| {
            let st = contiguous_strides(t.shape());
            let mut s = vec![0isize; labels.len()];
            for (ax, l) in ls.iter().enumerate() {
                let k = labels.iter().position(|x| x == l).unwrap_or(0);
                if t.shape()[ax] != 1 {
                    s[k] += st[ax];
                }
            }
            s
        })
        .collect();
    let nout = out_labels.len();
    let out_shape: Vec<usize> = sizes[..nout].to_vec();
    let red_sizes: Vec<usize> = sizes[nout..].to_vec();
    let n_out = checked_numel(&out_shape, dt)?;
    let n_red = checked_numel(&red_sizes, dt)?;
    let data: Vec<Vec<f64>> = ts.iter().map(|t| t.to_f64_vec()).collect();
    let mut out = Vec::with_capacity(n_out);
    let mut oidx = vec![0usize; nout];
    let mut ridx = vec![0usize; red_sizes.len()];
    for _ in 0..n_out {
        let base: Vec<isize> = strides
            .iter()
            .map(|s| (0..nout).map(|k| oidx[k] as isize * s[k]).sum())
            .collect();
        let mut pos = base.clone();
        ridx.iter_mut().for_each(|x| *x = 0);
        let mut acc = 0f64;
        for _ in 0..n_red {
            let mut prod = 1f64;
            for (d, &p) in data.iter().zip(&pos) {
                prod *= d[p as usize];
            }
            acc += prod;
            for a in (0..red_sizes.len()).rev() {
                ridx[a] += 1;
                for (p, s) in pos.iter_mut().zip(&strides) {
                    *p += s[nout + a];
                }
                if ridx[a] < red_sizes[a] {
                    break;
                }
                for (p, s) in pos.iter_mut().zip(&strides) {
                    *p -= s[nout + a] * red_sizes[a] as isize;
                }
                ridx[a] = 0;
            }
        }
        out.push(acc);
        for a in (0..nout).rev() {
            oidx[a] += 1;
            if oidx[a] < out_shape[a] {
                break;
            }
            oidx[a] = 0;
        }
    }
    with_dtype!(dt, T => {
        let v: Vec<T> = out.into_iter().map(T::from_f64).collect();
        Ok(vec![Tensor::from_vec_dtype(dt, out_shape, v)?])
    })
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("Einsum", einsum);
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, t};
    use edgehal_core::Attr;

    fn eq(s: &str) -> Vec<(&'static str, Attr)> {
        vec![("equation", Attr::String(s.as_bytes().to_vec()))]
    }

    #[test]
    fn matmul_trace_transpose_ellipsis() {
        let a = t(&[2, 3], vec![1f32, 2., 3., 4., 5., 6.]);
        let b = t(&[3, 2], vec![1f32, 0., 0., 1., 1., 1.]);
        let o = run("Einsum", eq("ij,jk->ik"), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![4., 5., 10., 11.]);
        let o = run("Einsum", eq("ij"), &[Some(&a)]).unwrap();
        assert_eq!(o[0].shape(), &[2, 3]);
        let o = run("Einsum", eq("ji"), &[Some(&a)]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![1., 4., 2., 5., 3., 6.]);
        let m = t(&[2, 2], vec![1i32, 2, 3, 4]);
        let o = run("Einsum", eq("ii->"), &[Some(&m)]).unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![5]);
        let o = run("Einsum", eq("...j->..."), &[Some(&a)]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![6., 15.]);
    }
}
