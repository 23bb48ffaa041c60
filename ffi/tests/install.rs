//! The install step: scripts/install.sh into a temporary prefix, then a C program compiled with
//! `cc app.c $(pkg-config --cflags --libs edgehal)` (PKG_CONFIG_PATH pointing there) and run.

mod common;

use std::process::Command;

use common::*;

#[test]
fn install_then_compile_with_pkg_config() {
    if !ensure_tool("pkg-config", "pkg-config") {
        return;
    }
    let lib = lib_dir();
    // The script builds target/release itself; in the test, reuse what this test's profile
    // built by pointing it at a copy laid out as target/release.
    let work = work_dir("install");
    let fake_target = work.join("target");
    let rel = fake_target.join("release");
    std::fs::create_dir_all(&rel).unwrap();
    for f in ["libedgehal.so", "libedgehal.a"] {
        std::fs::copy(lib.join(f), rel.join(f)).unwrap();
    }
    let prefix = work.join("prefix");
    let _ = std::fs::remove_dir_all(&prefix);
    let out = run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg(&prefix)
            .env("EDGEHAL_SKIP_BUILD", "1")
            .env("CARGO_TARGET_DIR", &fake_target)
            .env_remove("DESTDIR"),
        "scripts/install.sh",
    );
    assert!(out.contains("self-check passed"), "{out}");
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/edgehal.pc")).unwrap();
    assert!(
        pc.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{pc}"
    );
    assert!(pc.contains(&format!("prefix={}", prefix.display())), "{pc}");
    assert!(prefix.join("include/edgehal.h").exists());
    assert!(prefix.join("lib/libedgehal.a").exists());

    // The integrator's own program, built only through pkg-config.
    let app = work.join("app.c");
    std::fs::write(
        &app,
        r#"#include <edgehal.h>
#include <stdio.h>
int main(int argc, char **argv) {
  edgehal_runtime *rt = NULL;
  edgehal_model *m = NULL;
  edgehal_session *s = NULL;
  if (argc != 2 || edgehal_runtime_create(&rt) || edgehal_model_load(rt, argv[1], &m) ||
      edgehal_session_create(m, NULL, &s)) {
    fprintf(stderr, "error: %s\n", edgehal_last_error_message());
    return 1;
  }
  size_t nin = 0, nout = 0;
  edgehal_session_io_count(s, &nin, &nout);
  printf("inputs=%zu outputs=%zu\n", nin, nout);
  edgehal_session_release(s);
  edgehal_model_release(m);
  edgehal_runtime_release(rt);
  return 0;
}
"#,
    )
    .unwrap();
    let pc_path = prefix.join("lib/pkgconfig");
    let flags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "edgehal"])
            .env("PKG_CONFIG_PATH", &pc_path),
        "pkg-config",
    );
    assert!(flags.contains("-ledgehal"), "{flags}");
    let exe = work.join("app");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cc {} -o {} $(pkg-config --cflags --libs edgehal)",
            app.display(),
            exe.display()
        ))
        .env("PKG_CONFIG_PATH", &pc_path)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cc app.c $(pkg-config --cflags --libs edgehal) failed"
    );
    let out = run_ok(
        Command::new(&exe)
            .arg(repo().join("ffi/tests/data/shrink.onnx"))
            .env("LD_LIBRARY_PATH", prefix.join("lib")),
        "app",
    );
    assert_eq!(out.trim(), "inputs=1 outputs=1");

    // The README's C snippet builds through pkg-config and runs (on the stand-in classifier,
    // which has the snippet's [1,3,224,224] input) from a directory holding model.onnx.
    let snippet = readme_snippet();
    let snip_c = work.join("snippet.c");
    std::fs::write(&snip_c, snippet).unwrap();
    let snip = work.join("snippet");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cc -std=c11 -Wall -Wextra -Werror {} -o {} $(pkg-config --cflags --libs edgehal)",
            snip_c.display(),
            snip.display()
        ))
        .env("PKG_CONFIG_PATH", &pc_path)
        .status()
        .unwrap();
    assert!(status.success(), "the README C snippet does not compile");
    std::fs::copy(
        repo().join("ffi/tests/data/standin_classifier.onnx"),
        work.join("model.onnx"),
    )
    .unwrap();
    let out = run_ok(
        Command::new(&snip)
            .current_dir(&work)
            .env("LD_LIBRARY_PATH", prefix.join("lib")),
        "README snippet",
    );
    assert!(out.starts_with("y[0] = "), "{out}");
}

/// The first C block that includes edgehal.h, from README.md once the lead pasted the section
/// there, else from ffi/README-capi.md.
fn readme_snippet() -> String {
    for f in ["README.md", "ffi/README-capi.md"] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap_or_default();
        let mut block = None;
        let mut cur: Option<String> = None;
        for line in text.lines() {
            match (&mut cur, line.trim_end()) {
                (None, "```c") => cur = Some(String::new()),
                (Some(b), "```") => {
                    if b.contains("#include <edgehal.h>") {
                        block = Some(b.clone());
                        break;
                    }
                    cur = None;
                }
                (Some(b), l) => {
                    b.push_str(l);
                    b.push('\n');
                }
                _ => {}
            }
        }
        if let Some(b) = block {
            return b;
        }
    }
    panic!("no C snippet with #include <edgehal.h> in README.md or ffi/README-capi.md");
}
