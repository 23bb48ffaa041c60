//! [`SysRoot`]: the directory that plays `/` for a probe. Every probe read goes through it, so
//! a fixture tree under `tests/fixtures/sysroots/<board>/` exercises exactly the code that runs
//! on a real machine. Symlinks are followed inside the root only: absolute link targets are
//! re-rooted and `..` never climbs above the root.

use std::path::{Component, Path, PathBuf};

/// Longest file a probe reads (sysfs attributes are one page; cpuinfo of a 256-core machine is
/// well under this). Larger files are treated as unreadable rather than allocated.
const MAX_FILE_BYTES: u64 = 4 << 20;
/// Symlink hops allowed while resolving one path (Linux uses 40 as well).
const MAX_LINK_HOPS: usize = 40;

/// A directory treated as the root of the machine being probed.
#[derive(Clone, Debug)]
pub struct SysRoot {
    root: PathBuf,
    live: bool,
}

impl SysRoot {
    /// The running machine (`/`). CPU feature detection uses CPUID/auxv on a live root.
    pub fn live() -> Self {
        SysRoot {
            root: PathBuf::from("/"),
            live: true,
        }
    }

    /// A fixture tree. It is never treated as live, even if it is `/` spelled differently,
    /// unless `dir` canonicalises to `/`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let root: PathBuf = dir.into();
        let live = std::fs::canonicalize(&root)
            .map(|p| p == Path::new("/"))
            .unwrap_or(false);
        SysRoot { root, live }
    }

    /// The directory standing in for `/`.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// True when this root is the running machine, so CPUID, the auxiliary vector and
    /// `arch_prctl` describe the same machine as the files.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Host path of `rel` (a path relative to the root; a leading `/` is ignored) without
    /// following symlinks. `..` components are dropped rather than allowed to escape.
    fn host(&self, rel: &Path) -> PathBuf {
        let mut p = self.root.clone();
        for c in rel.components() {
            if let Component::Normal(n) = c {
                p.push(n);
            }
        }
        p
    }

    /// Resolve every symlink in `rel` inside the root and return the root-relative result
    /// (no leading `/`), or `None` if some component is missing, or on a link loop.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> Option<PathBuf> {
        let mut todo: Vec<std::ffi::OsString> = Vec::new();
        push_components(&mut todo, rel.as_ref());
        todo.reverse();
        let mut done = PathBuf::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            if c == ".." {
                done.pop();
                continue;
            }
            let cand = done.join(&c);
            let host = self.host(&cand);
            let meta = std::fs::symlink_metadata(&host).ok()?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return None;
                }
                let target = std::fs::read_link(&host).ok()?;
                if target.is_absolute() {
                    done = PathBuf::new();
                }
                let mut parts = Vec::new();
                push_components(&mut parts, &target);
                for p in parts.into_iter().rev() {
                    todo.push(p);
                }
            } else {
                done = cand;
            }
        }
        Some(done)
    }

    /// Read a whole text file below the root, following symlinks inside it. `None` when it is
    /// missing, unreadable, larger than 4 MiB, or not UTF-8 (lossy conversion is used for the
    /// odd non-UTF-8 byte, since sysfs and procfs are ASCII in practice).
    pub fn read_to_string(&self, rel: impl AsRef<Path>) -> Option<String> {
        let bytes = self.read_bytes(rel)?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Raw bytes of a file below the root (device-tree strings hold NULs).
    pub fn read_bytes(&self, rel: impl AsRef<Path>) -> Option<Vec<u8>> {
        use std::io::Read;
        let resolved = self.resolve(rel)?;
        let host = self.host(&resolved);
        let f = std::fs::File::open(host).ok()?;
        let mut buf = Vec::new();
        // procfs/sysfs report size 0, so read up to the cap instead of trusting metadata.
        f.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf).ok()?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return None;
        }
        Some(buf)
    }

    /// A file's contents with surrounding whitespace (and trailing NULs) removed; `None` when
    /// missing or empty.
    pub fn read_trim(&self, rel: impl AsRef<Path>) -> Option<String> {
        let s = self.read_to_string(rel)?;
        let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if t.is_empty() {
            None
        } else {
            Some(t.to_string())
        }
    }

    /// Parse a file holding one unsigned integer (decimal, or hex with `0x`).
    pub fn read_u64(&self, rel: impl AsRef<Path>) -> Option<u64> {
        parse_u64(&self.read_trim(rel)?)
    }

    /// Names in a directory below the root, sorted; empty when it is missing.
    pub fn read_dir(&self, rel: impl AsRef<Path>) -> Vec<String> {
        let Some(resolved) = self.resolve(rel) else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(self.host(&resolved)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    /// Whether `rel` exists below the root (symlinks followed inside the root).
    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        self.resolve(rel).is_some()
    }

    /// The target of the symlink `rel` itself (not followed), as stored in the link.
    pub fn read_link(&self, rel: impl AsRef<Path>) -> Option<PathBuf> {
        let rel = rel.as_ref();
        let parent = rel
            .parent()
            .map(|p| self.resolve(p))
            .unwrap_or(Some(PathBuf::new()))?;
        let name = rel.file_name()?;
        std::fs::read_link(self.host(&parent.join(name))).ok()
    }

    /// Last component of a symlink's target: the usual way to name a sysfs `driver` link.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Option<String> {
        let t = self.read_link(rel)?;
        t.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

fn push_components(out: &mut Vec<std::ffi::OsString>, p: &Path) {
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => out.push("..".into()),
            _ => {}
        }
    }
}

/// Parse `123`, `0x1f` or `0X1F`.
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Compare names so that `cpu2` sorts before `cpu10` and `policy4` before `policy6`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let cut = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (head, tail) = s.split_at(cut);
        (head.to_string(), tail.parse::<u64>().ok())
    };
    let (ha, na) = split(a);
    let (hb, nb) = split(b);
    ha.cmp(&hb).then(na.cmp(&nb)).then(a.cmp(b))
}

/// Parse a kernel CPU list such as `0-3,8,10-11`. Lists naming more than 65536 CPUs or with
/// malformed parts give `None`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    const MAX: usize = 65536;
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().ok()?,
                b.trim().parse::<usize>().ok()?,
            ),
            None => {
                let v = part.parse::<usize>().ok()?;
                (v, v)
            }
        };
        if b < a || b - a >= MAX || out.len() + (b - a + 1) > MAX {
            return None;
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Format CPU numbers back into the kernel's compact list form (`0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgehal-sysroot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert!(parse_cpu_list("3-1").is_none());
        assert!(parse_cpu_list("0-99999999").is_none());
        assert!(parse_cpu_list("x").is_none());
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let d = scratch("links");
        std::fs::create_dir_all(d.join("sys/devices/gpu")).unwrap();
        std::fs::write(d.join("sys/devices/gpu/vendor"), "0x10de\n").unwrap();
        std::fs::create_dir_all(d.join("sys/class/drm")).unwrap();
        std::os::unix::fs::symlink("../../devices/gpu", d.join("sys/class/drm/card0")).unwrap();
        // An absolute link is re-rooted, and `..` past the root stops at the root.
        std::os::unix::fs::symlink("/sys/devices/gpu", d.join("sys/class/drm/card1")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc", d.join("sys/class/drm/escape"))
            .unwrap();
        std::os::unix::fs::symlink("loop", d.join("sys/class/drm/loop")).unwrap();
        let r = SysRoot::new(&d);
        assert!(!r.is_live());
        assert_eq!(
            r.read_trim("sys/class/drm/card0/vendor").as_deref(),
            Some("0x10de")
        );
        assert_eq!(
            r.read_trim("/sys/class/drm/card1/vendor").as_deref(),
            Some("0x10de")
        );
        assert_eq!(
            r.resolve("sys/class/drm/card1").unwrap(),
            PathBuf::from("sys/devices/gpu")
        );
        // `escape` resolves to <root>/etc, which does not exist in the fixture.
        assert!(r.read_to_string("sys/class/drm/escape/passwd").is_none());
        assert!(r.resolve("sys/class/drm/loop").is_none());
        assert_eq!(r.link_name("sys/class/drm/card0").as_deref(), Some("gpu"));
        assert_eq!(
            r.read_dir("sys/class/drm"),
            vec!["card0", "card1", "escape", "loop"]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["cpu10", "cpu2", "cpufreq", "cpu1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["cpu1", "cpu2", "cpu10", "cpufreq"]);
    }
}
