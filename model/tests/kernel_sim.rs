//! The tensor-core kernels' logic on the CPU: `flash.cu` (fused attention) and `gemm.cu` (the
//! experts' grouped GEMM), each behind `tensor_core.cuh` as on the GPU, compiled by the host's C++ compiler against `kernel_sim/warp.h`, which
//! stands in for CUDA threads, warps, `mma.sync`, `ldmatrix` and `cp.async`, and checked against products in
//! double precision. What a GPU adds (timing, a missing wait on a copy in flight) is for
//! `cuda_ops.rs`; this catches wrong indices, masks and tile loops on any machine with `c++`
//! (the test says "skipped" where there is none). Needs no feature.

use std::path::{Path, PathBuf};
use std::process::Command;

const WARP_H: &str = include_str!("kernel_sim/warp.h");
const FLASH_CHECK: &str = include_str!("kernel_sim/flash_check.cpp");
const GEMM_CHECK: &str = include_str!("kernel_sim/gemm_check.cpp");
const TENSOR_CORE: &str = include_str!("../src/device/cuda/tensor_core.cuh");
const FLASH_CU: &str = include_str!("../src/device/cuda/flash.cu");
const GEMM_CU: &str = include_str!("../src/device/cuda/gemm.cu");

/// The C++ compiler, if the machine has one that takes C++20.
fn compiler() -> Option<&'static str> {
    ["c++", "g++", "clang++"].into_iter().find(|cc| {
        Command::new(cc)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `src` with the function that starts at `signature` given `body` instead.
fn replace_function(src: &str, signature: &str, body: &str) -> String {
    let start = src
        .find(signature)
        .unwrap_or_else(|| panic!("no {signature:?} in the kernel source"));
    let open = start + src[start..].find('{').expect("a function body");
    let mut depth = 0;
    let mut end = open;
    for (i, ch) in src[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = open + i + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    format!("{}{signature}{body}{}", &src[..start], &src[end..])
}

/// A kernel source as host C++: the inline PTX replaced by `warp.h`'s stand-ins.
fn for_host(src: &str) -> String {
    let mut s = src.to_owned();
    let stand_ins = [
        (
            "__device__ __forceinline__ void mma(",
            "float* c, const u32* a, u32 b0, u32 b1) { sim_mma(c, a, b0, b1); }",
        ),
        (
            "__device__ __forceinline__ void cp16(",
            "void* smem, const void* global) { memcpy(smem, global, 16); }",
        ),
        (
            "__device__ __forceinline__ void cp16z(",
            "void* smem, const void* global, int bytes) { \
             if (bytes) memcpy(smem, global, 16); else memset(smem, 0, 16); }",
        ),
        (
            "__device__ __forceinline__ u32 pack2(",
            "float lo, float hi) { return sim_bf16_bits(lo) | (sim_bf16_bits(hi) << 16); }",
        ),
        ("__device__ __forceinline__ void cp_commit(", ") {}"),
        (
            "__device__ __forceinline__ u32 smem_addr(",
            "const void*) { return 0; }",
        ),
        (
            "__device__ __forceinline__ void ldsm4(",
            "u32* r, const u16* p) { sim_ldsm4(r, p, false); }",
        ),
        (
            "__device__ __forceinline__ void ldsm4_t(",
            "u32* r, const u16* p) { sim_ldsm4(r, p, true); }",
        ),
        (
            "template <int N> __device__ __forceinline__ void cp_wait(",
            ") {}",
        ),
    ];
    for (signature, body) in stand_ins {
        if s.contains(signature) {
            s = replace_function(&s, signature, body);
        }
    }
    s.replace(
        "extern __shared__ __align__(16) u16 smem[];",
        "u16* smem = g_smem;",
    )
    .replace(
        "extern __shared__ __align__(16) float gsm[];",
        "float* gsm = (float*)g_smem;",
    )
    .replace("extern \"C\" __global__", "__global__")
}

fn scratch_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flotilla-kernel-sim-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("a scratch directory");
    d
}

/// Compiles `main` (with `files` beside it) and runs it with `args`; its stdout.
fn build_and_run(cc: &str, dir: &Path, main: &str, defines: &[String], args: &[&str]) -> String {
    std::fs::write(dir.join("warp.h"), WARP_H).expect("writing warp.h");
    std::fs::write(dir.join("check.cpp"), main).expect("writing the check");
    let exe = dir.join("check");
    let out = Command::new(cc)
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("check.cpp"))
        .args(defines)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .args(args)
        .output()
        .expect("running the check");
    assert!(run.status.success(), "the check failed: {run:?}");
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// Every "name rel <e> nan <n>" line within `tol` and without NaNs; the number of lines.
fn check(output: &str, tol: f64, what: &str) -> usize {
    let mut lines = 0;
    for line in output.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 5, "{what}: unexpected line {line:?}");
        let rel: f64 = f[2].parse().expect("a relative error");
        let nan: usize = f[4].parse().expect("a NaN count");
        eprintln!("{what}: {line}");
        assert!(nan == 0 && rel <= tol, "{what}: {line} (tolerance {tol:e})");
        lines += 1;
    }
    lines
}

/// bf16 operands with f32 accumulation: relative errors of a few 1e-3 (`cuda_ops.rs` allows 2e-2).
const TOL: f64 = 1e-2;

#[test]
fn fused_attention_kernels_match_double_precision_attention() {
    let Some(cc) = compiler() else {
        eprintln!("fused attention kernels: skipped, no C++ compiler");
        return;
    };
    let dir = scratch_dir("flash");
    std::fs::write(
        dir.join("flash_sim.cu"),
        for_host(&format!("{TENSOR_CORE}\n{FLASH_CU}")),
    )
    .expect("writing the kernels");
    // Head dims that need padding to the MMA's 16 with two sequences that end inside a tile,
    // and DeepSeek-V3's own head dims (128 + 64, 128) over more than one key tile.
    for (heads, nope, rope, v, batch, seq) in [(2, 12, 6, 10, 2, 150), (2, 128, 64, 128, 1, 130)] {
        let defines = [
            format!("-DHEADS={heads}"),
            format!("-DNOPE={nope}"),
            format!("-DROPE={rope}"),
            format!("-DDV={v}"),
        ];
        let (b, t) = (batch.to_string(), seq.to_string());
        let out = build_and_run(cc, &dir, FLASH_CHECK, &defines, &[&b, &t]);
        let what = format!("flash heads {heads} dims {nope}+{rope}/{v}, {batch} x {seq}");
        assert_eq!(check(&out, TOL, &what), 4, "{what}: four results");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grouped_gemm_kernel_matches_double_precision_products() {
    let Some(cc) = compiler() else {
        eprintln!("grouped gemm kernel: skipped, no C++ compiler");
        return;
    };
    let dir = scratch_dir("gemm");
    std::fs::write(
        dir.join("gemm_sim.cu"),
        for_host(&format!("{TENSOR_CORE}\n{GEMM_CU}")),
    )
    .expect("writing the kernel");
    let out = build_and_run(cc, &dir, GEMM_CHECK, &[], &[]);
    assert_eq!(check(&out, TOL, "grouped gemm"), 6, "six problems");
    let _ = std::fs::remove_dir_all(&dir);
}
