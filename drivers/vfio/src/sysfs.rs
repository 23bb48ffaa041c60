//! Pre-flight checks through sysfs and /dev before any VFIO ioctl, so that a misconfigured
//! machine gets an error that says what to do. The root is a parameter so that fake trees test
//! every branch.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What the checks found out about a device that is ready for VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioTarget {
    /// PCI address, `dddd:bb:dd.f`.
    pub bdf: String,
    /// `<root>/sys/bus/pci/devices/<bdf>`.
    pub sysfs: PathBuf,
    /// IOMMU group number.
    pub group: u32,
    /// `<root>/dev/vfio/<group>`.
    pub group_node: PathBuf,
}

/// Check the shape of a PCI address (`0000:03:00.0`).
pub fn check_bdf(bdf: &str) -> Result<()> {
    let b = bdf.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(u8::is_ascii_hexdigit))
    };
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11]);
    if ok {
        Ok(())
    } else {
        Err(Error::arg(format!(
            "'{bdf}' is not a PCI address of the form 0000:03:00.0"
        )))
    }
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// PCI class code (24 bits) of a device directory, if readable.
fn class_of(dev: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(dev.join("class")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Find the device under `root`, check it has an IOMMU group (checked first: without one,
/// vfio-pci refuses the device anyway), is bound to vfio-pci, that its group is viable, and that
/// this process may open the group node.
pub fn locate(root: &Path, bdf: &str) -> Result<VfioTarget> {
    check_bdf(bdf)?;
    let dev = root.join("sys/bus/pci/devices").join(bdf);
    if !dev.exists() {
        return Err(Error::NoDevice {
            bdf: bdf.into(),
            path: dev,
        });
    }
    let group_link = dev.join("iommu_group");
    let group: u32 = link_name(&group_link)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::NoIommuGroup {
            bdf: bdf.into(),
            path: group_link.clone(),
        })?;
    match link_name(&dev.join("driver")) {
        Some(d) if d == "vfio-pci" => {}
        other => {
            return Err(Error::NotBoundToVfio {
                bdf: bdf.into(),
                current: other.map_or_else(|| "no driver".to_string(), |d| format!("driver {d}")),
            })
        }
    }
    // Viability: every other device of the group is bound to vfio-pci, unbound, or a bridge.
    if let Ok(rd) = std::fs::read_dir(group_link.join("devices")) {
        let mut others: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        others.sort();
        for name in others {
            let name = name.to_string_lossy().into_owned();
            if name == bdf {
                continue;
            }
            let other = group_link.join("devices").join(&name);
            let is_bridge = class_of(&other).is_some_and(|c| c >> 8 == 0x0604);
            match link_name(&other.join("driver")) {
                Some(d) if d != "vfio-pci" && d != "pci-stub" && !is_bridge => {
                    return Err(Error::GroupNotViable {
                        bdf: bdf.into(),
                        group,
                        other: name,
                        driver: d,
                    })
                }
                _ => {}
            }
        }
    }
    let group_node = root.join("dev/vfio").join(group.to_string());
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&group_node)
    {
        Ok(_) => {}
        Err(e) => return Err(open_error(bdf, group, &group_node, e)),
    }
    Ok(VfioTarget {
        bdf: bdf.into(),
        sysfs: dev,
        group,
        group_node,
    })
}

/// Turn a failure to open `/dev/vfio/N` into an actionable error.
pub fn open_error(bdf: &str, group: u32, path: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoGroupNode {
            bdf: bdf.into(),
            group,
            path: path.into(),
        },
        std::io::ErrorKind::PermissionDenied => Error::NoPermission {
            bdf: bdf.into(),
            group,
            path: path.into(),
        },
        _ if e.raw_os_error() == Some(libc::EBUSY) => Error::os(
            format!(
                "open {} (IOMMU group {group} of {bdf} is already open in another process or \
                 VM; close that first)",
                path.display()
            ),
            e,
        ),
        _ => Error::os(format!("open {}", path.display()), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fake(PathBuf);
    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// root/sys/bus/pci/devices/<bdf> -> ../../../devices/pci0000:00/<bdf>, with driver and
    /// iommu_group links as the kernel makes them.
    fn fake(name: &str) -> Fake {
        let root = std::env::temp_dir().join(format!("edgehal-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers/e1000e")).unwrap();
        std::fs::create_dir_all(root.join("sys/kernel/iommu_groups/7/devices")).unwrap();
        std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        Fake(root)
    }

    fn add_dev(root: &Path, bdf: &str, driver: Option<&str>, group: Option<u32>) {
        let d = root.join("sys/devices/pci0000:00").join(bdf);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("class"), "0x020000\n").unwrap();
        symlink(&d, root.join("sys/bus/pci/devices").join(bdf)).unwrap();
        if let Some(drv) = driver {
            symlink(root.join("sys/bus/pci/drivers").join(drv), d.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gd = root.join("sys/kernel/iommu_groups").join(g.to_string());
            std::fs::create_dir_all(gd.join("devices")).unwrap();
            symlink(&gd, d.join("iommu_group")).unwrap();
            symlink(&d, gd.join("devices").join(bdf)).unwrap();
        }
    }

    #[test]
    fn bdf_shape() {
        check_bdf("0000:03:00.0").unwrap();
        for bad in [
            "03:00.0",
            "0000:03:00.8",
            "0000:0g:00.0",
            "0000-03:00.0",
            "",
            "0000:03:00.00",
        ] {
            assert!(check_bdf(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn missing_device() {
        let f = fake("nodev");
        let e = locate(&f.0, "0000:03:00.0").unwrap_err();
        assert!(matches!(e, Error::NoDevice { .. }), "{e}");
    }

    #[test]
    fn not_bound_says_how_to_bind() {
        let f = fake("unbound");
        add_dev(&f.0, "0000:03:00.0", Some("e1000e"), Some(7));
        let e = locate(&f.0, "0000:03:00.0").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NotBoundToVfio { .. }));
        assert!(msg.contains("driver e1000e"), "{msg}");
        assert!(
            msg.contains("bind 0000:03:00.0 to vfio-pci: echo vfio-pci > /sys/bus/pci/devices/0000:03:00.0/driver_override"),
            "{msg}"
        );
        let f2 = fake("nodriver");
        add_dev(&f2.0, "0000:03:00.0", None, Some(7));
        let msg = locate(&f2.0, "0000:03:00.0").unwrap_err().to_string();
        assert!(msg.contains("bound to no driver"), "{msg}");
    }

    #[test]
    fn no_iommu_group_mentions_intel_iommu() {
        let f = fake("nogroup");
        add_dev(&f.0, "0000:03:00.0", Some("vfio-pci"), None);
        let e = locate(&f.0, "0000:03:00.0").unwrap_err();
        assert!(matches!(e, Error::NoIommuGroup { .. }));
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");
    }

    #[test]
    fn missing_group_node() {
        let f = fake("nonode");
        add_dev(&f.0, "0000:03:00.0", Some("vfio-pci"), Some(12));
        let e = locate(&f.0, "0000:03:00.0").unwrap_err();
        match &e {
            Error::NoGroupNode { group, path, .. } => {
                assert_eq!(*group, 12);
                assert!(path.ends_with("dev/vfio/12"));
            }
            other => panic!("wrong error {other}"),
        }
        assert!(e.to_string().contains("/dev/vfio/12 does not exist"), "{e}");
    }

    #[test]
    fn group_not_viable_names_the_culprit() {
        let f = fake("viable");
        add_dev(&f.0, "0000:03:00.0", Some("vfio-pci"), Some(7));
        // a second function in the same group, still on its host driver
        add_dev(&f.0, "0000:03:00.1", Some("e1000e"), None);
        let gd = f.0.join("sys/kernel/iommu_groups/7");
        symlink(
            f.0.join("sys/devices/pci0000:00/0000:03:00.1"),
            gd.join("devices/0000:03:00.1"),
        )
        .unwrap();
        std::fs::write(f.0.join("dev/vfio/7"), "").unwrap();
        let e = locate(&f.0, "0000:03:00.0").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::GroupNotViable { .. }), "{msg}");
        assert!(msg.contains("0000:03:00.1 is bound to e1000e"), "{msg}");
        // a bridge in the group is fine
        std::fs::write(
            f.0.join("sys/devices/pci0000:00/0000:03:00.1/class"),
            "0x060400\n",
        )
        .unwrap();
        let t = locate(&f.0, "0000:03:00.0").unwrap();
        assert_eq!(t.group, 7);
        assert!(t.group_node.ends_with("dev/vfio/7"));
    }

    #[test]
    fn permission_error_is_actionable() {
        // Tests run as root here, so EACCES cannot be provoked with file modes; check the mapping.
        let e = open_error(
            "0000:03:00.0",
            7,
            Path::new("/dev/vfio/7"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(e, Error::NoPermission { .. }));
        let msg = e.to_string();
        assert!(msg.contains("no permission to open /dev/vfio/7"), "{msg}");
        assert!(msg.contains("chown"), "{msg}");
        let busy = open_error(
            "0000:03:00.0",
            7,
            Path::new("/dev/vfio/7"),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert!(
            busy.to_string().contains("already open in another process"),
            "{busy}"
        );
    }
}
