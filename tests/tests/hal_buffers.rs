//! Buffers: memfd allocation and sealing, huge pages, dma-heap/udmabuf availability, caller
//! memory import with and without copies, fd import, views, CPU access, tensor conversion.

use std::os::fd::AsFd;

use edgehal_core::buffer::{
    page_size, Access, Buffer, CopyCounter, HostPtr, HugePages, MemoryDomain,
};
use edgehal_core::sys::mem;
use edgehal_core::{DType, Tensor};

/// A page-aligned region of `len` bytes inside an owned vector.
fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let page = page_size();
    let mut v = vec![0u8; len + page];
    let off = v.as_mut_ptr().align_offset(page);
    (v, off)
}

#[test]
fn memfd_buffers_are_page_aligned_sealed_and_zeroed() {
    let c = CopyCounter::new();
    let b = Buffer::alloc(10_000, &c).unwrap();
    assert_eq!(b.domain(), MemoryDomain::Host);
    assert_eq!(b.len(), 10_000);
    assert_eq!(b.addr() % page_size(), 0);
    assert!(b.to_vec().unwrap().iter().all(|&x| x == 0));
    let fd = b.fd().unwrap();
    assert!(mem::fd_target(fd).starts_with("/memfd:edgehal"));
    let seals = mem::get_seals(fd).unwrap();
    assert_ne!(seals & mem::F_SEAL_SHRINK, 0, "udmabuf needs F_SEAL_SHRINK");
    assert_eq!(seals & mem::F_SEAL_WRITE, 0, "udmabuf forbids F_SEAL_WRITE");
}

#[test]
fn huge_pages_try_falls_back_and_require_reports() {
    let c = CopyCounter::new();
    let reserved: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let b = Buffer::alloc_with(4096, HugePages::Try, &c).unwrap();
    b.write_from(0, &[7; 16]).unwrap();
    let r = Buffer::alloc_with(4096, HugePages::Require, &c);
    if reserved == 0 {
        // No huge pages here: Try fell back to normal pages, Require says why it failed.
        assert!(!b.is_huge());
        let e = r.unwrap_err().to_string();
        assert!(e.contains("MFD_HUGETLB"), "{e}");
    } else {
        assert!(r.unwrap().is_huge());
    }
}

#[test]
fn dma_heap_and_udmabuf_report_unavailable_here() {
    let c = CopyCounter::new();
    if !std::path::Path::new("/dev/udmabuf").exists() {
        let b = Buffer::alloc(4096, &c).unwrap();
        let e = b.to_udmabuf().unwrap_err().to_string();
        assert!(e.contains("unavailable: /dev/udmabuf not present"), "{e}");
    }
    if !std::path::Path::new("/dev/dma_heap/system").exists() {
        let e = Buffer::alloc_dma_heap("system", 4096, &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unavailable: /dev/dma_heap/system not present"),
            "{e}"
        );
    }
    let e = Buffer::alloc_dma_heap("../x", 4096, &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a dma-heap name"), "{e}");
}

#[test]
fn udmabuf_and_dma_heap_ioctls_reach_the_device_node() {
    // /dev/null accepts open but not our ioctls: the real ioctl path runs and fails with
    // ENOTTY, naming the ioctl.
    let c = CopyCounter::new();
    let b = Buffer::alloc(4096, &c).unwrap();
    let e = b
        .to_udmabuf_at(std::path::Path::new("/dev/null"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("UDMABUF_CREATE"), "{e}");
    let e = Buffer::alloc_dma_heap_at(std::path::Path::new("/dev/null"), 4096, &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DMA_HEAP_IOCTL_ALLOC"), "{e}");
    // A view that does not start on a page cannot become a udmabuf.
    let big = Buffer::alloc(3 * 4096, &c).unwrap();
    let e = big
        .view(100..4196)
        .unwrap()
        .to_udmabuf()
        .unwrap_err()
        .to_string();
    assert!(e.contains("page-aligned"), "{e}");
}

#[test]
fn aligned_caller_memory_imports_without_copying() {
    let c = CopyCounter::new();
    let (mut v, off) = aligned_vec(8192);
    v[off..off + 4].copy_from_slice(&[1, 2, 3, 4]);
    let ptr = v[off..].as_mut_ptr();
    // SAFETY: `v` outlives the buffer (dropped at the end of the test, after `b`), and the
    // test does not touch `v` while `b` lives.
    let b = Buffer::import_host_ptr(unsafe { HostPtr::new(ptr, 8192) }, &c).unwrap();
    assert_eq!(b.domain(), MemoryDomain::HostImported);
    assert_eq!(b.addr(), ptr as usize, "same memory, no copy");
    assert_eq!(c.copies(), 0);
    assert_eq!(b.to_vec().unwrap()[..4], [1, 2, 3, 4]);
    b.write_from(4, &[9, 9]).unwrap();
    drop(b);
    assert_eq!(
        v[off + 4..off + 6],
        [9, 9],
        "writes landed in the caller's memory"
    );
}

#[test]
fn unaligned_caller_memory_costs_one_counted_copy() {
    let c = CopyCounter::new();
    let (mut v, off) = aligned_vec(8192);
    v[off + 1..off + 5].copy_from_slice(&[5, 6, 7, 8]);
    let ptr = v[off + 1..].as_mut_ptr();
    // SAFETY: `v` outlives the import call, which copies the bytes out.
    let b = Buffer::import_host_ptr(unsafe { HostPtr::new(ptr, 1000) }, &c).unwrap();
    assert_eq!(c.copies(), 1);
    assert_eq!(c.bytes(), 1000);
    assert_eq!(b.domain(), MemoryDomain::Host);
    assert_ne!(b.addr(), ptr as usize);
    assert_eq!(b.to_vec().unwrap()[..4], [5, 6, 7, 8]);
    // import_slice always copies.
    let s = Buffer::import_slice(&[1u8; 300], &c).unwrap();
    assert_eq!(s.len(), 300);
    assert_eq!((c.copies(), c.bytes()), (2, 1300));
}

#[test]
fn read_only_caller_memory_refuses_writes() {
    let c = CopyCounter::new();
    let (v, off) = aligned_vec(4096);
    // SAFETY: `v` outlives `b` and is not written meanwhile.
    let b = Buffer::import_host_ptr(
        unsafe { HostPtr::new_read_only(v[off..].as_ptr(), 4096) },
        &c,
    )
    .unwrap();
    assert!(!b.is_writable());
    assert!(b
        .write_from(0, &[1])
        .unwrap_err()
        .to_string()
        .contains("read-only"));
}

#[test]
fn memfd_import_shares_pages_with_the_exporter() {
    let c = CopyCounter::new();
    let a = Buffer::alloc(4096, &c).unwrap();
    a.write_from(0, b"hello").unwrap();
    let fd = a.export_fd().unwrap();
    let b = Buffer::import_memfd(fd, &c).unwrap();
    assert_eq!(b.domain(), MemoryDomain::HostImported);
    assert_eq!(&b.to_vec().unwrap()[..5], b"hello");
    b.write_from(0, b"J").unwrap();
    let mut got = [0u8; 5];
    a.read_into(0, &mut got).unwrap();
    assert_eq!(&got, b"Jello", "one set of pages behind both mappings");
    assert_eq!(c.copies(), 0);
    // Exported memory can no longer be viewed without a copy.
    let before = c.copies();
    let t = a.to_tensor(DType::U8, vec![5]).unwrap();
    assert_eq!(t.to_vec::<u8>().unwrap(), b"Jello");
    assert_eq!(c.copies(), before + 1);
}

#[test]
fn fd_imports_check_the_fd_kind() {
    let c = CopyCounter::new();
    let f = std::fs::File::open("/proc/self/status").unwrap();
    let e = Buffer::import_memfd(f.as_fd().try_clone_to_owned().unwrap(), &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a memfd"), "{e}");
    let m = mem::memfd_create("x", false).unwrap();
    let e = Buffer::import_dmabuf(m, &c).unwrap_err().to_string();
    assert!(e.contains("not a dma-buf"), "{e}");
}

#[test]
fn views_cpu_access_and_tensors() {
    let c = CopyCounter::new();
    let b = Buffer::alloc(64, &c).unwrap();
    let v = b.view(16..48).unwrap();
    {
        let w = v.cpu_access(Access::Write).unwrap();
        let data: Vec<u8> = bytemuck_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        w.write_from(0, &data).unwrap();
        assert!(w.write_from(30, &[0; 4]).is_err(), "past the view's end");
        // Exclusive while writing.
        assert!(b
            .read_into(0, &mut [0u8; 4])
            .unwrap_err()
            .to_string()
            .contains("busy"));
    }
    let r = v.cpu_access(Access::Read).unwrap();
    assert!(r.write_from(0, &[1]).is_err());
    drop(r);
    let t = v.to_tensor(DType::F32, vec![2, 4]).unwrap();
    assert_eq!(c.copies(), 0, "private memfd: zero-copy tensor");
    assert_eq!(t.bytes().as_ptr() as usize, b.addr() + 16);
    assert_eq!(
        t.to_vec::<f32>().unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
    // While the tensor lives, the memory cannot be written under it.
    assert!(b
        .write_from(16, &[0])
        .unwrap_err()
        .to_string()
        .contains("busy"));
    drop(t);
    b.write_from(16, &[0]).unwrap();
    // Too large a tensor is refused, not read out of bounds.
    assert!(v.to_tensor(DType::F32, vec![9]).is_err());
    // Tensors convert to read-only buffers without copying.
    let t = Tensor::from_vec(vec![3], vec![1i32, 2, 3]).unwrap();
    let tb = Buffer::from_tensor(&t, &c);
    assert_eq!(tb.addr(), t.bytes().as_ptr() as usize);
    assert!(!tb.is_writable());
    assert_eq!(
        tb.to_tensor(DType::I32, vec![3])
            .unwrap()
            .to_vec::<i32>()
            .unwrap(),
        vec![1, 2, 3]
    );
    assert_eq!(c.copies(), 0);
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
