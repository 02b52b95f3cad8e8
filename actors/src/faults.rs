//! Injected failures, for testing recovery the way a real fault would exercise it: a rank's
//! step fails once at a given step and, optionally, the rank loses its memory with it (its own
//! in-memory checkpoint copy), so that its restore has to come from a peer or from storage; or
//! a stage actor panics, so that its supervisor restarts it; or a step's job-wide loss is
//! corrupted (scaled by a factor, NaN included) after the ranks have summed it, as a bad batch
//! or a numerical fault would, so that the sentinel's rules meet it; or a rank's device is
//! slower than its peers' (a straggler); or a rank's step hangs (the watchdog's case).
//!
//! A plan is shared by the ranks (which consult it before each step) and the job driver (which
//! asks, when it rolls the job back, whose memory was lost).

use std::sync::Mutex;

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    /// The rank whose step fails.
    pub rank: usize,
    /// The step (0-based index of the optimizer step) that fails.
    pub step: u64,
    /// Whether the rank's own in-memory checkpoint copy is lost with it.
    pub lose_memory: bool,
}

/// A stage actor that panics when it is told to run a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagePanic {
    pub rank: usize,
    pub stage: usize,
    pub step: u64,
}

/// The failures to inject into one job; each fires once.
#[derive(Debug, Default)]
pub struct FaultPlan {
    faults: Mutex<Vec<(InjectedFault, bool)>>,
    panics: Mutex<Vec<(StagePanic, bool)>>,
    /// (step, factor): the job-wide loss of that step is multiplied by the factor, on every
    /// rank, every time the step runs.
    loss_factors: Vec<(u64, f32)>,
    /// (rank, factor): that rank's device work takes `factor` times as long.
    slow_ranks: Vec<(usize, f64)>,
    /// (rank, step, how long, fired): that rank's step goes silent for that long, once.
    stalls: Mutex<Vec<(usize, u64, std::time::Duration, bool)>>,
    /// Steps that pass over the data loader's next batch and take the one after (a run whose
    /// data omits a batch, to compare a skipped update with).
    omitted: Vec<u64>,
}

impl FaultPlan {
    /// A plan of `faults`, none fired yet.
    pub fn new(faults: Vec<InjectedFault>) -> Self {
        Self {
            faults: Mutex::new(faults.into_iter().map(|f| (f, false)).collect()),
            panics: Mutex::new(Vec::new()),
            loss_factors: Vec::new(),
            slow_ranks: Vec::new(),
            stalls: Mutex::new(Vec::new()),
            omitted: Vec::new(),
        }
    }

    /// The plan with step `step` passing over its batch: it trains on the batch after, and every
    /// later step one batch further on (on every rank, every time the step runs).
    #[must_use]
    pub fn with_omitted_batch(mut self, step: u64) -> Self {
        self.omitted.push(step);
        self
    }

    /// Whether step `step` passes over its batch.
    pub fn omits_batch(&self, step: u64) -> bool {
        self.omitted.contains(&step)
    }

    /// The plan with rank `rank`'s step `step` hanging for `d` (once: a replay runs normally).
    #[must_use]
    pub fn with_stall(self, rank: usize, step: u64, d: std::time::Duration) -> Self {
        self.stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((rank, step, d, false));
        self
    }

    /// How long `rank`'s step `step` hangs now, if a stall is planned and has not fired (it is
    /// marked fired).
    pub fn stall(&self, rank: usize, step: u64) -> Option<std::time::Duration> {
        let mut stalls = self.stalls.lock().unwrap_or_else(|e| e.into_inner());
        let (_, _, d, fired) = stalls
            .iter_mut()
            .find(|(r, s, _, fired)| !*fired && *r == rank && *s == step)?;
        *fired = true;
        Some(*d)
    }

    /// The plan with rank `rank`'s device work taking `factor` times as long, from its start.
    #[must_use]
    pub fn with_slow_rank(mut self, rank: usize, factor: f64) -> Self {
        self.slow_ranks.push((rank, factor));
        self
    }

    /// How many times slower `rank`'s device is, if it is.
    pub fn slowdown(&self, rank: usize) -> Option<f64> {
        self.slow_ranks
            .iter()
            .find(|(r, _)| *r == rank)
            .map(|&(_, f)| f)
    }

    /// The plan with step `step`'s job-wide loss multiplied by `factor` (`f32::NAN` makes it
    /// not finite).
    #[must_use]
    pub fn with_loss_factor(mut self, step: u64, factor: f32) -> Self {
        self.loss_factors.push((step, factor));
        self
    }

    /// What step `step`'s loss is multiplied by, if anything.
    pub fn loss_factor(&self, step: u64) -> Option<f32> {
        self.loss_factors
            .iter()
            .find(|(s, _)| *s == step)
            .map(|&(_, f)| f)
    }

    /// The plan with a stage actor's panic added.
    #[must_use]
    pub fn with_panic(self, p: StagePanic) -> Self {
        self.panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((p, false));
        self
    }

    /// Whether stage `stage` of `rank` panics at `step` now (once).
    pub fn panics(&self, rank: usize, stage: usize, step: u64) -> bool {
        let mut panics = self.panics.lock().unwrap_or_else(|e| e.into_inner());
        match panics
            .iter_mut()
            .find(|(p, fired)| !*fired && *p == StagePanic { rank, stage, step })
        {
            Some((_, fired)) => {
                *fired = true;
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(InjectedFault, bool)>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault that makes `rank`'s step `step` fail now, if one is planned and has not fired
    /// (it is marked fired).
    pub fn fire(&self, rank: usize, step: u64) -> Option<InjectedFault> {
        let mut faults = self.lock();
        let (f, fired) = faults
            .iter_mut()
            .find(|(f, fired)| !*fired && f.rank == rank && f.step == step)?;
        *fired = true;
        Some(*f)
    }

    /// Whether a fault that fired took `rank`'s memory.
    pub fn lost_memory(&self, rank: usize) -> bool {
        self.lock()
            .iter()
            .any(|(f, fired)| *fired && f.rank == rank && f.lose_memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_fires_once_for_its_rank_and_step() {
        let plan = FaultPlan::new(vec![InjectedFault {
            rank: 1,
            step: 3,
            lose_memory: true,
        }]);
        assert!(plan.fire(0, 3).is_none());
        assert!(plan.fire(1, 2).is_none());
        assert!(!plan.lost_memory(1));
        assert!(plan.fire(1, 3).is_some());
        assert!(plan.lost_memory(1));
        assert!(plan.fire(1, 3).is_none(), "fired once");
    }
}
