//! Command-line parsing (clap) and dispatch to one module per command family.

mod bench;
mod ckpt;
mod config;
mod launch;
mod model;
mod schedule;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Flotilla: train DeepSeek-V3-style MoE models as a tree of supervised actors.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about = None)]
pub struct Cli {
    /// What to do; with none, `train` on the built-in default.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (the built-in default when no config is given).
    Train(train::TrainArgs),
    /// Run a job as processes on this machine: the controller, a node agent per host (and
    /// spare), a rank process per rank; failed processes are restarted and the job rolled back.
    Launch(launch::LaunchArgs),
    /// Join a job as a node agent (under srun, torchrun-style variables, or --controller).
    Agent(launch::AgentArgs),
    /// One rank of a job, started by its node agent (not for direct use).
    #[command(hide = true)]
    Rank(launch::RankArgs),
    /// Check or print job config files.
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Pipeline schedules (GPipe, 1F1B, ZB1P, DualPipe, DualPipeV): actions, bubbles, timeline SVG.
    Schedule(schedule::ScheduleArgs),
    /// Inspect or verify checkpoints.
    #[command(subcommand)]
    Ckpt(ckpt::CkptCmd),
    /// Model tools: HF-layout weights in, logits / loss / gradients out.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Benchmarks; each prints JSON lines with a same-run baseline and a final summary line.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// Parse the command line and run it; errors are printed and turn into exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli
        .command
        .unwrap_or(Command::Train(train::TrainArgs::default()))
    {
        Command::Train(t) => train::run(t),
        Command::Launch(l) => launch::run_launch(l),
        Command::Agent(a) => launch::run_agent(a),
        Command::Rank(r) => launch::run_rank(r),
        Command::Config(c) => config::run(c),
        Command::Bench(b) => bench::run(b),
        Command::Model(m) => model::run(m),
        Command::Schedule(s) => schedule::run(s),
        Command::Ckpt(c) => ckpt::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text the previous message already holds
/// (thiserror variants often print their source themselves).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second initialisation (tests) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
