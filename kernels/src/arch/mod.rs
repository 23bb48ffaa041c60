//! Architecture-specific kernels (the only place `unsafe` is allowed in this crate).

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;
