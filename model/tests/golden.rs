//! Golden parity with HuggingFace transformers' DeepseekV3: every folder under
//! `tests/data/golden/` (config.json, model.safetensors, io.safetensors, grads.safetensors) is
//! loaded, run on its batch, and compared: logits and loss within 1e-4 relative (‖a−b‖/‖b‖),
//! every gradient within 1e-3 relative, under HF keys.

use std::path::{Path, PathBuf};

use flotilla_model::hf::{self, HostData, HostTensor};
use flotilla_model::{Batch, CpuDevice, Device, StepOptions};

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 { num } else { num / den }
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("expected a float tensor"),
    }
}

fn i64s(t: &HostTensor) -> &[i64] {
    match &t.data {
        HostData::I64(v) => v,
        HostData::F32(_) => panic!("expected an integer tensor"),
    }
}

fn golden_sets() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden");
    let mut sets: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/data/golden exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    sets.sort();
    sets
}

/// Tolerances: (logits and loss, gradients), relative.
type Tol = (f64, f64);

/// HF parity in f32 (the 1e-4 on logits and loss, 1e-3 on gradients).
const F32_TOL: Tol = (1e-4, 1e-3);

fn check_set(dir: &Path) -> Result<String, String> {
    check_set_on(dir, &CpuDevice::new(2), F32_TOL).0
}

/// Tokens per expert of each MoE layer, as a forward routed them.
type Loads = Vec<(usize, Vec<u64>)>;

/// The set at `dir` on `dev` within `tol`: a summary line (the error's lists what is off), and
/// the routing's expert loads (empty if the forward did not run).
fn check_set_on(dir: &Path, dev: &dyn Device, tol: Tol) -> (Result<String, String>, Loads) {
    let mut loads = Vec::new();
    (run_set(dir, dev, tol, &mut loads), loads)
}

fn run_set(dir: &Path, dev: &dyn Device, tol: Tol, loads: &mut Loads) -> Result<String, String> {
    let model = hf::load(dir, dev).map_err(|e| e.to_string())?;
    let io = hf::read_safetensors(&dir.join("io.safetensors")).map_err(|e| e.to_string())?;
    let grads_ref =
        hf::read_safetensors(&dir.join("grads.safetensors")).map_err(|e| e.to_string())?;
    let ids = &io["input_ids"];
    let (b, t) = (ids.shape[0], ids.shape[1]);
    let batch = Batch {
        input_ids: i64s(ids).iter().map(|&x| x as u32).collect(),
        labels: i64s(&io["labels"]).to_vec(),
        batch: b,
        seq: t,
    };
    let mut grads = model.zero_grads(dev);
    let out = model
        .forward_backward(dev, &batch, &StepOptions::hf_parity(), &mut grads)
        .map_err(|e| e.to_string())?;
    let logits = dev
        .download(out.logits.as_ref().ok_or("no logits")?)
        .ok_or("no values")?;
    let e_logits = rel(&logits, f32s(&io["logits"]));
    let e_loss = rel(&[out.losses.ce], f32s(&io["loss"]));
    let mut failures = Vec::new();
    if e_logits > tol.0 {
        failures.push(format!("logits rel err {e_logits:.2e}"));
    }
    if e_loss > tol.0 {
        failures.push(format!(
            "loss rel err {e_loss:.2e} ({} vs {:?})",
            out.losses.ce,
            f32s(&io["loss"])
        ));
    }
    let ours = grads.trainable();
    let mut worst = (0.0f64, String::new());
    for (key, reference) in &grads_ref {
        let Some(g) = ours.get(key) else {
            failures.push(format!("no gradient for {key}"));
            continue;
        };
        let e = rel(&dev.download(g).ok_or("no values")?, f32s(reference));
        if e > worst.0 {
            worst = (e, key.clone());
        }
        if e > tol.1 {
            failures.push(format!("grad {key} rel err {e:.2e}"));
        }
    }
    for key in ours.keys() {
        if !grads_ref.contains_key(key) {
            failures.push(format!("gradient {key} has no reference"));
        }
    }
    let summary = format!(
        "{}: logits {e_logits:.2e}, loss {e_loss:.2e}, worst grad {:.2e} ({}), {} grads",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        worst.0,
        worst.1,
        grads_ref.len()
    );
    *loads = out
        .loads
        .iter()
        .map(|l| (l.layer, l.counts.clone()))
        .collect();
    if failures.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}\n  {}", failures.join("\n  ")))
    }
}

#[test]
fn golden_parity_with_hf_transformers() {
    let sets = golden_sets();
    assert!(!sets.is_empty(), "no golden sets found");
    let mut errors = Vec::new();
    for dir in &sets {
        match check_set(dir) {
            Ok(s) => println!("ok   {s}"),
            Err(s) => {
                println!("FAIL {s}");
                errors.push(s);
            }
        }
    }
    assert!(
        errors.is_empty(),
        "golden parity failed:\n{}",
        errors.join("\n")
    );
}

/// The same sets on the CUDA device (feature `cuda`; skipped without a GPU): f32 GEMMs within
/// the f32 tolerances, bf16 GEMMs within 2e-2 everywhere.
#[cfg(feature = "cuda")]
#[test]
fn golden_parity_on_cuda() {
    use flotilla_model::device::cuda::{CudaDevice, Precision, device_count};
    if device_count() == 0 {
        eprintln!("golden_parity_on_cuda: skipped, no GPU");
        return;
    }
    let mut errors = Vec::new();
    // Each set's routing in f32, to say where bf16 routes a token elsewhere.
    let mut f32_loads = std::collections::BTreeMap::new();
    for (precision, tol) in [(Precision::Fp32, F32_TOL), (Precision::Bf16, (2e-2, 2e-2))] {
        let dev = CudaDevice::new(0, precision).expect("a CUDA device on GPU 0");
        for dir in &golden_sets() {
            let (r, loads) = check_set_on(dir, &dev, tol);
            let flips = match f32_loads.get(dir) {
                Some(f) if !loads.is_empty() => routing_change(f, &loads),
                _ => String::new(),
            };
            f32_loads.entry(dir.clone()).or_insert(loads);
            match r {
                Ok(s) => println!("ok   {precision:?} {s}"),
                Err(s) => {
                    println!("FAIL {precision:?} {s}");
                    errors.push(format!("{precision:?} {s}"));
                }
            }
            if !flips.is_empty() {
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                println!("     {precision:?} {name}{flips}");
            }
        }
    }
    assert!(
        errors.is_empty(),
        "golden parity on CUDA failed:\n{}",
        errors.join("\n")
    );
}

/// Where `other` routed tokens differently from `base`: ": routing as in f32" or ": routing
/// differs from f32 (layer L: n token-slots moved, …)".
#[cfg(feature = "cuda")]
fn routing_change(base: &Loads, other: &Loads) -> String {
    let diffs: Vec<String> = base
        .iter()
        .zip(other)
        .filter(|(a, b)| a != b)
        .map(|((layer, a), (_, b))| {
            let moved: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).sum::<u64>() / 2;
            format!("layer {layer}: {moved} token-slots moved")
        })
        .collect();
    if diffs.is_empty() {
        ": routing as in f32".into()
    } else {
        format!(": routing differs from f32 ({})", diffs.join(", "))
    }
}
