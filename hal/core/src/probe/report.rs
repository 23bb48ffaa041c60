//! Rendering a [`ProbeReport`]: the `edgehal.probe/1` JSON document and a readable table.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::sysroot::format_cpu_list;
use super::{DeviceKind, ProbeReport, ProbedDevice};

/// Schema identifier written into every JSON report.
pub const SCHEMA: &str = "edgehal.probe/1";

fn opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map(Into::into).unwrap_or(Value::Null)
}

impl ProbeReport {
    /// The report as a `serde_json` value (schema in the [`super`] module docs).
    pub fn to_json_value(&self) -> Value {
        let cpu = &self.cpu;
        let clusters: Vec<Value> = cpu
            .clusters
            .iter()
            .map(|c| {
                json!({
                    "cpus": format_cpu_list(&c.cpus),
                    "count": c.cpus.len(),
                    "core": opt(c.core.clone()),
                    "midr": c.midr.map(|(i, p)| json!({
                        "implementer": format!("{i:#04x}"),
                        "part": format!("{p:#05x}"),
                    })).unwrap_or(Value::Null),
                    "capacity": opt(c.capacity),
                    "max_freq_khz": opt(c.max_freq_khz),
                    "caches": c.caches.iter().map(|k| json!({
                        "level": k.level,
                        "type": k.kind,
                        "size_kib": k.size_kib,
                        "shared_cpu_list": k.shared_cpu_list,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "schema": SCHEMA,
            "sysroot": self.sysroot.display().to_string(),
            "live": self.live,
            "board": {
                "model": opt(self.board.model.clone()),
                "compatible": self.board.compatible,
                "l4t_release": opt(self.board.l4t_release.clone()),
            },
            "cpu": {
                "arch": cpu.arch.as_str(),
                "vendor": opt(cpu.vendor.clone()),
                "model": opt(cpu.model.clone()),
                "logical_cores": cpu.logical_cores,
                "packages": opt(cpu.packages),
                "freq_domains": cpu.freq_domains,
                "clusters": clusters,
                "features": cpu.features.iter().collect::<Vec<_>>(),
                "feature_source": cpu.feature_source.as_str(),
                "hwcap": cpu.hwcap.map(|(a, b)| json!({
                    "AT_HWCAP": format!("{a:#x}"),
                    "AT_HWCAP2": format!("{b:#x}"),
                })).unwrap_or(Value::Null),
                "amx_permission": cpu.amx.describe(),
            },
            "vulkan": {
                "loader": opt(self.vulkan.loader.clone()),
                "icds": self.vulkan.icds.iter().map(|i| json!({
                    "manifest": i.manifest,
                    "library_path": opt(i.library_path.clone()),
                    "library_found": opt(i.library_found.clone()),
                    "api_version": opt(i.api_version.clone()),
                })).collect::<Vec<_>>(),
            },
            "devices": self.devices.iter().map(device_json).collect::<Vec<_>>(),
        })
    }

    /// The report as pretty-printed JSON text.
    pub fn to_json(&self) -> String {
        // Serialising a Value built from strings and numbers cannot fail.
        serde_json::to_string_pretty(&self.to_json_value()).unwrap_or_default()
    }

    /// A human-readable report: board, CPU summary, then devices grouped by kind.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let cpu = &self.cpu;
        let _ = writeln!(
            s,
            "edgehal probe of {}{}",
            self.sysroot.display(),
            if self.live {
                " (this machine)"
            } else {
                " (fixture)"
            }
        );
        if let Some(m) = &self.board.model {
            let _ = writeln!(s, "board        {m}");
        }
        if let Some(l) = &self.board.l4t_release {
            let _ = writeln!(s, "jetson       {l}");
        }
        let _ = writeln!(s, "\nCPU");
        let _ = writeln!(
            s,
            "  model      {} {}",
            cpu.vendor.as_deref().unwrap_or("?"),
            cpu.model.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            s,
            "  cores      {} logical, {} package(s), {} cluster(s), {} cpufreq domain(s)",
            cpu.logical_cores,
            cpu.packages
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
            cpu.clusters.len(),
            cpu.freq_domains
        );
        for c in &cpu.clusters {
            let mut line = format!(
                "  cpus {:<6} {}",
                format_cpu_list(&c.cpus),
                c.core.as_deref().unwrap_or("-")
            );
            if let Some(cap) = c.capacity {
                let _ = write!(line, "  capacity {cap}");
            }
            if let Some(f) = c.max_freq_khz {
                let _ = write!(line, "  max {:.2} GHz", f as f64 / 1e6);
            }
            let caches: Vec<String> = c
                .caches
                .iter()
                .map(|k| {
                    let t = match k.kind.as_str() {
                        "Data" => "d",
                        "Instruction" => "i",
                        _ => "",
                    };
                    if k.size_kib >= 1024 && k.size_kib % 1024 == 0 {
                        format!("L{}{} {}M", k.level, t, k.size_kib / 1024)
                    } else {
                        format!("L{}{} {}K", k.level, t, k.size_kib)
                    }
                })
                .collect();
            if !caches.is_empty() {
                let _ = write!(line, "  {}", caches.join(" "));
            }
            let _ = writeln!(s, "{line}");
        }
        let feats: Vec<&str> = cpu.features.iter().copied().collect();
        let _ = writeln!(
            s,
            "  simd       {} (from {})",
            if feats.is_empty() {
                "-".to_string()
            } else {
                feats.join(" ")
            },
            cpu.feature_source.as_str()
        );
        if cpu.amx != super::AmxState::NotPresent {
            let _ = writeln!(s, "  amx        {}", cpu.amx.describe());
        }
        let _ = writeln!(
            s,
            "  vulkan     loader {}, {} ICD(s)",
            self.vulkan.loader.as_deref().unwrap_or("not found"),
            self.vulkan.icds.len()
        );

        for (kind, title) in [
            (DeviceKind::Cpu, "CPU devices"),
            (DeviceKind::Gpu, "GPUs"),
            (DeviceKind::Npu, "NPUs"),
            (DeviceKind::EdgeTpu, "Edge TPUs"),
            (DeviceKind::Other, "Plugin devices, VFIO devices"),
        ] {
            let devs: Vec<&ProbedDevice> = self.devices_of(kind).collect();
            if kind == DeviceKind::Other && devs.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n{title}");
            if devs.is_empty() {
                let _ = writeln!(s, "  (none found)");
                continue;
            }
            let w = devs.iter().map(|d| d.name.len()).max().unwrap_or(4).max(4);
            let _ = writeln!(
                s,
                "  {:<w$} {:<8} {:<11} {:<34} STATUS",
                "NAME", "BACKEND", "KERNEL", "MEMORY"
            );
            for d in devs {
                let mem: Vec<&str> = d.memory.iter().map(|m| m.name()).collect();
                let status = if d.available {
                    "available".to_string()
                } else {
                    d.reason.clone().unwrap_or_else(|| "unavailable".into())
                };
                let _ = writeln!(
                    s,
                    "  {:<w$} {:<8} {:<11} {:<34} {}",
                    d.name,
                    d.backend.as_str(),
                    d.kernel_driver.as_deref().unwrap_or("-"),
                    if mem.is_empty() {
                        "-".to_string()
                    } else {
                        mem.join(",")
                    },
                    status
                );
                let mut extra: Vec<String> = Vec::new();
                if let Some(p) = &d.sysfs {
                    extra.push(p.clone());
                }
                extra.extend(d.nodes.iter().cloned());
                for k in [
                    "link",
                    "state",
                    "temp_c",
                    "pci_id",
                    "driver_version",
                    "runtime",
                ] {
                    if let Some(v) = d.details.get(k) {
                        extra.push(format!("{k}={v}"));
                    }
                }
                if !extra.is_empty() {
                    let _ = writeln!(s, "      {}", extra.join("  "));
                }
            }
        }
        s
    }
}

fn device_json(d: &ProbedDevice) -> Value {
    let details: Map<String, Value> = d
        .details
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "kind": d.kind.as_str(),
        "name": d.name,
        "driver": d.backend.as_str(),
        "kernel_driver": opt(d.kernel_driver.clone()),
        "bus": d.bus,
        "sysfs": opt(d.sysfs.clone()),
        "nodes": d.nodes,
        "memory": d.memory.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "available": d.available,
        "reason": opt(d.reason.clone()),
        "details": details,
    })
}
