//! Architecture-specific kernels (the only place `unsafe` is allowed in this crate).

pub(crate) mod x86_64;
