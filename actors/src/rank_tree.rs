//! A rank's subtree of the supervision tree (DESIGN.md: "rank × local GPUs (rest_for_one)"):
//!
//! ```text
//! rank-r            supervisor, rest_for_one
//! ├── rank          the rank actor: its device, its state, its steps
//! ├── experts       the expert shard
//! └── stage-s × 1-2 the pipeline stage actors
//! ```
//!
//! Every child is permanent: a rank without any of them cannot train. `rest_for_one`, because
//! the later children depend on the earlier ones: a restarted rank actor has a fresh device and
//! state (the job driver then restores it at the roll-back), so the shard and the stages that
//! ran phases on the old one start afresh too; a restarted shard restarts the stages that
//! dispatched to it; a restarted stage actor restarts the stages after it. A child that starts
//! again tells the rank actor, which fails the step in flight; the job driver rolls every rank
//! back to the last checkpoint and replays. More than `max_restarts` restarts within
//! `within_s` and the subtree gives up: it stops and escalates to the controller, and the job
//! ends with a report naming the rank.

use std::sync::Arc;

use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::supervision::{ChildSpec, EventSender, Restart, Strategy, SupervisorPolicy};

use crate::error::JobError;
use crate::expert_shard::{ExpertShard, ShardArgs};
use crate::faults::FaultPlan;
use crate::links::RankLinks;
use crate::pipeline::{ModelShape, Placement};
use crate::rank::{RankActor, RankArgs};
use crate::stage::{StageActor, StageArgs};

/// Everything a rank's subtree is built from.
#[derive(Clone)]
pub struct RankTree {
    pub rank: usize,
    pub config: Arc<Config>,
    pub placement: Arc<Placement>,
    pub shape: Arc<ModelShape>,
    pub dataset: Arc<flotilla_model::data::TokenDataset>,
    pub fabric: Arc<dyn Fabric>,
    pub clock: Arc<dyn Clock>,
    pub faults: Option<Arc<FaultPlan>>,
    /// Stage actions in progress at once, per stage actor.
    pub window: usize,
    /// See [`crate::rank::RankArgs::on_device_thread`].
    pub on_device_thread: Option<crate::rank::DeviceThreadHook>,
}

impl RankTree {
    /// The subtree's spec, and the links through which its actors (and the job driver) find
    /// each other.
    pub fn spec(self, events: EventSender) -> Result<(ChildSpec, Arc<RankLinks>), JobError> {
        let r = self.rank;
        let links = Arc::new(RankLinks::new(r));
        let policy = SupervisorPolicy::from_supervision(&self.config.supervision)?
            .with_strategy(Strategy::RestForOne)
            .on_clock(self.clock.as_ref());
        let shutdown = policy.child_shutdown();
        let rank = RankArgs {
            rank: r,
            config: Arc::clone(&self.config),
            placement: Arc::clone(&self.placement),
            shape: Arc::clone(&self.shape),
            dataset: Arc::clone(&self.dataset),
            fabric: Arc::clone(&self.fabric),
            links: Arc::clone(&links),
            clock: Arc::clone(&self.clock),
            faults: self.faults.clone(),
            on_device_thread: self.on_device_thread.clone(),
        };
        let shard = ShardArgs {
            rank: r,
            placement: Arc::clone(&self.placement),
            fabric: Arc::clone(&self.fabric),
            links: Arc::clone(&links),
        };
        let mut spec = policy
            .spec()?
            .child(
                ChildSpec::for_actor("rank", move || (RankActor, rank.clone()))
                    .with_restart(Restart::Permanent)
                    .with_shutdown(shutdown),
            )
            .child(
                ChildSpec::for_actor("experts", move || (ExpertShard, shard.clone()))
                    .with_restart(Restart::Permanent)
                    .with_shutdown(shutdown),
            );
        for &s in self.placement.stages_of(r) {
            let stage = StageArgs {
                rank: r,
                stage: s,
                placement: Arc::clone(&self.placement),
                fabric: Arc::clone(&self.fabric),
                links: Arc::clone(&links),
                clock: Arc::clone(&self.clock),
                window: self.window,
                deadline: self.config.supervision.peer_timeout(),
                faults: self.faults.clone(),
            };
            spec = spec.child(
                ChildSpec::for_actor(&format!("stage-{s}"), move || (StageActor, stage.clone()))
                    .with_restart(Restart::Permanent)
                    .with_shutdown(shutdown),
            );
        }
        let spec = spec.observer(events).with_label(format!("rank-{r}"));
        // The job driver rolls a failed rank back; the controller does not restart a rank
        // whose subtree gave up.
        let child =
            ChildSpec::supervisor(format!("rank-{r}"), spec).with_restart(Restart::Temporary);
        Ok((child, links))
    }
}
