//! sgemm and gemv GFLOP/s per kernel variant, next to a peak-FMA microbenchmark.
//!
//! `cargo bench -p edgehal-kernels --bench gemm` (single thread). Criterion reports time per
//! iteration and, through `Throughput::Elements(flops)`, "elem/s" = FLOP/s.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use edgehal_kernels::dispatch;
use edgehal_kernels::gemm::{sgemm_with, MatRef};
use edgehal_kernels::gemv::{gemv_many_with, gemv_with, GemvAdd, PackedGemv};

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

fn peak(c: &mut Criterion) {
    let mut g = c.benchmark_group("fma_peak");
    let iters = 100_000;
    for v in dispatch::detected() {
        let Some((flops, _)) = dispatch::fma_peak(v, 1, 1.0) else {
            continue;
        };
        g.throughput(Throughput::Elements((flops * iters as f64) as u64));
        g.bench_function(v.name(), |bch| {
            bch.iter(|| dispatch::fma_peak(v, black_box(iters), black_box(0.999)))
        });
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    // (m, n, k): square, and a conv-like shape (ResNet-18 layer-1 3x3 conv as im2col GEMM:
    // 64 output channels x 56*56 pixels x 64*3*3).
    let shapes = [(256, 256, 256), (1024, 1024, 1024), (64, 3136, 576)];
    for &(m, n, k) in &shapes {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut out = vec![0f32; m * n];
        let mut g = c.benchmark_group(format!("sgemm_{m}x{n}x{k}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        if m * n * k >= 1 << 28 {
            g.sample_size(10);
        }
        for v in dispatch::detected() {
            g.bench_function(v.name(), |bch| {
                bch.iter(|| {
                    sgemm_with(
                        v,
                        1.0,
                        MatRef::row_major(&a, m, k),
                        MatRef::row_major(&b, k, n),
                        0.0,
                        &mut out,
                        n,
                    )
                })
            });
        }
        g.finish();
    }
}

/// Matrix-vector products with a packed matrix: the LSTM recurrent step of lstm_kws (512 x
/// 128), its input + recurrent product joined (512 x 168), and one too big for L2.
fn gemv(c: &mut Criterion) {
    for &(m, k) in &[(64, 64), (128, 64), (512, 128), (512, 168), (1024, 1024)] {
        let w = data(m * k, 3);
        let x = data(k, 4);
        let mut y = vec![0f32; m];
        let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
        let mut g = c.benchmark_group(format!("gemv_{m}x{k}"));
        g.throughput(Throughput::Elements((2 * m * k) as u64));
        for v in dispatch::detected().into_iter().filter(|v| !v.is_int8()) {
            g.bench_function(v.name(), |bch| {
                bch.iter(|| gemv_with(v, &pw, black_box(&x), &mut y, GemvAdd::default()))
            });
        }
        // The sgemm it replaces at batch 1: one row times W^T.
        g.bench_function("sgemm_1_row", |bch| {
            bch.iter(|| {
                sgemm_with(
                    dispatch::selected(),
                    1.0,
                    MatRef::row_major(black_box(&x), 1, k),
                    MatRef::row_major(&w, m, k).t(),
                    0.0,
                    &mut y,
                    m,
                )
            })
        });
        g.finish();
    }
}

/// The input projection of a whole lstm_kws sequence (49 steps) through [`gemv_many_with`]:
/// 512 gate rows times 40 (layer 1) or 128 (layer 2) inputs, against 49 single products.
fn gemv_many(c: &mut Criterion) {
    let n = 49;
    for &(m, k) in &[(512, 40), (512, 128)] {
        let w = data(m * k, 3);
        let xs = data(n * k, 4);
        let bias = data(m, 5);
        let mut ys = vec![0f32; n * m];
        let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
        let mut g = c.benchmark_group(format!("gemv_many_{n}x{m}x{k}"));
        g.throughput(Throughput::Elements((2 * n * m * k) as u64));
        for v in dispatch::detected().into_iter().filter(|v| !v.is_int8()) {
            g.bench_function(v.name(), |bch| {
                bch.iter(|| gemv_many_with(v, &pw, n, black_box(&xs), &mut ys, m, Some(&bias)))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = peak, gemm, gemv, gemv_many
}
criterion_main!(benches);
