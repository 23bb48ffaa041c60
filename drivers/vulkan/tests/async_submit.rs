//! Asynchronous submission: `submit` returns before the GPU finishes, several submissions are
//! in flight at once, their fences (eventfds the scheduler's reactor can poll) signal in
//! submission order, and every result is right. Plus the dma-buf import path.
//! Without a Vulkan device the tests print SKIP (and fail when `CI=true`).

use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use edgehal_core::buffer::{Buffer, CopyCounter};
use edgehal_core::driver::{Bindings, Device as _, Fence, Subgraph, TensorBuffer};
use edgehal_core::graph::{Graph, Node};
use edgehal_core::{DType, Tensor};
use edgehal_vulkan::{importable_buffer, Device};

fn device() -> Option<Arc<Device>> {
    static D: OnceLock<Option<Arc<Device>>> = OnceLock::new();
    D.get_or_init(|| {
        let sel = std::env::var("EDGEHAL_VK_DEVICE").unwrap_or_default();
        match edgehal_vulkan::open(&sel) {
            Ok(d) => Some(d),
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true but no Vulkan device: {e}");
                }
                println!("SKIP: no Vulkan device: {e}");
                None
            }
        }
    })
    .clone()
}

fn rand(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// y = relu(x @ w1) @ w2 with x [m, k], w1 [k, k], w2 [k, k]: enough work that a submission
/// on lavapipe takes milliseconds.
fn mlp(k: usize, w1: &[f32], w2: &[f32]) -> Graph {
    let mut g = Graph::new("mlp");
    g.opsets.insert(String::new(), 17);
    let x = g.value_id("x");
    let a = g.value_id("a");
    let b = g.value_id("b");
    let y = g.value_id("y");
    let w1i = g.value_id("w1");
    let w2i = g.value_id("w2");
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.initializers
        .insert(w1i, Tensor::from_vec(vec![k, k], w1.to_vec()).unwrap());
    g.initializers
        .insert(w2i, Tensor::from_vec(vec![k, k], w2.to_vec()).unwrap());
    let mk = |op: &str, i: Vec<usize>, o: usize| Node {
        op: op.into(),
        inputs: i.into_iter().map(Some).collect(),
        outputs: vec![Some(o)],
        ..Default::default()
    };
    g.nodes.push(mk("MatMul", vec![x, w1i], a));
    g.nodes.push(mk("Relu", vec![a], b));
    g.nodes.push(mk("MatMul", vec![b, w2i], y));
    g
}

fn reference(x: &[f32], w1: &[f32], w2: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mm = |a: &[f32], b: &[f32]| {
        let mut c = vec![0f32; m * k];
        for i in 0..m {
            for p in 0..k {
                let av = a[i * k + p];
                for j in 0..k {
                    c[i * k + j] += av * b[p * k + j];
                }
            }
        }
        c
    };
    let a: Vec<f32> = mm(x, w1).into_iter().map(|v| v.max(0.0)).collect();
    mm(&a, w2)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// Poll every fence until all are done; at each look, the done ones must be a prefix
/// (submission order). Returns how many looks saw at least one pending fence.
fn wait_in_order(fences: &[Fence]) -> usize {
    let start = Instant::now();
    let mut pending_looks = 0;
    loop {
        let done: Vec<bool> = fences.iter().map(|f| f.poll().is_some()).collect();
        let first_pending = done.iter().position(|d| !d).unwrap_or(done.len());
        assert!(
            done[first_pending..].iter().all(|d| !d),
            "fences signalled out of submission order: {done:?}"
        );
        if first_pending == done.len() {
            return pending_looks;
        }
        pending_looks += 1;
        // Sleep on the first pending fence's eventfd, as a reactor would.
        let efd = fences[first_pending].export_eventfd().unwrap();
        edgehal_core::sys::mem::poll_readable(efd.as_fd(), 50).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "fences did not signal"
        );
    }
}

#[test]
fn several_imported_submissions_in_flight_signal_in_order() {
    let Some(dev) = device() else { return };
    if !dev.can_import_host() {
        println!("SKIP: device lacks VK_EXT_external_memory_host");
        return;
    }
    // Enough work per submission that the last of five is still queued when submit returns:
    // small on lavapipe (a CPU), about a GFLOP on a real GPU.
    let (m, k) = if dev.phys().device_type == "cpu" {
        (64, 192)
    } else {
        (256, 1024)
    };
    let w1 = rand(1, k * k);
    let w2 = rand(2, k * k);
    let g = mlp(k, &w1, &w2);
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let counter = CopyCounter::new();
    const N: usize = 5;
    let mut xs = Vec::new();
    let mut binds = Vec::new();
    for s in 0..N {
        let x = Tensor::from_vec(vec![m, k], rand(10 + s as u64, m * k)).unwrap();
        let inb = importable_buffer(&dev, &x, &counter).unwrap();
        let out_bytes = (m * k * 4).next_multiple_of(dev.import_alignment());
        let out = Buffer::alloc(out_bytes, &counter).unwrap();
        let outb = TensorBuffer::new(out, DType::F32, vec![m, k]).unwrap();
        binds.push(Bindings::new(vec![inb], vec![Some(outb)], &counter));
        xs.push(x);
    }
    // Warm up (lowering, pipelines, one recording) so the timed part is pure submission.
    dev.submit(exe.as_ref(), &binds[0])
        .unwrap()
        .wait(Some(Duration::from_secs(60)))
        .unwrap();
    let before = counter.copies();
    let t0 = Instant::now();
    let fences: Vec<Fence> = binds
        .iter()
        .map(|b| dev.submit(exe.as_ref(), b).unwrap())
        .collect();
    let submit_time = t0.elapsed();
    // The last submission cannot be finished when submit returned: four others are queued
    // before it on the same queue. (A synchronous submit would have signalled it already.)
    let pending_right_after = fences[N - 1].poll().is_none();
    let looks = wait_in_order(&fences);
    let total = t0.elapsed();
    println!(
        "{N} submissions queued in {submit_time:?}, all done after {total:?} ({looks} looks saw pending work)"
    );
    assert!(
        pending_right_after,
        "submit must return before the work is done"
    );
    assert!(looks > 0);
    for f in &fences {
        f.wait(None).unwrap();
    }
    assert_eq!(
        counter.copies(),
        before,
        "imported buffers must not be copied"
    );
    for (s, b) in binds.iter().enumerate() {
        let got = b
            .output(0)
            .unwrap()
            .to_tensor()
            .unwrap()
            .to_f32()
            .into_owned();
        let want = reference(&xs[s].to_f32(), &w1, &w2, m, k);
        assert_close(&format!("submission {s}"), &got, &want);
    }
}

#[test]
fn staged_and_repeated_submissions_queue_safely() {
    let Some(dev) = device() else { return };
    let (m, k) = (33, 65); // odd sizes, not page multiples: staged in and out
    let w1 = rand(3, k * k);
    let w2 = rand(4, k * k);
    let g = mlp(k, &w1, &w2);
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let counter = CopyCounter::new();
    let xs: Vec<Tensor> = (0..4)
        .map(|s| Tensor::from_vec(vec![m, k], rand(20 + s, m * k)).unwrap())
        .collect();
    // Staged: each submission copies its input into the shared staging buffer, so a
    // submission waits for the previous one before overwriting it; outputs are read back
    // by the waiter thread before the fence signals.
    let binds: Vec<Bindings> = xs
        .iter()
        .map(|x| {
            Bindings::new(
                vec![TensorBuffer::from_tensor(x, &counter)],
                vec![None],
                &counter,
            )
        })
        .collect();
    let fences: Vec<Fence> = binds
        .iter()
        .map(|b| dev.submit(exe.as_ref(), b).unwrap())
        .collect();
    wait_in_order(&fences);
    for (s, b) in binds.iter().enumerate() {
        fences[s].wait(None).unwrap();
        let got = b
            .output(0)
            .unwrap()
            .to_tensor()
            .unwrap()
            .to_f32()
            .into_owned();
        assert_close(
            &format!("staged {s}"),
            &got,
            &reference(&xs[s].to_f32(), &w1, &w2, m, k),
        );
    }
    // The same input submitted twice back to back (fresh output slots): one recording,
    // resubmitted only after the first submission finished.
    let recs_before = exe_recordings(exe.as_ref());
    let again: Vec<Bindings> = (0..2)
        .map(|_| Bindings::new(binds[1].inputs().to_vec(), vec![None], &counter))
        .collect();
    let f: Vec<Fence> = again
        .iter()
        .map(|b| dev.submit(exe.as_ref(), b).unwrap())
        .collect();
    wait_in_order(&f);
    for (b, f) in again.iter().zip(&f) {
        f.wait(None).unwrap();
        let got = b
            .output(0)
            .unwrap()
            .to_tensor()
            .unwrap()
            .to_f32()
            .into_owned();
        assert_close(
            "resubmitted",
            &got,
            &reference(&xs[1].to_f32(), &w1, &w2, m, k),
        );
    }
    assert_eq!(
        exe_recordings(exe.as_ref()),
        recs_before,
        "staged runs replay one recording"
    );
}

fn exe_recordings(exe: &dyn edgehal_core::driver::Executable) -> usize {
    exe.as_any()
        .downcast_ref::<edgehal_vulkan::Executable>()
        .map_or(usize::MAX, |e| e.recordings())
}

#[test]
fn many_devices_share_one_completion_thread() {
    let Some(dev) = device() else { return };
    // A second logical device on the same GPU: both complete through the same waiter.
    let sel = std::env::var("EDGEHAL_VK_DEVICE").unwrap_or_default();
    let dev2 = edgehal_vulkan::open(&sel).unwrap();
    let threads = |name: &str| -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.trim() == name)
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let k = 16;
    let g = mlp(k, &rand(5, k * k), &rand(6, k * k));
    let counter = CopyCounter::new();
    let mut fences = Vec::new();
    for d in [&dev, &dev2, &dev, &dev2] {
        let exe = d.compile(&Subgraph::whole(&g)).unwrap();
        let x = Tensor::from_vec(vec![2, k], rand(7, 2 * k)).unwrap();
        let b = Bindings::new(
            vec![TensorBuffer::from_tensor(&x, &counter)],
            vec![None],
            &counter,
        );
        fences.push((d.submit(exe.as_ref(), &b).unwrap(), b, exe));
    }
    for (f, b, _) in &fences {
        f.wait(Some(Duration::from_secs(60))).unwrap();
        assert_eq!(b.output(0).unwrap().shape, vec![2, k]);
    }
    if std::path::Path::new("/proc/self/task").exists() {
        assert_eq!(
            threads("edgehal-vkwait"),
            1,
            "one completion thread for all Vulkan devices"
        );
    }
}

#[test]
fn dmabuf_import_or_a_clear_reason() {
    let Some(dev) = device() else { return };
    let why = dev.can_import_dmabuf();
    println!("dma-buf import: {why:?}");
    let p = dev.phys();
    // The answer follows the extensions the device reports.
    assert_eq!(
        why.is_ok(),
        p.external_memory_fd && p.external_memory_dma_buf
    );
    if let Err(w) = &why {
        assert!(w.starts_with("unavailable: "), "{w}");
        assert!(w.contains("VK_"), "{w}");
    }
    // A dma-buf from udmabuf (memfd pages), when the kernel offers /dev/udmabuf.
    let counter = CopyCounter::new();
    let n = 4096usize;
    let host = Buffer::alloc(n * 4, &counter).unwrap();
    let dbuf = match host.to_udmabuf() {
        Ok(b) => b,
        Err(e) => {
            println!("SKIP dma-buf run: {e}");
            assert!(
                !std::path::Path::new("/dev/udmabuf").exists(),
                "udmabuf exists but failed: {e}"
            );
            return;
        }
    };
    let x: Vec<f32> = rand(8, n);
    let xt = Tensor::from_vec(vec![n], x.clone()).unwrap();
    dbuf.store_tensor(&xt).unwrap();
    let mut g = Graph::new("relu");
    let xi = g.value_id("x");
    let y = g.value_id("y");
    g.inputs = vec![xi];
    g.outputs = vec![y];
    g.nodes.push(Node {
        op: "Relu".into(),
        inputs: vec![Some(xi)],
        outputs: vec![Some(y)],
        ..Default::default()
    });
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let b = Bindings::new(
        vec![TensorBuffer::new(dbuf, DType::F32, vec![n]).unwrap()],
        vec![None],
        &counter,
    );
    let before = counter.copies();
    dev.submit(exe.as_ref(), &b).unwrap().wait(None).unwrap();
    // Input imported (dma-buf or host pointer of its mapping), only the readback copies.
    assert_eq!(counter.copies() - before, 1);
    let got = b
        .output(0)
        .unwrap()
        .to_tensor()
        .unwrap()
        .to_f32()
        .into_owned();
    let want: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(got, want);
}
