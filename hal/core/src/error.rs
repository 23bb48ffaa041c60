//! The error type of the core crate. Messages name the thing that is wrong and, where there is
//! one, the node: `node 17 (Conv "conv1"): kernel shape [3,3] does not match weight [5,5]`.

/// Errors produced by edgehal's core types, importers and drivers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file or device failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A model file could not be decoded.
    #[error("{0}")]
    Parse(String),
    /// The graph is structurally invalid (cycle, missing input, type mismatch...).
    #[error("invalid graph: {0}")]
    InvalidGraph(String),
    /// An operator or feature that edgehal does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A caller-supplied argument is wrong (shape, dtype, name).
    #[error("{0}")]
    InvalidArgument(String),
    /// Executing an op failed; `node` says which.
    #[error("{node}: {msg}")]
    Op { node: String, msg: String },
    /// A size check before allocation failed.
    #[error("{0}")]
    TooLarge(String),
    /// A device is missing or stopped working.
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },
}

/// Result with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for an [`Error::InvalidArgument`].
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for an [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
    /// Shorthand for an [`Error::Parse`].
    pub fn parse(msg: impl Into<String>) -> Self {
        Error::Parse(msg.into())
    }
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Return early with an [`Error::InvalidArgument`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::InvalidArgument(format!($($arg)*)))
    };
}

/// Return early with an [`Error::InvalidArgument`] unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !($cond) {
            $crate::bail!($($arg)*);
        }
    };
}
