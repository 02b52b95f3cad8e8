//! Pipeline stages: the model as a sequence of pieces that run forward and backward on their
//! own, each split at its communication points into phases.
//!
//! A [`StageSpec`] names a contiguous piece: the embedding (first stage), decoder layers `a..b`,
//! and the head (last stage: final norm, `lm_head`, the loss, and the MTP modules, which need the
//! embedding and `lm_head` too — a pipeline keeps a copy of the embedding on the last stage and
//! sums its gradient with the first stage's, as DeepSeek-V3 does). A stage exchanges
//! `[n, hidden]` tensors with its neighbours:
//!
//! ```text
//! ForwardPass  (input hidden | token ids)  -> output hidden (or the losses, on the head stage)
//! BackwardPass (d output)                  -> d input  (B; leaves in the cache what W needs)
//! stage_backward_weight                    -> grads += ...  (W; can run later, for ZB/DualPipe)
//! ```
//! A pass never waits for a message. [`ForwardPass::step`] runs until the next MoE layer's
//! dispatch and returns it ([`Yield::Dispatch`]); called again it runs the shared expert and
//! returns [`Yield::Await`]; called with what the EP group sent back it finishes the layer and
//! goes on. B is the same with the gradient dispatch. Whoever drives the pass (the pipeline
//! stage actor over the fabric, or [`DeepSeekV3::forward_backward`] with every expert local)
//! decides what runs meanwhile: that is where the overlap of DeepSeek-V3's F&B pairs comes from.
//! The routed experts' own work is not in a pass: it runs on the expert-owner
//! ([`crate::layers::moe::shard`], or [`crate::layers::local::LocalExperts`] on one rank).

mod backward;
mod forward;

pub use backward::BackwardPass;
pub use forward::ForwardPass;

use std::ops::Range;

use crate::config::{ConfigError, ModelConfig};
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::block::{BlockCache, BlockDys};
use crate::layers::local::LocalExperts;
use crate::layers::loss::{self, LmLossCache, LmLossDys};
use crate::layers::moe::{DispatchPart, MoeError, ShardError};
use crate::layers::mtp::{MtpCache, MtpDys};
use crate::layers::router::ExpertLoad;
use crate::model::{Batch, DeepSeekV3, LossParts, Weights};
use crate::tensor::Tensor;

/// Which part of the model a stage runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageSpec {
    /// Runs the token embedding (the stage takes token ids, not hidden states).
    pub embed: bool,
    /// Decoder layers of this stage.
    pub layers: Range<usize>,
    /// Runs the final norm, `lm_head`, the losses and the MTP modules.
    pub head: bool,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(cfg: &ModelConfig) -> StageSpec {
        StageSpec {
            embed: true,
            layers: 0..cfg.num_hidden_layers,
            head: true,
        }
    }

    /// `stages` contiguous stages with layers spread as evenly as possible (earlier stages get
    /// the extra layers); the embedding goes to the first, the head to the last.
    pub fn split(cfg: &ModelConfig, stages: usize) -> Vec<StageSpec> {
        StageSpec::from_counts(&StageSpec::even_layers(cfg.num_hidden_layers, stages))
    }

    /// The decoder layers per stage of [`StageSpec::split`]: `layers` over `stages` (at least
    /// one) as evenly as possible, earlier stages getting the extra.
    pub fn even_layers(layers: usize, stages: usize) -> Vec<usize> {
        let stages = stages.max(1);
        (0..stages)
            .map(|s| layers / stages + usize::from(s < layers % stages))
            .collect()
    }

    /// Contiguous stages holding `layers[s]` decoder layers each, in order (Megatron's first- and
    /// last-stage layer counts, in general form); the embedding goes to the first stage, the head
    /// to the last. The counts must be non-empty and sum to `num_hidden_layers`; a stage of zero
    /// layers is allowed here (it passes its input on), a config may refuse it.
    pub fn split_layers(
        cfg: &ModelConfig,
        layers: &[usize],
    ) -> Result<Vec<StageSpec>, StageSplitError> {
        if layers.is_empty() {
            return Err(StageSplitError::NoStages);
        }
        let sum = layers
            .iter()
            .try_fold(0usize, |acc, &l| acc.checked_add(l))
            .unwrap_or(usize::MAX);
        if sum != cfg.num_hidden_layers {
            return Err(StageSplitError::LayerCount {
                sum,
                layers: cfg.num_hidden_layers,
            });
        }
        Ok(StageSpec::from_counts(layers))
    }

    /// Contiguous stages of `counts[s]` layers (at least one stage).
    fn from_counts(counts: &[usize]) -> Vec<StageSpec> {
        let stages = counts.len().max(1);
        let mut start = 0;
        (0..stages)
            .map(|s| {
                let len = counts.get(s).copied().unwrap_or(0);
                let spec = StageSpec {
                    embed: s == 0,
                    layers: start..start + len,
                    head: s + 1 == stages,
                };
                start += len;
                spec
            })
            .collect()
    }
}

/// Why [`StageSpec::split_layers`] refused a split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StageSplitError {
    /// No stage counts at all.
    #[error("a split needs at least one stage")]
    NoStages,
    /// The counts do not add up to the model's decoder layers.
    #[error("the stages hold {sum} decoder layers, the model has {layers}")]
    LayerCount {
        /// Sum of the counts (saturating).
        sum: usize,
        /// `num_hidden_layers`.
        layers: usize,
    },
}

/// What a stage's forward produces.
#[derive(Debug)]
pub struct StageOutput {
    /// Hidden states `[n, hidden]` for the next stage (`None` on the head stage).
    pub hidden: Option<Tensor>,
    /// This stage's part of the loss (the head stage has `ce` and `mtp`; every stage with MoE
    /// layers has `balance`). Merge the stages' parts with [`LossParts::merge`].
    pub losses: LossParts,
    /// Router loads of this stage's MoE layers.
    pub loads: Vec<ExpertLoad>,
    /// Main logits (head stage, when asked).
    pub logits: Option<Tensor>,
}

/// Where a pass stopped, and what its driver does before calling `step` again.
#[derive(Debug)]
pub enum Yield {
    /// Send `parts[p]` to EP index `p` as the dispatch of MoE layer `layer`, then call `step`
    /// again at once (the shared expert runs while the rows travel).
    Dispatch {
        layer: usize,
        parts: Vec<DispatchPart>,
    },
    /// B: send `parts[p]` to EP index `p` as the gradient dispatch of `layer` (the gradients of
    /// the rows it sent back), then call `step` again at once.
    GradDispatch { layer: usize, parts: Vec<Tensor> },
    /// Call `step` with what the EP group sent back for `layer` (`back[p]` from index `p`).
    Await { layer: usize },
    /// The pass is over: take its result with `finish`.
    Done,
}

/// Why a pass cannot go on (a driver's mistake, or parts that do not fit).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Moe(#[from] MoeError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("resumed without what layer {layer} waits for")]
    NotReady { layer: usize },
    #[error("resumed with parts it did not wait for")]
    Unexpected,
    #[error("a stage without the embedding needs an input (and one with it takes none)")]
    Input,
    #[error("finished before its last phase")]
    Unfinished,
    #[error("layer {0} has no routed experts")]
    NotMoe(usize),
}

/// Where in its layer a pass is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Up to the (gradient) dispatch, or the whole layer when it has none.
    Front,
    /// The shared expert, while the dispatch travels.
    Shared,
    /// After the (gradient) combine.
    Finish,
}

/// One MTP depth's activations.
#[derive(Debug)]
struct MtpStep {
    ids: Vec<u32>,
    cache: MtpCache,
    h: Tensor,
    loss: LmLossCache,
}

#[derive(Debug)]
struct HeadCache {
    /// The main model's last hidden state (pre-norm), `h_0` of MTP.
    h: Tensor,
    main: LmLossCache,
    mtp: Vec<MtpStep>,
}

#[derive(Debug)]
struct HeadDys {
    main: LmLossDys,
    /// Per MTP depth: module dys, loss-head dys, gradient of its embedding input.
    mtp: Vec<(MtpDys, LmLossDys, Tensor)>,
}

/// Everything a stage's backward needs, from its forward (and, after B, what W needs).
#[derive(Debug)]
pub struct StageCache {
    spec: StageSpec,
    batch: Batch,
    rope: std::sync::Arc<Tensor>,
    balance_alpha: f32,
    blocks: Vec<BlockCache>,
    block_dys: Vec<Option<BlockDys>>,
    head: Option<HeadCache>,
    head_dys: Option<HeadDys>,
    d_embed: Option<Tensor>,
}

impl StageCache {
    fn ctx<'a>(&'a self, dev: &'a dyn Device) -> Ctx<'a> {
        Ctx {
            dev,
            batch: self.batch.batch,
            seq: self.batch.seq,
            rope: &self.rope,
            balance_alpha: self.balance_alpha,
        }
    }

    /// The stage this cache belongs to.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// The MoE layers whose forward this cache holds (the stage's decoder layers, then the MTP
    /// modules' blocks that ran).
    pub fn moe_layers(&self, model: &DeepSeekV3) -> Vec<usize> {
        let n = model.weights.layers.len();
        let mtp = self.head.as_ref().map_or(0, |h| h.mtp.len());
        self.spec
            .layers
            .clone()
            .chain(n..n + mtp)
            .filter(|&l| model.moe(l).is_some())
            .collect()
    }
}

impl DeepSeekV3 {
    /// The MoE of layer `layer` (decoder layers first, then the MTP modules' blocks).
    pub fn moe(&self, layer: usize) -> Option<&crate::layers::moe::Moe> {
        let w = &self.weights;
        match w.layers.get(layer) {
            Some(b) => b.moe(),
            None => w.mtp.get(layer - w.layers.len())?.block.moe(),
        }
    }

    /// Runs a pass to its end with every routed expert on this rank: `step` is the pass's
    /// `step`, the experts' activations go to `experts` (for B and W).
    pub fn drive_local(
        &self,
        dev: &dyn Device,
        experts: &mut LocalExperts,
        mut step: impl FnMut(Option<Vec<Tensor>>) -> Result<Yield, PassError>,
    ) -> Result<(), PassError> {
        let (mut ready, mut back) = (None, None);
        loop {
            match step(back.take())? {
                Yield::Dispatch { layer, parts } => {
                    let moe = self.moe(layer).ok_or(PassError::NotMoe(layer))?;
                    ready = Some(experts.forward(dev, moe, parts)?);
                }
                Yield::GradDispatch { layer, parts } => {
                    let moe = self.moe(layer).ok_or(PassError::NotMoe(layer))?;
                    ready = Some(experts.backward_input(dev, moe, parts)?);
                }
                Yield::Await { layer } => {
                    back = Some(ready.take().ok_or(PassError::NotReady { layer })?);
                }
                Yield::Done => return Ok(()),
            }
        }
    }

    /// W of one stage: accumulates its weight gradients into `grads`, the routed experts' too
    /// when their activations are in `experts` (a single rank); a pipeline rank's expert-owner
    /// runs theirs itself. Needs the cache after B.
    pub fn stage_backward_weight(
        &self,
        dev: &dyn Device,
        cache: StageCache,
        grads: &mut Weights,
        experts: Option<&mut LocalExperts>,
    ) -> Result<(), PassError> {
        let layers = cache.moe_layers(self);
        self.dense_backward_weight(dev, cache, grads)?;
        if let Some(ex) = experts {
            for l in layers {
                let (Some(moe), Some(g)) = (self.moe(l), grads.moe_mut(l)) else {
                    return Err(PassError::NotMoe(l));
                };
                ex.backward_weight(dev, moe, g)?;
            }
        }
        Ok(())
    }

    /// The dense part of [`Self::stage_backward_weight`] (everything but the routed experts).
    fn dense_backward_weight(
        &self,
        dev: &dyn Device,
        cache: StageCache,
        grads: &mut Weights,
    ) -> Result<(), PassError> {
        let w = &self.weights;
        let ctx = cache.ctx(dev);
        if cache.block_dys.len() != cache.blocks.len()
            || (cache.head.is_some() && cache.head_dys.is_none())
        {
            return Err(PassError::Unfinished);
        }
        let Weights {
            embed_tokens: g_embed,
            layers: g_layers,
            norm: g_norm,
            lm_head: g_lm_head,
            mtp: g_mtp,
        } = grads;
        // The decoder layers' W and the head's (lm_head, MTP modules) touch disjoint gradients
        // and are of similar size on the default model: the device runs them side by side. Each
        // gradient is still accumulated in the same order as one after the other would.
        let mut layers_w = || {
            for ((i, c), dys) in cache
                .spec
                .layers
                .clone()
                .zip(&cache.blocks)
                .zip(&cache.block_dys)
            {
                if let Some(dys) = dys {
                    w.layers[i].backward_weight(&ctx, c, dys, &mut g_layers[i]);
                }
            }
        };
        let mut head_w = || {
            if let (Some(head), Some(hd)) = (&cache.head, &cache.head_dys) {
                loss::backward_weight(
                    dev, &w.norm, &w.lm_head, &head.h, &head.main, &hd.main, g_norm, g_lm_head,
                );
                for (k, (step, (mdys, ldys, d_emb))) in head.mtp.iter().zip(&hd.mtp).enumerate() {
                    let module = &w.mtp[k];
                    let g = &mut g_mtp[k];
                    loss::backward_weight(
                        dev,
                        &module.shared_head_norm,
                        &w.lm_head,
                        &step.h,
                        &step.loss,
                        ldys,
                        &mut g.shared_head_norm,
                        g_lm_head,
                    );
                    let prev = if k == 0 { &head.h } else { &head.mtp[k - 1].h };
                    module.backward_weight(&ctx, prev, &step.cache, mdys, g);
                    w.embed_tokens
                        .backward_weight(dev, &step.ids, d_emb, g_embed);
                }
            }
        };
        dev.join(&mut layers_w, &mut head_w);
        if let Some(d) = &cache.d_embed {
            w.embed_tokens
                .backward_weight(dev, &cache.batch.input_ids, d, g_embed);
        }
        Ok(())
    }
}

/// Token ids shifted left by `k` within each sequence (positions past the end get id 0; their
/// predictions are never scored).
fn shifted_ids(ids: &[u32], batch: usize, seq: usize, k: usize) -> Vec<u32> {
    let mut out = vec![0u32; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(k) {
            out[b * seq + t] = ids[b * seq + t + k];
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layers: usize) -> ModelConfig {
        let mut c = ModelConfig::tiny();
        c.num_hidden_layers = layers;
        c
    }

    fn spans(specs: &[StageSpec]) -> Vec<(bool, Range<usize>, bool)> {
        specs
            .iter()
            .map(|s| (s.embed, s.layers.clone(), s.head))
            .collect()
    }

    #[test]
    fn split_layers_cuts_where_told_and_split_is_its_even_case() {
        let c = cfg(4);
        let specs = StageSpec::split_layers(&c, &[3, 1]).expect("valid split");
        assert_eq!(spans(&specs), [(true, 0..3, false), (false, 3..4, true)]);
        let specs = StageSpec::split_layers(&c, &[1, 2, 1]).expect("valid split");
        assert_eq!(
            spans(&specs),
            [
                (true, 0..1, false),
                (false, 1..3, false),
                (false, 3..4, true)
            ]
        );
        assert_eq!(
            spans(&StageSpec::split_layers(&c, &[4]).expect("one stage")),
            spans(&[StageSpec::whole(&c)])
        );
        for (layers, stages) in [(4, 2), (4, 3), (5, 2), (3, 4), (7, 1)] {
            let c = cfg(layers);
            let even = StageSpec::even_layers(layers, stages);
            assert_eq!(even.iter().sum::<usize>(), layers);
            assert_eq!(
                StageSpec::split_layers(&c, &even),
                Ok(StageSpec::split(&c, stages)),
                "{layers} layers in {stages} stages"
            );
        }
        assert_eq!(StageSpec::even_layers(4, 3), [2, 1, 1]);
        assert_eq!(StageSpec::even_layers(3, 4), [1, 1, 1, 0]);
    }

    #[test]
    fn split_layers_refuses_counts_that_do_not_fit() {
        let c = cfg(4);
        assert_eq!(
            StageSpec::split_layers(&c, &[]),
            Err(StageSplitError::NoStages)
        );
        assert_eq!(
            StageSpec::split_layers(&c, &[3, 2]),
            Err(StageSplitError::LayerCount { sum: 5, layers: 4 })
        );
        assert_eq!(
            StageSpec::split_layers(&c, &[usize::MAX, 2]),
            Err(StageSplitError::LayerCount {
                sum: usize::MAX,
                layers: 4
            })
        );
    }
}
