//! Pipeline, expert and data parallelism: a rank's share of the model, the executor that runs its
//! schedule, the expert all-to-all and the gradient reduction.
//!
//! - [`placement`](mod@placement): which stages, layers and experts each rank holds; who holds each tensor.
//! - [`executor`]: runs a rank's action list (F, B, W, BW, FB) driven by arriving activations and
//!   gradients, timing it on the wall clock or with injected costs.
//! - [`baton`]: the rank's compute baton that its streams take turns on.
//! - [`transport`]: blocking fabric messages for the compute threads: stage boundaries and the
//!   EP all-to-all ([`transport::FabricExchange`], the model's `ExpertExchange`).
//! - [`work`]: the real model compute behind the executor.
//! - [`profile`]: optional wall-clock events of a step (compute, waits) for profiling.
//! - [`grad_sync`]: bucketed gradient all-reduce per holder set, overlapped with the backward.
//! - [`step`]: one optimizer step of a parallel rank.
//!
//! A parallel rank is a [`Trainer`] with a [`RankParallel`] part; it keeps shape-only
//! placeholders for every tensor it does not hold, so tensor names stay global (checkpoints and
//! the job's parameter hash use them).

pub mod baton;
pub mod executor;
pub mod grad_sync;
pub mod placement;
pub mod profile;
pub mod step;
mod streams;
pub mod transport;
pub mod work;

#[cfg(test)]
mod tests;

/// Runs `f` with the calling thread's `key` set to `value`, restoring it afterwards (also when
/// `f` panics): a stream's urgency on the baton, the piece its profile events name.
fn with_thread_value<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(key, key.replace(value));
    f()
}

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_collectives::{CommConfig, Communicator};
use flotilla_model::Tensor;
use flotilla_model::Weights;
use flotilla_model::data::LoaderConfig;
use flotilla_model::params::{Kind as ParamKind, Params};
use flotilla_runtime::config::{Config, Schedule as ConfigSchedule};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::topology::Topology;
use tokio::runtime::Handle;

use crate::error::JobError;
use crate::model_config::model_config;
use crate::schedule::{self, Action, Kind};
use crate::trainer::Trainer;

pub use executor::{Executor, Overlap, StageWork, Timing, Trace};
pub use placement::Placement;

/// Fabric channel of the per-step statistics all-reduce.
pub const STATS_CHANNEL: u32 = 0x5354_0000;

/// The schedule kind a config names.
pub fn kind_of(s: ConfigSchedule) -> Kind {
    match s {
        ConfigSchedule::GPipe => Kind::GPipe,
        ConfigSchedule::OneFOneB => Kind::OneF1B,
        ConfigSchedule::Zb1p => Kind::Zb1p,
        ConfigSchedule::DualPipe => Kind::DualPipe,
        ConfigSchedule::DualPipeV => Kind::DualPipeV,
    }
}

/// The job's placement, from its config.
pub fn placement(cfg: &Config) -> Result<Placement, JobError> {
    let p = &cfg.parallel;
    let topo = Topology::new(
        cfg.cluster.hosts,
        cfg.cluster.ranks_per_host,
        p.pp,
        p.ep,
        p.dp,
    )
    .map_err(|e| JobError::Config(e.to_string()))?;
    let sched = schedule::build(kind_of(p.schedule), p.pp, p.micro_batches)
        .map_err(|e| JobError::Config(format!("parallel.schedule: {e}")))?
        .split(p.sub_batches);
    let mcfg = model_config(&cfg.model)?;
    if p.ep > 1 && !mcfg.n_routed_experts.is_multiple_of(p.ep) {
        return Err(JobError::Config(format!(
            "parallel.ep = {} does not divide model.n_routed_experts = {}",
            p.ep, mcfg.n_routed_experts
        )));
    }
    let placement =
        Placement::new(&mcfg, topo, sched, &p.stage_layers).map_err(JobError::Config)?;
    placement
        .check_node_limited(mcfg.n_group, mcfg.topk_group, p.max_hosts_per_token)
        .map_err(JobError::Config)?;
    Ok(placement)
}

/// A parallel rank's state besides the single-rank trainer's.
pub struct RankParallel {
    pub rank: usize,
    pub placement: Arc<Placement>,
    pub fabric: Arc<dyn Fabric>,
    pub rt: Handle,
    pub deadline: Duration,
    /// This rank's schedule.
    pub actions: Vec<Action>,
    /// The EP group's global ranks and this rank's index (`None` when ep = 1).
    pub ep: Option<(Vec<usize>, usize)>,
    pub sync: Mutex<grad_sync::GradSync>,
    /// The whole job (step statistics).
    pub world: Option<Communicator>,
    /// Every MoE layer of the model (decoder, then MTP), in order.
    pub moe_layers: Vec<usize>,
    /// Trainable tensors this rank counts in the global norm (it is their lowest holder).
    pub canonical: Vec<String>,
    /// How the executor overlaps actions (streams by default).
    pub overlap: Overlap,
    /// Who of the streams goes first.
    pub turns: executor::TurnOrder,
    /// The executor's trace of the last step.
    pub last_trace: Option<Trace>,
    /// The expert all-to-alls of the last step.
    pub last_exchange: transport::ExchangeStats,
    /// Record each step's [`profile`] (off by default).
    pub profile: bool,
    /// The last step's profile events (empty unless `profile`).
    pub last_profile: Vec<profile::Event>,
}

impl std::fmt::Debug for RankParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankParallel")
            .field("rank", &self.rank)
            .finish()
    }
}

impl RankParallel {
    /// This rank's canonical trainable gradients.
    fn canonical_trainable<'a>(&self, grads: &'a Weights) -> Vec<&'a [f32]> {
        let named = flotilla_model::params::named(grads);
        self.canonical
            .iter()
            .filter_map(|n| named.get(n).and_then(|t| t.host()))
            .collect()
    }
}

/// Rank `rank` of the job `cfg` describes, talking over `fabric`, driving it from `rt`.
pub fn new_rank(
    cfg: &Config,
    rank: usize,
    fabric: Arc<dyn Fabric>,
    rt: Handle,
) -> Result<Trainer, JobError> {
    let placement = Arc::new(placement(cfg)?);
    if fabric.world() != placement.world() || rank >= placement.world() {
        return Err(JobError::Config(format!(
            "rank {rank} of a fabric of {} ranks for a layout of {}",
            fabric.world(),
            placement.world()
        )));
    }
    let data_ranks = placement.data_ranks();
    let per = data_ranks * cfg.parallel.sub_batches_per_step().max(1);
    if !cfg.data.batch_size.is_multiple_of(per) {
        return Err(JobError::Config(format!(
            "data.batch_size = {} is not divisible by dp * ep * micro_batches * sub_batches = {per}",
            cfg.data.batch_size
        )));
    }
    let loader = LoaderConfig::single(cfg.data.batch_size, cfg.data.batch_size / per)
        .with_rank(placement.data_rank(rank), data_ranks);
    let mut t = Trainer::build(cfg, loader, rank)?;
    let keep = |n: &str| placement.holds(rank, n);
    t.model.weights_visit_mut(&mut |n, tensor| {
        if !keep(n) {
            *tensor = Tensor::shape_only(tensor.shape());
        }
    });
    t.grads.visit_mut("", &mut |n, tensor, _| {
        if !keep(n) {
            *tensor = Tensor::shape_only(tensor.shape());
        }
    });
    let mut trainable = Vec::new();
    t.model.weights.visit("", &mut |n, _, k| {
        if k == ParamKind::Weight {
            trainable.push(n.to_string());
        }
    });
    let canonical = trainable
        .iter()
        .filter(|n| placement.holders(n).first() == Some(&rank))
        .cloned()
        .collect();
    let mut comm = CommConfig::from_supervision(&cfg.supervision);
    if cfg.cluster.fabric == flotilla_runtime::config::FabricKind::Inproc {
        // Every rank in this process: large all-reduces may use the in-process star.
        comm = comm.in_process();
    }
    let sync = grad_sync::GradSync::new(
        &placement,
        rank,
        &trainable,
        &fabric,
        comm.clone(),
        cfg.parallel.dp_bucket_bytes(),
        rt.clone(),
    )
    .map_err(JobError::Config)?;
    let topo = &placement.topo;
    let ep = (topo.ep > 1).then(|| (topo.ep_group(rank), topo.coord(rank).ep));
    let mcfg = &t.model.config;
    let moe_layers = (0..mcfg.num_hidden_layers + t.model.mtp_depth())
        .filter(|&l| mcfg.is_moe_layer(l))
        .collect();
    t.parallel = Some(RankParallel {
        rank,
        actions: placement.schedule.ranks[topo.coord(rank).pp].clone(),
        world: Some(Communicator::world(fabric.clone(), STATS_CHANNEL, comm)),
        placement,
        fabric,
        rt,
        deadline: cfg.supervision.peer_timeout(),
        ep,
        sync: Mutex::new(sync),
        moe_layers,
        canonical,
        overlap: Overlap::for_sub_batches(cfg.parallel.sub_batches),
        turns: executor::TurnOrder::default(),
        last_trace: None,
        last_exchange: Default::default(),
        profile: false,
        last_profile: Vec::new(),
    });
    Ok(t)
}

impl Trainer {
    /// The tensors this rank is the lowest holder of, by name: the union over ranks is the whole
    /// model once, for the job's parameter hash.
    pub fn canonical_params(&self) -> Vec<(String, Vec<f32>)> {
        let Some(par) = &self.parallel else {
            return self
                .held_named()
                .into_iter()
                .filter_map(|(n, t)| t.host().map(|h| (n, h.to_vec())))
                .collect();
        };
        self.held_named()
            .into_iter()
            .filter(|(n, _)| par.placement.holders(n).first() == Some(&par.rank))
            .filter_map(|(n, t)| t.host().map(|h| (n, h.to_vec())))
            .collect()
    }

    /// The executor's trace of the last parallel step.
    pub fn last_trace(&self) -> Option<&Trace> {
        self.parallel.as_ref().and_then(|p| p.last_trace.as_ref())
    }

    /// What the expert all-to-alls of the last parallel step cost this rank.
    pub fn last_exchange(&self) -> Option<transport::ExchangeStats> {
        self.parallel.as_ref().map(|p| p.last_exchange)
    }

    /// Which of the executor's streams gets the compute first (see [`executor::TurnOrder`]).
    pub fn set_turn_order(&mut self, turns: executor::TurnOrder) {
        if let Some(p) = self.parallel.as_mut() {
            p.turns = turns;
        }
    }

    /// Record the executor's [`profile`] of every step from now on (or stop).
    pub fn set_profile(&mut self, on: bool) {
        if let Some(p) = self.parallel.as_mut() {
            p.profile = on;
        }
    }

    /// The last parallel step's profile events (empty unless [`Trainer::set_profile`]).
    pub fn last_profile(&self) -> &[profile::Event] {
        self.parallel.as_ref().map_or(&[], |p| &p.last_profile)
    }

    /// How the executor overlaps actions (see [`Overlap`]).
    pub fn set_overlap(&mut self, overlap: Overlap) {
        if let Some(p) = self.parallel.as_mut() {
            p.overlap = overlap;
        }
    }
}

/// SHA-256 over the whole model in sorted-name order, from every rank's canonical tensors; the
/// same digest as a single rank's `params_sha256` for the same values.
pub fn job_params_sha256(parts: Vec<Vec<(String, Vec<f32>)>>) -> String {
    let all: std::collections::BTreeMap<String, Vec<f32>> = parts.into_iter().flatten().collect();
    flotilla_model::params::sha256_hex(all.values())
}
