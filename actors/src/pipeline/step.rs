//! One optimizer step of a rank in a pipeline / expert / data-parallel job.
//!
//! ```text
//! micro-batches of this data rank ──► executor runs the schedule's actions (F, B, W, BW, FB)
//!                                      ├─ activations / gradients to the neighbouring stages
//!                                      ├─ expert all-to-all inside every MoE layer (EP group)
//!                                      └─ each stage's gradients all-reduced once its W's end
//! wait for the gradient groups ──► one world all-reduce of the losses, loads and Σ g²
//! ──► clip by the global norm ──► AdamW on the held tensors ──► router-bias update
//! ```
//! Every rank ends the step with the same global loss, norm and loads, so every replica of a
//! tensor takes the same update.

use std::sync::Mutex;
use std::time::Instant;

use flotilla_collectives::{Algo, ReduceOp};
use flotilla_model::layers::router::ExpertLoad;
use flotilla_model::{Batch, LossParts};

use super::baton::Baton;
use super::executor::{Executor, Timing};
use super::profile::Profile;
use super::transport::{Failure, Link};
use super::work::{ForwardOutputs, ModelWork};
use crate::error::JobError;
use crate::trainer::{StepStats, Trainer, adamw_step, clip_with_sum_sq, zero};

/// Run one step of `t`, which must have a parallel part.
pub fn run(t: &mut Trainer) -> Result<StepStats, JobError> {
    let Some(par) = t.parallel.as_mut() else {
        return Err(JobError::Config("internal: not a parallel rank".into()));
    };
    let step = t.step;
    let fail = |why: String| JobError::RankFailed {
        rank: par.rank,
        step,
        why,
    };
    let dev = t.dev.as_ref();
    let _ = dev.take_cost();
    let sb = t.loader.next_step();
    let batches: Vec<Batch> = sb
        .micro_batches
        .into_iter()
        .map(|mb| Batch {
            input_ids: mb.input_ids,
            labels: mb.labels,
            batch: mb.batch,
            seq: mb.seq,
        })
        .collect();
    let micro = batches.len().max(1);
    let tokens_here: usize = batches.iter().map(|b| b.input_ids.len()).sum();
    let scale = 1.0 / (par.placement.data_ranks() * micro) as f32;
    zero(&mut t.grads, t.opt.threads());
    par.sync
        .lock()
        .map_err(|_| fail("gradient sync poisoned".into()))?
        .begin(scale);

    let link = Link {
        fabric: par.fabric.clone(),
        rt: par.rt.clone(),
        deadline: par.deadline,
        step,
        failure: Failure::default(),
        stats: Default::default(),
        baton: Baton::profiled(if par.profile {
            Profile::on()
        } else {
            Profile::default()
        }),
    };
    let grads = Mutex::new(&mut t.grads);
    let work = ModelWork {
        model: &t.model,
        dev,
        opts: t.opts,
        placement: &par.placement,
        batches: &batches,
        link: &link,
        ep: par.ep.clone(),
        caches: Mutex::new(Default::default()),
        experts: Mutex::new(Default::default()),
        grads: &grads,
        sync: &par.sync,
        losses: Mutex::new(ForwardOutputs::default()),
    };
    let mut exec = Executor::new(
        &par.placement,
        par.rank,
        &link,
        Timing::Wall,
        Instant::now(),
    );
    exec.overlap = par.overlap;
    exec.turns = par.turns;
    let ran = exec.run(&work, &par.actions);
    let losses = work.losses.into_inner().unwrap_or_default().sum();
    par.last_trace = Some(ran.map_err(&fail)?);
    par.last_exchange = link.stats.lock().map(|s| *s).unwrap_or_default();
    par.last_exchange.baton_held_s = link.baton.held_s();
    par.last_profile = link.baton.profile().events();
    par.sync
        .lock()
        .map_err(|_| fail("gradient sync poisoned".into()))?
        .finish(&mut t.grads)
        .map_err(&fail)?;

    // One world all-reduce: losses, tokens, Σ g² (as two f32 words), and per MoE layer a
    // presence flag and the expert loads.
    let canonical = par.canonical_trainable(&t.grads);
    let sum_sq = flotilla_model::optim::sum_of_squares_on(&canonical, t.opt.threads());
    let hi = sum_sq as f32;
    let lo = (sum_sq - f64::from(hi)) as f32;
    let counts_tokens = par.placement.topo.coord(par.rank).pp == 0;
    let mut v = vec![
        losses.parts.ce * scale,
        losses.parts.mtp * scale,
        losses.parts.balance * scale,
        if counts_tokens {
            tokens_here as f32
        } else {
            0.0
        },
        hi,
        lo,
    ];
    let e = par.placement.n_experts;
    for layer in &par.moe_layers {
        match losses.loads.get(layer) {
            Some(l) => {
                v.push(1.0);
                v.extend(l.counts.iter().map(|&c| c as f32));
            }
            None => v.extend(std::iter::repeat_n(0.0, e + 1)),
        }
    }
    let world = par
        .world
        .as_mut()
        .ok_or_else(|| fail("world communicator lost".into()))?;
    let g = par
        .rt
        .block_on(world.all_reduce(v, ReduceOp::Sum, Algo::Auto))
        .map_err(|e| fail(format!("step statistics all-reduce: {e}")))?;
    let parts = LossParts {
        ce: g[0],
        mtp: g[1],
        balance: g[2],
        ..LossParts::default()
    };
    let tokens = g[3] as usize;
    let total_sum_sq = f64::from(g[4]) + f64::from(g[5]);
    let mut loads = Vec::new();
    for (i, &layer) in par.moe_layers.iter().enumerate() {
        let at = 6 + i * (e + 1);
        if g[at] > 0.0 {
            loads.push(ExpertLoad {
                layer,
                counts: g[at + 1..at + 1 + e].iter().map(|&c| c as u64).collect(),
            });
        }
    }
    let loss = parts.ce + parts.mtp + parts.balance;
    if !loss.is_finite() {
        return Err(JobError::Diverged {
            step,
            why: format!("loss is {loss}"),
        });
    }
    let grad_norm = clip_with_sum_sq(&mut t.grads, total_sum_sq, t.grad_clip, t.opt.threads())?;
    let lr = t.schedule.lr(step);
    adamw_step(
        &mut t.opt,
        lr,
        &mut t.model.weights,
        &t.grads,
        t.kept.as_mut(),
    )?;
    let local: Vec<ExpertLoad> = loads
        .iter()
        .filter(|l| par.placement.layer_is_local(par.rank, l.layer))
        .cloned()
        .collect();
    let gamma = t.model.config.bias_gamma();
    t.model.update_biases(dev, &local, gamma);
    let per_layer: Vec<f32> = loads.iter().map(|l| l.max_over_mean()).collect();
    let cost = dev.take_cost();
    t.step += 1;
    Ok(StepStats {
        step,
        loss,
        ce: parts.ce,
        mtp: parts.mtp,
        balance: parts.balance,
        lr,
        grad_norm,
        tokens,
        expert_load_max_over_mean: per_layer.iter().copied().fold(0.0, f32::max),
        expert_load_per_layer: per_layer,
        device_seconds: cost.seconds,
        device_flops: cost.flops,
    })
}
