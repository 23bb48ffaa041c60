//! TFLite importer (flatbuffers, table layouts from the public schema's field ids).
//!
//! - The file is read through [`fb`], a bounds-checked flatbuffer reader: every offset and length
//!   is checked, so a truncated or hostile file is an `Err(Error::Parse)`, never a panic.
//! - Constant tensors point into the file's bytes (`Bytes::slice`): weights are never copied.
//! - Layout stays NHWC. Every builtin op becomes a node in the `tflite` domain named after the op
//!   (`Conv2D`, `FullyConnected`, ...) carrying the TFLite options as attributes, plus the
//!   quantization parameters of its inputs and outputs (`in{k}_scale`, `in{k}_zp`, `in{k}_axis`,
//!   `out{k}_...`), which the quantized kernels need. Custom ops are kept as `custom:<name>`.

mod fb;

use std::collections::BTreeMap;

use bytes::Bytes;
use edgehal_core::graph::Dim;
use edgehal_core::{Attr, DType, Error, Graph, Node, Quant, Result, Tensor, ValueId};

use fb::Table;

/// The domain of every node the importer emits.
pub const DOMAIN: &str = "tflite";

/// Variable tensors (recurrent state) are allocated at import; larger ones are refused.
const MAX_VARIABLE_BYTES: usize = 64 << 20;

/// Subgraph nesting deeper than this is refused (cycles are detected separately).
const MAX_SUBGRAPH_DEPTH: usize = 32;

/// True when `bytes` carries the TFLite file identifier `TFL3` at offset 4.
pub fn is_tflite(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[4..8] == b"TFL3"
}

fn perr(msg: impl Into<String>) -> Error {
    Error::Parse(msg.into())
}

/// Decode a `.tflite` flatbuffer into a graph.
pub fn import(bytes: Bytes) -> Result<Graph> {
    if bytes.len() < 8 {
        return Err(perr(format!(
            "file of {} bytes is too short for a TFLite model",
            bytes.len()
        )));
    }
    if &bytes[4..8] != b"TFL3" {
        return Err(perr(format!(
            "not a TFLite file: identifier is {:?}, expected \"TFL3\"",
            String::from_utf8_lossy(&bytes[4..8])
        )));
    }
    let model = Table::root(&bytes)?;
    let version = model.u32(0, 0)?;
    let ctx = Ctx::new(&bytes, &model)?;
    let subgraphs = model.tables(2)?;
    if subgraphs.is_empty() {
        return Err(perr("model has no subgraphs"));
    }
    let mut st = SubState::default();
    let mut g = ctx.subgraph(&subgraphs, 0, &mut st)?;
    g.opsets.insert(DOMAIN.to_string(), version as i64);
    g.metadata
        .insert("tflite.version".into(), version.to_string());
    if let Some(d) = model.string(3)? {
        g.metadata.insert("description".into(), d);
    }
    // Metadata entries: name -> buffer (kept as text when it is short and printable).
    for m in model.tables(6)? {
        let name = m.string(0)?.unwrap_or_default();
        let b = m.u32(1, 0)? as usize;
        let v = match ctx.buffer_range(b)? {
            Some(r)
                if r.len() <= 256
                    && bytes[r.clone()]
                        .iter()
                        .all(|c| c.is_ascii_graphic() || *c == 0 || *c == b' ') =>
            {
                String::from_utf8_lossy(&bytes[r])
                    .trim_end_matches('\0')
                    .to_string()
            }
            Some(r) => format!("<{} bytes>", r.len()),
            None => String::new(),
        };
        g.metadata.insert(format!("metadata.{name}"), v);
    }
    // Signature defs: names of inputs/outputs as the converter's signature knows them.
    let sg0_tensors = subgraphs[0].tables(0)?;
    for s in model.tables(7)? {
        let key = s.string(2)?.unwrap_or_default();
        let sub = s.u32(4, 0)?;
        if sub != 0 {
            continue;
        }
        for (field, what) in [(0, "inputs"), (1, "outputs")] {
            let mut parts = Vec::new();
            for tm in s.tables(field)? {
                let name = tm.string(0)?.unwrap_or_default();
                let ti = tm.u32(1, 0)? as usize;
                let tensor = sg0_tensors.get(ti).ok_or_else(|| {
                    perr(format!("signature '{key}': tensor index {ti} out of range"))
                })?;
                let tname = tensor.string(3)?.unwrap_or_else(|| format!("t{ti}"));
                parts.push(format!("{name}={tname}"));
            }
            g.metadata
                .insert(format!("signature.{key}.{what}"), parts.join(","));
        }
    }
    g.validate()?;
    Ok(g)
}

/// Subgraphs being built (for cycle detection) and those already built (each is built once).
#[derive(Default)]
struct SubState {
    stack: Vec<usize>,
    memo: std::collections::HashMap<usize, Graph>,
}

struct OpCode {
    builtin: i32,
    custom: Option<String>,
    version: i32,
}

struct Ctx<'a> {
    bytes: &'a Bytes,
    opcodes: Vec<OpCode>,
    buffers: Vec<Table<'a>>,
}

fn dtype_of(t: i8) -> Result<DType> {
    Ok(match t {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::I32,
        3 => DType::U8,
        4 => DType::I64,
        6 => DType::Bool,
        7 => DType::I16,
        9 => DType::I8,
        10 => DType::F64,
        12 => DType::U64,
        15 => DType::U32,
        16 => DType::U16,
        18 => DType::BF16,
        5 => return Err(Error::unsupported("string tensors")),
        8 | 11 => return Err(Error::unsupported("complex tensors")),
        13 | 14 => return Err(Error::unsupported("resource/variant tensors")),
        17 => return Err(Error::unsupported("int4 tensors")),
        t => return Err(perr(format!("unknown tensor type {t}"))),
    })
}

fn act_name(a: i8) -> &'static str {
    match a {
        1 => "RELU",
        2 => "RELU_N1_TO_1",
        3 => "RELU6",
        4 => "TANH",
        5 => "SIGN_BIT",
        _ => "NONE",
    }
}

fn padding_name(p: i8) -> &'static str {
    if p == 1 {
        "VALID"
    } else {
        "SAME"
    }
}

/// Builtin op codes the importer names (others are kept as `builtin_<code>`).
fn builtin_name(code: i32) -> Option<&'static str> {
    Some(match code {
        0 => "Add",
        1 => "AveragePool2D",
        2 => "Concatenation",
        3 => "Conv2D",
        4 => "DepthwiseConv2D",
        5 => "DepthToSpace",
        6 => "Dequantize",
        8 => "Floor",
        9 => "FullyConnected",
        14 => "Logistic",
        17 => "MaxPool2D",
        18 => "Mul",
        19 => "Relu",
        20 => "ReluN1To1",
        21 => "Relu6",
        22 => "Reshape",
        23 => "ResizeBilinear",
        25 => "Softmax",
        26 => "SpaceToDepth",
        28 => "Tanh",
        34 => "Pad",
        36 => "Gather",
        39 => "Transpose",
        40 => "Mean",
        41 => "Sub",
        42 => "Div",
        43 => "Squeeze",
        44 => "UnidirectionalSequenceLstm",
        45 => "StridedSlice",
        47 => "Exp",
        49 => "Split",
        50 => "LogSoftmax",
        53 => "Cast",
        54 => "Prelu",
        55 => "Maximum",
        56 => "ArgMax",
        57 => "Minimum",
        59 => "Neg",
        60 => "PadV2",
        65 => "Slice",
        67 => "TransposeConv",
        70 => "ExpandDims",
        74 => "Sum",
        75 => "Sqrt",
        76 => "Rsqrt",
        79 => "ArgMin",
        82 => "ReduceMax",
        83 => "Pack",
        88 => "Unpack",
        89 => "ReduceMin",
        92 => "Square",
        97 => "ResizeNearestNeighbor",
        98 => "LeakyRelu",
        99 => "SquaredDifference",
        101 => "Abs",
        102 => "SplitV",
        114 => "Quantize",
        117 => "HardSwish",
        118 => "If",
        119 => "While",
        126 => "BatchMatMul",
        129 => "CallOnce",
        _ => return None,
    })
}

/// Custom ops that are reported by name when run (see the CPU driver's `tflite` ops).
pub const KNOWN_CUSTOM_OPS: &[&str] = &[
    "edgetpu-custom-op",
    "Convolution2DTransposeBias",
    "TFLite_Detection_PostProcess",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
];

impl<'a> Ctx<'a> {
    fn new(bytes: &'a Bytes, model: &Table<'a>) -> Result<Self> {
        let mut opcodes = Vec::new();
        for (i, oc) in model.tables(1)?.into_iter().enumerate() {
            let dep = oc.i8(0, 0)? as i32;
            let builtin = oc.i32(3, 0)?.max(dep);
            let custom = oc.string(1)?;
            let version = oc.i32(2, 1)?;
            if builtin < 0 {
                return Err(perr(format!(
                    "operator code {i}: negative builtin code {builtin}"
                )));
            }
            opcodes.push(OpCode {
                builtin,
                custom,
                version,
            });
        }
        Ok(Ctx {
            bytes,
            opcodes,
            buffers: model.tables(4)?,
        })
    }

    /// Byte range of buffer `b`'s data, None when empty.
    fn buffer_range(&self, b: usize) -> Result<Option<std::ops::Range<usize>>> {
        let Some(buf) = self.buffers.get(b) else {
            return Err(perr(format!(
                "buffer index {b} out of range ({} buffers)",
                self.buffers.len()
            )));
        };
        if let Some(r) = buf.byte_range(0)? {
            if !r.is_empty() {
                return Ok(Some(r));
            }
        }
        let off = buf.u64(1, 0)?;
        let size = buf.u64(2, 0)?;
        if off > 1 && size > 0 {
            let end = off
                .checked_add(size)
                .filter(|&e| e <= self.bytes.len() as u64)
                .ok_or_else(|| {
                    perr(format!(
                        "buffer {b}: offset {off} + size {size} is outside the {}-byte file",
                        self.bytes.len()
                    ))
                })?;
            return Ok(Some(off as usize..end as usize));
        }
        Ok(None)
    }

    fn subgraph(&self, all: &[Table<'a>], index: usize, st: &mut SubState) -> Result<Graph> {
        if let Some(g) = st.memo.get(&index) {
            return Ok(g.clone());
        }
        let stack = &mut st.stack;
        if stack.contains(&index) {
            return Err(perr(format!(
                "cyclic subgraph reference: subgraph {index} refers back to itself (via {stack:?})"
            )));
        }
        if stack.len() >= MAX_SUBGRAPH_DEPTH {
            return Err(perr("subgraphs nested too deeply"));
        }
        let sg = all.get(index).ok_or_else(|| {
            perr(format!(
                "subgraph index {index} out of range ({} subgraphs)",
                all.len()
            ))
        })?;
        stack.push(index);
        let r = self.subgraph_inner(all, index, sg, st);
        st.stack.pop();
        if let Ok(g) = &r {
            st.memo.insert(index, g.clone());
        }
        r
    }

    fn subgraph_inner(
        &self,
        all: &[Table<'a>],
        index: usize,
        sg: &Table<'a>,
        st: &mut SubState,
    ) -> Result<Graph> {
        let name = sg.string(4)?.unwrap_or_else(|| format!("subgraph{index}"));
        let mut g = Graph::new(name);
        g.opsets.insert(DOMAIN.to_string(), 1);
        let tensors = sg.tables(0)?;
        let mut ids: Vec<ValueId> = Vec::with_capacity(tensors.len());
        let mut quants: Vec<Option<Quant>> = Vec::with_capacity(tensors.len());
        // The main graph's inputs, whose dynamic signatures are kept for error messages (a
        // feed of another size is refused, not resized).
        let main_inputs = if index == 0 {
            sg.i32s(1)?.unwrap_or_default()
        } else {
            Vec::new()
        };
        for (ti, t) in tensors.iter().enumerate() {
            let tname = t.string(3)?.unwrap_or_default();
            let tname = if tname.is_empty() {
                format!("t{ti}")
            } else {
                tname
            };
            let id = if g.find_value(&tname).is_some() {
                g.new_value(&tname)
            } else {
                g.value_id(&tname)
            };
            ids.push(id);
            let ctxt = |e: Error| match e {
                Error::Parse(m) => perr(format!("tensor {ti} '{tname}': {m}")),
                Error::Unsupported(m) => Error::Unsupported(format!("tensor {ti} '{tname}': {m}")),
                o => o,
            };
            let dtype = dtype_of(t.i8(1, 0)?).map_err(ctxt)?;
            let shape_raw = t.i32s(0)?.unwrap_or_default();
            let sig = t.i32s(7)?;
            let mut dims = Vec::with_capacity(shape_raw.len());
            for (k, &d) in shape_raw.iter().enumerate() {
                // A dim the converter marked dynamic (signature -1; Keras' batch dim from
                // `from_keras_model`) takes the size stored in `shape` in the main graph, as the
                // TFLite interpreter allocates it before any ResizeInputTensor: symbolic, it
                // kept every layer off the fixed-shape kernels (a MobileNetV2 ran 3.5x slower).
                // Control-flow bodies (index > 0) are resized at run time and stay symbolic.
                let dynamic = sig.as_ref().and_then(|s| s.get(k)).is_some_and(|&s| s < 0);
                if d < 0 || (dynamic && (index > 0 || d == 0)) {
                    dims.push(Dim::Sym(String::new()));
                } else {
                    dims.push(Dim::Fixed(d as usize));
                }
            }
            let quant = match t.table(4)? {
                Some(q) => read_quant(&q, shape_raw.len()).map_err(ctxt)?,
                None => None,
            };
            let b = t.u32(2, 0)? as usize;
            if let Some(r) = self.buffer_range(b).map_err(ctxt)? {
                let shape: Vec<usize> = shape_raw
                    .iter()
                    .map(|&d| {
                        usize::try_from(d).map_err(|_| {
                            perr(format!(
                                "tensor {ti} '{tname}': constant has negative dim {d}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                let mut tensor =
                    Tensor::from_bytes(dtype, shape, self.bytes.slice(r)).map_err(ctxt)?;
                tensor.quant = quant.clone();
                g.initializers.insert(id, tensor);
            } else if t.i8(5, 0)? != 0 {
                // A variable tensor (LSTM state): starts at zero for each run.
                let shape: Vec<usize> = shape_raw
                    .iter()
                    .map(|&d| {
                        usize::try_from(d).map_err(|_| {
                            perr(format!("tensor {ti} '{tname}': variable has dim {d}"))
                        })
                    })
                    .collect::<Result<_>>()?;
                let bytes = edgehal_core::tensor::checked_numel(&shape, dtype)? * dtype.size();
                if bytes > MAX_VARIABLE_BYTES {
                    return Err(perr(format!(
                        "tensor {ti} '{tname}': variable of {bytes} bytes is too large"
                    )));
                }
                let mut tensor = Tensor::zeros(dtype, shape)?;
                tensor.quant = quant.clone();
                g.initializers.insert(id, tensor);
            }
            if let Some(sig) = sig.as_ref().filter(|s| s.iter().any(|&d| d < 0)) {
                if main_inputs.contains(&(ti as i32)) {
                    let dims: Vec<String> = sig.iter().map(i32::to_string).collect();
                    let key = format!("tflite.shape_signature.{}", g.values[id].name);
                    g.metadata.insert(key, dims.join(","));
                }
            }
            let vi = &mut g.values[id];
            vi.dtype = Some(dtype);
            vi.shape = Some(dims);
            quants.push(quant);
        }
        let lookup = |list: Option<Vec<i32>>, what: &str| -> Result<Vec<Option<usize>>> {
            list.unwrap_or_default()
                .into_iter()
                .map(|i| {
                    if i == -1 {
                        Ok(None)
                    } else if i >= 0 && (i as usize) < ids.len() {
                        Ok(Some(i as usize))
                    } else {
                        Err(perr(format!(
                            "{what}: tensor index {i} out of range ({} tensors)",
                            ids.len()
                        )))
                    }
                })
                .collect()
        };
        for i in lookup(sg.i32s(1)?, "subgraph inputs")?
            .into_iter()
            .flatten()
        {
            if !g.initializers.contains_key(&ids[i]) {
                g.inputs.push(ids[i]);
            }
        }
        for i in lookup(sg.i32s(2)?, "subgraph outputs")?
            .into_iter()
            .flatten()
        {
            g.outputs.push(ids[i]);
        }
        for (oi, op) in sg.tables(3)?.into_iter().enumerate() {
            let ins = lookup(op.i32s(1)?, &format!("operator {oi} inputs"))?;
            let outs = lookup(op.i32s(2)?, &format!("operator {oi} outputs"))?;
            let oc_i = op.u32(0, 0)? as usize;
            let oc = self.opcodes.get(oc_i).ok_or_else(|| {
                perr(format!(
                    "operator {oi}: opcode index {oc_i} out of range ({} operator codes)",
                    self.opcodes.len()
                ))
            })?;
            let mut node = Node {
                name: outs
                    .first()
                    .copied()
                    .flatten()
                    .map(|o| g.values[ids[o]].name.clone())
                    .unwrap_or_default(),
                domain: DOMAIN.to_string(),
                inputs: ins.iter().map(|i| i.map(|i| ids[i])).collect(),
                outputs: outs.iter().map(|o| o.map(|o| ids[o])).collect(),
                ..Default::default()
            };
            for (k, i) in ins.iter().enumerate() {
                if let Some(q) = i.and_then(|i| quants[i].as_ref()) {
                    put_quant(&mut node.attrs, &format!("in{k}"), q);
                }
            }
            for (k, o) in outs.iter().enumerate() {
                let Some(o) = *o else { continue };
                if let Some(q) = quants[o].as_ref() {
                    put_quant(&mut node.attrs, &format!("out{k}"), q);
                }
                if let Some(d) = g.values[ids[o]].dtype {
                    node.attrs.insert(
                        format!("out{k}_dtype"),
                        Attr::String(d.name().as_bytes().to_vec()),
                    );
                }
            }
            node.attrs
                .insert("version".into(), Attr::Int(oc.version as i64));
            if oc.builtin == 32 {
                let cname = oc.custom.clone().unwrap_or_default();
                node.op = format!("custom:{cname}");
                if let Some(r) = op.byte_range(5)? {
                    node.attrs.insert(
                        "custom_options".into(),
                        Attr::String(self.bytes[r].to_vec()),
                    );
                }
            } else {
                node.op = builtin_name(oc.builtin)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("builtin_{}", oc.builtin));
                let opts = op.table(4)?;
                self.options(oc.builtin, opts, &mut node.attrs, all, st)
                    .map_err(|e| match e {
                        Error::Parse(m) => perr(format!("operator {oi} ({}): {m}", node.op)),
                        o => o,
                    })?;
            }
            g.add_node(node);
        }
        Ok(g)
    }

    fn options(
        &self,
        code: i32,
        o: Option<Table<'a>>,
        a: &mut BTreeMap<String, Attr>,
        all: &[Table<'a>],
        st: &mut SubState,
    ) -> Result<()> {
        let i32o = |id: usize, d: i32| -> Result<i64> {
            Ok(match &o {
                Some(t) => t.i32(id, d)? as i64,
                None => d as i64,
            })
        };
        let i8o = |id: usize| -> Result<i8> {
            Ok(match &o {
                Some(t) => t.i8(id, 0)?,
                None => 0,
            })
        };
        let f32o = |id: usize, d: f32| -> Result<f32> {
            Ok(match &o {
                Some(t) => t.f32(id, d)?,
                None => d,
            })
        };
        let act = |a: &mut BTreeMap<String, Attr>, id: usize| -> Result<()> {
            a.insert(
                "fused_activation_function".into(),
                Attr::String(act_name(i8o(id)?).as_bytes().to_vec()),
            );
            Ok(())
        };
        let int = |a: &mut BTreeMap<String, Attr>, k: &str, v: i64| {
            a.insert(k.into(), Attr::Int(v));
        };
        let pad = |a: &mut BTreeMap<String, Attr>, id: usize| -> Result<()> {
            a.insert(
                "padding".into(),
                Attr::String(padding_name(i8o(id)?).as_bytes().to_vec()),
            );
            Ok(())
        };
        match code {
            0 | 18 | 41 | 42 => act(a, 0)?,
            1 | 17 => {
                pad(a, 0)?;
                int(a, "stride_w", i32o(1, 0)?);
                int(a, "stride_h", i32o(2, 0)?);
                int(a, "filter_width", i32o(3, 0)?);
                int(a, "filter_height", i32o(4, 0)?);
                act(a, 5)?;
            }
            2 => {
                int(a, "axis", i32o(0, 0)?);
                act(a, 1)?;
            }
            3 => {
                pad(a, 0)?;
                int(a, "stride_w", i32o(1, 0)?);
                int(a, "stride_h", i32o(2, 0)?);
                act(a, 3)?;
                int(a, "dilation_w_factor", i32o(4, 1)?);
                int(a, "dilation_h_factor", i32o(5, 1)?);
            }
            4 => {
                pad(a, 0)?;
                int(a, "stride_w", i32o(1, 0)?);
                int(a, "stride_h", i32o(2, 0)?);
                int(a, "depth_multiplier", i32o(3, 0)?);
                act(a, 4)?;
                int(a, "dilation_w_factor", i32o(5, 1)?);
                int(a, "dilation_h_factor", i32o(6, 1)?);
            }
            9 => {
                act(a, 0)?;
                int(a, "weights_format", i8o(1)? as i64);
                int(a, "keep_num_dims", i8o(2)? as i64);
            }
            22 => {
                if let Some(t) = &o {
                    if let Some(s) = t.i32s(0)? {
                        a.insert(
                            "new_shape".into(),
                            Attr::Ints(s.into_iter().map(i64::from).collect()),
                        );
                    }
                }
            }
            23 => {
                int(a, "align_corners", i8o(2)? as i64);
                int(a, "half_pixel_centers", i8o(3)? as i64);
            }
            97 => {
                int(a, "align_corners", i8o(0)? as i64);
                int(a, "half_pixel_centers", i8o(1)? as i64);
            }
            25 => {
                a.insert("beta".into(), Attr::Float(f32o(0, 1.0)?));
            }
            36 => {
                int(a, "axis", i32o(0, 0)?);
                int(a, "batch_dims", i32o(1, 0)?);
            }
            40 | 74 | 82 | 89 => int(a, "keep_dims", i8o(0)? as i64),
            43 => {
                let dims = match &o {
                    Some(t) => t.i32s(0)?.unwrap_or_default(),
                    None => vec![],
                };
                a.insert(
                    "squeeze_dims".into(),
                    Attr::Ints(dims.into_iter().map(i64::from).collect()),
                );
            }
            44 => {
                act(a, 0)?;
                a.insert("cell_clip".into(), Attr::Float(f32o(1, 0.0)?));
                a.insert("proj_clip".into(), Attr::Float(f32o(2, 0.0)?));
                int(a, "time_major", i8o(3)? as i64);
            }
            45 => {
                for (k, n) in [
                    "begin_mask",
                    "end_mask",
                    "ellipsis_mask",
                    "new_axis_mask",
                    "shrink_axis_mask",
                ]
                .into_iter()
                .enumerate()
                {
                    int(a, n, i32o(k, 0)?);
                }
                int(a, "offset", i8o(5)? as i64);
            }
            49 | 102 => int(a, "num_splits", i32o(0, 0)?),
            56 | 79 => int(a, "output_type", i8o(0)? as i64),
            67 => {
                pad(a, 0)?;
                int(a, "stride_w", i32o(1, 0)?);
                int(a, "stride_h", i32o(2, 0)?);
                act(a, 3)?;
            }
            83 => {
                int(a, "values_count", i32o(0, 0)?);
                int(a, "axis", i32o(1, 0)?);
            }
            88 => {
                int(a, "num", i32o(0, 0)?);
                int(a, "axis", i32o(1, 0)?);
            }
            98 => {
                a.insert("alpha".into(), Attr::Float(f32o(0, 0.2)?));
            }
            126 => {
                int(a, "adj_x", i8o(0)? as i64);
                int(a, "adj_y", i8o(1)? as i64);
            }
            118 | 119 | 129 => {
                let names: &[&str] = match code {
                    118 => &["then_branch", "else_branch"],
                    119 => &["cond", "body"],
                    _ => &["init"],
                };
                for (k, n) in names.iter().enumerate() {
                    let idx = i32o(k, -1)?;
                    if idx < 0 {
                        return Err(perr(format!("missing subgraph index for '{n}'")));
                    }
                    let sub = self.subgraph(all, idx as usize, st)?;
                    a.insert((*n).into(), Attr::Graph(Box::new(sub)));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn read_quant(q: &Table<'_>, rank: usize) -> Result<Option<Quant>> {
    let scale = q.f32s(2)?.unwrap_or_default();
    if scale.is_empty() {
        return Ok(None);
    }
    let zps = q.i64s(3)?.unwrap_or_default();
    let zero_point: Vec<i32> = if zps.is_empty() {
        vec![0; scale.len()]
    } else if zps.len() == scale.len() {
        zps.iter()
            .map(|&z| i32::try_from(z).map_err(|_| perr(format!("zero point {z} out of range"))))
            .collect::<Result<_>>()?
    } else {
        return Err(perr(format!(
            "{} scales but {} zero points",
            scale.len(),
            zps.len()
        )));
    };
    let axis = if scale.len() > 1 {
        let d = q.i32(6, 0)?;
        if d < 0 || d as usize >= rank.max(1) {
            return Err(perr(format!(
                "quantized_dimension {d} out of range for rank {rank}"
            )));
        }
        Some(d as usize)
    } else {
        None
    };
    Ok(Some(Quant {
        scale,
        zero_point,
        axis,
    }))
}

fn put_quant(a: &mut BTreeMap<String, Attr>, prefix: &str, q: &Quant) {
    a.insert(format!("{prefix}_scale"), Attr::Floats(q.scale.clone()));
    a.insert(
        format!("{prefix}_zp"),
        Attr::Ints(q.zero_point.iter().map(|&z| z as i64).collect()),
    );
    if let Some(ax) = q.axis {
        a.insert(format!("{prefix}_axis"), Attr::Int(ax as i64));
    }
}
