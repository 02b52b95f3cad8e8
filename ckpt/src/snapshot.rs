//! A [`Snapshot`]: one rank's whole training state in host memory, everything needed to continue
//! training bit-exactly: every named tensor (parameters and buffers such as the router biases),
//! AdamW's moments and per-parameter step counts, the step, the schedule position, the data
//! cursor, the RNG state (if the trainer has one), and metadata (rank, parallel layout, config
//! hash) that says which job and which slice of it the state belongs to.
//!
//! Taking a snapshot is the only part of a checkpoint that stalls training: it copies the state
//! out of the trainer. Encoding and persisting happen later, off the training path
//! ([`crate::engine`]).
//!
//! A snapshot of the simulated cluster is *shape-only*: its tensors ([`HostTensor::shape_only`])
//! have shapes and a modelled size ([`Snapshot::nbytes`]) but no values. It can be checkpointed
//! (the engine writes a shard of its modelled size by size only); everything that needs its
//! values (encoding, hashing, the optimizer state, a restore) refuses it with
//! [`SnapshotError::NoValues`].

use std::collections::BTreeMap;

use flotilla_model::data::DataCursor;
use flotilla_model::optim::{AdamW, AdamWState, ParamState};
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
    #[error(
        "tensor `{name}` holds no values: the snapshot is shape-only (taken on the simulated \
         cluster, whose device keeps shapes only)"
    )]
    NoValues { name: String },
    #[error("optimizer state of `{name}`: {why}")]
    Optimizer { name: String, why: String },
    #[error("data cursor: {0}")]
    Cursor(String),
    #[error("snapshot does not fit this trainer: {0}")]
    Mismatch(String),
}

/// A dense row-major f32 tensor in host memory, or only its shape (a shape-only tensor of the
/// simulated device). Equality is bit-exact (`NaN == NaN` when the bits agree, `0.0 != -0.0`),
/// which is what a checkpoint round trip must preserve; two shape-only tensors are equal when
/// their shapes are.
#[derive(Clone, Debug)]
pub struct HostTensor {
    shape: Vec<usize>,
    /// Empty for a shape-only tensor.
    data: Vec<f32>,
    shape_only: bool,
}

fn numel(shape: &[usize]) -> usize {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX)
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; fails when the lengths disagree.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Self, SnapshotError> {
        let want = numel(&shape);
        if want != data.len() {
            return Err(SnapshotError::Shape {
                name: name.to_string(),
                shape,
                want,
                got: data.len(),
            });
        }
        Ok(Self {
            shape,
            data,
            shape_only: false,
        })
    }

    /// A tensor of `shape` without values (the simulated device's): it has a modelled size
    /// ([`HostTensor::nbytes`]) and allocates nothing.
    pub fn shape_only(shape: Vec<usize>) -> Self {
        Self {
            shape,
            data: Vec::new(),
            shape_only: true,
        }
    }

    /// Whether it holds values (false for a shape-only tensor).
    pub fn has_values(&self) -> bool {
        !self.shape_only
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Elements, from the shape (saturating).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The values; empty for a shape-only tensor (see [`HostTensor::values`]).
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, or `None` for a shape-only tensor.
    pub fn values(&self) -> Option<&[f32]> {
        self.has_values().then_some(self.data.as_slice())
    }

    /// The values, to overwrite in place (a checkpointer refilling a kept snapshot buffer);
    /// the shape cannot change. Empty for a shape-only tensor.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values; empty for a shape-only tensor.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Bytes of the values (4 per element), modelled from the shape for a shape-only tensor.
    pub fn nbytes(&self) -> usize {
        self.numel().saturating_mul(4)
    }
}

impl PartialEq for HostTensor {
    fn eq(&self, o: &Self) -> bool {
        self.shape == o.shape
            && self.shape_only == o.shape_only
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

    /// Add a named tensor of `shape` without values (a shape-only snapshot).
    pub fn add_shape_only(&mut self, name: &str, shape: &[usize]) {
        let t = HostTensor::shape_only(shape.to_vec());
        self.params.insert(name.to_string(), t);
    }

    /// Add AdamW's moments of parameter `name` (add it first) without values, shaped like it,
    /// after `step` updates (a shape-only snapshot).
    pub fn add_shape_only_moments(&mut self, name: &str, step: u64) -> Result<(), SnapshotError> {
        let shape = match self.params.get(name) {
            Some(t) => t.shape.clone(),
            None => {
                return Err(SnapshotError::Optimizer {
                    name: name.to_string(),
                    why: "no such parameter in the snapshot".into(),
                });
            }
        };
        let m = Moments {
            step,
            exp_avg: HostTensor::shape_only(shape.clone()),
            exp_avg_sq: HostTensor::shape_only(shape),
        };
        self.moments.insert(name.to_string(), m);
        Ok(())
    }

    /// AdamW's state without values, for a shape-only snapshot (add the parameters first):
    /// its step count, and shape-only moments shaped like each parameter that has state
    /// (a parameter the optimizer has not updated yet has none, as in [`AdamW::export_state`]).
    pub fn set_optimizer_shapes(&mut self, opt: &AdamW) -> Result<(), SnapshotError> {
        self.optim_steps = opt.steps();
        self.moments.clear();
        let names: Vec<String> = self.params.keys().cloned().collect();
        for name in names {
            if let Some(step) = opt.param_steps(&name) {
                self.add_shape_only_moments(&name, step)?;
            }
        }
        Ok(())
    }

    /// The first tensor (parameter, or moment under its parameter's name) that holds no values.
    pub fn first_shape_only(&self) -> Option<&str> {
        let p = self.params.iter().find(|(_, t)| !t.has_values());
        let m = || {
            self.moments
                .iter()
                .find(|(_, m)| !m.exp_avg.has_values() || !m.exp_avg_sq.has_values())
                .map(|(n, _)| n)
        };
        p.map(|(n, _)| n).or_else(m).map(String::as_str)
    }

    /// Whether any tensor holds no values (a snapshot of the simulated cluster): such a
    /// snapshot can only be checkpointed by size.
    pub fn is_shape_only(&self) -> bool {
        self.first_shape_only().is_some()
    }

    /// Fails with [`SnapshotError::NoValues`] when the snapshot is shape-only: for everything
    /// that reads values.
    pub fn require_values(&self) -> Result<(), SnapshotError> {
        match self.first_shape_only() {
            Some(name) => Err(SnapshotError::NoValues {
                name: name.to_string(),
            }),
            None => Ok(()),
        }
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

    /// AdamW's state as [`flotilla_model::optim::AdamW::import_state`] takes it (a copy);
    /// refused for a shape-only snapshot.
    pub fn optimizer_state(&self) -> Result<AdamWState, SnapshotError> {
        self.require_values()?;
        Ok(AdamWState {
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
        })
    }

    /// Record the loader's position.
    pub fn set_data_cursor(&mut self, cursor: &DataCursor) {
        self.data_cursor = cursor.to_bytes().to_vec();
    }

    /// The loader's position, decoded.
    pub fn data_cursor(&self) -> Result<DataCursor, SnapshotError> {
        DataCursor::from_bytes(&self.data_cursor).map_err(|e| SnapshotError::Cursor(e.to_string()))
    }

    /// Bytes of tensor values (parameters and moments); for a shape-only snapshot, the bytes
    /// its values would take (its modelled size).
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
        assert_eq!(s.optimizer_state(), Ok(st));
    }

    #[test]
    fn a_shape_only_snapshot_has_a_size_and_refuses_its_values() {
        let meta = SnapshotMeta {
            rank: 0,
            layout: Layout::single(),
            config_hash: "x".into(),
        };
        let mut s = Snapshot::new(meta, 2);
        s.add_shape_only("w", &[1 << 20, 1 << 10]);
        s.add_shape_only_moments("w", 2).expect("moments");
        assert!(s.add_shape_only_moments("absent", 2).is_err());
        assert!(s.is_shape_only());
        assert_eq!(s.nbytes(), 3 * (4 << 30), "three 4 GiB tensors, modelled");
        assert_eq!(s.params["w"].values(), None);
        assert!(s.params["w"].data().is_empty(), "nothing is allocated");
        let err = s.optimizer_state().expect_err("no values");
        assert_eq!(err, SnapshotError::NoValues { name: "w".into() });
        assert!(err.to_string().contains("simulated cluster"), "{err}");
        let mut real = Snapshot::new(s.meta.clone(), 0);
        real.add_param("w", &[2], vec![1.0, 2.0]).expect("param");
        assert!(!real.is_shape_only());
        assert_eq!(real.require_values(), Ok(()));
        assert_ne!(
            HostTensor::shape_only(vec![2]),
            HostTensor::new("w", vec![2], vec![0.0; 2]).expect("tensor")
        );
    }
}
