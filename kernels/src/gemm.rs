//! Matrix multiply, float: `C = alpha * A * B + beta * C`.
//!
//! The portable kernel here is the reference every faster variant is tested against. It packs
//! B into row-major form when B is strided, then accumulates rows of C as axpy over rows of B,
//! a loop shape LLVM vectorizes for any SIMD width.

/// A borrowed matrix with row and column strides (in elements), so transposes are free.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major `rows x cols`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
    /// The largest index touched, to check slices are long enough.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `C (m x n, row stride ldc) = alpha * A (m x k) * B (k x n) + beta * C`.
/// When `beta == 0`, C's previous contents are ignored (NaNs included).
///
/// Returns `false` (and does nothing) when the shapes disagree or a slice is too short.
pub fn sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || a.data.len() < a.extent() || b.data.len() < b.extent() {
        return false;
    }
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        return false;
    }
    // Pack B row-major unless it already is.
    let packed;
    let b_rows: &[f32] = if b.cs == 1 && b.rs == n {
        &b.data[..k * n]
    } else {
        let mut p = vec![0f32; k * n];
        for r in 0..k {
            for col in 0..n {
                p[r * n + col] = b.at(r, col);
            }
        }
        packed = p;
        &packed
    };
    // Block over k so a panel of B stays in cache while rows of A stream past.
    const KB: usize = 256;
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
    let mut acc = vec![0f32; n];
    for k0 in (0..k).step_by(KB) {
        let k1 = (k0 + KB).min(k);
        for i in 0..m {
            acc.fill(0.0);
            for p in k0..k1 {
                let av = a.at(i, p);
                if av == 0.0 {
                    continue;
                }
                let brow = &b_rows[p * n..p * n + n];
                for (o, &bv) in acc.iter_mut().zip(brow) {
                    *o += av * bv;
                }
            }
            let row = &mut c[i * ldc..i * ldc + n];
            for (o, &v) in row.iter_mut().zip(&acc) {
                *o += alpha * v;
            }
        }
    }
    true
}

/// Integer matrix multiply with i32 accumulation (wrapping, as the ONNX integer ops define):
/// `C (m x n) = A (m x k) * B (k x n)`, all row-major and contiguous.
///
/// Returns `false` (and does nothing) when a slice is too short for the sizes.
pub fn igemm_i32(m: usize, n: usize, k: usize, a: &[i32], b: &[i32], c: &mut [i32]) -> bool {
    let (Some(mk), Some(kn), Some(mn)) = (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n))
    else {
        return false;
    };
    if a.len() < mk || b.len() < kn || c.len() < mn {
        return false;
    }
    c[..mn].fill(0);
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let av = a[i * k + p];
            if av == 0 {
                continue;
            }
            for (o, &bv) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o = o.wrapping_add(av.wrapping_mul(bv));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_odd_sizes_and_transposes() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 300), (8, 33, 2)] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let want = naive(m, n, k, &a, &b);
            let mut c = vec![f32::NAN; m * n];
            assert!(sgemm(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                &mut c,
                n
            ));
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
            // B given transposed: store B^T row-major and view it transposed.
            let mut bt = vec![0f32; n * k];
            for r in 0..k {
                for col in 0..n {
                    bt[col * k + r] = b[r * n + col];
                }
            }
            let mut c2 = vec![1f32; m * n];
            assert!(sgemm(
                2.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&bt, n, k).t(),
                0.5,
                &mut c2,
                n
            ));
            for (x, y) in c2.iter().zip(&want) {
                assert!((x - (2.0 * y + 0.5)).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn igemm_matches_hand_product() {
        let a = [1, -2, 3, 4, 5, -6];
        let b = [7, 8, 9, 10, -11, 12];
        let mut c = [99i32; 4];
        assert!(igemm_i32(2, 2, 3, &a, &b, &mut c));
        assert_eq!(c, [1 * 7 - 2 * 9 - 3 * 11, 8 - 20 + 36, 28 + 45 + 66, 32 + 50 - 72]);
        assert!(!igemm_i32(2, 2, 4, &a, &b, &mut c));
    }

    #[test]
    fn refuses_bad_shapes() {
        let a = [1f32; 6];
        let mut c = [0f32; 4];
        assert!(!sgemm(
            1.0,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&a, 2, 3),
            0.0,
            &mut c,
            2
        ));
    }
}
