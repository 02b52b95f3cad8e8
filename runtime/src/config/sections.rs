//! The config sections other than `[model]` (which lives in `model.rs`), with their defaults.
//!
//! Each struct is `#[serde(default)]`: a key missing from the file takes the value of the
//! struct's `Default` impl, which is therefore the single place a default is written down.
//! When you add a field, add it to the schema table in `schema.rs` too (a test checks that the
//! two agree) and, if it takes part in a rule, to `validate.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::enums::{
    CheckpointMode, DataFormat, DeviceKind, FabricKind, LrSchedule, Schedule, StartOrder,
};

/// `[job]`: what to run and where its outputs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Job name, recorded in `summary.json`.
    pub name: String,
    /// Master seed: initialisation, data order (unless `data.seed`), dropout-free everything else.
    pub seed: u64,
    /// Optimizer steps to run.
    pub steps: u64,
    /// Run directory (`metrics.jsonl`, `events.jsonl`, `summary.json`).
    pub out_dir: PathBuf,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            name: "flotilla-default".to_owned(),
            seed: 42,
            steps: 200,
            out_dir: PathBuf::from("runs/default"),
        }
    }
}

/// `[parallel]`: how the model and the batch are split across ranks.
///
/// The world (`cluster.hosts × cluster.ranks_per_host`) must equal `pp × ep × dp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Pipeline-parallel degree (ranks per pipeline).
    pub pp: usize,
    /// Expert-parallel degree (routed experts are split across this many ranks).
    pub ep: usize,
    /// Data-parallel degree (replicas of each pipeline/expert shard).
    pub dp: usize,
    /// Pipeline schedule.
    pub schedule: Schedule,
    /// Micro-batches per step per pipeline.
    pub micro_batches: usize,
    /// Each micro-batch runs as this many equal sub-batches: every action of the schedule
    /// becomes one per sub-batch, side by side in the list, so the overlapped executor has more
    /// all-to-alls in flight within the same activation memory (as two-batch overlap does in
    /// inference). 1 (the default) is off; not serialized when 1, so configs without it keep
    /// their canonical text and hash.
    #[serde(skip_serializing_if = "is_one")]
    pub sub_batches: usize,
    /// Node-limited routing: a token's routed experts span at most this many hosts (M).
    pub max_hosts_per_token: usize,
    /// Gradient all-reduce bucket size for data parallelism, in MiB.
    pub dp_bucket_mib: usize,
    /// Decoder layers of each model stage ([`ParallelConfig::stages`] of them), in stage order;
    /// empty means the even split (earlier stages get the extra layers). Not serialized when
    /// empty, so configs without it keep their canonical text and hash.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stage_layers: Vec<usize>,
    /// When a rank may start its list's units (see [`StartOrder`]). Not serialized when
    /// `ready` (the default), so configs without it keep their canonical text and hash.
    #[serde(skip_serializing_if = "is_ready")]
    pub start_order: StartOrder,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            pp: 1,
            ep: 1,
            dp: 1,
            schedule: Schedule::OneFOneB,
            micro_batches: 1,
            sub_batches: 1,
            max_hosts_per_token: 4,
            dp_bucket_mib: 25,
            stage_layers: Vec::new(),
            start_order: StartOrder::Ready,
        }
    }
}

fn is_ready(v: &StartOrder) -> bool {
    *v == StartOrder::Ready
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

impl ParallelConfig {
    /// Sub-batches per step per pipeline: `micro_batches × sub_batches` (saturating).
    pub fn sub_batches_per_step(&self) -> usize {
        self.micro_batches.saturating_mul(self.sub_batches)
    }

    /// Ranks the parallel layout needs: `pp × ep × dp` (saturating).
    pub fn world_size(&self) -> usize {
        self.pp.saturating_mul(self.ep).saturating_mul(self.dp)
    }

    /// Model chunks the pipeline is cut into (`pp`, or `2·pp` for DualPipeV).
    pub fn stages(&self) -> usize {
        self.schedule.stages(self.pp)
    }

    /// The bucket size in bytes.
    pub fn dp_bucket_bytes(&self) -> usize {
        self.dp_bucket_mib.saturating_mul(1 << 20)
    }
}

/// `[cluster]`: the machines, the device and fabric seams, and the simulated cluster's physics.
///
/// Validation refuses `fabric = "quic"`, `listen` and `peers` as not supported yet (the rank processes of `flotilla launch` / `agent` meet over QUIC whatever
/// `fabric` says).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Host processes (node agents).
    pub hosts: usize,
    /// Ranks (GPUs, or CPU workers) per host.
    pub ranks_per_host: usize,
    /// Compute device.
    pub device: DeviceKind,
    /// Byte transport between ranks.
    pub fabric: FabricKind,
    /// This process's listen address (`ip:port`) for the QUIC fabric of a multi-process job
    /// (not supported yet: refused when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Every host's agent address (`host:port`), in host order, for the QUIC fabric of a
    /// multi-process job (not supported yet: refused when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<String>>,
    /// Spare node agents of a multi-process job (`flotilla launch`, `flotilla agent`): they run
    /// no ranks until a host is lost, then take its ranks over. Not serialized when 0, so
    /// configs without it keep their canonical text and hash.
    #[serde(skip_serializing_if = "is_zero")]
    pub spares: usize,
    /// Threads for CPU compute per process; `None` means all available cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// Physics of the simulated cluster (`[cluster.sim]`; only with `device = "sim"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim: Option<SimConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            hosts: 1,
            ranks_per_host: 1,
            device: DeviceKind::Cpu,
            fabric: FabricKind::Inproc,
            listen: None,
            peers: None,
            spares: 0,
            cpu_threads: None,
            sim: None,
        }
    }
}

impl ClusterConfig {
    /// Ranks in the job: `hosts × ranks_per_host` (saturating).
    pub fn world_size(&self) -> usize {
        self.hosts.saturating_mul(self.ranks_per_host)
    }
}

/// `[cluster.sim]`: the cost model of the simulated cluster (defaults: an H800-class node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Inter-host link bandwidth per rank, Gbit/s.
    pub link_gbps: f64,
    /// Inter-host link latency, µs.
    pub link_latency_us: f64,
    /// Intra-host (NVLink) bandwidth per rank, Gbit/s.
    pub intra_host_gbps: f64,
    /// Device compute rate, TFLOP/s.
    pub device_tflops: f64,
    /// Device memory bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// Fixed cost per device operation (kernel launch), µs.
    pub launch_overhead_us: f64,
    /// Aggregate bandwidth of the checkpoint storage, GB/s (every rank's shard shares it).
    pub storage_gbps: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            link_gbps: 400.0,
            link_latency_us: 2.0,
            intra_host_gbps: 900.0,
            device_tflops: 800.0,
            hbm_gbps: 4800.0,
            launch_overhead_us: 5.0,
            storage_gbps: 20.0,
        }
    }
}

/// `[supervision]`: the job supervisor's OTP restart intensity and back-off, and the deadlines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Restarts a supervisor allows within `within_s` before escalating to its parent.
    pub max_restarts: u32,
    /// The restart-intensity window, seconds.
    pub within_s: f64,
    /// First restart back-off, ms (doubles per restart within the intensity window, up to
    /// `backoff_max_ms`); 0 restarts at once.
    pub backoff_ms: u64,
    /// Largest restart back-off, ms.
    pub backoff_max_ms: u64,
    /// How long a supervisor waits for a child to stop before killing it, ms.
    pub shutdown_timeout_ms: u64,
    /// Heartbeat period of the node agents of a multi-process job, ms (`None`: 1000); an agent
    /// that misses `heartbeat_misses` of them is declared lost. A job in one process has no
    /// agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// Heartbeats an agent may miss before it is declared lost (`None`: 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_misses: Option<u32>,
    /// The deadline of every wait on a peer rank, ms: a peer silent for this long is declared
    /// dead.
    pub peer_timeout_ms: u64,
    /// Whole-job rollbacks the controller allows before ending the job.
    pub max_job_restarts: u32,
    /// The hung-step watchdog: a step that takes more than this multiple of the median of the
    /// steps before it (once 3 have run) is declared hung, and the job is rolled back (with
    /// checkpoints on) or ends. `None`: off, a step waits for its peers' deadline. Not
    /// serialized when unset, so configs without it keep their canonical text and hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchdog_factor: Option<f64>,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 3,
            within_s: 60.0,
            backoff_ms: 100,
            backoff_max_ms: 5000,
            shutdown_timeout_ms: 5000,
            heartbeat_ms: None,
            heartbeat_misses: None,
            peer_timeout_ms: 30000,
            max_job_restarts: 10,
            watchdog_factor: None,
        }
    }
}

impl SupervisionConfig {
    /// `within_s` as a duration (0 if validation was skipped and it is not finite/positive).
    pub fn within(&self) -> Duration {
        Duration::try_from_secs_f64(self.within_s).unwrap_or(Duration::ZERO)
    }
    /// `backoff_ms` as a duration.
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.backoff_ms)
    }
    /// `backoff_max_ms` as a duration.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    /// `peer_timeout_ms` as a duration.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
}

/// `[checkpoint]`: when and how snapshots are taken, replicated and kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Steps between checkpoints; 0 turns checkpointing off.
    pub interval: u64,
    /// Blocking or background persistence.
    pub mode: CheckpointMode,
    /// Persisted checkpoints to keep (oldest deleted first).
    pub keep: usize,
    /// Ranks holding each in-memory snapshot, the owner included (1 = owner only, 2 = owner and
    /// one neighbour). At most the world size.
    pub replicas: usize,
    /// Checkpoint directory (relative paths are relative to `job.out_dir`).
    pub dir: PathBuf,
    /// Verify shard checksums when restoring.
    pub verify_on_load: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval: 50,
            mode: CheckpointMode::Async,
            keep: 3,
            replicas: 1,
            dir: PathBuf::from("checkpoints"),
            verify_on_load: true,
        }
    }
}

impl CheckpointConfig {
    /// Whether checkpoints are taken at all.
    pub fn enabled(&self) -> bool {
        self.interval > 0
    }
}

/// `[sentinel]`: TEE-style anomaly detection over the metrics stream. Not supported yet: no
/// detector runs, so the section is absent by default and validation refuses its keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelConfig {
    /// Run the sentinel (absent section: no sentinel).
    pub enabled: bool,
    /// A loss above this multiple of its running mean is a spike.
    pub loss_spike_factor: f64,
    /// A gradient norm above this is a spike.
    pub grad_norm_max: f64,
    /// A gradient norm above this multiple of its running mean is a spike.
    pub grad_norm_spike_factor: f64,
    /// A rank busy for more than this multiple of the ranks' median in a step is a straggler.
    pub step_time_factor: f64,
    /// Tokens per second below this fraction of the running mean is a throughput drop.
    pub throughput_drop: f64,
    /// A MoE layer whose busiest expert takes more than this multiple of the mean load has
    /// collapsed onto few experts.
    pub expert_load_max: f64,
    /// Steps in the running means.
    pub window: usize,
}

impl Default for SentinelConfig {
    fn default() -> Self {
        SentinelConfig {
            enabled: true,
            loss_spike_factor: 3.0,
            grad_norm_max: 1e4,
            grad_norm_spike_factor: 10.0,
            step_time_factor: 2.0,
            throughput_drop: 0.5,
            expert_load_max: 8.0,
            window: 20,
        }
    }
}

/// `[data]`: the training corpus and the batch shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `"builtin"` for the small built-in corpus, `"synthetic"` for seeded random tokens,
    /// otherwise a file path.
    pub source: String,
    /// How `source` is encoded.
    pub format: DataFormat,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Global sequences per optimizer step (across all data-parallel replicas).
    pub batch_size: usize,
    /// Shuffle sequence order each epoch.
    pub shuffle: bool,
    /// Data-order seed; `None` means `job.seed` (see [`super::Config::data_seed`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: DataConfig::BUILTIN.to_owned(),
            format: DataFormat::Text,
            seq_len: 64,
            batch_size: 8,
            shuffle: true,
            seed: None,
        }
    }
}

impl DataConfig {
    /// The `source` value naming the built-in corpus.
    pub const BUILTIN: &'static str = "builtin";
    /// The `source` value naming seeded random tokens (shapes matter, not text: the simulated
    /// cluster, benchmarks).
    pub const SYNTHETIC: &'static str = "synthetic";

    /// The corpus file, or `None` for the built-in corpus and synthetic tokens.
    pub fn source_path(&self) -> Option<&Path> {
        (self.source != Self::BUILTIN && self.source != Self::SYNTHETIC)
            .then(|| Path::new(&self.source))
    }
}

/// `[optimizer]`: AdamW and its learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub grad_clip: f64,
    /// Schedule after warm-up.
    pub schedule: LrSchedule,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: LrSchedule::Cosine,
        }
    }
}

/// `[metrics]`: where metrics go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on this `ip:port`; `None` means no exporter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// Write `metrics.jsonl` in the run directory.
    pub jsonl: bool,
    /// `flotilla train` logs a line (and updates its progress bar) every this many steps.
    pub log_every: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            prometheus: None,
            jsonl: true,
            log_every: 1,
        }
    }
}

impl MetricsConfig {
    /// The Prometheus listen address, if configured and well-formed (validation guarantees it).
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus.as_deref().and_then(|a| a.parse().ok())
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
