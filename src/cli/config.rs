//! `flotilla config check FILE` and `flotilla config default`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use flotilla_runtime::config::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a config file: exit 0, or exit 1 with one line per problem (key, line, column).
    Check { file: PathBuf },
    /// Print the built-in default config (which `check` accepts).
    Default,
}

pub fn run(cmd: ConfigCmd) -> Result<ExitCode> {
    match cmd {
        ConfigCmd::Check { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(problems) => {
                eprintln!("{problems}");
                Ok(ExitCode::FAILURE)
            }
        },
        ConfigCmd::Default => {
            print!("{}", Config::default().to_toml_string());
            Ok(ExitCode::SUCCESS)
        }
    }
}
