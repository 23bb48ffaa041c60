//! The test program that runs inside the QEMU guest of `tests/vm/run.sh` (statically linked, as
//! `/edgehal-vm-guest` in a busybox initramfs). It prints one line per check:
//! `CHECK <name> PASS|FAIL <detail>`, which `drivers/vfio/tests/vm.rs` parses.
//!
//! Usage: `vm_guest <bdf>`; `EDGEHAL_NO_BUSMASTER=1` leaves bus mastering off (negative run).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgehal_core::Tensor;
use edgehal_vfio::device::IrqKind;
use edgehal_vfio::dmabuf::{self, SYNC_READ, SYNC_RW};
use edgehal_vfio::edu::{self, Dir, Edu, EduPlan, Options};
use edgehal_vfio::{HostBuffer, MmapRegion};

fn check(name: &str, ok: bool, detail: impl std::fmt::Display) {
    let detail = detail.to_string().replace('\n', " ");
    println!("CHECK {name} {} {detail}", if ok { "PASS" } else { "FAIL" });
}

fn all_eq(m: &MmapRegion, len: usize, v: u8) -> bool {
    let mut buf = vec![0u8; len];
    m.read_bytes(0, &mut buf).is_ok() && buf.iter().all(|b| *b == v)
}

fn main() {
    let Some(bdf) = std::env::args().nth(1) else {
        check("vfio_open", false, "usage: vm_guest <bdf>");
        return;
    };
    let no_bm = std::env::var("EDGEHAL_NO_BUSMASTER").is_ok_and(|v| v == "1");
    let opts = Options {
        bus_master: !no_bm,
        dma_timeout: Duration::from_secs(if no_bm { 2 } else { 5 }),
    };
    let edu = match Edu::open(Path::new("/"), &bdf, opts) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            check("vfio_open", false, e);
            return;
        }
    };
    let pci = edu.pci();
    check(
        "vfio_open",
        true,
        format!(
            "{bdf} BAR0 {:#x} bytes, config {:#x} bytes, irq {:?}, MSI vectors {}",
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

    // Tensor round trip RAM -> device -> RAM through a plan that keeps its mappings pinned.
    let n = 1000usize; // 4000 bytes: two chunks each way
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.25).collect();
    let t = match Tensor::from_vec(vec![4, n / 4], data) {
        Ok(t) => t,
        Err(e) => {
            check("dma_roundtrip", false, e);
            return;
        }
    };
    let plan = match EduPlan::new(edu.clone(), t.bytes().len()) {
        Ok(p) => p,
        Err(e) => {
            check("dma_roundtrip", false, e);
            return;
        }
    };
    let start = Instant::now();
    let irq_before = edu.interrupts();
    let res = plan.run(&t);
    let dst_zero = {
        let mut b = vec![0u8; t.bytes().len()];
        plan.read_dst(0, &mut b).is_ok() && b.iter().all(|x| *x == 0)
    };
    match res {
        Ok(out) => {
            let same = out.bytes() == t.bytes() && out.shape() == t.shape();
            check(
                "dma_roundtrip",
                same,
                format!(
                    "{} bytes f32[4,250] in {} ms, equal={same} dst_zero={dst_zero}",
                    t.bytes().len(),
                    start.elapsed().as_millis()
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

    unmapped_not_written(&edu);
    udmabuf_dma(&edu);
    dma_heap();
    dmabuf_mmap_dma(&edu);
    io_uring();
    irq_io_uring(&edu, &plan, &t);
    hang_deadline(&edu);
}

fn unmapped_not_written(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let mem = HostBuffer::anonymous(4096)?;
        let map = edu.pci().dma().map(mem.clone())?;
        let iova = map.iova();
        // mapped: the device writes (its buffer holds the tensor's last chunk)
        mem.fill(0, 4096, 0x5a)?;
        edu.dma(Dir::ToRam, &map, 0, 0, 256)?;
        let written = !all_eq(&mem, 256, 0x5a);
        // unmapped: the same DMA must not reach the memory
        drop(map);
        mem.fill(0, 4096, 0x5a)?;
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

fn udmabuf_dma(edu: &Arc<Edu>) {
    let r = (|| -> edgehal_vfio::Result<String> {
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
        let src_mem = HostBuffer::anonymous(4096)?;
        src_mem.write_bytes(0, &pattern)?;
        let src = edu.pci().dma().map(src_mem.clone())?;
        let u = dmabuf::Udmabuf::new(4096)?;
        let dst = edu.pci().dma().map(u.host().clone())?;
        edu.dma(Dir::ToDevice, &src, 0, 0, pattern.len())?;
        edu.dma(Dir::ToRam, &dst, 0, 0, pattern.len())?;
        let mut got = vec![0u8; pattern.len()];
        let acc = u.dmabuf().begin_cpu_access(SYNC_READ)?;
        acc.read(0, &mut got)?;
        acc.end()?;
        if got == pattern {
            Ok(format!(
                "{} bytes DMA'd into memfd pages, read back via dma-buf mmap between SYNC START/END",
                pattern.len()
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
        let b = dmabuf::heap_alloc(Path::new("/dev/dma_heap/system"), 65536)?;
        let pattern: Vec<u8> = (0..b.len()).map(|i| (i % 251) as u8).collect();
        let acc = b.begin_cpu_access(SYNC_RW)?;
        acc.write(0, &pattern)?;
        let mut got = vec![0u8; b.len()];
        acc.read(0, &mut got)?;
        acc.end()?;
        if got == pattern {
            Ok(format!(
                "{} bytes from /dev/dma_heap/system, written and read back",
                b.len()
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
        let heap = dmabuf::heap_alloc(Path::new("/dev/dma_heap/system"), 8192)?;
        let u = dmabuf::Udmabuf::new(8192)?;
        let mut notes = Vec::new();
        for (name, b) in [("dma-heap", &heap), ("udmabuf", u.dmabuf())] {
            match edu.pci().dma().map(b.region().clone()) {
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

fn irq_io_uring(edu: &Arc<Edu>, plan: &EduPlan, t: &Tensor) {
    let r = (|| -> edgehal_vfio::Result<String> {
        edu.use_io_uring(true)?;
        let before = edu.io_uring_interrupts();
        let out = plan.run(t);
        edu.use_io_uring(false)?;
        let out = out?;
        let n = edu.io_uring_interrupts() - before;
        if out.bytes() == t.bytes() && n >= 4 {
            Ok(format!(
                "tensor round trip again with {n} completions reaped through io_uring (poll + linked timeout)"
            ))
        } else {
            Err(edgehal_vfio::Error::arg(format!(
                "equal={} io_uring completions={n}",
                out.bytes() == t.bytes()
            )))
        }
    })();
    match r {
        Ok(d) => check("irq_io_uring", true, d),
        Err(e) => check("irq_io_uring", false, e),
    }
}

fn hang_deadline(edu: &Arc<Edu>) {
    // QEMU's DMA takes ~100 ms; a 1 ms deadline must report a hang and mark the device lost.
    let r = (|| -> edgehal_vfio::Result<String> {
        let mem = HostBuffer::anonymous(4096)?;
        let map = edu.pci().dma().map(mem)?;
        edu.set_timeout(Duration::from_millis(1));
        let first = edu.dma(Dir::ToDevice, &map, 0, 0, 64);
        let second = edu.dma(Dir::ToDevice, &map, 0, 0, 64);
        // let the in-flight DMA finish before the mapping goes away
        std::thread::sleep(Duration::from_millis(300));
        match (first, second) {
            (
                Err(h @ edgehal_vfio::Error::DeviceHang { .. }),
                Err(l @ edgehal_vfio::Error::DeviceLost { .. }),
            ) => Ok(format!("first: {h} | then: {l}")),
            (a, b) => Err(edgehal_vfio::Error::arg(format!(
                "expected hang then lost, got {:?} / {:?}",
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
