//! Gradient reduction across the ranks that hold the same tensors, overlapped with the rest of
//! the backward pass.
//!
//! Tensors are grouped by their holder set (see [`Placement::holders`]): the dense tensors of a
//! stage (held by every data rank, and by both copies under DualPipe), each EP index's routed
//! experts (held by the DP ranks of that EP index), the embedding (the first and the head stage).
//! Each group gets its own communicator and fabric channel. When every W of the stages a group's
//! gradients come from is done on this rank, the rank actor reduces it ([`reduce`]): one job
//! packs the group's gradients into a flat device buffer, scaled by `1 / (data ranks ·
//! micro-batches)` (the mean over the global batch), the buffer is all-reduced (sum) in buckets
//! of `dp_bucket_mib` over the fabric while the stream goes on with the other stage's
//! backward, and one job unpacks the sums into the gradients. Every member receives the same
//! bits, so replicas stay identical. A group of one rank skips the all-reduce: one job scales its
//! gradients in place.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use flotilla_collectives::{Algo, CommConfig, Communicator, ReduceOp};
use flotilla_model::Tensor;
use flotilla_model::params::Selection;
use flotilla_runtime::fabric::Fabric;

use super::placement::Placement;
use crate::stream::{Class, Order, Stream};

/// First fabric channel of the gradient groups (one channel per distinct holder set).
pub const GRAD_CHANNEL: u32 = 0x4752_0000;

/// One holder set's gradients on this rank.
#[derive(Debug)]
pub struct Group {
    /// The group's trainable tensors, in the order their values are packed.
    pub names: Arc<Vec<String>>,
    /// `names` as positions in the gradients' visit order (found at the first reduction).
    pub sel: Arc<OnceLock<Selection>>,
    /// This rank's stages that the group's gradients come from.
    pub stages: BTreeSet<usize>,
    /// The communicator (taken while a reduction runs).
    pub comm: Option<Communicator>,
}

/// One rank's gradient groups, kept across steps (the communicators' sequence numbers run on).
#[derive(Debug)]
pub struct GradGroups {
    pub groups: Vec<Group>,
    /// Values per all-reduce bucket.
    pub bucket: usize,
}

impl GradGroups {
    /// `rank`'s gradient groups among the job's holder sets `sets` (every trainable tensor of the
    /// model, held here or not, so that every rank numbers the sets, and hence their channels,
    /// alike: [`super::ModelShape::holder_sets`]).
    pub fn new(
        placement: &Placement,
        rank: usize,
        sets: &[(Vec<usize>, Vec<String>)],
        fabric: &Arc<dyn Fabric>,
        comm: CommConfig,
        bucket_bytes: usize,
    ) -> Result<GradGroups, String> {
        let mut groups = Vec::new();
        for (i, (members, names)) in sets.iter().enumerate() {
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
                names: Arc::new(names.clone()),
                sel: Arc::new(OnceLock::new()),
                stages,
                comm: Some(c),
            });
        }
        Ok(GradGroups {
            groups,
            bucket: (bucket_bytes / 4).max(1024),
        })
    }

    /// The groups not in `launched` whose gradients are final once the stages in `done` are.
    pub fn ready(&self, done: &BTreeSet<usize>, launched: &BTreeSet<usize>) -> Vec<usize> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(i, g)| !launched.contains(i) && g.stages.is_subset(done))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Reduce the gradients `names` over `comm`'s group; gives the communicator back with the
/// outcome (a failed one is poisoned and must be rebuilt).
pub async fn reduce(
    stream: Stream,
    names: Arc<Vec<String>>,
    sel: Arc<OnceLock<Selection>>,
    mut comm: Communicator,
    bucket: usize,
) -> (Communicator, Result<(), String>) {
    let order = Order::new(Class::Compute, 0, "gradients", 0);
    let which = Arc::clone(&sel);
    if comm.size() == 1 {
        // A group of one (tensors only this rank holds) has nothing to sum with: its gradients
        // are scaled in place, the same `g · scale` the packing would compute.
        let scaled = stream
            .run(order, move |d| {
                let store = &mut *d.store;
                let sel = which.get_or_init(|| Selection::of(&store.grads, &names));
                let mut taken = sel.take(&mut store.grads);
                d.dev
                    .scale_many(&mut taken.iter_mut().collect::<Vec<_>>(), store.scale);
                sel.put_back(&mut store.grads, taken);
            })
            .await
            .map_err(|e| format!("scaling gradients: {e}"));
        return (comm, scaled);
    }
    let packed = stream
        .run(order, move |d| {
            let store = &mut *d.store;
            let sel = which.get_or_init(|| Selection::of(&store.grads, &names));
            let ts: Vec<&Tensor> = sel.refs(&store.grads);
            let n: usize = ts.iter().map(|t| t.numel()).sum();
            let flat = d.dev.pack(&ts, store.scale);
            (n, d.dev.take_values(flat))
        })
        .await;
    let (n, values) = match packed {
        Ok(p) => p,
        Err(e) => return (comm, Err(format!("packing gradients: {e}"))),
    };
    let summed = match values {
        Some(v) => {
            let mut out = Vec::with_capacity(v.len());
            let mut r = Ok(());
            for chunk in v.chunks(bucket) {
                match comm
                    .all_reduce(chunk.to_vec(), ReduceOp::Sum, Algo::Auto)
                    .await
                {
                    Ok(s) => out.extend(s),
                    Err(e) => {
                        r = Err(format!("gradient all-reduce: {e}"));
                        break;
                    }
                }
            }
            r.map(|()| Some(out))
        }
        None => {
            let mut r = Ok(None);
            let mut left = n;
            while left > 0 && r.is_ok() {
                let len = left.min(bucket);
                left -= len;
                if let Err(e) = comm.all_reduce_absent(len, ReduceOp::Sum, Algo::Auto).await {
                    r = Err(format!("gradient all-reduce: {e}"));
                }
            }
            r
        }
    };
    let summed = match summed {
        Ok(s) => s,
        Err(e) => return (comm, Err(e)),
    };
    let unpacked = stream
        .run(order, move |d| {
            let store = &mut *d.store;
            let flat = d.dev.adopt(&[n], summed);
            // Found by the packing job above.
            let Some(sel) = sel.get() else {
                return Err("the group's tensors were never found".to_owned());
            };
            let mut taken = sel.take(&mut store.grads);
            let mut ts: Vec<&mut Tensor> = taken.iter_mut().collect();
            d.dev.unpack(&flat, &mut ts);
            drop(ts);
            sel.put_back(&mut store.grads, taken);
            Ok(())
        })
        .await;
    (
        comm,
        unpacked
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| format!("unpacking gradients: {e}")),
    )
}
