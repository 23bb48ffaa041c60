//! CPU probing: identity, topology (packages, big.LITTLE clusters), caches and SIMD features.
//!
//! Feature sources, in order of trust:
//! - live x86_64: our own CPUID + XGETBV (OS-enabled state in XCR0), because std cannot detect
//!   AMX on stable Rust; AMX additionally needs the `arch_prctl` permission, requested here;
//! - live aarch64: `AT_HWCAP`/`AT_HWCAP2` from the auxiliary vector;
//! - fixtures: `edgehal-fixture/auxv` (ARM, see the module docs of [`super`]) when present,
//!   else the `/proc/cpuinfo` `flags` (x86) or `Features` (ARM) line.

use std::collections::{BTreeMap, BTreeSet};

use super::sysroot::{format_cpu_list, parse_cpu_list, parse_u64, SysRoot};

/// Instruction-set family of the probed CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
    Unknown,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Unknown => "unknown",
        }
    }
}

/// Where the feature list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSource {
    /// CPUID + XGETBV executed on this machine.
    Cpuid,
    /// `getauxval(AT_HWCAP/AT_HWCAP2)` of this process.
    Auxv,
    /// `edgehal-fixture/auxv` in a fixture tree.
    FixtureAuxv,
    /// The `flags`/`Features` line of `proc/cpuinfo`.
    Cpuinfo,
    /// Nothing usable was found.
    None,
}

impl FeatureSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureSource::Cpuid => "cpuid+xgetbv",
            FeatureSource::Auxv => "auxv",
            FeatureSource::FixtureAuxv => "fixture-auxv",
            FeatureSource::Cpuinfo => "proc/cpuinfo",
            FeatureSource::None => "none",
        }
    }
}

/// Whether this process may execute AMX tile instructions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmxState {
    /// The CPU (or fixture) has no usable AMX tile state.
    NotPresent,
    /// Linux granted XTILEDATA to this process (`ARCH_REQ_XCOMP_PERM`).
    Granted,
    /// The request failed; the text says how.
    Denied(String),
    /// A fixture lists AMX; permission is a property of a live process and was not requested.
    NotRequested,
}

impl AmxState {
    pub fn describe(&self) -> String {
        match self {
            AmxState::NotPresent => "not-present".into(),
            AmxState::Granted => "granted".into(),
            AmxState::Denied(why) => format!("denied: {why}"),
            AmxState::NotRequested => "not-requested (fixture probe)".into(),
        }
    }
}

/// One cache as described by `cpuN/cache/indexK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cache {
    pub level: u32,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    pub size_kib: u64,
    /// The CPUs sharing it, kernel list form (`0-3`).
    pub shared_cpu_list: String,
}

/// CPUs of one core type: same core name, same capacity and same maximum frequency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub cpus: Vec<usize>,
    /// Core name: from the MIDR part on ARM (`Cortex-A76`), `P-core`/`E-core` on hybrid x86.
    pub core: Option<String>,
    /// `(implementer, part)` from the MIDR on ARM.
    pub midr: Option<(u32, u32)>,
    /// `cpu_capacity` (1024 = the biggest core), when the kernel exposes it.
    pub capacity: Option<u64>,
    /// `cpuinfo_max_freq` in kHz, when cpufreq is present.
    pub max_freq_khz: Option<u64>,
    /// Caches seen by the first CPU of the cluster.
    pub caches: Vec<Cache>,
}

/// What the probe knows about the CPUs.
#[derive(Clone, Debug)]
pub struct CpuInfo {
    pub arch: Arch,
    /// `AuthenticAMD`, `GenuineIntel`, or the ARM implementer name (`Arm`).
    pub vendor: Option<String>,
    /// Marketing name on x86 (`model name`); on ARM the distinct core names joined with ` + `.
    pub model: Option<String>,
    pub logical_cores: usize,
    /// Distinct `physical_package_id`s, when known.
    pub packages: Option<usize>,
    pub clusters: Vec<Cluster>,
    /// cpufreq policies (`cpufreq/policyN`), i.e. independently clocked groups.
    pub freq_domains: usize,
    /// Canonical feature names (Rust `is_*_feature_detected!` spelling, `amx-tile` etc.).
    pub features: BTreeSet<&'static str>,
    pub feature_source: FeatureSource,
    /// `(AT_HWCAP, AT_HWCAP2)` when the features came from an auxiliary vector.
    pub hwcap: Option<(u64, u64)>,
    pub amx: AmxState,
}

impl CpuInfo {
    /// Whether a canonical feature name (e.g. `avx512vnni`, `dotprod`) was detected.
    pub fn has(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }
}

/// x86 features: canonical name and the `/proc/cpuinfo` flag spelling (kernel cpufeatures.h).
const X86_FLAGS: &[(&str, &str)] = &[
    ("sse4.1", "sse4_1"),
    ("sse4.2", "sse4_2"),
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("f16c", "f16c"),
    ("avx512f", "avx512f"),
    ("avx512cd", "avx512cd"),
    ("avx512dq", "avx512dq"),
    ("avx512bw", "avx512bw"),
    ("avx512vl", "avx512vl"),
    ("avx512ifma", "avx512ifma"),
    ("avx512vbmi", "avx512vbmi"),
    ("avx512vbmi2", "avx512_vbmi2"),
    ("avx512vnni", "avx512_vnni"),
    ("avx512bitalg", "avx512_bitalg"),
    ("avx512vpopcntdq", "avx512_vpopcntdq"),
    ("avx512bf16", "avx512_bf16"),
    ("avx512fp16", "avx512_fp16"),
    ("avxvnni", "avx_vnni"),
    ("amx-tile", "amx_tile"),
    ("amx-int8", "amx_int8"),
    ("amx-bf16", "amx_bf16"),
];

/// ARM features: canonical name and the cpuinfo `Features` words that must all be present.
const ARM_FEATURES: &[(&str, &[&str])] = &[
    ("neon", &["fp", "asimd"]),
    ("fp16", &["fphp", "asimdhp"]),
    ("rdm", &["asimdrdm"]),
    ("dotprod", &["asimddp"]),
    ("fhm", &["asimdfhm"]),
    ("i8mm", &["i8mm"]),
    ("bf16", &["bf16"]),
    ("sve", &["sve"]),
    ("sve2", &["sve", "sve2"]),
    ("sme", &["sme"]),
];

/// ARM features from `(AT_HWCAP, AT_HWCAP2)` bits (arch/arm64/include/uapi/asm/hwcap.h): the
/// canonical name and the `(word, bit)` pairs that must all be set (word 1 = HWCAP, 2 = HWCAP2).
const ARM_HWCAPS: &[(&str, &[(u8, u32)])] = &[
    ("neon", &[(1, 0), (1, 1)]),
    ("fp16", &[(1, 9), (1, 10)]),
    ("rdm", &[(1, 12)]),
    ("dotprod", &[(1, 20)]),
    ("fhm", &[(1, 23)]),
    ("i8mm", &[(2, 13)]),
    ("bf16", &[(2, 14)]),
    ("sve", &[(1, 22)]),
    ("sve2", &[(1, 22), (2, 1)]),
    ("sme", &[(2, 23)]),
];

/// MIDR implementer codes (arch/arm64/include/asm/cputype.h).
fn implementer_name(code: u32) -> Option<&'static str> {
    Some(match code {
        0x41 => "Arm",
        0x42 => "Broadcom",
        0x4E => "NVIDIA",
        0x51 => "Qualcomm",
        0x61 => "Apple",
        0xC0 => "Ampere",
        _ => return None,
    })
}

/// Arm Ltd (implementer 0x41) part numbers.
fn arm_part_name(part: u32) -> Option<&'static str> {
    Some(match part {
        0xD03 => "Cortex-A53",
        0xD04 => "Cortex-A35",
        0xD05 => "Cortex-A55",
        0xD07 => "Cortex-A57",
        0xD08 => "Cortex-A72",
        0xD09 => "Cortex-A73",
        0xD0A => "Cortex-A75",
        0xD0B => "Cortex-A76",
        0xD0C => "Neoverse-N1",
        0xD0D => "Cortex-A77",
        0xD0E => "Cortex-A76AE",
        0xD40 => "Neoverse-V1",
        0xD41 => "Cortex-A78",
        0xD42 => "Cortex-A78AE",
        0xD44 => "Cortex-X1",
        0xD46 => "Cortex-A510",
        0xD47 => "Cortex-A710",
        0xD48 => "Cortex-X2",
        0xD49 => "Neoverse-N2",
        0xD4F => "Neoverse-V2",
        0xD80 => "Cortex-A520",
        0xD81 => "Cortex-A720",
        _ => return None,
    })
}

/// Human name of a core from its MIDR implementer and part.
pub fn core_name(implementer: u32, part: u32) -> String {
    match (implementer, implementer_name(implementer)) {
        (0x41, _) => arm_part_name(part)
            .map(str::to_string)
            .unwrap_or_else(|| format!("Arm part {part:#05x}")),
        (_, Some(v)) => format!("{v} part {part:#05x}"),
        (_, None) => format!("implementer {implementer:#04x} part {part:#05x}"),
    }
}

/// One `processor` block of /proc/cpuinfo as key/value pairs, plus file-level trailing keys.
struct Cpuinfo {
    blocks: Vec<BTreeMap<String, String>>,
}

impl Cpuinfo {
    fn parse(text: &str) -> Self {
        let mut blocks = Vec::new();
        let mut cur = BTreeMap::new();
        for line in text.lines() {
            if line.trim().is_empty() {
                if !cur.is_empty() {
                    blocks.push(std::mem::take(&mut cur));
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                cur.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        if !cur.is_empty() {
            blocks.push(cur);
        }
        Cpuinfo { blocks }
    }

    /// First value of `key` in any block.
    fn first(&self, key: &str) -> Option<&str> {
        self.blocks
            .iter()
            .find_map(|b| b.get(key))
            .map(String::as_str)
    }

    /// Blocks describing a processor, keyed by their `processor` number.
    fn processors(&self) -> BTreeMap<usize, &BTreeMap<String, String>> {
        self.blocks
            .iter()
            .filter_map(|b| Some((b.get("processor")?.parse().ok()?, b)))
            .collect()
    }
}

/// Probe the CPUs under `root`.
pub fn probe_cpu(root: &SysRoot) -> CpuInfo {
    let cpuinfo = Cpuinfo::parse(&root.read_to_string("proc/cpuinfo").unwrap_or_default());
    let arch = if root.is_live() {
        match std::env::consts::ARCH {
            "x86_64" => Arch::X86_64,
            "aarch64" => Arch::Aarch64,
            _ => Arch::Unknown,
        }
    } else if cpuinfo.first("flags").is_some() || cpuinfo.first("vendor_id").is_some() {
        Arch::X86_64
    } else if cpuinfo.first("Features").is_some() || cpuinfo.first("CPU implementer").is_some() {
        Arch::Aarch64
    } else {
        Arch::Unknown
    };

    let cpus = cpu_numbers(root, &cpuinfo);
    let procs = cpuinfo.processors();
    let hybrid = x86_hybrid_types(root);

    // Per-CPU attributes that define a cluster.
    let mut per_cpu = Vec::new();
    for &n in &cpus {
        let base = format!("sys/devices/system/cpu/cpu{n}");
        let capacity = root.read_u64(format!("{base}/cpu_capacity"));
        let max_freq = root
            .read_u64(format!("{base}/cpufreq/cpuinfo_max_freq"))
            .or_else(|| policy_max_freq(root, n));
        let midr = procs
            .get(&n)
            .and_then(|b| {
                let imp = parse_u64(b.get("CPU implementer")?)? as u32;
                let part = parse_u64(b.get("CPU part")?)? as u32;
                Some((imp, part))
            })
            .or_else(|| {
                let v = root.read_u64(format!("{base}/regs/identification/midr_el1"))?;
                Some((((v >> 24) & 0xff) as u32, ((v >> 4) & 0xfff) as u32))
            });
        let core = match midr {
            Some((imp, part)) => Some(core_name(imp, part)),
            None => hybrid.get(&n).map(|s| s.to_string()),
        };
        per_cpu.push((n, core, midr, capacity, max_freq));
    }

    let mut clusters: Vec<Cluster> = Vec::new();
    for (n, core, midr, capacity, max_freq) in per_cpu {
        if let Some(c) = clusters.iter_mut().find(|c| {
            c.core == core && c.midr == midr && c.capacity == capacity && c.max_freq_khz == max_freq
        }) {
            c.cpus.push(n);
        } else {
            clusters.push(Cluster {
                cpus: vec![n],
                core,
                midr,
                capacity,
                max_freq_khz: max_freq,
                caches: caches(root, n),
            });
        }
    }

    let freq_domains = root
        .read_dir("sys/devices/system/cpu/cpufreq")
        .iter()
        .filter(|n| n.starts_with("policy"))
        .count();

    let packages = {
        let mut ids = BTreeSet::new();
        for &n in &cpus {
            if let Some(id) = root.read_u64(format!(
                "sys/devices/system/cpu/cpu{n}/topology/physical_package_id"
            )) {
                ids.insert(id.to_string());
            }
        }
        if ids.is_empty() {
            for b in procs.values() {
                if let Some(p) = b.get("physical id") {
                    ids.insert(p.clone());
                }
            }
        }
        if ids.is_empty() {
            None
        } else {
            Some(ids.len())
        }
    };

    let (vendor, model) = match arch {
        Arch::X86_64 => (
            cpuinfo.first("vendor_id").map(str::to_string),
            cpuinfo.first("model name").map(str::to_string),
        ),
        _ => {
            let vendor = clusters.iter().find_map(|c| c.midr).map(|(imp, _)| {
                implementer_name(imp)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("implementer {imp:#04x}"))
            });
            let mut names: Vec<String> = Vec::new();
            for c in &clusters {
                if let Some(n) = &c.core {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
            let model = if names.is_empty() {
                cpuinfo.first("model name").map(str::to_string)
            } else {
                Some(names.join(" + "))
            };
            (vendor, model)
        }
    };

    let (features, feature_source, hwcap) = detect_features(root, arch, &cpuinfo);
    let amx = amx_state(root, &features);

    CpuInfo {
        arch,
        vendor,
        model,
        logical_cores: cpus.len(),
        packages,
        clusters,
        freq_domains,
        features,
        feature_source,
        hwcap,
        amx,
    }
}

/// CPU numbers: `online`, else `present`, else the `cpuN` directories, else cpuinfo blocks.
fn cpu_numbers(root: &SysRoot, cpuinfo: &Cpuinfo) -> Vec<usize> {
    for f in ["online", "present"] {
        if let Some(list) = root
            .read_trim(format!("sys/devices/system/cpu/{f}"))
            .and_then(|s| parse_cpu_list(&s))
        {
            if !list.is_empty() {
                return list;
            }
        }
    }
    let mut from_dirs: Vec<usize> = root
        .read_dir("sys/devices/system/cpu")
        .iter()
        .filter_map(|n| n.strip_prefix("cpu")?.parse().ok())
        .collect();
    from_dirs.sort_unstable();
    if !from_dirs.is_empty() {
        return from_dirs;
    }
    cpuinfo.processors().keys().copied().collect()
}

/// Max frequency of the cpufreq policy whose `related_cpus` include `cpu`.
fn policy_max_freq(root: &SysRoot, cpu: usize) -> Option<u64> {
    for p in root.read_dir("sys/devices/system/cpu/cpufreq") {
        if !p.starts_with("policy") {
            continue;
        }
        let base = format!("sys/devices/system/cpu/cpufreq/{p}");
        let related = root
            .read_trim(format!("{base}/related_cpus"))
            .or_else(|| root.read_trim(format!("{base}/affected_cpus")))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|t| t.parse::<usize>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if related.contains(&cpu) {
            return root.read_u64(format!("{base}/cpuinfo_max_freq"));
        }
    }
    None
}

/// Intel hybrid parts list their cores per PMU: `sys/devices/cpu_core/cpus` (P-cores) and
/// `sys/devices/cpu_atom/cpus` (E-cores).
fn x86_hybrid_types(root: &SysRoot) -> BTreeMap<usize, &'static str> {
    let mut m = BTreeMap::new();
    for (pmu, name) in [("cpu_core", "P-core"), ("cpu_atom", "E-core")] {
        if let Some(list) = root
            .read_trim(format!("sys/devices/{pmu}/cpus"))
            .and_then(|s| parse_cpu_list(&s))
        {
            for c in list {
                m.insert(c, name);
            }
        }
    }
    m
}

/// Caches of one CPU from `cpuN/cache/indexK/{level,type,size,shared_cpu_list}`.
fn caches(root: &SysRoot, cpu: usize) -> Vec<Cache> {
    let base = format!("sys/devices/system/cpu/cpu{cpu}/cache");
    let mut out = Vec::new();
    for idx in root.read_dir(&base) {
        if !idx.starts_with("index") {
            continue;
        }
        let d = format!("{base}/{idx}");
        let (Some(level), Some(kind), Some(size)) = (
            root.read_u64(format!("{d}/level")),
            root.read_trim(format!("{d}/type")),
            root.read_trim(format!("{d}/size"))
                .and_then(|s| parse_size_kib(&s)),
        ) else {
            continue;
        };
        let shared = root
            .read_trim(format!("{d}/shared_cpu_list"))
            .and_then(|s| parse_cpu_list(&s))
            .map(|l| format_cpu_list(&l))
            .unwrap_or_default();
        out.push(Cache {
            level: level as u32,
            kind,
            size_kib: size,
            shared_cpu_list: shared,
        });
    }
    out
}

/// `32K`, `1024K`, `2M` -> KiB.
fn parse_size_kib(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(k) = s.strip_suffix('K') {
        k.parse().ok()
    } else if let Some(m) = s.strip_suffix('M') {
        m.parse::<u64>().ok()?.checked_mul(1024)
    } else {
        s.parse::<u64>().ok().map(|b| b / 1024)
    }
}

fn detect_features(
    root: &SysRoot,
    arch: Arch,
    cpuinfo: &Cpuinfo,
) -> (BTreeSet<&'static str>, FeatureSource, Option<(u64, u64)>) {
    if root.is_live() {
        #[cfg(target_arch = "x86_64")]
        if arch == Arch::X86_64 {
            return (x86_features_from_cpuid(), FeatureSource::Cpuid, None);
        }
        #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
        if arch == Arch::Aarch64 {
            let (h1, h2) = crate::sys::cpu::hwcaps();
            return (
                arm_features_from_hwcap(h1, h2),
                FeatureSource::Auxv,
                Some((h1, h2)),
            );
        }
    }
    match arch {
        Arch::X86_64 => match cpuinfo.first("flags") {
            Some(flags) => (x86_features_from_flags(flags), FeatureSource::Cpuinfo, None),
            None => (BTreeSet::new(), FeatureSource::None, None),
        },
        Arch::Aarch64 => {
            if let Some((h1, h2)) = root
                .read_to_string("edgehal-fixture/auxv")
                .and_then(|t| parse_fixture_auxv(&t))
            {
                return (
                    arm_features_from_hwcap(h1, h2),
                    FeatureSource::FixtureAuxv,
                    Some((h1, h2)),
                );
            }
            match cpuinfo.first("Features") {
                Some(f) => (arm_features_from_cpuinfo(f), FeatureSource::Cpuinfo, None),
                None => (BTreeSet::new(), FeatureSource::None, None),
            }
        }
        Arch::Unknown => (BTreeSet::new(), FeatureSource::None, None),
    }
}

/// Parse `edgehal-fixture/auxv`: lines `AT_HWCAP 0x...` and `AT_HWCAP2 0x...` (`=` or `:` also
/// accepted as separator, `#` starts a comment). Both keys are required.
pub fn parse_fixture_auxv(text: &str) -> Option<(u64, u64)> {
    let mut h1 = None;
    let mut h2 = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line
            .split(|c: char| c.is_whitespace() || c == '=' || c == ':')
            .filter(|s| !s.is_empty());
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        match k {
            "AT_HWCAP" => h1 = parse_u64(v),
            "AT_HWCAP2" => h2 = parse_u64(v),
            _ => {}
        }
    }
    Some((h1?, h2?))
}

/// Map a cpuinfo `flags` line to canonical names.
pub fn x86_features_from_flags(flags: &str) -> BTreeSet<&'static str> {
    let have: BTreeSet<&str> = flags.split_whitespace().collect();
    X86_FLAGS
        .iter()
        .filter(|(_, flag)| have.contains(flag))
        .map(|(name, _)| *name)
        .collect()
}

/// Map a cpuinfo `Features` line to canonical names.
pub fn arm_features_from_cpuinfo(features: &str) -> BTreeSet<&'static str> {
    let have: BTreeSet<&str> = features.split_whitespace().collect();
    ARM_FEATURES
        .iter()
        .filter(|(_, need)| need.iter().all(|w| have.contains(w)))
        .map(|(name, _)| *name)
        .collect()
}

/// Map `AT_HWCAP`/`AT_HWCAP2` to canonical names.
pub fn arm_features_from_hwcap(hwcap: u64, hwcap2: u64) -> BTreeSet<&'static str> {
    ARM_HWCAPS
        .iter()
        .filter(|(_, need)| {
            need.iter().all(|&(word, bit)| {
                let w = if word == 1 { hwcap } else { hwcap2 };
                w & (1u64 << bit) != 0
            })
        })
        .map(|(name, _)| *name)
        .collect()
}

/// x86 features from CPUID and XCR0 of the running CPU, gated the way Rust's std_detect gates
/// them: AVX-family features only when the OS saves YMM state (XCR0 bits 1-2), AVX-512 only
/// when it saves opmask/ZMM state (bits 5-7) and FMA and F16C are present, AMX only when it
/// saves XTILECFG/XTILEDATA (bits 17-18).
#[cfg(target_arch = "x86_64")]
pub fn x86_features_from_cpuid() -> BTreeSet<&'static str> {
    use crate::sys::cpu::{cpuid, xcr0};
    let mut f = BTreeSet::new();
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf < 1 {
        return f;
    }
    let l1 = cpuid(1, 0);
    let l7 = if max_leaf >= 7 {
        cpuid(7, 0)
    } else {
        Default::default()
    };
    let l7s1 = if max_leaf >= 7 && l7.eax >= 1 {
        cpuid(7, 1)
    } else {
        Default::default()
    };
    let bit = |r: u32, b: u32| r & (1 << b) != 0;
    if bit(l1.ecx, 19) {
        f.insert("sse4.1");
    }
    if bit(l1.ecx, 20) {
        f.insert("sse4.2");
    }
    let x = xcr0().unwrap_or(0);
    let os_avx = x & 0x6 == 0x6;
    let os_avx512 = os_avx && x & 0xE0 == 0xE0;
    let os_amx = x & 0x60000 == 0x60000;
    if os_avx {
        let pairs = [
            ("avx", bit(l1.ecx, 28)),
            ("fma", bit(l1.ecx, 12)),
            ("f16c", bit(l1.ecx, 29)),
            ("avx2", bit(l7.ebx, 5)),
            ("avxvnni", bit(l7s1.eax, 4)),
        ];
        for (n, on) in pairs {
            if on {
                f.insert(n);
            }
        }
    }
    if os_avx512 && f.contains("fma") && f.contains("f16c") {
        let pairs = [
            ("avx512f", bit(l7.ebx, 16)),
            ("avx512dq", bit(l7.ebx, 17)),
            ("avx512ifma", bit(l7.ebx, 21)),
            ("avx512cd", bit(l7.ebx, 28)),
            ("avx512bw", bit(l7.ebx, 30)),
            ("avx512vl", bit(l7.ebx, 31)),
            ("avx512vbmi", bit(l7.ecx, 1)),
            ("avx512vbmi2", bit(l7.ecx, 6)),
            ("avx512vnni", bit(l7.ecx, 11)),
            ("avx512bitalg", bit(l7.ecx, 12)),
            ("avx512vpopcntdq", bit(l7.ecx, 14)),
            ("avx512fp16", bit(l7.edx, 23)),
            ("avx512bf16", bit(l7s1.eax, 5)),
        ];
        for (n, on) in pairs {
            if on {
                f.insert(n);
            }
        }
    }
    if os_amx {
        let pairs = [
            ("amx-bf16", bit(l7.edx, 22)),
            ("amx-tile", bit(l7.edx, 24)),
            ("amx-int8", bit(l7.edx, 25)),
        ];
        for (n, on) in pairs {
            if on {
                f.insert(n);
            }
        }
    }
    f
}

fn amx_state(root: &SysRoot, features: &BTreeSet<&'static str>) -> AmxState {
    if !features.contains("amx-tile") {
        return AmxState::NotPresent;
    }
    if !root.is_live() {
        return AmxState::NotRequested;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match crate::sys::cpu::request_amx_permission() {
            crate::sys::cpu::AmxPermission::Granted => AmxState::Granted,
            crate::sys::cpu::AmxPermission::Denied(why) => AmxState::Denied(why),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        AmxState::Denied("AMX exists only on x86_64".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwcap_and_features_line_agree_for_pi5() {
        // Raspberry Pi 5 Features line (HARDWARE.md §2.4) and the matching HWCAP bits:
        // fp..asimdrdm = bits 0-12, lrcpc 15, dcpop 16, asimddp 20.
        let line = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp";
        let hw = 0x1FFF | (1 << 15) | (1 << 16) | (1 << 20);
        assert_eq!(
            arm_features_from_cpuinfo(line),
            arm_features_from_hwcap(hw, 0)
        );
        let f = arm_features_from_hwcap(hw, 0);
        assert!(f.contains("dotprod") && f.contains("neon") && f.contains("fp16"));
        assert!(!f.contains("i8mm") && !f.contains("sve"));
    }

    #[test]
    fn sve2_needs_sve() {
        assert!(!arm_features_from_hwcap(0, 1 << 1).contains("sve2"));
        assert!(arm_features_from_hwcap(1 << 22, 1 << 1).contains("sve2"));
        assert!(!arm_features_from_cpuinfo("sve2").contains("sve2"));
    }

    #[test]
    fn fixture_auxv_format() {
        assert_eq!(
            parse_fixture_auxv("# comment\nAT_HWCAP 0x10\nAT_HWCAP2=0x2000\n"),
            Some((0x10, 0x2000))
        );
        assert_eq!(parse_fixture_auxv("AT_HWCAP 0x10\n"), None);
    }

    #[test]
    fn x86_flag_spellings() {
        let f = x86_features_from_flags("avx2 avx512f avx_vnni avx512_vnni amx_tile avx512vnni");
        assert!(f.contains("avxvnni") && f.contains("avx512vnni") && f.contains("amx-tile"));
        assert!(!f.contains("avx512bf16"));
    }

    #[test]
    fn midr_names() {
        assert_eq!(core_name(0x41, 0xd0b), "Cortex-A76");
        assert_eq!(core_name(0x41, 0xd42), "Cortex-A78AE");
        assert_eq!(core_name(0x51, 0x001), "Qualcomm part 0x001");
    }
}
