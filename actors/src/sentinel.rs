//! The sentinel actor (TRANSOM's TEE, DESIGN.md: "controller → sentinel"): the job driver
//! shows it every step's job-wide statistics, and it answers with what its detectors
//! ([`crate::anomaly`]) find anomalous; the driver writes each finding to `events.jsonl` and the
//! `flotilla_anomalies_total` counter.
//!
//! It runs when the config has a `[sentinel]` section with `enabled = true`, as a `temporary`
//! child of the controller's supervisor (after the ranks and the checkpoint coordinator): its
//! state is only its running windows, and restarting it would restart the whole job under the
//! root's `one_for_all`. If it is gone, the driver says so once in `events.jsonl` and trains on
//! without it.
//!
//! What it finds is reported; the one action, skipping a bad batch, the ranks take by
//! themselves: every rank runs the same loss-spike rule ([`crate::anomaly::SpikeGuard`]) on the
//! same job-wide loss before its update, and skips a step whose loss spikes or is not finite
//! (no update; the batch is consumed). Acting on stragglers and hangs (roll back, evict) is the
//! distributed controller's (issue #8).

use flotilla_runtime::config::SentinelConfig;
use flotilla_runtime::supervision::{ChildSpec, Restart, SupervisorHandle};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use flotilla_runtime::metrics as names;
use serde::Serialize;

use crate::anomaly::{Anomaly, Detectors, Observation};
use crate::error::JobError;
use crate::run_log::{EventLine, RunLog};

/// The sentinel's child id under the controller.
pub const CHILD_ID: &str = "sentinel";

/// Messages to the sentinel.
#[derive(Debug)]
pub enum SentinelMsg {
    /// One step's statistics; the answer is what is anomalous in it.
    Observe(Observation, RpcReplyPort<Vec<Anomaly>>),
}

/// The sentinel actor.
#[derive(Debug, Default)]
pub struct Sentinel;

impl Actor for Sentinel {
    type Msg = SentinelMsg;
    type State = Detectors;
    type Arguments = SentinelConfig;

    async fn pre_start(
        &self,
        _me: ActorRef<SentinelMsg>,
        cfg: SentinelConfig,
    ) -> Result<Detectors, ActorProcessingErr> {
        Ok(Detectors::new(&cfg))
    }

    async fn handle(
        &self,
        _me: ActorRef<SentinelMsg>,
        msg: SentinelMsg,
        detectors: &mut Detectors,
    ) -> Result<(), ActorProcessingErr> {
        let SentinelMsg::Observe(o, reply) = msg;
        // The driver may have given up waiting: nothing to answer then.
        let _ = reply.send(detectors.observe(&o));
        Ok(())
    }
}

/// The sentinel's child spec, unless `s` says `enabled = false`.
pub fn child_spec(s: &SentinelConfig) -> Option<ChildSpec> {
    if !s.enabled {
        return None;
    }
    let cfg = s.clone();
    Some(
        ChildSpec::for_actor(CHILD_ID, move || (Sentinel, cfg.clone()))
            .with_restart(Restart::Temporary),
    )
}

/// The driver's handle on the sentinel.
#[derive(Debug, Clone)]
pub struct SentinelClient {
    actor: ActorRef<SentinelMsg>,
}

impl SentinelClient {
    /// The sentinel under `sup`, if one runs.
    pub async fn find(sup: &SupervisorHandle) -> Option<SentinelClient> {
        let cell = sup.child(CHILD_ID).await.ok()?.cell?;
        (cell.is_message_type_of::<SentinelMsg>() == Some(true))
            .then(|| SentinelClient { actor: cell.into() })
    }

    /// What is anomalous in `o`, or why the sentinel did not answer.
    pub async fn observe(&self, o: Observation) -> Result<Vec<Anomaly>, String> {
        match self.actor.call(|r| SentinelMsg::Observe(o, r), None).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err("no answer".into()),
            Ok(CallResult::SenderError) => Err("it stopped without answering".into()),
            Err(_) => Err("its mailbox is closed".into()),
        }
    }

    /// Shows the sentinel a step and writes what it finds to `events.jsonl` and the anomaly
    /// counter; `false` when the sentinel is gone (said once in `events.jsonl`).
    pub async fn report(&self, o: Observation, log: &RunLog) -> Result<bool, JobError> {
        #[derive(Serialize)]
        struct AnomalyLine<'a> {
            supervisor: &'a str,
            child: &'a str,
            event: String,
            anomaly: &'a Anomaly,
        }
        let step = o.step;
        match self.observe(o).await {
            Ok(found) => {
                for a in &found {
                    metrics::counter!(names::ANOMALIES, "kind" => a.kind.as_str()).increment(1);
                    tracing::warn!("sentinel: {a}");
                    let line = AnomalyLine {
                        supervisor: "controller",
                        child: CHILD_ID,
                        event: format!("anomaly: {a}"),
                        anomaly: a,
                    };
                    log.event(&line).await?;
                }
                Ok(true)
            }
            Err(why) => {
                let line = EventLine {
                    supervisor: "controller".into(),
                    child: CHILD_ID.into(),
                    event: format!(
                        "sentinel lost at step {step} ({why}): training goes on without anomaly detection"
                    ),
                };
                log.event(&line).await?;
                Ok(false)
            }
        }
    }
}
