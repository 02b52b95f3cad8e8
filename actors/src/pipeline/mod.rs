//! Pipeline, expert and data parallelism: where everything of a job lives, and how gradients
//! are reduced over the ranks that share them.
//!
//! - [`placement`](mod@placement): which stages, layers and experts each rank holds; who holds
//!   each tensor.
//! - [`grad_sync`]: the gradient reduction per holder set, overlapped with the backward.
//!
//! The schedule is run by the stage actors ([`crate::stage`]) and the expert shards
//! ([`crate::expert_shard`]); every rank keeps shape-only placeholders for what it does not
//! hold, so tensor names stay global (checkpoints and the job's parameter hash use them).

pub mod grad_sync;
pub mod placement;

use flotilla_model::params::{Kind as ParamKind, Params};
use flotilla_model::{DeepSeekV3, SimDevice, SimProfile};
use flotilla_runtime::config::{Config, Schedule as ConfigSchedule};
use flotilla_runtime::topology::Topology;

use crate::error::JobError;
use crate::model_config::model_config;
use crate::schedule::{self, Kind};

pub use placement::Placement;

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

/// What every rank of a job needs to know about the whole model, computed once per job: the
/// holder sets of its trainable tensors (held or not, so that every rank numbers the gradient
/// groups alike) and its MoE layers.
#[derive(Debug, Clone)]
pub struct ModelShape {
    /// Every trainable tensor's name, sorted.
    pub trainable: Vec<String>,
    /// The distinct holder sets of the trainable tensors, each with the names it covers
    /// ([`Placement::holder_sets`]).
    pub holder_sets: Vec<(Vec<usize>, Vec<String>)>,
    /// Every MoE layer (decoder, then MTP), in order.
    pub moe_layers: Vec<usize>,
}

impl ModelShape {
    /// The trainable tensors rank `rank` counts in the global norm: those it is the lowest
    /// holder of.
    pub fn canonical(&self, rank: usize) -> Vec<String> {
        let mut out: Vec<String> = self
            .holder_sets
            .iter()
            .filter(|(h, _)| h.first() == Some(&rank))
            .flat_map(|(_, names)| names.iter().cloned())
            .collect();
        out.sort();
        out
    }

    /// The shape of the model `cfg` describes (built shape-only: no values, no arithmetic),
    /// placed as `placement` says.
    pub fn of(cfg: &Config, placement: &Placement) -> Result<ModelShape, JobError> {
        let mcfg = match &cfg.model.hf_dir {
            Some(dir) => flotilla_model::hf::read_config(&dir.join("config.json"))
                .map_err(|e| JobError::Model(e.to_string()))?,
            None => model_config(&cfg.model)?,
        };
        let model = DeepSeekV3::init(&mcfg, &SimDevice::new(SimProfile::h200()), 0)
            .map_err(|e| JobError::Model(e.to_string()))?;
        let mut trainable = Vec::new();
        model.weights.visit("", &mut |n, _, k| {
            if k == ParamKind::Weight {
                trainable.push(n.to_string());
            }
        });
        trainable.sort();
        let moe_layers = (0..mcfg.num_hidden_layers + model.mtp_depth())
            .filter(|&l| mcfg.is_moe_layer(l))
            .collect();
        let holder_sets = placement.holder_sets(trainable.iter().map(String::as_str));
        Ok(ModelShape {
            trainable,
            holder_sets,
            moe_layers,
        })
    }
}

/// SHA-256 over the whole model in sorted-name order, from every rank's canonical tensors; the
/// same digest as a single rank's `params_sha256` for the same values.
pub fn job_params_sha256(parts: Vec<Vec<(String, Vec<f32>)>>) -> String {
    let all: std::collections::BTreeMap<String, Vec<f32>> = parts.into_iter().flatten().collect();
    flotilla_model::params::sha256_hex(all.values())
}
