//! Shared helpers for edgehal's integration tests (paths to `../shared`, the Python venv).

#![forbid(unsafe_code)]
