//! TFLite importer (flatbuffers, table layouts from the public schema's field ids).

use bytes::Bytes;
use edgehal_core::{Error, Graph, Result};

/// True when `bytes` carries the TFLite file identifier `TFL3` at offset 4.
pub fn is_tflite(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[4..8] == b"TFL3"
}

/// Decode a `.tflite` flatbuffer into a graph.
pub fn import(_bytes: Bytes) -> Result<Graph> {
    Err(Error::unsupported("TFLite import is not implemented yet"))
}
