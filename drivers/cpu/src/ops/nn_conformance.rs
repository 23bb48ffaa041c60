//! A stop-gap runner for ONNX node cases exported to a plain text form by a small Python
//! script (one node, its attributes, inputs and expected outputs). Ignored by default; run with
//! `OPS_CASES=/dir OPS_FILTER=test_conv cargo test -p edgehal-cpu conformance -- --ignored --nocapture`.

use edgehal_core::graph::{Attr, Node};
use edgehal_core::{DType, Tensor};

use crate::ops::{OpCtx, Registry};

fn parse_tensor(toks: &[&str]) -> Result<Tensor, String> {
    let dt = DType::from_name(toks[0]).ok_or(format!("dtype {}", toks[0]))?;
    let rank: usize = toks[1].parse().map_err(|e| format!("{e}"))?;
    let shape: Vec<usize> = toks[2..2 + rank]
        .iter()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let vals = &toks[3 + rank..];
    let f: Vec<f64> = vals
        .iter()
        .map(|s| s.parse::<f64>().unwrap_or(f64::NAN))
        .collect();
    let t = if dt.is_int() {
        let i: Vec<i64> = vals.iter().map(|s| s.parse::<i64>().unwrap_or(0)).collect();
        let u: Vec<u64> = vals.iter().map(|s| s.parse::<u64>().unwrap_or(0)).collect();
        if dt == DType::U64 {
            Tensor::from_vec(shape, u)
        } else {
            Tensor::from_vec(shape, i).and_then(|t| t.cast(dt))
        }
    } else if dt == DType::Bool {
        Tensor::from_bools(shape, f.iter().map(|&x| x != 0.0).collect())
    } else {
        Tensor::from_vec(shape, f).and_then(|t| t.cast(dt))
    };
    t.map_err(|e| e.to_string())
}

fn run_case(text: &str, reg: &Registry) -> Result<(), String> {
    let mut node = Node::default();
    let mut opset = 0;
    let mut ins: Vec<Option<Tensor>> = vec![];
    let mut outs: Vec<Option<Tensor>> = vec![];
    for line in text.lines() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        match toks.first().copied() {
            Some("op") => node.op = toks[1].to_string(),
            Some("domain") => node.domain = toks.get(1).unwrap_or(&"").to_string(),
            Some("opset") => opset = toks[1].parse().unwrap_or(0),
            Some("attr") => {
                let v = &toks[3..];
                let a = match toks[2] {
                    "i" => Attr::Int(v[0].parse().unwrap_or(0)),
                    "f" => Attr::Float(v[0].parse().unwrap_or(0.0)),
                    "s" => Attr::String(v.join(" ").into_bytes()),
                    "ints" => Attr::Ints(v.iter().map(|s| s.parse().unwrap_or(0)).collect()),
                    "floats" => Attr::Floats(v.iter().map(|s| s.parse().unwrap_or(0.0)).collect()),
                    "strings" => Attr::Strings(v.iter().map(|s| s.as_bytes().to_vec()).collect()),
                    "t" => Attr::Tensor(parse_tensor(v)?),
                    o => return Err(format!("attr kind {o}")),
                };
                node.attrs.insert(toks[1].to_string(), a);
            }
            Some("in") => ins.push(if toks[2] == "none" {
                None
            } else {
                Some(parse_tensor(&toks[2..])?)
            }),
            Some("out") => outs.push(if toks[2] == "none" {
                None
            } else {
                Some(parse_tensor(&toks[2..])?)
            }),
            _ => {}
        }
    }
    node.outputs = outs
        .iter()
        .enumerate()
        .map(|(i, o)| o.as_ref().map(|_| i))
        .collect();
    node.inputs = ins
        .iter()
        .enumerate()
        .map(|(i, o)| o.as_ref().map(|_| i))
        .collect();
    let f = reg
        .get(&node.domain, &node.op)
        .ok_or(format!("op {} not registered", node.op))?;
    let ctx = OpCtx {
        node: &node,
        opset,
        subgraph: None,
    };
    let refs: Vec<Option<&Tensor>> = ins.iter().map(|o| o.as_ref()).collect();
    let got = f(&ctx, &refs).map_err(|e| format!("error: {e}"))?;
    for (k, want) in outs.iter().enumerate() {
        let Some(want) = want else { continue };
        let g = got.get(k).ok_or(format!("output {k} missing"))?;
        if g.dtype() != want.dtype() || g.shape() != want.shape() {
            return Err(format!(
                "output {k}: got {} {:?}, want {} {:?}",
                g.dtype(),
                g.shape(),
                want.dtype(),
                want.shape()
            ));
        }
        let (gv, wv) = (g.to_f64_vec(), want.to_f64_vec());
        for (i, (&a, &b)) in gv.iter().zip(&wv).enumerate() {
            let ok = if want.dtype().is_float() {
                (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs()
            } else {
                a == b
            };
            if !ok {
                return Err(format!("output {k}[{i}]: got {a}, want {b}"));
            }
        }
    }
    Ok(())
}

#[test]
#[ignore]
fn onnx_node_cases() {
    let dir = std::env::var("OPS_CASES").unwrap_or_else(|_| "/tmp/ops-a/cases".into());
    let filter = std::env::var("OPS_FILTER").unwrap_or_default();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("no cases in {dir}");
        return;
    };
    let mut names: Vec<_> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| filter.split(',').any(|f| n.starts_with(f)))
        })
        .collect();
    names.sort();
    let reg = Registry::new();
    let (mut pass, mut fail) = (0, 0);
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let name = p
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        match std::panic::catch_unwind(|| run_case(&text, &reg)) {
            Ok(Ok(())) => pass += 1,
            Ok(Err(e)) => {
                fail += 1;
                println!("FAIL {name}: {}", e.chars().take(300).collect::<String>());
            }
            Err(_) => {
                fail += 1;
                println!("PANIC {name}");
            }
        }
    }
    println!("passed {pass}, failed {fail}");
}
