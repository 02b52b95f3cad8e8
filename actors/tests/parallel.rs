//! Pipeline, expert and data parallelism against the single-rank trainer: for every schedule and
//! the layouts (pp, ep, dp) ∈ {(2,1,1), (4,1,1), (2,2,1), (1,4,1), (2,2,2)}, 20 steps on the same
//! global batches give the same losses (1e-5 relative) and the same final parameters, as does
//! DualPipe with an uneven `stage_layers` split; the same layout run twice gives the same
//! parameter hash.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::pipeline::{self, Overlap};
use flotilla_actors::trainer::Trainer;
use flotilla_actors::{StepRecord, train};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{Config, Schedule};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::storage::sim::SimStorage;

const STEPS: u64 = 20;

/// A run's per-step losses and its parameters by name.
type Run = (Vec<f32>, BTreeMap<String, Vec<f32>>);
/// One rank's per-step losses and the tensors it is the canonical holder of.
type RankRun = (Vec<f32>, Vec<(String, Vec<f32>)>);
const MICRO: usize = 8;

/// A small model with four layers (one dense, three MoE), MTP on, and a global batch of 32
/// sequences of 16 tokens.
fn base() -> Config {
    let mut c = Config::default();
    c.job.steps = STEPS;
    c.optimizer.warmup_steps = 2;
    c.model.num_hidden_layers = 4;
    c.data.batch_size = 32;
    c.data.seq_len = 16;
    c.cluster.cpu_threads = Some(1);
    c.checkpoint.interval = 0;
    c.metrics.jsonl = false;
    c
}

fn layout(schedule: Schedule, pp: usize, ep: usize, dp: usize) -> Config {
    let mut c = base();
    c.parallel.pp = pp;
    c.parallel.ep = ep;
    c.parallel.dp = dp;
    c.parallel.schedule = schedule;
    c.parallel.micro_batches = MICRO;
    c.cluster.hosts = 1;
    c.cluster.ranks_per_host = pp * ep * dp;
    c
}

/// The single-rank run of the same global batches (as many micro-batches of the same size).
fn reference(ep: usize, dp: usize) -> Run {
    reference_for(ep, dp, STEPS)
}

/// [`reference`] for `steps` steps.
fn reference_for(ep: usize, dp: usize, steps: u64) -> Run {
    let mut c = base();
    c.parallel.micro_batches = MICRO * ep * dp;
    let mut t = Trainer::new(&c).expect("single-rank trainer");
    let losses = (0..steps)
        .map(|_| t.step().expect("single-rank step").loss)
        .collect();
    (losses, t.canonical_params().into_iter().collect())
}

/// Every rank of `cfg` on its own thread over one in-process fabric.
fn parallel(cfg: &Config) -> Run {
    parallel_with(cfg, Overlap::default(), STEPS)
}

/// [`parallel`] with the executor overlapping as `overlap` says, for `steps` steps.
fn parallel_with(cfg: &Config, overlap: Overlap, steps: u64) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let world = cfg.world_size();
    let hub = InprocHub::new(world);
    let results: Vec<RankRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let fabric: Arc<dyn Fabric> = Arc::new(hub.endpoint(r));
                let handle = rt.handle().clone();
                let hub = &hub;
                s.spawn(move || {
                    let mut t = pipeline::new_rank(cfg, r, fabric, handle).expect("rank");
                    t.set_overlap(overlap);
                    let mut losses = Vec::new();
                    for _ in 0..steps {
                        match t.step() {
                            Ok(st) => losses.push(st.loss),
                            Err(e) => {
                                hub.fail_rank(r, e.to_string());
                                panic!("rank {r}: {e}");
                            }
                        }
                    }
                    (losses, t.canonical_params())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let losses = results[0].0.clone();
    for (r, (l, _)) in results.iter().enumerate() {
        assert_eq!(
            l, &losses,
            "rank {r} reports another global loss than rank 0"
        );
    }
    let mut params = BTreeMap::new();
    for (_, p) in results {
        for (n, v) in p {
            assert!(
                params.insert(n.clone(), v).is_none(),
                "{n} has two canonical holders"
            );
        }
    }
    (losses, params)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn compare(
    what: &str,
    got: &(Vec<f32>, BTreeMap<String, Vec<f32>>),
    want: &(Vec<f32>, BTreeMap<String, Vec<f32>>),
) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: steps");
    let worst_loss = got
        .0
        .iter()
        .zip(&want.0)
        .map(|(g, w)| rel(f64::from(*g), f64::from(*w)))
        .fold(0.0, f64::max);
    let worst_param = want
        .1
        .iter()
        .map(|(n, w)| {
            let g = &got.1[n];
            let d: f64 = g
                .iter()
                .zip(w)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            d / w
                .iter()
                .map(|b| f64::from(*b).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-6)
        })
        .fold(0.0, f64::max);
    eprintln!(
        "{what}: losses {:.4} -> {:.4}; worst relative difference: loss {worst_loss:.1e}, tensor {worst_param:.1e}",
        got.0[0],
        got.0[got.0.len() - 1]
    );
    for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
        assert!(
            rel(f64::from(*g), f64::from(*w)) <= 1e-5,
            "{what}: step {i} loss {g} vs single-rank {w}"
        );
    }
    assert_eq!(
        got.1.keys().collect::<Vec<_>>(),
        want.1.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (n, w) in &want.1 {
        let g = &got.1[n];
        let diff: f64 = g
            .iter()
            .zip(w)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>().sqrt();
        assert!(
            diff <= 1e-5 * norm.max(1e-6),
            "{what}: {n} differs from the single-rank run by {diff:e} (norm {norm:e})"
        );
    }
}

const LAYOUTS: [(usize, usize, usize); 5] = [(2, 1, 1), (4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 2, 2)];

fn every_layout(schedule: Schedule) {
    let mut refs = BTreeMap::new();
    for (pp, ep, dp) in LAYOUTS {
        if schedule == Schedule::DualPipe && pp % 2 == 1 {
            // DualPipe pairs stage r with stage pp-1-r: pp = 1 is refused by the config.
            let c = layout(schedule, pp, ep, dp);
            assert!(
                c.validate().is_err(),
                "dualpipe with pp = {pp} must be refused"
            );
            continue;
        }
        let want = refs.entry((ep, dp)).or_insert_with(|| reference(ep, dp));
        let got = parallel(&layout(schedule, pp, ep, dp));
        compare(&format!("{schedule} pp={pp} ep={ep} dp={dp}"), &got, want);
    }
}

#[test]
fn gpipe_matches_single_rank() {
    every_layout(Schedule::GPipe);
}

#[test]
fn one_f_one_b_matches_single_rank() {
    every_layout(Schedule::OneFOneB);
}

#[test]
fn zb1p_matches_single_rank() {
    every_layout(Schedule::Zb1p);
}

#[test]
fn dualpipe_matches_single_rank() {
    every_layout(Schedule::DualPipe);
}

#[test]
fn dualpipev_matches_single_rank() {
    every_layout(Schedule::DualPipeV);
}

/// `[parallel] stage_layers = [3, 1]` moves a MoE layer from the head stage to the first (which
/// then holds the dense layer and two MoE layers; the head stage keeps one MoE layer, the head
/// and the MTP module): DualPipe at pp = 2 still trains as the single rank does.
#[test]
fn dualpipe_with_stage_layers_matches_single_rank() {
    let steps = 4;
    let mut cfg = layout(Schedule::DualPipe, 2, 1, 1);
    let even = pipeline::placement(&cfg).expect("even placement");
    let layers =
        |p: &pipeline::Placement| -> Vec<_> { p.specs.iter().map(|s| s.layers.clone()).collect() };
    assert_eq!(layers(&even), [0..2, 2..4]);
    cfg.parallel.stage_layers = vec![3, 1];
    cfg.validate()
        .expect("stage_layers = [3, 1] is valid at pp = 2");
    let placement = pipeline::placement(&cfg).expect("placement");
    assert_eq!(layers(&placement), [0..3, 3..4]);
    assert!(placement.specs[0].embed && placement.specs[1].head);
    let got = parallel_with(&cfg, Overlap::default(), steps);
    compare(
        "dualpipe pp=2 stage_layers=[3, 1]",
        &got,
        &reference_for(1, 1, steps),
    );
}

/// `sub_batches = 2`: each micro-batch runs as two sub-batches side by side in DualPipe's list
/// (pp = 2, ep = 2). The job still trains as the single rank does, and the executor's overlaps
/// still agree bit for bit (the split schedule's memory: `schedule/tests.rs`).
#[test]
fn dualpipe_with_sub_batches_matches_single_rank() {
    let steps = 4;
    let mut cfg = layout(Schedule::DualPipe, 2, 2, 1);
    cfg.parallel.micro_batches = 4;
    cfg.parallel.sub_batches = 2;
    cfg.validate().expect("sub_batches = 2 is valid here");
    let placement = pipeline::placement(&cfg).expect("placement");
    assert_eq!(
        placement.schedule.chunks, 8,
        "4 micro-batches, 2 sub-batches each"
    );
    let got = parallel_with(&cfg, Overlap::default(), steps);
    compare(
        "dualpipe pp=2 ep=2 sub_batches=2",
        &got,
        &reference_for(2, 1, steps),
    );
    // Three streams, and the trainer's default for two sub-batches (six), against one at a time.
    let off = parallel_with(&cfg, Overlap::Off, steps);
    for (overlap, run) in [
        (Overlap::default(), got),
        (
            Overlap::for_sub_batches(2),
            parallel_with(&cfg, Overlap::for_sub_batches(2), steps),
        ),
    ] {
        assert_eq!(off.0, run.0, "sub-batches, {overlap:?}: losses");
        for (name, v) in &off.1 {
            assert!(
                run.1[name]
                    .iter()
                    .zip(v)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sub-batches, {overlap:?}: {name} differs from one at a time"
            );
        }
    }
}

/// How the executor overlaps its actions changes when things run, never what they compute: one
/// at a time, F&B pairs and two or three streams give the same losses and parameters, bit for
/// bit (W's are applied and losses summed in list order), for DualPipe with EP (its pairs) and
/// ZB1P (its deferred W's).
#[test]
fn every_overlap_gives_the_same_bits() {
    for schedule in [Schedule::DualPipe, Schedule::Zb1p] {
        let cfg = layout(schedule, 2, 2, 1);
        let want = parallel_with(&cfg, Overlap::Off, 3);
        for overlap in [Overlap::Pairs, Overlap::Streams(2), Overlap::Streams(3)] {
            let got = parallel_with(&cfg, overlap, 3);
            assert_eq!(got.0, want.0, "{schedule:?} {overlap:?}: losses");
            for (name, v) in &want.1 {
                let g = &got.1[name];
                assert!(
                    g.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{schedule:?} {overlap:?}: {name} differs"
                );
            }
        }
    }
}

/// Through the whole job (rank actors under the supervisor): the same layout twice gives the
/// same parameter hash, which is also the hash of the gathered parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_layout_twice_gives_the_same_params_sha256() {
    let mut cfg = layout(Schedule::DualPipe, 2, 2, 1);
    cfg.job.steps = 4;
    let mut shas = Vec::new();
    for _ in 0..2 {
        let storage = Arc::new(SimStorage::new(1e12, Duration::ZERO));
        let s = train(
            cfg.clone(),
            storage,
            Arc::new(RealClock),
            &mut |_: &StepRecord| {},
        )
        .await
        .expect("the parallel job runs");
        assert_eq!(s.steps, 4);
        shas.push(s.params_sha256);
    }
    assert_eq!(shas[0], shas[1]);
}

/// Ranks 0..3 of a (pp 2, ep 2) DualPipe job step while rank 3 is dead (or silent): every other
/// rank's step fails, well within the peer deadline and naming rank 3 when it is dead, and
/// within twice the deadline when it is silent (the ranks waiting on it directly name it) —
/// never a hang.
fn with_rank_3_missing(dead: bool) {
    let mut cfg = layout(Schedule::DualPipe, 2, 2, 1);
    // Dead: a long deadline, so failing fast shows the failure notice at work, not a timeout.
    cfg.supervision.peer_timeout_ms = if dead { 10_000 } else { 2000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let hub = InprocHub::new(4);
    if dead {
        hub.fail_rank(3, "killed by the test");
    }
    let results: Vec<(String, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let fabric: Arc<dyn Fabric> = Arc::new(hub.endpoint(r));
                let (cfg, handle, hub) = (&cfg, rt.handle().clone(), &hub);
                s.spawn(move || {
                    let mut t = pipeline::new_rank(cfg, r, fabric, handle).expect("rank");
                    let started = std::time::Instant::now();
                    let e = t.step().expect_err("a step without rank 3 must fail");
                    let took = started.elapsed();
                    // As the job driver does: a failed rank is marked failed for its peers.
                    hub.fail_rank(r, e.to_string());
                    (e.to_string(), took)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let took = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let errors: Vec<String> = results.into_iter().map(|(e, _)| e).collect();
    let bound = if dead {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(12)
    };
    assert!(took < bound, "took {took:?}: {errors:?}");
    if dead {
        assert!(errors.iter().all(|e| e.contains("rank 3")), "{errors:#?}");
    } else {
        // A silent peer is blamed by the ranks that wait on it directly; a rank waiting on a
        // live but stuck peer may time out first and blame that one (the pipeline has no
        // stuck-announcement protocol, unlike the collectives).
        assert!(
            errors.iter().any(|e| e.contains("from rank 3")),
            "{errors:#?}"
        );
    }
}

#[test]
fn a_dead_rank_is_named_by_every_peer_at_once() {
    with_rank_3_missing(true);
}

#[test]
fn a_silent_rank_is_named_within_the_deadline() {
    with_rank_3_missing(false);
}
