//! Value ranges and cross-field rules over a typed [`Config`], each blaming a key and its line.
//!
//! Every rule is written as `c.rule(&[keys it reads], holds, || message)`. The key list matters:
//! - the problem names the first listed key that appears in the file (so "pp = 3 with dualpipe"
//!   points at `parallel.pp` if the file sets it, else at `parallel.schedule`), at that key's
//!   line and column; with no source text (a config built in code) position is 0:0;
//! - if any listed key was rejected by the schema walk (wrong type, so it holds its default),
//!   the rule is skipped, so one mistake is reported once.
//!
//! - if any listed key already failed a single-key rule (`lr = -1`), multi-key rules reading it
//!   (`min_lr <= lr`) are skipped for the same reason.
//!
//! Therefore list every key a rule reads, and check a key's own range before the rules that
//! combine it with others. Because the defaults satisfy every rule (a test checks
//! this), a failing rule always involves at least one key written in the file.
//!
//! A key that no code reads yet is refused when set (`unsupported`), with
//! the message `not supported yet: ...`: a config key is either read by the code it names or
//! refused, never accepted and ignored (`tests/tests/config_keys.rs` checks every key).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use super::enums::{DataFormat, DeviceKind, FabricKind, Precision};
use super::error::{ConfigProblem, Pos, problem};
use super::walk::Walk;
use super::{Config, DataConfig};

mod parallel;

use parallel::parallel;

/// Collects rule violations; positions come from the schema walk, when there was a file.
pub(crate) struct Checker<'a> {
    walk: Option<&'a Walk>,
    problems: Vec<ConfigProblem>,
    /// Keys that failed a single-key rule.
    failed: BTreeSet<String>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(walk: Option<&'a Walk>) -> Self {
        Checker {
            walk,
            problems: Vec::new(),
            failed: BTreeSet::new(),
        }
    }

    pub(crate) fn into_problems(self) -> Vec<ConfigProblem> {
        self.problems
    }

    /// Records `message()` unless `holds`, blaming the first of `keys` present in the file.
    fn rule(&mut self, keys: &[&str], holds: bool, message: impl FnOnce() -> String) {
        if holds || keys.iter().any(|k| self.failed.contains(*k)) {
            return;
        }
        if let [key] = keys {
            self.failed.insert((*key).to_owned());
        }
        let Some(walk) = self.walk else {
            let key = keys.first().copied().unwrap_or("");
            self.problems.push(problem(Pos::UNKNOWN, key, message()));
            return;
        };
        if keys.iter().any(|k| walk.is_tainted(k)) {
            return;
        }
        let present = keys
            .iter()
            .find_map(|k| walk.positions.get(*k).map(|p| (*k, *p)));
        let (key, pos) = present.unwrap_or_else(|| {
            let key = keys.first().copied().unwrap_or("");
            let section = key.split('.').next().unwrap_or(key);
            let pos = walk.positions.get(section).copied();
            (key, pos.unwrap_or(Pos { line: 1, column: 1 }))
        });
        self.problems.push(problem(pos, key, message()));
    }

    /// `value >= 1`.
    fn at_least_one(&mut self, key: &str, value: u64) {
        self.rule(&[key], value >= 1, || {
            format!("must be at least 1, found {value}")
        });
    }

    /// `value > 0` and finite.
    fn positive(&mut self, key: &str, value: f64) {
        let ok = value.is_finite() && value > 0.0;
        self.rule(&[key], ok, || {
            format!("must be a finite number > 0, found {value}")
        });
    }

    /// `value >= 0` and finite.
    fn non_negative(&mut self, key: &str, value: f64) {
        let ok = value.is_finite() && value >= 0.0;
        self.rule(&[key], ok, || {
            format!("must be a finite number >= 0, found {value}")
        });
    }

    /// A non-blank string or path.
    fn non_empty(&mut self, key: &str, value: &str) {
        self.rule(&[key], !value.trim().is_empty(), || {
            "must not be empty".to_owned()
        });
    }

    /// Refuses `key` when `set`: `not supported yet: {why}`.
    fn unsupported(&mut self, key: &str, set: bool, why: &str) {
        self.rule(&[key], !set, || format!("not supported yet: {why}"));
    }
}

/// `usize` → `u64` for the range helpers (lossless on every platform Rust supports).
fn n(v: usize) -> u64 {
    v as u64
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or("?")
}

/// Runs every rule over `cfg`.
pub(crate) fn check(cfg: &Config, c: &mut Checker<'_>) {
    job(cfg, c);
    model(cfg, c);
    parallel(cfg, c);
    cluster(cfg, c);
    supervision(cfg, c);
    checkpoint(cfg, c);
    sentinel(cfg, c);
    data(cfg, c);
    optimizer(cfg, c);
    metrics(cfg, c);
}

fn job(cfg: &Config, c: &mut Checker<'_>) {
    let j = &cfg.job;
    c.non_empty("job.name", &j.name);
    c.at_least_one("job.steps", j.steps);
    c.non_empty("job.out_dir", path_str(&j.out_dir));
}

fn model(cfg: &Config, c: &mut Checker<'_>) {
    let m = &cfg.model;
    for (key, v) in [
        ("model.vocab_size", m.vocab_size),
        ("model.hidden_size", m.hidden_size),
        ("model.intermediate_size", m.intermediate_size),
        ("model.moe_intermediate_size", m.moe_intermediate_size),
        ("model.num_hidden_layers", m.num_hidden_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.kv_lora_rank", m.kv_lora_rank),
        ("model.qk_nope_head_dim", m.qk_nope_head_dim),
        ("model.qk_rope_head_dim", m.qk_rope_head_dim),
        ("model.v_head_dim", m.v_head_dim),
        ("model.n_routed_experts", m.n_routed_experts),
        ("model.num_experts_per_tok", m.num_experts_per_tok),
        ("model.n_group", m.n_group),
        ("model.topk_group", m.topk_group),
        ("model.max_position_embeddings", m.max_position_embeddings),
    ] {
        c.at_least_one(key, n(v));
    }
    let rope = m.qk_rope_head_dim;
    c.rule(&["model.qk_rope_head_dim"], rope.is_multiple_of(2), || {
        format!("must be even (RoPE rotates pairs), found {rope}")
    });
    c.rule(
        &["model.first_k_dense_replace", "model.num_hidden_layers"],
        m.first_k_dense_replace <= m.num_hidden_layers,
        || {
            format!(
                "first_k_dense_replace = {} exceeds num_hidden_layers = {}",
                m.first_k_dense_replace, m.num_hidden_layers
            )
        },
    );
    let (experts, groups) = (m.n_routed_experts, m.n_group);
    if experts > 0 && groups > 0 {
        let group_keys = ["model.n_routed_experts", "model.n_group"];
        c.rule(&group_keys, experts.is_multiple_of(groups), || {
            format!("n_routed_experts = {experts} is not divisible by n_group = {groups}")
        });
        let per_group = experts / groups;
        c.rule(
            &group_keys,
            !experts.is_multiple_of(groups) || per_group >= 2,
            || {
                format!(
                    "each group needs at least 2 experts (group scores sum the top-2), \
                 found {experts} experts in {groups} groups"
                )
            },
        );
        c.rule(
            &["model.topk_group", "model.n_group"],
            m.topk_group <= groups,
            || format!("topk_group = {} exceeds n_group = {groups}", m.topk_group),
        );
        let reachable = per_group.saturating_mul(m.topk_group.min(groups));
        c.rule(
            &[
                "model.num_experts_per_tok",
                "model.n_routed_experts",
                "model.n_group",
                "model.topk_group",
            ],
            m.num_experts_per_tok <= reachable,
            || {
                format!(
                    "num_experts_per_tok = {} exceeds the {reachable} experts reachable in \
                     topk_group = {} groups of n_routed_experts / n_group = {per_group}",
                    m.num_experts_per_tok, m.topk_group
                )
            },
        );
    }
    c.positive("model.routed_scaling_factor", m.routed_scaling_factor);
    c.positive("model.rms_norm_eps", m.rms_norm_eps);
    c.positive("model.rope_theta", m.rope_theta);
    c.non_negative("model.mtp_lambda", m.mtp_lambda);
    c.non_negative("model.bias_update_speed", m.bias_update_speed);
    c.non_negative("model.seq_aux_alpha", m.seq_aux_alpha);
    c.positive("model.init_std", m.init_std);
    if let Some(dir) = &m.hf_dir {
        c.non_empty("model.hf_dir", path_str(dir));
    }
    if let Some(rs) = &m.rope_scaling {
        let ok = rs.factor.is_finite() && rs.factor >= 1.0;
        c.rule(&["model.rope_scaling.factor"], ok, || {
            format!("must be a finite number >= 1, found {}", rs.factor)
        });
        c.positive("model.rope_scaling.beta_slow", rs.beta_slow);
        c.positive("model.rope_scaling.beta_fast", rs.beta_fast);
        c.rule(
            &[
                "model.rope_scaling.beta_fast",
                "model.rope_scaling.beta_slow",
            ],
            rs.beta_fast > rs.beta_slow,
            || {
                format!(
                    "beta_fast = {} must exceed beta_slow = {}",
                    rs.beta_fast, rs.beta_slow
                )
            },
        );
        c.positive("model.rope_scaling.mscale", rs.mscale);
        c.non_negative("model.rope_scaling.mscale_all_dim", rs.mscale_all_dim);
        if let Some(orig) = rs.original_max_position_embeddings {
            let key = "model.rope_scaling.original_max_position_embeddings";
            c.at_least_one(key, n(orig));
            c.rule(
                &[key, "model.max_position_embeddings"],
                orig <= m.max_position_embeddings,
                || {
                    format!(
                        "{orig} exceeds model.max_position_embeddings = {}",
                        m.max_position_embeddings
                    )
                },
            );
        }
    }
}

/// Why the simulated cluster's keys are refused.
/// Why the multi-process keys are refused.
const NO_MULTI_PROCESS: &str = "the ranks of a multi-process job (`flotilla launch` / `agent`) \
     always meet over QUIC, whatever cluster.fabric says, and find each other through the \
     controller; fabric = \"inproc\" is the transport of `flotilla train`, which runs every \
     rank in one process";

fn cluster(cfg: &Config, c: &mut Checker<'_>) {
    let cl = &cfg.cluster;
    c.at_least_one("cluster.hosts", n(cl.hosts));
    c.at_least_one("cluster.ranks_per_host", n(cl.ranks_per_host));
    c.rule(
        &["model.precision", "cluster.device"],
        cfg.model.precision == Precision::Fp32 || cl.device == DeviceKind::Cuda,
        || {
            format!(
                "precision = \"bf16\" needs device = \"cuda\" (the {} device computes in f32)",
                cl.device.as_str()
            )
        },
    );
    // The CUDA kernels' limits (`model/src/device/cuda/layers.rs`): the router keeps a token's
    // scores and groups in registers, RoPE a row's rotary channels.
    if cl.device == DeviceKind::Cuda {
        let m = &cfg.model;
        for (key, value, max) in [
            ("model.n_routed_experts", m.n_routed_experts, 256),
            ("model.n_group", m.n_group, 64),
            ("model.qk_rope_head_dim", m.qk_rope_head_dim, 256),
        ] {
            c.rule(&[key, "cluster.device"], value <= max, || {
                format!("{key} = {value} exceeds the CUDA device's limit of {max}")
            });
        }
    }
    let sim_dev = cl.device == DeviceKind::Sim;
    let sim_fab = cl.fabric == FabricKind::Sim;
    c.rule(
        &["cluster.fabric", "cluster.device"],
        sim_dev == sim_fab,
        || {
            format!(
                "device = \"sim\" and fabric = \"sim\" go together (the simulated cluster); \
                 found device = {:?}, fabric = {:?}",
                cl.device.as_str(),
                cl.fabric.as_str()
            )
        },
    );
    c.unsupported(
        "cluster.fabric",
        cl.fabric == FabricKind::Quic,
        NO_MULTI_PROCESS,
    );
    c.unsupported("cluster.listen", cl.listen.is_some(), NO_MULTI_PROCESS);
    c.unsupported("cluster.peers", cl.peers.is_some(), NO_MULTI_PROCESS);
    if let Some(threads) = cl.cpu_threads {
        c.at_least_one("cluster.cpu_threads", n(threads));
    }
    c.rule(
        &["cluster.sim", "cluster.device"],
        cl.sim.is_none() || sim_dev,
        || "[cluster.sim] describes the simulated cluster; it needs device = \"sim\"".to_owned(),
    );
    if let Some(s) = &cl.sim {
        c.positive("cluster.sim.link_gbps", s.link_gbps);
        c.non_negative("cluster.sim.link_latency_us", s.link_latency_us);
        c.positive("cluster.sim.intra_host_gbps", s.intra_host_gbps);
        c.positive("cluster.sim.device_tflops", s.device_tflops);
        c.positive("cluster.sim.hbm_gbps", s.hbm_gbps);
        c.non_negative("cluster.sim.launch_overhead_us", s.launch_overhead_us);
        c.positive("cluster.sim.storage_gbps", s.storage_gbps);
    }
}

fn supervision(cfg: &Config, c: &mut Checker<'_>) {
    let s = &cfg.supervision;
    c.positive("supervision.within_s", s.within_s);
    c.rule(
        &["supervision.backoff_max_ms", "supervision.backoff_ms"],
        s.backoff_ms <= s.backoff_max_ms,
        || {
            format!(
                "backoff_max_ms = {} is less than backoff_ms = {} (the back-off doubles from \
                 backoff_ms up to backoff_max_ms)",
                s.backoff_max_ms, s.backoff_ms
            )
        },
    );
    c.at_least_one("supervision.shutdown_timeout_ms", s.shutdown_timeout_ms);
    if let Some(f) = s.watchdog_factor {
        c.rule(
            &["supervision.watchdog_factor"],
            f.is_finite() && f > 1.0,
            || format!("must be a finite number > 1, found {f}"),
        );
    }
    if let Some(hb) = s.heartbeat_ms {
        c.at_least_one("supervision.heartbeat_ms", hb);
    }
    if let Some(m) = s.heartbeat_misses {
        c.at_least_one("supervision.heartbeat_misses", u64::from(m));
    }
    c.at_least_one("supervision.peer_timeout_ms", s.peer_timeout_ms);
}

fn checkpoint(cfg: &Config, c: &mut Checker<'_>) {
    let k = &cfg.checkpoint;
    c.at_least_one("checkpoint.keep", n(k.keep));
    c.at_least_one("checkpoint.replicas", n(k.replicas));
    let world = cfg.cluster.world_size();
    c.rule(
        &[
            "checkpoint.replicas",
            "cluster.hosts",
            "cluster.ranks_per_host",
        ],
        k.replicas <= world || world == 0,
        || {
            format!(
                "replicas = {} exceeds the {world} ranks that could hold a copy",
                k.replicas
            )
        },
    );
    c.non_empty("checkpoint.dir", path_str(&k.dir));
}

fn sentinel(cfg: &Config, c: &mut Checker<'_>) {
    let Some(s) = &cfg.sentinel else {
        return;
    };
    c.at_least_one("sentinel.window", n(s.window));
    c.positive("sentinel.grad_norm_max", s.grad_norm_max);
    for (key, v) in [
        ("sentinel.loss_spike_factor", s.loss_spike_factor),
        ("sentinel.grad_norm_spike_factor", s.grad_norm_spike_factor),
        ("sentinel.step_time_factor", s.step_time_factor),
        ("sentinel.expert_load_max", s.expert_load_max),
    ] {
        c.rule(&[key], v.is_finite() && v > 1.0, || {
            format!("must be a finite number > 1, found {v}")
        });
    }
    let d = s.throughput_drop;
    c.rule(&["sentinel.throughput_drop"], d > 0.0 && d < 1.0, || {
        format!("must be between 0 and 1 (exclusive), found {d}")
    });
}

fn data(cfg: &Config, c: &mut Checker<'_>) {
    let d = &cfg.data;
    c.non_empty("data.source", &d.source);
    c.at_least_one("data.seq_len", n(d.seq_len));
    c.at_least_one("data.batch_size", n(d.batch_size));
    let max_pos = cfg.model.max_position_embeddings;
    c.rule(
        &["data.seq_len", "model.max_position_embeddings"],
        d.seq_len <= max_pos,
        || {
            format!(
                "seq_len = {} exceeds model.max_position_embeddings = {max_pos}",
                d.seq_len
            )
        },
    );
    let vocab = cfg.model.vocab_size;
    c.rule(
        &["model.vocab_size", "data.format"],
        d.format != DataFormat::Text || d.source == DataConfig::SYNTHETIC || vocab >= 256,
        || format!("format = \"text\" is byte-level and needs vocab_size >= 256, found {vocab}"),
    );
}

fn optimizer(cfg: &Config, c: &mut Checker<'_>) {
    let o = &cfg.optimizer;
    c.positive("optimizer.lr", o.lr);
    c.non_negative("optimizer.min_lr", o.min_lr);
    c.rule(
        &["optimizer.min_lr", "optimizer.lr"],
        o.min_lr <= o.lr,
        || format!("min_lr = {} exceeds lr = {}", o.min_lr, o.lr),
    );
    c.rule(
        &["optimizer.warmup_steps", "job.steps"],
        o.warmup_steps <= cfg.job.steps,
        || {
            format!(
                "warmup_steps = {} exceeds job.steps = {}",
                o.warmup_steps, cfg.job.steps
            )
        },
    );
    c.non_negative("optimizer.weight_decay", o.weight_decay);
    for (key, beta) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
        c.rule(&[key], (0.0..1.0).contains(&beta), || {
            format!("must be in [0, 1), found {beta}")
        });
    }
    c.positive("optimizer.eps", o.eps);
    c.non_negative("optimizer.grad_clip", o.grad_clip);
}

fn metrics(cfg: &Config, c: &mut Checker<'_>) {
    let m = &cfg.metrics;
    if let Some(addr) = &m.prometheus {
        c.rule(
            &["metrics.prometheus"],
            addr.parse::<SocketAddr>().is_ok(),
            || format!("{addr:?} is not an ip:port socket address"),
        );
    }
    c.at_least_one("metrics.log_every", m.log_every);
}
