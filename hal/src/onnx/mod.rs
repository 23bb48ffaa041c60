//! ONNX importer: `ModelProto` bytes -> [`Graph`].
//!
//! Decoding uses prost with message definitions written from `onnx.proto`'s public field
//! numbers ([`proto`]). Because the input is one [`Bytes`] holding the file (read through
//! io_uring into a page-aligned buffer, or mapped: [`crate::reactor::load_file`]), `raw_data`
//! of initializers is a slice of it: weights are never copied after the file is loaded.
//! External data files are loaded the same way, each file once per import.

pub mod proto;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use edgehal_core::graph::{Attr, Dim, Graph, Node};
use edgehal_core::tensor::checked_numel;
use edgehal_core::{DType, Error, Result, Tensor};
use prost::Message;

use proto::attr_type;

use crate::reactor::{load_file, FileLoad};

/// Deepest nesting of subgraphs (If/Loop/Scan bodies) accepted.
const MAX_GRAPH_DEPTH: usize = 32;

/// Decode an ONNX `ModelProto` into a graph; `dir` resolves external data files (read the
/// default way, [`FileLoad::Read`]).
pub fn import(bytes: Bytes, dir: Option<&Path>) -> Result<Graph> {
    import_with(bytes, dir, FileLoad::Read)
}

/// [`import`], loading external data files as `how` says.
pub fn import_with(bytes: Bytes, dir: Option<&Path>, how: FileLoad) -> Result<Graph> {
    if bytes.is_empty() {
        return Err(Error::parse("empty file"));
    }
    let model = proto::ModelProto::decode(bytes)
        .map_err(|e| Error::parse(format!("not a valid ONNX model: {e}")))?;
    let gp = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::parse("ONNX model has no graph"))?;
    let mut opsets = BTreeMap::new();
    for o in &model.opset_import {
        let d = if o.domain == "ai.onnx" {
            String::new()
        } else {
            o.domain.clone()
        };
        opsets.insert(d, o.version);
    }
    if opsets.is_empty() {
        // IR version 1/2 models predate opset_import; they are opset 1 era.
        opsets.insert(String::new(), 1);
    }
    let files = dir.map(|d| ExternalFiles {
        dir: d.to_path_buf(),
        how,
        loaded: RefCell::new(HashMap::new()),
    });
    let ctx = Ctx {
        files: files.as_ref(),
        functions: model
            .functions
            .iter()
            .map(|f| ((f.domain.clone(), f.name.clone()), f))
            .collect(),
    };
    let mut g = convert_graph(gp, &opsets, &ctx, 0)?;
    let md = &mut g.metadata;
    md.insert("format".into(), "onnx".into());
    md.insert("ir_version".into(), model.ir_version.to_string());
    for (k, v) in [
        ("producer_name", &model.producer_name),
        ("producer_version", &model.producer_version),
        ("domain", &model.domain),
        ("doc_string", &model.doc_string),
    ] {
        if !v.is_empty() {
            md.insert(k.into(), v.clone());
        }
    }
    if model.model_version != 0 {
        md.insert("model_version".into(), model.model_version.to_string());
    }
    for p in &model.metadata_props {
        md.insert(format!("metadata.{}", p.key), p.value.clone());
    }
    g.validate()?;
    Ok(g)
}

/// Decode a serialized `TensorProto` (the `.pb` files of ONNX test data). Returns its name too.
pub fn read_tensor_pb(bytes: Bytes) -> Result<(String, Tensor)> {
    let tp = proto::TensorProto::decode(bytes)
        .map_err(|e| Error::parse(format!("not a valid TensorProto: {e}")))?;
    let t = convert_tensor(&tp, None)?;
    Ok((tp.name.clone(), t))
}

/// Encode a tensor as a `TensorProto` (raw_data form).
pub fn write_tensor_pb(name: &str, t: &Tensor) -> Vec<u8> {
    let tp = proto::TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: t.dtype().onnx_code(),
        name: name.to_string(),
        raw_data: t.bytes().clone(),
        ..Default::default()
    };
    tp.encode_to_vec()
}

/// External data files of one import: the model's folder, each file loaded once.
struct ExternalFiles {
    dir: PathBuf,
    how: FileLoad,
    loaded: RefCell<HashMap<PathBuf, Bytes>>,
}

impl ExternalFiles {
    fn get(&self, rel: &Path) -> Result<(PathBuf, Bytes)> {
        let path = self.dir.join(rel);
        if let Some(b) = self.loaded.borrow().get(&path) {
            return Ok((path, b.clone()));
        }
        let b = load_file(&path, self.how)?;
        self.loaded.borrow_mut().insert(path.clone(), b.clone());
        Ok((path, b))
    }
}

struct Ctx<'a> {
    files: Option<&'a ExternalFiles>,
    #[allow(dead_code)]
    functions: HashMap<(String, String), &'a proto::FunctionProto>,
}

fn onnx_type_name(code: i32) -> &'static str {
    match code {
        8 => "STRING",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        17..=20 => "FLOAT8",
        21 => "UINT4",
        22 => "INT4",
        23 => "FLOAT4E2M1",
        _ => "UNKNOWN",
    }
}

fn dtype_of(code: i32, what: &str) -> Result<DType> {
    DType::from_onnx_code(code).ok_or_else(|| {
        Error::unsupported(format!(
            "{what}: data type {} ({code}) is not supported",
            onnx_type_name(code)
        ))
    })
}

fn convert_dims(dims: &[i64], what: &str) -> Result<Vec<usize>> {
    dims.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| Error::parse(format!("{what}: negative dimension {d}")))
        })
        .collect()
}

/// `TensorProto` -> [`Tensor`]; raw and external data are sliced, not copied.
fn convert_tensor(tp: &proto::TensorProto, files: Option<&ExternalFiles>) -> Result<Tensor> {
    let what = if tp.name.is_empty() {
        "tensor".to_string()
    } else {
        format!("tensor '{}'", tp.name)
    };
    let dtype = dtype_of(tp.data_type, &what)?;
    let shape = convert_dims(&tp.dims, &what)?;
    let n = checked_numel(&shape, dtype).map_err(|e| Error::parse(format!("{what}: {e}")))?;
    let nbytes = n * dtype.size();
    if tp.data_location == 1 {
        return external_tensor(tp, files, dtype, shape, nbytes, &what);
    }
    if !tp.raw_data.is_empty() || n == 0 {
        if tp.raw_data.len() != nbytes && !(n == 0 && tp.raw_data.is_empty()) {
            return Err(Error::parse(format!(
                "{what}: raw data has {} bytes, shape {shape:?} of {dtype} needs {nbytes}",
                tp.raw_data.len()
            )));
        }
        return Tensor::from_bytes(dtype, shape, tp.raw_data.clone());
    }
    let count_err = |got: usize| {
        Error::parse(format!(
            "{what}: {got} values stored, shape {shape:?} needs {n}"
        ))
    };
    match dtype {
        DType::F32 => {
            if tp.float_data.len() != n {
                return Err(count_err(tp.float_data.len()));
            }
            Tensor::from_vec(shape, tp.float_data.clone())
        }
        DType::F64 => {
            if tp.double_data.len() != n {
                return Err(count_err(tp.double_data.len()));
            }
            Tensor::from_vec(shape, tp.double_data.clone())
        }
        DType::I64 => {
            if tp.int64_data.len() != n {
                return Err(count_err(tp.int64_data.len()));
            }
            Tensor::from_vec(shape, tp.int64_data.clone())
        }
        DType::U32 | DType::U64 => {
            if tp.uint64_data.len() != n {
                return Err(count_err(tp.uint64_data.len()));
            }
            if dtype == DType::U32 {
                Tensor::from_vec(
                    shape,
                    tp.uint64_data
                        .iter()
                        .map(|&v| v as u32)
                        .collect::<Vec<u32>>(),
                )
            } else {
                Tensor::from_vec(shape, tp.uint64_data.clone())
            }
        }
        _ => {
            // int32_data carries every narrower type, f16/bf16 as their bit patterns.
            if tp.int32_data.len() != n {
                return Err(count_err(tp.int32_data.len()));
            }
            let v = &tp.int32_data;
            match dtype {
                DType::I32 => Tensor::from_vec(shape, v.clone()),
                DType::I16 => {
                    Tensor::from_vec(shape, v.iter().map(|&x| x as i16).collect::<Vec<_>>())
                }
                DType::U16 => {
                    Tensor::from_vec(shape, v.iter().map(|&x| x as u16).collect::<Vec<_>>())
                }
                DType::I8 => {
                    Tensor::from_vec(shape, v.iter().map(|&x| x as i8).collect::<Vec<_>>())
                }
                DType::U8 => {
                    Tensor::from_vec(shape, v.iter().map(|&x| x as u8).collect::<Vec<_>>())
                }
                DType::Bool => Tensor::from_vec_dtype(
                    DType::Bool,
                    shape,
                    v.iter().map(|&x| (x != 0) as u8).collect::<Vec<_>>(),
                ),
                DType::F16 => Tensor::from_vec(
                    shape,
                    v.iter()
                        .map(|&x| half::f16::from_bits(x as u16))
                        .collect::<Vec<_>>(),
                ),
                DType::BF16 => Tensor::from_vec(
                    shape,
                    v.iter()
                        .map(|&x| half::bf16::from_bits(x as u16))
                        .collect::<Vec<_>>(),
                ),
                _ => Err(Error::parse(format!("{what}: no data"))),
            }
        }
    }
}

fn external_tensor(
    tp: &proto::TensorProto,
    files: Option<&ExternalFiles>,
    dtype: DType,
    shape: Vec<usize>,
    nbytes: usize,
    what: &str,
) -> Result<Tensor> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for e in &tp.external_data {
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => {
                offset = e
                    .value
                    .parse()
                    .map_err(|_| Error::parse(format!("{what}: bad external offset")))?
            }
            "length" => {
                length = Some(
                    e.value
                        .parse::<u64>()
                        .map_err(|_| Error::parse(format!("{what}: bad external length")))?,
                )
            }
            _ => {}
        }
    }
    let location = location
        .ok_or_else(|| Error::parse(format!("{what}: external data without a location")))?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::parse(format!(
            "{what}: external data location '{location}' leaves the model's folder"
        )));
    }
    let files = files.ok_or_else(|| {
        Error::unsupported(format!(
            "{what}: external data '{location}' needs the model to be loaded from a file"
        ))
    })?;
    let (path, data) = files.get(rel)?;
    let len = length.unwrap_or(nbytes as u64);
    if len != nbytes as u64 {
        return Err(Error::parse(format!(
            "{what}: external length {len} but shape needs {nbytes} bytes"
        )));
    }
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= data.len() as u64)
        .ok_or_else(|| {
            Error::parse(format!(
                "{what}: external range {offset}+{len} is outside {} ({} bytes)",
                path.display(),
                data.len()
            ))
        })?;
    Tensor::from_bytes(dtype, shape, data.slice(offset as usize..end as usize))
}

fn apply_value_info(g: &mut Graph, vi: &proto::ValueInfoProto) -> Result<usize> {
    let id = g.value_id(&vi.name);
    if let Some(proto::type_proto::Value::TensorType(tt)) =
        vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        let info = &mut g.values[id];
        if tt.elem_type != 0 {
            info.dtype = DType::from_onnx_code(tt.elem_type);
        }
        if let Some(s) = &tt.shape {
            let dims = s
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                        Dim::Fixed(*v as usize)
                    }
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                        Dim::Sym(p.clone())
                    }
                    _ => Dim::Sym(String::new()),
                })
                .collect();
            info.shape = Some(dims);
        }
    }
    Ok(id)
}

fn convert_graph(
    gp: &proto::GraphProto,
    opsets: &BTreeMap<String, i64>,
    ctx: &Ctx<'_>,
    depth: usize,
) -> Result<Graph> {
    if depth > MAX_GRAPH_DEPTH {
        return Err(Error::parse(format!(
            "subgraphs nested deeper than {MAX_GRAPH_DEPTH}"
        )));
    }
    let mut g = Graph::new(gp.name.clone());
    g.opsets = opsets.clone();
    if !gp.sparse_initializer.is_empty() {
        return Err(Error::unsupported("sparse initializers"));
    }
    for init in &gp.initializer {
        if init.name.is_empty() {
            return Err(Error::parse("initializer without a name"));
        }
        let t = convert_tensor(init, ctx.files)?;
        let id = g.value_id(&init.name);
        g.values[id].dtype = Some(t.dtype());
        g.values[id].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
        g.initializers.insert(id, t);
    }
    for vi in &gp.input {
        if let Some(
            proto::type_proto::Value::SequenceType(_) | proto::type_proto::Value::MapType(_),
        ) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            return Err(Error::unsupported(format!(
                "graph input '{}': sequence and map inputs",
                vi.name
            )));
        }
        let known = g
            .find_value(&vi.name)
            .is_some_and(|id| g.initializers.contains_key(&id));
        let id = apply_value_info(&mut g, vi)?;
        if !known {
            g.inputs.push(id);
        }
    }
    for vi in &gp.value_info {
        apply_value_info(&mut g, vi)?;
    }
    for (k, np) in gp.node.iter().enumerate() {
        let what = format!("node {k} ({})", np.op_type);
        if np.op_type.is_empty() {
            return Err(Error::parse(format!("{what}: empty op_type")));
        }
        let inputs = np
            .input
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    Some(g.value_id(n))
                }
            })
            .collect();
        let outputs = np
            .output
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    Some(g.value_id(n))
                }
            })
            .collect();
        let mut attrs = BTreeMap::new();
        for a in &np.attribute {
            if !a.ref_attr_name.is_empty() {
                return Err(Error::unsupported(format!(
                    "{what}: attribute references outside functions"
                )));
            }
            attrs.insert(
                a.name.clone(),
                convert_attr(a, opsets, ctx, depth).map_err(|e| prefix(e, &what))?,
            );
        }
        let domain = if np.domain == "ai.onnx" {
            String::new()
        } else {
            np.domain.clone()
        };
        g.add_node(Node {
            name: np.name.clone(),
            op: np.op_type.clone(),
            domain,
            inputs,
            outputs,
            attrs,
        });
    }
    for vi in &gp.output {
        let id = apply_value_info(&mut g, vi)?;
        g.outputs.push(id);
    }
    Ok(g)
}

fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::Parse(m) => Error::Parse(format!("{what}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{what}: {m}")),
        other => other,
    }
}

fn convert_attr(
    a: &proto::AttributeProto,
    opsets: &BTreeMap<String, i64>,
    ctx: &Ctx<'_>,
    depth: usize,
) -> Result<Attr> {
    let mut ty = a.r#type;
    if ty == 0 {
        // Very old models leave the type unset; infer it from the populated field.
        ty = if a.t.is_some() {
            attr_type::TENSOR
        } else if a.g.is_some() {
            attr_type::GRAPH
        } else if !a.floats.is_empty() {
            attr_type::FLOATS
        } else if !a.ints.is_empty() {
            attr_type::INTS
        } else if !a.strings.is_empty() {
            attr_type::STRINGS
        } else if !a.s.is_empty() {
            attr_type::STRING
        } else if a.f != 0.0 {
            attr_type::FLOAT
        } else {
            attr_type::INT
        };
    }
    let name = &a.name;
    Ok(match ty {
        attr_type::FLOAT => Attr::Float(a.f),
        attr_type::INT => Attr::Int(a.i),
        attr_type::STRING => Attr::String(a.s.to_vec()),
        attr_type::TENSOR => Attr::Tensor(convert_tensor(
            a.t.as_ref()
                .ok_or_else(|| Error::parse(format!("attribute {name}: tensor missing")))?,
            ctx.files,
        )?),
        attr_type::GRAPH => Attr::Graph(Box::new(convert_graph(
            a.g.as_ref()
                .ok_or_else(|| Error::parse(format!("attribute {name}: graph missing")))?,
            opsets,
            ctx,
            depth + 1,
        )?)),
        attr_type::FLOATS => Attr::Floats(a.floats.clone()),
        attr_type::INTS => Attr::Ints(a.ints.clone()),
        attr_type::STRINGS => Attr::Strings(a.strings.iter().map(|s| s.to_vec()).collect()),
        attr_type::TENSORS => Attr::Tensors(
            a.tensors
                .iter()
                .map(|t| convert_tensor(t, ctx.files))
                .collect::<Result<Vec<_>>>()?,
        ),
        attr_type::GRAPHS => Attr::Graphs(
            a.graphs
                .iter()
                .map(|gp| convert_graph(gp, opsets, ctx, depth + 1))
                .collect::<Result<Vec<_>>>()?,
        ),
        other => {
            return Err(Error::unsupported(format!(
                "attribute {name}: attribute type {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_model() -> proto::ModelProto {
        let w = Tensor::from_vec(vec![2], vec![1.5f32, -2.0]).unwrap();
        proto::ModelProto {
            ir_version: 8,
            opset_import: vec![proto::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(proto::GraphProto {
                name: "g".into(),
                node: vec![proto::NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["y".into()],
                    op_type: "Mul".into(),
                    ..Default::default()
                }],
                initializer: vec![proto::TensorProto {
                    dims: vec![2],
                    data_type: 1,
                    name: "w".into(),
                    raw_data: w.bytes().clone(),
                    ..Default::default()
                }],
                input: vec![proto::ValueInfoProto {
                    name: "x".into(),
                    ..Default::default()
                }],
                output: vec![proto::ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn initializers_point_into_the_source_bytes() {
        let bytes = Bytes::from(tiny_model().encode_to_vec());
        let g = import(bytes.clone(), None).unwrap();
        let w = g.initializers.values().next().unwrap();
        let start = bytes.as_ptr() as usize;
        let p = w.bytes().as_ptr() as usize;
        assert!(p >= start && p < start + bytes.len(), "weights were copied");
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
        assert_eq!(g.opset(), 17);
        assert_eq!(g.inputs.len(), 1);
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(import(Bytes::new(), None).is_err());
        assert!(import(Bytes::from_static(b"\xff\xff\xff\xff garbage"), None).is_err());
        let full = tiny_model().encode_to_vec();
        for cut in [1, full.len() / 2, full.len() - 1] {
            assert!(
                import(Bytes::from(full[..cut].to_vec()), None).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn huge_declared_tensor_is_refused_without_allocating() {
        let mut m = tiny_model();
        let g = m.graph.as_mut().unwrap();
        g.initializer[0].dims = vec![1 << 20, 1 << 20];
        let e = import(Bytes::from(m.encode_to_vec()), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget") || e.contains("bytes"), "{e}");
    }

    #[test]
    fn external_data_is_mapped_and_confined_to_the_model_folder() {
        let dir = std::env::temp_dir().join(format!("edgehal-extdata-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut raw = vec![0xAAu8; 4];
        raw.extend_from_slice(&1.5f32.to_le_bytes());
        raw.extend_from_slice(&(-2.0f32).to_le_bytes());
        std::fs::write(dir.join("w.bin"), &raw).unwrap();
        let entry = |k: &str, v: &str| proto::StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        let mut m = tiny_model();
        let init = &mut m.graph.as_mut().unwrap().initializer[0];
        init.raw_data = Bytes::new();
        init.data_location = 1;
        init.external_data = vec![
            entry("location", "w.bin"),
            entry("offset", "4"),
            entry("length", "8"),
        ];
        std::fs::write(dir.join("m.onnx"), m.encode_to_vec()).unwrap();
        let model = crate::Model::load(dir.join("m.onnx")).unwrap();
        let w = model.graph.initializers.values().next().unwrap();
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
        // Escaping the folder, a short file and a model held in memory are refused.
        for (loc, off, want) in [
            ("../w.bin", "4", "leaves"),
            ("w.bin", "8", "outside"),
            ("/etc/passwd", "0", "leaves"),
        ] {
            let init = &mut m.graph.as_mut().unwrap().initializer[0];
            init.external_data = vec![
                entry("location", loc),
                entry("offset", off),
                entry("length", "8"),
            ];
            std::fs::write(dir.join("bad.onnx"), m.encode_to_vec()).unwrap();
            let e = crate::Model::load(dir.join("bad.onnx"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{loc}: {e}");
        }
        m.graph.as_mut().unwrap().initializer[0].external_data = vec![
            entry("location", "w.bin"),
            entry("offset", "4"),
            entry("length", "8"),
        ];
        let e = crate::Model::from_bytes(Bytes::from(m.encode_to_vec()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loaded from a file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn external_data_file_is_loaded_once_and_sliced() {
        let dir = std::env::temp_dir().join(format!("edgehal-extonce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut raw = vec![0u8; 4];
        for v in [1.5f32, -2.0, 3.0, 4.0] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(dir.join("w.bin"), &raw).unwrap();
        let entry = |k: &str, v: &str| proto::StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        let mut m = tiny_model();
        let gp = m.graph.as_mut().unwrap();
        let mut second = gp.initializer[0].clone();
        second.name = "w2".into();
        gp.initializer.push(second);
        for (init, off) in gp.initializer.iter_mut().zip(["4", "12"]) {
            init.raw_data = Bytes::new();
            init.data_location = 1;
            init.external_data = vec![
                entry("location", "w.bin"),
                entry("offset", off),
                entry("length", "8"),
            ];
        }
        std::fs::write(dir.join("m.onnx"), m.encode_to_vec()).unwrap();
        for how in [FileLoad::Read, FileLoad::Map] {
            let model = crate::Model::load_with(dir.join("m.onnx"), how).unwrap();
            let g = &model.graph;
            let w = &g.initializers[&g.find_value("w").unwrap()];
            let w2 = &g.initializers[&g.find_value("w2").unwrap()];
            assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
            assert_eq!(w2.to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
            // Both are slices of one load of the file, which starts on a page.
            let (a, b) = (w.bytes().as_ptr() as usize, w2.bytes().as_ptr() as usize);
            assert_eq!(b - a, 8, "{how:?}");
            assert_eq!((a - 4) % 4096, 0, "{how:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tensor_pb_round_trip() {
        let t = Tensor::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]).unwrap();
        let pb = write_tensor_pb("x", &t);
        let (name, back) = read_tensor_pb(Bytes::from(pb)).unwrap();
        assert_eq!(name, "x");
        assert_eq!(back.shape(), &[2, 2]);
        assert_eq!(back.to_vec::<i64>().unwrap(), vec![1, 2, 3, 4]);
    }
}
