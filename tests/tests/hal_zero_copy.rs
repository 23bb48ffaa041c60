//! Issue 3: on the CPU path a bound input AND a bound output cost zero copies. The classifiers'
//! final Gemm computes straight into the caller's output buffer; the copy counter of the
//! session proves it, and the bytes equal an ordinary (unbound) run.

use edgehal::{Model, Session, SessionOptions};
use edgehal_core::buffer::{page_size, Buffer, HostPtr};
use edgehal_core::driver::TensorBuffer;
use edgehal_core::{DType, Tensor};

/// Deterministic pseudo-random input in [-1, 1).
fn input(n: usize) -> Vec<f32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn check_model(name: &str) {
    let path = edgehal_tests::model(&format!("{name}.onnx"));
    if !path.exists() {
        assert!(!edgehal_tests::strict(), "{} missing", path.display());
        println!("SKIP {name}: {} missing", path.display());
        return;
    }
    let model = Model::load(&path).expect("load");
    let session = Session::new(&model, &SessionOptions::default()).expect("session");
    let inp = session.inputs().next().expect("one input").clone();
    let shape = inp.concrete_shape(1);
    let x = input(shape.iter().product());
    let out_info = session.outputs()[0].clone();
    let out_shape = out_info.concrete_shape(1);
    let out_bytes = out_shape.iter().product::<usize>() * 4;

    // Reference: an ordinary run with an owned input tensor.
    let want = session
        .run(&[(
            inp.name.as_str(),
            Tensor::from_vec(shape.clone(), x.clone()).expect("tensor"),
        )])
        .expect("unbound run");
    let want = want[0].1.bytes().to_vec();
    assert_eq!(want.len(), out_bytes);
    assert_eq!(session.copies().bytes(), 0);

    // Caller memory, page-aligned, imported without a copy, as the input.
    let c = session.copies().clone();
    let page = page_size();
    let xb = f32_bytes(&x);
    let mut raw = vec![0u8; xb.len() + page];
    let off = raw.as_mut_ptr().align_offset(page);
    raw[off..off + xb.len()].copy_from_slice(&xb);
    let ptr = raw[off..].as_mut_ptr();
    // SAFETY: `raw` outlives every buffer and tensor made from it (all dropped before the end
    // of this function) and is not touched while they live.
    let ib = Buffer::import_host_ptr(unsafe { HostPtr::new(ptr, xb.len()) }, &c).expect("import");
    let ib = TensorBuffer::new(ib, DType::F32, shape.clone()).expect("input binding");
    // A host buffer of the session's as the output.
    let ob = Buffer::alloc(out_bytes, &c).expect("alloc");
    let ob = TensorBuffer::new(ob, DType::F32, out_shape.clone()).expect("output binding");

    for round in 0..2 {
        let outs = session
            .run_bound(&[(inp.name.as_str(), ib.clone())], &[Some(ob.clone())])
            .expect("bound run");
        assert!(outs[0].buffer.same_memory(&ob.buffer));
        assert_eq!(
            (c.copies(), c.bytes()),
            (0, 0),
            "{name} round {round}: bound input and output must cost no copies"
        );
        let got = ob.buffer.to_vec().expect("read output");
        assert_eq!(
            got, want,
            "{name}: bound output differs from the unbound run"
        );
    }

    // An unbound output comes back as a buffer over the computed tensor: still no copy.
    let outs = session
        .run_bound(&[(inp.name.as_str(), ib.clone())], &[None])
        .expect("run with unbound output");
    assert_eq!(outs[0].buffer.to_vec().expect("read"), want);
    assert_eq!(c.bytes(), 0);
    drop(outs);

    // An output buffer that cannot be written in place (a read-only buffer) is refused with
    // an error, not a panic; a wrongly shaped binding likewise.
    let bad = TensorBuffer::new(
        Buffer::alloc(out_bytes + 4, &c).expect("alloc"),
        DType::F32,
        vec![out_bytes / 4 + 1],
    )
    .expect("binding");
    let e = session
        .run_bound(&[(inp.name.as_str(), ib.clone())], &[Some(bad)])
        .expect_err("wrong output shape");
    assert!(e.to_string().contains("bound as"), "{e}");
    drop(ib);
    drop(raw);
}

#[test]
fn mobilenet_v2_bound_input_and_output_cost_zero_copies() {
    check_model("mobilenet_v2");
}

#[test]
fn resnet18_bound_input_and_output_cost_zero_copies() {
    check_model("resnet18");
}

/// The fallback: an output whose producer cannot write in place (Relu) is copied once, and
/// the counter says so.
#[test]
fn output_of_an_op_without_in_place_support_costs_one_counted_copy() {
    use edgehal_core::graph::{Dim, Graph, Node, ValueInfo};
    let mut g = Graph::new("relu");
    let mut value = |name: &str| {
        let id = g.value_id(name);
        g.values[id] = ValueInfo {
            name: name.into(),
            dtype: Some(DType::F32),
            shape: Some(vec![Dim::Fixed(2), Dim::Fixed(3)]),
        };
        id
    };
    let (x, y) = (value("x"), value("y"));
    g.nodes.push(Node {
        op: "Relu".into(),
        inputs: vec![Some(x)],
        outputs: vec![Some(y)],
        ..Default::default()
    });
    g.inputs.push(x);
    g.outputs.push(y);
    g.opsets.insert(String::new(), 17);
    let model = Model {
        graph: g,
        format: edgehal::Format::Onnx,
        name: "relu".into(),
    };
    let session = Session::new(&model, &SessionOptions::default()).expect("session");
    let c = session.copies().clone();
    let xin = TensorBuffer::from_tensor(
        &Tensor::from_vec(vec![2, 3], vec![-1f32, 2., -3., 4., -5., 6.]).expect("tensor"),
        &c,
    );
    let ob = TensorBuffer::new(
        Buffer::alloc(24, &c).expect("alloc"),
        DType::F32,
        vec![2, 3],
    )
    .expect("binding");
    session
        .run_bound(&[("x", xin)], &[Some(ob.clone())])
        .expect("run");
    assert_eq!((c.copies(), c.bytes()), (1, 24));
    assert_eq!(
        ob.buffer.to_vec().expect("read"),
        f32_bytes(&[0., 2., 0., 4., 0., 6.])
    );
}
