//! Checkpoint snapshots that cost training no copy: the state before a step, kept by that
//! step's out-of-place optimizer update.
//!
//! DataStates-LLM (HPDC'24) observes that parameters and optimizer moments do not change
//! between one optimizer step and the next, so the snapshot copy can run while the next
//! forward and backward do, fenced before the optimizer. On a CPU that copy still takes the
//! cores the forward and backward need. Here it disappears instead: the step that follows the
//! checkpoint boundary runs AdamW out of place ([`AdamW::step_out_of_place`]), writing the new
//! values and moments into spare buffers and swapping them in, so the buffers it leaves behind
//! hold exactly the state before the step. Memory traffic is that of the in-place update
//! (streaming stores); what remains of the stall is the copy of the small tensors the
//! optimizer does not touch (router biases) and of the data cursor when the step begins.
//!
//! [`Trainer::step_with_snapshot`] falls back to an ordinary copy ([`Trainer::snapshot`]) when
//! the optimizer has not stepped yet (there are no moments to keep) or a tensor is not in host
//! memory.
//!
//! [`AdamW::step_out_of_place`]: flotilla_model::optim::AdamW::step_out_of_place

use std::collections::{BTreeMap, HashMap};

use flotilla_ckpt::{HostTensor, Moments, Snapshot};
use flotilla_model::Tensor;
use flotilla_model::optim::{AdamW, ParamRef, Spare};

use crate::error::JobError;
use crate::trainer::{StepStats, Trainer};

/// The snapshot a step is filling: everything but the trainable tensors and their moments,
/// captured when the step began, plus the buffers the optimizer leaves the old values in.
#[derive(Debug)]
pub(crate) struct Kept {
    snap: Snapshot,
    bufs: BTreeMap<String, KeptTensor>,
    filled: bool,
}

/// One trainable tensor's buffers and its optimizer step count before the update.
#[derive(Debug)]
struct KeptTensor {
    shape: Vec<usize>,
    step: u64,
    value: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

fn ckpt_err(e: flotilla_ckpt::SnapshotError) -> JobError {
    JobError::Checkpoint(e.to_string())
}

impl Trainer {
    /// Take one step and return, with its statistics, the snapshot of the state before it:
    /// bit for bit what [`Trainer::snapshot`] returns just before the step, taken without
    /// copying the trainable tensors or their moments. `reuse` is an earlier snapshot whose
    /// buffers the optimizer may write into (already touched memory, no page faults). When the
    /// step fails, its snapshot is lost with it.
    pub fn step_with_snapshot(
        &mut self,
        reuse: Option<Snapshot>,
    ) -> Result<(StepStats, Snapshot), JobError> {
        let Some(kept) = self.begin_kept(reuse)? else {
            let snap = self.snapshot()?;
            return Ok((self.step()?, snap));
        };
        self.kept = Some(kept);
        let stats = self.step();
        let kept = self.kept.take();
        let stats = stats?;
        match kept {
            Some(k) if k.filled => Ok((stats, k.finish()?)),
            _ => Err(JobError::Checkpoint(
                "the optimizer step did not fill the kept snapshot".into(),
            )),
        }
    }

    /// Capture what the optimizer will not keep, and set out buffers for what it will;
    /// `None` when this trainer cannot keep a snapshot this way.
    fn begin_kept(&self, reuse: Option<Snapshot>) -> Result<Option<Kept>, JobError> {
        let state = self.opt.state();
        if state.steps == 0 {
            return Ok(None);
        }
        let trainable = self.model.weights.trainable();
        let held = self.held_named();
        if held.values().any(|t| t.host().is_none())
            || held
                .keys()
                .any(|n| trainable.contains_key(n) != state.params.contains_key(n))
            || state.params.keys().any(|n| !held.contains_key(n))
        {
            return Ok(None);
        }
        let mut pool = BufferPool::from_snapshot(reuse);
        let grads = self.grads.trainable();
        let mut snap = Snapshot::new(self.meta.clone(), self.step);
        snap.schedule_step = self.step;
        snap.optim_steps = state.steps;
        snap.set_data_cursor(&self.loader.cursor());
        let mut bufs = BTreeMap::new();
        for (name, t) in &held {
            let values = t.host().unwrap_or_default();
            match state.params.get(name) {
                Some(p) => {
                    let grad = grads.get(name).and_then(|g| g.host()).unwrap_or_default();
                    let sources = [values, grad, &p.exp_avg, &p.exp_avg_sq].map(<[f32]>::as_ptr);
                    let [value, exp_avg, exp_avg_sq] = pool.take3(values.len(), &sources);
                    let kt = KeptTensor {
                        shape: t.shape().to_vec(),
                        step: p.step,
                        value,
                        exp_avg,
                        exp_avg_sq,
                    };
                    bufs.insert(name.clone(), kt);
                }
                None => snap
                    .add_param(name, t.shape(), values.to_vec())
                    .map_err(ckpt_err)?,
            }
        }
        Ok(Some(Kept {
            snap,
            bufs,
            filled: false,
        }))
    }
}

/// The buffers of an earlier snapshot, by length, handed out as spares for the optimizer's
/// new values. Any buffer of a tensor's length will do for any of its three roles, so they are
/// chosen for speed: the out-of-place update streams its three results with 32-byte
/// non-temporal stores only when the three share their offset from a 32-byte boundary, and it
/// slows by a third when a destination lies a few bytes from one of its sources modulo 4 KiB
/// (the CPU then takes the loads for reloads of the pending stores: "4K aliasing"). Heap
/// buffers are only 16-byte aligned, and a tensor's buffer and the one it alternates with tend
/// to sit 16 bytes apart in that sense, so a spare is picked, among a few of the right length,
/// that avoids both.
struct BufferPool {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
}

/// Candidates examined per spare.
const CANDIDATES: usize = 16;

impl BufferPool {
    fn from_snapshot(reuse: Option<Snapshot>) -> Self {
        let mut by_len: HashMap<usize, Vec<Vec<f32>>> = HashMap::new();
        if let Some(s) = reuse {
            let moments = s
                .moments
                .into_values()
                .flat_map(|m| [m.exp_avg.into_data(), m.exp_avg_sq.into_data()]);
            let params = s.params.into_values().map(HostTensor::into_data);
            for v in params.chain(moments) {
                by_len.entry(v.len()).or_default().push(v);
            }
        }
        Self { by_len }
    }

    /// Whether a buffer at `dst` would alias one of `sources` modulo 4 KiB (within 64 bytes,
    /// but not at the same offset).
    fn aliases(dst: *const f32, sources: &[*const f32]) -> bool {
        sources.iter().any(|&src| {
            let d = (dst as isize - src as isize).rem_euclid(4096);
            d != 0 && !(64..=4096 - 64).contains(&d)
        })
    }

    /// Three buffers of `n` values for a tensor whose update reads `sources`: sharing their
    /// 32-byte offset and aliasing no source where the pool allows, fresh ones where it is
    /// empty.
    fn take3(&mut self, n: usize, sources: &[*const f32]) -> [Vec<f32>; 3] {
        let first = self.take(n, sources, None);
        let offset = first.as_ptr() as usize % 32;
        let second = self.take(n, sources, Some(offset));
        let third = self.take(n, sources, Some(offset));
        [first, second, third]
    }

    /// A buffer of `n` values: among the last few of that length, the first that aliases no
    /// source and (when given) lies at `offset` from a 32-byte boundary; else the last one;
    /// else a fresh one.
    fn take(&mut self, n: usize, sources: &[*const f32], offset: Option<usize>) -> Vec<f32> {
        let Some(list) = self.by_len.get_mut(&n).filter(|l| !l.is_empty()) else {
            return vec![0.0; n];
        };
        let good = |v: &Vec<f32>| {
            !Self::aliases(v.as_ptr(), sources)
                && offset.is_none_or(|o| v.as_ptr() as usize % 32 == o)
        };
        let from = list.len().saturating_sub(CANDIDATES);
        let at = (from..list.len())
            .rev()
            .find(|&i| good(&list[i]))
            .unwrap_or(list.len() - 1);
        list.swap_remove(at)
    }
}

impl Kept {
    /// The finished snapshot: the captured part plus the values the optimizer left behind.
    fn finish(self) -> Result<Snapshot, JobError> {
        let mut snap = self.snap;
        for (name, kt) in self.bufs {
            snap.add_param(&name, &kt.shape, kt.value)
                .map_err(ckpt_err)?;
            let m = Moments {
                step: kt.step,
                exp_avg: HostTensor::new(&name, kt.shape.clone(), kt.exp_avg).map_err(ckpt_err)?,
                exp_avg_sq: HostTensor::new(&name, kt.shape, kt.exp_avg_sq).map_err(ckpt_err)?,
            };
            snap.moments.insert(name, m);
        }
        Ok(snap)
    }
}

/// [`AdamW::step_out_of_place`] over `refs` (the trainable tensors) with `kept`'s buffers as
/// the spares: the new values land in `kept`, to be swapped in by [`install`].
pub(crate) fn step_keeping(
    opt: &mut AdamW,
    lr: f64,
    refs: Vec<ParamRef<'_>>,
    kept: &mut Kept,
) -> Result<(), JobError> {
    let mut by_name: HashMap<&str, &mut KeptTensor> =
        kept.bufs.iter_mut().map(|(n, k)| (n.as_str(), k)).collect();
    let mut spares = Vec::with_capacity(refs.len());
    for r in &refs {
        let k = by_name
            .remove(r.name)
            .ok_or_else(|| JobError::Checkpoint(format!("{}: no buffer kept for it", r.name)))?;
        spares.push(Spare {
            value: &mut k.value,
            exp_avg: &mut k.exp_avg,
            exp_avg_sq: &mut k.exp_avg_sq,
        });
    }
    opt.step_out_of_place(lr, &refs, &mut spares)
        .map_err(|e| JobError::Optim(e.to_string()))?;
    Ok(())
}

/// Swap the new values of the tensors `taken` out of the model with the old ones: the tensors
/// then hold the step's result and `kept` the state before it.
pub(crate) fn install(taken: &mut [(String, Tensor)], kept: &mut Kept) -> Result<(), JobError> {
    for (name, t) in taken.iter_mut() {
        let k = kept
            .bufs
            .get_mut(name.as_str())
            .ok_or_else(|| JobError::Checkpoint(format!("{name}: no buffer kept for it")))?;
        if !t.swap_host(&mut k.value) {
            return Err(JobError::Checkpoint(format!(
                "{name}: cannot swap in the new values"
            )));
        }
    }
    kept.filled = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use flotilla_runtime::config::Config;

    use crate::trainer::{StepStats, Trainer};

    /// A step's statistics less the measured time, which differs from run to run.
    fn det(mut s: StepStats) -> StepStats {
        s.device_seconds = 0.0;
        s
    }

    fn cfg() -> Config {
        let mut c = crate::job::tests::tiny();
        c.job.steps = 6;
        c
    }

    /// The kept snapshot equals the copied one bit for bit, the step equals an ordinary step,
    /// and a trainer restored from the kept snapshot continues exactly like the original;
    /// reused buffers give the same result.
    #[test]
    fn kept_snapshot_is_the_copied_snapshot() {
        let cfg = cfg();
        let mut plain = Trainer::new(&cfg).expect("trainer");
        let mut kept = Trainer::new(&cfg).expect("trainer");
        // Before the first step there are no moments to keep: the copy fallback.
        let (s0, first) = kept.step_with_snapshot(None).expect("step 0");
        let copied0 = plain.snapshot().expect("snapshot");
        assert_eq!(first, copied0);
        assert_eq!(det(plain.step().expect("step 0")), det(s0));
        let mut reuse = None;
        for step in 1..4 {
            let copied = plain.snapshot().expect("snapshot");
            let want = plain.step().expect("step");
            let (got, snap) = kept.step_with_snapshot(reuse.take()).expect("step");
            assert_eq!(det(got), det(want), "step {step}");
            assert_eq!(snap, copied, "step {step}: kept vs copied snapshot");
            assert_eq!(kept.params_sha256(), plain.params_sha256(), "step {step}");
            reuse = Some(snap);
        }
        // The last kept snapshot is the state after 3 steps: restored and stepped once, it
        // reaches the plain trainer's state after 4.
        let snap = reuse.expect("a snapshot");
        assert_eq!(snap.step, 3);
        let mut resumed = Trainer::new(&cfg).expect("trainer");
        resumed.restore(&snap).expect("restore");
        resumed.step().expect("step 3");
        assert_eq!(resumed.params_sha256(), plain.params_sha256());
    }

    /// The pool hands out three buffers that share their 32-byte offset and alias no source
    /// when it holds such buffers, and fresh ones when it holds none of the length.
    #[test]
    fn spares_share_an_offset_and_alias_no_source() {
        let n = 4096;
        let mut pool = super::BufferPool {
            by_len: std::collections::HashMap::new(),
        };
        // Twelve buffers: each allocator address class appears several times.
        let bufs: Vec<Vec<f32>> = (0..12).map(|_| vec![0.0f32; n]).collect();
        pool.by_len.insert(n, bufs);
        let source = vec![1.0f32; n];
        // A source 16 bytes before the first candidate: that one would alias it.
        let first = pool.by_len[&n]
            .last()
            .map(|v| v.as_ptr())
            .expect("a buffer");
        let sources = [source.as_ptr(), first.wrapping_sub(4)];
        let [a, b, c] = pool.take3(n, &sources);
        let off = |v: &Vec<f32>| v.as_ptr() as usize % 32;
        if off(&a) == off(&b) && off(&b) == off(&c) {
            for v in [&a, &b, &c] {
                assert!(!super::BufferPool::aliases(v.as_ptr(), &sources));
            }
        }
        assert_ne!(a.as_ptr(), first, "the aliasing candidate was skipped");
        assert_eq!(pool.by_len[&n].len(), 9);
        let fresh = pool.take3(2 * n, &sources);
        assert!(fresh.iter().all(|v| v.len() == 2 * n));
    }
}
