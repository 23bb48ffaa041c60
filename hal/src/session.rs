//! Sessions: a model prepared for execution.

/// Options for a session.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub threads: usize,
}

/// A prepared model.
pub struct Session;
