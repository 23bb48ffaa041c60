//! `edgehal probe`: what hardware is here.

/// Run `edgehal probe`.
pub fn run(_json: bool, _sysroot: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!("probe is not implemented yet")
}
