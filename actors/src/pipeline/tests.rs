//! The executor measured against the DeepSeek-V3 report's Table 2: every rank of a pipeline runs
//! its real action list through the real executor and fabric, with injected costs on the virtual
//! clock; the bubbles and peak activations of its own trace equal the schedule simulator's and
//! the report's formulas (for the settings where the formulas are exact, see
//! `schedule/tests.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_model::ModelConfig;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::topology::Topology;

use super::executor::{Executor, StageWork, Timing, Trace};
use super::placement::Placement;
use super::transport::{Failure, Link};
use crate::schedule::tests::{exact_settings, report_costs, table2};
use crate::schedule::{Costs, Kind, build, simulate};

/// A stage that computes nothing: its activations and gradients are one value each.
struct CostOnly;

impl StageWork for CostOnly {
    fn boundary_len(&self, _chunk: usize) -> usize {
        1
    }
    fn forward(&self, _: usize, _: usize, _: Option<Vec<f32>>) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(vec![0.0]))
    }
    fn backward_input(
        &self,
        _: usize,
        _: usize,
        _: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(vec![0.0]))
    }
    fn backward_weight(&self, _: usize, _: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Every rank of a `kind` pipeline through the executor with injected `costs`.
fn run(kind: Kind, pp: usize, chunks: usize, costs: Costs) -> Vec<Trace> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let schedule = build(kind, pp, chunks).expect("schedule");
    let topo = Topology::new(1, pp, pp, 1, 1).expect("topology");
    let mut cfg = ModelConfig::tiny();
    cfg.num_hidden_layers = 2 * pp;
    let placement = Placement::new(&cfg, topo, schedule);
    let hub = InprocHub::new(pp);
    let epoch = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..pp)
            .map(|r| {
                let link = Link {
                    fabric: Arc::new(hub.endpoint(r)) as Arc<dyn Fabric>,
                    rt: rt.handle().clone(),
                    deadline: Duration::from_secs(20),
                    step: 0,
                    failure: Failure::default(),
                    stats: Default::default(),
                    baton: Default::default(),
                };
                let placement = &placement;
                s.spawn(move || {
                    let exec = Executor::new(placement, r, &link, Timing::Injected(costs), epoch);
                    exec.run(&CostOnly, &placement.schedule.ranks[r])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread").expect("rank runs"))
            .collect()
    })
}

fn bubbles(traces: &[Trace]) -> Vec<f64> {
    let makespan = traces.iter().map(Trace::end).fold(0.0, f64::max);
    traces.iter().map(|t| makespan - t.busy()).collect()
}

#[test]
fn executor_trace_equals_the_simulator_and_table2() {
    let mut checked = 0;
    for pp in [4, 8, 16] {
        let settings = exact_settings();
        for costs in &settings[..2] {
            for kind in [Kind::OneF1B, Kind::Zb1p, Kind::DualPipe, Kind::DualPipeV] {
                let chunks = 2 * pp + 4;
                let traces = run(kind, pp, chunks, *costs);
                let want = simulate(&build(kind, pp, chunks).expect("schedule"), costs)
                    .expect("simulates");
                for (r, t) in traces.iter().enumerate() {
                    let spans: Vec<(f64, f64)> = t.spans.iter().map(|s| (s.start, s.end)).collect();
                    let sim: Vec<(f64, f64)> =
                        want.spans[r].iter().map(|s| (s.start, s.end)).collect();
                    assert_eq!(spans, sim, "{kind} pp={pp} {costs:?}: rank {r}'s spans");
                    assert_eq!(
                        t.peak_activations, want.peak_activations[r],
                        "{kind} rank {r}"
                    );
                }
                let measured = bubbles(&traces);
                let worst = measured.iter().copied().fold(0.0, f64::max);
                let formula = table2(kind, pp, costs);
                assert!(
                    (worst - formula).abs() < 1e-9,
                    "{kind} pp={pp} {costs:?}: executor bubble {worst}, Table 2 {formula}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 24);
}

#[test]
fn executor_peak_activations_follow_the_report() {
    let c = report_costs(1.0, 2.0, 1.0, 3.0);
    for pp in [4, 8] {
        // 1F1B: PP micro-batches on the first rank.
        let t = run(Kind::OneF1B, pp, 2 * pp, c);
        assert_eq!(t[0].peak_activations, pp);
        // DualPipe: PP + 1 on every rank.
        let t = run(Kind::DualPipe, pp, 2 * pp, c);
        assert!(
            t.iter().all(|t| t.peak_activations == pp + 1),
            "{:?}",
            t.iter().map(|t| t.peak_activations).collect::<Vec<_>>()
        );
    }
}
