//! edgehal: load a model, prepare it, run it.
//!
//! - Importers ([`onnx`], [`tflite`]) decode a file into the format-neutral
//!   [`edgehal_core::Graph`]; the file is read once through the io_uring [`reactor`] into a
//!   page-aligned buffer (or mapped, `EDGEHAL_LOAD=mmap`) and weights stay slices of it.
//! - [`Model::load`] picks the importer from the file's magic bytes, not its extension.
//! - [`session::Session`] prepares a graph for a device once and runs it many times; with
//!   several devices it goes through [`profile`] (measured latency per node and device),
//!   [`partition`] (minimum end-to-end latency), [`plan`] and the asynchronous [`scheduler`]
//!   whose completions one io_uring [`reactor`] reaps.
//!
//! `unsafe` is denied everywhere except the reactor (io_uring submissions name raw memory).

#![deny(unsafe_code)]

pub mod npy;
pub mod onnx;
pub mod partition;
pub mod passes;
pub mod passes_layout;
pub mod passes_nhwc;
pub mod plan;
pub mod plugin;
pub mod profile;
#[allow(unsafe_code)]
pub mod reactor;
pub mod scheduler;
pub mod session;
pub mod tflite;

use std::path::Path;

use bytes::Bytes;
pub use edgehal_core::{DType, Error, Graph, Result, Tensor};
pub use session::{Session, SessionOptions};

/// Which file format a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Onnx,
    TfLite,
}

/// A loaded model: the graph plus where it came from.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub format: Format,
    /// Display name for messages (file name or `<memory>`).
    pub name: String,
}

impl Model {
    /// Load a model file (ONNX or TFLite): read through io_uring into a page-aligned buffer
    /// (`read(2)` where io_uring is unavailable), or mapped when `EDGEHAL_LOAD=mmap`.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Self::load_with(path, reactor::FileLoad::from_env())
    }

    /// Load a model file, its external data files included, the way `how` says.
    pub fn load_with(path: impl AsRef<Path>, how: reactor::FileLoad) -> Result<Model> {
        let path = path.as_ref();
        let bytes = reactor::load_file(path, how)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes_in(bytes, &name, path.parent(), how)
    }

    /// Load a model held in memory. External data files (ONNX) are not available this way.
    pub fn from_bytes(bytes: Bytes) -> Result<Model> {
        Self::from_bytes_in(bytes, "<memory>", None, reactor::FileLoad::Read)
    }

    fn from_bytes_in(
        bytes: Bytes,
        name: &str,
        dir: Option<&Path>,
        how: reactor::FileLoad,
    ) -> Result<Model> {
        let wrap = |e: Error| match e {
            Error::Parse(m) => Error::Parse(format!("{name}: {m}")),
            Error::InvalidGraph(m) => Error::InvalidGraph(format!("{name}: {m}")),
            other => other,
        };
        if tflite::is_tflite(&bytes) {
            let graph = tflite::import(bytes).map_err(wrap)?;
            Ok(Model {
                graph,
                format: Format::TfLite,
                name: name.to_string(),
            })
        } else {
            let graph = onnx::import_with(bytes, dir, how).map_err(wrap)?;
            Ok(Model {
                graph,
                format: Format::Onnx,
                name: name.to_string(),
            })
        }
    }
}
