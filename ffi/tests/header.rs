//! include/edgehal.h is generated from ffi/src by cbindgen and checked in. This test generates
//! it again and fails when the checked-in file differs. To regenerate after changing the API:
//!
//!     EDGEHAL_BLESS=1 cargo test -p edgehal-ffi --test header

use std::path::PathBuf;

#[test]
fn checked_in_header_matches_the_source() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../include/edgehal.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("ffi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("header is UTF-8");

    if std::env::var_os("EDGEHAL_BLESS").is_some() {
        std::fs::create_dir_all(header.parent().unwrap()).unwrap();
        std::fs::write(&header, &fresh).unwrap();
        eprintln!("wrote {}", header.display());
        return;
    }
    let old = std::fs::read_to_string(&header).unwrap_or_default();
    if old != fresh {
        let first = old
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(old.lines().count().min(fresh.lines().count()));
        panic!(
            "include/edgehal.h is out of date with ffi/src (first difference at line {}:\n  \
             checked in: {:?}\n  generated:  {:?}).\nRegenerate it with\n  \
             EDGEHAL_BLESS=1 cargo test -p edgehal-ffi --test header\nand commit the result.",
            first + 1,
            old.lines().nth(first).unwrap_or("<end of file>"),
            fresh.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../include/edgehal.h"))
            .expect("include/edgehal.h exists");
    for (name, want) in [
        ("EDGEHAL_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("EDGEHAL_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("EDGEHAL_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        let line = format!("#define {name} {want}");
        assert!(header.contains(&line), "header lacks `{line}`");
    }
}
