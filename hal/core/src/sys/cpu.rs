//! Raw CPU identification: CPUID and XGETBV on x86_64, `getauxval` on aarch64, and the
//! `arch_prctl` calls that grant AMX tile state on Linux x86_64.
//!
//! These read the *running* machine. The probe module calls them only when probing the live
//! root `/`; fixture trees substitute `/proc/cpuinfo` flags and `edgehal-fixture/auxv`.
//! Trust model: the CPU and kernel are trusted to implement CPUID/XGETBV/auxv as documented;
//! every instruction is only executed after the CPUID bits that make it legal were checked.

/// The four registers returned by one CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Execute `CPUID` with `leaf`/`subleaf`. Callers check the maximum leaf (leaf 0 `eax`, or
/// `0x8000_0000` `eax` for extended leaves) first; out-of-range leaves return unspecified data.
#[cfg(target_arch = "x86_64")]
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    // `__cpuid_count` became a safe function in Rust 1.87; the block keeps the crate building on
    // older toolchains (rust-version 1.80), hence the allow.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU (it is part of the x86_64 baseline) and has
    // no side effects beyond writing the four registers.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Read XCR0 (the OS-enabled XSAVE state components), or `None` when the CPU or OS does not
/// support XGETBV (CPUID.1:ECX.XSAVE[26] and OSXSAVE[27] must both be set).
#[cfg(target_arch = "x86_64")]
pub fn xcr0() -> Option<u64> {
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf < 1 {
        return None;
    }
    let ecx = cpuid(1, 0).ecx;
    let xsave = ecx & (1 << 26) != 0;
    let osxsave = ecx & (1 << 27) != 0;
    if !(xsave && osxsave) {
        return None;
    }
    // SAFETY: XGETBV is legal exactly when CPUID reports XSAVE and OSXSAVE (Intel SDM, XGETBV
    // "#UD if CR4.OSXSAVE = 0"), which was checked just above; `read_xcr0` has no other
    // requirement.
    Some(unsafe { read_xcr0() })
}

/// # Safety
///
/// The caller must have checked that CPUID.1:ECX reports both XSAVE (bit 26) and OSXSAVE
/// (bit 27); otherwise XGETBV raises #UD (SIGILL).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn read_xcr0() -> u64 {
    // SAFETY: guaranteed by this function's contract (XSAVE and OSXSAVE are present); ECX = 0
    // selects XCR0, which always exists when XGETBV is enabled.
    unsafe { core::arch::x86_64::_xgetbv(0) }
}

/// Linux `arch_prctl` codes for dynamically enabled XSTATE (Documentation/arch/x86/xstate.rst).
#[cfg(target_arch = "x86_64")]
const ARCH_GET_XCOMP_SUPP: libc::c_long = 0x1021;
#[cfg(target_arch = "x86_64")]
const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
#[cfg(target_arch = "x86_64")]
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
/// XSTATE component numbers of the AMX tile configuration and tile data.
#[cfg(target_arch = "x86_64")]
const XFEATURE_XTILECFG: u32 = 17;
#[cfg(target_arch = "x86_64")]
const XFEATURE_XTILEDATA: u32 = 18;

/// Outcome of asking Linux for permission to use AMX tile data in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmxPermission {
    /// The kernel granted (or had already granted) XTILEDATA to this process.
    Granted,
    /// The kernel refused or does not know the request; the string says what it answered.
    Denied(String),
}

/// Ask Linux for AMX (XTILEDATA) permission for this process, the way every AMX user must
/// before its first tile instruction (without it the first AMX instruction gets SIGILL).
/// Permission is per process, inherited by fork and cleared on exec. Returns `Granted`
/// immediately if it was already held.
#[cfg(target_arch = "x86_64")]
pub fn request_amx_permission() -> AmxPermission {
    let want = (1u64 << XFEATURE_XTILECFG) | (1u64 << XFEATURE_XTILEDATA);
    let mut supp: u64 = 0;
    // SAFETY: ARCH_GET_XCOMP_SUPP writes one u64 through the pointer, which points at a live,
    // writable, properly aligned local. Unknown codes fail with EINVAL and write nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_SUPP,
            &mut supp as *mut u64,
        )
    };
    if rc != 0 {
        return AmxPermission::Denied(format!(
            "arch_prctl(ARCH_GET_XCOMP_SUPP) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if supp & want != want {
        return AmxPermission::Denied(format!(
            "kernel does not support AMX tile state (XCOMP_SUPP = {supp:#x})"
        ));
    }
    let mut perm: u64 = 0;
    // SAFETY: as above, one u64 is written to a live local.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut perm as *mut u64,
        )
    };
    if rc == 0 && perm & want == want {
        return AmxPermission::Granted;
    }
    // SAFETY: ARCH_REQ_XCOMP_PERM takes the component number by value and touches no user
    // memory; on success the kernel enlarges this process's signal frame for tile data.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA as libc::c_ulong,
        )
    };
    if rc != 0 {
        return AmxPermission::Denied(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    AmxPermission::Granted
}

/// `(AT_HWCAP, AT_HWCAP2)` of this process from the ELF auxiliary vector.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub fn hwcaps() -> (u64, u64) {
    // SAFETY: getauxval only reads the auxiliary vector the kernel placed in this process;
    // unknown types return 0. It has no preconditions.
    let hwcap = unsafe { libc::getauxval(libc::AT_HWCAP) };
    // SAFETY: as above.
    let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) };
    (hwcap as u64, hwcap2 as u64)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn vendor_string_is_printable() {
        let r = cpuid(0, 0);
        let mut v = Vec::new();
        for reg in [r.ebx, r.edx, r.ecx] {
            v.extend_from_slice(&reg.to_le_bytes());
        }
        assert!(
            v.iter().all(|b| b.is_ascii_graphic() || *b == b' '),
            "{v:?}"
        );
        assert!(r.eax >= 1);
    }

    #[test]
    fn xcr0_has_x87_and_sse_when_present() {
        if let Some(x) = xcr0() {
            // x87 state (bit 0) is always enabled when XSAVE is; SSE (bit 1) on any x86_64 OS.
            assert_eq!(x & 0x3, 0x3, "xcr0 = {x:#x}");
        }
    }
}
