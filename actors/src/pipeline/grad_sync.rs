//! Gradient reduction across the ranks that hold the same tensors, in buckets, overlapped with
//! the rest of the backward pass.
//!
//! Tensors are grouped by their holder set (see [`Placement::holders`]): the dense tensors of a
//! stage (held by every data rank, and by both copies under DualPipe), each EP index's routed
//! experts (held by the DP ranks of that EP index), the embedding (the first and the head stage).
//! Each group gets its own communicator and fabric channel. When the executor reports that every
//! `W` of a stage is done on this rank, each group whose tensors come only from finished stages
//! is copied out (scaled by `1 / (data ranks · micro-batches)`, the mean over the global batch),
//! cut into buckets of `dp_bucket_mib`, and all-reduced (sum) by a task on the async runtime
//! while the compute thread goes on with the other stage's backward. [`GradSync::finish`] waits
//! for every group and writes the sums back. Every member receives the same bits, so replicas
//! stay identical.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use flotilla_collectives::{Algo, CommConfig, Communicator, ReduceOp};
use flotilla_model::Weights;
use flotilla_model::params::{Params, named};
use flotilla_runtime::fabric::Fabric;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::placement::Placement;

/// First fabric channel of the gradient groups (one channel per distinct holder set).
pub const GRAD_CHANNEL: u32 = 0x4752_0000;

struct Group {
    /// The group's trainable tensors, in the order their values are concatenated.
    names: Vec<String>,
    /// This rank's stages that the group's gradients come from.
    stages: BTreeSet<usize>,
    comm: Option<Communicator>,
    launched: bool,
}

type Reduced = Result<(usize, Vec<f32>, Communicator), String>;

/// One rank's gradient groups, kept across steps (the communicators' sequence numbers run on).
pub struct GradSync {
    groups: Vec<Group>,
    bucket_values: usize,
    rt: Handle,
    state: Mutex<StepState>,
}

#[derive(Default)]
struct StepState {
    scale: f32,
    done: BTreeSet<usize>,
    pending: Vec<JoinHandle<Reduced>>,
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("groups", &self.groups.len())
            .finish()
    }
}

impl GradSync {
    /// `rank`'s gradient groups. `all_names` is every trainable tensor of the model, held here or
    /// not, so that every rank numbers the holder sets (and hence their channels) alike.
    pub fn new(
        placement: &Placement,
        rank: usize,
        all_names: &[String],
        fabric: &std::sync::Arc<dyn Fabric>,
        comm: CommConfig,
        bucket_bytes: usize,
        rt: Handle,
    ) -> Result<GradSync, String> {
        let sets = placement.holder_sets(all_names.iter().map(String::as_str));
        let mut groups = Vec::new();
        for (i, (members, names)) in sets.into_iter().enumerate() {
            if !members.contains(&rank) {
                continue;
            }
            let stages = names
                .iter()
                .flat_map(|n| placement.local_stages_of(rank, n))
                .collect();
            let c = Communicator::new(
                fabric.clone(),
                members.clone(),
                GRAD_CHANNEL + i as u32,
                comm.clone(),
            )
            .map_err(|e| format!("gradient group {members:?}: {e}"))?;
            groups.push(Group {
                names,
                stages,
                comm: Some(c),
                launched: false,
            });
        }
        Ok(GradSync {
            groups,
            bucket_values: (bucket_bytes / 4).max(1024),
            rt,
            state: Mutex::new(StepState::default()),
        })
    }

    /// Start a step whose gradients are scaled by `scale` before summing.
    pub fn begin(&mut self, scale: f32) {
        for g in &mut self.groups {
            g.launched = false;
        }
        if let Ok(mut st) = self.state.lock() {
            *st = StepState {
                scale,
                ..StepState::default()
            };
        }
    }

    /// Every `W` of `stage` is done: launch the groups that are now complete.
    pub fn stage_done(&mut self, stage: usize, grads: &Weights) {
        let ready: Vec<usize> = match self.state.lock() {
            Ok(mut st) => {
                st.done.insert(stage);
                let done = st.done.clone();
                self.groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| !g.launched && g.stages.is_subset(&done))
                    .map(|(i, _)| i)
                    .collect()
            }
            Err(_) => return,
        };
        for i in ready {
            self.launch(i, grads);
        }
    }

    fn launch(&mut self, i: usize, grads: &Weights) {
        let scale = self.state.lock().map(|s| s.scale).unwrap_or(1.0);
        let by_name = named(grads);
        let g = &mut self.groups[i];
        g.launched = true;
        let mut flat = Vec::new();
        for n in &g.names {
            if let Some(v) = by_name.get(n).and_then(|t| t.host()) {
                flat.extend(v.iter().map(|x| x * scale));
            }
        }
        let Some(mut comm) = g.comm.take() else {
            return;
        };
        let bucket = self.bucket_values;
        let task = self.rt.spawn(async move {
            let mut out = Vec::with_capacity(flat.len());
            for chunk in flat.chunks(bucket) {
                let r = comm
                    .all_reduce(chunk.to_vec(), ReduceOp::Sum, Algo::Auto)
                    .await
                    .map_err(|e| format!("gradient all-reduce: {e}"))?;
                out.extend(r);
            }
            Ok((i, out, comm))
        });
        if let Ok(mut st) = self.state.lock() {
            st.pending.push(task);
        }
    }

    /// Launch what is left, wait for every group and write the sums into `grads`.
    pub fn finish(&mut self, grads: &mut Weights) -> Result<(), String> {
        for i in 0..self.groups.len() {
            if !self.groups[i].launched {
                self.launch(i, grads);
            }
        }
        let pending = match self.state.lock() {
            Ok(mut st) => std::mem::take(&mut st.pending),
            Err(_) => return Err("a compute thread panicked".into()),
        };
        let mut sums: HashMap<String, (usize, usize, usize)> = HashMap::new();
        let mut results: Vec<Vec<f32>> = vec![Vec::new(); self.groups.len()];
        let mut first_err = None;
        for task in pending {
            match self.rt.block_on(task) {
                Ok(Ok((i, out, comm))) => {
                    self.groups[i].comm = Some(comm);
                    results[i] = out;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(format!("gradient task: {e}"));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // Where each name's values sit in its group's result.
        let by_name = named(grads);
        for (i, g) in self.groups.iter().enumerate() {
            let mut at = 0;
            for n in &g.names {
                if let Some(len) = by_name.get(n).and_then(|t| t.host()).map(<[f32]>::len) {
                    sums.insert(n.clone(), (i, at, len));
                    at += len;
                }
            }
        }
        drop(by_name);
        let mut short = None;
        grads.visit_mut("", &mut |n, t, _| {
            if let (Some(&(i, at, len)), Some(h)) = (sums.get(n), t.host_mut()) {
                match results[i].get(at..at + len) {
                    Some(v) => h.copy_from_slice(v),
                    None => short = Some(n.to_string()),
                }
            }
        });
        match short {
            Some(n) => Err(format!(
                "gradient all-reduce returned too few values for {n}"
            )),
            None => Ok(()),
        }
    }
}
