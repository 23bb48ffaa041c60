//! Coral Edge TPU probing. USB accelerators enumerate as `1a6e:089a` (Global Unichip, DFU
//! mode, before libedgetpu downloads the firmware) and as `18d1:9302` (Google, after); both
//! count as present, as in libedgetpu. There is no kernel driver for USB: libedgetpu talks to
//! `/dev/bus/usb/BBB/DDD` through libusb. PCIe/M.2 modules are `1ac1:089a`, driven by the
//! gasket `apex` driver (`/dev/apex_N`, `sys/class/apex/apex_N` with a `temp` in milli-°C).

use std::collections::BTreeSet;

use super::libs::LibDirs;
use super::sysroot::SysRoot;
use super::{kernel_driver, pci_ids, slash, Backend, DeviceKind, MemoryDomain, ProbedDevice};

const LIBEDGETPU: &str = "libedgetpu.so.1";

fn link_speed(mbps: &str) -> String {
    let what = match mbps {
        "1.5" => "USB 1 Low-Speed",
        "12" => "USB 1 Full-Speed",
        "480" => "USB 2 High-Speed",
        "5000" => "USB 3 SuperSpeed",
        "10000" => "USB 3 SuperSpeed+",
        "20000" => "USB 3 SuperSpeed+ 2x2",
        _ => "unknown USB speed",
    };
    format!("{mbps} Mb/s ({what})")
}

pub(super) fn probe_edgetpus(root: &SysRoot, libs: &LibDirs) -> Vec<ProbedDevice> {
    let lib = libs.find(root, LIBEDGETPU);
    let mut out = Vec::new();

    // USB accelerators.
    for name in root.read_dir("sys/bus/usb/devices") {
        if name.contains(':') || name.starts_with("usb") {
            continue; // interfaces and root hubs
        }
        let base = format!("sys/bus/usb/devices/{name}");
        let (Some(vid), Some(pid)) = (
            root.read_trim(format!("{base}/idVendor")),
            root.read_trim(format!("{base}/idProduct")),
        ) else {
            continue;
        };
        let state = match (
            vid.to_ascii_lowercase().as_str(),
            pid.to_ascii_lowercase().as_str(),
        ) {
            ("1a6e", "089a") => "dfu (firmware not loaded yet; libedgetpu loads it on first open)",
            ("18d1", "9302") => "ready (firmware loaded)",
            _ => continue,
        };
        let mut d = ProbedDevice::new(
            DeviceKind::EdgeTpu,
            "Coral USB Accelerator",
            Backend::EdgeTpu,
            "usb",
        );
        d.sysfs = root.resolve(&base).as_deref().map(slash);
        d.memory = vec![MemoryDomain::Host];
        d.detail("usb_id", format!("{vid}:{pid}"));
        d.detail("state", state);
        d.detail("path", format!("/sys/bus/usb/devices/{name}"));
        match root.read_trim(format!("{base}/speed")) {
            Some(s) => {
                if s == "480" || s == "12" || s == "1.5" {
                    d.detail(
                        "note",
                        "USB 2 link: expect several times lower throughput than USB 3",
                    );
                }
                d.detail("link", link_speed(&s));
            }
            None => d.detail("link", "unknown (no speed file)"),
        }
        for k in ["manufacturer", "product", "serial"] {
            if let Some(v) = root.read_trim(format!("{base}/{k}")) {
                d.detail(k, v);
            }
        }
        let bus = root.read_u64(format!("{base}/busnum"));
        let dev = root.read_u64(format!("{base}/devnum"));
        match (bus, dev) {
            (Some(b), Some(n)) => {
                let node = format!("dev/bus/usb/{b:03}/{n:03}");
                if root.exists(&node) {
                    d.nodes.push(format!("/{node}"));
                } else {
                    d.unavailable(format!("/{node} not found"));
                }
            }
            _ => d.unavailable("busnum/devnum missing, cannot locate the USB device node"),
        }
        match &lib {
            Some(p) => d.detail("runtime", p.clone()),
            None => d.unavailable(format!("{LIBEDGETPU} not found")),
        }
        out.push(d);
    }

    // PCIe / M.2 modules bound to apex.
    let mut seen = BTreeSet::new();
    for name in root.read_dir("sys/class/apex") {
        let cls = format!("sys/class/apex/{name}");
        let dev = root.resolve(format!("{cls}/device"));
        let mut d = ProbedDevice::new(
            DeviceKind::EdgeTpu,
            "Coral PCIe/M.2 Edge TPU",
            Backend::EdgeTpu,
            "pci",
        );
        if let Some(dv) = &dev {
            let ds = dv.display().to_string();
            seen.insert(ds.clone());
            d.kernel_driver = kernel_driver(root, &ds);
            if let Some((v, id, _)) = pci_ids(root, &ds) {
                d.detail("pci_id", format!("{v:04x}:{id:04x}"));
            }
            d.sysfs = Some(slash(dv));
        }
        d.kernel_driver.get_or_insert_with(|| "apex".into());
        d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
        d.detail("apex", name.clone());
        if let Some(t) = root
            .read_trim(format!("{cls}/temp"))
            .and_then(|t| t.parse::<i64>().ok())
        {
            d.detail("temp_c", format!("{:.2}", t as f64 / 1000.0));
        }
        for k in ["status", "driver_version", "pci_address"] {
            if let Some(v) = root.read_trim(format!("{cls}/{k}")) {
                d.detail(k, v);
            }
        }
        let node = format!("dev/{name}");
        if root.exists(&node) {
            d.nodes.push(format!("/{node}"));
        } else {
            d.unavailable(format!("/{node} not found"));
        }
        if let Some(st) = d.details.get("status").cloned() {
            if st != "ALIVE" {
                d.unavailable(format!("apex status is {st}"));
            }
        }
        match &lib {
            Some(p) => d.detail("runtime", p.clone()),
            None => d.unavailable(format!("{LIBEDGETPU} not found")),
        }
        out.push(d);
    }

    // Apex PCI functions with no apex class device: the gasket/apex driver is missing.
    for bdf in root.read_dir("sys/bus/pci/devices") {
        let rel = format!("sys/bus/pci/devices/{bdf}");
        if pci_ids(root, &rel).map(|(v, d, _)| (v, d)) != Some((0x1ac1, 0x089a)) {
            continue;
        }
        let Some(dev) = root.resolve(&rel) else {
            continue;
        };
        if seen.contains(&dev.display().to_string()) {
            continue;
        }
        let mut d = ProbedDevice::new(
            DeviceKind::EdgeTpu,
            "Coral PCIe/M.2 Edge TPU",
            Backend::EdgeTpu,
            "pci",
        );
        d.kernel_driver = kernel_driver(root, &dev.display().to_string());
        d.sysfs = Some(slash(&dev));
        d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
        d.detail("pci_id", "1ac1:089a");
        d.unavailable("apex kernel driver not bound (install gasket-dkms)");
        out.push(d);
    }
    out
}
