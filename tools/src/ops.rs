//! `edgehal ops`: which ops each device supports.

use anyhow::Result;
use serde_json::json;

/// Run `edgehal ops`.
pub fn run(json_out: bool) -> Result<()> {
    let reg = edgehal_cpu::Registry::new();
    let names: Vec<String> = reg
        .names()
        .into_iter()
        .map(|(d, o)| if d.is_empty() { o } else { format!("{d}.{o}") })
        .collect();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"devices": [{"device": "cpu", "ops": names}]}))?
        );
    } else {
        println!("cpu ({} ops):", names.len());
        let width = names.iter().map(|n| n.len()).max().unwrap_or(8) + 2;
        let per_line = (100 / width).max(1);
        for chunk in names.chunks(per_line) {
            println!(
                "  {}",
                chunk
                    .iter()
                    .map(|n| format!("{n:<width$}"))
                    .collect::<String>()
                    .trim_end()
            );
        }
    }
    Ok(())
}
