//! Ops of the `tflite` domain: what the TFLite importer lowers builtin ops to.
//!
//! - Layout is NHWC as in the file (filters `[O, KH, KW, I]`, depthwise `[1, KH, KW, C*M]`).
//! - Float tensors compute in f32. Quantized tensors (int8/uint8/int16) follow TFLite's
//!   reference kernels: integer accumulation, requantization with a Q31 multiplier and shift
//!   ([`qmath`]), per-channel multipliers for convolutions, TFLite's rescaling for ADD/SUB/MUL.
//!   Ops without an integer kernel (LOGISTIC, TANH, SOFTMAX, ...) on quantized tensors go through
//!   a float table of the 256/65536 possible inputs, as LiteRT's optimized kernels do.
//! - Quantization parameters come from the node (`in{k}_scale`, `in{k}_zp`, `in{k}_axis`,
//!   `out{k}_...`, written by the importer), falling back to the input tensor's own `quant`.
//!   Outputs carry their `quant` so a caller can dequantize them.

use edgehal_core::{DType, Error, Quant, Result, Tensor};

use super::{OpCtx, Registry};

pub mod elem;
pub mod nn;
pub mod qmath;
pub mod reduce;
pub mod shape;

/// The domain name.
pub const DOMAIN: &str = "tflite";

/// Custom ops reported by name when run.
const CUSTOM_OPS: &[&str] = &[
    "edgetpu-custom-op",
    "Convolution2DTransposeBias",
    "TFLite_Detection_PostProcess",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
];

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    elem::register(r);
    nn::register(r);
    reduce::register(r);
    shape::register(r);
    for c in CUSTOM_OPS {
        r.add_domain(DOMAIN, &format!("custom:{c}"), unsupported_custom);
    }
}

fn unsupported_custom(ctx: &OpCtx<'_>, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let name = ctx.node.op.strip_prefix("custom:").unwrap_or(&ctx.node.op);
    Err(Error::unsupported(format!(
        "unsupported custom op '{name}'"
    )))
}

/// Quantization parameters of input (`"in0"`) or output (`"out0"`) `k` from the node's
/// attributes; `t` is the tensor to fall back on.
pub fn quant_of(ctx: &OpCtx<'_>, prefix: &str, t: Option<&Tensor>) -> Option<Quant> {
    let n = ctx.node;
    if let Some(scale) = n.attr_floats(&format!("{prefix}_scale")) {
        let zp: Vec<i32> = n
            .attr_ints(&format!("{prefix}_zp"))
            .map(|z| z.iter().map(|&v| v as i32).collect())
            .unwrap_or_else(|| vec![0; scale.len()]);
        let axis = n.attr_i(&format!("{prefix}_axis")).map(|a| a as usize);
        return Some(Quant {
            scale: scale.to_vec(),
            zero_point: zp,
            axis,
        });
    }
    t.and_then(|t| t.quant.clone())
}

/// Per-tensor `(scale, zero_point)` of a quantized input/output, or an error naming it.
pub fn qparams(ctx: &OpCtx<'_>, prefix: &str, t: Option<&Tensor>) -> Result<(f32, i32)> {
    let q = quant_of(ctx, prefix, t)
        .ok_or_else(|| Error::arg(format!("{prefix}: quantized tensor without scale")))?;
    match (q.scale.first(), q.zero_point.first()) {
        (Some(&s), Some(&z)) if s > 0.0 && s.is_finite() => Ok((s, z)),
        (Some(&s), _) => Err(Error::arg(format!("{prefix}: bad scale {s}"))),
        _ => Err(Error::arg(format!(
            "{prefix}: empty quantization parameters"
        ))),
    }
}

/// True for the integer types TFLite quantizes to.
pub fn is_quant(d: DType) -> bool {
    matches!(d, DType::I8 | DType::U8 | DType::I16)
}

/// The fused activation of a node.
pub fn act(ctx: &OpCtx<'_>) -> String {
    ctx.s("fused_activation_function", "NONE")
}

/// Apply a fused activation to float values.
pub fn act_f32(act: &str, v: &mut [f32]) -> Result<()> {
    match act {
        "NONE" => {}
        "RELU" => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        "RELU6" => v.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0)),
        "RELU_N1_TO_1" => v.iter_mut().for_each(|x| *x = x.clamp(-1.0, 1.0)),
        "TANH" => v.iter_mut().for_each(|x| *x = x.tanh()),
        "SIGN_BIT" => v
            .iter_mut()
            .for_each(|x| *x = if x.is_sign_negative() { 1.0 } else { 0.0 }),
        a => return Err(Error::unsupported(format!("fused activation {a}"))),
    }
    Ok(())
}

/// Quantized values (any of i8/u8/i16) as i32.
pub fn q_to_i32(t: &Tensor) -> Result<Vec<i32>> {
    Ok(match t.dtype() {
        DType::I8 => t.as_slice::<i8>()?.iter().map(|&v| v as i32).collect(),
        DType::U8 => t.as_slice::<u8>()?.iter().map(|&v| v as i32).collect(),
        DType::I16 => t.as_slice::<i16>()?.iter().map(|&v| v as i32).collect(),
        DType::I32 => t.as_slice::<i32>()?.into_owned(),
        d => return Err(Error::arg(format!("expected a quantized tensor, got {d}"))),
    })
}

/// Build a quantized tensor of `dtype` from i32 values already clamped to its range.
pub fn q_from_i32(
    dtype: DType,
    shape: Vec<usize>,
    v: Vec<i32>,
    q: Option<Quant>,
) -> Result<Tensor> {
    let mut t = match dtype {
        DType::I8 => Tensor::from_vec(shape, v.into_iter().map(|x| x as i8).collect::<Vec<_>>())?,
        DType::U8 => Tensor::from_vec(shape, v.into_iter().map(|x| x as u8).collect::<Vec<_>>())?,
        DType::I16 => Tensor::from_vec(shape, v.into_iter().map(|x| x as i16).collect::<Vec<_>>())?,
        DType::I32 => Tensor::from_vec(shape, v)?,
        d => return Err(Error::arg(format!("cannot produce quantized {d}"))),
    };
    t.quant = q;
    Ok(t)
}

/// The output dtype recorded by the importer is not kept on nodes; quantized ops produce the
/// dtype of their first input unless the node says otherwise.
pub fn float_in(t: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_f32()),
        d => Err(Error::unsupported(format!(
            "expected a float tensor, got {d}"
        ))),
    }
}

/// A float output with the node's output quantization cleared.
pub fn f32_out(shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
    Tensor::from_vec(shape, v)
}

/// Convert an i64 list from a constant input (shape, axes, paddings...).
pub fn ints_of(t: &Tensor) -> Vec<i64> {
    t.to_i64_vec()
}

/// The dtype the importer recorded for output `k`, else `default`.
pub fn out_dtype(ctx: &OpCtx<'_>, k: usize, default: DType) -> DType {
    ctx.node
        .attr_s(&format!("out{k}_dtype"))
        .and_then(|s| DType::from_name(&s))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::{Attr, Graph, Node};

    #[test]
    fn custom_ops_are_reported_by_name() {
        let mut g = Graph::new("t");
        let x = g.value_id("x");
        let y = g.value_id("y");
        g.inputs.push(x);
        g.outputs.push(y);
        g.add_node(Node {
            op: "custom:edgetpu-custom-op".into(),
            domain: DOMAIN.into(),
            inputs: vec![Some(x)],
            outputs: vec![Some(y)],
            ..Default::default()
        });
        let ex = crate::Executor::new(&g, &Registry::new()).unwrap();
        let e = ex
            .run(&[(x, Tensor::scalar(1f32))])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsupported custom op 'edgetpu-custom-op'"),
            "{e}"
        );
        let _ = Attr::Int(0);
    }
}
