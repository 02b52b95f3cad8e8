//! One rank's training computation, synchronous: data → forward/backward over the micro-batches →
//! global-norm clipping → AdamW → router-bias update. The rank actor runs it on its own thread.

use std::sync::Arc;

use flotilla_ckpt::{Layout, Snapshot, SnapshotMeta};
use flotilla_model::data::{self, DataLoader, LoaderConfig, TokenDataset, TokenFormat};
use flotilla_model::optim::{self, AdamW, AdamWConfig, LrSchedule, ParamRef};
use flotilla_model::params::{Kind, Params};
use flotilla_model::{Batch, CpuDevice, DeepSeekV3, Device, StepOptions, Tensor, Weights};
use flotilla_runtime::config::{Config, DataFormat, LrSchedule as LrKind};
use serde::Serialize;

use crate::error::JobError;
use crate::model_config::model_config;

/// What one optimizer step did (a line of `metrics.jsonl`, less the timing the driver adds).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// The optimised objective: cross-entropy + MTP + balance loss.
    pub loss: f32,
    pub ce: f32,
    pub mtp: f32,
    pub balance: f32,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    /// Max over MoE layers of (max expert load / mean expert load).
    pub expert_load_max_over_mean: f32,
    /// Per MoE layer, max / mean expert load.
    pub expert_load_per_layer: Vec<f32>,
    /// Seconds the device reported for this step's compute.
    pub device_seconds: f64,
    pub device_flops: f64,
}

/// A single-rank trainer.
pub struct Trainer {
    pub(crate) dev: Box<dyn Device>,
    pub(crate) model: DeepSeekV3,
    pub(crate) grads: Weights,
    pub(crate) opt: AdamW,
    pub(crate) schedule: LrSchedule,
    pub(crate) loader: DataLoader,
    pub(crate) opts: StepOptions,
    pub(crate) grad_clip: f64,
    pub(crate) step: u64,
    /// Who this trainer is, for its snapshots.
    pub(crate) meta: SnapshotMeta,
    /// The rank's place in a pipeline / expert / data-parallel job (`None`: the whole model
    /// on one rank).
    pub(crate) parallel: Option<crate::pipeline::RankParallel>,
    /// The snapshot the current step's optimizer update fills, when one was asked for
    /// ([`Trainer::step_with_snapshot`]).
    pub(crate) kept: Option<crate::kept_snapshot::Kept>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("step", &self.step).finish()
    }
}

fn cpu_threads(cfg: &Config) -> usize {
    cfg.cluster
        .cpu_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The token stream `[data]` names: the built-in corpus or a file.
pub fn load_dataset(cfg: &Config) -> Result<TokenDataset, JobError> {
    let tokens = if cfg.data.source == "builtin" {
        data::builtin_corpus_tokens()
    } else {
        let format = match cfg.data.format {
            DataFormat::Text => TokenFormat::Text,
            DataFormat::U16 => TokenFormat::U16,
            DataFormat::U32 => TokenFormat::U32,
        };
        data::load_tokens(
            std::path::Path::new(&cfg.data.source),
            format,
            u32::try_from(cfg.model.vocab_size)
                .map_err(|_| JobError::Config("model.vocab_size does not fit in u32".into()))?,
        )
        .map_err(|e| JobError::Data(e.to_string()))?
    };
    TokenDataset::new(tokens, cfg.data.seq_len).map_err(|e| JobError::Data(e.to_string()))
}

impl Trainer {
    /// Build the model (random init from `job.seed`, or HF weights from `model.hf_dir`), the
    /// optimizer, the schedule and the data loader.
    pub fn new(cfg: &Config) -> Result<Trainer, JobError> {
        let micro = cfg.data.batch_size / cfg.parallel.sub_batches_per_step().max(1);
        Self::build(
            cfg,
            LoaderConfig::single(cfg.data.batch_size, micro.max(1)),
            0,
        )
    }

    /// A trainer whose data loader is `loader` (a data-parallel rank's slice) and whose
    /// snapshots say `rank`.
    pub(crate) fn build(
        cfg: &Config,
        loader: LoaderConfig,
        rank: usize,
    ) -> Result<Trainer, JobError> {
        let dev: Box<dyn Device> = Box::new(CpuDevice::new(cpu_threads(cfg)));
        let model = match &cfg.model.hf_dir {
            Some(dir) => flotilla_model::hf::load(dir, dev.as_ref())
                .map_err(|e| JobError::Model(e.to_string()))?,
            None => DeepSeekV3::init(&model_config(&cfg.model)?, dev.as_ref(), cfg.job.seed)
                .map_err(|e| JobError::Model(e.to_string()))?,
        };
        let grads = model.zero_grads(dev.as_ref());
        let o = &cfg.optimizer;
        let opt = AdamW::new(AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        })
        .map_err(|e| JobError::Optim(e.to_string()))?
        // The optimizer spreads its update over as many threads as the GEMMs use.
        .with_threads(cpu_threads(cfg));
        let schedule = match o.schedule {
            LrKind::Constant => LrSchedule::Constant { lr: o.lr },
            LrKind::Cosine => LrSchedule::WarmupCosine {
                max_lr: o.lr,
                min_lr: o.min_lr,
                warmup_steps: o.warmup_steps,
                total_steps: cfg.job.steps,
            },
        };
        schedule
            .validate()
            .map_err(|e| JobError::Optim(e.to_string()))?;
        let dataset = Arc::new(load_dataset(cfg)?);
        let loader = DataLoader::new(
            dataset,
            loader,
            cfg.data.seed.unwrap_or(cfg.job.seed),
            cfg.data.shuffle,
        )
        .map_err(|e| JobError::Data(e.to_string()))?;
        let opts = StepOptions::from_config(&model.config);
        Ok(Trainer {
            dev,
            model,
            grads,
            opt,
            schedule,
            loader,
            opts,
            grad_clip: o.grad_clip,
            step: 0,
            parallel: None,
            kept: None,
            meta: SnapshotMeta {
                rank,
                layout: Layout {
                    world_size: cfg.world_size(),
                    pp: cfg.parallel.pp,
                    ep: cfg.parallel.ep,
                    dp: cfg.parallel.dp,
                    stage_layers: uneven_split(cfg),
                },
                config_hash: cfg.hash_hex(),
            },
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &DeepSeekV3 {
        &self.model
    }

    /// SHA-256 over all parameters in sorted-key order as little-endian f32.
    pub fn params_sha256(&self) -> String {
        self.model
            .params_sha256(self.dev.as_ref())
            .unwrap_or_else(|| "shape-only".to_string())
    }

    /// Optimizer steps taken so far (the index of the next step).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// A copy of the whole training state in host memory: every named tensor (router biases
    /// included), AdamW's state, the step and schedule position, and the data cursor. The
    /// trainer draws no random numbers while training, so there is no RNG state to keep.
    pub fn snapshot(&self) -> Result<Snapshot, JobError> {
        let bad = |e: flotilla_ckpt::SnapshotError| JobError::Checkpoint(e.to_string());
        let mut s = Snapshot::new(self.meta.clone(), self.step);
        s.schedule_step = self.step;
        for (name, t) in self.held_named() {
            let data = match t.host() {
                Some(h) => h.to_vec(),
                None => self.dev.download(t).ok_or_else(|| {
                    JobError::Checkpoint(format!("{name}: the device holds no values"))
                })?,
            };
            s.add_param(&name, t.shape(), data).map_err(bad)?;
        }
        s.set_optimizer(self.opt.export_state()).map_err(bad)?;
        s.set_data_cursor(&self.loader.cursor());
        Ok(s)
    }

    /// Continue from `snap` (taken by [`Trainer::snapshot`] of a trainer with the same model
    /// and layout): the next steps are bit-identical to those the snapshotted trainer would
    /// have taken. Checks everything first and changes nothing when it fails.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<(), JobError> {
        let bad = |why: String| Err(JobError::Checkpoint(why));
        let (saved, here) = (&snap.meta.layout, &self.meta.layout);
        if (saved.pp, saved.ep, saved.dp) == (here.pp, here.ep, here.dp)
            && saved.stage_layers != here.stage_layers
        {
            let show = |s: &[usize]| {
                if s.is_empty() {
                    "the even split".to_string()
                } else {
                    format!("{s:?}")
                }
            };
            return bad(format!(
                "the snapshot's stage split is {} (parallel.stage_layers), this job's is {}: its \
                 stages hold other tensors",
                show(&saved.stage_layers),
                show(&here.stage_layers)
            ));
        }
        if snap.meta.layout != self.meta.layout {
            return bad(format!(
                "the snapshot's layout {:?} differs from this job's {:?} (resharding is not \
                 supported yet)",
                snap.meta.layout, self.meta.layout
            ));
        }
        if snap.meta.config_hash != self.meta.config_hash {
            tracing::warn!(
                "restoring a snapshot of config {} into config {}",
                snap.meta.config_hash,
                self.meta.config_hash
            );
        }
        let named = self.held_named();
        if named.len() != snap.params.len() {
            return bad(format!(
                "the snapshot holds {} tensors, the model {}",
                snap.params.len(),
                named.len()
            ));
        }
        for (name, t) in &named {
            match snap.params.get(name) {
                Some(v) if v.shape() == t.shape() => {}
                Some(v) => {
                    return bad(format!(
                        "{name}: shape {:?} in the snapshot, {:?} in the model",
                        v.shape(),
                        t.shape()
                    ));
                }
                None => return bad(format!("{name}: not in the snapshot")),
            }
        }
        for (name, m) in &snap.moments {
            let numel = named.get(name).map(|t| t.numel());
            if numel != Some(m.exp_avg.data().len()) {
                return bad(format!(
                    "{name}: optimizer state of {} values for a parameter of {numel:?}",
                    m.exp_avg.data().len()
                ));
            }
        }
        drop(named);
        let cursor = snap
            .data_cursor()
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        let loader = DataLoader::resume(
            Arc::clone(self.loader.dataset()),
            *self.loader.config(),
            cursor,
        )
        .map_err(|e| JobError::Checkpoint(format!("data cursor: {e}")))?;
        self.opt
            .import_state(snap.optimizer_state())
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        let dev = self.dev.as_ref();
        self.model.weights_visit_mut(&mut |name, t| {
            if let Some(v) = snap.params.get(name) {
                match t.host_mut() {
                    Some(h) => h.copy_from_slice(v.data()),
                    None => *t = dev.upload(v.shape(), v.data()),
                }
            }
        });
        self.loader = loader;
        self.step = snap.step;
        Ok(())
    }

    /// The tensors this rank holds, by HF name (all of them on a single rank; a pipeline or
    /// expert-parallel rank keeps shape-only placeholders for the rest).
    pub(crate) fn held_named(&self) -> std::collections::BTreeMap<String, &Tensor> {
        let mut named = self.model.named();
        named.retain(|_, t| !t.is_shape_only());
        named
    }

    /// Run one optimizer step.
    pub fn step(&mut self) -> Result<StepStats, JobError> {
        if self.parallel.is_some() {
            return crate::pipeline::step::run(self);
        }
        let dev = self.dev.as_ref();
        let _ = dev.take_cost();
        let sb = self.loader.next_step();
        zero(&mut self.grads, self.opt.threads());
        let n_micro = sb.micro_batches.len().max(1);
        let mut ce = 0.0f32;
        let mut mtp = 0.0f32;
        let mut balance = 0.0f32;
        let mut tokens = 0usize;
        let mut loads: Vec<flotilla_model::layers::router::ExpertLoad> = Vec::new();
        for mb in sb.micro_batches {
            tokens += mb.num_tokens();
            // The loader's batch carries window ids too; the model needs only the tokens (moved).
            let batch = Batch {
                input_ids: mb.input_ids,
                labels: mb.labels,
                batch: mb.batch,
                seq: mb.seq,
            };
            let out = self
                .model
                .forward_backward(dev, &batch, &self.opts, &mut self.grads)
                .map_err(|e| JobError::Model(e.to_string()))?;
            ce += out.losses.ce / n_micro as f32;
            mtp += out.losses.mtp / n_micro as f32;
            balance += out.losses.balance / n_micro as f32;
            if loads.is_empty() {
                loads = out.loads;
            } else {
                for (acc, l) in loads.iter_mut().zip(&out.loads) {
                    acc.accumulate(l);
                }
            }
        }
        if n_micro > 1 {
            scale(&mut self.grads, 1.0 / n_micro as f32, self.opt.threads());
        }
        let loss = ce + mtp + balance;
        if !loss.is_finite() {
            return Err(JobError::Diverged {
                step: self.step,
                why: format!("loss is {loss}"),
            });
        }
        let grad_norm = clip(&mut self.grads, self.grad_clip, self.opt.threads())?;
        let lr = self.schedule.lr(self.step);
        adamw_step(
            &mut self.opt,
            lr,
            &mut self.model.weights,
            &self.grads,
            self.kept.as_mut(),
        )?;
        let gamma = self.model.config.bias_gamma();
        self.model.update_biases(dev, &loads, gamma);
        let per_layer: Vec<f32> = loads.iter().map(|l| l.max_over_mean()).collect();
        let cost = dev.take_cost();
        let stats = StepStats {
            step: self.step,
            loss,
            ce,
            mtp,
            balance,
            lr,
            grad_norm,
            tokens,
            expert_load_max_over_mean: per_layer.iter().copied().fold(0.0, f32::max),
            expert_load_per_layer: per_layer,
            device_seconds: cost.seconds,
            device_flops: cost.flops,
        };
        self.step += 1;
        Ok(stats)
    }
}

/// Values per piece when zeroing or scaling gradients on several threads.
const PIECE: usize = 1 << 16;
/// Below this many values in all, one thread zeroes or scales everything.
const PAR_MIN: usize = 1 << 20;

/// Zero every gradient held here, on up to `threads` threads.
pub(crate) fn zero(w: &mut Weights, threads: usize) {
    for_each_value_piece(w, threads, |p| p.fill(0.0));
}

/// Multiply every gradient held here by `s`, on up to `threads` threads (each value on its
/// own: the same bits on any thread count).
fn scale(w: &mut Weights, s: f32, threads: usize) {
    for_each_value_piece(w, threads, |p| p.iter_mut().for_each(|x| *x *= s));
}

/// Run `f` on every held tensor's values, in pieces spread over up to `threads` threads.
fn for_each_value_piece(w: &mut Weights, threads: usize, f: impl Fn(&mut [f32]) + Sync) {
    let mut taken = take_held(w, |_| true);
    let pieces: Vec<&mut [f32]> = taken
        .iter_mut()
        .filter_map(|(_, t)| t.host_mut())
        .flat_map(|h| h.chunks_mut(PIECE))
        .collect();
    flotilla_model::par::run_pieces(pieces, threads, PAR_MIN, |p| p.len(), f);
    put_back(w, taken);
}

/// Move the trainable tensors out (in visiting order), leaving shape-only placeholders, so the
/// optimizer can hold them all mutably at once; [`put_back`] restores them in the same order.
/// Tensors that are already shape-only (not held by this rank) are skipped.
fn take_trainable(w: &mut Weights) -> Vec<(String, Tensor)> {
    take_held(w, |k| k == Kind::Weight)
}

/// Move out the held tensors of the kinds `keep` accepts (see [`take_trainable`]).
fn take_held(w: &mut Weights, keep: impl Fn(Kind) -> bool) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    w.visit_mut("", &mut |n, t, k| {
        if keep(k) && !t.is_shape_only() {
            out.push((n.to_string(), std::mem::replace(t, Tensor::shape_only(&[]))));
        }
    });
    out
}

/// Put tensors taken by [`take_held`] back by name.
fn put_back(w: &mut Weights, taken: Vec<(String, Tensor)>) {
    let mut back: std::collections::HashMap<String, Tensor> = taken.into_iter().collect();
    w.visit_mut("", &mut |n, t, _| {
        if let Some(v) = back.remove(n) {
            *t = v;
        }
    });
}

/// Clip the trainable gradients to `max_norm` by global norm; returns the norm before clipping.
fn clip(grads: &mut Weights, max_norm: f64, threads: usize) -> Result<f64, JobError> {
    let mut taken = take_trainable(grads);
    let mut slices: Vec<&mut [f32]> = taken.iter_mut().filter_map(|(_, t)| t.host_mut()).collect();
    let r = optim::clip_grad_norm_on(&mut slices, max_norm, threads)
        .map_err(|e| JobError::Optim(e.to_string()));
    put_back(grads, taken);
    r
}

/// Clip this rank's trainable gradients given the job-wide `Σ g²`; returns the global norm.
pub(crate) fn clip_with_sum_sq(
    grads: &mut Weights,
    total_sum_sq: f64,
    max_norm: f64,
    threads: usize,
) -> Result<f64, JobError> {
    let mut taken = take_trainable(grads);
    let mut slices: Vec<&mut [f32]> = taken.iter_mut().filter_map(|(_, t)| t.host_mut()).collect();
    let r = optim::clip_grad_norm_from_sum_sq_on(&mut slices, total_sum_sq, max_norm, threads)
        .map_err(|e| JobError::Optim(e.to_string()));
    put_back(grads, taken);
    r
}

/// One AdamW update of every trainable weight (decay on matrices, not on norms); out of place
/// into `kept`'s buffers when a snapshot of the state before it is being kept.
pub(crate) fn adamw_step(
    opt: &mut AdamW,
    lr: f64,
    weights: &mut Weights,
    grads: &Weights,
    kept: Option<&mut crate::kept_snapshot::Kept>,
) -> Result<(), JobError> {
    let g = grads.trainable();
    let mut taken = take_trainable(weights);
    let mut refs = Vec::with_capacity(taken.len());
    let mut missing = None;
    for (name, t) in taken.iter_mut() {
        let decay = t.shape().len() >= 2;
        let grad = g.get(name.as_str()).and_then(|gt| gt.host());
        match (grad, t.host_mut()) {
            (Some(grad), Some(value)) => refs.push(ParamRef {
                name: name.as_str(),
                value,
                grad,
                decay,
            }),
            _ => missing = Some(name.clone()),
        }
    }
    let r = match missing {
        Some(name) => Err(JobError::Optim(format!(
            "{name}: no host values or no gradient"
        ))),
        None => match kept {
            Some(k) => match crate::kept_snapshot::step_keeping(opt, lr, refs, k) {
                Ok(()) => crate::kept_snapshot::install(&mut taken, k),
                Err(e) => Err(e),
            },
            None => opt
                .step(lr, &mut refs)
                .map_err(|e| JobError::Optim(e.to_string())),
        },
    };
    put_back(weights, taken);
    r
}

/// `parallel.stage_layers` as a checkpoint's [`Layout`] records it: empty when it is the even
/// split (or absent), so that both name the same layout.
fn uneven_split(cfg: &Config) -> Vec<usize> {
    let split = &cfg.parallel.stage_layers;
    let even =
        flotilla_model::StageSpec::even_layers(cfg.model.num_hidden_layers, cfg.parallel.stages());
    if split.is_empty() || *split == even {
        Vec::new()
    } else {
        split.clone()
    }
}
