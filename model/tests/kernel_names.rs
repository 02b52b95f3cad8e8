//! The CUDA device finds its kernels by name: every `extern "C"` kernel of `kernels.cu` and
//! `gemm.cu` must be in `module.rs`'s `NAMES` (the list it loads) and the other way round, and
//! every name the device launches with `run("…")` must be one of them. A GPU run finds a
//! missing name only when the kernel is first launched; this finds it on any machine. Needs no
//! feature: it reads the sources.

use std::collections::BTreeSet;

const MODULE_RS: &str = include_str!("../src/device/cuda/module.rs");
const KERNELS_CU: &str = include_str!("../src/device/cuda/kernels.cu");
const GEMM_CU: &str = include_str!("../src/device/cuda/gemm.cu");
/// Every Rust source of the CUDA device, by file name (read when the test runs, so a new file
/// is scanned too; flash.rs launches its own module's kernels otherwise than by `run`).
fn launchers() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/device/cuda");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let name = p
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&p).expect("a readable source");
            (name, text)
        })
        .collect();
    out.sort();
    out
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The kernels a CUDA C source defines.
fn defined(src: &str) -> BTreeSet<String> {
    src.split("extern \"C\" __global__")
        .skip(1)
        .map(|rest| {
            // `void name(` or `void __launch_bounds__(N) name(`.
            let head = &rest[..rest.find('(').map_or(rest.len(), |i| i)];
            let head = if head.contains("__launch_bounds__") {
                let after = &rest[rest.find(')').expect("launch bounds close") + 1..];
                &after[..after.find('(').expect("a parameter list")]
            } else {
                head
            };
            head.split_whitespace()
                .last()
                .expect("a kernel name")
                .to_owned()
        })
        .collect()
}

/// The names in `module.rs`'s `NAMES`.
fn listed() -> BTreeSet<String> {
    let start = MODULE_RS
        .find("const NAMES: &[&str] = &[")
        .expect("NAMES in module.rs");
    let body = &MODULE_RS[start..start + MODULE_RS[start..].find("];").expect("NAMES' end")];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The string literals right after `run(` in `src` (a launch by name).
fn launched(src: &str) -> Vec<String> {
    src.split("run(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start();
            rest.strip_prefix('"').map(|r| ident(r).to_owned())
        })
        .collect()
}

#[test]
fn every_kernel_is_listed_and_every_listed_name_is_a_kernel() {
    let mut kernels = defined(KERNELS_CU);
    kernels.extend(defined(GEMM_CU));
    assert!(kernels.contains("grouped_gemm_bf16") && kernels.contains("mt_adamw"));
    let names = listed();
    let missing: Vec<_> = kernels.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "kernels not in module.rs's NAMES: {missing:?}"
    );
    let stale: Vec<_> = names.difference(&kernels).collect();
    assert!(stale.is_empty(), "NAMES without a kernel: {stale:?}");
}

#[test]
fn every_kernel_launched_by_name_is_listed() {
    let names = listed();
    let mut seen = 0;
    for (file, src) in launchers() {
        for name in launched(&src) {
            assert!(
                names.contains(&name),
                "{file} launches {name:?}, which NAMES lacks"
            );
            seen += 1;
        }
    }
    assert!(
        seen > 20,
        "only {seen} launches found: the scan no longer matches the code"
    );
}

#[test]
fn the_scan_finds_a_kernel_left_out() {
    let src = "extern \"C\" __global__ void a(int x) {}\nextern \"C\" __global__ void \
               __launch_bounds__(128) b(int y) {}";
    let found = defined(src);
    assert_eq!(found, ["a", "b"].iter().map(|s| s.to_string()).collect());
    assert_eq!(
        launched("self.run(\n  \"combine_rows\",\n cfg)"),
        ["combine_rows"]
    );
}
