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

use super::executor::{Executor, Overlap, StageWork, Timing, Trace};
use super::placement::Placement;
use super::transport::{Failure, Link};
use crate::schedule::tests::{exact_settings, report_costs, table2};
use crate::schedule::{Costs, Kind, build, simulate};

/// A runtime, and the placement of a `kind` pipeline over `pp` ranks of the tiny model.
fn setup(kind: Kind, pp: usize, chunks: usize) -> (tokio::runtime::Runtime, Placement) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let schedule = build(kind, pp, chunks).expect("schedule");
    let topo = Topology::new(1, pp, pp, 1, 1).expect("topology");
    let mut cfg = ModelConfig::tiny();
    cfg.num_hidden_layers = 2 * pp;
    let placement = Placement::new(&cfg, topo, schedule, &[]).expect("placement");
    (rt, placement)
}

/// Rank `r`'s link for step 0 over `hub`.
fn link(hub: &Arc<InprocHub>, r: usize, rt: &tokio::runtime::Runtime, deadline: Duration) -> Link {
    Link {
        fabric: Arc::new(hub.endpoint(r)) as Arc<dyn Fabric>,
        rt: rt.handle().clone(),
        deadline,
        step: 0,
        failure: Failure::default(),
        stats: Default::default(),
        baton: Default::default(),
    }
}

/// Every rank of a `kind` pipeline through the executor with injected `costs`.
fn run(kind: Kind, pp: usize, chunks: usize, costs: Costs) -> Vec<Trace> {
    let (rt, placement) = setup(kind, pp, chunks);
    let hub = InprocHub::new(pp);
    let epoch = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..pp)
            .map(|r| {
                let link = link(&hub, r, &rt, Duration::from_secs(20));
                let placement = &placement;
                s.spawn(move || {
                    let exec = Executor::new(placement, r, &link, Timing::Injected(costs), epoch);
                    exec.run(&Recording::default(), &placement.schedule.ranks[r])
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

/// A stage that computes nothing (its activations and gradients are one value each), records
/// the order in which its W's are applied, and fails the forward of `fail` when given. With
/// `pause`, each pass takes up to about a millisecond of wall-clock time, unevenly, so that
/// streams finish out of order.
#[derive(Default)]
struct Recording {
    pause: bool,
    ws: std::sync::Mutex<Vec<(usize, usize)>>,
    fail: Option<(usize, usize)>,
}

impl Recording {
    fn pass(&self, c: usize, s: usize) {
        if self.pause {
            std::thread::sleep(Duration::from_micros(
                200 + 400 * ((c * 7 + s * 3) % 4) as u64,
            ));
        }
    }
}

impl StageWork for Recording {
    fn boundary_len(&self, _chunk: usize) -> usize {
        1
    }
    fn forward(&self, c: usize, s: usize, _: Option<Vec<f32>>) -> Result<Option<Vec<f32>>, String> {
        if self.fail == Some((c, s)) {
            return Err(format!("injected failure in F(chunk {c}, stage {s})"));
        }
        self.pass(c, s);
        Ok(Some(vec![0.0]))
    }
    fn backward_input(
        &self,
        c: usize,
        s: usize,
        _: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String> {
        self.pass(c, s);
        Ok(Some(vec![0.0]))
    }
    fn backward_weight(
        &self,
        c: usize,
        s: usize,
        yield_now: &(dyn Fn() + Sync),
    ) -> Result<(), String> {
        self.pass(c, s);
        yield_now();
        if let Ok(mut ws) = self.ws.lock() {
            ws.push((c, s));
        }
        Ok(())
    }
}

type WallRun = (Result<Trace, String>, Vec<(usize, usize)>);

/// Every rank of a `kind` pipeline through the executor on the wall clock, overlapping as
/// `overlap` says; rank `r` fails the forward `fail(r)`.
fn run_wall(
    kind: Kind,
    pp: usize,
    chunks: usize,
    overlap: Overlap,
    deadline: Duration,
    fail: impl Fn(usize) -> Option<(usize, usize)> + Sync,
) -> (Vec<WallRun>, crate::schedule::Schedule) {
    let (rt, placement) = setup(kind, pp, chunks);
    let schedule = placement.schedule.clone();
    let hub = InprocHub::new(pp);
    let epoch = Instant::now();
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..pp)
            .map(|r| {
                let link = link(&hub, r, &rt, deadline);
                let (placement, hub, fail) = (&placement, &hub, &fail);
                s.spawn(move || {
                    let mut exec = Executor::new(placement, r, &link, Timing::Wall, epoch);
                    exec.overlap = overlap;
                    let work = Recording {
                        pause: true,
                        fail: fail(r),
                        ..Recording::default()
                    };
                    let ran = exec.run(&work, &placement.schedule.ranks[r]);
                    if let Err(why) = &ran {
                        hub.fail_rank(r, why.clone());
                    }
                    (ran, work.ws.into_inner().unwrap_or_default())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    (runs, schedule)
}

/// Every schedule on 1–4 streams: no deadlock, W's in list order, never more activations than
/// the schedule holds, and some actions really overlap.
#[test]
fn streams_apply_w_in_list_order_within_the_schedules_memory() {
    let kinds = [
        Kind::GPipe,
        Kind::OneF1B,
        Kind::Zb1p,
        Kind::DualPipe,
        Kind::DualPipeV,
    ];
    for (kind, pp, streams) in kinds
        .into_iter()
        .flat_map(|k| [2, 4].map(move |pp| (k, pp)))
        .flat_map(|(k, pp)| [1, 2, 3, 4].map(move |n| (k, pp, n)))
    {
        let (runs, schedule) = run_wall(
            kind,
            pp,
            2 * pp + 2,
            Overlap::Streams(streams),
            Duration::from_secs(20),
            |_| None,
        );
        let mut overlapped = false;
        for (r, (ran, ws)) in runs.into_iter().enumerate() {
            let trace =
                ran.unwrap_or_else(|e| panic!("{kind} pp={pp} streams={streams} rank {r}: {e}"));
            let want: Vec<(usize, usize)> = schedule.ranks[r]
                .iter()
                .flat_map(|a| a.units())
                .filter(|u| u.op == crate::schedule::Op::W)
                .map(|u| (u.chunk, u.stage))
                .collect();
            assert_eq!(
                ws, want,
                "{kind} pp={pp} streams={streams} rank {r}: W's out of order"
            );
            let most = crate::schedule::timeline::peak_activations(&schedule.ranks[r]);
            assert!(
                trace.peak_activations <= most,
                "{kind} rank {r}: {} activations held, the schedule holds {most}",
                trace.peak_activations
            );
            overlapped |= trace.spans.windows(2).any(|w| w[1].start < w[0].end);
        }
        assert!(
            overlapped || streams == 1,
            "{kind} pp={pp} streams={streams}: no two actions ever overlapped"
        );
    }
}

#[test]
fn a_failing_piece_stops_the_streams_and_the_pipeline_without_a_hang() {
    let started = Instant::now();
    let (runs, schedule) = run_wall(
        Kind::DualPipe,
        2,
        8,
        Overlap::Streams(3),
        Duration::from_millis(500),
        |r| (r == 1).then_some((3, 1)),
    );
    assert!(
        schedule.ranks[1]
            .iter()
            .flat_map(|a| a.units())
            .any(|u| u.op == crate::schedule::Op::F && (u.chunk, u.stage) == (3, 1)),
        "rank 1 runs F(3, 1)"
    );
    let err = runs[1].0.as_ref().expect_err("rank 1 fails");
    assert!(err.contains("injected failure"), "{err}");
    assert!(runs[0].0.is_err(), "rank 0 cannot finish without rank 1");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
