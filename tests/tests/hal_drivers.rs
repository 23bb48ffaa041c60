//! The CPU and null devices behind the Driver/Device traits: support answers, compile,
//! submit with bound buffers, the copy counter on the CPU path, fences, latency and failure
//! injection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgehal_core::buffer::{page_size, Buffer, CopyCounter, HostPtr, MemoryDomain};
use edgehal_core::driver::{
    Bindings, Device, DeviceKind, Driver, Subgraph, Support, SysRoot, TensorBuffer,
};
use edgehal_core::graph::{Dim, Graph, Node, ValueInfo};
use edgehal_core::{DType, Tensor};
use edgehal_cpu::device::{CpuDevice, CpuDriver};
use edgehal_null::{NullConfig, NullDriver};

/// x[2,3] -> Abs -> a ; a * w -> b ; Exp(b) -> c ; c + x -> y
fn graph() -> Graph {
    let mut g = Graph::new("t");
    let f = |g: &mut Graph, name: &str, shape: &[usize]| {
        let id = g.value_id(name);
        g.values[id] = ValueInfo {
            name: name.into(),
            dtype: Some(DType::F32),
            shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
        };
        id
    };
    let x = f(&mut g, "x", &[2, 3]);
    let a = f(&mut g, "a", &[2, 3]);
    let w = f(&mut g, "w", &[1]);
    let b = f(&mut g, "b", &[2, 3]);
    let c = f(&mut g, "c", &[2, 3]);
    let y = f(&mut g, "y", &[2, 3]);
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.opsets.insert(String::new(), 17);
    g.initializers
        .insert(w, Tensor::from_vec(vec![1], vec![2.0f32]).unwrap());
    let mk = |op: &str, i: Vec<usize>, o: usize| Node {
        op: op.into(),
        inputs: i.into_iter().map(Some).collect(),
        outputs: vec![Some(o)],
        ..Default::default()
    };
    g.nodes.push(mk("Abs", vec![x], a));
    g.nodes.push(mk("Mul", vec![a, w], b));
    g.nodes.push(mk("Exp", vec![b], c));
    g.nodes.push(mk("Add", vec![c, x], y));
    g
}

const X: [f32; 6] = [-1.0, 0.5, 2.0, -3.0, 0.0, 1.5];

fn expected() -> Vec<f32> {
    X.iter()
        .map(|&x| {
            let b = x.abs() * 2.0;
            b.exp() + x
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(tb: &TensorBuffer) -> Vec<f32> {
    let mut bytes = vec![0u8; tb.byte_len()];
    tb.buffer.read_into(0, &mut bytes).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

#[test]
fn cpu_driver_probes_one_device_and_answers_support() {
    let d = CpuDriver;
    let infos = d.probe(&SysRoot::live());
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].kind, DeviceKind::Cpu);
    assert!(infos[0]
        .memory_domains
        .contains(&MemoryDomain::HostImported));
    let dev = d.open(&infos[0]).unwrap();
    let g = graph();
    assert_eq!(dev.supports(&g.nodes[0], &g), Support::Yes);
    let bogus = Node {
        op: "NoSuchOp".into(),
        ..Default::default()
    };
    match dev.supports(&bogus, &g) {
        Support::No { reason } => assert!(reason.contains("NoSuchOp"), "{reason}"),
        Support::Yes => panic!("NoSuchOp supported"),
    }
}

#[test]
fn cpu_binding_caller_memory_costs_zero_copies() {
    let dev = CpuDevice::new();
    let g = graph();
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let c = CopyCounter::new();
    // Caller memory, page-aligned, imported without a copy.
    let page = page_size();
    let mut raw = vec![0u8; 24 + page];
    let off = raw.as_mut_ptr().align_offset(page);
    raw[off..off + 24].copy_from_slice(&f32_bytes(&X));
    let ptr = raw[off..].as_mut_ptr();
    // SAFETY: `raw` outlives every buffer and tensor made from it (all dropped before the end
    // of the test) and is not touched meanwhile.
    let input = Buffer::import_host_ptr(unsafe { HostPtr::new(ptr, 24) }, &c).unwrap();
    let input = TensorBuffer::new(input, DType::F32, vec![2, 3]).unwrap();

    // Output left to the device: handed back without a copy.
    let b = Bindings::new(vec![input.clone()], vec![None], &c);
    let fence = dev.submit(exe.as_ref(), &b).unwrap();
    assert!(fence.poll().is_some(), "CPU submit is synchronous");
    fence.wait(Some(Duration::from_secs(1))).unwrap();
    let out = b.output(0).unwrap();
    assert!(close(&read_f32(&out), &expected()));
    assert_eq!(
        (c.copies(), c.bytes()),
        (0, 0),
        "bound input + device output: no copies"
    );

    // Output bound to a caller buffer: the computed tensor is written into it, one copy.
    let ob = Buffer::alloc(24, &c).unwrap();
    let ob = TensorBuffer::new(ob, DType::F32, vec![2, 3]).unwrap();
    let b = Bindings::new(vec![input], vec![Some(ob.clone())], &c);
    dev.submit(exe.as_ref(), &b).unwrap().wait(None).unwrap();
    assert!(close(&read_f32(&ob), &expected()));
    assert_eq!((c.copies(), c.bytes()), (1, 24));
    drop(b);
    drop(out);
}

#[test]
fn cpu_subgraph_split_matches_the_whole_graph() {
    let dev = CpuDevice::new();
    let g = graph();
    let c = CopyCounter::new();
    let x = Tensor::from_vec(vec![2, 3], X.to_vec()).unwrap();
    let s1 = Subgraph::extract(&g, &[0, 1]).unwrap();
    let s2 = Subgraph::extract(&g, &[2, 3]).unwrap();
    assert_eq!(s1.output_names(), vec!["b"]);
    assert_eq!(s2.input_names(), vec!["b", "x"]);
    let e1 = dev.compile(&s1).unwrap();
    let e2 = dev.compile(&s2).unwrap();
    let xb = TensorBuffer::from_tensor(&x, &c);
    let b1 = Bindings::new(vec![xb.clone()], vec![None], &c);
    dev.submit(e1.as_ref(), &b1).unwrap().wait(None).unwrap();
    let mid = b1.output(0).unwrap();
    let b2 = Bindings::new(vec![mid, xb], vec![None], &c);
    dev.submit(e2.as_ref(), &b2).unwrap().wait(None).unwrap();
    assert!(close(&read_f32(&b2.output(0).unwrap()), &expected()));
    assert_eq!(c.copies(), 0);
    // Wrong binding counts are refused up front.
    let bad = Bindings::new(vec![], vec![None], &c);
    assert!(dev.submit(e1.as_ref(), &bad).is_err());
}

fn null_device(config: NullConfig) -> Arc<dyn Device> {
    let d = NullDriver::new(2, config);
    let infos = d.probe(&SysRoot::new("/nonexistent"));
    assert_eq!(
        infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        vec!["null0", "null1"]
    );
    d.open(&infos[0]).unwrap()
}

fn x_binding(c: &CopyCounter) -> TensorBuffer {
    TensorBuffer::from_tensor(&Tensor::from_vec(vec![2, 3], X.to_vec()).unwrap(), c)
}

#[test]
fn null_device_supports_everything_and_outputs_zeros_of_the_right_shape() {
    let dev = null_device(NullConfig::default());
    let g = graph();
    let bogus = Node {
        op: "AnythingAtAll".into(),
        ..Default::default()
    };
    assert_eq!(dev.supports(&bogus, &g), Support::Yes);
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let c = CopyCounter::new();
    let b = Bindings::new(vec![x_binding(&c)], vec![None], &c);
    dev.submit(exe.as_ref(), &b).unwrap().wait(None).unwrap();
    let out = b.output(0).unwrap();
    assert_eq!(out.shape, vec![2, 3]);
    assert_eq!(out.dtype, DType::F32);
    assert_eq!(read_f32(&out), vec![0.0; 6]);
}

#[test]
fn null_device_passthrough_and_latency() {
    let cfg = NullConfig {
        passthrough: HashSet::from(["Abs".to_string()]),
        op_latency: [("Abs".to_string(), Duration::from_millis(60))].into(),
        ..NullConfig::default()
    };
    let dev = null_device(cfg);
    let g = graph();
    let exe = dev.compile(&Subgraph::extract(&g, &[0]).unwrap()).unwrap();
    let c = CopyCounter::new();
    let b = Bindings::new(vec![x_binding(&c)], vec![None], &c);
    let t0 = Instant::now();
    let fence = dev.submit(exe.as_ref(), &b).unwrap();
    assert!(fence.poll().is_none(), "still running on the worker");
    let efd = fence.export_eventfd().unwrap();
    fence.wait(Some(Duration::from_secs(5))).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(60));
    assert!(edgehal_core::sys::mem::poll_readable(std::os::fd::AsFd::as_fd(&efd), 0).unwrap());
    assert_eq!(
        read_f32(&b.output(0).unwrap()),
        X.to_vec(),
        "passed through"
    );
}

#[test]
fn null_device_failure_injection() {
    let cfg = NullConfig {
        fail_on_submit: Some(2),
        lose_device_on_submit: Some(4),
        ..NullConfig::default()
    };
    let dev = null_device(cfg);
    let g = graph();
    let exe = dev.compile(&Subgraph::whole(&g)).unwrap();
    let c = CopyCounter::new();
    let run = || {
        let b = Bindings::new(vec![x_binding(&c)], vec![None], &c);
        dev.submit(exe.as_ref(), &b)
            .unwrap()
            .wait(Some(Duration::from_secs(5)))
    };
    assert!(run().is_ok());
    let e = run().unwrap_err().to_string();
    assert!(e.contains("injected failure on submit 2"), "{e}");
    assert!(run().is_ok(), "a single failure does not stick");
    let e = run().unwrap_err().to_string();
    assert!(e.contains("device lost"), "{e}");
    let e = run().unwrap_err().to_string();
    assert!(e.contains("device lost"), "lost stays lost: {e}");
}

#[test]
fn executables_are_not_interchangeable_between_devices() {
    let cpu = CpuDevice::new();
    let null = null_device(NullConfig::default());
    let g = graph();
    let exe = null.compile(&Subgraph::whole(&g)).unwrap();
    let c = CopyCounter::new();
    let b = Bindings::new(vec![x_binding(&c)], vec![None], &c);
    let e = cpu.submit(exe.as_ref(), &b).err().unwrap().to_string();
    assert!(e.contains("compiled by device 'null0'"), "{e}");
}
