//! The C API tests: ffi/tests/c/api_test.c compiled with the system `cc` against the built
//! library and run normally, statically linked, under AddressSanitizer and under valgrind
//! (zero errors, zero definite leaks). A missing tool is installed with apt-get when possible;
//! otherwise the test prints SKIP, or fails when CI=true.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn sources() -> Vec<PathBuf> {
    vec![repo().join("ffi/tests/c/api_test.c")]
}

fn models() -> [PathBuf; 3] {
    let d = repo().join("ffi/tests/data");
    [
        d.join("shrink.onnx"),
        d.join("shrink_dyn.onnx"),
        d.join("matmul.onnx"),
    ]
}

/// `EDGEHAL_DRIVER_PATH` for the C runs: the example plugin (device `example0`) and the same
/// plugin built for ABI version 99, which the device list must show as unavailable.
fn plugin_path() -> String {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let src = repo().join("drivers/plugin-example");
        let build = |dir: &str, defines: &[&str]| -> PathBuf {
            let d = work_dir(dir);
            let so = d.join("libedgehal_example.so");
            let out = Command::new("cc")
                .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I"])
                .arg(src.join("include"))
                .args(defines)
                .arg("-o")
                .arg(&so)
                .arg(src.join("example_plugin.c"))
                .output()
                .expect("run cc");
            assert_built(&out, "example_plugin.c");
            so
        };
        let good = build("plugin-good", &[]);
        let bad = build("plugin-abi99", &["-DEXAMPLE_ABI_VERSION=99"]);
        format!("{}:{}", good.display(), bad.display())
    })
    .clone()
}

fn checks_passed(stdout: &str) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("api_test:"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    assert!(line.ends_with(" 0 failed"), "{line}");
    let n: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n > 200, "only {n} checks ran: {line}");
}

#[test]
fn c_api_plain() {
    let exe = work_dir("plain").join("api_test");
    assert_built(&cc(&sources(), &exe, &[]), "api_test.c");
    let out = run_ok(
        Command::new(&exe)
            .args(models())
            .env("EDGEHAL_DRIVER_PATH", plugin_path()),
        "api_test",
    );
    checks_passed(&out);
}

#[test]
fn c_api_static_library() {
    let exe = work_dir("static").join("api_test");
    let lib = lib_dir();
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-O1",
            "-Wall",
            "-Werror",
        ])
        .arg("-I")
        .arg(repo().join("include"))
        .args(sources())
        .arg("-o")
        .arg(&exe)
        .arg(lib.join("libedgehal.a"))
        .args(["-lpthread", "-ldl", "-lm"])
        .output()
        .expect("run cc");
    assert_built(&out, "api_test.c against libedgehal.a");
    // Without EDGEHAL_DRIVER_PATH: no plugin devices are listed.
    let out = run_ok(
        Command::new(&exe)
            .args(models())
            .env_remove("EDGEHAL_DRIVER_PATH"),
        "api_test (static)",
    );
    checks_passed(&out);
}

#[test]
fn c_api_under_address_sanitizer() {
    let exe = work_dir("asan").join("api_test");
    let built = cc(
        &sources(),
        &exe,
        &["-fsanitize=address", "-fno-omit-frame-pointer"],
    );
    let asan_ok = built.status.success();
    if !asan_ok
        && !ensure(
            || {
                cc(
                    &sources(),
                    &exe,
                    &["-fsanitize=address", "-fno-omit-frame-pointer"],
                )
                .status
                .success()
            },
            "AddressSanitizer runtime",
            "libasan8",
        )
    {
        return;
    }
    let out = run_ok(
        Command::new(&exe)
            .args(models())
            .env("EDGEHAL_DRIVER_PATH", plugin_path())
            .env(
                "ASAN_OPTIONS",
                "detect_leaks=1:abort_on_error=0:exitcode=23",
            ),
        "api_test under ASan",
    );
    checks_passed(&out);
}

#[test]
fn c_api_under_valgrind() {
    if !ensure_tool("valgrind", "valgrind") {
        return;
    }
    let exe = work_dir("valgrind").join("api_test");
    assert_built(&cc(&sources(), &exe, &[]), "api_test.c");
    let out = run_ok(
        Command::new("valgrind")
            .args([
                "-q",
                "--error-exitcode=1",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
            ])
            .arg(&exe)
            .args(models())
            .env("EDGEHAL_DRIVER_PATH", plugin_path()),
        "api_test under valgrind",
    );
    checks_passed(&out);
}
