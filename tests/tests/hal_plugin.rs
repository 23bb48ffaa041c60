//! The vendor plugin ABI: the C example plugin is compiled with the `cc` crate, discovered
//! through EDGEHAL_DRIVER_PATH, and runs its ops (Mul, Add, Relu) in a graph whose other op
//! (Exp) runs on the CPU device. Plugins with the wrong ABI version or without the entry
//! symbol are refused with a clear message.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use edgehal::plugin::{load_all, load_from_env, plugin_paths, PluginDriver, DRIVER_PATH_ENV};
use edgehal_core::buffer::{page_size, Buffer, CopyCounter, HostPtr, MemoryDomain};
use edgehal_core::driver::{Bindings, Device, Driver, Subgraph, Support, SysRoot, TensorBuffer};
use edgehal_core::graph::{Attr, Dim, Graph, Node, ValueInfo};
use edgehal_core::sys::dl::{BufferKind, Plugin};
use edgehal_core::DType;
use edgehal_cpu::device::CpuDevice;

struct Built {
    good_dir: PathBuf,
    bad_abi: PathBuf,
    no_entry: PathBuf,
}

/// Compile the example plugin three ways, once per test binary.
fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let root = edgehal_tests::repo_root().join("drivers/plugin-example");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugins");
        let build = |dir: &str, file: &str, defines: &[&str]| -> PathBuf {
            let d = out.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            let so = d.join(file);
            let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
            let compiler = cc::Build::new()
                .target(&target)
                .host(&target)
                .opt_level(1)
                .cargo_metadata(false)
                .get_compiler();
            let mut cmd = compiler.to_command();
            cmd.args(["-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-I"])
                .arg(root.join("include"));
            for d in defines {
                cmd.arg(format!("-D{d}"));
            }
            cmd.arg("-o").arg(&so).arg(root.join("example_plugin.c"));
            let st = cmd.status().expect("running the C compiler");
            assert!(st.success(), "compiling the example plugin failed: {cmd:?}");
            so
        };
        let good = build("good", "libedgehal_example.so", &[]);
        Built {
            good_dir: good.parent().unwrap().to_path_buf(),
            bad_abi: build(
                "bad-abi",
                "libedgehal_abi99.so",
                &["EXAMPLE_ABI_VERSION=99"],
            ),
            no_entry: build("no-entry", "libedgehal_noentry.so", &["EXAMPLE_OMIT_ENTRY"]),
        }
    })
}

fn example_driver() -> PluginDriver {
    let mut drivers = load_all(built().good_dir.to_str().unwrap());
    assert_eq!(drivers.len(), 1);
    drivers.remove(0).unwrap()
}

fn example_device() -> Arc<dyn Device> {
    let d = example_driver();
    let infos = d.probe(&SysRoot::live());
    d.open(&infos[0]).unwrap()
}

#[test]
fn discovered_through_edgehal_driver_path() {
    let b = built();
    // The only test in this binary that touches the variable.
    let spec = format!("/nonexistent/dir:{}", b.good_dir.display());
    std::env::set_var(DRIVER_PATH_ENV, &spec);
    let drivers = load_from_env();
    std::env::remove_var(DRIVER_PATH_ENV);
    assert_eq!(drivers.len(), 1);
    let d = drivers.into_iter().next().unwrap().unwrap();
    assert_eq!(d.name(), "example");
    assert_eq!(d.version(), "0.1.0");
    let infos = d.probe(&SysRoot::live());
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].name, "example0");
    assert_eq!(infos[0].driver, "example");
    assert_eq!(
        infos[0].memory_domains,
        vec![MemoryDomain::Host, MemoryDomain::HostImported]
    );
    // Files can be listed directly too, and non-plugins in a directory are skipped.
    let so = b.good_dir.join("libedgehal_example.so");
    assert_eq!(plugin_paths(so.to_str().unwrap()), vec![so]);
}

#[test]
fn wrong_abi_version_is_refused() {
    let e = PluginDriver::load(&built().bad_abi)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("speaks plugin ABI version 99, this edgehal speaks version 1"),
        "{e}"
    );
    assert!(e.contains("libedgehal_abi99.so"), "{e}");
}

#[test]
fn missing_entry_symbol_is_refused() {
    let e = PluginDriver::load(&built().no_entry)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing symbol edgehal_plugin_entry"), "{e}");
    // A file that is not a shared object at all.
    let junk = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-a-plugin.so");
    std::fs::write(&junk, b"hello").unwrap();
    let e = PluginDriver::load(&junk).err().unwrap().to_string();
    assert!(e.contains("cannot load"), "{e}");
    // A directory with good and bad plugins reports each one.
    let spec = format!(
        "{}:{}:{}",
        built().good_dir.display(),
        built().bad_abi.display(),
        built().no_entry.display()
    );
    let r = load_all(&spec);
    assert_eq!(r.len(), 3);
    assert!(r[0].is_ok() && r[1].is_err() && r[2].is_err());
}

fn value(g: &mut Graph, name: &str, shape: &[usize]) -> usize {
    let id = g.value_id(name);
    g.values[id] = ValueInfo {
        name: name.into(),
        dtype: Some(DType::F32),
        shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
    };
    id
}

/// x[2,3] ; a = x * w ; b = Exp(a) ; c = b + x ; y = Relu(c)
fn model() -> Graph {
    let mut g = Graph::new("split");
    let x = value(&mut g, "x", &[2, 3]);
    let w = value(&mut g, "w", &[1]);
    let a = value(&mut g, "a", &[2, 3]);
    let b = value(&mut g, "b", &[2, 3]);
    let c = value(&mut g, "c", &[2, 3]);
    let y = value(&mut g, "y", &[2, 3]);
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.opsets.insert(String::new(), 17);
    g.initializers.insert(
        w,
        edgehal_core::Tensor::from_vec(vec![1], vec![0.5f32]).unwrap(),
    );
    let mk = |op: &str, i: Vec<usize>, o: usize| Node {
        op: op.into(),
        inputs: i.into_iter().map(Some).collect(),
        outputs: vec![Some(o)],
        ..Default::default()
    };
    g.nodes.push(mk("Mul", vec![x, w], a));
    g.nodes.push(mk("Exp", vec![a], b));
    g.nodes.push(mk("Add", vec![b, x], c));
    g.nodes.push(mk("Relu", vec![c], y));
    g
}

const X: [f32; 6] = [-4.0, -1.0, 0.0, 0.5, 1.0, 2.0];

fn expected() -> Vec<f32> {
    X.iter().map(|&x| ((x * 0.5).exp() + x).max(0.0)).collect()
}

fn read_f32(b: &Buffer, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    b.read_into(0, &mut bytes).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn plugin_runs_its_ops_and_the_cpu_the_rest() {
    let plugin = example_device();
    let cpu = CpuDevice::new();
    let g = model();

    // Which device takes each node: the plugin where it says yes, the CPU otherwise.
    let on_plugin: Vec<bool> = g
        .nodes
        .iter()
        .map(|n| plugin.supports(n, &g).is_yes())
        .collect();
    assert_eq!(on_plugin, vec![true, false, true, true]);
    match plugin.supports(&g.nodes[1], &g) {
        Support::No { reason } => assert!(reason.contains("no Exp kernel"), "{reason}"),
        Support::Yes => unreachable!(),
    }
    // Segments in topological order: [Mul] plugin, [Exp] cpu, [Add, Relu] plugin.
    let mut segments: Vec<(bool, Vec<usize>)> = Vec::new();
    for n in g.topo_order().unwrap() {
        match segments.last_mut() {
            Some((dev, nodes)) if *dev == on_plugin[n] => nodes.push(n),
            _ => segments.push((on_plugin[n], vec![n])),
        }
    }
    assert_eq!(segments.len(), 3);

    let counter = CopyCounter::new();
    // The model input is caller memory, imported without a copy.
    let page = page_size();
    let mut raw = vec![0u8; 24 + page];
    let off = raw.as_mut_ptr().align_offset(page);
    for (i, x) in X.iter().enumerate() {
        raw[off + 4 * i..off + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
    // SAFETY: `raw` outlives every buffer made from it (all dropped before the test ends)
    // and is not accessed while they live.
    let xbuf = Buffer::import_host_ptr(
        unsafe { HostPtr::new(raw[off..].as_mut_ptr(), 24) },
        &counter,
    )
    .unwrap();
    // The model output goes into a caller buffer.
    let ybuf = Buffer::alloc(24, &counter).unwrap();

    let mut values: std::collections::HashMap<String, TensorBuffer> = Default::default();
    values.insert(
        "x".into(),
        TensorBuffer::new(xbuf, DType::F32, vec![2, 3]).unwrap(),
    );
    let mut plugin_segments = 0;
    for (is_plugin, nodes) in &segments {
        let sub = Subgraph::extract(&g, nodes).unwrap();
        let dev: &dyn Device = if *is_plugin { plugin.as_ref() } else { &cpu };
        let exe = dev.compile(&sub).unwrap();
        let inputs: Vec<TensorBuffer> = sub
            .input_names()
            .iter()
            .map(|n| values[n].clone())
            .collect();
        let outputs: Vec<Option<TensorBuffer>> = sub
            .output_names()
            .iter()
            .map(|n| {
                (n == "y").then(|| TensorBuffer::new(ybuf.clone(), DType::F32, vec![2, 3]).unwrap())
            })
            .collect();
        let b = Bindings::new(inputs, outputs, &counter);
        dev.submit(exe.as_ref(), &b).unwrap().wait(None).unwrap();
        for (i, n) in sub.output_names().into_iter().enumerate() {
            values.insert(n, b.output(i).unwrap());
        }
        plugin_segments += usize::from(*is_plugin);
    }
    assert_eq!(plugin_segments, 2);
    let got = read_f32(&ybuf, 6);
    let want = expected();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())),
        "{got:?} vs {want:?}"
    );
    // Every hand-over was zero-copy: caller input imported in place, the plugin read and
    // wrote bound memory through pointers, the CPU viewed its input and handed back its
    // output without copying.
    assert_eq!((counter.copies(), counter.bytes()), (0, 0));
    drop(values);
}

#[test]
fn plugin_refuses_what_it_cannot_run() {
    let plugin = example_device();
    let g = model();
    // Exp on the plugin fails at compile, naming the node.
    let sub = Subgraph::extract(&g, &[1]).unwrap();
    let e = plugin.compile(&sub).err().unwrap().to_string();
    assert!(e.contains("Exp") && e.contains("example0"), "{e}");
    // Attributes cannot cross ABI v1.
    let mut n = g.nodes[3].clone();
    n.attrs.insert("alpha".into(), Attr::Float(0.1));
    assert!(
        matches!(plugin.supports(&n, &g), Support::No { reason } if reason.contains("attributes"))
    );
    // Non-float inputs.
    let mut g2 = g.clone();
    g2.values[0].dtype = Some(DType::I64);
    assert!(!plugin.supports(&g2.nodes[0], &g2).is_yes());
}

#[test]
fn plugin_imports_host_buffers_and_refuses_fds() {
    let so = built().good_dir.join("libedgehal_example.so");
    let p = Plugin::load(&so).unwrap();
    assert_eq!(p.device_names(), vec!["example0"]);
    let dev = p.open(0).unwrap();
    let c = CopyCounter::new();
    let b = Buffer::alloc(4096, &c).unwrap();
    let lease = b.write_lease().unwrap();
    let h = dev.import_host(&lease).unwrap();
    drop(h);
    drop(lease);
    let e = dev
        .import_fd(BufferKind::Memfd, b.fd().unwrap(), 4096)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("imports host pointers only"), "{e}");
    assert!(p.open(5).is_err());
}

#[test]
fn plugin_devices_appear_in_the_probe_report() {
    use edgehal_core::probe::{probe, Backend, ProbedDevice};
    let root = SysRoot::live();
    let mut report = probe(&root);
    for info in example_driver().probe(&root) {
        report
            .devices
            .push(ProbedDevice::from_driver_info(&info, Backend::Plugin));
    }
    report.devices.push(ProbedDevice::failed_plugin(
        "libbad.so",
        "speaks plugin ABI version 99",
    ));
    let table = report.to_table();
    assert!(table.contains("Plugin devices"), "{table}");
    assert!(table.contains("example0"), "{table}");
    assert!(
        table.contains("unavailable: speaks plugin ABI version 99"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    let plugin = json["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "example0")
        .unwrap();
    assert_eq!(plugin["driver"], "plugin");
    assert_eq!(plugin["available"], true);
}
