//! Which board or machine this is: device-tree model/compatible on ARM, DMI on x86, and the
//! L4T release line on Jetson.

use super::sysroot::SysRoot;

/// Board identity; every field is optional because fixtures and VMs often lack them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Board {
    /// `proc/device-tree/model`, else DMI `sys_vendor product_name`, else cpuinfo `Model`.
    pub model: Option<String>,
    /// `proc/device-tree/compatible` strings, most specific first.
    pub compatible: Vec<String>,
    /// First line of `etc/nv_tegra_release` (Jetson Linux version).
    pub l4t_release: Option<String>,
}

pub fn probe_board(root: &SysRoot) -> Board {
    let dt_strings = |rel: &str| -> Vec<String> {
        root.read_bytes(rel)
            .unwrap_or_default()
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let model = dt_strings("proc/device-tree/model")
        .into_iter()
        .next()
        .or_else(|| {
            let v = root.read_trim("sys/class/dmi/id/sys_vendor");
            let p = root.read_trim("sys/class/dmi/id/product_name");
            match (v, p) {
                (Some(v), Some(p)) => Some(format!("{v} {p}")),
                (v, p) => v.or(p),
            }
        })
        .or_else(|| {
            root.read_to_string("proc/cpuinfo")?
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == "Model")
                .map(|(_, v)| v.trim().to_string())
        });
    Board {
        model,
        compatible: dt_strings("proc/device-tree/compatible"),
        l4t_release: root.read_to_string("etc/nv_tegra_release").and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.trim_start_matches('#').trim().to_string())
        }),
    }
}
