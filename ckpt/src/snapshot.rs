//! A [`Snapshot`]: one rank's whole training state in host memory, everything needed to continue
//! training bit-exactly: every named tensor (parameters and buffers such as the router biases),
//! AdamW's moments and per-parameter step counts, the step, the schedule position, the data
//! cursor, the RNG state (if the trainer has one), and metadata (rank, parallel layout, config
//! hash) that says which job and which slice of it the state belongs to.
//!
//! Taking a snapshot is the only part of a checkpoint that stalls training: it copies the state
//! out of the trainer. Encoding and persisting happen later, off the training path
//! ([`crate::engine`]).

use std::collections::BTreeMap;

use flotilla_model::data::DataCursor;
use flotilla_model::optim::{AdamWState, ParamState};
use serde::{Deserialize, Serialize};

/// Why a snapshot could not be built or taken apart.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SnapshotError {
    #[error("tensor `{name}`: shape {shape:?} needs {want} values, got {got}")]
    Shape {
        name: String,
        shape: Vec<usize>,
        want: usize,
        got: usize,
    },
    #[error("tensor `{name}` holds no host values (shape-only device)")]
    NoValues { name: String },
    #[error("optimizer state of `{name}`: {why}")]
    Optimizer { name: String, why: String },
    #[error("data cursor: {0}")]
    Cursor(String),
    #[error("snapshot does not fit this trainer: {0}")]
    Mismatch(String),
}

/// A dense row-major f32 tensor in host memory. Equality is bit-exact (`NaN == NaN` when the
/// bits agree, `0.0 != -0.0`), which is what a checkpoint round trip must preserve.
#[derive(Clone, Debug)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; fails when the lengths disagree.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Self, SnapshotError> {
        let want = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        if want != data.len() {
            return Err(SnapshotError::Shape {
                name: name.to_string(),
                shape,
                want,
                got: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, to overwrite in place (a checkpointer refilling a kept snapshot buffer);
    /// the shape cannot change.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Bytes of the values (4 per element).
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
}

impl PartialEq for HostTensor {
    fn eq(&self, o: &Self) -> bool {
        self.shape == o.shape
            && self.data.len() == o.data.len()
            && self
                .data
                .iter()
                .zip(&o.data)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// The job's parallel layout, recorded so that a checkpoint is never restored onto another
/// layout by accident (resharding is a separate, explicit step).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub world_size: usize,
    pub pp: usize,
    pub ep: usize,
    pub dp: usize,
    /// Decoder layers per pipeline stage when the job cut the model otherwise than evenly
    /// (`parallel.stage_layers`); empty for the even split, and then not written, so files of
    /// jobs without a split are unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_layers: Vec<usize>,
}

impl Layout {
    /// One rank holding everything.
    pub const fn single() -> Self {
        Self {
            world_size: 1,
            pp: 1,
            ep: 1,
            dp: 1,
            stage_layers: Vec::new(),
        }
    }
}

/// Who a snapshot belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The rank whose state this is.
    pub rank: usize,
    pub layout: Layout,
    /// `Config::hash_hex` of the job that took it.
    pub config_hash: String,
}

/// One parameter's AdamW state.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// Updates this parameter has received (its bias-correction `t`).
    pub step: u64,
    /// First moment, shaped like the parameter.
    pub exp_avg: HostTensor,
    /// Second moment, shaped like the parameter.
    pub exp_avg_sq: HostTensor,
}

/// One rank's training state after `step` optimizer steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    /// Optimizer steps taken; training resumes with step index `step`.
    pub step: u64,
    /// The learning-rate schedule's position (the step its next `lr` is asked for).
    pub schedule_step: u64,
    /// Every named tensor (parameters and buffers), by HF name.
    pub params: BTreeMap<String, HostTensor>,
    /// Successful AdamW steps (`AdamWState::steps`).
    pub optim_steps: u64,
    /// AdamW's per-parameter state, by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// The data loader's cursor, [`DataCursor::to_bytes`].
    pub data_cursor: Vec<u8>,
    /// Opaque RNG state, for trainers that draw random numbers while training (none do yet).
    pub rng: Option<Vec<u8>>,
    /// The model's HF `config.json` text, so that a checkpoint can be exported on its own
    /// (`flotilla ckpt export`); `None` in checkpoints written before it was recorded.
    pub model_config: Option<String>,
}

impl Snapshot {
    /// An empty snapshot at `step`; fill it with [`Snapshot::add_param`] and friends.
    pub fn new(meta: SnapshotMeta, step: u64) -> Self {
        Self {
            meta,
            step,
            schedule_step: step,
            params: BTreeMap::new(),
            optim_steps: 0,
            moments: BTreeMap::new(),
            data_cursor: Vec::new(),
            rng: None,
            model_config: None,
        }
    }

    /// Add a named tensor (copied by the caller; moved in here).
    pub fn add_param(
        &mut self,
        name: &str,
        shape: &[usize],
        data: Vec<f32>,
    ) -> Result<(), SnapshotError> {
        let t = HostTensor::new(name, shape.to_vec(), data)?;
        self.params.insert(name.to_string(), t);
        Ok(())
    }

    /// Take over AdamW's exported state. Moments are shaped like their parameter when it is
    /// present with as many elements (add the parameters first), flat otherwise.
    pub fn set_optimizer(&mut self, state: AdamWState) -> Result<(), SnapshotError> {
        self.optim_steps = state.steps;
        self.moments.clear();
        for (name, p) in state.params {
            let shape = match self.params.get(&name) {
                Some(t) if t.data.len() == p.exp_avg.len() => t.shape.clone(),
                _ => vec![p.exp_avg.len()],
            };
            let m = Moments {
                step: p.step,
                exp_avg: HostTensor::new(&name, shape.clone(), p.exp_avg)?,
                exp_avg_sq: HostTensor::new(&name, shape, p.exp_avg_sq)?,
            };
            self.moments.insert(name, m);
        }
        Ok(())
    }

    /// AdamW's state as [`flotilla_model::optim::AdamW::import_state`] takes it (a copy).
    pub fn optimizer_state(&self) -> AdamWState {
        AdamWState {
            steps: self.optim_steps,
            params: self
                .moments
                .iter()
                .map(|(n, m)| {
                    let s = ParamState {
                        step: m.step,
                        exp_avg: m.exp_avg.data.clone(),
                        exp_avg_sq: m.exp_avg_sq.data.clone(),
                    };
                    (n.clone(), s)
                })
                .collect(),
        }
    }

    /// Record the loader's position.
    pub fn set_data_cursor(&mut self, cursor: &DataCursor) {
        self.data_cursor = cursor.to_bytes().to_vec();
    }

    /// The loader's position, decoded.
    pub fn data_cursor(&self) -> Result<DataCursor, SnapshotError> {
        DataCursor::from_bytes(&self.data_cursor).map_err(|e| SnapshotError::Cursor(e.to_string()))
    }

    /// Make `self` an exact copy of `src`, reusing `self`'s buffers when every tensor has the
    /// same name and shape (the checkpoint stall is then a copy into memory already touched,
    /// with no page faults), split across the machine's cores; otherwise a plain clone.
    pub fn copy_from(&mut self, src: &Snapshot) {
        if !self.same_structure(src) {
            *self = src.clone();
            return;
        }
        self.meta.clone_from(&src.meta);
        self.step = src.step;
        self.schedule_step = src.schedule_step;
        self.optim_steps = src.optim_steps;
        self.data_cursor.clone_from(&src.data_cursor);
        self.rng.clone_from(&src.rng);
        self.model_config.clone_from(&src.model_config);
        let mut pairs: Vec<(&mut [f32], &[f32])> = Vec::new();
        for (d, s) in self.params.values_mut().zip(src.params.values()) {
            pairs.push((&mut d.data, &s.data));
        }
        for (d, s) in self.moments.values_mut().zip(src.moments.values()) {
            d.step = s.step;
            pairs.push((&mut d.exp_avg.data, &s.exp_avg.data));
            pairs.push((&mut d.exp_avg_sq.data, &s.exp_avg_sq.data));
        }
        crate::copy::parallel_copy(pairs);
    }

    fn same_structure(&self, o: &Snapshot) -> bool {
        let same = |a: &HostTensor, b: &HostTensor| a.shape == b.shape;
        self.params.len() == o.params.len()
            && self.moments.len() == o.moments.len()
            && self
                .params
                .iter()
                .zip(&o.params)
                .all(|((n, a), (m, b))| n == m && same(a, b))
            && self.moments.iter().zip(&o.moments).all(|((n, a), (m, b))| {
                n == m && same(&a.exp_avg, &b.exp_avg) && same(&a.exp_avg_sq, &b.exp_avg_sq)
            })
    }

    /// Bytes of tensor values held (parameters and moments).
    pub fn nbytes(&self) -> usize {
        let p: usize = self.params.values().map(HostTensor::nbytes).sum();
        let m: usize = self
            .moments
            .values()
            .map(|m| m.exp_avg.nbytes() + m.exp_avg_sq.nbytes())
            .sum();
        p + m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_is_bitwise() {
        let a = HostTensor::new("a", vec![2], vec![f32::NAN, 0.0]).expect("tensor");
        let b = HostTensor::new("a", vec![2], vec![f32::NAN, -0.0]).expect("tensor");
        assert_eq!(a, a.clone());
        assert_ne!(a, b);
        assert!(HostTensor::new("c", vec![3, 2], vec![0.0; 5]).is_err());
    }

    #[test]
    fn optimizer_state_round_trips_with_parameter_shapes() {
        let mut s = Snapshot::new(
            SnapshotMeta {
                rank: 0,
                layout: Layout::single(),
                config_hash: "x".into(),
            },
            3,
        );
        s.add_param("w", &[2, 2], vec![1.0; 4]).expect("param");
        let mut st = AdamWState {
            steps: 3,
            ..AdamWState::default()
        };
        st.params.insert(
            "w".into(),
            ParamState {
                step: 3,
                exp_avg: vec![0.5; 4],
                exp_avg_sq: vec![0.25; 4],
            },
        );
        s.set_optimizer(st.clone()).expect("optimizer");
        assert_eq!(s.moments["w"].exp_avg.shape(), &[2, 2]);
        assert_eq!(s.optimizer_state(), st);
        let mut other = Snapshot::new(s.meta.clone(), 0);
        other.copy_from(&s);
        assert_eq!(other, s);
        let ptr = other.params["w"].data().as_ptr();
        s.params.get_mut("w").expect("w").data[0] = 9.0;
        s.step = 4;
        other.copy_from(&s);
        assert_eq!(other, s);
        assert_eq!(other.params["w"].data().as_ptr(), ptr, "buffers are reused");
    }
}
