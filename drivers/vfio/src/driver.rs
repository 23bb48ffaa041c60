//! The `edu` device behind edgehal's own driver API: [`EduDriver`] probes a [`SysRoot`] for
//! QEMU's edu PCI device (1234:11e8) bound to vfio-pci and opens it as an [`EduDevice`], which
//! implements `edgehal_core`'s `Device`: it supports `Identity` (the tensor makes a DMA round
//! trip through the device's 4 KiB buffer, RAM -> device -> RAM) and says why it refuses
//! everything else.
//!
//! This is the worked example of a PCIe accelerator driver written against edgehal's traits:
//! - **Buffers, zero-copy.** Bound input/output [`Buffer`]s are DMA-mapped into the device's IOVA
//!   space the first time an executable sees them and stay mapped (pinned) for the executable's
//!   life, so a steady-state run maps nothing. Buffers that cannot be pinned (read-only tensor
//!   storage, an unaligned caller pointer, a dma-buf's own mapping) go through one staging
//!   buffer per executable, and the copy is recorded by the session's copy counter.
//! - **Completion.** `submit` returns a pending [`Fence`] at once; a worker thread starts each
//!   DMA and sleeps on the device's MSI eventfd (epoll or io_uring, never a busy poll), then
//!   signals the fence. A DMA that misses its deadline fails the fence and marks the device
//!   lost: every later submit fails at once, so the scheduler re-plans elsewhere.
//! - **Lifetimes.** Mappings are dropped (unmapped) before the device they belong to: an
//!   executable holds the device's engine alive until its own mappings are gone.

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use edgehal_core::buffer::{Buffer, CopyCounter, MemoryDomain};
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, Fence, Subgraph, Support,
    SysRoot, TensorBuffer,
};
use edgehal_core::graph::{Graph, Node, ValueId};

use crate::dma::DmaMapping;
use crate::edu::{self, Dir, Edu, Options};
use crate::error::Error;

/// Name of the driver (and of [`DeviceInfo::driver`]).
pub const DRIVER: &str = "edu";
/// Bytes per DMA of a run (at most [`edu::MAX_DMA`]).
pub const CHUNK: usize = 2048;
/// Caller buffers an executable keeps mapped at most (older ones are unmapped first).
pub const MAX_CACHED_MAPPINGS: usize = 8;
/// The largest tensor an executable takes: its input and output must both fit the IOVA window.
pub const MAX_TENSOR_BYTES: u64 = (edu::IOVA_WINDOW.1 - edu::IOVA_WINDOW.0) / 4;

const DOMAINS: [MemoryDomain; 2] = [MemoryDomain::Host, MemoryDomain::HostImported];

/// Enumerates edu devices under a [`SysRoot`] and opens them through VFIO.
pub struct EduDriver {
    root: PathBuf,
    opts: Options,
}

impl Default for EduDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl EduDriver {
    /// The driver for the running machine (`/`), default options.
    pub fn new() -> Self {
        EduDriver {
            root: PathBuf::from("/"),
            opts: Options::default(),
        }
    }

    /// A driver that opens devices with the pre-flight checks under `root` and `opts`.
    pub fn with_options(root: impl Into<PathBuf>, opts: Options) -> Self {
        EduDriver {
            root: root.into(),
            opts,
        }
    }
}

/// Why a probed edu device cannot be opened, as the same actionable text `open` would give.
fn why_unusable(root: &SysRoot, bdf: &str, dev: &str) -> Option<String> {
    let group = match root.link_name(format!("{dev}/iommu_group")) {
        Some(g) => g,
        None => {
            return Some(
                Error::NoIommuGroup {
                    bdf: bdf.into(),
                    path: PathBuf::from(format!("/{dev}/iommu_group")),
                }
                .to_string(),
            )
        }
    };
    match root.link_name(format!("{dev}/driver")) {
        Some(d) if d == "vfio-pci" => {}
        other => {
            return Some(
                Error::NotBoundToVfio {
                    bdf: bdf.into(),
                    current: other.map_or_else(|| "no driver".into(), |d| format!("driver {d}")),
                }
                .to_string(),
            )
        }
    }
    let node = format!("dev/vfio/{group}");
    if !root.exists(&node) {
        return Some(
            Error::NoGroupNode {
                bdf: bdf.into(),
                group: group.parse().unwrap_or(0),
                path: PathBuf::from(format!("/{node}")),
            }
            .to_string(),
        );
    }
    None
}

impl Driver for EduDriver {
    fn name(&self) -> &str {
        DRIVER
    }

    /// PCI functions with vendor 0x1234 and device 0x11e8. Reads sysfs only; a device not yet
    /// usable (no IOMMU group, not bound to vfio-pci, no /dev/vfio node) is listed with the
    /// reason and what to do in `unavailable`.
    fn probe(&self, root: &SysRoot) -> Vec<DeviceInfo> {
        let mut out = Vec::new();
        for bdf in root.read_dir("sys/bus/pci/devices") {
            let dev = format!("sys/bus/pci/devices/{bdf}");
            let vendor = root.read_u64(format!("{dev}/vendor"));
            let device = root.read_u64(format!("{dev}/device"));
            if vendor != Some(u64::from(edu::VENDOR)) || device != Some(u64::from(edu::DEVICE)) {
                continue;
            }
            let mut d = DeviceInfo::new(
                format!("{DRIVER}:{bdf}"),
                DeviceKind::Other,
                DRIVER,
                DOMAINS.to_vec(),
            );
            d.description = "QEMU edu PCI DMA device (1234:11e8) through VFIO".into();
            d.properties.insert("pci".into(), bdf.clone());
            if let Some(g) = root.link_name(format!("{dev}/iommu_group")) {
                d.properties.insert("iommu_group".into(), g);
            }
            if let Some(drv) = root.link_name(format!("{dev}/driver")) {
                d.properties.insert("pci_driver".into(), drv);
            }
            d.unavailable = why_unusable(root, &bdf, &dev).map(|w| format!("unavailable: {w}"));
            out.push(d);
        }
        out
    }

    fn open(&self, info: &DeviceInfo) -> edgehal_core::Result<Arc<dyn Device>> {
        Ok(self.open_edu(info)?)
    }
}

impl EduDriver {
    /// [`Driver::open`] keeping the concrete type (for its register-level handle).
    pub fn open_edu(&self, info: &DeviceInfo) -> edgehal_core::Result<Arc<EduDevice>> {
        if info.driver != DRIVER {
            return Err(edgehal_core::Error::arg(format!(
                "edu driver cannot open '{}' of driver '{}'",
                info.name, info.driver
            )));
        }
        let bdf = info.properties.get("pci").ok_or_else(|| {
            edgehal_core::Error::arg(format!("{}: probe left no PCI address", info.name))
        })?;
        // `unavailable` is advice from a snapshot; open tries anyway and reports what it finds.
        let edu = Edu::open(&self.root, bdf, self.opts.clone())?;
        Ok(Arc::new(EduDevice::from_edu(info.clone(), Arc::new(edu))))
    }
}

/// The device's DMA engine, shared by the device and its executables. One submission at a time
/// owns it (the edu DMA engine and its interrupt are single).
struct Engine {
    edu: Arc<Edu>,
    busy: Mutex<()>,
}

impl Engine {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An opened edu device behind edgehal's `Device` trait.
pub struct EduDevice {
    info: DeviceInfo,
    engine: Arc<Engine>,
}

impl EduDevice {
    /// Wrap an already opened [`Edu`] (the VM test opens it with its own options).
    pub fn from_edu(info: DeviceInfo, edu: Arc<Edu>) -> Self {
        EduDevice {
            info,
            engine: Arc::new(Engine {
                edu,
                busy: Mutex::new(()),
            }),
        }
    }

    /// The register-level device (interrupt counters, timeouts, io_uring mode).
    pub fn edu(&self) -> &Arc<Edu> {
        &self.engine.edu
    }
}

/// Why edu cannot run `node`, or `None` when it can.
fn refusal(node: &Node, graph: &Graph) -> Option<String> {
    if node.op != "Identity" || !node.domain.is_empty() && node.domain != "ai.onnx" {
        return Some(format!(
            "edu only moves bytes by DMA (Identity: a round trip through its 4 KiB device \
             buffer); it has no arithmetic for {}",
            node.op
        ));
    }
    let ins: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
    let outs: Vec<ValueId> = node.outputs.iter().flatten().copied().collect();
    if ins.len() != 1 || outs.len() != 1 {
        return Some(format!(
            "Identity with {} inputs and {} outputs (expected 1 and 1)",
            ins.len(),
            outs.len()
        ));
    }
    if let Some(v) = graph.values.get(ins[0]) {
        if let (Some(dt), Some(shape)) = (v.dtype, v.fixed_shape()) {
            let bytes = shape
                .iter()
                .try_fold(dt.size() as u64, |a, &d| a.checked_mul(d as u64));
            match bytes {
                Some(b) if b <= MAX_TENSOR_BYTES => {}
                _ => {
                    return Some(format!(
                        "tensor {dt} {shape:?} is over the {MAX_TENSOR_BYTES} bytes edu's 28-bit \
                         DMA window can map for one run"
                    ))
                }
            }
        }
    }
    None
}

impl Device for EduDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn supports(&self, node: &Node, graph: &Graph) -> Support {
        match refusal(node, graph) {
            None => Support::Yes,
            Some(r) => Support::no(r),
        }
    }

    fn memory(&self) -> &[MemoryDomain] {
        &self.info.memory_domains
    }

    fn compile(&self, sub: &Subgraph) -> edgehal_core::Result<Box<dyn Executable>> {
        let outputs = plan_outputs(sub)?;
        Ok(Box::new(EduExecutable(Arc::new(ExeInner {
            maps: Mutex::new(Maps::default()),
            sub: sub.clone(),
            outputs,
            device: self.info.name.clone(),
            engine: Arc::clone(&self.engine),
        }))))
    }

    fn submit(&self, exe: &dyn Executable, bindings: &Bindings) -> edgehal_core::Result<Fence> {
        let exe = exe
            .as_any()
            .downcast_ref::<EduExecutable>()
            .filter(|e| Arc::ptr_eq(&e.0.engine, &self.engine))
            .ok_or_else(|| {
                edgehal_core::Error::arg(format!(
                    "executable was compiled by device '{}', not by {}",
                    exe.device(),
                    self.info.name
                ))
            })?;
        bindings.check(&exe.0.sub)?;
        if let Some(why) = self.engine.edu.lost_reason() {
            let e = Error::DeviceLost {
                bdf: self.engine.edu.pci().bdf().into(),
                why,
            };
            return Fence::done(&self.info.name, Err(e.into()));
        }
        let input = bindings
            .inputs()
            .first()
            .cloned()
            .ok_or_else(|| edgehal_core::Error::arg("edu: no input bound"))?;
        for i in 0..bindings.num_outputs() {
            if let Some(o) = bindings.output(i) {
                if o.dtype != input.dtype || o.shape != input.shape {
                    return Err(edgehal_core::Error::arg(format!(
                        "output {i} is bound as {} {:?}, Identity of {} {:?} needs the same",
                        o.dtype, o.shape, input.dtype, input.shape
                    )));
                }
            }
        }
        let (fence, signal) = Fence::pending(&self.info.name)?;
        let inner = Arc::clone(&exe.0);
        let bindings = bindings.clone();
        std::thread::Builder::new()
            .name(format!("{}-dma", self.info.name))
            .spawn(move || signal.signal(inner.run(&input, &bindings)))
            .map_err(|e| edgehal_core::Error::io("spawning the edu DMA worker", e))?;
        Ok(fence)
    }
}

/// Check that `sub` is Identity nodes only, with one input, and find for each output the input
/// it copies (always input 0: every output must trace back to it).
fn plan_outputs(sub: &Subgraph) -> edgehal_core::Result<usize> {
    let g = &sub.graph;
    for (n, node) in g.nodes.iter().enumerate() {
        if let Some(r) = refusal(node, g) {
            return Err(edgehal_core::Error::unsupported(format!(
                "edu cannot compile {}: {r}",
                g.describe_node(n)
            )));
        }
    }
    let [input] = g.inputs[..] else {
        return Err(edgehal_core::Error::unsupported(format!(
            "edu runs subgraphs with exactly one input, this one has {}",
            g.inputs.len()
        )));
    };
    let from: HashMap<ValueId, ValueId> = g
        .nodes
        .iter()
        .filter_map(|n| Some((n.outputs.first().copied()??, n.inputs.first().copied()??)))
        .collect();
    for &out in &g.outputs {
        let mut v = out;
        let mut hops = 0;
        while v != input {
            match from.get(&v) {
                Some(&prev) if hops <= g.nodes.len() => {
                    v = prev;
                    hops += 1;
                }
                _ => {
                    return Err(edgehal_core::Error::unsupported(format!(
                        "edu: output '{}' is not a copy of input '{}'",
                        g.value_name(out),
                        g.value_name(input)
                    )))
                }
            }
        }
    }
    Ok(g.outputs.len())
}

/// Mappings an executable keeps for its life.
#[derive(Default)]
struct Maps {
    /// Caller buffers, oldest first.
    cached: Vec<Arc<DmaMapping>>,
    /// Staging buffers for inputs/outputs that cannot be mapped themselves (0: input,
    /// 1..: outputs).
    staging: Vec<Arc<DmaMapping>>,
}

/// A subgraph compiled for edu (a chain of Identity nodes).
pub struct EduExecutable(Arc<ExeInner>);

struct ExeInner {
    // Dropped first: mappings unmap while the engine (and so the VFIO container) is alive.
    maps: Mutex<Maps>,
    sub: Subgraph,
    outputs: usize,
    device: String,
    engine: Arc<Engine>,
}

impl EduExecutable {
    /// Caller buffers currently DMA-mapped for this executable.
    pub fn mapped_buffers(&self) -> usize {
        self.0.lock_maps().cached.len()
    }

    /// Unmap every buffer now (they are also unmapped when the executable is dropped).
    pub fn release_mappings(&self) {
        let _busy = self.0.engine.lock();
        let mut m = self.0.lock_maps();
        m.cached.clear();
        m.staging.clear();
    }
}

impl Executable for EduExecutable {
    fn device(&self) -> &str {
        &self.0.device
    }
    fn subgraph(&self) -> &Subgraph {
        &self.0.sub
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl ExeInner {
    fn lock_maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `buf`'s mapping, mapping it now if needed; `None` when it cannot be mapped (the caller
    /// then stages). Old mappings beyond [`MAX_CACHED_MAPPINGS`] are dropped (a run holds its
    /// own references, so nothing it uses is unmapped under it).
    fn mapping_for(&self, maps: &mut Maps, buf: &Buffer) -> Option<Arc<DmaMapping>> {
        let same = |m: &Arc<DmaMapping>| {
            let b = m.buffer();
            b.same_memory(buf) && b.offset() == buf.offset() && b.len() == buf.len()
        };
        if let Some(m) = maps.cached.iter().find(|m| same(m)) {
            return Some(Arc::clone(m));
        }
        let space = self.engine.edu.pci().dma();
        let m = match space.map(buf) {
            Ok(m) => m,
            Err(Error::IovaExhausted { .. }) if !maps.cached.is_empty() => {
                maps.cached.clear();
                space.map(buf).ok()?
            }
            Err(_) => return None,
        };
        let m = Arc::new(m);
        if maps.cached.len() >= MAX_CACHED_MAPPINGS {
            maps.cached.remove(0);
        }
        maps.cached.push(Arc::clone(&m));
        Some(m)
    }

    /// Staging buffer `k` of at least `len` bytes, mapped (reused across runs).
    fn staging(
        &self,
        maps: &mut Maps,
        k: usize,
        len: usize,
        c: &CopyCounter,
    ) -> Result<Arc<DmaMapping>, Error> {
        if let Some(m) = maps.staging.get(k).filter(|m| m.len() >= len) {
            return Ok(Arc::clone(m));
        }
        let buf = Buffer::alloc(len, c)?;
        let m = Arc::new(self.engine.edu.pci().dma().map(&buf)?);
        while maps.staging.len() <= k {
            maps.staging.push(Arc::clone(&m));
        }
        maps.staging[k] = Arc::clone(&m);
        Ok(m)
    }

    fn run(&self, input: &TensorBuffer, bindings: &Bindings) -> edgehal_core::Result<()> {
        let _busy = self.engine.lock();
        let mut maps = self.lock_maps();
        let c = bindings.counter();
        let n = input.byte_len();
        if n as u64 > MAX_TENSOR_BYTES {
            return Err(edgehal_core::Error::TooLarge(format!(
                "edu: tensor of {n} bytes is over the {MAX_TENSOR_BYTES} bytes one run can map"
            )));
        }
        // Output buffers: the caller's, or new ones the device fills and hands back.
        let mut outs: Vec<(Buffer, bool)> = Vec::with_capacity(self.outputs);
        for i in 0..self.outputs {
            match bindings.output(i) {
                Some(tb) => outs.push((tb.buffer, false)),
                None => outs.push((Buffer::alloc(n, c)?, true)),
            }
        }
        if n > 0 {
            let src = match self.mapping_for(&mut maps, &input.buffer.view(0..n)?) {
                Some(m) => m,
                None => {
                    let m = self.staging(&mut maps, 0, n, c)?;
                    let mut tmp = vec![0u8; n];
                    input.buffer.read_into(0, &mut tmp)?;
                    m.buffer().write_from(0, &tmp)?;
                    c.record(n);
                    m
                }
            };
            // (mapping, staged?)
            let mut dsts = Vec::with_capacity(outs.len());
            for (k, (b, _)) in outs.iter().enumerate() {
                dsts.push(match self.mapping_for(&mut maps, &b.view(0..n)?) {
                    Some(m) => (m, false),
                    None => (self.staging(&mut maps, k + 1, n, c)?, true),
                });
            }
            drop(maps);
            let edu = &self.engine.edu;
            let mut off = 0;
            while off < n {
                let len = (n - off).min(CHUNK);
                edu.dma(Dir::ToDevice, &src, off, 0, len)?;
                for (d, _) in &dsts {
                    edu.dma(Dir::ToRam, d, off, 0, len)?;
                }
                off += len;
            }
            for ((b, _), (d, staged)) in outs.iter().zip(&dsts) {
                if *staged {
                    let mut tmp = vec![0u8; n];
                    d.buffer().read_into(0, &mut tmp)?;
                    b.write_from(0, &tmp)?;
                    c.record(n);
                }
            }
        }
        for (i, (b, fresh)) in outs.into_iter().enumerate() {
            if fresh {
                bindings.set_output(i, TensorBuffer::new(b, input.dtype, input.shape.clone())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::graph::Dim;
    use edgehal_core::{DType, Tensor};
    use std::os::unix::fs::symlink;
    use std::path::Path;

    struct Fixture(PathBuf);
    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// One PCI function: `(bdf, vendor, device, driver, iommu group, /dev/vfio node present)`.
    type FakeDev<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<u32>,
        bool,
    );

    /// A sysfs tree with PCI functions.
    fn fixture(name: &str, devs: &[FakeDev<'_>]) -> Fixture {
        let root = std::env::temp_dir().join(format!("edgehal-edu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        for &(bdf, vendor, device, driver, group, node) in devs {
            let d = root.join("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
            if let Some(drv) = driver {
                symlink(format!("/sys/bus/pci/drivers/{drv}"), d.join("driver")).unwrap();
            }
            if let Some(g) = group {
                symlink(
                    format!("/sys/kernel/iommu_groups/{g}"),
                    d.join("iommu_group"),
                )
                .unwrap();
                if node {
                    std::fs::write(root.join(format!("dev/vfio/{g}")), "").unwrap();
                }
            }
        }
        Fixture(root)
    }

    #[test]
    fn probe_finds_edu_and_says_what_is_missing() {
        let f = fixture(
            "probe",
            &[
                (
                    "0000:00:03.0",
                    "0x1234",
                    "0x11e8",
                    Some("vfio-pci"),
                    Some(3),
                    true,
                ),
                ("0000:00:04.0", "0x1234", "0x11e8", None, Some(4), false),
                (
                    "0000:00:05.0",
                    "0x1234",
                    "0x11e8",
                    Some("vfio-pci"),
                    None,
                    false,
                ),
                (
                    "0000:00:06.0",
                    "0x1234",
                    "0x11e8",
                    Some("vfio-pci"),
                    Some(6),
                    false,
                ),
                (
                    "0000:00:07.0",
                    "0x8086",
                    "0x10d3",
                    Some("e1000e"),
                    Some(7),
                    true,
                ),
                (
                    "0000:00:08.0",
                    "0x1234",
                    "0x1111",
                    Some("bochs-drm"),
                    Some(8),
                    true,
                ),
            ],
        );
        let devs = EduDriver::new().probe(&SysRoot::new(&f.0));
        let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "edu:0000:00:03.0",
                "edu:0000:00:04.0",
                "edu:0000:00:05.0",
                "edu:0000:00:06.0"
            ]
        );
        let ready = &devs[0];
        assert_eq!(ready.unavailable, None);
        assert_eq!(ready.driver, DRIVER);
        assert_eq!(ready.properties["pci"], "0000:00:03.0");
        assert_eq!(ready.properties["iommu_group"], "3");
        assert_eq!(ready.memory_domains, DOMAINS.to_vec());
        let unbound = devs[1].unavailable.as_deref().unwrap();
        assert!(unbound.starts_with("unavailable: "), "{unbound}");
        assert!(
            unbound.contains("bind 0000:00:04.0 to vfio-pci: echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override"),
            "{unbound}"
        );
        let nogroup = devs[2].unavailable.as_deref().unwrap();
        assert!(
            nogroup.contains("no IOMMU group") && nogroup.contains("intel_iommu=on"),
            "{nogroup}"
        );
        let nonode = devs[3].unavailable.as_deref().unwrap();
        assert!(nonode.contains("/dev/vfio/6 does not exist"), "{nonode}");
    }

    #[test]
    fn open_reports_actionable_errors() {
        let f = fixture(
            "open",
            &[
                (
                    "0000:00:03.0",
                    "0x1234",
                    "0x11e8",
                    Some("vfio-pci"),
                    Some(3),
                    true,
                ),
                (
                    "0000:00:04.0",
                    "0x1234",
                    "0x11e8",
                    Some("e1000e"),
                    Some(4),
                    true,
                ),
            ],
        );
        let drv = EduDriver::with_options(&f.0, Options::default());
        let devs = drv.probe(&SysRoot::new(&f.0));
        // not bound: the bind hint, named by the PCI address
        let e = drv.open(&devs[1]).err().unwrap();
        let msg = e.to_string();
        assert!(
            matches!(e, edgehal_core::Error::Device { ref device, .. } if device == "0000:00:04.0"),
            "{msg}"
        );
        assert!(msg.contains("bind 0000:00:04.0 to vfio-pci"), "{msg}");
        // bound and the group node is there, but this host has no VFIO at all
        if !Path::new("/dev/vfio/vfio").exists() {
            let msg = drv.open(&devs[0]).err().unwrap().to_string();
            assert!(msg.contains("modprobe vfio-pci"), "{msg}");
        }
        let mut other = devs[0].clone();
        other.driver = "null".into();
        assert!(drv
            .open(&other)
            .err()
            .unwrap()
            .to_string()
            .contains("cannot open"));
    }

    fn graph(ops: &[&str], inputs: usize) -> Graph {
        // x0 (.. x{inputs-1}) -> op0 -> v0 -> op1 -> v1 ...; output is the last value
        let mut g = Graph::new("t");
        let xs: Vec<ValueId> = (0..inputs).map(|i| g.value_id(&format!("x{i}"))).collect();
        g.inputs = xs.clone();
        let mut prev = xs[0];
        for (i, op) in ops.iter().enumerate() {
            let out = g.value_id(&format!("v{i}"));
            let mut ins = vec![Some(prev)];
            if i == 0 {
                ins.extend(xs[1..].iter().map(|&x| Some(x)));
            }
            g.nodes.push(Node {
                op: op.to_string(),
                inputs: ins,
                outputs: vec![Some(out)],
                ..Default::default()
            });
            prev = out;
        }
        g.outputs = vec![prev];
        g
    }

    #[test]
    fn supports_identity_and_says_why_not_otherwise() {
        let g = graph(&["Identity"], 1);
        assert_eq!(refusal(&g.nodes[0], &g), None);
        let g = graph(&["Conv"], 1);
        let r = refusal(&g.nodes[0], &g).unwrap();
        assert!(r.contains("no arithmetic for Conv"), "{r}");
        // two inputs
        let g = graph(&["Identity"], 2);
        assert!(refusal(&g.nodes[0], &g).unwrap().contains("2 inputs"));
        // a known shape too large for the 28-bit IOVA window
        let mut g = graph(&["Identity"], 1);
        g.values[0].dtype = Some(DType::F32);
        g.values[0].shape = Some(vec![Dim::Fixed(1 << 20), Dim::Fixed(64)]);
        let r = refusal(&g.nodes[0], &g).unwrap();
        assert!(r.contains("28-bit"), "{r}");
        g.values[0].shape = Some(vec![Dim::Fixed(usize::MAX), Dim::Fixed(64)]);
        assert!(
            refusal(&g.nodes[0], &g).is_some(),
            "overflowing shape refused"
        );
        g.values[0].shape = Some(vec![Dim::Fixed(4), Dim::Fixed(250)]);
        assert_eq!(refusal(&g.nodes[0], &g), None);
    }

    #[test]
    fn compile_checks_the_subgraph_is_a_copy_of_its_input() {
        assert_eq!(
            plan_outputs(&Subgraph::whole(&graph(&["Identity"], 1))).unwrap(),
            1
        );
        assert_eq!(
            plan_outputs(&Subgraph::whole(&graph(&["Identity", "Identity"], 1))).unwrap(),
            1
        );
        let e = plan_outputs(&Subgraph::whole(&graph(&["Identity", "Relu"], 1))).unwrap_err();
        assert!(e.to_string().contains("node 1 (Relu)"), "{e}");
        // an output that copies an initializer, not the input
        let mut g = graph(&["Identity"], 1);
        let w = g.value_id("w");
        g.initializers
            .insert(w, Tensor::from_vec(vec![1], vec![1.0f32]).unwrap());
        let y = g.value_id("y");
        g.nodes.push(Node {
            op: "Identity".into(),
            inputs: vec![Some(w)],
            outputs: vec![Some(y)],
            ..Default::default()
        });
        g.outputs.push(y);
        let e = plan_outputs(&Subgraph::whole(&g)).unwrap_err();
        assert!(
            e.to_string().contains("'y' is not a copy of input 'x0'"),
            "{e}"
        );
        let mut g = graph(&["Identity"], 1);
        g.inputs.clear();
        assert!(plan_outputs(&Subgraph::whole(&g)).is_err());
    }

    #[test]
    fn vfio_errors_become_device_errors_named_by_address() {
        let e: edgehal_core::Error = Error::DeviceHang {
            bdf: "0000:00:03.0".into(),
            what: "DMA".into(),
            ms: 5,
        }
        .into();
        let msg = e.to_string();
        assert_eq!(
            msg,
            "device 0000:00:03.0: hung: DMA did not complete within 5 ms; the device is marked \
             lost (reset it or re-plan onto another device)"
        );
        let core = edgehal_core::Error::arg("x");
        let back: edgehal_core::Error = Error::Core(core).into();
        assert_eq!(back.to_string(), "x");
    }
}
