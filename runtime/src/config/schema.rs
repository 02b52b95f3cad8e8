//! The config schema as data: every section, key, expected TOML type and a one-line doc.
//!
//! Two things read this table. `walk.rs` checks a parsed file against it (unknown keys, wrong
//! types, integers that do not fit the Rust field), collecting every problem instead of stopping
//! at the first as serde would. `emit.rs` prints a config in schema order with each doc as a
//! comment, which is what `flotilla config default` shows and what `configs/default.toml` holds.
//!
//! The table must agree with the serde structs in `sections.rs` / `model.rs`: a unit test
//! serializes a config with every optional field set and checks that the walk accepts it and
//! that every schema key appears in it. Semantic ranges (`pp >= 1`, `lr > 0`) are not here but in
//! `validate.rs`, so that configs built in code are checked too.

use super::enums::{CheckpointMode, DataFormat, DeviceKind, FabricKind, LrSchedule};
use super::enums::{Precision, RopeScalingKind, Schedule, StartOrder};

/// The TOML type a key must have.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    /// `true` / `false`.
    Bool,
    /// An integer within `min..=max` (the range of the Rust field's type).
    Int { min: i64, max: i64 },
    /// A float; integers are accepted too (`lr = 1` means 1.0).
    Float,
    /// Any string.
    Str,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// An array of strings.
    StrArray,
    /// An array of `usize` (non-negative integers).
    UsizeList,
    /// A sub-table with these keys (`[cluster.sim]`).
    Table(&'static [Field]),
}

impl Ty {
    /// "an integer", "a string", ... for "expected ..." messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Ty::Bool => "a boolean (true or false)".to_owned(),
            Ty::Int { min: 0, .. } => "a non-negative integer".to_owned(),
            Ty::Int { .. } => "an integer".to_owned(),
            Ty::Float => "a number".to_owned(),
            Ty::Str => "a string".to_owned(),
            Ty::Enum(names) => format!("one of {}", quoted_list(names)),
            Ty::StrArray => "an array of strings".to_owned(),
            Ty::UsizeList => "an array of non-negative integers".to_owned(),
            Ty::Table(_) => "a table".to_owned(),
        }
    }
}

/// `"a", "b", "c"`.
pub(crate) fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    quoted.join(", ")
}

/// The largest `usize` a TOML integer can hold.
const USIZE_MAX: i64 = if (usize::MAX as u128) < (i64::MAX as u128) {
    usize::MAX as i64
} else {
    i64::MAX
};
/// A `usize` field.
const USIZE: Ty = Ty::Int {
    min: 0,
    max: USIZE_MAX,
};
/// A `u64` field (TOML integers stop at `i64::MAX`).
const U64: Ty = Ty::Int {
    min: 0,
    max: i64::MAX,
};
/// A `u32` field.
const U32: Ty = Ty::Int {
    min: 0,
    max: u32::MAX as i64,
};

/// One key of a section.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub(crate) name: &'static str,
    pub(crate) ty: Ty,
    /// One line, printed as a comment above the key.
    pub(crate) doc: &'static str,
    /// `Option` in Rust (or a list skipped when empty): may be absent from the effective config
    /// (printed commented out).
    pub(crate) optional: bool,
}

/// A required-in-Rust field (it always has a value, from the file or the default).
const fn f(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        doc,
        optional: false,
    }
}

/// An `Option` field, or a list that is not serialized when empty.
const fn opt(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        doc,
        optional: true,
    }
}

/// A top-level `[section]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Section {
    pub(crate) name: &'static str,
    pub(crate) doc: &'static str,
    pub(crate) fields: &'static [Field],
}

/// Every section, in the order `emit` prints them.
pub(crate) static SECTIONS: &[Section] = &[
    Section {
        name: "job",
        doc: "What to run and where its outputs go.",
        fields: JOB,
    },
    Section {
        name: "model",
        doc: "The DeepSeek-V3 architecture (HuggingFace DeepseekV3Config names).",
        fields: MODEL,
    },
    Section {
        name: "parallel",
        doc: "How the model and batch are split: world size = pp * ep * dp.",
        fields: PARALLEL,
    },
    Section {
        name: "cluster",
        doc: "Hosts, ranks, and the device and fabric seams.",
        fields: CLUSTER,
    },
    Section {
        name: "supervision",
        doc: "The job supervisor's OTP restart intensity and back-off, and the deadlines.",
        fields: SUPERVISION,
    },
    Section {
        name: "checkpoint",
        doc: "Snapshots: when, how, how many, where.",
        fields: CHECKPOINT,
    },
    Section {
        name: "sentinel",
        doc: "The sentinel: anomaly detection over every step's statistics, reported in events.jsonl.",
        fields: SENTINEL,
    },
    Section {
        name: "data",
        doc: "The training corpus and the batch shape.",
        fields: DATA,
    },
    Section {
        name: "optimizer",
        doc: "AdamW and its learning-rate schedule.",
        fields: OPTIMIZER,
    },
    Section {
        name: "metrics",
        doc: "Where metrics go.",
        fields: METRICS,
    },
];

/// The section called `name`.
pub(crate) fn section(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|s| s.name == name)
}

static JOB: &[Field] = &[
    f("name", Ty::Str, "Job name, recorded in summary.json."),
    f(
        "seed",
        U64,
        "Master seed (initialisation, and data order unless data.seed is set).",
    ),
    f("steps", U64, "Optimizer steps to run."),
    f(
        "out_dir",
        Ty::Str,
        "Run directory: metrics.jsonl, events.jsonl, summary.json.",
    ),
];

static MODEL: &[Field] = &[
    f(
        "vocab_size",
        USIZE,
        "Vocabulary size (byte-level text needs >= 256).",
    ),
    f("hidden_size", USIZE, "Model width."),
    f("intermediate_size", USIZE, "FFN width of the dense layers."),
    f(
        "moe_intermediate_size",
        USIZE,
        "FFN width of each routed and shared expert.",
    ),
    f(
        "num_hidden_layers",
        USIZE,
        "Transformer layers (MTP modules not included).",
    ),
    f(
        "first_k_dense_replace",
        USIZE,
        "The first k layers use a dense FFN instead of MoE.",
    ),
    f("num_attention_heads", USIZE, "Attention heads."),
    f(
        "q_lora_rank",
        USIZE,
        "Query compression rank (MLA); 0 = no q LoRA, plain q_proj.",
    ),
    f(
        "kv_lora_rank",
        USIZE,
        "Joint key/value compression rank (MLA).",
    ),
    f(
        "qk_nope_head_dim",
        USIZE,
        "Per-head query/key dimension without RoPE.",
    ),
    f(
        "qk_rope_head_dim",
        USIZE,
        "Per-head query/key dimension with RoPE (even).",
    ),
    f("v_head_dim", USIZE, "Per-head value dimension."),
    f("n_routed_experts", USIZE, "Routed experts per MoE layer."),
    f("n_shared_experts", USIZE, "Shared experts per MoE layer."),
    f(
        "num_experts_per_tok",
        USIZE,
        "Routed experts activated per token.",
    ),
    f("n_group", USIZE, "Expert groups for group-limited routing."),
    f("topk_group", USIZE, "Groups a token may route to."),
    f(
        "norm_topk_prob",
        Ty::Bool,
        "Normalise the selected gate weights to sum to one.",
    ),
    f(
        "routed_scaling_factor",
        Ty::Float,
        "Scale of the routed experts' output.",
    ),
    f("rms_norm_eps", Ty::Float, "RMSNorm epsilon."),
    f("rope_theta", Ty::Float, "RoPE base."),
    f(
        "rope_interleave",
        Ty::Bool,
        "Interleaved RoPE pairs, as DeepSeek's checkpoints use.",
    ),
    f(
        "max_position_embeddings",
        USIZE,
        "Longest sequence the model supports.",
    ),
    f(
        "num_nextn_predict_layers",
        USIZE,
        "Multi-token prediction depth D (0 = no MTP).",
    ),
    f("mtp_lambda", Ty::Float, "Weight of the MTP loss."),
    f(
        "bias_update_speed",
        Ty::Float,
        "Bias update speed of aux-loss-free load balancing.",
    ),
    f(
        "seq_aux_alpha",
        Ty::Float,
        "Weight of the sequence-wise balance loss (0 = off).",
    ),
    f(
        "init_std",
        Ty::Float,
        "Std of the random initialisation (HF initializer_range).",
    ),
    opt(
        "hf_dir",
        Ty::Str,
        "Load HuggingFace DeepseekV3 weights from this directory (absent: random init).",
    ),
    opt(
        "rope_scaling",
        Ty::Table(ROPE_SCALING),
        "YaRN RoPE scaling (absent: plain RoPE).",
    ),
    opt(
        "precision",
        Ty::Enum(Precision::NAMES),
        "GEMM precision: \"fp32\", or \"bf16\" (inputs rounded to bf16 on the tensor cores, f32 accumulation and storage; needs cluster.device = \"cuda\") (absent: fp32).",
    ),
];

static ROPE_SCALING: &[Field] = &[
    f("type", Ty::Enum(RopeScalingKind::NAMES), "Scaling method."),
    f(
        "factor",
        Ty::Float,
        "Context extension factor (>= 1; 1 = no-op).",
    ),
    opt(
        "original_max_position_embeddings",
        USIZE,
        "Pre-extension context (absent: model.max_position_embeddings).",
    ),
    f("beta_fast", Ty::Float, "YaRN beta_fast."),
    f("beta_slow", Ty::Float, "YaRN beta_slow."),
    f(
        "mscale",
        Ty::Float,
        "YaRN attention temperature multiplier.",
    ),
    f(
        "mscale_all_dim",
        Ty::Float,
        "YaRN mscale_all_dim (0 = leave the softmax scale alone).",
    ),
];

static PARALLEL: &[Field] = &[
    f("pp", USIZE, "Pipeline-parallel degree."),
    f(
        "ep",
        USIZE,
        "Expert-parallel degree (must divide model.n_routed_experts).",
    ),
    f("dp", USIZE, "Data-parallel degree."),
    f("schedule", Ty::Enum(Schedule::NAMES), "Pipeline schedule."),
    f(
        "micro_batches",
        USIZE,
        "Micro-batches per step (>= pp for 1f1b/zb1p, >= 2*pp for dualpipe/dualpipev).",
    ),
    opt(
        "sub_batches",
        USIZE,
        "Each micro-batch runs as this many sub-batches, overlapped on the executor's streams (absent: 1).",
    ),
    f(
        "max_hosts_per_token",
        USIZE,
        "Node-limited routing: hosts a token's experts may span.",
    ),
    f(
        "dp_bucket_mib",
        USIZE,
        "Gradient all-reduce bucket size, MiB.",
    ),
    opt(
        "stage_layers",
        Ty::UsizeList,
        "Decoder layers per pipeline stage, in stage order, e.g. [3, 1] (absent: even split).",
    ),
    opt(
        "start_order",
        Ty::Enum(StartOrder::NAMES),
        "\"ready\": a B starts once its gradient is in, before earlier units still waiting; \"list\": units start in the schedule's order, as its timeline assumes (absent: \"ready\").",
    ),
];

static CLUSTER: &[Field] = &[
    f("hosts", USIZE, "Host processes."),
    f("ranks_per_host", USIZE, "Ranks per host."),
    f(
        "device",
        Ty::Enum(DeviceKind::NAMES),
        "Compute device: \"cpu\", \"cuda\" (one GPU per rank; a binary built with --features cuda), or \"sim\" (shapes only, virtual time; needs fabric = \"sim\").",
    ),
    f(
        "fabric",
        Ty::Enum(FabricKind::NAMES),
        "Transport between the ranks of `flotilla train`: \"inproc\", or \"sim\" (modelled links); \"quic\" is not supported yet (the rank processes of `flotilla launch` / `agent` always use QUIC).",
    ),
    opt(
        "listen",
        Ty::Str,
        "This process's QUIC listen address, ip:port (not supported yet).",
    ),
    opt(
        "peers",
        Ty::StrArray,
        "Every host's agent address (host:port) in host order (not supported yet).",
    ),
    opt(
        "spares",
        USIZE,
        "Spare node agents of `flotilla launch` / `agent`: they take over a lost host's ranks (absent: 0).",
    ),
    opt(
        "cpu_threads",
        USIZE,
        "CPU compute threads per process (absent: all cores).",
    ),
    opt(
        "sim",
        Ty::Table(SIM),
        "Physics of the simulated cluster (device = \"sim\"; absent: the values shown).",
    ),
];

static SIM: &[Field] = &[
    f(
        "link_gbps",
        Ty::Float,
        "Inter-host bandwidth per rank, Gbit/s.",
    ),
    f(
        "link_latency_us",
        Ty::Float,
        "Inter-host latency, microseconds.",
    ),
    f(
        "intra_host_gbps",
        Ty::Float,
        "Intra-host bandwidth per rank, Gbit/s.",
    ),
    f(
        "device_tflops",
        Ty::Float,
        "Device GEMM rate, TFLOP/s (element-wise kernels run at a tenth of it).",
    ),
    f("hbm_gbps", Ty::Float, "Device memory bandwidth, GB/s."),
    f(
        "launch_overhead_us",
        Ty::Float,
        "Fixed cost per device operation, microseconds.",
    ),
    f(
        "storage_gbps",
        Ty::Float,
        "Aggregate bandwidth of the checkpoint storage, GB/s (every rank's shard shares it).",
    ),
];

static SUPERVISION: &[Field] = &[
    f(
        "max_restarts",
        U32,
        "Restarts allowed within `within_s` before escalating.",
    ),
    f("within_s", Ty::Float, "Restart-intensity window, seconds."),
    f(
        "backoff_ms",
        U64,
        "First restart back-off, ms (doubles up to backoff_max_ms; 0 = none).",
    ),
    f(
        "backoff_max_ms",
        U64,
        "Largest restart back-off, ms (>= backoff_ms).",
    ),
    f(
        "shutdown_timeout_ms",
        U64,
        "Wait for a child to stop before killing it, ms.",
    ),
    opt(
        "heartbeat_ms",
        U64,
        "Heartbeat period of the node agents of `flotilla launch` / `agent`, ms (absent: 1000).",
    ),
    opt(
        "heartbeat_misses",
        U32,
        "Heartbeats an agent may miss before it is declared lost (absent: 2).",
    ),
    f(
        "peer_timeout_ms",
        U64,
        "Deadline of every wait on a peer rank, ms: one silent this long is dead.",
    ),
    f(
        "max_job_restarts",
        U32,
        "Whole-job rollbacks before the job ends.",
    ),
    opt(
        "watchdog_factor",
        Ty::Float,
        "A step longer than this multiple of the median step (after 3) is hung: rolled back with checkpoints on, else the job ends (absent: off).",
    ),
];

static CHECKPOINT: &[Field] = &[
    f("interval", U64, "Steps between checkpoints (0 = off)."),
    f(
        "mode",
        Ty::Enum(CheckpointMode::NAMES),
        "Persist in the background (async) or block (sync).",
    ),
    f("keep", USIZE, "Persisted checkpoints to keep (>= 1)."),
    f(
        "replicas",
        USIZE,
        "Ranks holding each in-memory snapshot, owner included (1..=world).",
    ),
    f(
        "dir",
        Ty::Str,
        "Checkpoint directory (relative to job.out_dir).",
    ),
    f(
        "verify_on_load",
        Ty::Bool,
        "Verify checksums when restoring.",
    ),
];

static SENTINEL: &[Field] = &[
    f("enabled", Ty::Bool, "Run the anomaly detectors."),
    f(
        "loss_spike_factor",
        Ty::Float,
        "A loss above this multiple of its running mean is a spike (> 1).",
    ),
    f(
        "grad_norm_max",
        Ty::Float,
        "A gradient norm above this is a spike.",
    ),
    f(
        "grad_norm_spike_factor",
        Ty::Float,
        "A gradient norm above this multiple of its running mean is a spike (> 1).",
    ),
    f(
        "step_time_factor",
        Ty::Float,
        "A rank busy for more than this multiple of the ranks' median in a step is a straggler (> 1).",
    ),
    f(
        "throughput_drop",
        Ty::Float,
        "Tokens/s below this fraction of the running mean is a throughput drop (0 < x < 1).",
    ),
    f(
        "expert_load_max",
        Ty::Float,
        "A MoE layer whose busiest expert takes more than this multiple of the mean load has collapsed (> 1).",
    ),
    f("window", USIZE, "Steps in the running means."),
];

static DATA: &[Field] = &[
    f(
        "source",
        Ty::Str,
        "\"builtin\" for the built-in corpus, \"synthetic\" for seeded random tokens (2 * batch_size sequences), or a file path.",
    ),
    f(
        "format",
        Ty::Enum(DataFormat::NAMES),
        "Encoding of the source.",
    ),
    f(
        "seq_len",
        USIZE,
        "Tokens per sequence (<= model.max_position_embeddings).",
    ),
    f(
        "batch_size",
        USIZE,
        "Global sequences per step (divisible by dp * ep * micro_batches).",
    ),
    f("shuffle", Ty::Bool, "Shuffle sequence order each epoch."),
    opt("seed", U64, "Data-order seed (absent: job.seed)."),
];

static OPTIMIZER: &[Field] = &[
    f("lr", Ty::Float, "Peak learning rate."),
    f(
        "min_lr",
        Ty::Float,
        "Final learning rate of the cosine schedule.",
    ),
    f("warmup_steps", U64, "Linear warm-up steps."),
    f("weight_decay", Ty::Float, "Decoupled weight decay."),
    f("beta1", Ty::Float, "Adam beta1."),
    f("beta2", Ty::Float, "Adam beta2."),
    f("eps", Ty::Float, "Adam epsilon."),
    f(
        "grad_clip",
        Ty::Float,
        "Global gradient-norm clip (0 = off).",
    ),
    f(
        "schedule",
        Ty::Enum(LrSchedule::NAMES),
        "Schedule after warm-up.",
    ),
];

static METRICS: &[Field] = &[
    opt(
        "prometheus",
        Ty::Str,
        "Serve Prometheus metrics on this ip:port (absent: no exporter).",
    ),
    f(
        "jsonl",
        Ty::Bool,
        "Write metrics.jsonl in the run directory.",
    ),
    f(
        "log_every",
        U64,
        "flotilla train logs a line and updates its progress bar every this many steps (>= 1).",
    ),
];
