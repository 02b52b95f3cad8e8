//! The `flotilla` command line: train, check configs, run benchmarks.

mod bench;
mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
