//! The table of live handles.
//!
//! A handle given to C is the address of an `Arc`'d Rust object, recorded here with its kind.
//! Every call looks the address up (and clones the `Arc` under the lock) before touching the
//! object, so:
//! - a NULL, foreign, released (double release included) or wrong-kind handle is answered with
//!   `EDGEHAL_ERR_INVALID_HANDLE` and never dereferenced — valgrind and ASan stay quiet;
//! - a release racing with a call on another thread is safe: the call holds its own `Arc`.
//!
//! The only case that cannot be caught is a stale handle whose address was reused by a new
//! object of the same kind; the header documents use after release as undefined.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::buffer::Buffer;
use crate::fence::Fence;
use crate::runtime::{Device, Runtime};
use crate::session::{ModelObj, SessionObj};
use crate::status::{Fail, FfiResult, EDGEHAL_ERR_INVALID_HANDLE};

/// One live object.
pub(crate) enum Obj {
    Runtime(Arc<Runtime>),
    Device(Arc<Device>),
    Model(Arc<ModelObj>),
    Session(Arc<SessionObj>),
    Buffer(Arc<Buffer>),
    Fence(Arc<Fence>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Runtime(_) => "edgehal_runtime",
            Obj::Device(_) => "edgehal_device",
            Obj::Model(_) => "edgehal_model",
            Obj::Session(_) => "edgehal_session",
            Obj::Buffer(_) => "edgehal_buffer",
            Obj::Fence(_) => "edgehal_fence",
        }
    }
}

/// A Rust object that C sees through an opaque handle type.
pub(crate) trait Handle: Send + Sync + Sized + 'static {
    const KIND: &'static str;
    fn wrap(a: Arc<Self>) -> Obj;
    fn get(o: &Obj) -> Option<&Arc<Self>>;
}

macro_rules! handle_kind {
    ($t:ty, $variant:ident, $name:literal) => {
        impl Handle for $t {
            const KIND: &'static str = $name;
            fn wrap(a: Arc<Self>) -> Obj {
                Obj::$variant(a)
            }
            fn get(o: &Obj) -> Option<&Arc<Self>> {
                match o {
                    Obj::$variant(a) => Some(a),
                    _ => None,
                }
            }
        }
    };
}
handle_kind!(Runtime, Runtime, "edgehal_runtime");
handle_kind!(Device, Device, "edgehal_device");
handle_kind!(ModelObj, Model, "edgehal_model");
handle_kind!(SessionObj, Session, "edgehal_session");
handle_kind!(Buffer, Buffer, "edgehal_buffer");
handle_kind!(Fence, Fence, "edgehal_fence");

/// Live handles by address. A `BTreeMap` (not a `HashMap`) so the table needs no lazy
/// initialisation and holds no interior pointers that leak checkers report as "possibly lost".
static LIVE: Mutex<BTreeMap<usize, Obj>> = Mutex::new(BTreeMap::new());

fn table() -> MutexGuard<'static, BTreeMap<usize, Obj>> {
    // A panic while the lock was held cannot leave the map half-updated (each operation is
    // one insert/remove), so a poisoned lock is still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Record `obj` as live and return its handle.
pub(crate) fn register<T: Handle, C>(obj: Arc<T>) -> *mut C {
    let addr = Arc::as_ptr(&obj) as usize;
    table().insert(addr, T::wrap(obj));
    addr as *mut C
}

fn check<T: Handle>(addr: usize, o: Option<&Obj>, what: &str) -> FfiResult<Arc<T>> {
    match o {
        None => Err(Fail::new(
            EDGEHAL_ERR_INVALID_HANDLE,
            format!(
                "{what}: {addr:#x} is not a live {} (released already, or not from libedgehal)",
                T::KIND
            ),
        )),
        Some(o) => T::get(o).cloned().ok_or_else(|| {
            Fail::new(
                EDGEHAL_ERR_INVALID_HANDLE,
                format!("{what}: expected a {}, got a {}", T::KIND, o.kind()),
            )
        }),
    }
}

/// The object behind a live handle. NULL gives `EDGEHAL_ERR_NULL_ARGUMENT`.
pub(crate) fn lookup<T: Handle, C>(h: *const C, what: &str) -> FfiResult<Arc<T>> {
    if h.is_null() {
        return Err(Fail::null(what));
    }
    let addr = h as usize;
    check(addr, table().get(&addr), what)
}

/// Remove a handle from the table (the release functions). NULL is a no-op (`Ok(None)`).
pub(crate) fn unregister<T: Handle, C>(h: *const C, what: &str) -> FfiResult<Option<Arc<T>>> {
    if h.is_null() {
        return Ok(None);
    }
    let addr = h as usize;
    let (obj, removed) = {
        let mut t = table();
        let obj = check::<T>(addr, t.get(&addr), what)?;
        (obj, t.remove(&addr))
    };
    // Dropped after the lock is released: dropping may release other objects.
    drop(removed);
    Ok(Some(obj))
}

/// Remove a handle that the library itself registered (devices of a runtime).
pub(crate) fn unregister_addr(addr: usize) {
    // Drop outside the lock: dropping may release other objects.
    let removed = table().remove(&addr);
    drop(removed);
}
