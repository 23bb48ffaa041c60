//! Helpers for the tests that compile C programs against the built library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// `target/<profile>` of this test binary (it lives in `target/<profile>/deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps")
        .to_path_buf()
}

/// Run `cargo build ARGS` with this test's profile and target directory.
pub fn cargo_build(args: &[&str]) {
    let dir = profile_dir();
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name")
        .to_string();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo())
        .arg("build")
        .args(args)
        .arg("--target-dir")
        .arg(dir.parent().expect("target dir"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `target/<profile>/examples`.
pub fn examples_dir() -> PathBuf {
    profile_dir().join("examples")
}

/// The directory holding `libedgehal.so` and `libedgehal.a`, freshly built with the same
/// profile and target directory as this test (`cargo test` builds no cdylib for integration
/// tests, so this runs `cargo build -p edgehal-ffi`, a no-op when it is up to date).
pub fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cargo_build(&["-p", "edgehal-ffi"]);
        let dir = profile_dir();
        assert!(
            dir.join("libedgehal.so").exists(),
            "no libedgehal.so in {}",
            dir.display()
        );
        dir
    })
}

/// Where the tests put the programs they compile.
pub fn work_dir(name: &str) -> PathBuf {
    let d = profile_dir().join("capi-tests").join(name);
    std::fs::create_dir_all(&d).expect("create test work dir");
    d
}

pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Make sure `tool` (checked by running `tool --version`) is there, installing the Debian
/// package `pkg` with apt-get when it is missing and we are root. Returns false when it is
/// still missing outside CI (the caller prints SKIP); panics when it is missing in CI.
pub fn ensure_tool(tool: &str, pkg: &str) -> bool {
    ensure(|| have(tool, "--version"), tool, pkg)
}

/// As [`ensure_tool`] with a custom check (e.g. "libpng-dev is installed").
pub fn ensure(check: impl Fn() -> bool, what: &str, pkg: &str) -> bool {
    if check() {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && have("apt-get", "--version") {
        let _ = Command::new("apt-get").args(["update", "-qq"]).output();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        if check() {
            return true;
        }
    }
    assert!(
        !in_ci(),
        "{what} is missing (Debian package {pkg}) and CI=true"
    );
    println!("SKIP: {what} is missing (install the Debian package {pkg})");
    false
}

/// Compile C sources into `out` against the header and the shared library.
pub fn cc(sources: &[PathBuf], out: &Path, extra: &[&str]) -> Output {
    let lib = lib_dir();
    let mut cmd = Command::new("cc");
    cmd.args([
        "-std=c11",
        "-D_POSIX_C_SOURCE=200809L",
        "-g",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
    ])
    .arg("-I")
    .arg(repo().join("include"))
    .args(sources)
    .arg("-o")
    .arg(out)
    .args(extra)
    .arg("-L")
    .arg(lib)
    .arg("-ledgehal")
    .arg(format!("-Wl,-rpath,{}", lib.display()))
    .args(["-lpthread", "-lm"]);
    cmd.output().expect("run cc")
}

/// Run `cmd`, panicking with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    print!("{stdout}");
    stdout
}

/// Panic with the compiler's output unless it succeeded.
pub fn assert_built(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "compiling {what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
