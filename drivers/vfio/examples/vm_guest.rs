//! The test program that runs inside the QEMU guest of `tests/vm/run.sh` (statically linked, as
//! `/edgehal-vm-guest` in a busybox initramfs). It prints one line per check:
//! `CHECK <name> PASS|FAIL <detail>`, which `drivers/vfio/tests/vm.rs` parses.
//!
//! Usage: `vm_guest <bdf>`; `EDGEHAL_NO_BUSMASTER=1` leaves bus mastering off (negative run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgehal_core::buffer::{Access, Buffer, CopyCounter};
use edgehal_core::driver::{Bindings, Device, Driver, Executable, Subgraph, SysRoot, TensorBuffer};
use edgehal_core::graph::{Graph, Node};
use edgehal_core::Tensor;
use edgehal_vfio::device::IrqKind;
use edgehal_vfio::edu::{self, Dir, Edu, Options};
use edgehal_vfio::{EduDriver, EduExecutable};

fn check(name: &str, ok: bool, detail: impl std::fmt::Display) {
    let detail = detail.to_string().replace('\n', " ");
    println!("CHECK {name} {} {detail}", if ok { "PASS" } else { "FAIL" });
}

fn all_eq(b: &Buffer, len: usize, v: u8) -> bool {
    let mut buf = vec![0u8; len];
    b.read_into(0, &mut buf).is_ok() && buf.iter().all(|x| *x == v)
}

/// `x -> Identity -> y`, the one op edu supports.
fn identity_graph() -> Graph {
    let mut g = Graph::new("edu-identity");
    let x = g.value_id("x");
    let y = g.value_id("y");
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.nodes.push(Node {
        op: "Identity".into(),
        inputs: vec![Some(x)],
        outputs: vec![Some(y)],
        ..Default::default()
    });
    g
}

/// The tensor in a fresh host buffer and a zeroed output buffer of the same size, bound.
fn bind(t: &Tensor, c: &CopyCounter) -> edgehal_core::Result<(Bindings, Buffer)> {
    let n = t.bytes().len();
    let src = Buffer::alloc(n, c)?;
    src.write_from(0, t.bytes())?;
    let dst = Buffer::alloc(n, c)?;
    let shape = t.shape().to_vec();
    let b = Bindings::new(
        vec![TensorBuffer::new(src, t.dtype(), shape.clone())?],
        vec![Some(TensorBuffer::new(dst.clone(), t.dtype(), shape)?)],
        c,
    );
    Ok((b, dst))
}

/// Argument that makes the binary only try to open the device and print the error (run as an
/// unprivileged user by the `no_permission` check).
const OPEN_ONLY: &str = "--open-only";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(OPEN_ONLY) {
        let bdf = args.get(2).cloned().unwrap_or_default();
        let driver = EduDriver::new();
        let probed = driver.probe(&SysRoot::live());
        match probed
            .iter()
            .find(|d| d.properties.get("pci") == Some(&bdf))
        {
            None => println!("OPEN no edu device at {bdf}"),
            Some(info) => match driver.open(info) {
                Ok(_) => println!("OPEN ok"),
                Err(e) => println!("OPEN {e}"),
            },
        }
        return;
    }
    let Some(bdf) = args.get(1).cloned() else {
        check("vfio_open", false, "usage: vm_guest <bdf>");
        return;
    };
    let no_bm = std::env::var("EDGEHAL_NO_BUSMASTER").is_ok_and(|v| v == "1");
    let opts = Options {
        bus_master: !no_bm,
        dma_timeout: Duration::from_secs(if no_bm { 2 } else { 5 }),
    };
    // Probe through edgehal's Driver API (reads sysfs only), then open the probed device.
    let driver = EduDriver::with_options("/", opts);
    let probed = driver.probe(&SysRoot::live());
    let Some(info) = probed
        .iter()
        .find(|d| d.properties.get("pci") == Some(&bdf))
    else {
        check(
            "vfio_open",
            false,
            format!(
                "probe found no edu device at {bdf} ({} edu devices)",
                probed.len()
            ),
        );
        return;
    };
    if let Some(why) = &info.unavailable {
        println!("probe says {}: {why}", info.name);
    }
    // `open_edu` is `Driver::open` with the concrete type kept (for the interrupt counters and
    // timeouts the checks read); everything else goes through `dyn Device`.
    let edu_dev = match driver.open_edu(info) {
        Ok(d) => d,
        Err(e) => {
            check("vfio_open", false, e);
            return;
        }
    };
    let edu = Arc::clone(edu_dev.edu());
    let dev: Arc<dyn Device> = edu_dev;
    let pci = edu.pci();
    check(
        "vfio_open",
        true,
        format!(
            "{} ({bdf}) BAR0 {:#x} bytes, config {:#x} bytes, irq {:?}, MSI vectors {}",
            dev.info().name,
            pci.region(0).size,
            pci.region(7).size,
            edu.irq_kind(),
            pci.irq_count(IrqKind::Msi)
        ),
    );
    match edu.id() {
        Ok(id) => check("bar_id", id == edu::ID, format!("id register {id:#010x}")),
        Err(e) => check("bar_id", false, e),
    }
    match edu.liveness(0x1234_5678) {
        Ok(v) => check(
            "bar_liveness",
            v == !0x1234_5678u32,
            format!("wrote 0x12345678 read {v:#010x}"),
        ),
        Err(e) => check("bar_liveness", false, e),
    }
    match pci.command() {
        Ok(c) => check(
            "bus_master",
            (c & 4 != 0) != no_bm,
            format!(
                "PCI_COMMAND {c:#06x} (bus mastering {})",
                if c & 4 != 0 { "on" } else { "off" }
            ),
        ),
        Err(e) => check("bus_master", false, e),
    }

    // Tensor round trip RAM -> device -> RAM through edgehal's Device API: supports,
    // compile, submit with bound Buffers, a fence signalled from the MSI eventfd.
    let n = 1000usize; // 4000 bytes: two chunks each way
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.25).collect();
    let t = match Tensor::from_vec(vec![4, n / 4], data) {
        Ok(t) => t,
        Err(e) => {
            check("dma_roundtrip", false, e);
            return;
        }
    };
    let g = identity_graph();
    let sup = dev.supports(&g.nodes[0], &g);
    let exe = match dev.compile(&Subgraph::whole(&g)) {
        Ok(e) => e,
        Err(e) => {
            check("dma_roundtrip", false, format!("compile: {e}"));
            return;
        }
    };
    let c = CopyCounter::new();
    let (bindings, dst) = match bind(&t, &c) {
        Ok(b) => b,
        Err(e) => {
            check("dma_roundtrip", false, e);
            return;
        }
    };
    let start = Instant::now();
    let irq_before = edu.interrupts();
    let res = dev
        .submit(exe.as_ref(), &bindings)
        .and_then(|f| f.wait(Some(Duration::from_secs(30))));
    let dst_zero = all_eq(&dst, t.bytes().len(), 0);
    let got = dst.to_vec().unwrap_or_default();
    let mapped = exe
        .as_any()
        .downcast_ref::<EduExecutable>()
        .map_or(0, |e| e.mapped_buffers());
    match res {
        Ok(()) => {
            let same = got == t.bytes()[..];
            check(
                "dma_roundtrip",
                same && sup.is_yes() && c.copies() == 0,
                format!(
                    "{} bytes f32[4,250] via Device::submit in {} ms, equal={same} \
                     dst_zero={dst_zero} supports={sup:?} copies={} mapped_buffers={mapped}",
                    t.bytes().len(),
                    start.elapsed().as_millis(),
                    c.copies()
                ),
            );
            let irqs = edu.interrupts() - irq_before;
            check(
                "irq_completion",
                irqs >= 4,
                format!(
                    "{irqs} DMA-completion interrupts via {:?} eventfd for 4 DMAs",
                    edu.irq_kind()
                ),
            );
        }
        Err(e) => check("dma_roundtrip", false, format!("{e} dst_zero={dst_zero}")),
    }
    if no_bm {
        return;
    }

    api_refusals(&dev);
    no_permission(&bdf);
    iova_exhausted(&edu);
    unmapped_not_written(&edu);
    udmabuf_dma(&edu);
    dma_heap();
    dmabuf_mmap_dma(&edu);
    io_uring();
    irq_io_uring(&dev, &edu, exe.as_ref(), &t);
    drop(exe);
    dma_staged(&dev, &t);
    hang_deadline(&dev, &edu, &t);
}

/// What the device says about ops it cannot run, and that it refuses to compile them.
fn api_refusals(dev: &Arc<dyn Device>) {
    let mut g = identity_graph();
    g.nodes[0].op = "Relu".into();
    let sup = dev.supports(&g.nodes[0], &g);
    let compiled = dev.compile(&Subgraph::whole(&g));
    let ok =
        !sup.is_yes() && format!("{sup:?}").contains("no arithmetic for Relu") && compiled.is_err();
    check(
        "api_refusals",
        ok,
        format!(
            "Relu: {sup:?}; compile: {}",
            compiled.err().map_or("accepted".into(), |e| e.to_string())
        ),
    );
}

/// Opening the device as an unprivileged user (uid/gid 65534) with the group node root-only
/// must fail with the actionable permission error (EACCES comes before the group's EBUSY).
fn no_permission(bdf: &str) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let r = (|| -> Result<String, String> {
        let group = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))
            .map_err(|e| format!("iommu_group: {e}"))?;
        let group = group
            .file_name()
            .map(|g| g.to_string_lossy().into_owned())
            .unwrap_or_default();
        let node = format!("/dev/vfio/{group}");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {node}: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let out = std::process::Command::new(exe)
            .args([OPEN_ONLY, bdf])
            .uid(65534)
            .gid(65534)
            .output()
            .map_err(|e| format!("spawning as uid 65534: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let want = format!("no permission to open {node}");
        if text.contains(&want) && text.contains("chown") {
            Ok(format!("as uid 65534: {text}"))
        } else {
            Err(format!("as uid 65534, expected '{want}': {text}"))
        }
    })();
    match r {
        Ok(d) => check("no_permission", true, d),
        Err(e) => check("no_permission", false, e),
    }
}

/// Mapping one 64 MiB buffer again and again (same pages, new IOVA ranges) must run out of
/// edu's 28-bit IOVA window with the actionable error, and unmapping must give it all back.
fn iova_exhausted(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let space = edu.pci().dma();
        let free0 = space.free_iova()?;
        let b = Buffer::alloc(64 << 20, &CopyCounter::new())?;
        let mut maps = Vec::new();
        let err = loop {
            match space.map(&b) {
                Ok(m) => maps.push(m),
                Err(e) => break e,
            }
            if maps.len() > 8 {
                return Err(edgehal_vfio::Error::arg("never ran out of IOVA space"));
            }
        };
        let n = maps.len();
        let msg = err.to_string();
        drop(maps);
        let free1 = space.free_iova()?;
        if matches!(err, edgehal_vfio::Error::IovaExhausted { .. }) && free1 == free0 {
            Ok(format!("{n} mappings of 64 MiB fit, then: {msg}; all {free1:#x} bytes free again after unmapping"))
        } else {
            Err(edgehal_vfio::Error::arg(format!(
                "after {n} mappings: {msg}; free {free0:#x} before, {free1:#x} after"
            )))
        }
    })();
    match r {
        Ok(d) => check("iova_exhausted", true, d),
        Err(e) => check("iova_exhausted", false, e),
    }
}

fn unmapped_not_written(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let mem = Buffer::alloc(4096, &CopyCounter::new())?;
        let map = edu.pci().dma().map(&mem)?;
        let iova = map.iova();
        // mapped: the device writes (its buffer holds the tensor's last chunk)
        mem.write_from(0, &[0x5a; 4096])?;
        edu.dma(Dir::ToRam, &map, 0, 0, 256)?;
        let written = !all_eq(&mem, 256, 0x5a);
        // unmapped: the same DMA must not reach the memory
        drop(map);
        mem.write_from(0, &[0x5a; 4096])?;
        edu.dma_iova(Dir::ToRam, iova, 0, 256)?;
        let untouched = all_eq(&mem, 4096, 0x5a);
        if written && untouched {
            Ok(format!(
                "IOVA {iova:#x}: written while mapped, untouched after unmap"
            ))
        } else {
            Err(edgehal_vfio::Error::arg(format!(
                "IOVA {iova:#x}: written_while_mapped={written} untouched_after_unmap={untouched}"
            )))
        }
    })();
    match r {
        Ok(d) => check("unmapped_not_written", true, d),
        Err(e) => check("unmapped_not_written", false, e),
    }
}

/// edgehal-core's udmabuf: the memfd Buffer is DMA-mapped, the device writes it, and the bytes
/// are read back through the dma-buf's own mapping (core brackets it with DMA_BUF_IOCTL_SYNC).
fn udmabuf_dma(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let c = CopyCounter::new();
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
        let src_mem = Buffer::alloc(4096, &c)?;
        src_mem.write_from(0, &pattern)?;
        let src = edu.pci().dma().map(&src_mem)?;
        let host = Buffer::alloc(4096, &c)?;
        let u = host.to_udmabuf()?;
        let dst = edu.pci().dma().map(&host)?;
        edu.dma(Dir::ToDevice, &src, 0, 0, pattern.len())?;
        edu.dma(Dir::ToRam, &dst, 0, 0, pattern.len())?;
        let mut got = vec![0u8; pattern.len()];
        {
            let acc = u.cpu_access(Access::Read)?;
            acc.read_into(0, &mut got)?;
        }
        if got == pattern {
            Ok(format!(
                "{} bytes DMA'd into memfd pages, read back via the {} mapping between SYNC START/END",
                pattern.len(),
                u.domain()
            ))
        } else {
            Err(edgehal_vfio::Error::arg(
                "dma-buf contents differ from the DMA'd pattern",
            ))
        }
    })();
    match r {
        Ok(d) => check("udmabuf_dma", true, d),
        Err(e) => check("udmabuf_dma", false, e),
    }
}

fn dma_heap() {
    let r = (|| -> edgehal_vfio::Result<String> {
        let b = Buffer::alloc_dma_heap("system", 65536, &CopyCounter::new())?;
        let pattern: Vec<u8> = (0..b.len()).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; b.len()];
        {
            let acc = b.cpu_access(Access::Write)?;
            acc.write_from(0, &pattern)?;
            acc.read_into(0, &mut got)?;
        }
        if got == pattern {
            Ok(format!(
                "{} bytes from /dev/dma_heap/system ({}), written and read back",
                b.len(),
                b.domain()
            ))
        } else {
            Err(edgehal_vfio::Error::arg(
                "dma-heap buffer read back differs",
            ))
        }
    })();
    match r {
        Ok(d) => check("dma_heap", true, d),
        Err(e) => check("dma_heap", false, e),
    }
}

/// A dma-buf's own CPU mapping is PFN-mapped RAM, which VFIO type1 cannot pin: mapping it for DMA
/// must fail with an error that says what to do instead (the udmabuf check shows the way that
/// works: DMA-map the memfd and read through the dma-buf).
fn dmabuf_mmap_dma(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let c = CopyCounter::new();
        let heap = Buffer::alloc_dma_heap("system", 8192, &c)?;
        let u = Buffer::alloc(8192, &c)?.to_udmabuf()?;
        let mut notes = Vec::new();
        for (name, b) in [("dma-heap", &heap), ("udmabuf", &u)] {
            match edu.pci().dma().map(b) {
                Ok(m) => notes.push(format!("{name}: mapped at {:#x} (unexpected)", m.iova())),
                Err(e) if e.to_string().contains("udmabuf memfd") => {
                    notes.push(format!("{name}: refused as expected"))
                }
                Err(e) => return Err(e),
            }
        }
        let all = notes.iter().all(|n| n.ends_with("as expected"));
        if all {
            Ok(notes.join("; "))
        } else {
            Err(edgehal_vfio::Error::arg(notes.join("; ")))
        }
    })();
    match r {
        Ok(d) => check("dmabuf_mmap_dma_refused", true, d),
        Err(e) => check("dmabuf_mmap_dma_refused", false, e),
    }
}

fn io_uring() {
    let r = (|| -> edgehal_vfio::Result<String> {
        let path = "/tmp/edgehal-uring.bin";
        let content: Vec<u8> = (0..10000u32).map(|i| (i % 253) as u8).collect();
        std::fs::create_dir_all("/tmp").map_err(|e| edgehal_vfio::Error::os("mkdir /tmp", e))?;
        std::fs::write(path, &content).map_err(|e| edgehal_vfio::Error::os("write", e))?;
        let f = std::fs::File::open(path).map_err(|e| edgehal_vfio::Error::os("open", e))?;
        let mut buf = vec![0u8; 4096];
        let n = edgehal_vfio::raw::uring_read(edgehal_vfio::raw::borrow_fd(&f), &mut buf, 1000)?;
        if n == 4096 && buf[..] == content[1000..5096] {
            Ok("read 4096 bytes at offset 1000 through io_uring, bytes equal".into())
        } else {
            Err(edgehal_vfio::Error::arg(format!(
                "io_uring read {n} bytes, contents differ"
            )))
        }
    })();
    match r {
        Ok(d) => check("io_uring", true, d),
        Err(e) => check("io_uring", false, e),
    }
}

/// A second submit of the same executable and buffers: the mappings made by the first are
/// reused (nothing new is mapped), and completions are reaped through io_uring.
fn irq_io_uring(dev: &Arc<dyn Device>, edu: &Arc<Edu>, exe: &dyn Executable, t: &Tensor) {
    let r = (|| -> edgehal_core::Result<String> {
        let c = CopyCounter::new();
        let (bindings, dst) = bind(t, &c)?;
        let mapped = |e: &dyn Executable| {
            e.as_any()
                .downcast_ref::<EduExecutable>()
                .map_or(0, |e| e.mapped_buffers())
        };
        edu.use_io_uring(true)?;
        let before = edu.io_uring_interrupts();
        let first = dev
            .submit(exe, &bindings)
            .and_then(|f| f.wait(Some(Duration::from_secs(30))));
        let after_first = mapped(exe);
        let again = dev
            .submit(exe, &bindings)
            .and_then(|f| f.wait(Some(Duration::from_secs(30))));
        let after_second = mapped(exe);
        edu.use_io_uring(false)?;
        first?;
        again?;
        let out = dst.to_vec()?;
        let n = edu.io_uring_interrupts() - before;
        let same = out == t.bytes()[..];
        if same && n >= 8 && after_first == after_second {
            Ok(format!(
                "two submits with {n} completions reaped through io_uring (poll + linked \
                 timeout); mapped buffers {after_first} after the first, {after_second} after \
                 the second (mappings reused)"
            ))
        } else {
            Err(edgehal_core::Error::arg(format!(
                "equal={same} io_uring completions={n} mapped {after_first} then {after_second}"
            )))
        }
    })();
    match r {
        Ok(d) => check("irq_io_uring", true, d),
        Err(e) => check("irq_io_uring", false, e),
    }
}

/// Buffers the device cannot DMA-map themselves: the input is a read-only tensor's storage
/// (staged through the executable's own mapped buffer, one counted copy) and the output is left
/// unbound (the device allocates it, maps it and hands it back without a copy).
fn dma_staged(dev: &Arc<dyn Device>, t: &Tensor) {
    let r = (|| -> edgehal_core::Result<String> {
        let exe = dev.compile(&Subgraph::whole(&identity_graph()))?;
        let c = CopyCounter::new();
        let input = TensorBuffer::from_tensor(t, &c);
        let bindings = Bindings::new(vec![input], vec![None], &c);
        dev.submit(exe.as_ref(), &bindings)?
            .wait(Some(Duration::from_secs(30)))?;
        let out = bindings
            .output(0)
            .ok_or_else(|| edgehal_core::Error::arg("no output delivered"))?;
        let got = out.buffer.to_vec()?;
        let same = got.get(..t.bytes().len()) == Some(&t.bytes()[..])
            && out.shape == t.shape()
            && out.dtype == t.dtype();
        let detail = format!(
            "read-only input staged, device-allocated output: equal={same}, {} copies of {} \
             bytes (expected 1 of {})",
            c.copies(),
            c.bytes(),
            t.bytes().len()
        );
        if same && c.copies() == 1 && c.bytes() == t.bytes().len() as u64 {
            Ok(detail)
        } else {
            Err(edgehal_core::Error::arg(detail))
        }
    })();
    match r {
        Ok(d) => check("dma_staged", true, d),
        Err(e) => check("dma_staged", false, e),
    }
}

fn hang_deadline(dev: &Arc<dyn Device>, edu: &Arc<Edu>, t: &Tensor) {
    // QEMU's DMA takes ~100 ms; a 1 ms deadline must fail the fence with a hang, mark the device
    // lost, and fail the next submit at once (so a scheduler re-plans).
    let r = (|| -> edgehal_core::Result<String> {
        let g = identity_graph();
        let exe = dev.compile(&Subgraph::whole(&g))?;
        let c = CopyCounter::new();
        let (bindings, _dst) = bind(t, &c)?;
        edu.set_timeout(Duration::from_millis(1));
        let first = dev
            .submit(exe.as_ref(), &bindings)
            .and_then(|f| f.wait(Some(Duration::from_secs(10))));
        let t1 = Instant::now();
        let second = dev
            .submit(exe.as_ref(), &bindings)
            .and_then(|f| f.wait(Some(Duration::from_secs(10))));
        let fast = t1.elapsed() < Duration::from_millis(50);
        // let the in-flight DMA finish before the mappings go away
        std::thread::sleep(Duration::from_millis(300));
        match (first, second) {
            (Err(h), Err(l))
                if h.to_string().contains("hung") && l.to_string().contains("is lost") && fast =>
            {
                Ok(format!("first fence: {h} | next submit: {l}"))
            }
            (a, b) => Err(edgehal_core::Error::arg(format!(
                "expected hang then lost (fast={fast}), got {:?} / {:?}",
                a.err().map(|e| e.to_string()),
                b.err().map(|e| e.to_string())
            ))),
        }
    })();
    match r {
        Ok(d) => check("hang_deadline", true, d),
        Err(e) => check("hang_deadline", false, e),
    }
}
