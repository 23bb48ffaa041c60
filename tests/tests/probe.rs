//! Probing fixture trees of real boards (tests/fixtures/sysroots/<board>) and this machine.

use std::path::{Path, PathBuf};

use edgehal_core::probe::{
    probe, AmxState, Backend, DeviceKind, FeatureSource, MemoryDomain, ProbeReport, ProbedDevice,
    SysRoot,
};

fn fixture(board: &str) -> ProbeReport {
    let dir = edgehal_tests::repo_root()
        .join("tests/fixtures/sysroots")
        .join(board);
    assert!(dir.is_dir(), "missing fixture {}", dir.display());
    let r = probe(&SysRoot::new(&dir));
    assert!(
        !r.live,
        "a fixture must never be probed as the live machine"
    );
    r
}

fn of_kind(r: &ProbeReport, kind: DeviceKind) -> Vec<&ProbedDevice> {
    r.devices_of(kind).collect()
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

#[test]
fn raspberry_pi_5() {
    let r = fixture("rpi5");
    let cpu = &r.cpu;
    assert_eq!(cpu.arch.as_str(), "aarch64");
    assert_eq!(cpu.logical_cores, 4);
    assert_eq!(cpu.clusters.len(), 1);
    let c = &cpu.clusters[0];
    assert_eq!(c.cpus, vec![0, 1, 2, 3]);
    assert_eq!(c.core.as_deref(), Some("Cortex-A76"));
    assert_eq!(c.midr, Some((0x41, 0xd0b)));
    assert_eq!((c.capacity, c.max_freq_khz), (Some(1024), Some(2_400_000)));
    let l3 = c.caches.iter().find(|k| k.level == 3).expect("L3");
    assert_eq!((l3.size_kib, l3.shared_cpu_list.as_str()), (2048, "0-3"));
    // Features came from the fixture's auxv, which takes precedence over cpuinfo like the
    // real auxiliary vector does.
    assert_eq!(cpu.feature_source, FeatureSource::FixtureAuxv);
    assert_eq!(cpu.hwcap, Some((0x119fff, 0)));
    for f in ["neon", "dotprod", "fp16", "rdm"] {
        assert!(cpu.has(f), "Pi 5 has {f}");
    }
    for f in ["i8mm", "bf16", "sve", "sve2", "sme", "avx2"] {
        assert!(!cpu.has(f), "Pi 5 (Cortex-A76, ARMv8.2) has no {f}");
    }
    assert_eq!(cpu.amx, AmxState::NotPresent);
    assert_eq!(
        r.board.model.as_deref(),
        Some("Raspberry Pi 5 Model B Rev 1.0")
    );
    assert_eq!(
        r.board.compatible,
        vec!["raspberrypi,5-model-b", "brcm,bcm2712"]
    );

    // v3d is the only GPU: the vc4 display controller (card1, no render node) is not one.
    let gpus = of_kind(&r, DeviceKind::Gpu);
    assert_eq!(gpus.len(), 1, "{gpus:?}");
    let g = gpus[0];
    assert_eq!(g.kernel_driver.as_deref(), Some("v3d"));
    assert_eq!(g.backend, Backend::Vulkan);
    assert_eq!(g.bus, "platform");
    assert!(g.available, "{:?}", g.reason);
    assert!(g.nodes.contains(&"/dev/dri/renderD128".to_string()));
    assert_eq!(g.memory, vec![MemoryDomain::Host, MemoryDomain::DmaBuf]);
    assert_eq!(
        g.details.get("compatible").map(String::as_str),
        Some("brcm,2712-v3d")
    );
    assert!(of_kind(&r, DeviceKind::Npu).is_empty());
    assert!(of_kind(&r, DeviceKind::EdgeTpu).is_empty());
}

#[test]
fn jetson_orin_nano() {
    let r = fixture("jetson-orin-nano");
    let cpu = &r.cpu;
    assert_eq!(cpu.logical_cores, 6);
    assert_eq!(cpu.clusters.len(), 1);
    assert_eq!(cpu.clusters[0].core.as_deref(), Some("Cortex-A78AE"));
    assert_eq!(cpu.clusters[0].midr, Some((0x41, 0xd42)));
    // The fixture has no cpu_capacity files: reported absent, not guessed.
    assert_eq!(cpu.clusters[0].capacity, None);
    assert_eq!(cpu.freq_domains, 2);
    assert_eq!(cpu.feature_source, FeatureSource::Cpuinfo);
    assert!(cpu.has("dotprod") && cpu.has("neon"));
    assert!(!cpu.has("sve") && !cpu.has("i8mm") && !cpu.has("bf16"));
    assert_eq!(
        r.board.l4t_release.as_deref(),
        Some("R36 (release), REVISION: 4.7")
    );
    assert_eq!(r.board.compatible[1], "nvidia,tegra234");

    // The GPU is the nvgpu platform device; nvidia-drm (display) and the host1x render node
    // are not GPUs.
    let gpus = of_kind(&r, DeviceKind::Gpu);
    assert_eq!(gpus.len(), 1, "{gpus:?}");
    let g = gpus[0];
    assert_eq!(g.kernel_driver.as_deref(), Some("nvgpu"));
    assert_eq!(
        g.sysfs.as_deref(),
        Some("/sys/devices/platform/bus@0/17000000.gpu")
    );
    assert!(g.available, "{:?}", g.reason);
    assert!(g.nodes.contains(&"/dev/nvgpu/igpu0/ctrl".to_string()));
    // The ICD names a bare soname found only through etc/ld.so.conf.d/nvidia-tegra.conf.
    let icd = &r.vulkan.icds[0];
    assert_eq!(icd.library_path.as_deref(), Some("libGLX_nvidia.so.0"));
    assert_eq!(
        icd.library_found.as_deref(),
        Some("/usr/lib/aarch64-linux-gnu/tegra/libGLX_nvidia.so.0")
    );
    assert!(
        of_kind(&r, DeviceKind::Npu).is_empty(),
        "Orin Nano has no DLA"
    );
}

#[test]
fn rock_5b_rk3588() {
    let r = fixture("rock5b");
    let cpu = &r.cpu;
    assert_eq!(cpu.logical_cores, 8);
    assert_eq!(cpu.freq_domains, 3, "cpufreq policies 0, 4 and 6");
    assert_eq!(cpu.clusters.len(), 2, "{:?}", cpu.clusters);
    let little = &cpu.clusters[0];
    let big = &cpu.clusters[1];
    assert_eq!(
        (little.cpus.clone(), little.core.as_deref()),
        (vec![0, 1, 2, 3], Some("Cortex-A55"))
    );
    assert_eq!(
        (big.cpus.clone(), big.core.as_deref()),
        (vec![4, 5, 6, 7], Some("Cortex-A76"))
    );
    assert_eq!(
        (little.capacity, little.max_freq_khz),
        (Some(397), Some(1_800_000))
    );
    assert_eq!(
        (big.capacity, big.max_freq_khz),
        (Some(1024), Some(2_400_000))
    );
    assert_eq!(
        little
            .caches
            .iter()
            .find(|k| k.level == 2)
            .map(|k| k.size_kib),
        Some(128)
    );
    assert_eq!(
        big.caches.iter().find(|k| k.level == 2).map(|k| k.size_kib),
        Some(512)
    );
    assert_eq!(cpu.model.as_deref(), Some("Cortex-A55 + Cortex-A76"));
    assert!(cpu.has("dotprod") && !cpu.has("i8mm"));

    let gpus = of_kind(&r, DeviceKind::Gpu);
    assert_eq!(
        gpus.len(),
        1,
        "the RKNPU card must not be counted as a GPU: {gpus:?}"
    );
    assert_eq!(gpus[0].kernel_driver.as_deref(), Some("panthor"));
    assert!(gpus[0].available, "{:?}", gpus[0].reason);
    assert!(gpus[0].details["vulkan_icd"].ends_with("panfrost_icd.aarch64.json"));

    let npus = of_kind(&r, DeviceKind::Npu);
    assert_eq!(npus.len(), 1);
    let n = npus[0];
    assert_eq!(n.backend, Backend::Npu);
    assert_eq!(n.kernel_driver.as_deref(), Some("RKNPU"));
    assert_eq!(n.nodes, vec!["/dev/dri/card1"]);
    assert_eq!(
        n.details.get("driver_version").map(String::as_str),
        Some("v0.9.6")
    );
    assert_eq!(
        n.details.get("runtime").map(String::as_str),
        Some("/usr/lib/librknnrt.so")
    );
    assert!(n.available, "{:?}", n.reason);
}

#[test]
fn intel_core_ultra_laptop() {
    let r = fixture("intel-core-ultra");
    let cpu = &r.cpu;
    assert_eq!(cpu.arch.as_str(), "x86_64");
    assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
    assert_eq!(cpu.logical_cores, 22);
    assert_eq!(cpu.packages, Some(1));
    let shape: Vec<(String, Option<&str>, Option<u64>)> = cpu
        .clusters
        .iter()
        .map(|c| {
            (
                edgehal_core::probe::format_cpu_list(&c.cpus),
                c.core.as_deref(),
                c.max_freq_khz,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("0-11".to_string(), Some("P-core"), Some(4_800_000)),
            ("12-19".to_string(), Some("E-core"), Some(3_800_000)),
            ("20-21".to_string(), Some("E-core"), Some(2_500_000)),
        ]
    );
    assert!(cpu.has("avxvnni") && cpu.has("avx2") && cpu.has("fma") && cpu.has("f16c"));
    for f in ["avx512f", "avx512vnni", "avx512bf16", "amx-tile"] {
        assert!(!cpu.has(f), "Meteor Lake has no {f}");
    }
    assert_eq!(
        r.board.model.as_deref(),
        Some("Framework Laptop 13 (Intel Core Ultra Series 1)")
    );

    let gpus = of_kind(&r, DeviceKind::Gpu);
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0].kernel_driver.as_deref(), Some("i915"));
    assert_eq!(
        gpus[0].details.get("pci_id").map(String::as_str),
        Some("8086:7d55")
    );
    assert_eq!(
        gpus[0].memory,
        vec![MemoryDomain::Host, MemoryDomain::DmaBuf]
    );
    assert!(gpus[0].available, "{:?}", gpus[0].reason);

    let npus = of_kind(&r, DeviceKind::Npu);
    assert_eq!(
        npus.len(),
        1,
        "the accel device and its PCI function are one NPU: {npus:?}"
    );
    let n = npus[0];
    assert_eq!(n.name, "Intel NPU (Meteor Lake, 37xx)");
    assert_eq!(n.kernel_driver.as_deref(), Some("intel_vpu"));
    assert_eq!(n.nodes, vec!["/dev/accel/accel0"]);
    assert_eq!(n.details.get("dev").map(String::as_str), Some("261:0"));
    assert_eq!(n.details.get("sched_mode").map(String::as_str), Some("HW"));
    assert!(!n.available);
    assert_eq!(
        n.reason.as_deref(),
        Some("unavailable: libze_intel_npu.so.1 or libze_intel_vpu.so.1 not found")
    );
}

#[test]
fn x86_with_usb_and_pcie_coral() {
    let r = fixture("x86-coral");
    assert!(r.cpu.has("avx2") && !r.cpu.has("avx512f") && !r.cpu.has("avxvnni"));
    let tpus = of_kind(&r, DeviceKind::EdgeTpu);
    assert_eq!(tpus.len(), 3, "{tpus:?}");
    let dfu = tpus
        .iter()
        .find(|d| d.details.get("usb_id").map(String::as_str) == Some("1a6e:089a"))
        .expect("DFU Coral");
    let app = tpus
        .iter()
        .find(|d| d.details.get("usb_id").map(String::as_str) == Some("18d1:9302"))
        .expect("app Coral");
    let pcie = tpus.iter().find(|d| d.bus == "pci").expect("PCIe Coral");
    assert!(dfu.details["state"].starts_with("dfu"));
    assert!(app.details["state"].starts_with("ready"));
    assert_eq!(dfu.details["link"], "480 Mb/s (USB 2 High-Speed)");
    assert_eq!(app.details["link"], "5000 Mb/s (USB 3 SuperSpeed)");
    assert_eq!(dfu.nodes, vec!["/dev/bus/usb/001/005"]);
    assert_eq!(app.details["path"], "/sys/bus/usb/devices/2-1");
    assert_eq!(pcie.kernel_driver.as_deref(), Some("apex"));
    assert_eq!(pcie.nodes, vec!["/dev/apex_0"]);
    assert_eq!(pcie.details["temp_c"], "45.25");
    assert_eq!(pcie.details["status"], "ALIVE");
    assert_eq!(pcie.details["pci_id"], "1ac1:089a");
    for t in &tpus {
        assert_eq!(t.backend, Backend::EdgeTpu);
        assert!(t.available, "{}: {:?}", t.name, t.reason);
        assert_eq!(
            t.details["runtime"],
            "/usr/lib/x86_64-linux-gnu/libedgetpu.so.1"
        );
    }
    assert!(of_kind(&r, DeviceKind::Gpu).is_empty());
}

#[test]
fn x86_coral_without_runtime_or_apex_driver() {
    let r = fixture("x86-coral-nolib");
    let tpus = of_kind(&r, DeviceKind::EdgeTpu);
    assert_eq!(tpus.len(), 2, "{tpus:?}");
    let usb = tpus.iter().find(|d| d.bus == "usb").unwrap();
    assert!(!usb.available);
    assert_eq!(
        usb.reason.as_deref(),
        Some("unavailable: libedgetpu.so.1 not found")
    );
    let pcie = tpus.iter().find(|d| d.bus == "pci").unwrap();
    assert_eq!(pcie.kernel_driver, None);
    assert_eq!(
        pcie.reason.as_deref(),
        Some("unavailable: apex kernel driver not bound (install gasket-dkms)")
    );
}

#[test]
fn epyc_zen4_this_machine_captured() {
    let r = fixture("epyc-zen4");
    let cpu = &r.cpu;
    assert_eq!(cpu.vendor.as_deref(), Some("AuthenticAMD"));
    assert_eq!(cpu.model.as_deref(), Some("AMD EPYC"));
    assert_eq!(cpu.feature_source, FeatureSource::Cpuinfo);
    for f in [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni",
        "avx512bf16",
        "avx512vbmi2",
    ] {
        assert!(cpu.has(f), "Zen 4 has {f}");
    }
    for f in ["avx512fp16", "avxvnni", "amx-tile", "amx-int8", "amx-bf16"] {
        assert!(!cpu.has(f), "Zen 4 has no {f}");
    }
    assert_eq!(cpu.amx, AmxState::NotPresent);
    assert_eq!(cpu.logical_cores, 2);
    let c = &cpu.clusters[0];
    assert_eq!(c.capacity, Some(1024));
    let l3 = c.caches.iter().find(|k| k.level == 3).unwrap();
    assert_eq!((l3.size_kib, l3.shared_cpu_list.as_str()), (32768, "0-1"));
    // Only virtio PCI functions: no GPU, NPU or TPU, and no Vulkan in a sysfs-only capture.
    assert_eq!(r.devices.len(), 1);
    assert_eq!(r.vulkan.loader, None);
}

#[test]
fn json_schema_is_stable() {
    let r = fixture("rock5b");
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["schema"], "edgehal.probe/1");
    assert_eq!(v["live"], false);
    assert_eq!(v["cpu"]["arch"], "aarch64");
    assert_eq!(v["cpu"]["logical_cores"], 8);
    assert_eq!(v["cpu"]["clusters"][0]["cpus"], "0-3");
    assert_eq!(v["cpu"]["clusters"][0]["midr"]["part"], "0xd05");
    assert_eq!(v["cpu"]["clusters"][1]["core"], "Cortex-A76");
    assert_eq!(v["cpu"]["clusters"][1]["capacity"], 1024);
    assert!(v["cpu"]["features"]
        .as_array()
        .unwrap()
        .contains(&"dotprod".into()));
    assert_eq!(v["cpu"]["amx_permission"], "not-present");
    let devs = v["devices"].as_array().unwrap();
    let kinds: Vec<&str> = devs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["cpu", "gpu", "npu"]);
    let npu = &devs[2];
    assert_eq!(npu["driver"], "npu");
    assert_eq!(npu["available"], true);
    assert_eq!(npu["reason"], serde_json::Value::Null);
    assert_eq!(npu["memory"], serde_json::json!(["host", "dma-buf"]));
    for d in devs {
        for key in [
            "kind",
            "name",
            "driver",
            "kernel_driver",
            "bus",
            "sysfs",
            "nodes",
            "memory",
            "available",
            "reason",
            "details",
        ] {
            assert!(d.get(key).is_some(), "device lacks {key}: {d}");
        }
    }
    let table = r.to_table();
    for needle in [
        "GPUs",
        "NPUs",
        "Edge TPUs",
        "Cortex-A55",
        "panthor",
        "Rockchip RKNPU",
    ] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
}

#[test]
fn fixture_auxv_overrides_features_line() {
    let d = edgehal_tests::scratch("probe-auxv");
    write(
        &d,
        "proc/cpuinfo",
        "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd47\n",
    );
    // AT_HWCAP: fp, asimd, sve(22); AT_HWCAP2: sve2(1), i8mm(13), bf16(14).
    write(
        &d,
        "edgehal-fixture/auxv",
        "AT_HWCAP 0x400003\nAT_HWCAP2 0x6002\n",
    );
    let r = probe(&SysRoot::new(&d));
    assert_eq!(r.cpu.feature_source, FeatureSource::FixtureAuxv);
    for f in ["neon", "sve", "sve2", "i8mm", "bf16"] {
        assert!(r.cpu.has(f), "{f}");
    }
    assert!(!r.cpu.has("dotprod") && !r.cpu.has("sme"));
    assert_eq!(r.cpu.clusters[0].core.as_deref(), Some("Cortex-A710"));
    // No sysfs cpu dirs: the count comes from cpuinfo.
    assert_eq!(r.cpu.logical_cores, 1);
}

#[test]
fn headless_nvidia_without_vulkan_loader() {
    let d = edgehal_tests::scratch("probe-nvidia");
    let dev = "sys/devices/pci0000:00/0000:00:06.0";
    write(&d, &format!("{dev}/vendor"), "0x10de\n");
    write(&d, &format!("{dev}/device"), "0x2335\n");
    write(&d, &format!("{dev}/class"), "0x030200\n");
    link(
        &d,
        &format!("{dev}/driver"),
        "../../../bus/pci/drivers/nvidia",
    );
    link(
        &d,
        "sys/bus/pci/devices/0000:00:06.0",
        "../../../devices/pci0000:00/0000:00:06.0",
    );
    write(
        &d,
        "proc/driver/nvidia/gpus/0000:00:06.0/information",
        "Model: \t\t NVIDIA H200\nIRQ:   \t\t 41\nBus Type: \t PCIe\nBus Location: \t 0000:00:06.0\nDevice Minor: \t 0\n",
    );
    write(&d, "dev/nvidia0", "");
    write(&d, "dev/nvidiactl", "");
    let r = probe(&SysRoot::new(&d));
    let gpus = of_kind(&r, DeviceKind::Gpu);
    assert_eq!(
        gpus.len(),
        1,
        "PCI function and /proc entry are one GPU: {gpus:?}"
    );
    let g = gpus[0];
    assert_eq!(g.name, "NVIDIA H200");
    assert_eq!(g.kernel_driver.as_deref(), Some("nvidia"));
    assert_eq!(g.nodes, vec!["/dev/nvidia0", "/dev/nvidiactl"]);
    assert!(g.memory.contains(&MemoryDomain::DeviceLocal));
    assert_eq!(
        g.reason.as_deref(),
        Some("unavailable: libvulkan.so.1 not found (Vulkan loader)")
    );

    // With a loader and an ICD whose library is missing, the ICD is the reason.
    write(&d, "usr/lib/x86_64-linux-gnu/libvulkan.so.1", "");
    write(
        &d,
        "usr/share/vulkan/icd.d/nvidia_icd.json",
        r#"{"file_format_version":"1.0.0","ICD":{"library_path":"libGLX_nvidia.so.0","api_version":"1.4.312"}}"#,
    );
    let r = probe(&SysRoot::new(&d));
    let g = of_kind(&r, DeviceKind::Gpu)[0].clone();
    assert_eq!(g.reason.as_deref(), Some("unavailable: Vulkan ICD nvidia_icd.json names libGLX_nvidia.so.0, which is not installed"));
    write(&d, "usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0", "");
    let r = probe(&SysRoot::new(&d));
    let g = of_kind(&r, DeviceKind::Gpu)[0].clone();
    assert!(g.available, "{:?}", g.reason);
}

#[test]
fn hailo_and_unbound_npu() {
    let d = edgehal_tests::scratch("probe-hailo");
    let dev = "sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0";
    write(&d, &format!("{dev}/vendor"), "0x1e60\n");
    write(&d, &format!("{dev}/device"), "0x2864\n");
    write(&d, &format!("{dev}/class"), "0x128000\n");
    link(
        &d,
        &format!("{dev}/driver"),
        "../../../../bus/pci/drivers/hailo",
    );
    link(
        &d,
        "sys/bus/pci/devices/0000:01:00.0",
        "../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0",
    );
    link(
        &d,
        "sys/class/hailo_chardev/hailo0",
        "../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0/hailo_chardev/hailo0",
    );
    link(
        &d,
        &format!("{dev}/hailo_chardev/hailo0/device"),
        "../../../0000:01:00.0",
    );
    write(&d, "dev/hailo0", "");
    // An Intel NPU PCI function whose driver is not loaded.
    let npu = "sys/devices/pci0000:00/0000:00:0b.0";
    write(&d, &format!("{npu}/vendor"), "0x8086\n");
    write(&d, &format!("{npu}/device"), "0x643e\n");
    write(&d, &format!("{npu}/class"), "0x120000\n");
    link(
        &d,
        "sys/bus/pci/devices/0000:00:0b.0",
        "../../../devices/pci0000:00/0000:00:0b.0",
    );
    let r = probe(&SysRoot::new(&d));
    let npus = of_kind(&r, DeviceKind::Npu);
    assert_eq!(npus.len(), 2, "{npus:?}");
    let h = npus.iter().find(|n| n.name == "Hailo-8").expect("Hailo-8");
    assert_eq!(h.kernel_driver.as_deref(), Some("hailo"));
    assert_eq!(h.nodes, vec!["/dev/hailo0"]);
    assert_eq!(
        h.reason.as_deref(),
        Some("unavailable: libhailort.so not found")
    );
    let i = npus
        .iter()
        .find(|n| n.name.starts_with("Intel NPU (Lunar Lake"))
        .expect("LNL NPU");
    assert_eq!(
        i.reason.as_deref(),
        Some("unavailable: kernel driver intel_vpu not bound")
    );

    write(&d, "usr/lib/libhailort.so.4.20.0", "");
    let r = probe(&SysRoot::new(&d));
    let h = r
        .devices_of(DeviceKind::Npu)
        .find(|n| n.name == "Hailo-8")
        .unwrap();
    assert!(h.available, "{:?}", h.reason);
    assert_eq!(h.details["runtime"], "/usr/lib/libhailort.so.4.20.0");
}

#[test]
fn empty_and_hostile_trees_do_not_panic() {
    let d = edgehal_tests::scratch("probe-empty");
    let r = probe(&SysRoot::new(&d));
    assert_eq!(r.cpu.logical_cores, 0);
    assert_eq!(r.cpu.arch.as_str(), "unknown");
    assert!(
        !r.devices[0].available,
        "a CPU with no cores listed is not usable"
    );
    assert_eq!(r.devices.len(), 1);
    assert!(r.to_json().contains("edgehal.probe/1"));

    let h = edgehal_tests::scratch("probe-hostile");
    write(
        &h,
        "proc/cpuinfo",
        "processor : x\nflags : \u{0}\u{1}avx2\nCPU part : 0xzz\n\n\n:::\n",
    );
    write(&h, "sys/devices/system/cpu/online", "0-99999999\n");
    write(
        &h,
        "sys/devices/system/cpu/cpu0/cache/index0/size",
        "huge\n",
    );
    write(&h, "sys/devices/system/cpu/cpu0/cpu_capacity", "-5\n");
    link(&h, "sys/class/drm/card0", "card0");
    link(&h, "sys/class/accel/accel0", "/../../../../etc");
    write(&h, "sys/bus/usb/devices/1-1/idVendor", "1a6e\n");
    write(&h, "sys/bus/usb/devices/1-1/idProduct", "089a\n");
    write(
        &h,
        "sys/bus/usb/devices/1-1/busnum",
        "99999999999999999999\n",
    );
    write(&h, "usr/share/vulkan/icd.d/bad.json", "{not json");
    let r = probe(&SysRoot::new(&h));
    assert_eq!(
        r.cpu.logical_cores, 1,
        "the bad online list is ignored; cpu0 dir remains"
    );
    let usb = r
        .devices_of(DeviceKind::EdgeTpu)
        .next()
        .expect("Coral still listed");
    assert!(!usb.available);
    assert_eq!(r.vulkan.icds[0].library_path, None);
    let _ = r.to_table();
}

/// On x86_64 the live probe uses CPUID+XGETBV; it must agree with std's detection and with
/// the kernel's view in /proc/cpuinfo.
#[cfg(target_arch = "x86_64")]
#[test]
fn live_x86_probe_agrees_with_std_and_cpuinfo() {
    let r = probe(&SysRoot::live());
    assert!(r.live);
    assert_eq!(r.cpu.feature_source, FeatureSource::Cpuid);
    let f = edgehal_core::probe::x86_features_from_cpuid();
    let checks = [
        ("avx", std::arch::is_x86_feature_detected!("avx")),
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
        ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
        (
            "avx512vnni",
            std::arch::is_x86_feature_detected!("avx512vnni"),
        ),
        (
            "avx512bf16",
            std::arch::is_x86_feature_detected!("avx512bf16"),
        ),
        (
            "avx512fp16",
            std::arch::is_x86_feature_detected!("avx512fp16"),
        ),
        ("avxvnni", std::arch::is_x86_feature_detected!("avxvnni")),
    ];
    for (name, std_says) in checks {
        assert_eq!(f.contains(name), std_says, "CPUID probe vs std on {name}");
        assert_eq!(r.cpu.has(name), std_says, "report vs std on {name}");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap_or_default();
    if flags.contains(&"avx512f") {
        assert!(
            r.cpu.has("avx512f"),
            "cpuinfo lists avx512f but the probe missed it"
        );
    }
    for (name, flag) in [
        ("avx512vnni", "avx512_vnni"),
        ("avx512bf16", "avx512_bf16"),
        ("amx-tile", "amx_tile"),
        ("amx-int8", "amx_int8"),
    ] {
        if !flags.is_empty() {
            assert_eq!(
                r.cpu.has(name),
                flags.contains(&flag),
                "probe vs /proc/cpuinfo on {name}"
            );
        }
    }
    if r.cpu.has("amx-tile") {
        // Linux >= 5.16 grants XTILEDATA on request; the probe must have asked.
        assert_eq!(r.cpu.amx, AmxState::Granted, "{:?}", r.cpu.amx);
    } else {
        assert_eq!(r.cpu.amx, AmxState::NotPresent);
    }
    eprintln!(
        "live features: {:?}; amx: {}",
        r.cpu.features,
        r.cpu.amx.describe()
    );
}

#[test]
fn sysroot_path_is_kept() {
    let dir: PathBuf = edgehal_tests::repo_root().join("tests/fixtures/sysroots/rpi5");
    let r = probe(&SysRoot::new(&dir));
    assert_eq!(r.sysroot, dir);
}
