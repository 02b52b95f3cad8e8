//! The rank actor: one per rank, the first child of the rank's supervisor (`rest_for_one`: the
//! expert shard and the stage actors after it depend on it). It owns the rank's device and
//! training state through its compute stream ([`crate::stream`]), and answers the job driver:
//! a step, a snapshot, a restore, the parameters.
//!
//! A step: zero the gradients and take the micro-batches (a job); tell the stage actors to run
//! it; as soon as every W of a group's stages is done, reduce that group's gradients over its
//! holders ([`crate::pipeline::grad_sync`]) while the other stages go on; when every stage is
//! done, one all-reduce of the step's statistics over the job (losses and `Σ g²` as floats,
//! tokens and expert loads as integers, exactly); then clip, AdamW and the router biases (a
//! job), skipped when the loss or the norm is not finite or the loss spikes (`[sentinel]`).
//! The step runs in a task of its own, so the actor keeps answering meanwhile: a child that
//! restarts, or an expert shard that fails, fails the step at once; a roll-back aborts it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_ckpt::Snapshot;
use flotilla_collectives::{Algo, CommConfig, Communicator, ReduceOp};
use flotilla_model::LossParts;
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::{Config, DeviceKind, FabricKind, StartOrder};
use flotilla_runtime::fabric::Fabric;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::JobError;
use crate::expert_shard::ShardMsg;
use crate::faults::FaultPlan;
use crate::links::{Gate, RankLinks};
use crate::pipeline::grad_sync::{self, GradGroups};
use crate::pipeline::{ModelShape, Placement};
use crate::schedule::timeline;
use crate::stage::{StageMsg, StageReport, StepPlan};
use crate::store::{LocalStats, RankStore, StepStats, make_device};
use crate::stream::{Order, Stream};

/// Fabric channel of the per-step statistics all-reduce.
pub const STATS_CHANNEL: u32 = 0x5354_0000;

/// Tensors by name, in host memory.
pub type NamedValues = Vec<(String, Vec<f32>)>;

/// Messages to a rank.
#[derive(Debug)]
pub enum RankMsg {
    /// Run one optimizer step of the job's `attempt`; replies with its statistics or why it
    /// failed.
    Step(u64, RpcReplyPort<Result<StepStats, String>>),
    /// A copy of the rank's whole training state, taken between steps.
    Snapshot(RpcReplyPort<Result<Snapshot, String>>),
    /// Replace the rank's training state with a snapshot's, and go on as `attempt` (a
    /// roll-back: what the step in flight left is dropped).
    Restore(Box<Snapshot>, u64, RpcReplyPort<Result<(), String>>),
    /// The tensors this rank is the lowest holder of (for the job's parameter hash).
    CanonicalParams(RpcReplyPort<Result<NamedValues, String>>),
    /// The jobs of the last step on the rank's compute stream.
    Trace(RpcReplyPort<Result<Vec<crate::stream::Span>, String>>),
    /// A child of the rank (re)started (its name): a step in flight fails.
    Restarted(String),
    /// Something of the rank failed outside a stage (the expert shard): a step in flight fails.
    Failure(String),
    /// The step task of an attempt ended.
    StepEnded(u64, Box<Comms>, Result<StepStats, String>),
}

/// What a rank is started with.
#[derive(Clone)]
pub struct RankArgs {
    pub rank: usize,
    pub config: Arc<Config>,
    pub placement: Arc<Placement>,
    pub shape: Arc<ModelShape>,
    /// The job's token stream (loaded once, shared by its ranks).
    pub dataset: Arc<flotilla_model::data::TokenDataset>,
    pub fabric: Arc<dyn Fabric>,
    pub links: Arc<RankLinks>,
    pub clock: Arc<dyn Clock>,
    /// Failures to inject (tests of recovery).
    pub faults: Option<Arc<FaultPlan>>,
    /// Called with the rank on its device thread before the device is built (a benchmark pins
    /// the thread to a core).
    pub on_device_thread: Option<DeviceThreadHook>,
}

/// See [`RankArgs::on_device_thread`].
pub type DeviceThreadHook = Arc<dyn Fn(usize) + Send + Sync>;

impl std::fmt::Debug for RankArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RankArgs(rank {})", self.rank)
    }
}

/// The rank's communicators: its gradient groups and the whole job (statistics).
#[derive(Debug)]
pub struct Comms {
    grads: GradGroups,
    world: Communicator,
}

/// The step in flight.
struct Running {
    reply: RpcReplyPort<Result<StepStats, String>>,
    report: UnboundedSender<StageReport>,
    /// The step task (aborted by a roll-back).
    task: tokio::task::JoinHandle<()>,
}

/// The rank actor's state.
pub struct RankState {
    a: RankArgs,
    stream: Stream,
    comms: Option<Box<Comms>>,
    running: Option<Running>,
    attempt: u64,
}

/// The rank actor.
#[derive(Debug, Default)]
pub struct RankActor;

/// The rank's communicators, built anew (at the start, and after a roll-back: a failed
/// collective leaves its communicator poisoned).
fn comms(a: &RankArgs) -> Result<Comms, String> {
    let cfg = &a.config;
    let mut comm = CommConfig::from_supervision(&cfg.supervision);
    if cfg.cluster.fabric == FabricKind::Inproc {
        // Every rank in this process: large all-reduces may use the in-process star.
        comm = comm.in_process();
    }
    let grads = GradGroups::new(
        &a.placement,
        a.rank,
        &a.shape.holder_sets,
        &a.fabric,
        comm.clone(),
        cfg.parallel.dp_bucket_bytes(),
    )?;
    Ok(Comms {
        grads,
        world: Communicator::world(Arc::clone(&a.fabric), STATS_CHANNEL, comm),
    })
}

impl Actor for RankActor {
    type Msg = RankMsg;
    type State = RankState;
    type Arguments = RankArgs;

    async fn pre_start(
        &self,
        me: ActorRef<RankMsg>,
        a: RankArgs,
    ) -> Result<RankState, ActorProcessingErr> {
        let (cfg, rank, placement) = (Arc::clone(&a.config), a.rank, Arc::clone(&a.placement));
        let (shape, dataset) = (Arc::clone(&a.shape), Arc::clone(&a.dataset));
        let hook = a.on_device_thread.clone();
        let build = move || -> Result<_, JobError> {
            if let Some(h) = &hook {
                h(rank);
            }
            let dev = make_device(&cfg, rank)?;
            let store = RankStore::build(&cfg, rank, placement, &shape, dataset, dev.as_ref())?;
            Ok((dev, store))
        };
        let stream = match a.config.cluster.device {
            DeviceKind::Sim => {
                let (dev, store) = build().map_err(|e| format!("rank {rank}: {e}"))?;
                Stream::virtual_time(dev, store)
            }
            _ => Stream::on_thread(format!("rank-{rank}-device"), build)
                .await
                .map_err(|e| format!("rank {rank}: {e}"))?,
        };
        if let Some(f) = a.faults.as_ref().and_then(|p| p.slowdown(rank)) {
            stream.slow_down(f);
        }
        let comms = comms(&a).map_err(|e| format!("rank {rank}: {e}"))?;
        a.links.set_stream(Some(stream.clone()));
        a.links.set_rank_actor(me);
        Ok(RankState {
            a,
            stream,
            comms: Some(Box::new(comms)),
            running: None,
            attempt: 0,
        })
    }

    async fn post_stop(
        &self,
        _me: ActorRef<RankMsg>,
        s: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        s.a.links.set_stream(None);
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<RankMsg>,
        msg: RankMsg,
        s: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RankMsg::Step(attempt, reply) => s.start_step(me, attempt, reply),
            // A step of an older attempt (rolled back since, its task aborted) may still end:
            // its communicators and result are stale.
            RankMsg::StepEnded(attempt, comms, result) if attempt == s.attempt => {
                s.comms = Some(comms);
                if let Some(r) = s.running.take() {
                    let _ = r.reply.send(result);
                }
            }
            RankMsg::StepEnded(..) => {}
            RankMsg::Restarted(who) | RankMsg::Failure(who) => {
                if let Some(r) = &s.running {
                    let _ = r.report.send(StageReport::Failed {
                        stage: usize::MAX,
                        why: format!("rank {}: {who} restarted or failed", s.a.rank),
                    });
                }
            }
            RankMsg::Snapshot(reply) => {
                let stream = s.stream.clone();
                tokio::spawn(async move {
                    let r = stream
                        .run(Order::STEP, |d| d.store.snapshot(d.dev))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = reply.send(r);
                });
            }
            RankMsg::Restore(snap, attempt, reply) => {
                s.abort(attempt);
                s.comms = match comms(&s.a) {
                    Ok(c) => Some(Box::new(c)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                };
                let stream = s.stream.clone();
                tokio::spawn(async move {
                    let r = stream
                        .run(Order::STEP, move |d| d.store.restore(d.dev, &snap))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = reply.send(r);
                });
            }
            RankMsg::Trace(reply) => {
                let _ = reply.send(Ok(s.stream.spans()));
            }
            RankMsg::CanonicalParams(reply) => {
                let stream = s.stream.clone();
                tokio::spawn(async move {
                    let r = stream
                        .run(Order::STEP, |d| d.store.canonical_params(d.dev))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.ok_or_else(|| "the device holds no values".to_string()));
                    let _ = reply.send(r);
                });
            }
        }
        Ok(())
    }
}

impl RankState {
    /// Drop the step in flight everywhere in the rank; go on as `attempt`.
    fn abort(&mut self, attempt: u64) {
        self.attempt = attempt;
        if let Some(r) = self.running.take() {
            // A step that hangs (the watchdog's case) never ends by itself.
            r.task.abort();
            let _ = r
                .reply
                .send(Err(format!("rank {}: rolled back", self.a.rank)));
        }
        for (_, st) in self.a.links.stages() {
            let _ = st.cast(StageMsg::Abort { attempt });
        }
        if let Some(sh) = self.a.links.shard() {
            let _ = sh.cast(ShardMsg::Abort { attempt });
        }
    }

    fn start_step(
        &mut self,
        me: ActorRef<RankMsg>,
        attempt: u64,
        reply: RpcReplyPort<Result<StepStats, String>>,
    ) {
        let rank = self.a.rank;
        if self.running.is_some() {
            let _ = reply.send(Err(format!("rank {rank}: a step is already running")));
            return;
        }
        let Some(comms) = self.comms.take() else {
            let _ = reply.send(Err(format!("rank {rank}: its communicators are lost")));
            return;
        };
        self.attempt = attempt;
        let (tx, rx) = unbounded_channel();
        let report = tx.clone();
        let ctx = StepCtx {
            rank,
            attempt,
            stream: self.stream.clone(),
            links: Arc::clone(&self.a.links),
            placement: Arc::clone(&self.a.placement),
            shape: Arc::clone(&self.a.shape),
            faults: self.a.faults.clone(),
            order: self.a.config.parallel.start_order,
        };
        let task = tokio::spawn(async move {
            let (comms, result) = ctx.run(comms, tx, rx).await;
            let _ = me.cast(RankMsg::StepEnded(attempt, comms, result));
        });
        self.running = Some(Running {
            reply,
            report,
            task,
        });
    }
}

/// What the step task needs.
struct StepCtx {
    rank: usize,
    attempt: u64,
    stream: Stream,
    links: Arc<RankLinks>,
    placement: Arc<Placement>,
    shape: Arc<ModelShape>,
    faults: Option<Arc<FaultPlan>>,
    order: StartOrder,
}

impl StepCtx {
    async fn run(
        self,
        mut comms: Box<Comms>,
        tx: UnboundedSender<StageReport>,
        rx: UnboundedReceiver<StageReport>,
    ) -> (Box<Comms>, Result<StepStats, String>) {
        let r = self.step(&mut comms, tx, rx).await;
        (comms, r.map_err(|e| format!("rank {}: {e}", self.rank)))
    }

    async fn step(
        &self,
        comms: &mut Comms,
        tx: UnboundedSender<StageReport>,
        mut rx: UnboundedReceiver<StageReport>,
    ) -> Result<StepStats, String> {
        let err = |e: crate::stream::StreamError| e.to_string();
        self.stream.new_step();
        let pp = self.placement.topo.coord(self.rank).pp;
        let list = &self.placement.schedule.ranks[pp];
        *self.links.gate() = Gate::new(
            list.iter().map(|a| a.units().len()).collect(),
            list.iter()
                .map(|a| {
                    a.units()
                        .iter()
                        .filter(|u| u.op == crate::schedule::Op::F)
                        .count()
                })
                .collect(),
            timeline::peak_activations(list).max(1),
            self.order,
        );
        let faults = self.faults.clone();
        let step = self
            .stream
            .run(Order::STEP, move |d| {
                if faults.is_some_and(|f| f.omits_batch(d.store.step)) {
                    d.store.skip_batch();
                }
                d.store.begin_step(d.dev);
                d.store.step
            })
            .await
            .map_err(err)?;
        if let Some(d) = self.faults.as_ref().and_then(|f| f.stall(self.rank, step)) {
            // An injected hang: the rank goes silent in the middle of its step.
            tokio::time::sleep(d).await;
        }
        if let Some(f) = self.faults.as_ref().and_then(|f| f.fire(self.rank, step)) {
            return Err(format!(
                "injected failure at step {step}{}",
                if f.lose_memory { " (memory lost)" } else { "" }
            ));
        }
        let stages: BTreeSet<usize> = self
            .placement
            .stages_of(self.rank)
            .iter()
            .copied()
            .collect();
        let actors = self.links.stages();
        for &st in &stages {
            let a = actors
                .get(&st)
                .ok_or_else(|| format!("stage {st} is not running"))?;
            let plan = StepPlan {
                attempt: self.attempt,
                step,
                report: tx.clone(),
            };
            a.cast(StageMsg::Run(plan))
                .map_err(|e| format!("stage {st}: {e}"))?;
        }
        drop(tx);
        // Reduce each gradient group as soon as its stages' W's are done.
        let mut reducing = tokio::task::JoinSet::new();
        let (mut done, mut weights, mut launched) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let bucket = comms.grads.bucket;
        let launch = |weights: &BTreeSet<usize>,
                      launched: &mut BTreeSet<usize>,
                      comms: &mut Comms,
                      reducing: &mut tokio::task::JoinSet<_>| {
            for i in comms.grads.ready(weights, launched) {
                launched.insert(i);
                let g = &mut comms.grads.groups[i];
                if let Some(c) = g.comm.take() {
                    let (stream, names, sel) = (
                        self.stream.clone(),
                        Arc::clone(&g.names),
                        Arc::clone(&g.sel),
                    );
                    reducing.spawn(async move {
                        let (c, r) = grad_sync::reduce(stream, names, sel, c, bucket).await;
                        (i, c, r)
                    });
                }
            }
        };
        while done != stages {
            match rx.recv().await {
                Some(StageReport::WeightsDone { stage }) => {
                    weights.insert(stage);
                    launch(&weights, &mut launched, comms, &mut reducing);
                }
                Some(StageReport::Done { stage }) => {
                    done.insert(stage);
                }
                Some(StageReport::Failed { why, .. }) => return Err(why),
                None => return Err("the stages stopped reporting".into()),
            }
        }
        launch(&stages, &mut launched, comms, &mut reducing);
        while let Some(joined) = reducing.join_next().await {
            let (i, c, r) = joined.map_err(|e| format!("gradient reduction: {e}"))?;
            comms.grads.groups[i].comm = Some(c);
            r?;
        }
        let local = self
            .stream
            .run(Order::STEP, |d| d.store.local_stats(d.dev))
            .await
            .map_err(err)?;
        let (mut parts, sum_sq, tokens, loads) = reduce_stats(
            &mut comms.world,
            &local,
            &self.shape.moe_layers,
            self.placement.n_experts,
        )
        .await?;
        if let Some(f) = self.faults.as_ref().and_then(|p| p.loss_factor(step)) {
            parts.ce *= f;
        }
        let mut stats = self
            .stream
            .run(Order::STEP, move |d| {
                d.store.apply(d.dev, &parts, sum_sq, &loads)
            })
            .await
            .map_err(err)?
            .map_err(|e| e.to_string())?;
        let cost = self.stream.take_cost();
        stats.tokens = tokens;
        stats.device_seconds = cost.seconds;
        stats.device_flops = cost.flops;
        stats.busy_seconds = self.stream.spans().iter().map(|s| s.end - s.start).sum();
        stats.peak_activations = self.links.gate().peak;
        Ok(stats)
    }
}

/// Bits per digit when integers are summed as f32 digits over `world` ranks: every partial sum
/// of digits stays below 2^24, so f32 adds them exactly in any order.
fn digit_bits(world: usize) -> u32 {
    let log = usize::BITS - world.max(1).saturating_sub(1).leading_zeros();
    24u32.saturating_sub(log).clamp(1, 24)
}

/// The job-wide sums of a step's statistics: the losses, `Σ g²`, the tokens and each MoE layer's
/// expert loads (integers, summed exactly).
async fn reduce_stats(
    world: &mut Communicator,
    local: &LocalStats,
    layers: &[usize],
    n_experts: usize,
) -> Result<(LossParts, f64, u64, BTreeMap<usize, Vec<u64>>), String> {
    let hi = local.sum_sq as f32;
    let lo = (local.sum_sq - f64::from(hi)) as f32;
    let p = &local.parts;
    let f = world
        .all_reduce(
            vec![p.ce, p.mtp, p.balance, hi, lo],
            ReduceOp::Sum,
            Algo::Auto,
        )
        .await
        .map_err(|e| format!("step statistics all-reduce: {e}"))?;
    let mut ints = vec![local.tokens];
    for l in layers {
        match local.loads.get(l) {
            Some(c) => {
                ints.push(1);
                ints.extend(c.iter().copied());
                ints.resize(ints.len() + n_experts.saturating_sub(c.len()), 0);
            }
            None => ints.extend(std::iter::repeat_n(0, n_experts + 1)),
        }
    }
    let bits = digit_bits(world.size());
    let digits = 64u32.div_ceil(bits) as usize;
    let mask = (1u64 << bits) - 1;
    let enc: Vec<f32> = ints
        .iter()
        .flat_map(|&v| (0..digits).map(move |i| ((v >> (i as u32 * bits)) & mask) as f32))
        .collect();
    let sums = world
        .all_reduce(enc, ReduceOp::Sum, Algo::Auto)
        .await
        .map_err(|e| format!("step statistics all-reduce: {e}"))?;
    let ints: Vec<u64> = sums
        .chunks(digits)
        .map(|d| {
            d.iter().enumerate().fold(0u64, |acc, (i, &x)| {
                acc.wrapping_add((x as u64) << (i as u32 * bits))
            })
        })
        .collect();
    let tokens = ints.first().copied().unwrap_or(0);
    let mut loads = BTreeMap::new();
    for (i, &layer) in layers.iter().enumerate() {
        let at = 1 + i * (n_experts + 1);
        if ints.get(at).copied().unwrap_or(0) > 0 {
            loads.insert(layer, ints[at + 1..at + 1 + n_experts].to_vec());
        }
    }
    let parts = LossParts {
        ce: f[0],
        mtp: f[1],
        balance: f[2],
        ..LossParts::default()
    };
    Ok((parts, f64::from(f[3]) + f64::from(f[4]), tokens, loads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_keep_integer_sums_exact() {
        assert_eq!(digit_bits(1), 24);
        assert_eq!(digit_bits(2), 23);
        assert_eq!(digit_bits(128), 17);
        assert_eq!(digit_bits(129), 16);
        // 128 ranks each adding a count of 2^40 + 3: exact through f32 digits.
        let world = 128;
        let bits = digit_bits(world);
        let digits = 64u32.div_ceil(bits);
        let mask = (1u64 << bits) - 1;
        let v: u64 = (1 << 40) + 3;
        let mut acc = vec![0f32; digits as usize];
        for _ in 0..world {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += ((v >> (i as u32 * bits)) & mask) as f32;
            }
        }
        let sum = acc
            .iter()
            .enumerate()
            .fold(0u64, |s, (i, &x)| s + ((x as u64) << (i as u32 * bits)));
        assert_eq!(sum, v * world as u64);
    }
}
