//! `edgehal probe` end to end: the built binary on fixture trees and on this machine.

use std::process::Command;

fn fixture(board: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sysroots")
        .join(board)
}

#[test]
fn json_on_a_fixture() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--json", "--sysroot"])
        .arg(fixture("rpi5"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], "edgehal.probe/1");
    assert_eq!(v["live"], false);
    assert_eq!(v["cpu"]["clusters"][0]["core"], "Cortex-A76");
    assert_eq!(v["cpu"]["feature_source"], "fixture-auxv");
    let gpus: Vec<&serde_json::Value> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"] == "gpu")
        .collect();
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0]["kernel_driver"], "v3d");
    assert_eq!(gpus[0]["driver"], "vulkan");
    assert_eq!(gpus[0]["available"], true);
}

#[test]
fn table_on_a_fixture() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--sysroot"])
        .arg(fixture("x86-coral-nolib"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Edge TPUs"), "{text}");
    assert!(
        text.contains("unavailable: libedgetpu.so.1 not found"),
        "{text}"
    );
    assert!(text.contains("480 Mb/s"), "{text}");
}

#[test]
fn missing_sysroot_is_one_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--sysroot", "/nonexistent/edgehal-fixture"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn live_json_reports_avx512_when_cpuinfo_does() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["live"], true);
    assert_eq!(v["cpu"]["feature_source"], "cpuid+xgetbv");
    let feats: Vec<&str> = v["cpu"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags_line = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let flags: Vec<&str> = flags_line.split_whitespace().collect();
    for (canon, flag) in [
        ("avx512f", "avx512f"),
        ("avx512vnni", "avx512_vnni"),
        ("avx512bf16", "avx512_bf16"),
    ] {
        assert_eq!(feats.contains(&canon), flags.contains(&flag), "{canon}");
    }
}

#[test]
fn vfio_edu_devices_are_listed_with_what_is_missing() {
    // Two edu functions: 03.0 bound to vfio-pci with its group node, 04.0 bound to nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--json", "--sysroot"])
        .arg(fixture("qemu-edu-vfio"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let edu: Vec<&serde_json::Value> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["driver"] == "vfio")
        .collect();
    assert_eq!(edu.len(), 2, "{v}");
    let by = |bdf: &str| {
        *edu.iter()
            .find(|d| d["name"].as_str().is_some_and(|n| n.ends_with(bdf)))
            .unwrap_or_else(|| panic!("no edu device {bdf} in {v}"))
    };
    let bound = by("0000:00:03.0");
    assert_eq!(bound["available"], true, "{bound}");
    let unbound = by("0000:00:04.0");
    assert_eq!(unbound["available"], false, "{unbound}");
    let why = unbound["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("vfio-pci"),
        "reason should say how to bind: {why}"
    );

    let table = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["probe", "--sysroot"])
        .arg(fixture("qemu-edu-vfio"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("edu:0000:00:03.0"), "{text}");
}
