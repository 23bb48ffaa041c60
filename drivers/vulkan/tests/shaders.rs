//! The committed SPIR-V is exactly what `glslc` makes of the sources, and valid.

use std::path::{Path, PathBuf};
use std::process::Command;

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/vulkan")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn spirv_matches_sources_and_validates() {
    let dir = kernels_dir();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "comp"))
        .collect();
    sources.sort();
    // Every source is embedded, and every embedded kernel has a source.
    let stems: Vec<String> = sources
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut embedded: Vec<String> = edgehal_vulkan::shaders::ALL
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    embedded.sort();
    assert_eq!(stems, embedded, "kernels/vulkan/*.comp vs shaders::ALL");
    for (name, spv) in edgehal_vulkan::shaders::ALL {
        let on_disk = std::fs::read(dir.join(format!("{name}.spv"))).unwrap();
        assert_eq!(
            &on_disk[..],
            *spv,
            "{name}.spv differs from the embedded copy"
        );
        assert_eq!(&spv[..4], &[0x03, 0x02, 0x23, 0x07], "{name}: not SPIR-V");
    }
    if !have("glslc") {
        println!("SKIP: glslc not installed; committed SPIR-V not recompiled");
        return;
    }
    let out = std::env::temp_dir().join(format!("edgehal-spv-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let spv = out.join(format!("{stem}.spv"));
        // The flags of kernels/vulkan/build.sh.
        let st = Command::new("glslc")
            .args(["--target-env=vulkan1.0", "-O", "-I"])
            .arg(&dir)
            .arg(src)
            .arg("-o")
            .arg(&spv)
            .status()
            .unwrap();
        assert!(st.success(), "glslc failed on {}", src.display());
        let fresh = std::fs::read(&spv).unwrap();
        let committed = std::fs::read(dir.join(format!("{stem}.spv"))).unwrap();
        assert!(
            fresh == committed,
            "{stem}.spv is stale: run kernels/vulkan/build.sh and commit the result"
        );
        if have("spirv-val") {
            let st = Command::new("spirv-val")
                .args(["--target-env", "vulkan1.0"])
                .arg(&spv)
                .status()
                .unwrap();
            assert!(st.success(), "spirv-val rejects {stem}.spv");
        } else {
            println!("SKIP: spirv-val not installed");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}
