//! `flotilla ckpt inspect|verify`: look into checkpoints on the local filesystem. A path is a
//! step directory (`…/checkpoints/step-00000042`) or a checkpoint root (`…/checkpoints`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use flotilla_ckpt::format::{self, read_shard_header, step_dir};
use flotilla_ckpt::{CheckpointEngine, VerifyReport};
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
}

pub fn run(cmd: CkptCmd) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cmd {
        CkptCmd::Inspect { path } => rt.block_on(inspect(&path)),
        CkptCmd::Verify { path } => rt.block_on(verify(&path)),
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
