//! Convolution kernel families in GFLOP/s (criterion "elem/s" = FLOP/s): the packed-weight
//! GEMM with a fused epilogue at ResNet-18 / MobileNet-v2 shapes, depthwise 3x3 and the
//! Winograd F(4x4, 3x3) and F(2x2, 3x3) layers (transforms + GEMMs; compare
//! `winograd_f23_c512_7` with `packed_512x49x4608`, the same layer as an im2col GEMM). Peak for comparison: `--bench gemm` (fma_peak group).
//!
//! `cargo bench -p edgehal-kernels --bench conv` (single thread).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use edgehal_kernels::conv::{self, Dw3x3, WinoInput, WinoOutput};
use edgehal_kernels::dispatch::{self, Variant};
use edgehal_kernels::gemm::MatRef;
use edgehal_kernels::packed::{gemm_packed, Activation, Epilogue, PackedA};

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

fn variants() -> Vec<Variant> {
    dispatch::detected()
        .into_iter()
        .filter(|&v| v != Variant::Portable)
        .collect()
}

fn packed(c: &mut Criterion) {
    // (m, n, k): 1x1 convs of MobileNet-v2 (expand 16->96 at 112x112, project 960->160 at
    // 7x7), ResNet-18 Winograd slices (64x196x64, 256x16x256) and a layer-4 im2col GEMM.
    let shapes = [
        (96, 12544, 16),
        (160, 49, 960),
        (64, 196, 64),
        (256, 16, 256),
        (512, 49, 4608),
        (64, 3136, 576),
    ];
    for &(m, n, k) in &shapes {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let bias = data(m, 3);
        let mut out = vec![0f32; m * n];
        let mut g = c.benchmark_group(format!("packed_{m}x{n}x{k}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for v in variants() {
            let pa = PackedA::with_variant(v, MatRef::row_major(&a, m, k)).unwrap();
            let epi = Epilogue {
                bias: Some(&bias),
                residual: None,
                act: Activation::Relu,
            };
            g.bench_function(v.name(), |bch| {
                bch.iter(|| gemm_packed(&pa, MatRef::row_major(&b, k, n), &mut out, n, &epi))
            });
        }
        g.finish();
    }
}

fn depthwise(c: &mut Criterion) {
    for &(ch, hw, s) in &[
        (32, 112, 1),
        (96, 112, 2),
        (576, 14, 1),
        (960, 7, 1),
        (144, 56, 2),
    ] {
        let out = (hw + 2 - 3) / s + 1;
        let x = data(ch * hw * hw, 1);
        let w = data(ch * 9, 2);
        let mut y = vec![0f32; ch * out * out];
        let mut g = c.benchmark_group(format!("depthwise3x3_c{ch}_{hw}_s{s}"));
        g.throughput(Throughput::Elements((2 * 9 * ch * out * out) as u64));
        for v in variants() {
            let p = Dw3x3 {
                x: &x,
                c: ch,
                h: hw,
                w: hw,
                stride: s,
                pad_top: 1,
                pad_left: 1,
                out_h: out,
                out_w: out,
                weight: &w,
                bias: None,
                act: Activation::Clip { lo: 0.0, hi: 6.0 },
            };
            g.bench_function(v.name(), |bch| {
                bch.iter(|| conv::depthwise3x3_with(v, black_box(&p), &mut y))
            });
        }
        g.finish();
    }
}

fn winograd(c: &mut Criterion) {
    // ResNet-18 layer 1: 64 channels, 56x56, pad 1. Throughput: the direct conv's FLOPs of the
    // whole layer (transforms + 36 GEMMs), so the number compares with a direct kernel.
    let (ch, hw) = (64, 56);
    let x = data(ch * hw * hw, 1);
    let w = data(ch * ch * 9, 2);
    let u = conv::wino_weights(&w, ch, ch).unwrap();
    let t1 = conv::wino_tiles(hw);
    let t = t1 * t1;
    let mut v = vec![0f32; 36 * ch * t];
    let mut mm = vec![0f32; 36 * ch * t];
    let mut y = vec![0f32; ch * hw * hw];
    let mut g = c.benchmark_group(format!("winograd_f43_c{ch}_{hw}"));
    g.throughput(Throughput::Elements((2 * 9 * ch * ch * hw * hw) as u64));
    for var in variants() {
        let packs: Vec<PackedA> = (0..36)
            .map(|xi| {
                PackedA::with_variant(var, MatRef::row_major(&u[xi * ch * ch..], ch, ch)).unwrap()
            })
            .collect();
        g.bench_function(var.name(), |bch| {
            bch.iter(|| {
                let pin = WinoInput {
                    x: &x,
                    c: ch,
                    h: hw,
                    w: hw,
                    pad_top: 1,
                    pad_left: 1,
                    tiles_y: t1,
                    tiles_x: t1,
                };
                conv::wino_input(var, &pin, &mut v);
                for (xi, pa) in packs.iter().enumerate() {
                    let bm = MatRef::row_major(&v[xi * ch * t..(xi + 1) * ch * t], ch, t);
                    gemm_packed(pa, bm, &mut mm[xi * ch * t..], t, &Epilogue::PLAIN);
                }
                let pout = WinoOutput {
                    mm: &mm,
                    m_total: ch,
                    first: 0,
                    m: ch,
                    tiles_y: t1,
                    tiles_x: t1,
                    out_h: hw,
                    out_w: hw,
                    bias: None,
                    residual: None,
                    act: Activation::Relu,
                };
                conv::wino_output(var, &pout, &mut y)
            })
        });
    }
    g.finish();
}

fn winograd2(c: &mut Criterion) {
    // ResNet-18 layer 4: 512 channels, 7x7, pad 1, F(2x2, 3x3) (16 tiles per GEMM). Throughput:
    // the direct conv's FLOPs, as for F(4x4, 3x3) above.
    let (ch, hw) = (512, 7);
    let x = data(ch * hw * hw, 1);
    let w = data(ch * ch * 9, 2);
    let u = conv::wino2_weights(&w, ch, ch).unwrap();
    let t1 = conv::wino2_tiles(hw);
    let t = t1 * t1;
    let mut v = vec![0f32; 16 * ch * t];
    let mut mm = vec![0f32; 16 * ch * t];
    let mut y = vec![0f32; ch * hw * hw];
    let mut g = c.benchmark_group(format!("winograd_f23_c{ch}_{hw}"));
    g.throughput(Throughput::Elements((2 * 9 * ch * ch * hw * hw) as u64));
    for var in variants() {
        let packs: Vec<PackedA> = (0..16)
            .map(|xi| {
                PackedA::with_variant(var, MatRef::row_major(&u[xi * ch * ch..], ch, ch)).unwrap()
            })
            .collect();
        g.bench_function(var.name(), |bch| {
            bch.iter(|| {
                let pin = WinoInput {
                    x: &x,
                    c: ch,
                    h: hw,
                    w: hw,
                    pad_top: 1,
                    pad_left: 1,
                    tiles_y: t1,
                    tiles_x: t1,
                };
                conv::wino2_input(&pin, &mut v);
                for (xi, pa) in packs.iter().enumerate() {
                    let bm = MatRef::row_major(&v[xi * ch * t..(xi + 1) * ch * t], ch, t);
                    gemm_packed(pa, bm, &mut mm[xi * ch * t..], t, &Epilogue::PLAIN);
                }
                let pout = WinoOutput {
                    mm: &mm,
                    m_total: ch,
                    first: 0,
                    m: ch,
                    tiles_y: t1,
                    tiles_x: t1,
                    out_h: hw,
                    out_w: hw,
                    bias: None,
                    residual: None,
                    act: Activation::Relu,
                };
                conv::wino2_output(&pout, &mut y)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = packed, depthwise, winograd, winograd2
}
criterion_main!(benches);
