//! One io_uring reactor thread that waits on every device's fences and on file reads.
//!
//! - Fences are watched through their exported eventfds with one-shot `IORING_OP_POLL_ADD`;
//!   when one becomes readable the reactor calls the watcher's callback with the fence's
//!   outcome (on the reactor thread: callbacks must be short and must not block).
//! - Files are read with `IORING_OP_READ` straight into page-aligned [`Buffer`]s
//!   ([`Reactor::read_file`]), in chunks, short reads continued.
//! - Other threads hand work to the reactor through a queue and an eventfd the reactor itself
//!   polls, so submissions need no lock on the ring.
//! - Where io_uring cannot be set up (old kernel, seccomp, or `EDGEHAL_NO_IO_URING=1`) the
//!   reactor falls back to threads: one waiting thread per watched fence and plain `read(2)`
//!   for files; this is said once on stderr.
//! - [`load_file`] is how model files (ONNX, its external data files, TFLite) come into
//!   memory: by default read through the process-wide reactor into a page-aligned buffer
//!   that `bytes::Bytes` owns, so initializers stay zero-copy slices; `EDGEHAL_LOAD=mmap`
//!   maps them instead.
//!
//! The `unsafe` here is the io_uring submission (the kernel writes into memory named by raw
//! pointers); every block states why the memory outlives the operation.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use edgehal_core::buffer::{Buffer, CopyCounter};
use edgehal_core::driver::Fence;
use edgehal_core::sys::mem;
use io_uring::{opcode, squeue, types, IoUring};

use crate::{Error, Result};

type Callback = Box<dyn FnOnce() + Send>;

enum Op {
    /// Call `done` once `fd` is readable (the fd is kept open until then).
    Poll { fd: OwnedFd, done: Callback },
    /// Read `len` bytes at file offset `off` into `ptr`; the result (bytes or -errno) is sent.
    Read {
        fd: RawFd,
        ptr: usize,
        len: u32,
        off: u64,
        done: mpsc::Sender<i32>,
    },
}

struct Shared {
    queue: Mutex<Vec<Op>>,
    wake: OwnedFd,
    stop: AtomicBool,
}

/// Which mechanism a reactor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Threads,
}

/// The reactor (see the module docs). Dropping it stops its thread once pending reads end.
pub struct Reactor {
    shared: Arc<Shared>,
    backend: Backend,
    thread: Option<JoinHandle<()>>,
}

static SAID_FALLBACK: AtomicBool = AtomicBool::new(false);

fn say_fallback(why: &str) {
    if !SAID_FALLBACK.swap(true, Ordering::SeqCst) {
        eprintln!(
            "edgehal: io_uring unavailable: {why}, using read(2) for files and threads for fences"
        );
    }
}

/// How model files are brought into memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileLoad {
    /// Read through the reactor's io_uring into a page-aligned buffer (plain `read(2)` where
    /// io_uring is unavailable). The default: the weights are then ordinary anonymous memory
    /// that no other process can change under the runtime, ready to import into devices.
    #[default]
    Read,
    /// Map the file read-only (no copy; pages come from the page cache on first touch).
    Map,
}

impl FileLoad {
    /// `EDGEHAL_LOAD=mmap` selects [`FileLoad::Map`]; anything else (or nothing) the default.
    pub fn from_env() -> FileLoad {
        match std::env::var("EDGEHAL_LOAD") {
            Ok(v) if v.eq_ignore_ascii_case("mmap") => FileLoad::Map,
            _ => FileLoad::Read,
        }
    }
}

/// A whole file as [`bytes::Bytes`]: read through the process-wide reactor into a
/// page-aligned buffer the `Bytes` owns (slices of it, e.g. initializers, never copy), or
/// mapped (see [`FileLoad`]).
pub fn load_file(path: &Path, how: FileLoad) -> Result<bytes::Bytes> {
    if how == FileLoad::Map {
        return edgehal_core::sys::map_file(path);
    }
    let buf = match Reactor::global() {
        Ok(r) => r.read_file(path)?,
        // Not even an eventfd: read on this thread.
        Err(e) => {
            say_fallback(&e.to_string());
            read_plain(path)?
        }
    };
    buffer_bytes(&buf)
}

/// The buffer's bytes without a copy (a fresh host buffer is only ours).
fn buffer_bytes(buf: &Buffer) -> Result<bytes::Bytes> {
    if buf.is_empty() {
        return Ok(bytes::Bytes::new());
    }
    let t = buf.to_tensor(edgehal_core::DType::U8, vec![buf.len()])?;
    Ok(t.bytes().clone())
}

/// Open `path` and check its size against the tensor budget.
fn open_sized(path: &Path) -> Result<(File, usize)> {
    let what = || path.display().to_string();
    let f = File::open(path).map_err(|e| Error::io(format!("opening {}", what()), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", what()), e))?
        .len();
    if len > edgehal_core::MAX_TENSOR_BYTES {
        return Err(Error::TooLarge(format!(
            "{}: {len} bytes is over the {} byte budget",
            what(),
            edgehal_core::MAX_TENSOR_BYTES
        )));
    }
    Ok((f, len as usize))
}

/// `read(2)` a whole file into a new page-aligned buffer, in chunks of at most 1 MiB.
fn read_plain(path: &Path) -> Result<Buffer> {
    let (f, len) = open_sized(path)?;
    read_plain_into(f, len, path)
}

fn read_plain_into(mut f: File, len: usize, path: &Path) -> Result<Buffer> {
    let buf = Buffer::alloc(len, &CopyCounter::new())?;
    let mut chunk = vec![0u8; len.min(1 << 20)];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len());
        f.read_exact(&mut chunk[..n])
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        buf.write_from(off, &chunk[..n])?;
        off += n;
    }
    Ok(buf)
}

impl Reactor {
    /// A reactor on io_uring, or on threads when `force_threads` is set or io_uring cannot
    /// be set up (also when `EDGEHAL_NO_IO_URING=1`).
    pub fn new(force_threads: bool) -> Result<Reactor> {
        let wake = mem::eventfd().map_err(|e| Error::io("eventfd", e))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            wake,
            stop: AtomicBool::new(false),
        });
        let env_off = std::env::var("EDGEHAL_NO_IO_URING").is_ok_and(|v| v == "1");
        // Valgrind does not follow io_uring (reads never completed under it): its preload
        // library in LD_PRELOAD gives it away.
        let valgrind = std::env::var("LD_PRELOAD").is_ok_and(|v| v.contains("vgpreload"));
        let ring = if force_threads {
            None
        } else if env_off {
            say_fallback("EDGEHAL_NO_IO_URING=1");
            None
        } else if valgrind {
            say_fallback("running under valgrind");
            None
        } else {
            match IoUring::new(256) {
                Ok(r) => Some(r),
                Err(e) => {
                    say_fallback(&format!("io_uring_setup: {e}"));
                    None
                }
            }
        };
        let Some(ring) = ring else {
            return Ok(Reactor {
                shared,
                backend: Backend::Threads,
                thread: None,
            });
        };
        let wake_file =
            File::from(mem::dup(shared.wake.as_fd()).map_err(|e| Error::io("dup(eventfd)", e))?);
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("edgehal-reactor".into())
            .spawn(move || run_ring(ring, sh, wake_file))
            .map_err(|e| Error::io("spawning the reactor thread", e))?;
        Ok(Reactor {
            shared,
            backend: Backend::IoUring,
            thread: Some(thread),
        })
    }

    /// The process-wide reactor.
    pub fn global() -> Result<&'static Reactor> {
        static R: OnceLock<std::result::Result<Reactor, String>> = OnceLock::new();
        R.get_or_init(|| Reactor::new(false).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Device {
                device: "reactor".into(),
                msg: e.clone(),
            })
    }

    /// The mechanism in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn push(&self, op: Op) -> Result<()> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
        mem::eventfd_signal(self.shared.wake.as_fd())
            .map_err(|e| Error::io("waking the reactor", e))
    }

    /// Call `cb` with the fence's outcome once it signals.
    pub fn watch(&self, fence: &Fence, cb: impl FnOnce(Result<()>) + Send + 'static) -> Result<()> {
        let f = fence.clone();
        let outcome = move || {
            f.poll().unwrap_or_else(|| {
                Err(Error::Device {
                    device: "reactor".into(),
                    msg: "fence eventfd readable but the fence is not signalled".into(),
                })
            })
        };
        match self.backend {
            Backend::Threads => {
                let f = fence.clone();
                std::thread::Builder::new()
                    .name("edgehal-fence-wait".into())
                    .spawn(move || {
                        let r = f.wait(None);
                        cb(r);
                    })
                    .map_err(|e| Error::io("spawning a fence waiter", e))?;
                Ok(())
            }
            Backend::IoUring => {
                let fd = fence.export_eventfd()?;
                self.push(Op::Poll {
                    fd,
                    done: Box::new(move || cb(outcome())),
                })
            }
        }
    }

    /// Read a whole file into a new page-aligned host buffer.
    pub fn read_file(&self, path: &Path) -> Result<Buffer> {
        let what = || path.display().to_string();
        let (f, len) = open_sized(path)?;
        if self.backend == Backend::Threads || len == 0 {
            return read_plain_into(f, len, path);
        }
        let buf = Buffer::alloc(len, &CopyCounter::new())?;
        let lease = buf.write_lease()?;
        let base = lease.ptr() as usize;
        let mut off = 0usize;
        while off < len {
            let n = (len - off).min(1 << 30) as u32;
            let (tx, rx) = mpsc::channel();
            self.push(Op::Read {
                fd: f.as_raw_fd(),
                ptr: base + off,
                len: n,
                off: off as u64,
                done: tx,
            })?;
            // The lease (and `f`) stay alive until the reactor reports the read complete.
            let r = rx.recv().map_err(|_| Error::Device {
                device: "reactor".into(),
                msg: "reactor stopped during a file read".into(),
            })?;
            if r < 0 {
                return Err(Error::io(
                    format!("io_uring read of {}", what()),
                    std::io::Error::from_raw_os_error(-r),
                ));
            }
            if r == 0 {
                return Err(Error::arg(format!(
                    "{}: file ended at {off} of {len} bytes (changed while reading?)",
                    what()
                )));
            }
            off += r as usize;
        }
        drop(lease);
        Ok(buf)
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = mem::eventfd_signal(self.shared.wake.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const WAKE: u64 = 0;

fn run_ring(mut ring: IoUring, sh: Arc<Shared>, mut wake_file: File) {
    let mut pending: HashMap<u64, Op> = HashMap::new();
    let mut next: u64 = 1;
    let mut reads = 0usize;
    let poll_in = libc::POLLIN as u32;
    let wake_poll = opcode::PollAdd::new(types::Fd(sh.wake.as_raw_fd()), poll_in)
        .build()
        .user_data(WAKE);
    let mut staged: Vec<squeue::Entry> = vec![wake_poll.clone()];
    loop {
        let ops: Vec<Op> = std::mem::take(&mut *sh.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for op in ops {
            let token = next;
            next += 1;
            let e = match &op {
                Op::Poll { fd, .. } => {
                    opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), poll_in).build()
                }
                Op::Read {
                    fd, ptr, len, off, ..
                } => {
                    reads += 1;
                    opcode::Read::new(types::Fd(*fd), *ptr as *mut u8, *len)
                        .offset(*off)
                        .build()
                }
            };
            staged.push(e.user_data(token));
            pending.insert(token, op);
        }
        while !staged.is_empty() {
            let mut sq = ring.submission();
            let mut pushed = 0;
            for e in &staged {
                // SAFETY: every entry names memory that outlives the operation: poll entries
                // only an fd that `pending` keeps open until the completion; read entries a
                // buffer whose write lease (and file) the reading thread holds until it gets
                // the completion through the channel, and the reactor never drops a pending
                // read before its completion (it stops only with no reads in flight).
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                pushed += 1;
            }
            drop(sq);
            staged.drain(..pushed);
            if !staged.is_empty() && ring.submit().is_err() {
                break;
            }
        }
        if sh.stop.load(Ordering::SeqCst) && reads == 0 {
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("edgehal: reactor: io_uring_enter failed: {e}");
                return;
            }
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            if token == WAKE {
                let mut b = [0u8; 8];
                let _ = wake_file.read(&mut b);
                staged.push(wake_poll.clone());
                continue;
            }
            match pending.remove(&token) {
                Some(Op::Poll { fd, done }) => {
                    drop(fd);
                    done();
                }
                Some(Op::Read { done, .. }) => {
                    reads -= 1;
                    let _ = done.send(res);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_file(tag: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "edgehal-reactor-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&p, data).unwrap();
        p
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i.wrapping_mul(7) ^ (i >> 8)) as u8)
            .collect()
    }

    #[test]
    fn load_file_reads_into_page_aligned_memory_or_maps() {
        let data = pattern(3 * 4096 + 123);
        let p = temp_file("load", &data);
        let r = load_file(&p, FileLoad::Read).unwrap();
        assert_eq!(&r[..], &data[..]);
        assert_eq!(r.as_ptr() as usize % 4096, 0, "read buffer is page-aligned");
        // A slice is the same memory, not a copy.
        assert_eq!(
            r.slice(4096..4100).as_ptr() as usize,
            r.as_ptr() as usize + 4096
        );
        let m = load_file(&p, FileLoad::Map).unwrap();
        assert_eq!(&m[..], &data[..]);
        assert_ne!(m.as_ptr(), r.as_ptr());
        // The thread fallback reads the same bytes into the same kind of buffer.
        let t = Reactor::new(true).unwrap();
        assert_eq!(t.backend(), Backend::Threads);
        let b = t.read_file(&p).unwrap();
        assert_eq!(b.to_vec().unwrap(), data);
        assert_eq!(b.addr() % 4096, 0);
        let e = temp_file("empty", b"");
        assert!(load_file(&e, FileLoad::Read).unwrap().is_empty());
        let missing = p.with_extension("missing");
        let msg = load_file(&missing, FileLoad::Read).unwrap_err().to_string();
        assert!(msg.contains("missing"), "{msg}");
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&e);
    }

    const CHILD: &str = "EDGEHAL_REACTOR_TEST_CHILD";
    const NAME: &str = "reactor::tests::without_io_uring_files_are_read_with_read2_said_once";

    /// Runs itself again in a child process with `EDGEHAL_NO_IO_URING=1` (the process-wide
    /// reactor is chosen once per process); the child loads files and reports.
    #[test]
    fn without_io_uring_files_are_read_with_read2_said_once() {
        if std::env::var_os(CHILD).is_some() {
            let r = Reactor::global().unwrap();
            assert_eq!(r.backend(), Backend::Threads);
            for k in 0..3 {
                let data = pattern(5000 + k);
                let p = temp_file(&format!("child{k}"), &data);
                let b = load_file(&p, FileLoad::Read).unwrap();
                assert_eq!(&b[..], &data[..]);
                assert_eq!(b.as_ptr() as usize % 4096, 0);
                let _ = std::fs::remove_file(&p);
            }
            println!("child: backend {:?}, 3 files read", r.backend());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("EDGEHAL_NO_IO_URING", "1")
            .env(CHILD, "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{err}");
        assert!(
            stdout.contains("child: backend Threads, 3 files read"),
            "{stdout}"
        );
        let said = "io_uring unavailable: EDGEHAL_NO_IO_URING=1, using read(2)";
        assert_eq!(err.matches(said).count(), 1, "{err}");
    }
}
