//! Pipeline stages: the model as a sequence of pieces that run forward and backward on their own.
//!
//! A [`StageSpec`] names a contiguous piece: the embedding (first stage), decoder layers `a..b`, and
//! the head (last stage: final norm, `lm_head`, the loss, and the MTP modules, which need the
//! embedding and `lm_head` too — a pipeline keeps a copy of the embedding on the last stage and
//! sums its gradient with the first stage's, as DeepSeek-V3 does). A stage exchanges `[n, hidden]`
//! tensors with its neighbours:
//!
//! ```text
//! stage_forward(input hidden | token ids)  -> output hidden (or the losses, on the head stage)
//! stage_backward_input(d output)           -> d input        (B; stashes what W needs)
//! stage_backward_weight()                  -> grads += ...   (W; can run later, for ZB/DualPipe)
//! ```
//! [`crate::model::DeepSeekV3::forward_backward`] is the single stage that holds everything.
//!
//! Under expert parallelism the MoE layers exchange rows with the EP group in forward and B:
//! [`DeepSeekV3::stage_forward_ep`] and [`DeepSeekV3::stage_backward_input_ep`] take the group
//! (every rank of the group runs the same stages in the same order); W needs no exchange.

use std::ops::Range;

use crate::config::{ConfigError, ModelConfig};
use crate::device::Device;
use crate::layers::block::{BlockCache, BlockDys};
use crate::layers::expert_exchange::ExpertExchange;
use crate::layers::loss::{self, LmLossCache, LmLossDys, shifted_targets};
use crate::layers::mtp::{MtpCache, MtpDys};
use crate::layers::router::ExpertLoad;
use crate::layers::{Ctx, rope};
use crate::model::{Batch, DeepSeekV3, LossParts, StepOptions, Weights};
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
    rope: Tensor,
    balance_alpha: f32,
    blocks: Vec<BlockCache>,
    block_dys: Vec<Option<BlockDys>>,
    head: Option<HeadCache>,
    head_dys: Option<HeadDys>,
    d_embed: Option<Tensor>,
}

impl StageCache {
    fn ctx<'a>(&'a self, dev: &'a dyn Device, ep: Option<&'a dyn ExpertExchange>) -> Ctx<'a> {
        Ctx {
            dev,
            batch: self.batch.batch,
            seq: self.batch.seq,
            rope: &self.rope,
            balance_alpha: self.balance_alpha,
            ep,
        }
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

impl DeepSeekV3 {
    /// Forward of one stage. `input` is the previous stage's hidden output (`None` for a stage
    /// with the embedding). Panics if the batch or input does not fit the model (programming error).
    pub fn stage_forward(
        &self,
        dev: &dyn Device,
        spec: &StageSpec,
        batch: &Batch,
        input: Option<Tensor>,
        opts: &StepOptions,
    ) -> Result<(StageOutput, StageCache), ConfigError> {
        self.stage_forward_ep(dev, spec, batch, input, opts, None)
    }

    /// [`DeepSeekV3::stage_forward`] with the MoE layers' routed experts spread over the EP group
    /// `ep` (`None`, or a group of one: every expert local). This rank's model needs only its own
    /// experts' tensors; the losses and loads are this rank's micro-batch's.
    pub fn stage_forward_ep(
        &self,
        dev: &dyn Device,
        spec: &StageSpec,
        batch: &Batch,
        input: Option<Tensor>,
        opts: &StepOptions,
        ep: Option<&dyn ExpertExchange>,
    ) -> Result<(StageOutput, StageCache), ConfigError> {
        let (b, t) = (batch.batch, batch.seq);
        assert!(
            batch.input_ids.len() == b * t && batch.labels.len() == b * t,
            "batch is not {b}x{t}"
        );
        let w = &self.weights;
        let rope_table = rope::table(&self.config, dev, t)?;
        let ctx = Ctx {
            dev,
            batch: b,
            seq: t,
            rope: &rope_table,
            balance_alpha: opts.balance_alpha,
            ep,
        };
        let mut losses = LossParts::default();
        let mut loads = Vec::new();
        let mut blocks = Vec::with_capacity(spec.layers.len());

        let mut x = if spec.embed {
            w.embed_tokens.forward(dev, &batch.input_ids)
        } else {
            input.expect("stage_forward: a stage without the embedding needs an input")
        };
        for i in spec.layers.clone() {
            let block = &w.layers[i];
            let (y, c) = block.forward(&ctx, x);
            loads.extend(block.load(&c));
            losses.balance += block.balance_loss(&c);
            blocks.push(c);
            x = y;
        }
        let mut cache = StageCache {
            spec: spec.clone(),
            batch: batch.clone(),
            rope: dev.empty(&[0]),
            balance_alpha: opts.balance_alpha,
            blocks,
            block_dys: Vec::new(),
            head: None,
            head_dys: None,
            d_embed: None,
        };
        if !spec.head {
            cache.rope = rope_table;
            return Ok((
                StageOutput {
                    hidden: Some(x),
                    losses,
                    loads,
                    logits: None,
                },
                cache,
            ));
        }

        let depth = if opts.mtp_lambda > 0.0 {
            w.mtp.len()
        } else {
            0
        };
        // The main loss and the MTP modules both only read `x`: the device runs them side by side.
        let mut main = None;
        let mut main_loss = || {
            let targets = shifted_targets(&batch.labels, b, t, 1);
            main = Some(loss::forward(
                dev,
                &w.norm,
                &w.lm_head,
                &x,
                &targets,
                1.0,
                opts.keep_logits,
            ));
        };
        let mut mtp: Vec<MtpStep> = Vec::with_capacity(depth);
        let (mut mtp_loads, mut mtp_balance, mut mtp_per_depth) = (Vec::new(), 0.0f32, Vec::new());
        let mut mtp_modules = || {
            for k in 0..depth {
                let module = &w.mtp[k];
                let ids = shifted_ids(&batch.input_ids, b, t, k + 1);
                let emb = w.embed_tokens.forward(dev, &ids);
                let prev = if k == 0 { &x } else { &mtp[k - 1].h };
                let (h, mc) = module.forward(&ctx, prev, emb);
                mtp_loads.extend(module.block.load(&mc.block));
                mtp_balance += module.block.balance_loss(&mc.block);
                let targets = shifted_targets(&batch.labels, b, t, k + 2);
                let l = loss::forward(
                    dev,
                    &module.shared_head_norm,
                    &w.lm_head,
                    &h,
                    &targets,
                    opts.mtp_lambda / depth as f32,
                    false,
                );
                mtp_per_depth.push(l.loss);
                mtp.push(MtpStep {
                    ids,
                    cache: mc,
                    h,
                    loss: l,
                });
            }
        };
        dev.join(&mut main_loss, &mut mtp_modules);
        let mut main = main.expect("the main loss ran");
        losses.ce = main.loss;
        let logits = main.logits.take();
        loads.extend(mtp_loads);
        losses.balance += mtp_balance;
        losses.mtp_per_depth = mtp_per_depth;
        let head = HeadCache { h: x, main, mtp };
        if depth > 0 {
            losses.mtp = opts.mtp_lambda / depth as f32 * losses.mtp_per_depth.iter().sum::<f32>();
        }
        cache.head = Some(head);
        cache.rope = rope_table;
        Ok((
            StageOutput {
                hidden: None,
                losses,
                loads,
                logits,
            },
            cache,
        ))
    }

    /// B of one stage: `d_out` is the gradient of this stage's hidden output (`None` on the head
    /// stage, whose gradient starts at the loss). Returns the gradient of the stage's input
    /// (`None` for the stage with the embedding).
    pub fn stage_backward_input(
        &self,
        dev: &dyn Device,
        cache: &mut StageCache,
        d_out: Option<Tensor>,
    ) -> Option<Tensor> {
        self.stage_backward_input_ep(dev, cache, d_out, None)
    }

    /// [`DeepSeekV3::stage_backward_input`] under expert parallelism: `ep` must be the group the
    /// forward ran with (the cache cannot hold it).
    pub fn stage_backward_input_ep(
        &self,
        dev: &dyn Device,
        cache: &mut StageCache,
        d_out: Option<Tensor>,
        ep: Option<&dyn ExpertExchange>,
    ) -> Option<Tensor> {
        let w = &self.weights;
        let ctx = cache.ctx(dev, ep);
        let mut head_dys = None;
        let mut d = match &cache.head {
            Some(head) => {
                // The main loss's B and the MTP modules' B are independent until their input
                // gradients are summed: the device runs them side by side.
                let mut main_b = None;
                let mut main_backward = || {
                    main_b = Some(loss::backward_input(
                        dev, &w.norm, &w.lm_head, &head.h, &head.main,
                    ));
                };
                let mut mtp_dys = Vec::with_capacity(head.mtp.len());
                let mut carry: Option<Tensor> = None;
                let mut mtp_backward = || {
                    for k in (0..head.mtp.len()).rev() {
                        let (module, step) = (&w.mtp[k], &head.mtp[k]);
                        let (mut dh_k, ldys) = loss::backward_input(
                            dev,
                            &module.shared_head_norm,
                            &w.lm_head,
                            &step.h,
                            &step.loss,
                        );
                        if let Some(c) = carry.take() {
                            dev.add_assign(&mut dh_k, &c);
                        }
                        let prev = if k == 0 { &head.h } else { &head.mtp[k - 1].h };
                        let (d_prev, d_emb, mdys) =
                            module.backward_input(&ctx, prev, &step.cache, &dh_k);
                        mtp_dys.push((mdys, ldys, d_emb));
                        carry = Some(d_prev);
                    }
                };
                dev.join(&mut main_backward, &mut mtp_backward);
                let (mut dh, main) = main_b.expect("the main loss's B ran");
                mtp_dys.reverse();
                if let Some(c) = carry {
                    dev.add_assign(&mut dh, &c);
                }
                head_dys = Some(HeadDys { main, mtp: mtp_dys });
                dh
            }
            None => d_out
                .expect("stage_backward_input: a stage without the head needs the output gradient"),
        };
        let mut block_dys = Vec::with_capacity(cache.blocks.len());
        for (i, c) in cache.spec.layers.clone().zip(cache.blocks.iter()).rev() {
            let (dx, dys) = w.layers[i].backward_input(&ctx, c, &d);
            block_dys.push(Some(dys));
            d = dx;
        }
        block_dys.reverse();
        cache.block_dys = block_dys;
        cache.head_dys = head_dys;
        if cache.spec.embed {
            cache.d_embed = Some(d);
            None
        } else {
            Some(d)
        }
    }

    /// W of one stage: accumulates its weight gradients into `grads`. Needs the cache after B.
    /// Under EP it needs no exchange and touches only this rank's experts' gradients.
    pub fn stage_backward_weight(&self, dev: &dyn Device, cache: StageCache, grads: &mut Weights) {
        self.stage_backward_weight_yielding(dev, cache, grads, &|| {});
    }

    /// [`Self::stage_backward_weight`], calling `yield_now` after each decoder layer's W: a
    /// point where the caller may let other work of its device go first (a W has no
    /// communication of its own, so a scheduler can use it to fill gaps, layer by layer).
    pub fn stage_backward_weight_yielding(
        &self,
        dev: &dyn Device,
        cache: StageCache,
        grads: &mut Weights,
        yield_now: &(dyn Fn() + Sync),
    ) {
        let w = &self.weights;
        let ctx = cache.ctx(dev, None);
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
                let dys = dys
                    .as_ref()
                    .expect("stage_backward_weight before stage_backward_input");
                w.layers[i].backward_weight(&ctx, c, dys, &mut g_layers[i]);
                yield_now();
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
    }
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
