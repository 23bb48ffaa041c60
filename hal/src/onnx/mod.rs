//! ONNX importer.

use bytes::Bytes;
use edgehal_core::{Error, Graph, Result};

/// Decode an ONNX `ModelProto` into a graph; `dir` resolves external data files.
pub fn import(_bytes: Bytes, _dir: Option<&std::path::Path>) -> Result<Graph> {
    Err(Error::unsupported("ONNX import is not implemented yet"))
}
