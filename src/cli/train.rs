//! `flotilla train`: run a training job in this process, with a progress bar.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use flotilla_actors::{ResumeFrom, StepRecord};
use flotilla_runtime::clock::{Clock, RealClock, VirtualClock};
use flotilla_runtime::config::{Config, DeviceKind};
use flotilla_runtime::storage::local::LocalStorage;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// Job config (TOML); the built-in default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimizer steps (overrides `job.steps`).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Output directory for metrics.jsonl, events.jsonl, summary.json (overrides `job.out_dir`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint: `latest` (of the job's `checkpoint.dir`), a step number, or a
    /// path (a `step-…` directory or a checkpoint root).
    #[arg(long)]
    pub resume: Option<String>,
    /// No progress bar (the summary is still printed).
    #[arg(long)]
    pub quiet: bool,
}

/// Load the config named on the command line (or the default) and apply the overrides.
pub fn job_config(args: &TrainArgs) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Config::default(),
    };
    if let Some(steps) = args.steps {
        cfg.job.steps = steps;
        if cfg.optimizer.warmup_steps > steps {
            eprintln!(
                "note: --steps {steps} is shorter than optimizer.warmup_steps = {}; warming up over all {steps} steps",
                cfg.optimizer.warmup_steps
            );
            cfg.optimizer.warmup_steps = steps;
        }
    }
    if let Some(out) = &args.out {
        cfg.job.out_dir = out.clone();
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cfg)
}

/// The runtime and clock of the world the config names: the simulated cluster runs on one
/// thread with tokio's clock paused (virtual time, which advances when every actor waits), so
/// that a run is deterministic; the others on a multi-threaded runtime and the wall clock.
pub fn runtime_for(cfg: &Config) -> Result<(tokio::runtime::Runtime, Arc<dyn Clock>)> {
    if cfg.cluster.device == DeviceKind::Sim {
        // Timers only, unless the Prometheus exporter needs sockets: without an I/O driver an
        // idle runtime advances its paused clock without a system call.
        let mut b = tokio::runtime::Builder::new_current_thread();
        b.enable_time();
        if cfg.metrics.prometheus.is_some() {
            b.enable_io();
        }
        let rt = b
            .start_paused(true)
            .build()
            .context("starting the tokio runtime")?;
        Ok((rt, Arc::new(VirtualClock)))
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        Ok((rt, Arc::new(RealClock)))
    }
}

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let cfg = job_config(&args)?;
    let resume = args.resume.as_deref().map(|r| match (r, r.parse::<u64>()) {
        ("latest", _) => ResumeFrom::Latest,
        (_, Ok(step)) => ResumeFrom::Step(step),
        (path, Err(_)) => ResumeFrom::Path(PathBuf::from(path)),
    });
    let (rt, clock) = runtime_for(&cfg)?;
    let out_dir = cfg.job.out_dir.clone();
    let steps = cfg.job.steps;
    // Validation guarantees log_every >= 1; max(1) keeps a config built past it from dividing
    // by zero.
    let log_every = cfg.metrics.log_every.max(1);
    let summary = rt.block_on(async {
        if let Some(addr) = &cfg.metrics.prometheus {
            flotilla_runtime::metrics::install_prometheus(addr)?;
        }
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .context("progress bar template")?,
        );
        // Every `metrics.log_every` steps: one `tracing` line and the progress bar's message.
        // `step` there counts the steps done, as the bar does (metrics.jsonl's is 0-based).
        let mut on_step = |r: &StepRecord| {
            let done = r.stats.step + 1;
            if done.is_multiple_of(log_every) {
                tracing::info!(
                    step = done,
                    loss = r.stats.loss,
                    tokens_per_s = r.tokens_per_s,
                    lr = r.stats.lr,
                    "train step"
                );
                bar.set_message(format!(
                    "loss {:.4}  {:.0} tok/s  lr {:.2e}",
                    r.stats.loss, r.tokens_per_s, r.stats.lr
                ));
            }
            bar.inc(1);
        };
        let storage = Arc::new(LocalStorage::new(out_dir.clone()));
        let s = flotilla_actors::train_from(cfg, storage, clock, resume, &mut on_step).await;
        bar.finish();
        s.map_err(anyhow::Error::from)
    })?;
    print_summary(&summary, &out_dir);
    Ok(ExitCode::SUCCESS)
}

/// The summary lines `train` and `launch` print.
pub fn print_summary(summary: &flotilla_actors::Summary, out_dir: &std::path::Path) {
    if summary.virtual_time {
        // The simulated device computes no values: there is no loss to print, and every time
        // is virtual (the cost model's), not this machine's.
        let per_step = summary.tokens as f64 / summary.steps.max(1) as f64;
        println!(
            "simulated {} steps: {:.4} s per step, {:.0} tokens/s in a step, bubble {:.3}, MFU {}; the run took {:.3} s, checkpoints included (virtual time)",
            summary.steps,
            summary.step_s,
            per_step / summary.step_s.max(f64::MIN_POSITIVE),
            summary.bubble_fraction,
            summary
                .mfu
                .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.3}")),
            summary.seconds
        );
    } else {
        println!(
            "trained {} steps: loss {:.4} -> {:.4} (mean of last 10: {:.4}), {:.0} tokens/s, params_sha256 {}",
            summary.steps,
            summary.first_loss,
            summary.final_loss,
            summary.final_loss_avg10,
            summary.tokens_per_s,
            summary.params_sha256
        );
    }
    println!(
        "wrote {}/{{metrics.jsonl,events.jsonl,summary.json,trace.json}}",
        out_dir.display()
    );
}
