//! Finding user-space libraries and Vulkan ICD manifests below a [`SysRoot`].
//!
//! The search mirrors the dynamic loader closely enough for a "is it installed" answer: the
//! multiarch and classic library directories, plus every absolute directory named in
//! `etc/ld.so.conf` and `etc/ld.so.conf.d/*.conf` (one level of `include` globs of the form
//! `dir/*.conf`), plus `LD_LIBRARY_PATH` on a live root. Nothing is `dlopen`ed: probing stays
//! free of side effects, and the driver's `open()` reports a library that exists but fails to
//! load.

use super::sysroot::SysRoot;

const STD_LIB_DIRS: &[&str] = &[
    "lib",
    "lib64",
    "usr/lib",
    "usr/lib64",
    "usr/local/lib",
    "usr/local/lib64",
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib/arm-linux-gnueabihf",
    "usr/lib/arm-linux-gnueabihf",
];

/// Directories where Vulkan loaders look for ICD manifests.
const ICD_DIRS: &[&str] = &[
    "etc/vulkan/icd.d",
    "usr/local/etc/vulkan/icd.d",
    "usr/share/vulkan/icd.d",
    "usr/local/share/vulkan/icd.d",
];

/// The library directories of one root, in search order, root-relative.
#[derive(Clone, Debug)]
pub struct LibDirs {
    dirs: Vec<String>,
}

impl LibDirs {
    pub fn new(root: &SysRoot) -> Self {
        let mut dirs: Vec<String> = Vec::new();
        let mut add = |d: &str| {
            let d = d
                .trim()
                .trim_start_matches('/')
                .trim_end_matches('/')
                .to_string();
            if !d.is_empty() && !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        if root.is_live() {
            if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
                for d in p.split(':').filter(|d| d.starts_with('/')) {
                    add(d);
                }
            }
        }
        let mut conf_files = vec!["etc/ld.so.conf".to_string()];
        for n in root.read_dir("etc/ld.so.conf.d") {
            if n.ends_with(".conf") {
                conf_files.push(format!("etc/ld.so.conf.d/{n}"));
            }
        }
        let mut i = 0;
        while i < conf_files.len() && i < 256 {
            let text = root.read_to_string(&conf_files[i]).unwrap_or_default();
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                if let Some(pat) = line.strip_prefix("include") {
                    // `include /etc/ld.so.conf.d/*.conf`: expand the simple `dir/*.ext` glob.
                    let pat = pat.trim().trim_start_matches('/');
                    if let Some((dir, suffix)) = pat.rsplit_once("/*") {
                        for n in root.read_dir(dir) {
                            let f = format!("{dir}/{n}");
                            if n.ends_with(suffix) && !conf_files.contains(&f) {
                                conf_files.push(f);
                            }
                        }
                    }
                } else if line.starts_with('/') {
                    add(line);
                }
            }
            i += 1;
        }
        for d in STD_LIB_DIRS {
            add(d);
        }
        LibDirs { dirs }
    }

    /// Root-relative path (with a leading `/`) of the first file called `name`, or `None`.
    pub fn find(&self, root: &SysRoot, name: &str) -> Option<String> {
        if name.contains('/') {
            let rel = name.trim_start_matches('/');
            return root.exists(rel).then(|| format!("/{rel}"));
        }
        self.dirs
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| root.exists(p))
            .map(|p| format!("/{p}"))
    }

    /// The first library whose file name starts with `prefix` (for version-suffixed sonames
    /// such as `libhailort.so.4.20.0`).
    pub fn find_prefix(&self, root: &SysRoot, prefix: &str) -> Option<String> {
        for d in &self.dirs {
            if let Some(n) = root.read_dir(d).into_iter().find(|n| n.starts_with(prefix)) {
                return Some(format!("/{d}/{n}"));
            }
        }
        None
    }
}

/// One Vulkan ICD manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icd {
    /// Root-relative manifest path (`/usr/share/vulkan/icd.d/broadcom_icd.aarch64.json`).
    pub manifest: String,
    /// File name of the manifest, used to match it to a kernel driver.
    pub file: String,
    /// `ICD.library_path` from the manifest, if it parsed.
    pub library_path: Option<String>,
    /// Where that library was found, if it was.
    pub library_found: Option<String>,
    /// `ICD.api_version`, if given.
    pub api_version: Option<String>,
}

/// The Vulkan loader and ICDs installed under a root.
#[derive(Clone, Debug, Default)]
pub struct VulkanInfo {
    /// Where `libvulkan.so.1` was found.
    pub loader: Option<String>,
    pub icds: Vec<Icd>,
}

pub fn probe_vulkan(root: &SysRoot, libs: &LibDirs) -> VulkanInfo {
    let loader = libs.find(root, "libvulkan.so.1");
    let mut icds = Vec::new();
    for dir in ICD_DIRS {
        for file in root.read_dir(dir) {
            if !file.ends_with(".json") {
                continue;
            }
            let manifest = format!("/{dir}/{file}");
            let parsed: Option<serde_json::Value> = root
                .read_to_string(&manifest)
                .and_then(|t| serde_json::from_str(&t).ok());
            let field = |k: &str| {
                parsed
                    .as_ref()
                    .and_then(|v| v.get("ICD"))
                    .and_then(|icd| icd.get(k))
                    .and_then(|s| s.as_str())
                    .map(str::to_string)
            };
            let library_path = field("library_path");
            let library_found = library_path.as_deref().and_then(|p| {
                if p.starts_with('/') || !p.contains('/') {
                    libs.find(root, p)
                } else {
                    // Relative to the manifest's directory.
                    libs.find(root, &format!("/{dir}/{p}"))
                }
            });
            icds.push(Icd {
                manifest,
                file,
                library_path,
                library_found,
                api_version: field("api_version"),
            });
        }
    }
    VulkanInfo { loader, icds }
}
