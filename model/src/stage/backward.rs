//! A stage's B as a resumable pass: the head (MTP modules last to first, then the main loss),
//! then the decoder layers last to first, stopping at every MoE layer's gradient dispatch and
//! gradient combine (see [`super::Yield`]). It fills the cache with what W needs.

use crate::device::Device;
use crate::layers::block::{Back, BlockDys, MoeGradPending};
use crate::layers::loss::{self, LmLossDys};
use crate::layers::mtp::MtpDys;
use crate::model::DeepSeekV3;
use crate::tensor::Tensor;

use super::{HeadDys, PassError, Phase, StageCache, Yield};

/// Where B is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// MTP module `k` (from the last down to 0).
    Mtp(usize, Phase),
    /// The main loss head.
    Main,
    /// The `i`-th decoder layer of the stage (from the last down to 0).
    Layer(usize, Phase),
    Done,
}

/// One stage's B on one micro-batch.
#[derive(Debug)]
pub struct BackwardPass {
    cache: StageCache,
    at: At,
    /// The gradient flowing down: of the current layer's output.
    d: Option<Tensor>,
    block_dys: Vec<Option<BlockDys>>,
    pending: Option<Box<MoeGradPending>>,
    /// The gradient of `h_{k-1}` from MTP module `k`, added to the next one down.
    carry: Option<Tensor>,
    /// The loss head's dys of the MTP module in flight.
    mtp_loss: Option<LmLossDys>,
    mtp_dys: Vec<Option<(MtpDys, LmLossDys, Tensor)>>,
    main: Option<LmLossDys>,
}

impl BackwardPass {
    /// B of the forward that left `cache`: `d_out` is the gradient of the stage's output
    /// (`None` on the head stage, whose gradient starts at the loss).
    pub fn new(cache: StageCache, d_out: Option<Tensor>) -> Result<BackwardPass, PassError> {
        let depth = cache.head.as_ref().map(|h| h.mtp.len());
        if depth.is_some() == d_out.is_some() {
            return Err(PassError::Input);
        }
        let layers = cache.blocks.len();
        let at = match depth {
            Some(0) => At::Main,
            Some(k) => At::Mtp(k - 1, Phase::Front),
            None => last_layer(layers),
        };
        Ok(BackwardPass {
            at,
            d: d_out,
            block_dys: (0..layers).map(|_| None).collect(),
            pending: None,
            carry: None,
            mtp_loss: None,
            mtp_dys: (0..depth.unwrap_or(0)).map(|_| None).collect(),
            main: None,
            cache,
        })
    }

    /// Runs B until it must stop (see [`super::Yield`]); `back` is what the EP group sent back
    /// when the last stop was `Await`, else `None`.
    pub fn step(
        &mut self,
        model: &DeepSeekV3,
        dev: &dyn Device,
        mut back: Option<Vec<Tensor>>,
    ) -> Result<Yield, PassError> {
        let w = &model.weights;
        let n = w.layers.len();
        let Self {
            cache,
            at,
            d,
            block_dys,
            pending,
            carry,
            mtp_loss,
            mtp_dys,
            main,
        } = self;
        let ctx = cache.ctx(dev);
        loop {
            if back.is_some()
                && !matches!(*at, At::Layer(_, Phase::Finish) | At::Mtp(_, Phase::Finish))
            {
                return Err(PassError::Unexpected);
            }
            match *at {
                At::Mtp(k, phase) => {
                    let head = cache.head.as_ref().ok_or(PassError::Unfinished)?;
                    let (module, step) = (&w.mtp[k], &head.mtp[k]);
                    let l = n + k;
                    let done = match phase {
                        Phase::Front => {
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
                            *mtp_loss = Some(ldys);
                            match module.block.back_front(&ctx, &step.cache.block, dh_k) {
                                Back::Done(d_z, dys) => Some((d_z, *dys)),
                                Back::Dispatch(p, parts) => {
                                    *pending = Some(p);
                                    *at = At::Mtp(k, Phase::Shared);
                                    return Ok(Yield::GradDispatch { layer: l, parts });
                                }
                            }
                        }
                        Phase::Shared => {
                            let p = pending.as_mut().ok_or(PassError::Unfinished)?;
                            module.block.back_shared(&ctx, &step.cache.block, p);
                            *at = At::Mtp(k, Phase::Finish);
                            return Ok(Yield::Await { layer: l });
                        }
                        Phase::Finish => {
                            let got = back.take().ok_or(PassError::NotReady { layer: l })?;
                            let p = pending.take().ok_or(PassError::Unfinished)?;
                            Some(module.block.back_finish(&ctx, &step.cache.block, *p, got)?)
                        }
                    };
                    if let Some((d_z, dys)) = done {
                        let prev = if k == 0 { &head.h } else { &head.mtp[k - 1].h };
                        let (d_prev, d_emb, mdys) =
                            module.pre_backward(&ctx, prev, &step.cache, d_z, dys);
                        let ldys = mtp_loss.take().ok_or(PassError::Unfinished)?;
                        mtp_dys[k] = Some((mdys, ldys, d_emb));
                        *carry = Some(d_prev);
                        *at = if k == 0 {
                            At::Main
                        } else {
                            At::Mtp(k - 1, Phase::Front)
                        };
                    }
                }
                At::Main => {
                    let head = cache.head.as_ref().ok_or(PassError::Unfinished)?;
                    let (mut dh, dys) =
                        loss::backward_input(dev, &w.norm, &w.lm_head, &head.h, &head.main);
                    if let Some(c) = carry.take() {
                        dev.add_assign(&mut dh, &c);
                    }
                    *main = Some(dys);
                    *d = Some(dh);
                    *at = last_layer(cache.blocks.len());
                }
                At::Layer(i, phase) => {
                    let l = cache.spec.layers.start + i;
                    let (block, c) = (&w.layers[l], &cache.blocks[i]);
                    let done = match phase {
                        Phase::Front => {
                            let d_out = d.take().ok_or(PassError::Input)?;
                            match block.back_front(&ctx, c, d_out) {
                                Back::Done(dx, dys) => Some((dx, *dys)),
                                Back::Dispatch(p, parts) => {
                                    *pending = Some(p);
                                    *at = At::Layer(i, Phase::Shared);
                                    return Ok(Yield::GradDispatch { layer: l, parts });
                                }
                            }
                        }
                        Phase::Shared => {
                            let p = pending.as_mut().ok_or(PassError::Unfinished)?;
                            block.back_shared(&ctx, c, p);
                            *at = At::Layer(i, Phase::Finish);
                            return Ok(Yield::Await { layer: l });
                        }
                        Phase::Finish => {
                            let got = back.take().ok_or(PassError::NotReady { layer: l })?;
                            let p = pending.take().ok_or(PassError::Unfinished)?;
                            Some(block.back_finish(&ctx, c, *p, got)?)
                        }
                    };
                    if let Some((dx, dys)) = done {
                        block_dys[i] = Some(dys);
                        *d = Some(dx);
                        *at = if i == 0 {
                            At::Done
                        } else {
                            At::Layer(i - 1, Phase::Front)
                        };
                    }
                }
                At::Done => return Ok(Yield::Done),
            }
        }
    }

    /// The gradient of the stage's input (`None` for the stage with the embedding) and the
    /// cache, now holding what W needs, once `step` has returned [`Yield::Done`].
    pub fn finish(self) -> Result<(Option<Tensor>, StageCache), PassError> {
        if self.at != At::Done {
            return Err(PassError::Unfinished);
        }
        let mut cache = self.cache;
        cache.block_dys = self.block_dys;
        if cache.head.is_some() {
            let mtp = self
                .mtp_dys
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or(PassError::Unfinished)?;
            cache.head_dys = Some(HeadDys {
                main: self.main.ok_or(PassError::Unfinished)?,
                mtp,
            });
        }
        if cache.spec.embed {
            cache.d_embed = self.d;
            Ok((None, cache))
        } else {
            Ok((self.d, cache))
        }
    }
}

/// Where B starts in the decoder layers of a stage of `layers` layers.
fn last_layer(layers: usize) -> At {
    match layers {
        0 => At::Done,
        n => At::Layer(n - 1, Phase::Front),
    }
}
