//! Plain C types shared by several handles: element types, tensor descriptions.

use std::ffi::{c_char, CStr};

use edgehal_core::DType;

use crate::status::{guard_value, Fail, FfiResult};

/// Element type of a tensor. The values are ONNX `TensorProto.DataType` codes, so a program that
/// already speaks ONNX can use its own constants. `EDGEHAL_DTYPE_UNKNOWN` (0) appears only in
/// introspection of models that do not declare a type.
pub type edgehal_dtype = i32;

/// The model does not declare the element type.
pub const EDGEHAL_DTYPE_UNKNOWN: edgehal_dtype = 0;
/// IEEE 754 binary32.
pub const EDGEHAL_DTYPE_FLOAT32: edgehal_dtype = 1;
/// Unsigned 8-bit integer.
pub const EDGEHAL_DTYPE_UINT8: edgehal_dtype = 2;
/// Signed 8-bit integer.
pub const EDGEHAL_DTYPE_INT8: edgehal_dtype = 3;
/// Unsigned 16-bit integer.
pub const EDGEHAL_DTYPE_UINT16: edgehal_dtype = 4;
/// Signed 16-bit integer.
pub const EDGEHAL_DTYPE_INT16: edgehal_dtype = 5;
/// Signed 32-bit integer.
pub const EDGEHAL_DTYPE_INT32: edgehal_dtype = 6;
/// Signed 64-bit integer.
pub const EDGEHAL_DTYPE_INT64: edgehal_dtype = 7;
/// Boolean, one byte per element (0 or 1).
pub const EDGEHAL_DTYPE_BOOL: edgehal_dtype = 9;
/// IEEE 754 binary16.
pub const EDGEHAL_DTYPE_FLOAT16: edgehal_dtype = 10;
/// IEEE 754 binary64.
pub const EDGEHAL_DTYPE_FLOAT64: edgehal_dtype = 11;
/// Unsigned 32-bit integer.
pub const EDGEHAL_DTYPE_UINT32: edgehal_dtype = 12;
/// Unsigned 64-bit integer.
pub const EDGEHAL_DTYPE_UINT64: edgehal_dtype = 13;
/// bfloat16.
pub const EDGEHAL_DTYPE_BFLOAT16: edgehal_dtype = 16;

/// How a tensor's integers map to real numbers.
pub type edgehal_quantization = i32;
/// Not quantized (or the model does not say).
pub const EDGEHAL_QUANT_NONE: edgehal_quantization = 0;
/// `real = scale * (q - zero_point)` with one scale and zero point for the whole tensor.
pub const EDGEHAL_QUANT_PER_TENSOR: edgehal_quantization = 1;
/// One scale and zero point per slice along an axis.
pub const EDGEHAL_QUANT_PER_AXIS: edgehal_quantization = 2;

/// Largest rank libedgehal accepts for a buffer.
pub const EDGEHAL_MAX_RANK: usize = 16;

/// Description of a session input or output, filled by `edgehal_session_input_info` /
/// `edgehal_session_output_info`. The pointers are owned by the session and stay valid until it
/// is released.
#[repr(C)]
pub struct edgehal_tensor_info {
    /// NUL-terminated name, as in the model.
    pub name: *const c_char,
    /// Element type, `EDGEHAL_DTYPE_UNKNOWN` if the model does not say.
    pub dtype: edgehal_dtype,
    /// Number of dimensions, or -1 when the model does not declare a shape.
    pub rank: i32,
    /// `rank` dimensions; -1 marks a symbolic or unknown dimension (e.g. a batch size).
    /// NULL when `rank` is -1 or 0.
    pub shape: *const i64,
    /// Quantization kind; `EDGEHAL_QUANT_NONE` until the importers carry it for graph I/O.
    pub quantization: edgehal_quantization,
    /// Scale for `EDGEHAL_QUANT_PER_TENSOR`, otherwise 0.
    pub scale: f32,
    /// Zero point for `EDGEHAL_QUANT_PER_TENSOR`, otherwise 0.
    pub zero_point: i32,
}

pub(crate) fn dtype_code(d: Option<DType>) -> edgehal_dtype {
    d.map(|d| d.onnx_code()).unwrap_or(EDGEHAL_DTYPE_UNKNOWN)
}

pub(crate) fn dtype_from_code(code: edgehal_dtype) -> FfiResult<DType> {
    DType::from_onnx_code(code).ok_or_else(|| Fail::arg(format!("unknown edgehal_dtype {code}")))
}

/// Size in bytes of one element of `dtype`, or 0 for an unknown code.
///
/// Threading: any thread. Never fails.
#[no_mangle]
pub extern "C" fn edgehal_dtype_size(dtype: edgehal_dtype) -> usize {
    guard_value(0, || DType::from_onnx_code(dtype).map_or(0, |d| d.size()))
}

/// Lower-case name of `dtype` ("float32", "int8", ...), or "unknown". The string is static.
///
/// Threading: any thread. Never fails.
#[no_mangle]
pub extern "C" fn edgehal_dtype_name(dtype: edgehal_dtype) -> *const c_char {
    guard_value(c"unknown".as_ptr(), || {
        let name: &'static CStr = match DType::from_onnx_code(dtype) {
            Some(DType::F32) => c"float32",
            Some(DType::F16) => c"float16",
            Some(DType::BF16) => c"bfloat16",
            Some(DType::F64) => c"float64",
            Some(DType::I8) => c"int8",
            Some(DType::U8) => c"uint8",
            Some(DType::I16) => c"int16",
            Some(DType::U16) => c"uint16",
            Some(DType::I32) => c"int32",
            Some(DType::U32) => c"uint32",
            Some(DType::I64) => c"int64",
            Some(DType::U64) => c"uint64",
            Some(DType::Bool) => c"bool",
            None => c"unknown",
        };
        name.as_ptr()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_round_trip_and_names_match_core() {
        for d in DType::ALL {
            let code = dtype_code(Some(d));
            assert_eq!(dtype_from_code(code).ok(), Some(d));
            assert_eq!(edgehal_dtype_size(code), d.size());
            // SAFETY: edgehal_dtype_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(edgehal_dtype_name(code)) };
            assert_eq!(name.to_str().ok(), Some(d.name()));
        }
        assert_eq!(edgehal_dtype_size(8), 0); // ONNX "string": not supported
        assert!(dtype_from_code(99).is_err());
    }
}
