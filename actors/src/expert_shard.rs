//! The expert shard actor: a rank's routed experts (its EP index's share of every MoE layer it
//! holds). Every token-owner of the EP group dispatches rows to it for each (micro-batch, MoE
//! layer); once all of them have (its own rank's part included), it runs the experts on the
//! rank's compute stream — ahead of the stage actors' phases, since peers wait for it — and
//! sends each source its rows back (the combine). B the same way with the gradients. The
//! experts' activations stay on the device, in the rank's store, for their W, which the stage
//! actor's W of the same micro-batch runs in the schedule's order.
//!
//! Messages of another attempt are dropped (a roll-back came since); a source that sends the
//! same part twice, or a part that does not fit the layer, fails the step, naming it.

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_model::EpGroup;
use flotilla_model::layers::moe::{DispatchPart, shard};
use flotilla_runtime::fabric::{Delivery, Fabric, Payload, Rank, Tag, TensorMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::links::RankLinks;
use crate::pipeline::Placement;
use crate::stream::{Class, OnDevice, Order};
use crate::wire::{Key, Kind, SHARD_CHANNEL, STAGE_CHANNEL, from_payload, to_payload};

/// What an expert shard is started with.
#[derive(Clone)]
pub struct ShardArgs {
    pub rank: usize,
    pub placement: Arc<Placement>,
    pub fabric: Arc<dyn Fabric>,
    pub links: Arc<RankLinks>,
}

impl std::fmt::Debug for ShardArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardArgs(rank {})", self.rank)
    }
}

/// Messages to an expert shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Drop what was received; go on with `attempt`.
    Abort { attempt: u64 },
    /// Something from the fabric.
    Net(Delivery),
    /// The experts' work for `key` is done: what goes back to each source, by EP index.
    Done {
        key: Key,
        out: Result<Vec<Payload>, String>,
    },
}

/// The expert shard's state.
pub struct ShardState {
    a: ShardArgs,
    ep: EpGroup,
    ep_ranks: Vec<Rank>,
    attempt: u64,
    /// Parts received, by key, one slot per EP index.
    parts: HashMap<Key, Vec<Option<(Rank, TensorMsg)>>>,
}

/// The expert shard actor.
#[derive(Debug, Default)]
pub struct ExpertShard;

impl Actor for ExpertShard {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        me: ActorRef<ShardMsg>,
        a: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let mut inbox = a.fabric.subscribe(SHARD_CHANNEL)?;
        let pump = me.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                if pump.cast(ShardMsg::Net(d)).is_err() {
                    break;
                }
            }
        });
        let topo = &a.placement.topo;
        let ep = EpGroup {
            size: topo.ep,
            index: topo.coord(a.rank).ep,
        };
        let ep_ranks = topo.ep_group(a.rank);
        a.links.set_shard(me);
        if let Some(r) = a.links.rank_actor() {
            let _ = r.cast(crate::rank::RankMsg::Restarted("expert shard".into()));
        }
        Ok(ShardState {
            a,
            ep,
            ep_ranks,
            attempt: 0,
            parts: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<ShardMsg>,
        msg: ShardMsg,
        s: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Abort { attempt } => {
                s.attempt = attempt;
                s.parts.clear();
            }
            ShardMsg::Net(Delivery::Message { src, tag, payload }) => {
                s.receive(&me, src, tag, payload);
            }
            // The stage actors, which wait for this shard's answers, report failed peers.
            ShardMsg::Net(Delivery::PeerFailed { .. }) => {}
            ShardMsg::Done { key, out } => {
                if key.attempt != s.attempt as u8 {
                    return Ok(());
                }
                match out {
                    Ok(back) => s.answer(key, back),
                    Err(why) => s.fail(key, why),
                }
            }
        }
        Ok(())
    }
}

impl ShardState {
    fn receive(&mut self, me: &ActorRef<ShardMsg>, src: Rank, tag: Tag, payload: Payload) {
        let (Some(key), Ok(msg)) = (Key::of(tag), payload.into_tensor()) else {
            tracing::warn!(
                "rank {}: expert shard dropped a malformed message from rank {src} (tag {tag})",
                self.a.rank
            );
            return;
        };
        if key.attempt != self.attempt as u8 {
            return;
        }
        let slot = self.a.placement.topo.coord(src).ep;
        let parts = self
            .parts
            .entry(key)
            .or_insert_with(|| vec![None; self.ep.size]);
        match parts.get_mut(slot) {
            Some(p @ None) => *p = Some((src, msg)),
            _ => {
                self.fail(key, format!("rank {src} sent {key:?} twice"));
                return;
            }
        }
        if parts.iter().any(Option::is_none) {
            return;
        }
        let Some(all) = self
            .parts
            .remove(&key)
            .and_then(|v| v.into_iter().collect::<Option<Vec<_>>>())
        else {
            return;
        };
        let Some(stream) = self.a.links.stream() else {
            self.fail(key, "the rank's device is gone".into());
            return;
        };
        let ep = self.ep;
        let me = me.clone();
        tokio::spawn(async move {
            let what = if key.kind == Kind::Dispatch {
                "experts"
            } else {
                "experts B"
            };
            let order = Order::new(Class::Experts, key.chunk as u64, what, key.chunk);
            let out = stream
                .run(order, move |d| run_experts(d, ep, key, all))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            let _ = me.cast(ShardMsg::Done { key, out });
        });
    }

    /// Send every source its rows back.
    fn answer(&self, key: Key, back: Vec<Payload>) {
        let Some(kind) = key.kind.answer() else {
            return;
        };
        let stage = self.stage_of(key.layer);
        let tag = Key { kind, ..key }.tag(STAGE_CHANNEL + stage as u32);
        for (dst, payload) in self.ep_ranks.iter().copied().zip(back) {
            let fabric = Arc::clone(&self.a.fabric);
            tokio::spawn(async move {
                // A failed send is a failed peer: its own stage actors and those waiting on
                // this rank report it.
                let _ = fabric.send(dst, tag, payload).await;
            });
        }
    }

    /// The experts' work failed: the rank's step fails with it (and the job driver marks the
    /// rank failed, so that the token-owners waiting for these experts stop at once).
    fn fail(&self, key: Key, why: String) {
        let why = format!(
            "the experts of layer {}, micro-batch {} on rank {}: {why}",
            key.layer, key.chunk, self.a.rank
        );
        match self.a.links.rank_actor() {
            Some(r) => {
                let _ = r.cast(crate::rank::RankMsg::Failure(why));
            }
            None => tracing::error!("{why}"),
        }
    }

    /// The stage that runs MoE layer `layer` (an MTP block's is the last stage).
    fn stage_of(&self, layer: usize) -> usize {
        let specs = &self.a.placement.specs;
        specs
            .iter()
            .position(|s| s.layers.contains(&layer))
            .unwrap_or(specs.len() - 1)
    }
}

/// On the device: the experts of `key.layer` on every source's part, forward or B.
fn run_experts(
    d: &mut OnDevice<'_>,
    ep: EpGroup,
    key: Key,
    parts: Vec<(Rank, TensorMsg)>,
) -> Result<Vec<Payload>, String> {
    let hidden = d.store.model.config.hidden_size;
    let what = format!("experts of layer {}, micro-batch {}", key.layer, key.chunk);
    let m = d
        .store
        .model
        .moe(key.layer)
        .ok_or_else(|| format!("{what}: not a MoE layer"))?;
    let out = match key.kind {
        Kind::Dispatch => {
            let parts = parts
                .into_iter()
                .map(|(src, msg)| {
                    let (rows, counts) = from_payload(d.dev, src, msg, hidden)?;
                    Ok(DispatchPart { counts, rows })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let ids = ep.mine(m.n_experts());
            let (out, cache) = shard::forward(d.dev, &m.experts, ids, hidden, parts)
                .map_err(|e| format!("{what}: {e}"))?;
            d.store.shards.insert((key.chunk, key.layer), cache);
            out
        }
        Kind::GradDispatch => {
            let grads = parts
                .into_iter()
                .map(|(src, msg)| from_payload(d.dev, src, msg, hidden).map(|(t, _)| t))
                .collect::<Result<Vec<_>, String>>()?;
            let cache = d
                .store
                .shards
                .get_mut(&(key.chunk, key.layer))
                .ok_or_else(|| format!("{what}: B before the forward"))?;
            shard::backward_input(d.dev, &m.experts, cache, grads)
                .map_err(|e| format!("{what}: {e}"))?
        }
        other => return Err(format!("{what}: a {other:?} on the shard's channel")),
    };
    // What goes back to this rank's own stage stays on the device.
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(p, t)| to_payload(d.dev, t, &[], p == ep.index))
        .collect())
}
