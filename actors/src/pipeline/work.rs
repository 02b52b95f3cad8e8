//! The real compute of a rank's stages for one step: the model's stage forward, B and W on the
//! rank's micro-batches, with the MoE layers' expert all-to-all over the EP group.
//!
//! Callable from several threads at once (an F&B pair's halves, the executor's streams): the
//! model is only read, the activation caches and the gradients sit behind locks, and each
//! (chunk, stage) pass gets its own [`FabricExchange`] whose messages are tagged with the chunk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use flotilla_model::layers::moe::{DispatchPart, ShardCache, shard};
use flotilla_model::layers::router::ExpertLoad;
use flotilla_model::{
    BackwardPass, Batch, DeepSeekV3, Device, EpGroup, ForwardPass, LossParts, PassError,
    StageCache, StepOptions, Tensor, Weights, Yield,
};

use super::executor::StageWork;
use super::grad_sync::GradSync;
use super::placement::Placement;
use super::transport::{ExchangePhase, FabricExchange, Link};

/// What the forwards of this rank's step added up to (unscaled sums over its micro-batches).
#[derive(Debug, Default)]
pub struct LocalLosses {
    pub parts: LossParts,
    /// Loads of every MoE layer this rank ran forward, summed over its micro-batches.
    pub loads: HashMap<usize, ExpertLoad>,
}

/// What each forward of the step produced, by (chunk, stage). Forwards may finish in any order
/// (streams), so they are summed afterwards in key order: the same bits every time.
#[derive(Debug, Default)]
pub struct ForwardOutputs(BTreeMap<(usize, usize), (LossParts, Vec<ExpertLoad>)>);

impl ForwardOutputs {
    /// The sums over every forward, in (chunk, stage) order.
    pub fn sum(self) -> LocalLosses {
        let mut l = LocalLosses::default();
        for (parts, loads) in self.0.into_values() {
            l.parts.merge(&parts);
            for load in loads {
                match l.loads.get_mut(&load.layer) {
                    Some(acc) => acc.accumulate(&load),
                    None => {
                        l.loads.insert(load.layer, load);
                    }
                }
            }
        }
        l
    }
}

/// A rank's stages running on the model for one step.
pub struct ModelWork<'a, 'g> {
    pub model: &'a DeepSeekV3,
    pub dev: &'a dyn Device,
    pub opts: StepOptions,
    pub placement: &'a Placement,
    pub batches: &'a [Batch],
    pub link: &'a Link,
    /// Global ranks of the EP group and this rank's index in it (`None` when ep = 1).
    pub ep: Option<(Vec<usize>, usize)>,
    pub caches: Mutex<HashMap<(usize, usize), StageCache>>,
    /// The expert-owner's activations, by (chunk, MoE layer).
    pub experts: Mutex<HashMap<(usize, usize), ShardCache>>,
    pub grads: &'a Mutex<&'g mut Weights>,
    pub sync: &'a Mutex<GradSync>,
    pub losses: Mutex<ForwardOutputs>,
}

impl ModelWork<'_, '_> {
    fn exchange(&self, chunk: usize) -> Option<FabricExchange> {
        self.ep.as_ref().map(|(group, index)| {
            FabricExchange::new(self.link.clone(), group.clone(), *index, chunk)
        })
    }

    fn batch(&self, chunk: usize) -> Result<&Batch, String> {
        self.batches.get(chunk).ok_or_else(|| {
            format!(
                "micro-batch {chunk} is not in this step's {} micro-batches",
                self.batches.len()
            )
        })
    }

    fn tensor(&self, chunk: usize, data: Option<Vec<f32>>) -> Result<Option<Tensor>, String> {
        let rows = self.batch(chunk)?.input_ids.len();
        Ok(data.map(|v| Tensor::from_host(&[rows, self.model.config.hidden_size], v)))
    }

    fn host(&self, t: Option<Tensor>) -> Option<Vec<f32>> {
        t.map(|t| match t.host() {
            Some(h) => h.to_vec(),
            None => self.dev.download(&t).unwrap_or_default(),
        })
    }

    /// This rank's EP group (of one when ep = 1).
    fn group(&self) -> EpGroup {
        self.ep.as_ref().map_or(EpGroup::ALONE, |(g, i)| EpGroup {
            size: g.len(),
            index: *i,
        })
    }

    /// Runs a pass to its end: its MoE layers' exchanges go over the EP group (this thread
    /// blocks on them: the old executor's way, until the stage actors take over), this rank's
    /// experts run on what every token-owner sent them.
    fn run_pass(
        &self,
        chunk: usize,
        step: &mut (dyn FnMut(Option<Vec<Tensor>>) -> Result<Yield, PassError> + Send),
    ) -> Result<(), String> {
        let ex = self.exchange(chunk);
        let (mut back, mut ready, mut grad) = (None, None, false);
        loop {
            let mut y = None;
            let mut b = back.take();
            self.dev.on_device_threads(&mut || y = Some(step(b.take())));
            match y
                .ok_or("the pass did not run")?
                .map_err(|e| e.to_string())?
            {
                Yield::Dispatch { layer, parts } => {
                    grad = false;
                    match &ex {
                        None => ready = Some(self.expert_forward(chunk, layer, parts)?),
                        Some(ex) => ex.post(
                            layer,
                            ExchangePhase::Dispatch,
                            parts.into_iter().map(|p| self.encode_part(p)).collect(),
                        ),
                    }
                }
                Yield::GradDispatch { layer, parts } => {
                    grad = true;
                    match &ex {
                        None => ready = Some(self.expert_backward(chunk, layer, parts)?),
                        Some(ex) => ex.post(
                            layer,
                            ExchangePhase::GradDispatch,
                            parts.into_iter().map(|t| self.values(t)).collect(),
                        ),
                    }
                }
                Yield::Await { layer } => {
                    back = Some(match (&ex, ready.take()) {
                        (None, Some(r)) => r,
                        (None, None) => return Err(format!("layer {layer}: nothing came back")),
                        (Some(ex), _) => self.serve_and_wait(ex, chunk, layer, grad)?,
                    });
                }
                Yield::Done => return Ok(()),
            }
        }
    }

    /// Under EP: runs this rank's experts on what the group dispatched to it for `layer`, sends
    /// the results back, and returns what came back to this rank.
    fn serve_and_wait(
        &self,
        ex: &FabricExchange,
        chunk: usize,
        layer: usize,
        grad: bool,
    ) -> Result<Vec<Tensor>, String> {
        let h = self.model.config.hidden_size;
        let (out, back) = if grad {
            let got = ex.wait(layer, ExchangePhase::GradDispatch);
            let grads = got.into_iter().map(|v| self.rows(v, h)).collect();
            (
                self.expert_backward(chunk, layer, grads)?,
                ExchangePhase::GradCombine,
            )
        } else {
            let got = ex.wait(layer, ExchangePhase::Dispatch);
            let n_local = self.group().mine(self.placement.n_experts).len();
            let parts = got
                .into_iter()
                .map(|v| self.decode_part(v, n_local, h))
                .collect();
            (
                self.expert_forward(chunk, layer, parts)?,
                ExchangePhase::Combine,
            )
        };
        ex.post(
            layer,
            back,
            out.into_iter().map(|t| self.values(t)).collect(),
        );
        let got = ex.wait(layer, back);
        if let Some(why) = self.link.failure.get() {
            return Err(why);
        }
        Ok(got.into_iter().map(|v| self.rows(v, h)).collect())
    }

    fn expert_forward(
        &self,
        chunk: usize,
        layer: usize,
        parts: Vec<DispatchPart>,
    ) -> Result<Vec<Tensor>, String> {
        let m = self
            .model
            .moe(layer)
            .ok_or_else(|| format!("layer {layer} has no routed experts"))?;
        let ids = self.group().mine(m.n_experts());
        let h = self.model.config.hidden_size;
        let mut r = None;
        let mut parts = Some(parts);
        self.dev.on_device_threads(&mut || {
            if let Some(p) = parts.take() {
                r = Some(shard::forward(self.dev, &m.experts, ids.clone(), h, p));
            }
        });
        let (out, cache) = r
            .ok_or("the experts did not run")?
            .map_err(|e| format!("layer {layer}: {e}"))?;
        Self::locked(&self.experts)?.insert((chunk, layer), cache);
        Ok(out)
    }

    fn expert_backward(
        &self,
        chunk: usize,
        layer: usize,
        grads: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, String> {
        let m = self
            .model
            .moe(layer)
            .ok_or_else(|| format!("layer {layer} has no routed experts"))?;
        let mut caches = Self::locked(&self.experts)?;
        let cache = caches
            .get_mut(&(chunk, layer))
            .ok_or_else(|| format!("B of layer {layer} chunk {chunk} before its forward"))?;
        let mut r = None;
        let mut grads = Some(grads);
        self.dev.on_device_threads(&mut || {
            if let Some(g) = grads.take() {
                r = Some(shard::backward_input(self.dev, &m.experts, cache, g));
            }
        });
        r.ok_or("the experts did not run")?
            .map_err(|e| format!("layer {layer}: {e}"))
    }

    /// A tensor's values for the fabric (zeros of the right size on a device without values).
    fn values(&self, t: Tensor) -> Vec<f32> {
        match t.host() {
            Some(h) => h.to_vec(),
            None => vec![0.0; t.numel()],
        }
    }

    /// `[n, h]` rows from values off the fabric (a short message is cut to whole rows).
    fn rows(&self, mut v: Vec<f32>, h: usize) -> Tensor {
        let n = v.len() / h.max(1);
        v.truncate(n * h);
        Tensor::from_host(&[n, h], v)
    }

    /// A dispatch part as one message: each count as two 32-bit words (exact), then the rows.
    fn encode_part(&self, p: DispatchPart) -> Vec<f32> {
        let mut v = Vec::with_capacity(2 * p.counts.len() + p.rows.numel());
        for c in &p.counts {
            v.push(f32::from_bits((c >> 32) as u32));
            v.push(f32::from_bits(*c as u32));
        }
        v.extend(self.values(p.rows));
        v
    }

    /// The inverse of [`Self::encode_part`] (a short message gives a part the experts refuse).
    fn decode_part(&self, v: Vec<f32>, n_local: usize, h: usize) -> DispatchPart {
        let k = (2 * n_local).min(v.len());
        let counts = v[..k]
            .chunks(2)
            .map(|w| {
                let hi = w.first().map_or(0, |x| x.to_bits());
                let lo = w.get(1).map_or(0, |x| x.to_bits());
                u64::from(hi) << 32 | u64::from(lo)
            })
            .collect();
        DispatchPart {
            counts,
            rows: self.rows(v[k..].to_vec(), h),
        }
    }

    fn locked<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, String> {
        m.lock()
            .map_err(|_| "a compute thread panicked".to_string())
    }
}

impl StageWork for ModelWork<'_, '_> {
    fn boundary_len(&self, chunk: usize) -> usize {
        self.batches
            .get(chunk)
            .map_or(0, |b| b.input_ids.len() * self.model.config.hidden_size)
    }

    fn forward(
        &self,
        chunk: usize,
        stage: usize,
        input: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String> {
        let spec = &self.placement.specs[stage];
        let batch = self.batch(chunk)?.clone();
        let input = self.tensor(chunk, input)?;
        let what = || format!("forward of chunk {chunk} stage {stage}");
        let mut pass = ForwardPass::new(spec, batch, input, &self.opts, self.group())
            .map_err(|e| format!("{}: {e}", what()))?;
        self.run_pass(chunk, &mut |back| pass.step(self.model, self.dev, back))
            .map_err(|e| format!("{}: {e}", what()))?;
        let (out, cache) = pass.finish().map_err(|e| format!("{}: {e}", what()))?;
        Self::locked(&self.losses)?
            .0
            .insert((chunk, stage), (out.losses, out.loads));
        Self::locked(&self.caches)?.insert((chunk, stage), cache);
        Ok(self.host(out.hidden))
    }

    fn backward_input(
        &self,
        chunk: usize,
        stage: usize,
        grad: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String> {
        let cache = Self::locked(&self.caches)?
            .remove(&(chunk, stage))
            .ok_or_else(|| format!("B of chunk {chunk} stage {stage} before its forward"))?;
        let d_out = self.tensor(chunk, grad)?;
        let what = || format!("B of chunk {chunk} stage {stage}");
        let mut pass = BackwardPass::new(cache, d_out).map_err(|e| format!("{}: {e}", what()))?;
        self.run_pass(chunk, &mut |back| pass.step(self.model, self.dev, back))
            .map_err(|e| format!("{}: {e}", what()))?;
        let (d_in, cache) = pass.finish().map_err(|e| format!("{}: {e}", what()))?;
        Self::locked(&self.caches)?.insert((chunk, stage), cache);
        Ok(self.host(d_in))
    }

    fn backward_weight(
        &self,
        chunk: usize,
        stage: usize,
        yield_now: &(dyn Fn() + Sync),
    ) -> Result<(), String> {
        let cache = Self::locked(&self.caches)?
            .remove(&(chunk, stage))
            .ok_or_else(|| format!("W of chunk {chunk} stage {stage} before its B"))?;
        let layers = cache.moe_layers(self.model);
        let mut grads = Self::locked(self.grads)?;
        let mut cache = Some(cache);
        let g: &mut Weights = &mut grads;
        let mut r = Ok(());
        self.dev.on_device_threads(&mut || {
            if let Some(c) = cache.take() {
                r = self
                    .model
                    .stage_backward_weight_yielding(self.dev, c, g, yield_now)
                    .map_err(|e| e.to_string());
            }
        });
        r?;
        for layer in layers {
            let c = Self::locked(&self.experts)?
                .remove(&(chunk, layer))
                .ok_or_else(|| format!("W of layer {layer} chunk {chunk} before its B"))?;
            let (Some(m), Some(gm)) = (self.model.moe(layer), g.moe_mut(layer)) else {
                return Err(format!("layer {layer} has no routed experts"));
            };
            let mut r = Ok(());
            let mut c = Some(c);
            self.dev.on_device_threads(&mut || {
                if let Some(c) = c.take() {
                    r = shard::backward_weight(self.dev, &m.experts, c, &mut gm.experts);
                }
            });
            r.map_err(|e| format!("layer {layer}: {e}"))?;
        }
        Ok(())
    }

    fn stage_grads_done(&self, stage: usize) {
        if let (Ok(grads), Ok(mut sync)) = (self.grads.lock(), self.sync.lock()) {
            sync.stage_done(stage, &grads);
        }
    }
}
