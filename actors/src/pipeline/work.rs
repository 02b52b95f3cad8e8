//! The real compute of a rank's stages for one step: the model's stage forward, B and W on the
//! rank's micro-batches, with the MoE layers' expert all-to-all over the EP group.
//!
//! Callable from several threads at once (an F&B pair's halves, the executor's streams): the
//! model is only read, the activation caches and the gradients sit behind locks, and each
//! (chunk, stage) pass gets its own [`FabricExchange`] whose messages are tagged with the chunk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use flotilla_model::layers::router::ExpertLoad;
use flotilla_model::{
    Batch, DeepSeekV3, Device, ExpertExchange, LossParts, StageCache, StepOptions, Tensor, Weights,
};

use super::executor::StageWork;
use super::grad_sync::GradSync;
use super::placement::Placement;
use super::transport::{FabricExchange, Link};

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
        let batch = self.batch(chunk)?;
        let mut input = self.tensor(chunk, input)?;
        let ex = self.exchange(chunk);
        let ep = ex.as_ref().map(|e| e as &dyn ExpertExchange);
        let mut result = None;
        self.dev.on_device_threads(&mut || {
            result = Some(self.model.stage_forward_ep(
                self.dev,
                spec,
                batch,
                input.take(),
                &self.opts,
                ep,
            ));
        });
        let (out, cache) = result
            .ok_or("the forward did not run")?
            .map_err(|e| format!("forward of chunk {chunk} stage {stage}: {e}"))?;
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
        let mut cache = Self::locked(&self.caches)?
            .remove(&(chunk, stage))
            .ok_or_else(|| format!("B of chunk {chunk} stage {stage} before its forward"))?;
        let d_out = self.tensor(chunk, grad)?;
        let ex = self.exchange(chunk);
        let ep = ex.as_ref().map(|e| e as &dyn ExpertExchange);
        let mut d_in = None;
        let mut d_out = d_out;
        self.dev.on_device_threads(&mut || {
            d_in = Some(
                self.model
                    .stage_backward_input_ep(self.dev, &mut cache, d_out.take(), ep),
            );
        });
        Self::locked(&self.caches)?.insert((chunk, stage), cache);
        Ok(self.host(d_in.flatten()))
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
        let mut grads = Self::locked(self.grads)?;
        let mut cache = Some(cache);
        let g: &mut Weights = &mut grads;
        self.dev.on_device_threads(&mut || {
            if let Some(c) = cache.take() {
                self.model
                    .stage_backward_weight_yielding(self.dev, c, g, yield_now);
            }
        });
        Ok(())
    }

    fn stage_grads_done(&self, stage: usize) {
        if let (Ok(grads), Ok(mut sync)) = (self.grads.lock(), self.sync.lock()) {
            sync.stage_done(stage, &grads);
        }
    }
}
