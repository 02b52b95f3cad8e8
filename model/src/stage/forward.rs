//! A stage's forward as a resumable pass: embedding, decoder layers, head (main loss and the MTP
//! modules), stopping at every MoE layer's dispatch and combine (see [`super::Yield`]).

use crate::device::Device;
use crate::layers::block::{Block, BlockCache, Front, MoePending};
use crate::layers::ep::EpGroup;
use crate::layers::loss::{self, LmLossCache, shifted_targets};
use crate::layers::mtp::{MtpCache, MtpPre};
use crate::layers::router::ExpertLoad;
use crate::layers::{Ctx, rope};
use crate::model::{Batch, DeepSeekV3, LossParts, StepOptions};
use crate::tensor::Tensor;
use std::sync::Arc;

use super::shifted_ids;
use super::{HeadCache, MtpStep, PassError, Phase, StageCache, StageOutput, StageSpec, Yield};

/// Where the forward is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The `i`-th decoder layer of the stage.
    Layer(usize, Phase),
    /// The main loss head.
    Head,
    /// MTP module `k`.
    Mtp(usize, Phase),
    Done,
}

/// The head's forward so far.
#[derive(Debug, Default)]
struct Head {
    h: Option<Tensor>,
    main: Option<LmLossCache>,
    mtp: Vec<MtpStep>,
    /// MTP module in flight: its shifted ids and the part before its block.
    pre: Option<(Vec<u32>, MtpPre)>,
    depth: usize,
    balance: f32,
}

/// One stage's forward on one micro-batch.
#[derive(Debug)]
pub struct ForwardPass {
    spec: StageSpec,
    batch: Batch,
    opts: StepOptions,
    ep: EpGroup,
    /// RoPE table: given ([`ForwardPass::with_rope`]) or made by the first step.
    rope: Option<Arc<Tensor>>,
    /// Whether the first step ran (the embedding, on the first stage).
    started: bool,
    at: At,
    x: Option<Tensor>,
    blocks: Vec<BlockCache>,
    pending: Option<Box<MoePending>>,
    losses: LossParts,
    loads: Vec<ExpertLoad>,
    head: Head,
    logits: Option<Tensor>,
}

impl ForwardPass {
    /// The forward of `spec` on `batch`: `input` is the previous stage's output (`None` for the
    /// stage with the embedding); MoE layers dispatch to the EP group `ep`. Does no device work.
    pub fn new(
        spec: &StageSpec,
        batch: Batch,
        input: Option<Tensor>,
        opts: &StepOptions,
        ep: EpGroup,
    ) -> Result<ForwardPass, PassError> {
        if spec.embed == input.is_some() {
            return Err(PassError::Input);
        }
        Ok(ForwardPass {
            spec: spec.clone(),
            batch,
            opts: *opts,
            ep,
            rope: None,
            started: false,
            at: At::Layer(0, Phase::Front),
            x: input,
            blocks: Vec::with_capacity(spec.layers.len()),
            pending: None,
            losses: LossParts::default(),
            loads: Vec::new(),
            head: Head::default(),
            logits: None,
        })
    }

    /// Use `table` (from [`rope::table`] for this pass's sequence length) instead of building
    /// one: a caller running many passes builds it once.
    pub fn with_rope(mut self, table: Arc<Tensor>) -> Result<ForwardPass, PassError> {
        let want = [self.batch.seq, table.shape().get(1).copied().unwrap_or(0)];
        if table.shape() != want.as_slice() {
            return Err(PassError::Input);
        }
        self.rope = Some(table);
        Ok(self)
    }

    /// The stage this pass runs.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// Runs the pass until it must stop (see [`Yield`]); `back` is what the EP group sent back
    /// when the last stop was [`Yield::Await`], else `None`.
    pub fn step(
        &mut self,
        model: &DeepSeekV3,
        dev: &dyn Device,
        mut back: Option<Vec<Tensor>>,
    ) -> Result<Yield, PassError> {
        let (b, t) = (self.batch.batch, self.batch.seq);
        assert!(
            self.batch.input_ids.len() == b * t && self.batch.labels.len() == b * t,
            "batch is not {b}x{t}"
        );
        let w = &model.weights;
        if self.rope.is_none() {
            self.rope = Some(Arc::new(rope::table(&model.config, dev, t)?));
        }
        if !self.started {
            self.started = true;
            if self.spec.embed {
                self.x = Some(w.embed_tokens.forward(dev, &self.batch.input_ids));
            }
        }
        let Self {
            spec,
            batch,
            opts,
            ep,
            rope,
            started: _,
            at,
            x,
            blocks,
            pending,
            losses,
            loads,
            head,
            logits,
        } = self;
        let rope = rope.as_ref().ok_or(PassError::Unfinished)?;
        let ctx = Ctx {
            dev,
            batch: b,
            seq: t,
            rope,
            balance_alpha: opts.balance_alpha,
        };
        let n = w.layers.len();
        loop {
            if back.is_some()
                && !matches!(*at, At::Layer(_, Phase::Finish) | At::Mtp(_, Phase::Finish))
            {
                return Err(PassError::Unexpected);
            }
            match *at {
                At::Layer(i, phase) if i < spec.layers.len() => {
                    let l = spec.layers.start + i;
                    let block = &w.layers[l];
                    let done = match phase {
                        Phase::Front => {
                            let input = x.take().ok_or(PassError::Input)?;
                            match block.front(&ctx, input, *ep) {
                                Front::Done(y, c) => Some((y, *c)),
                                Front::Dispatch(p, parts) => {
                                    *pending = Some(p);
                                    *at = At::Layer(i, Phase::Shared);
                                    return Ok(Yield::Dispatch { layer: l, parts });
                                }
                            }
                        }
                        Phase::Shared => {
                            let p = pending.as_mut().ok_or(PassError::Unfinished)?;
                            block.shared(&ctx, p);
                            *at = At::Layer(i, Phase::Finish);
                            return Ok(Yield::Await { layer: l });
                        }
                        Phase::Finish => {
                            let got = back.take().ok_or(PassError::NotReady { layer: l })?;
                            let p = pending.take().ok_or(PassError::Unfinished)?;
                            Some(block.finish(&ctx, *p, got)?)
                        }
                    };
                    if let Some((y, c)) = done {
                        loads.extend(block.load(&c));
                        losses.balance += block.balance_loss(&c);
                        blocks.push(c);
                        *x = Some(y);
                        *at = At::Layer(i + 1, Phase::Front);
                    }
                }
                At::Layer(..) => *at = if spec.head { At::Head } else { At::Done },
                At::Head => {
                    let h = x.take().ok_or(PassError::Input)?;
                    let targets = shifted_targets(&batch.labels, b, t, 1);
                    let mut main = loss::forward(
                        dev,
                        &w.norm,
                        &w.lm_head,
                        &h,
                        &targets,
                        1.0,
                        opts.keep_logits,
                    );
                    losses.ce = main.loss;
                    *logits = main.logits.take();
                    head.main = Some(main);
                    head.h = Some(h);
                    head.depth = if opts.mtp_lambda > 0.0 {
                        w.mtp.len()
                    } else {
                        0
                    };
                    *at = if head.depth > 0 {
                        At::Mtp(0, Phase::Front)
                    } else {
                        At::Done
                    };
                }
                At::Mtp(k, phase) => {
                    let module = &w.mtp[k];
                    let l = n + k;
                    let done = match phase {
                        Phase::Front => {
                            let ids = shifted_ids(&batch.input_ids, b, t, k + 1);
                            let emb = w.embed_tokens.forward(dev, &ids);
                            let prev = match k {
                                0 => head.h.as_ref(),
                                _ => head.mtp.last().map(|s| &s.h),
                            }
                            .ok_or(PassError::Unfinished)?;
                            let (z, pre) = module.pre(&ctx, prev, emb);
                            match module.block.front(&ctx, z, *ep) {
                                Front::Done(y, c) => Some((y, *c, (ids, pre))),
                                Front::Dispatch(p, parts) => {
                                    head.pre = Some((ids, pre));
                                    *pending = Some(p);
                                    *at = At::Mtp(k, Phase::Shared);
                                    return Ok(Yield::Dispatch { layer: l, parts });
                                }
                            }
                        }
                        Phase::Shared => {
                            let p = pending.as_mut().ok_or(PassError::Unfinished)?;
                            module.block.shared(&ctx, p);
                            *at = At::Mtp(k, Phase::Finish);
                            return Ok(Yield::Await { layer: l });
                        }
                        Phase::Finish => {
                            let got = back.take().ok_or(PassError::NotReady { layer: l })?;
                            let p = pending.take().ok_or(PassError::Unfinished)?;
                            let (y, c) = module.block.finish(&ctx, *p, got)?;
                            let pre = head.pre.take().ok_or(PassError::Unfinished)?;
                            Some((y, c, pre))
                        }
                    };
                    if let Some((h_k, c, (ids, pre))) = done {
                        finish_mtp(dev, model, batch, opts, head, loads, k, ids, pre, h_k, c);
                        *at = if k + 1 < head.depth {
                            At::Mtp(k + 1, Phase::Front)
                        } else {
                            At::Done
                        };
                    }
                }
                At::Done => return Ok(Yield::Done),
            }
        }
    }

    /// The pass's output and the cache for B, once `step` has returned [`Yield::Done`].
    pub fn finish(self) -> Result<(StageOutput, StageCache), PassError> {
        if self.at != At::Done {
            return Err(PassError::Unfinished);
        }
        let mut losses = self.losses;
        let head = match (self.spec.head, self.head) {
            (false, _) => None,
            (true, h) => {
                losses.balance += h.balance;
                losses.mtp_per_depth = h.mtp.iter().map(|s| s.loss.loss).collect();
                if h.depth > 0 {
                    losses.mtp = self.opts.mtp_lambda / h.depth as f32
                        * losses.mtp_per_depth.iter().sum::<f32>();
                }
                Some(HeadCache {
                    h: h.h.ok_or(PassError::Unfinished)?,
                    main: h.main.ok_or(PassError::Unfinished)?,
                    mtp: h.mtp,
                })
            }
        };
        let hidden = if self.spec.head { None } else { self.x };
        let cache = StageCache {
            spec: self.spec,
            batch: self.batch,
            rope: self.rope.ok_or(PassError::Unfinished)?,
            balance_alpha: self.opts.balance_alpha,
            blocks: self.blocks,
            block_dys: Vec::new(),
            head,
            head_dys: None,
            d_embed: None,
        };
        Ok((
            StageOutput {
                hidden,
                losses,
                loads: self.loads,
                logits: self.logits,
            },
            cache,
        ))
    }
}

/// MTP module `k` is through its block: its loss head, its load and balance loss.
#[allow(clippy::too_many_arguments)]
fn finish_mtp(
    dev: &dyn Device,
    model: &DeepSeekV3,
    batch: &Batch,
    opts: &StepOptions,
    head: &mut Head,
    loads: &mut Vec<ExpertLoad>,
    k: usize,
    ids: Vec<u32>,
    pre: MtpPre,
    h: Tensor,
    block: BlockCache,
) {
    let w = &model.weights;
    let module = &w.mtp[k];
    let b: &Block = &module.block;
    loads.extend(b.load(&block));
    head.balance += b.balance_loss(&block);
    let targets = shifted_targets(&batch.labels, batch.batch, batch.seq, k + 2);
    let l = loss::forward(
        dev,
        &module.shared_head_norm,
        &w.lm_head,
        &h,
        &targets,
        opts.mtp_lambda / head.depth as f32,
        false,
    );
    head.mtp.push(MtpStep {
        ids,
        cache: MtpCache { pre, block },
        h,
        loss: l,
    });
}
