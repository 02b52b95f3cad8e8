//! The sentinel's detectors (TRANSOM's TEE): what is anomalous in a step's job-wide statistics,
//! judged against the steps before it. Plain data in, findings out; the sentinel actor
//! ([`crate::sentinel`]) runs them and the job driver acts on what they find.
//!
//! Each detector compares a step with a window of the `sentinel.window` steps before it (a
//! step found anomalous does not enter the windows, so a spike does not raise the bar for the
//! next one), and stays silent until its window holds half its length.

use std::collections::VecDeque;
use std::fmt;

use flotilla_runtime::config::SentinelConfig;
use serde::Serialize;

/// What the sentinel sees of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub step: u64,
    /// The job-wide loss.
    pub loss: f32,
    /// The job-wide gradient norm (before clipping).
    pub grad_norm: f64,
    /// Tokens per second of the step.
    pub tokens_per_s: f64,
    /// Each rank's busy (device) seconds in the step, by rank.
    pub rank_seconds: Vec<f64>,
    /// The routed experts' load, max over mean, per MoE layer: (the layer's place among the
    /// model's MoE layers, in model order; the value).
    pub expert_load: Vec<(usize, f32)>,
}

/// Which detector fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// The loss or the gradient norm is NaN or infinite.
    NonFinite,
    /// The loss is above `loss_spike_factor` × its running mean.
    LossSpike,
    /// The gradient norm is above `grad_norm_max`, or `grad_norm_spike_factor` × its running
    /// mean.
    GradNormSpike,
    /// A rank's step took more than `step_time_factor` × the ranks' median.
    Straggler,
    /// Tokens per second fell below `throughput_drop` × the running mean.
    ThroughputDrop,
    /// A MoE layer's busiest expert took more than `expert_load_max` × the mean load.
    ExpertCollapse,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::NonFinite => "non_finite",
            AnomalyKind::LossSpike => "loss_spike",
            AnomalyKind::GradNormSpike => "grad_norm_spike",
            AnomalyKind::Straggler => "straggler",
            AnomalyKind::ThroughputDrop => "throughput_drop",
            AnomalyKind::ExpertCollapse => "expert_collapse",
        }
    }
}

/// One finding: which detector, on which step (and rank or layer, where it names one), and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub step: u64,
    /// The rank a straggler is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// The MoE layer whose experts collapsed (its place among the model's MoE layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_layer: Option<usize>,
    /// The value that crossed the threshold, and the threshold.
    pub value: f64,
    pub threshold: f64,
    pub reason: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {}: {}: {}",
            self.step,
            self.kind.as_str(),
            self.reason
        )
    }
}

/// A running window of the last `len` values.
#[derive(Debug, Clone)]
struct Window {
    len: usize,
    values: VecDeque<f64>,
}

impl Window {
    fn new(len: usize) -> Window {
        Window {
            len: len.max(1),
            values: VecDeque::new(),
        }
    }

    /// The mean, once the window holds at least half its length.
    fn mean(&self) -> Option<f64> {
        (self.values.len() * 2 >= self.len && !self.values.is_empty())
            .then(|| self.values.iter().sum::<f64>() / self.values.len() as f64)
    }

    fn push(&mut self, v: f64) {
        if v.is_finite() {
            if self.values.len() == self.len {
                self.values.pop_front();
            }
            self.values.push_back(v);
        }
    }
}

/// The detectors and their windows.
#[derive(Debug, Clone)]
pub struct Detectors {
    sentinel: SentinelConfig,
    loss: SpikeGuard,
    grad_norm: Window,
    throughput: Window,
}

impl Detectors {
    pub fn new(cfg: &SentinelConfig) -> Detectors {
        Detectors {
            sentinel: cfg.clone(),
            loss: SpikeGuard::with(cfg.loss_spike_factor, cfg.window),
            grad_norm: Window::new(cfg.window),
            throughput: Window::new(cfg.window),
        }
    }

    /// What is anomalous in `o`; then `o` joins the windows where it was not.
    pub fn observe(&mut self, o: &Observation) -> Vec<Anomaly> {
        let c = &self.sentinel;
        let mut out = Vec::new();
        let found = |kind, value: f64, threshold: f64, reason: String| Anomaly {
            kind,
            step: o.step,
            rank: None,
            moe_layer: None,
            value,
            threshold,
            reason,
        };
        let loss = f64::from(o.loss);
        if !loss.is_finite() || !o.grad_norm.is_finite() {
            out.push(found(
                AnomalyKind::NonFinite,
                if loss.is_finite() { o.grad_norm } else { loss },
                0.0,
                format!("loss {}, gradient norm {}", o.loss, o.grad_norm),
            ));
        }
        let seen = self.loss.window.values.len();
        if let Some(m) = self.loss.spike(loss) {
            out.push(found(
                AnomalyKind::LossSpike,
                loss,
                c.loss_spike_factor * m,
                format!(
                    "loss {loss:.4} above {} × its mean {m:.4} over the last {seen} steps",
                    c.loss_spike_factor
                ),
            ));
        }
        let norm_mean = self.grad_norm.mean();
        let norm_spike = o.grad_norm.is_finite()
            && (o.grad_norm > c.grad_norm_max
                || norm_mean.is_some_and(|m| o.grad_norm > c.grad_norm_spike_factor * m));
        if norm_spike {
            let (threshold, reason) = if o.grad_norm > c.grad_norm_max {
                (
                    c.grad_norm_max,
                    format!(
                        "gradient norm {:.4e} above {:.4e}",
                        o.grad_norm, c.grad_norm_max
                    ),
                )
            } else {
                let m = norm_mean.unwrap_or(0.0);
                (
                    c.grad_norm_spike_factor * m,
                    format!(
                        "gradient norm {:.4e} above {} × its mean {m:.4e}",
                        o.grad_norm, c.grad_norm_spike_factor
                    ),
                )
            };
            out.push(found(
                AnomalyKind::GradNormSpike,
                o.grad_norm,
                threshold,
                reason,
            ));
        }
        if let Some(median) = median(&o.rank_seconds).filter(|m| *m > 0.0) {
            for (rank, &s) in o.rank_seconds.iter().enumerate() {
                if s > c.step_time_factor * median {
                    let mut a = found(
                        AnomalyKind::Straggler,
                        s,
                        c.step_time_factor * median,
                        format!(
                            "rank {rank} busy {s:.4} s, above {} × the ranks' median {median:.4} s",
                            c.step_time_factor
                        ),
                    );
                    a.rank = Some(rank);
                    out.push(a);
                }
            }
        }
        let slow = self
            .throughput
            .mean()
            .filter(|m| o.tokens_per_s < c.throughput_drop * m);
        if let Some(m) = slow {
            out.push(found(
                AnomalyKind::ThroughputDrop,
                o.tokens_per_s,
                c.throughput_drop * m,
                format!(
                    "{:.0} tokens/s, below {} × the mean {m:.0} tokens/s",
                    o.tokens_per_s, c.throughput_drop
                ),
            ));
        }
        for &(layer, v) in &o.expert_load {
            if f64::from(v) > c.expert_load_max {
                let mut a = found(
                    AnomalyKind::ExpertCollapse,
                    f64::from(v),
                    c.expert_load_max,
                    format!(
                        "MoE layer {layer}: busiest expert at {v:.2} × the mean load, above {}",
                        c.expert_load_max
                    ),
                );
                a.moe_layer = Some(layer);
                out.push(a);
            }
        }
        if !norm_spike {
            self.grad_norm.push(o.grad_norm);
        }
        if slow.is_none() {
            self.throughput.push(o.tokens_per_s);
        }
        out
    }
}

/// The loss-spike rule (`loss_spike_factor` × the mean of the last `window` losses that were
/// not spikes, once the window is half full). The sentinel's detector uses it, and so does every
/// rank, to skip a spiking batch: all ranks run it on the same job-wide losses, in the same
/// order, so all of them skip the same steps without asking anyone.
#[derive(Debug, Clone)]
pub struct SpikeGuard {
    factor: f64,
    window: Window,
}

impl SpikeGuard {
    /// The guard `s` asks for (none when the sentinel is off).
    pub fn new(s: &SentinelConfig) -> Option<SpikeGuard> {
        s.enabled
            .then(|| SpikeGuard::with(s.loss_spike_factor, s.window))
    }

    /// A spike is above `factor` × the mean of the last `window` losses.
    fn with(factor: f64, window: usize) -> SpikeGuard {
        SpikeGuard {
            factor,
            window: Window::new(window),
        }
    }

    /// The running mean that `loss` spikes above, if it does; a loss that does not joins the
    /// window.
    pub fn spike(&mut self, loss: f64) -> Option<f64> {
        let over = self.window.mean().filter(|m| loss > self.factor * m);
        if over.is_none() {
            self.window.push(loss);
        }
        over
    }

    /// Forget the losses seen (the state was restored from a checkpoint).
    pub fn reset(&mut self) {
        self.window.values.clear();
    }
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty or
/// when any value is not finite.
fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SentinelConfig {
        SentinelConfig {
            window: 4,
            ..SentinelConfig::default()
        }
    }

    fn calm(step: u64) -> Observation {
        Observation {
            step,
            loss: 2.0 + 0.01 * step as f32,
            grad_norm: 1.0,
            tokens_per_s: 1000.0,
            rank_seconds: vec![1.0, 1.1, 0.9, 1.0],
            expert_load: vec![(1, 1.5)],
        }
    }

    /// A detector that has seen `n` calm steps.
    fn warmed(n: u64) -> Detectors {
        let mut d = Detectors::new(&cfg());
        for s in 0..n {
            assert_eq!(d.observe(&calm(s)), Vec::new(), "step {s} is calm");
        }
        d
    }

    fn kinds(a: &[Anomaly]) -> Vec<AnomalyKind> {
        a.iter().map(|x| x.kind).collect()
    }

    #[test]
    fn non_finite_loss_or_norm_is_found_at_once() {
        let mut d = Detectors::new(&cfg());
        let o = Observation {
            loss: f32::NAN,
            ..calm(0)
        };
        assert_eq!(kinds(&d.observe(&o)), [AnomalyKind::NonFinite]);
        let o = Observation {
            grad_norm: f64::INFINITY,
            ..calm(1)
        };
        assert_eq!(kinds(&d.observe(&o)), [AnomalyKind::NonFinite]);
    }

    #[test]
    fn a_loss_spike_is_judged_against_the_window_and_kept_out_of_it() {
        let mut d = Detectors::new(&cfg());
        let spike = |s| Observation {
            loss: 50.0,
            ..calm(s)
        };
        // Too few steps seen: nothing to judge against.
        assert_eq!(d.observe(&calm(0)), Vec::new());
        assert_eq!(d.observe(&spike(1)), Vec::new(), "window not half full");
        let mut d = warmed(4);
        let a = d.observe(&spike(4));
        assert_eq!(kinds(&a), [AnomalyKind::LossSpike]);
        assert_eq!(a[0].step, 4);
        assert!(a[0].threshold > 6.0 && a[0].threshold < 6.2, "{:?}", a[0]);
        // The spike did not enter the window: a second one is found too.
        assert_eq!(kinds(&d.observe(&spike(5))), [AnomalyKind::LossSpike]);
        assert_eq!(d.observe(&calm(6)), Vec::new());
    }

    #[test]
    fn a_gradient_norm_spike_by_bound_or_by_factor() {
        let mut d = warmed(4);
        let over_mean = Observation {
            grad_norm: 20.0,
            ..calm(4)
        };
        assert_eq!(kinds(&d.observe(&over_mean)), [AnomalyKind::GradNormSpike]);
        let mut d = Detectors::new(&cfg());
        let over_bound = Observation {
            grad_norm: 2e4,
            ..calm(0)
        };
        let a = d.observe(&over_bound);
        assert_eq!(kinds(&a), [AnomalyKind::GradNormSpike]);
        assert_eq!(a[0].threshold, 1e4);
    }

    #[test]
    fn a_straggler_is_named_by_rank_against_the_median() {
        let mut d = Detectors::new(&cfg());
        let o = Observation {
            rank_seconds: vec![1.0, 1.0, 3.5, 1.1],
            ..calm(0)
        };
        let a = d.observe(&o);
        assert_eq!(kinds(&a), [AnomalyKind::Straggler]);
        assert_eq!(a[0].rank, Some(2));
        // One rank, or all alike: no straggler.
        let o = Observation {
            rank_seconds: vec![7.0],
            ..calm(1)
        };
        assert_eq!(d.observe(&o), Vec::new());
    }

    #[test]
    fn a_throughput_drop_is_judged_against_the_window() {
        let mut d = warmed(4);
        let o = Observation {
            tokens_per_s: 300.0,
            ..calm(4)
        };
        assert_eq!(kinds(&d.observe(&o)), [AnomalyKind::ThroughputDrop]);
        let o = Observation {
            tokens_per_s: 900.0,
            ..calm(5)
        };
        assert_eq!(d.observe(&o), Vec::new());
    }

    #[test]
    fn an_expert_collapse_names_its_layer() {
        let mut d = Detectors::new(&cfg());
        let o = Observation {
            expert_load: vec![(1, 1.5), (3, 40.0)],
            ..calm(0)
        };
        let a = d.observe(&o);
        assert_eq!(kinds(&a), [AnomalyKind::ExpertCollapse]);
        assert_eq!(a[0].moe_layer, Some(3));
    }

    #[test]
    fn the_ranks_spike_guard_follows_the_same_rule() {
        let mut g = SpikeGuard::new(&cfg()).expect("enabled");
        let mut d = Detectors::new(&cfg());
        for s in 0..8 {
            let o = Observation {
                loss: if s == 5 { 40.0 } else { 2.0 },
                ..calm(s)
            };
            let found = kinds(&d.observe(&o)).contains(&AnomalyKind::LossSpike);
            assert_eq!(g.spike(f64::from(o.loss)).is_some(), found, "step {s}");
            assert_eq!(found, s == 5);
        }
        g.reset();
        assert_eq!(
            g.spike(40.0),
            None,
            "nothing to judge against after a reset"
        );
        let off = SentinelConfig {
            enabled: false,
            ..cfg()
        };
        assert!(SpikeGuard::new(&off).is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }
}
