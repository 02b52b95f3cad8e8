//! One rank's training state on its device: the model (its share, shape-only placeholders for
//! the rest, so tensor names stay global), the gradients, AdamW with its moments, the schedule,
//! the data loader, and what a step holds while it runs (micro-batches, passes in flight,
//! activation caches, the experts' caches, the forwards' losses and loads).
//!
//! Only jobs on the rank's [`crate::stream::Stream`] touch it: the stage actors' and the expert
//! shard's phases, and the rank actor's step work (begin, statistics, update), snapshots and
//! restores, each as device operations. The host sees values only at a snapshot, an export or
//! a test.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flotilla_ckpt::{Layout, Snapshot, SnapshotMeta};
use flotilla_model::data::{self, DataLoader, LoaderConfig, TokenDataset, TokenFormat};
use flotilla_model::layers::moe::ShardCache;
use flotilla_model::layers::router::ExpertLoad;
use flotilla_model::optim::{AdamW, AdamWConfig, LrSchedule, ParamRef};
use flotilla_model::params::{Kind as ParamKind, Params, Selection};
use flotilla_model::{
    BackwardPass, Batch, CpuDevice, DeepSeekV3, Device, ForwardPass, LossParts, SimDevice,
    SimProfile, StageCache, StepOptions, Tensor, Weights,
};
use flotilla_runtime::config::{Config, DataConfig, DataFormat, DeviceKind, LrSchedule as LrKind};
use serde::{Deserialize, Serialize};

use crate::anomaly::SpikeGuard;
use crate::error::JobError;
use crate::model_config::model_config;
use crate::pipeline::{ModelShape, Placement};

/// What one optimizer step did (a line of `metrics.jsonl`, less the timing the driver adds).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    pub tokens: u64,
    /// Max over MoE layers of (max expert load / mean expert load).
    pub expert_load_max_over_mean: f32,
    /// Per MoE layer, max / mean expert load.
    pub expert_load_per_layer: Vec<f32>,
    /// Seconds the device reported for this step's compute (modelled on the simulated device).
    pub device_seconds: f64,
    pub device_flops: f64,
    /// Seconds the rank's compute stream was busy during the step (the rest is its bubble).
    pub busy_seconds: f64,
    /// The most stage micro-batches (sub-batches, with `parallel.sub_batches`) whose
    /// activations the rank held at once (a forward started, its B not done).
    pub peak_activations: usize,
    /// The update was skipped: the loss or the gradient norm was not finite, or the loss spiked
    /// (`[sentinel]`).
    pub skipped: bool,
    /// Why, when it was (`null` otherwise: every field is always written, so the statistics
    /// also cross process boundaries in the control plane's codec).
    pub skipped_why: Option<String>,
}

/// A stage pass in flight.
#[derive(Debug)]
pub enum Pass {
    Forward(ForwardPass),
    Backward(BackwardPass),
}

/// What one rank's forwards of a step add up to, before the job-wide sums.
#[derive(Debug, Clone, Default)]
pub struct LocalStats {
    /// The losses of every forward, summed in (chunk, stage) order, times the step's scale.
    pub parts: LossParts,
    /// Tokens of this rank's micro-batches (counted on the first pipeline stage only).
    pub tokens: u64,
    /// Per MoE layer this rank ran forward, the tokens each expert received.
    pub loads: BTreeMap<usize, Vec<u64>>,
    /// `Σ g²` of the gradients this rank is the canonical holder of.
    pub sum_sq: f64,
}

/// One rank's state (see the module documentation).
#[derive(Debug)]
pub struct RankStore {
    pub rank: usize,
    pub placement: Arc<Placement>,
    pub model: DeepSeekV3,
    pub grads: Weights,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub loader: DataLoader,
    pub opts: StepOptions,
    pub grad_clip: f64,
    /// Optimizer steps taken (the index of the next step).
    pub step: u64,
    pub meta: SnapshotMeta,
    /// Trainable tensors held here, in sorted-name order.
    pub trainable: Vec<String>,
    /// Trainable tensors this rank counts in the global norm (it is their lowest holder).
    pub canonical: Vec<String>,
    /// `trainable`, `canonical` and every held tensor as positions in the weights' (and the
    /// gradients') visit order, so a step finds them without building a name.
    pub sel: Selections,
    /// The loss-spike rule that skips a spiking batch (with `[sentinel]`).
    pub spike: Option<SpikeGuard>,
    /// The gradients' scale: `1 / (data ranks · micro-batches)`, the mean over the global batch.
    pub scale: f32,
    /// The RoPE table of the last sequence length a forward used (built once, shared by every
    /// pass: on a long sequence it costs more host time than a simulated layer).
    pub rope: Option<Arc<Tensor>>,
    // ---- this step ----
    pub batches: Vec<Batch>,
    pub passes: HashMap<(usize, usize), Pass>,
    pub caches: HashMap<(usize, usize), StageCache>,
    /// The experts' activations by (chunk, MoE layer).
    pub shards: HashMap<(usize, usize), ShardCache>,
    /// Each forward's losses and loads by (chunk, stage).
    pub outputs: BTreeMap<(usize, usize), (LossParts, Vec<ExpertLoad>)>,
}

impl RankStore {
    /// The RoPE table for sequences of `seq` tokens, on `dev`.
    pub fn rope_table(&mut self, dev: &dyn Device, seq: usize) -> Result<Arc<Tensor>, String> {
        match &self.rope {
            Some(t) if t.shape().first() == Some(&seq) => Ok(Arc::clone(t)),
            _ => {
                let t = Arc::new(
                    flotilla_model::layers::rope::table(&self.model.config, dev, seq)
                        .map_err(|e| format!("RoPE table: {e}"))?,
                );
                self.rope = Some(Arc::clone(&t));
                Ok(t)
            }
        }
    }
}

/// The compute device `[cluster] device` names, for `rank` (on CUDA: GPU `rank` mod the GPUs
/// the driver sees).
pub fn make_device(cfg: &Config, rank: usize) -> Result<Box<dyn Device>, JobError> {
    Ok(match cfg.cluster.device {
        DeviceKind::Cpu => Box::new(CpuDevice::new(cpu_threads(cfg))),
        DeviceKind::Sim => Box::new(SimDevice::new(sim_profile(cfg))),
        DeviceKind::Cuda => return cuda_device(cfg, rank),
    })
}

/// Whether this binary and machine have the device `cfg` names (a clear error before the job
/// starts, rather than a rank that fails to start).
pub fn check_device(cfg: &Config) -> Result<(), JobError> {
    if cfg.cluster.device != DeviceKind::Cuda {
        return Ok(());
    }
    gpu_count().map(|_| ())
}

#[cfg(feature = "cuda")]
fn gpu_count() -> Result<usize, JobError> {
    match flotilla_model::device::cuda::device_count() {
        0 => Err(JobError::Config(
            "cluster.device = \"cuda\": the CUDA driver sees no GPU (is libcuda.so on the \
             library path?)"
                .into(),
        )),
        n => Ok(n),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> Result<usize, JobError> {
    Err(JobError::Config(
        "cluster.device = \"cuda\": this binary was built without the CUDA device; build it \
         with `cargo build --release --features cuda`"
            .into(),
    ))
}

/// The CUDA device's GEMM precision for `cfg`'s `model.precision`.
#[cfg(feature = "cuda")]
pub fn cuda_precision(cfg: &Config) -> flotilla_model::device::cuda::Precision {
    use flotilla_model::device::cuda::Precision;
    use flotilla_runtime::config::Precision as P;
    match cfg.model.precision {
        P::Fp32 => Precision::Fp32,
        P::Bf16 => Precision::Bf16,
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(cfg: &Config, rank: usize) -> Result<Box<dyn Device>, JobError> {
    let gpus = gpu_count()?;
    let dev = flotilla_model::device::cuda::CudaDevice::new(rank % gpus, cuda_precision(cfg))
        .map_err(|e| JobError::Config(format!("cluster.device = \"cuda\": rank {rank}: {e}")))?;
    Ok(Box::new(dev))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_cfg: &Config, _rank: usize) -> Result<Box<dyn Device>, JobError> {
    gpu_count().map(|_| unreachable!("gpu_count errs without the cuda feature"))
}

/// The simulated device's speeds from `[cluster.sim]` (its defaults where the table is
/// absent): element-wise kernels at a tenth of the GEMM rate.
pub fn sim_profile(cfg: &Config) -> SimProfile {
    let sim = cfg.cluster.sim.clone().unwrap_or_default();
    SimProfile {
        gemm_flops_per_s: sim.device_tflops * 1e12,
        vector_flops_per_s: sim.device_tflops * 1e12 / 10.0,
        bytes_per_s: sim.hbm_gbps * 1e9,
        launch_s: sim.launch_overhead_us * 1e-6,
    }
}

fn cpu_threads(cfg: &Config) -> usize {
    cfg.cluster
        .cpu_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The token stream `[data]` names: the built-in corpus, synthetic tokens (2 × `batch_size`
/// sequences from the data seed), or a file. A job loads it once; its ranks share it.
pub fn load_dataset(cfg: &Config) -> Result<TokenDataset, JobError> {
    let d = &cfg.data;
    let tokens = if d.source == DataConfig::BUILTIN {
        data::builtin_corpus_tokens()
    } else if d.source == DataConfig::SYNTHETIC {
        let vocab = u32::try_from(cfg.model.vocab_size)
            .map_err(|_| JobError::Config("model.vocab_size does not fit in u32".into()))?;
        let n = (2 * d.batch_size).saturating_mul(d.seq_len) + 1;
        data::synthetic_tokens(n, vocab, d.seed.unwrap_or(cfg.job.seed))
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

/// See [`RankStore::sel`].
#[derive(Debug, Clone, Default)]
pub struct Selections {
    pub trainable: Selection,
    pub canonical: Selection,
    pub held: Selection,
}

impl RankStore {
    /// Rank `rank` of the job `cfg` describes, on `dev`: the model (random init from
    /// `job.seed`, or HF weights from `model.hf_dir`) less what other ranks hold, zero
    /// gradients, the optimizer, the schedule and this data rank's loader.
    pub fn build(
        cfg: &Config,
        rank: usize,
        placement: Arc<Placement>,
        shape: &ModelShape,
        dataset: Arc<TokenDataset>,
        dev: &dyn Device,
    ) -> Result<RankStore, JobError> {
        let data_ranks = placement.data_ranks();
        let per = data_ranks * cfg.parallel.sub_batches_per_step().max(1);
        if !cfg.data.batch_size.is_multiple_of(per) {
            return Err(JobError::Config(format!(
                "data.batch_size = {} is not divisible by dp * ep * micro_batches * sub_batches = {per}",
                cfg.data.batch_size
            )));
        }
        let loader = LoaderConfig::single(cfg.data.batch_size, cfg.data.batch_size / per)
            .with_rank(placement.data_rank(rank), data_ranks);
        let mut model = match &cfg.model.hf_dir {
            Some(dir) => {
                flotilla_model::hf::load(dir, dev).map_err(|e| JobError::Model(e.to_string()))?
            }
            None => DeepSeekV3::init(&model_config(&cfg.model)?, dev, cfg.job.seed)
                .map_err(|e| JobError::Model(e.to_string()))?,
        };
        model.weights_visit_mut(&mut |n, t| {
            if !placement.holds(rank, n) {
                *t = Tensor::shape_only(t.shape());
            }
        });
        let mut grads = model.weights.clone();
        let mut held = Vec::new();
        grads.visit_mut("", &mut |n, t, _| {
            *t = if placement.holds(rank, n) {
                held.push(n.to_string());
                dev.zeros(t.shape())
            } else {
                Tensor::shape_only(t.shape())
            };
        });
        let mut trainable = Vec::new();
        model.weights.visit("", &mut |n, _, k| {
            if k == ParamKind::Weight && placement.holds(rank, n) {
                trainable.push(n.to_string());
            }
        });
        trainable.sort();
        let canonical = shape.canonical(rank);
        let sel = Selections {
            trainable: Selection::of(&grads, &trainable),
            canonical: Selection::of(&grads, &canonical),
            held: Selection::of(&grads, &held),
        };
        let o = &cfg.optimizer;
        let opt = AdamW::new(AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        })
        .map_err(|e| JobError::Optim(e.to_string()))?;
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
        let loader = DataLoader::new(
            dataset,
            loader,
            cfg.data.seed.unwrap_or(cfg.job.seed),
            cfg.data.shuffle,
        )
        .map_err(|e| JobError::Data(e.to_string()))?;
        let micro = cfg.parallel.sub_batches_per_step().max(1);
        Ok(RankStore {
            rank,
            opts: StepOptions::from_config(&model.config),
            scale: 1.0 / (data_ranks * micro) as f32,
            placement,
            model,
            grads,
            opt,
            schedule,
            loader,
            grad_clip: o.grad_clip,
            step: 0,
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
            trainable,
            canonical,
            sel,
            spike: cfg.sentinel.as_ref().and_then(SpikeGuard::new),
            rope: None,
            batches: Vec::new(),
            passes: HashMap::new(),
            caches: HashMap::new(),
            shards: HashMap::new(),
            outputs: BTreeMap::new(),
        })
    }

    /// Forget what a step left (its passes, caches and outputs): at a step's start, and when a
    /// failed step is rolled back.
    pub fn clear_step(&mut self) {
        self.batches.clear();
        self.passes.clear();
        self.caches.clear();
        self.shards.clear();
        self.outputs.clear();
    }

    /// Pass over the loader's next batch (a test's run whose data omits it).
    pub fn skip_batch(&mut self) {
        let _ = self.loader.next_step();
    }

    /// A step begins: zero gradients, this step's micro-batches from the loader.
    pub fn begin_step(&mut self, dev: &dyn Device) {
        self.clear_step();
        let mut held = self.sel.held.take(&mut self.grads);
        dev.fill_many(&mut held.iter_mut().collect::<Vec<_>>(), 0.0);
        self.sel.held.put_back(&mut self.grads, held);
        self.batches = self
            .loader
            .next_step()
            .micro_batches
            .into_iter()
            .map(|mb| Batch {
                input_ids: mb.input_ids,
                labels: mb.labels,
                batch: mb.batch,
                seq: mb.seq,
            })
            .collect();
    }

    /// This rank's share of the step's statistics, once its stages are done and its gradients
    /// reduced.
    pub fn local_stats(&self, dev: &dyn Device) -> LocalStats {
        let mut parts = LossParts::default();
        let mut loads: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for (p, ls) in self.outputs.values() {
            parts.merge(p);
            for l in ls {
                match loads.get_mut(&l.layer) {
                    Some(acc) => acc.iter_mut().zip(&l.counts).for_each(|(a, c)| *a += c),
                    None => {
                        loads.insert(l.layer, l.counts.clone());
                    }
                }
            }
        }
        parts.ce *= self.scale;
        parts.mtp *= self.scale;
        parts.balance *= self.scale;
        let first = self.placement.topo.coord(self.rank).pp == 0;
        let tokens = if first {
            self.batches.iter().map(|b| b.input_ids.len() as u64).sum()
        } else {
            0
        };
        let grads = self.sel.canonical.refs(&self.grads);
        LocalStats {
            parts,
            tokens,
            loads,
            sum_sq: dev.sum_squares(&grads),
        }
    }

    /// The step's update from the job-wide statistics: clip by the global norm, AdamW, the
    /// router biases. Skipped (no update at all) when the loss or the norm is not finite; the
    /// step counts either way (its batch is consumed).
    pub fn apply(
        &mut self,
        dev: &dyn Device,
        parts: &LossParts,
        total_sum_sq: f64,
        loads: &BTreeMap<usize, Vec<u64>>,
    ) -> Result<StepStats, JobError> {
        let step = self.step;
        let loss = parts.ce + parts.mtp + parts.balance;
        let grad_norm = total_sum_sq.sqrt();
        let lr = self.schedule.lr(step);
        let skipped_why = if !loss.is_finite() || !grad_norm.is_finite() {
            Some(format!(
                "loss {loss} and gradient norm {grad_norm}: not finite"
            ))
        } else {
            self.spike
                .as_mut()
                .and_then(|g| g.spike(f64::from(loss)))
                .map(|m| format!("loss {loss:.4}: a spike above the running mean {m:.4}"))
        };
        let skipped = skipped_why.is_some();
        if !skipped {
            self.update(dev, lr, grad_norm)?;
            let gamma = self.model.config.bias_gamma();
            let local: Vec<ExpertLoad> = loads
                .iter()
                .filter(|(l, _)| self.placement.layer_is_local(self.rank, **l))
                .map(|(&layer, c)| ExpertLoad {
                    layer,
                    counts: c.clone(),
                })
                .collect();
            self.model.update_biases(dev, &local, gamma);
        }
        let per_layer: Vec<f32> = loads
            .iter()
            .map(|(&layer, c)| {
                ExpertLoad {
                    layer,
                    counts: c.clone(),
                }
                .max_over_mean()
            })
            .collect();
        self.step += 1;
        Ok(StepStats {
            step,
            loss,
            ce: parts.ce,
            mtp: parts.mtp,
            balance: parts.balance,
            lr,
            grad_norm,
            tokens: 0,
            expert_load_max_over_mean: per_layer.iter().copied().fold(0.0, f32::max),
            expert_load_per_layer: per_layer,
            device_seconds: 0.0,
            device_flops: 0.0,
            busy_seconds: 0.0,
            peak_activations: 0,
            skipped,
            skipped_why,
        })
    }

    /// One AdamW update of every held trainable tensor (decay on matrices, not on norms) on the
    /// gradients clipped to the global norm `grad_norm` (AdamW applies the clip's coefficient as
    /// it reads each gradient; the held gradients stay unclipped).
    fn update(&mut self, dev: &dyn Device, lr: f64, grad_norm: f64) -> Result<(), JobError> {
        let sel = &self.sel.trainable;
        let mut values = sel.take(&mut self.model.weights);
        let grads = sel.take(&mut self.grads);
        // AdamW scales each gradient by the clip's coefficient as it reads it.
        let scale = flotilla_model::optim::clip_scale(grad_norm, self.grad_clip);
        // The selection holds every trainable name (they were found in these weights), in the
        // order of `trainable`.
        let r = if values.len() != self.trainable.len() || grads.len() != self.trainable.len() {
            Err(JobError::Optim(format!(
                "{} trainable tensors, {} values and {} gradients found",
                self.trainable.len(),
                values.len(),
                grads.len()
            )))
        } else {
            let mut refs: Vec<ParamRef<'_>> = values
                .iter_mut()
                .zip(&grads)
                .zip(&self.trainable)
                .map(|((value, grad), name)| ParamRef {
                    name: name.as_str(),
                    decay: value.shape().len() >= 2,
                    value,
                    grad,
                })
                .collect();
            self.opt
                .step_scaled(dev, lr, scale, &mut refs)
                .map_err(|e| JobError::Optim(e.to_string()))
        };
        let sel = &self.sel.trainable;
        sel.put_back(&mut self.model.weights, values);
        sel.put_back(&mut self.grads, grads);
        r
    }

    /// The tensors this rank holds, by HF name.
    pub fn held_named(&self) -> BTreeMap<String, &Tensor> {
        let mut named = self.model.named();
        named.retain(|n, _| self.placement.holds(self.rank, n));
        named
    }

    /// A copy of the whole training state in host memory (a device→host copy): every held
    /// tensor (router biases included), AdamW's state, the step and schedule position, the
    /// data cursor. The trainer draws no random numbers, so there is no RNG state to keep.
    /// On a device that holds no values (the simulated cluster's) the snapshot is shape-only:
    /// every held tensor and AdamW moment by shape, which a checkpoint writes by its modelled
    /// size and nothing can restore.
    pub fn snapshot(&self, dev: &dyn Device) -> Result<Snapshot, JobError> {
        let bad = |e: flotilla_ckpt::SnapshotError| JobError::Checkpoint(e.to_string());
        let none = |what: &str| {
            JobError::Checkpoint(format!(
                "{what}: the device holds no values ({} device)",
                dev.name()
            ))
        };
        let mut s = Snapshot::new(self.meta.clone(), self.step);
        s.schedule_step = self.step;
        for (name, t) in self.held_named() {
            match dev.download(t) {
                Some(data) => s.add_param(&name, t.shape(), data).map_err(bad)?,
                None if t.is_shape_only() => s.add_shape_only(&name, t.shape()),
                None => return Err(none(&name)),
            }
        }
        if s.is_shape_only() {
            s.set_optimizer_shapes(&self.opt).map_err(bad)?;
        } else {
            let opt = self
                .opt
                .export_state(dev)
                .ok_or_else(|| none("the optimizer"))?;
            s.set_optimizer(opt).map_err(bad)?;
        }
        s.set_data_cursor(&self.loader.cursor());
        Ok(s)
    }

    /// Continue from `snap` (taken by [`RankStore::snapshot`] of a rank with the same model and
    /// layout): the next steps are bit-identical to those the snapshotted rank would have
    /// taken. Checks everything first and changes nothing when it fails; a shape-only snapshot
    /// (the simulated cluster's) has no values to restore and is refused.
    pub fn restore(&mut self, dev: &dyn Device, snap: &Snapshot) -> Result<(), JobError> {
        let bad = |why: String| Err(JobError::Checkpoint(why));
        if let Err(e) = snap.require_values() {
            return bad(format!(
                "rank {} cannot restore this snapshot: {e}",
                self.rank
            ));
        }
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
        let state = snap
            .optimizer_state()
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        self.opt
            .import_state(dev, state)
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        let (placement, rank) = (&self.placement, self.rank);
        self.model.weights_visit_mut(&mut |name, t| {
            if let Some(v) = snap.params.get(name)
                && placement.holds(rank, name)
            {
                dev.write(t, v.data());
            }
        });
        self.loader = loader;
        self.step = snap.step;
        if let Some(g) = self.spike.as_mut() {
            g.reset();
        }
        self.clear_step();
        Ok(())
    }

    /// The tensors this rank is the lowest holder of, by name, in host memory (`None` on a
    /// device without values): the union over ranks is the whole model once.
    pub fn canonical_params(&self, dev: &dyn Device) -> Option<Vec<(String, Vec<f32>)>> {
        self.held_named()
            .into_iter()
            .filter(|(n, _)| self.placement.holders(n).first() == Some(&self.rank))
            .map(|(n, t)| dev.download(t).map(|v| (n, v)))
            .collect()
    }
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
