//! Ops: elementwise arithmetic, math, comparison, logic, bitwise, `Where`, `Cast`.
//!
//! Binary ops broadcast with numpy rules through [`zip_broadcast`], which collapses the
//! broadcast into (outer index, inner run) so the inner loop is a plain slice walk: same-shape,
//! scalar and per-channel operands never pay per-element index arithmetic.
//! Integer arithmetic wraps (as C and onnxruntime do) and integer division by zero yields 0
//! instead of trapping.

use edgehal_core::dtype::Elem;
use edgehal_core::half::{bf16, f16};
use edgehal_core::tensor::{broadcast_shapes, checked_numel};
use edgehal_core::{bail, with_dtype, DType, Error, Result, Tensor};

use super::{input, map_float, OpCtx, Registry};

/// Arithmetic every numeric element type supports (bool is `u8`).
pub(crate) trait Num: Elem {
    const IS_FLOAT: bool;
    const ZERO: Self;
    const ONE: Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Division; integers truncate toward zero and give 0 for a zero divisor.
    fn div(self, o: Self) -> Self;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    /// Smallest and largest values (-inf/inf for floats).
    fn lowest() -> Self;
    fn highest() -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! int_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = false;
            const ZERO: Self = 0;
            const ONE: Self = 1;
            #[inline(always)]
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)]
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            #[inline(always)]
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)]
            fn div(self, o: Self) -> Self { if o == 0 { 0 } else { self.wrapping_div(o) } }
            #[inline(always)]
            fn neg(self) -> Self { (0 as $t).wrapping_sub(self) }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn abs(self) -> Self { if self < 0 { self.neg() } else { self } }
            fn lowest() -> Self { <$t>::MIN }
            fn highest() -> Self { <$t>::MAX }
            #[inline(always)]
            fn is_nan(self) -> bool { false }
        }
    )*};
}
int_num!(i8, u8, i16, u16, i32, u32, i64, u64);

macro_rules! float_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = true;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn add(self, o: Self) -> Self { self + o }
            #[inline(always)]
            fn sub(self, o: Self) -> Self { self - o }
            #[inline(always)]
            fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)]
            fn div(self, o: Self) -> Self { self / o }
            #[inline(always)]
            fn neg(self) -> Self { -self }
            #[inline(always)]
            fn abs(self) -> Self { self.abs() }
            fn lowest() -> Self { <$t>::NEG_INFINITY }
            fn highest() -> Self { <$t>::INFINITY }
            #[inline(always)]
            fn is_nan(self) -> bool { self.is_nan() }
        }
    )*};
}
float_num!(f32, f64);

macro_rules! half_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = true;
            const ZERO: Self = <$t>::ZERO;
            const ONE: Self = <$t>::ONE;
            #[inline(always)]
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            #[inline(always)]
            fn sub(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            #[inline(always)]
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            #[inline(always)]
            fn div(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() / o.to_f32()) }
            #[inline(always)]
            fn neg(self) -> Self { -self }
            #[inline(always)]
            fn abs(self) -> Self { <$t>::from_f32(self.to_f32().abs()) }
            fn lowest() -> Self { <$t>::NEG_INFINITY }
            fn highest() -> Self { <$t>::INFINITY }
            #[inline(always)]
            fn is_nan(self) -> bool { self.is_nan() }
        }
    )*};
}
half_num!(f16, bf16);

/// Numpy broadcast of two operands into `f(a, b)` per output element, in row-major output
/// order. Returns the output shape and values.
pub(crate) fn zip_broadcast<A: Copy, B: Copy, U>(
    a: &[A],
    ashape: &[usize],
    b: &[B],
    bshape: &[usize],
    f: impl Fn(A, B) -> U,
) -> Result<(Vec<usize>, Vec<U>)> {
    let shape = broadcast_shapes(ashape, bshape)?;
    let n = checked_numel(&shape, DType::F64)?;
    let na: usize = ashape.iter().product();
    let nb: usize = bshape.iter().product();
    if a.len() != na || b.len() != nb {
        bail!("operand data does not match its shape");
    }
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok((shape, out));
    }
    if ashape == bshape {
        out.extend(a.iter().zip(b.iter()).map(|(&x, &y)| f(x, y)));
        return Ok((shape, out));
    }
    if nb == 1 && na == n {
        let y = b[0];
        out.extend(a.iter().map(|&x| f(x, y)));
        return Ok((shape, out));
    }
    if na == 1 && nb == n {
        let x = a[0];
        out.extend(b.iter().map(|&y| f(x, y)));
        return Ok((shape, out));
    }
    let (dims, sa, sb) = coalesce2(&shape, ashape, bshape);
    let r = dims.len();
    let inner = dims[r - 1];
    let (ia, ib) = (sa[r - 1], sb[r - 1]);
    let outer = n / inner.max(1);
    let mut idx = vec![0usize; r];
    let (mut pa, mut pb) = (0usize, 0usize);
    for _ in 0..outer {
        match (ia, ib) {
            (1, 1) => out.extend(
                a[pa..pa + inner]
                    .iter()
                    .zip(&b[pb..pb + inner])
                    .map(|(&x, &y)| f(x, y)),
            ),
            (1, 0) => {
                let y = b[pb];
                out.extend(a[pa..pa + inner].iter().map(|&x| f(x, y)));
            }
            (0, 1) => {
                let x = a[pa];
                out.extend(b[pb..pb + inner].iter().map(|&y| f(x, y)));
            }
            _ => {
                let (x, y) = (a[pa], b[pb]);
                out.extend(std::iter::repeat_with(|| f(x, y)).take(inner));
            }
        }
        // advance the outer multi-index
        for ax in (0..r - 1).rev() {
            idx[ax] += 1;
            pa += sa[ax];
            pb += sb[ax];
            if idx[ax] < dims[ax] {
                break;
            }
            pa -= sa[ax] * dims[ax];
            pb -= sb[ax] * dims[ax];
            idx[ax] = 0;
        }
    }
    Ok((shape, out))
}

/// Strides (0 on broadcast axes) of two operands against an output shape, with adjacent axes
/// merged wherever both operands stay contiguous (or both stay broadcast) across them.
fn coalesce2(
    shape: &[usize],
    ashape: &[usize],
    bshape: &[usize],
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let r = shape.len();
    let strides = |s: &[usize]| -> Vec<usize> {
        let pad = r - s.len();
        let mut st = vec![0usize; r];
        let mut acc = 1usize;
        for i in (0..r).rev() {
            let d = if i >= pad { s[i - pad] } else { 1 };
            st[i] = if d == 1 { 0 } else { acc };
            acc *= d;
        }
        st
    };
    let (fa, fb) = (strides(ashape), strides(bshape));
    let mut dims: Vec<usize> = Vec::new();
    let mut sa: Vec<usize> = Vec::new();
    let mut sb: Vec<usize> = Vec::new();
    for i in 0..r {
        if shape[i] == 1 {
            continue;
        }
        if let (Some(&ld), Some(&la), Some(&lb)) = (dims.last(), sa.last(), sb.last()) {
            let ok = |last: usize, cur: usize| {
                (last == 0 && cur == 0) || (last != 0 && cur != 0 && last == cur * shape[i])
            };
            if ok(la, fa[i]) && ok(lb, fb[i]) {
                let k = dims.len() - 1;
                dims[k] = ld * shape[i];
                sa[k] = fa[i];
                sb[k] = fb[i];
                continue;
            }
        }
        dims.push(shape[i]);
        sa.push(fa[i]);
        sb.push(fb[i]);
    }
    if dims.is_empty() {
        dims.push(1);
        sa.push(0);
        sb.push(0);
    }
    // Inner strides must be 0 or 1 for the inner loop; they are by construction (the last
    // non-trivial axis of a contiguous operand has stride 1).
    (dims, sa, sb)
}

/// Binary op over two tensors of the same dtype, producing `out` dtype elements.
fn binary<T: Elem, U: Elem>(
    a: &Tensor,
    b: &Tensor,
    out: DType,
    f: impl Fn(T, T) -> U,
) -> Result<Tensor> {
    let av = a.as_slice::<T>()?;
    let bv = b.as_slice::<T>()?;
    let (shape, v) = zip_broadcast(&av, a.shape(), &bv, b.shape(), f)?;
    Tensor::from_vec_dtype(out, shape, v)
}

/// An f32 binary op with broadcasting into a pooled buffer, split across the running
/// executor's threads when the output is large ([`crate::par::for_slices`],
/// [`crate::par::for_parts`] by outer rows of the coalesced broadcast).
pub(crate) fn binary_f32(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> Result<Tensor> {
    let shape = broadcast_shapes(a.shape(), b.shape())?;
    let n = checked_numel(&shape, DType::F32)?;
    let av = a.as_slice::<f32>()?;
    let bv = b.as_slice::<f32>()?;
    if av.len() != a.len() || bv.len() != b.len() {
        bail!("operand data does not match its shape");
    }
    let (av, bv) = (&av[..], &bv[..]);
    let mut out = crate::arena::take_any(n);
    let threads = if n >= crate::par::MIN_PARALLEL_ELEMS {
        crate::arena::threads()
    } else {
        1
    };
    if n > 0 && a.shape() == b.shape() {
        crate::par::for_slices::<f32, Error>(threads, &mut out, |off, o| {
            let (x, y) = (&av[off..off + o.len()], &bv[off..off + o.len()]);
            for ((v, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *v = f(x, y);
            }
            Ok(())
        })?;
    } else if n > 0 && bv.len() == 1 && av.len() == n {
        let y = bv[0];
        crate::par::for_slices::<f32, Error>(threads, &mut out, |off, o| {
            let len = o.len();
            for (v, &x) in o.iter_mut().zip(&av[off..off + len]) {
                *v = f(x, y);
            }
            Ok(())
        })?;
    } else if n > 0 && av.len() == 1 && bv.len() == n {
        let x = av[0];
        crate::par::for_slices::<f32, Error>(threads, &mut out, |off, o| {
            let len = o.len();
            for (v, &y) in o.iter_mut().zip(&bv[off..off + len]) {
                *v = f(x, y);
            }
            Ok(())
        })?;
    } else if n > 0 {
        let (dims, sa, sb) = coalesce2(&shape, a.shape(), b.shape());
        let r = dims.len();
        let inner = dims[r - 1];
        let (ia, ib) = (sa[r - 1], sb[r - 1]);
        let outer = n / inner.max(1);
        crate::par::for_parts::<f32, Error>(threads, outer, inner, &mut out, |rows, o| {
            // Offsets of the first row of this part, from its multi-index.
            let (mut pa, mut pb) = (0usize, 0usize);
            let mut idx = vec![0usize; r];
            let mut rest = rows.start;
            for ax in (0..r - 1).rev() {
                idx[ax] = rest % dims[ax];
                rest /= dims[ax];
                pa += idx[ax] * sa[ax];
                pb += idx[ax] * sb[ax];
            }
            for o in o.chunks_exact_mut(inner) {
                // A run of `inner` elements (stride 1) or one repeated element (stride 0).
                fn run(v: &[f32], p: usize, len: usize) -> Result<&[f32]> {
                    v.get(p..p + len)
                        .ok_or_else(|| Error::arg("broadcast operand is too short"))
                }
                let len = |st: usize| if st == 1 { inner } else { 1 };
                let (xa, xb) = (run(av, pa, len(ia))?, run(bv, pb, len(ib))?);
                match (ia, ib) {
                    (1, 1) => {
                        for ((v, &x), &y) in o.iter_mut().zip(xa).zip(xb) {
                            *v = f(x, y);
                        }
                    }
                    (1, _) => {
                        let y = xb[0];
                        for (v, &x) in o.iter_mut().zip(xa) {
                            *v = f(x, y);
                        }
                    }
                    (_, 1) => {
                        let x = xa[0];
                        for (v, &y) in o.iter_mut().zip(xb) {
                            *v = f(x, y);
                        }
                    }
                    _ => o.fill(f(xa[0], xb[0])),
                }
                for ax in (0..r - 1).rev() {
                    idx[ax] += 1;
                    pa += sa[ax];
                    pb += sb[ax];
                    if idx[ax] < dims[ax] {
                        break;
                    }
                    pa -= sa[ax] * dims[ax];
                    pb -= sb[ax] * dims[ax];
                    idx[ax] = 0;
                }
            }
            Ok(())
        })?;
    }
    crate::arena::f32_tensor(shape, out)
}

fn same_dtype(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!(
            "{op}: inputs have different types {} and {}",
            a.dtype(),
            b.dtype()
        );
    }
    Ok(())
}

fn no_bool(op: &str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::Bool {
        return Err(Error::unsupported(format!("{op} on bool tensors")));
    }
    Ok(())
}

macro_rules! arith_op {
    ($name:ident, $op:literal, $m:ident, $f32:expr) => {
        fn $name(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
            let (a, b) = (input(ins, 0)?, input(ins, 1)?);
            same_dtype($op, a, b)?;
            no_bool($op, a)?;
            if a.dtype() == DType::F32 {
                return Ok(vec![binary_f32(a, b, $f32)?]);
            }
            Ok(vec![with_dtype!(a.dtype(), T => binary::<T, T>(a, b, a.dtype(), |x, y| Num::$m(x, y))?)])
        }
    };
}
arith_op!(add, "Add", add, |x, y| x + y);
arith_op!(sub, "Sub", sub, |x, y| x - y);
arith_op!(mul, "Mul", mul, |x, y| x * y);
arith_op!(div, "Div", div, |x, y| x / y);

/// Pow: base and exponent may have different types; the result has the base's type.
fn pow(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    no_bool("Pow", a)?;
    no_bool("Pow", b)?;
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return Ok(vec![binary::<f32, f32>(a, b, DType::F32, |x, y| {
            x.powf(y)
        })?]);
    }
    let ev = b.to_f64_vec();
    let dt = a.dtype();
    Ok(vec![with_dtype!(dt, T => {
        let av = a.as_slice::<T>()?;
        let (shape, v) = zip_broadcast(&av, a.shape(), &ev, b.shape(), |x: T, y: f64| {
            if T::DTYPE.is_int() {
                int_pow(x.to_i64(), y)
                    .map(T::from_i64)
                    .unwrap_or_else(|| T::from_f64(x.to_f64().powf(y)))
            } else {
                T::from_f64(x.to_f64().powf(y))
            }
        })?;
        Tensor::from_vec_dtype(dt, shape, v)?
    })])
}

/// Exact integer power for non-negative integral exponents (wrapping like C).
fn int_pow(x: i64, y: f64) -> Option<i64> {
    if y < 0.0 || y.fract() != 0.0 || y > 1e9 {
        return None;
    }
    let mut e = y as u64;
    let (mut base, mut acc) = (x, 1i64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        e >>= 1;
    }
    Some(acc)
}

fn modulo(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    same_dtype("Mod", a, b)?;
    no_bool("Mod", a)?;
    let fmod = ctx.i("fmod", 0) != 0;
    let dt = a.dtype();
    if dt.is_float() {
        return Ok(vec![with_dtype!(dt, T => binary::<T, T>(a, b, dt, |x, y| {
            let (x, y) = (x.to_f64(), y.to_f64());
            let r = x % y;
            if fmod {
                T::from_f64(r)
            } else if r != 0.0 && ((r < 0.0) != (y < 0.0)) {
                // Python/numpy: the result takes the divisor's sign.
                T::from_f64(r + y)
            } else if r == 0.0 {
                T::from_f64(0f64.copysign(y))
            } else {
                T::from_f64(r)
            }
        })?)]);
    }
    Ok(vec![with_dtype!(dt, T => binary::<T, T>(a, b, dt, |x, y| {
        let (x, y) = (x.to_i64(), y.to_i64());
        if y == 0 {
            return T::from_i64(0);
        }
        let r = x.wrapping_rem(y);
        if !fmod && r != 0 && ((r < 0) != (y < 0)) {
            T::from_i64(r + y)
        } else {
            T::from_i64(r)
        }
    })?)])
}

/// Variadic Min/Max/Sum/Mean with broadcasting.
fn variadic(op: &str, ins: &[Option<&Tensor>]) -> Result<Tensor> {
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let first = *ts
        .first()
        .ok_or_else(|| Error::arg(format!("{op}: needs at least one input")))?;
    let dt = first.dtype();
    for t in &ts {
        if t.dtype() != dt {
            bail!("{op}: inputs have different types {} and {}", dt, t.dtype());
        }
    }
    if dt == DType::Bool {
        return Err(Error::unsupported(format!("{op} on bool tensors")));
    }
    with_dtype!(dt, T => {
        let f: fn(T, T) -> T = match op {
            "Min" => |x: T, y: T| if x.is_nan() || y.is_nan() { if x.is_nan() { x } else { y } } else if y < x { y } else { x },
            "Max" => |x: T, y: T| if x.is_nan() || y.is_nan() { if x.is_nan() { x } else { y } } else if y > x { y } else { x },
            _ => |x: T, y: T| Num::add(x, y),
        };
        let mut acc = first.clone();
        for t in &ts[1..] {
            acc = binary::<T, T>(&acc, t, dt, f)?;
        }
        if op == "Mean" {
            let n = T::from_f64(ts.len() as f64);
            let v: Vec<T> = acc.as_slice::<T>()?.iter().map(|&x| Num::div(x, n)).collect();
            acc = Tensor::from_vec_dtype(dt, acc.shape().to_vec(), v)?;
        }
        Ok(acc)
    })
}

fn min(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic("Min", ins)?])
}
fn max(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic("Max", ins)?])
}
fn sum(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic("Sum", ins)?])
}
fn mean(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic("Mean", ins)?])
}

macro_rules! float_unary {
    ($name:ident, $f32:expr, $f64:expr) => {
        fn $name(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
            Ok(vec![map_float(input(ins, 0)?, $f32, $f64)?])
        }
    };
}
float_unary!(sqrt, f32::sqrt, f64::sqrt);
float_unary!(reciprocal, |x: f32| 1.0 / x, |x: f64| 1.0 / x);
float_unary!(exp, f32::exp, f64::exp);
float_unary!(log, f32::ln, f64::ln);
float_unary!(floor, f32::floor, f64::floor);
float_unary!(ceil, f32::ceil, f64::ceil);
float_unary!(round, f32::round_ties_even, f64::round_ties_even);
float_unary!(sin, f32::sin, f64::sin);
float_unary!(cos, f32::cos, f64::cos);
float_unary!(tan, f32::tan, f64::tan);
float_unary!(asin, f32::asin, f64::asin);
float_unary!(acos, f32::acos, f64::acos);
float_unary!(atan, f32::atan, f64::atan);
float_unary!(sinh, f32::sinh, f64::sinh);
float_unary!(cosh, f32::cosh, f64::cosh);
float_unary!(asinh, f32::asinh, f64::asinh);
float_unary!(acosh, f32::acosh, f64::acosh);
float_unary!(atanh, f32::atanh, f64::atanh);

/// Unary op on any numeric type.
fn map_num(
    t: &Tensor,
    op: &str,
    f: impl Fn(f64) -> f64,
    fi: impl Fn(i64) -> i64,
) -> Result<Tensor> {
    no_bool(op, t)?;
    let dt = t.dtype();
    if dt == DType::F32 {
        let v: Vec<f32> = t
            .as_slice::<f32>()?
            .iter()
            .map(|&x| f(x as f64) as f32)
            .collect();
        return Tensor::from_vec(t.shape().to_vec(), v);
    }
    with_dtype!(dt, T => {
        let s = t.as_slice::<T>()?;
        let v: Vec<T> = if dt.is_int() {
            s.iter().map(|&x| T::from_i64(fi(x.to_i64()))).collect()
        } else {
            s.iter().map(|&x| T::from_f64(f(x.to_f64()))).collect()
        };
        Tensor::from_vec_dtype(dt, t.shape().to_vec(), v)
    })
}

fn abs(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    no_bool("Abs", t)?;
    Ok(vec![with_dtype!(t.dtype(), T => {
        let v: Vec<T> = t.as_slice::<T>()?.iter().map(|&x| Num::abs(x)).collect();
        Tensor::from_vec_dtype(t.dtype(), t.shape().to_vec(), v)?
    })])
}

fn neg(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    no_bool("Neg", t)?;
    Ok(vec![with_dtype!(t.dtype(), T => {
        let v: Vec<T> = t.as_slice::<T>()?.iter().map(|&x| Num::neg(x)).collect();
        Tensor::from_vec_dtype(t.dtype(), t.shape().to_vec(), v)?
    })])
}

fn sign(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    Ok(vec![map_num(
        t,
        "Sign",
        |x| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        },
        i64::signum,
    )?])
}

fn is_nan(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    if !t.dtype().is_float() {
        bail!("IsNaN: expected a float tensor, got {}", t.dtype());
    }
    let v = t.to_f64_vec().iter().map(|x| x.is_nan()).collect();
    Ok(vec![Tensor::from_bools(t.shape().to_vec(), v)?])
}

fn is_inf(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    if !t.dtype().is_float() {
        bail!("IsInf: expected a float tensor, got {}", t.dtype());
    }
    let neg = ctx.i("detect_negative", 1) != 0;
    let pos = ctx.i("detect_positive", 1) != 0;
    let v = t
        .to_f64_vec()
        .iter()
        .map(|&x| (pos && x == f64::INFINITY) || (neg && x == f64::NEG_INFINITY))
        .collect();
    Ok(vec![Tensor::from_bools(t.shape().to_vec(), v)?])
}

macro_rules! compare_op {
    ($name:ident, $op:literal, |$x:ident, $y:ident| $e:expr) => {
        fn $name(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
            let (a, b) = (input(ins, 0)?, input(ins, 1)?);
            same_dtype($op, a, b)?;
            Ok(vec![with_dtype!(a.dtype(), T => binary::<T, u8>(a, b, DType::Bool, |$x: T, $y: T| u8::from($e))?)])
        }
    };
}
compare_op!(equal, "Equal", |x, y| x == y);
compare_op!(less, "Less", |x, y| x < y);
compare_op!(greater, "Greater", |x, y| x > y);
compare_op!(less_equal, "LessOrEqual", |x, y| x <= y);
compare_op!(greater_equal, "GreaterOrEqual", |x, y| x >= y);

fn bool_input<'a>(op: &str, ins: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    let t = input(ins, i)?;
    if t.dtype() != DType::Bool {
        bail!("{op}: expected a bool input, got {}", t.dtype());
    }
    Ok(t)
}

macro_rules! logic_op {
    ($name:ident, $op:literal, |$x:ident, $y:ident| $e:expr) => {
        fn $name(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
            let a = bool_input($op, ins, 0)?;
            let b = bool_input($op, ins, 1)?;
            Ok(vec![binary::<u8, u8>(a, b, DType::Bool, |$x, $y| {
                u8::from($e)
            })?])
        }
    };
}
logic_op!(and, "And", |x, y| x != 0 && y != 0);
logic_op!(or, "Or", |x, y| x != 0 || y != 0);
logic_op!(xor, "Xor", |x, y| (x != 0) != (y != 0));

fn not(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = bool_input("Not", ins, 0)?;
    let v: Vec<u8> = t
        .as_slice::<u8>()?
        .iter()
        .map(|&x| u8::from(x == 0))
        .collect();
    Ok(vec![Tensor::from_vec_dtype(
        DType::Bool,
        t.shape().to_vec(),
        v,
    )?])
}

/// Bitwise ops on the integer's two's complement bits (through u64).
fn bitwise(op: &str, ins: &[Option<&Tensor>], f: fn(u64, u64) -> u64) -> Result<Tensor> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    same_dtype(op, a, b)?;
    if !a.dtype().is_int() && a.dtype() != DType::Bool {
        bail!("{op}: expected integer inputs, got {}", a.dtype());
    }
    let dt = a.dtype();
    with_dtype!(dt, T => binary::<T, T>(a, b, dt, |x, y| {
        T::from_i64(f(x.to_i64() as u64, y.to_i64() as u64) as i64)
    }))
}

fn bitwise_and(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![bitwise("BitwiseAnd", ins, |x, y| x & y)?])
}
fn bitwise_or(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![bitwise("BitwiseOr", ins, |x, y| x | y)?])
}
fn bitwise_xor(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![bitwise("BitwiseXor", ins, |x, y| x ^ y)?])
}
fn bitwise_not(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let dt = t.dtype();
    if !dt.is_int() {
        bail!("BitwiseNot: expected an integer input, got {dt}");
    }
    with_dtype!(dt, T => {
        let v: Vec<T> = t.as_slice::<T>()?.iter().map(|&x| T::from_i64(!x.to_i64())).collect();
        Ok(vec![Tensor::from_vec_dtype(dt, t.shape().to_vec(), v)?])
    })
}

fn bit_shift(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    same_dtype("BitShift", a, b)?;
    let dt = a.dtype();
    if !dt.is_int() {
        bail!("BitShift: expected integer inputs, got {dt}");
    }
    let left = match ctx.s("direction", "").as_str() {
        "LEFT" => true,
        "RIGHT" => false,
        d => bail!("BitShift: direction must be LEFT or RIGHT, got {d:?}"),
    };
    let bits = (dt.size() * 8) as i64;
    // Shifts outside 0..bits give 0 (or -1 for a right shift of a negative number); left
    // shifts drop the bits that leave the type; right shifts of signed values are arithmetic.
    Ok(vec![with_dtype!(dt, T => binary::<T, T>(a, b, dt, |x, y| {
        let (x, s) = (x.to_i64(), y.to_i64());
        let r = if s < 0 || s >= bits {
            if !left && x < 0 { -1 } else { 0 }
        } else if left {
            x.wrapping_shl(s as u32)
        } else if dt.is_signed() {
            x >> s
        } else {
            ((x as u64) >> s) as i64
        };
        T::from_i64(r)
    })?)])
}

/// Where(cond, x, y) with three-way broadcasting.
fn where_op(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let c = bool_input("Where", ins, 0)?;
    let (x, y) = (input(ins, 1)?, input(ins, 2)?);
    same_dtype("Where", x, y)?;
    let dt = x.dtype();
    let cv = c.as_slice::<u8>()?;
    with_dtype!(dt, T => {
        let xv = x.as_slice::<T>()?;
        let yv = y.as_slice::<T>()?;
        // First pair the values, then select by the condition.
        let (xyshape, xy) = zip_broadcast(&xv, x.shape(), &yv, y.shape(), |a, b| (a, b))?;
        let (shape, v) = zip_broadcast(&cv, c.shape(), &xy, &xyshape, |c, (a, b)| if c != 0 { a } else { b })?;
        Ok(vec![Tensor::from_vec_dtype(dt, shape, v)?])
    })
}

fn cast_to(t: &Tensor, to: DType) -> Result<Tensor> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    // Fast exact paths that avoid the f64 round trip.
    if t.dtype() == DType::F32 && to == DType::F16 {
        let v = t
            .as_slice::<f32>()?
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        return Tensor::from_vec(t.shape().to_vec(), v);
    }
    if t.dtype() == DType::F64 && to == DType::F32 {
        let v = t.as_slice::<f64>()?.iter().map(|&x| x as f32).collect();
        return Tensor::from_vec(t.shape().to_vec(), v);
    }
    if to.is_float() && (t.dtype() == DType::I64 || t.dtype() == DType::U64) {
        // i64 -> f32 in one rounding step.
        let src = t.to_i64_vec();
        let unsigned = t.dtype() == DType::U64;
        return with_dtype!(to, T => Tensor::from_vec_dtype(to, t.shape().to_vec(), src.iter().map(|&x| {
            if T::DTYPE == DType::F32 {
                let f = if unsigned { (x as u64) as f32 } else { x as f32 };
                T::from_f64(f as f64)
            } else if unsigned { T::from_f64((x as u64) as f64) } else { T::from_f64(x as f64) }
        }).collect::<Vec<T>>()));
    }
    t.cast(to)
}

fn cast(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let code = ctx
        .node
        .attr_i("to")
        .ok_or_else(|| Error::arg("Cast: missing attribute 'to'"))?;
    let to = DType::from_onnx_code(code as i32)
        .ok_or_else(|| Error::unsupported(format!("Cast to ONNX type {code}")))?;
    Ok(vec![cast_to(t, to)?])
}

fn cast_like(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let like = input(ins, 1)?;
    Ok(vec![cast_to(t, like.dtype())?])
}

fn identity(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![input(ins, 0)?.clone()])
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("Add", add);
    r.add("Sub", sub);
    r.add("Mul", mul);
    r.add("Div", div);
    r.add("Pow", pow);
    r.add("Mod", modulo);
    r.add("Min", min);
    r.add("Max", max);
    r.add("Sum", sum);
    r.add("Mean", mean);
    r.add("Sqrt", sqrt);
    r.add("Reciprocal", reciprocal);
    r.add("Exp", exp);
    r.add("Log", log);
    r.add("Floor", floor);
    r.add("Ceil", ceil);
    r.add("Round", round);
    r.add("Sin", sin);
    r.add("Cos", cos);
    r.add("Tan", tan);
    r.add("Asin", asin);
    r.add("Acos", acos);
    r.add("Atan", atan);
    r.add("Sinh", sinh);
    r.add("Cosh", cosh);
    r.add("Asinh", asinh);
    r.add("Acosh", acosh);
    r.add("Atanh", atanh);
    r.add("Abs", abs);
    r.add("Neg", neg);
    r.add("Sign", sign);
    r.add("IsNaN", is_nan);
    r.add("IsInf", is_inf);
    r.add("Equal", equal);
    r.add("Less", less);
    r.add("Greater", greater);
    r.add("LessOrEqual", less_equal);
    r.add("GreaterOrEqual", greater_equal);
    r.add("And", and);
    r.add("Or", or);
    r.add("Xor", xor);
    r.add("Not", not);
    r.add("BitwiseAnd", bitwise_and);
    r.add("BitwiseOr", bitwise_or);
    r.add("BitwiseXor", bitwise_xor);
    r.add("BitwiseNot", bitwise_not);
    r.add("BitShift", bit_shift);
    r.add("Where", where_op);
    r.add("Cast", cast);
    r.add("CastLike", cast_like);
    r.add("Identity", identity);
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::Node;

    #[test]
    fn threaded_f32_binary_equals_one_thread_and_the_generic_path() {
        use crate::arena::RunScope;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * s + 3) % 29) as f32 * 0.37 - 5.0)
                .collect()
        };
        // Odd sizes around and above the split threshold, same-shape, scalar, per-channel,
        // middle-axis and two-sided broadcasts.
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![3, 11_001], vec![3, 11_001]),
            (vec![1, 32, 33, 37], vec![1]),
            (vec![1], vec![5, 7, 1_001]),
            (vec![1, 37, 31, 29], vec![1, 37, 1, 1]),
            (vec![7, 1, 4_999], vec![1, 9, 4_999]),
            (vec![2, 33, 1, 517], vec![33, 17, 1]),
            (vec![5, 3], vec![3]),
        ];
        for (sa, sb) in cases {
            let a = Tensor::from_vec(sa.clone(), vals(sa.iter().product(), 7)).unwrap();
            let b = Tensor::from_vec(sb.clone(), vals(sb.iter().product(), 11)).unwrap();
            let f = |x: f32, y: f32| x * y - x;
            let want = binary::<f32, f32>(&a, &b, DType::F32, f).unwrap();
            for threads in [1, 2, 3] {
                let pool = std::sync::Arc::new(crate::arena::Pool::default());
                let _s = RunScope::enter(Some(&pool), threads);
                let got = binary_f32(&a, &b, f).unwrap();
                assert_eq!(got.shape(), want.shape(), "{sa:?} {sb:?}");
                assert_eq!(
                    got.to_f32(),
                    want.to_f32(),
                    "{sa:?} {sb:?} threads {threads}"
                );
            }
        }
        let a = Tensor::from_vec(vec![2, 3], vals(6, 1)).unwrap();
        let b = Tensor::from_vec(vec![4], vals(4, 1)).unwrap();
        assert!(binary_f32(&a, &b, |x, y| x + y).is_err());
    }

    fn run(
        op: &str,
        attrs: Vec<(&str, edgehal_core::Attr)>,
        ins: &[&Tensor],
    ) -> Result<Vec<Tensor>> {
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
        let ins: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
        f(&ctx, &ins)
    }

    fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn add_broadcasts_channels_and_scalars() {
        let a = t(&[1, 2, 2, 2], (0..8).map(|x| x as f32).collect());
        let b = t(&[2, 1, 1], vec![10f32, 20.]);
        let o = run("Add", vec![], &[&a, &b]).unwrap();
        assert_eq!(o[0].shape(), &[1, 2, 2, 2]);
        assert_eq!(
            o[0].to_vec::<f32>().unwrap(),
            vec![10., 11., 12., 13., 24., 25., 26., 27.]
        );
        // column broadcast against a row: [3,1] x [2] -> [3,2]
        let c = t(&[3, 1], vec![1i32, 2, 3]);
        let d = t(&[2], vec![10i32, 20]);
        let o = run("Sub", vec![], &[&c, &d]).unwrap();
        assert_eq!(o[0].shape(), &[3, 2]);
        assert_eq!(
            o[0].to_vec::<i32>().unwrap(),
            vec![-9, -19, -8, -18, -7, -17]
        );
        // middle-axis broadcast [2,1,3] x [1,2,1]
        let e = t(&[2, 1, 3], vec![1i64, 2, 3, 4, 5, 6]);
        let f = t(&[1, 2, 1], vec![100i64, 200]);
        let o = run("Mul", vec![], &[&e, &f]).unwrap();
        assert_eq!(
            o[0].to_vec::<i64>().unwrap(),
            vec![100, 200, 300, 200, 400, 600, 400, 500, 600, 800, 1000, 1200]
        );
    }

    #[test]
    fn integer_div_and_mod_signs() {
        let a = t(&[4], vec![7i32, -7, 7, -7]);
        let b = t(&[4], vec![2i32, 2, -2, -2]);
        let d = run("Div", vec![], &[&a, &b]).unwrap();
        assert_eq!(d[0].to_vec::<i32>().unwrap(), vec![3, -3, -3, 3]);
        let m = run("Mod", vec![], &[&a, &b]).unwrap();
        assert_eq!(m[0].to_vec::<i32>().unwrap(), vec![1, 1, -1, -1]);
        let m = run("Mod", vec![("fmod", edgehal_core::Attr::Int(1))], &[&a, &b]).unwrap();
        assert_eq!(m[0].to_vec::<i32>().unwrap(), vec![1, -1, 1, -1]);
        let z = t(&[1], vec![0i32]);
        assert_eq!(
            run("Div", vec![], &[&a, &z]).unwrap()[0]
                .to_vec::<i32>()
                .unwrap(),
            vec![0; 4]
        );
    }

    #[test]
    fn pow_mixed_types_and_round_half_even() {
        let a = t(&[3], vec![2i64, 3, -2]);
        let b = t(&[3], vec![3f32, 2., 3.]);
        let o = run("Pow", vec![], &[&a, &b]).unwrap();
        assert_eq!(o[0].to_vec::<i64>().unwrap(), vec![8, 9, -8]);
        let r = t(&[5], vec![0.5f32, 1.5, 2.5, -0.5, -1.5]);
        let o = run("Round", vec![], &[&r]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![0., 2., 2., -0., -2.]);
    }

    #[test]
    fn where_compare_and_logic() {
        let c = Tensor::from_bools(vec![2, 1], vec![true, false]).unwrap();
        let x = t(&[2], vec![1f32, 2.]);
        let y = t(&[1], vec![9f32]);
        let o = run("Where", vec![], &[&c, &x, &y]).unwrap();
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![1., 2., 9., 9.]);
        let g = run("Greater", vec![], &[&x, &y]).unwrap();
        assert_eq!(g[0].to_bools().unwrap(), vec![false, false]);
        let n = run("Not", vec![], &[&c]).unwrap();
        assert_eq!(n[0].to_bools().unwrap(), vec![false, true]);
        let mx = run("Max", vec![], &[&x, &y, &t(&[2], vec![5f32, 10.])]).unwrap();
        assert_eq!(mx[0].to_vec::<f32>().unwrap(), vec![9., 10.]);
        let mean = run("Mean", vec![], &[&x, &y]).unwrap();
        assert_eq!(mean[0].to_vec::<f32>().unwrap(), vec![5., 5.5]);
    }

    #[test]
    fn bitshift_and_cast() {
        let a = t(&[3], vec![1u8, 128, 3]);
        let b = t(&[3], vec![7u8, 1, 9]);
        let o = run(
            "BitShift",
            vec![("direction", edgehal_core::Attr::String(b"LEFT".to_vec()))],
            &[&a, &b],
        )
        .unwrap();
        assert_eq!(o[0].to_vec::<u8>().unwrap(), vec![128, 0, 0]);
        let f = t(&[3], vec![-1.7f32, 0.0, 2.9]);
        let o = run("Cast", vec![("to", edgehal_core::Attr::Int(6))], &[&f]).unwrap();
        assert_eq!(o[0].to_vec::<i32>().unwrap(), vec![-1, 0, 2]);
        let o = run("Cast", vec![("to", edgehal_core::Attr::Int(9))], &[&f]).unwrap();
        assert_eq!(o[0].to_bools().unwrap(), vec![true, false, true]);
    }
}
