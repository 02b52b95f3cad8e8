//! `flotilla ckpt inspect|verify|export`: look into checkpoints on the local filesystem, and turn
//! one into a HuggingFace DeepseekV3 folder. A path is a step directory
//! (`…/checkpoints/step-00000042`) or a checkpoint root (`…/checkpoints`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use flotilla_ckpt::format::{self, read_shard_header, step_dir};
use flotilla_ckpt::{CheckpointEngine, HostTensor, VerifyReport, Which};
use flotilla_model::{CpuDevice, DeepSeekV3, Device, ModelConfig};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::local::LocalStorage;

#[derive(Debug, Subcommand)]
pub enum CkptCmd {
    /// Print what a checkpoint holds: step, layout, config hash, files, tensors, training state.
    Inspect {
        /// A step directory, or a checkpoint root (its latest step).
        path: PathBuf,
    },
    /// Check checkpoints completely (manifest, every shard's size, SHA-256 and tensor list);
    /// exits 1 naming every problem.
    Verify {
        /// A step directory, or a checkpoint root (every step in it).
        path: PathBuf,
    },
    /// Write a checkpoint's model as a HuggingFace DeepseekV3 folder (`config.json` +
    /// `model.safetensors`, f32), loadable by `flotilla model` and Python `transformers`.
    Export {
        /// A step directory, or a checkpoint root (its newest sound checkpoint).
        path: PathBuf,
        /// The folder to write (created if needed).
        #[arg(long)]
        hf: PathBuf,
    },
}

pub fn run(cmd: CkptCmd) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cmd {
        CkptCmd::Inspect { path } => rt.block_on(inspect(&path)),
        CkptCmd::Verify { path } => rt.block_on(verify(&path)),
        CkptCmd::Export { path, hf } => rt.block_on(export(&path, &hf)),
    }
}

/// The storage holding the checkpoints at `path`, and the step `path` names, if it names one.
fn locate(path: &Path) -> Result<(Arc<LocalStorage>, Option<u64>)> {
    if !path.is_dir() {
        bail!("{}: not a directory", path.display());
    }
    let step = path
        .file_name()
        .and_then(|n| format::parse_step_dir(&n.to_string_lossy()));
    match (step, path.parent()) {
        (Some(s), Some(parent)) => Ok((Arc::new(LocalStorage::new(parent)), Some(s))),
        _ => Ok((Arc::new(LocalStorage::new(path)), None)),
    }
}

async fn inspect(path: &Path) -> Result<ExitCode> {
    let (storage, step) = locate(path)?;
    let engine = CheckpointEngine::new(storage.clone(), 1);
    let step = match step {
        Some(s) => s,
        None => engine
            .latest()
            .await?
            .with_context(|| format!("{}: no committed checkpoint", path.display()))?,
    };
    let m = engine.manifest(step).await?;
    let l = &m.layout;
    println!("{} ({})", step_dir(step), path.display());
    println!(
        "  format {}, step {}, config {}, layout: {} ranks (pp {}, ep {}, dp {})",
        m.format_version, m.step, m.config_hash, l.world_size, l.pp, l.ep, l.dp
    );
    let optim = m.tensors.keys().filter(|k| k.starts_with("optim.")).count();
    let values: usize = m
        .tensors
        .values()
        .filter_map(|p| p.first())
        .map(|p| p.global_shape.iter().product::<usize>())
        .sum();
    println!(
        "  tensors: {} ({} model, {} optimizer), {values} values",
        m.tensors.len(),
        m.tensors.len() - optim,
        optim
    );
    for (name, f) in &m.files {
        println!(
            "  {name}: rank {}, {} bytes, sha256 {}",
            f.rank, f.bytes, f.sha256
        );
        let bytes = storage.get(&format!("{}/{name}", step_dir(step))).await?;
        let h = read_shard_header(&bytes).with_context(|| name.clone())?;
        let s = &h.state;
        let cursor = s.cursor().map_or_else(
            || "undecodable".to_string(),
            |c| {
                format!(
                    "epoch {} position {} ({} batches served)",
                    c.epoch, c.position, c.steps
                )
            },
        );
        println!(
            "    step {}, schedule step {}, AdamW steps {}, data {cursor}, rng {}",
            s.step,
            s.schedule_step,
            s.optim_steps,
            if s.rng.is_some() { "saved" } else { "none" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(path: &Path) -> Result<ExitCode> {
    let (storage, step) = locate(path)?;
    let engine = CheckpointEngine::new(storage, 1);
    let reports: Vec<VerifyReport> = match step {
        Some(s) => vec![engine.verify(s).await?],
        None => engine.verify_all().await?,
    };
    if reports.is_empty() {
        bail!("{}: no checkpoints", path.display());
    }
    let mut bad = 0;
    for r in &reports {
        if r.ok() {
            println!("ok    {}", step_dir(r.step));
        }
        for p in &r.problems {
            bad += 1;
            println!("FAIL  {p}");
        }
    }
    if bad > 0 {
        eprintln!("{bad} problem(s) in {}", path.display());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn export(path: &Path, out: &Path) -> Result<ExitCode> {
    let (storage, step) = locate(path)?;
    let engine = CheckpointEngine::new(storage, 1);
    let loaded = match step {
        Some(s) => engine.load(Which::Step(s), true).await?,
        None => engine.load_latest_valid(true).await?,
    };
    for f in &loaded.fallbacks {
        eprintln!("note: {f}");
    }
    let dir = step_dir(loaded.step);
    let text = loaded
        .snapshots
        .iter()
        .find_map(|s| s.model_config.clone())
        .with_context(|| {
            format!(
                "{} ({dir}): the checkpoint records no model config (it was written by an older \
                 flotilla); resume it with this build and checkpoint again to export it",
                path.display()
            )
        })?;
    let cfg = ModelConfig::from_json(&text)
        .map_err(|e| anyhow::anyhow!("{dir}: the recorded model config: {e}"))?;
    // Every rank's parameters; a tensor held by several ranks (a replica) is taken from the
    // lowest. Pieces are whole tensors in this format version.
    let mut params: BTreeMap<&str, &HostTensor> = BTreeMap::new();
    for s in &loaded.snapshots {
        for (name, t) in &s.params {
            params.entry(name.as_str()).or_insert(t);
        }
    }
    let dev = CpuDevice::new(1);
    let mut model = DeepSeekV3::init(&cfg, &dev, 0)
        .map_err(|e| anyhow::anyhow!("{dir}: the recorded model config: {e}"))?;
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    model.weights_visit_mut(&mut |key, t| match params.get(key) {
        None => problems.push(format!("`{key}` is missing")),
        Some(h) if h.shape() != t.shape() => problems.push(format!(
            "`{key}` has shape {:?}, the model config says {:?}",
            h.shape(),
            t.shape()
        )),
        Some(h) => {
            *t = dev.upload(h.shape(), h.data());
            used.insert(key.to_string());
        }
    });
    problems.extend(
        params
            .keys()
            .filter(|k| !used.contains(**k))
            .map(|k| format!("`{k}` is not a parameter of the model")),
    );
    if !problems.is_empty() {
        bail!(
            "{} ({dir}) does not fit its model config: {}",
            path.display(),
            problems.join("; ")
        );
    }
    flotilla_model::hf::save(&model, &dev, out, None)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "exported {dir} ({} tensors) to {}/{{config.json,model.safetensors}}",
        used.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
