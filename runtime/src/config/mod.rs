//! The TOML config schema: defaults, strict parsing, cross-field validation with key paths and line numbers.
//!
//! A Flotilla job is described by one TOML file with the sections `[job] [model] [parallel]
//! [cluster] [supervision] [checkpoint] [sentinel] [data] [optimizer] [metrics]`. Every key is
//! optional (an empty file is [`Config::default`], the tiny built-in CPU job), unknown keys are
//! errors, and one parse reports *all* problems, each as `FILE:LINE:COL: key.path: message`.
//!
//! # How parsing works
//!
//! [`Config::from_toml_str`] runs four passes, each adding to one list of problems:
//! 1. `toml_edit` parses the text into a [`toml_edit::Document`], which keeps byte spans (a
//!    syntax error ends here: TOML cannot be parsed past it);
//! 2. `walk.rs` checks every key against the schema table in `schema.rs` (unknown sections and
//!    keys, wrong types, integers that do not fit), and marks the bad keys for removal;
//! 3. the bad keys are removed and the rest is deserialized by serde into [`Config`] (a removed
//!    key takes its default);
//! 4. `validate.rs` checks value ranges and cross-field rules, blaming the key (and line) each
//!    rule reads, and skipping rules that read a key already reported in pass 2.
//!
//! # Files
//! - `enums.rs`: the string choices (`Schedule`, `DeviceKind`, ...);
//! - `model.rs`, `sections.rs`: the section structs and their defaults;
//! - `schema.rs`: the schema table; `emit.rs`: the commented printer behind
//!   [`Config::to_toml_string`];
//! - `walk.rs`: pass 2; `validate.rs` (with `validate/parallel.rs`): pass 4; `error.rs`: problems
//!   and positions.

mod emit;
mod enums;
mod error;
mod model;
mod schema;
mod sections;
mod validate;
mod walk;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_rules;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use enums::{
    CheckpointMode, DataFormat, DeviceKind, FabricKind, LrSchedule, Precision, RopeScalingKind,
    Schedule, StartOrder, UnknownVariant,
};
pub use error::{ConfigErrors, ConfigProblem, LoadError};
pub use model::{ModelSection, RopeScaling};
pub use sections::{
    CheckpointConfig, ClusterConfig, DataConfig, JobConfig, MetricsConfig, OptimizerConfig,
    ParallelConfig, SentinelConfig, SimConfig, SupervisionConfig,
};

use error::{LineIndex, problem};

/// The origin name used for configs that did not come from a file.
pub const NO_ORIGIN: &str = "<config>";

/// A whole job's configuration. `Config::default()` is the built-in tiny CPU job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[job]`
    pub job: JobConfig,
    /// `[model]`
    pub model: ModelSection,
    /// `[parallel]`
    pub parallel: ParallelConfig,
    /// `[cluster]`
    pub cluster: ClusterConfig,
    /// `[supervision]`
    pub supervision: SupervisionConfig,
    /// `[checkpoint]`
    pub checkpoint: CheckpointConfig,
    /// `[sentinel]`: absent by default (no sentinel); see [`SentinelConfig`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelConfig>,
    /// `[data]`
    pub data: DataConfig,
    /// `[optimizer]`
    pub optimizer: OptimizerConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
}

impl Config {
    /// Parses and validates TOML text. `origin` names the text in error messages (usually the
    /// file path). On failure every problem found is returned, not just the first.
    pub fn from_toml_str(src: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let (config, walk) = Config::parse_unchecked(src, origin)?;
        let mut checker = validate::Checker::new(Some(&walk));
        validate::check(&config, &mut checker);
        let rule_problems = checker.into_problems();
        let mut problems = walk.problems;
        problems.extend(rule_problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors::new(origin, problems))
        }
    }

    /// Passes 1 to 3 of [`Config::from_toml_str`]: syntax, schema walk and serde, without the
    /// rules. The walk's problems are in [`walk::Walk::problems`]; only a syntax error (or the
    /// internal schema/serde disagreement) is an `Err`.
    pub(crate) fn parse_unchecked(
        src: &str,
        origin: &str,
    ) -> Result<(Config, walk::Walk), ConfigErrors> {
        let lines = LineIndex::new(src);
        let doc = match toml_edit::Document::parse(src) {
            Ok(doc) => doc,
            Err(e) => {
                let pos = lines
                    .span_pos(e.span())
                    .unwrap_or(error::Pos { line: 1, column: 1 });
                let message = format!("invalid TOML: {}", e.message().trim());
                return Err(ConfigErrors::new(
                    origin,
                    vec![problem(pos, "(syntax)", message)],
                ));
            }
        };
        let walk = walk::walk(doc.as_table(), &lines);
        let mut doc = doc.into_mut();
        for path in &walk.removals {
            walk::remove_path(doc.as_table_mut(), path);
        }
        match toml_edit::de::from_document::<Config>(doc) {
            Ok(config) => Ok((config, walk)),
            Err(e) => {
                // Unreachable while schema.rs agrees with the structs (a test checks that); kept
                // as a reported problem rather than a panic.
                let pos = lines
                    .span_pos(e.span())
                    .unwrap_or(error::Pos { line: 1, column: 1 });
                let message = format!(
                    "internal: schema accepted what serde rejected: {}",
                    e.message()
                );
                let mut problems = walk.problems;
                problems.push(problem(pos, "(config)", message));
                Err(ConfigErrors::new(origin, problems))
            }
        }
    }

    /// Reads and parses the config file at `path` (its path is the origin in messages).
    pub fn load(path: impl AsRef<Path>) -> Result<Config, LoadError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: PathBuf::from(path),
            source,
        })?;
        Ok(Config::from_toml_str(&src, &path.display().to_string())?)
    }

    /// Checks value ranges and cross-field rules of a config built in code. Problems have no
    /// position (line and column 0) and the origin [`NO_ORIGIN`].
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut checker = validate::Checker::new(None);
        validate::check(self, &mut checker);
        let problems = checker.into_problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors::new(NO_ORIGIN, problems))
        }
    }

    /// The effective config as commented TOML, every section and key in schema order; optional
    /// keys that are unset appear commented out. This is what `flotilla config default` prints
    /// and what `configs/default.toml` holds; [`Config::from_toml_str`] reads it back equal.
    pub fn to_toml_string(&self) -> String {
        emit::emit(&to_table(self), &to_table(&Config::example_full()))
    }

    /// The canonical TOML of the config: serde order, no comments, unset optional keys omitted.
    /// Equal configs give equal text, however their files were written.
    pub fn canonical_toml(&self) -> String {
        // Serializing plain structs of numbers, strings and tables to TOML cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// A stable 64-bit FNV-1a hash of [`Config::canonical_toml`], for checkpoint manifests (to
    /// notice a resume under a different config). Stable across runs, hosts and processes.
    pub fn hash(&self) -> u64 {
        fnv1a64(self.canonical_toml().as_bytes())
    }

    /// [`Config::hash`] as 16 lower-case hex digits.
    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash())
    }

    /// Ranks in the job: `cluster.hosts × cluster.ranks_per_host`.
    pub fn world_size(&self) -> usize {
        self.cluster.world_size()
    }

    /// The data-order seed: `data.seed`, else `job.seed`.
    pub fn data_seed(&self) -> u64 {
        self.data.seed.unwrap_or(self.job.seed)
    }

    /// The default config with every optional key set to an example value. `to_toml_string`
    /// shows these values, commented out, for unset keys; tests use it to check the schema.
    /// It sets the keys that are not supported yet too, and bf16 beside the simulated device,
    /// so it does not pass validation.
    pub(crate) fn example_full() -> Config {
        let mut c = Config::default();
        c.model.hf_dir = Some(PathBuf::from("path/to/hf-model"));
        c.model.rope_scaling = Some(RopeScaling {
            original_max_position_embeddings: Some(c.model.max_position_embeddings),
            ..RopeScaling::default()
        });
        // bf16 needs device = "cuda", which the [cluster.sim] example below cannot have.
        c.model.precision = enums::Precision::Bf16;
        c.parallel.stage_layers = vec![c.model.num_hidden_layers];
        c.parallel.sub_batches = 2;
        c.parallel.start_order = enums::StartOrder::List;
        c.cluster.listen = Some("0.0.0.0:47000".to_owned());
        c.cluster.peers = Some(vec![
            "10.0.0.1:47000".to_owned(),
            "10.0.0.2:47000".to_owned(),
        ]);
        c.cluster.cpu_threads = Some(2);
        c.cluster.spares = 1;
        // [cluster.sim] is read only by the simulated cluster.
        c.cluster.device = enums::DeviceKind::Sim;
        c.cluster.fabric = enums::FabricKind::Sim;
        c.cluster.sim = Some(SimConfig::default());
        c.supervision.heartbeat_ms = Some(1000);
        c.supervision.heartbeat_misses = Some(2);
        c.supervision.watchdog_factor = Some(10.0);
        c.sentinel = Some(SentinelConfig::default());
        c.data.seed = Some(c.job.seed);
        c.metrics.prometheus = Some("127.0.0.1:9090".to_owned());
        c
    }
}

/// Serializes a config into a TOML table (empty on the impossible failure).
fn to_table(config: &Config) -> toml::Table {
    toml::Table::try_from(config).unwrap_or_default()
}

/// 64-bit FNV-1a.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}
