//! Pipeline, expert and data parallelism through the job's actor tree (rank actors, stage
//! actors, expert shards, their compute streams) against the single-rank job: for every
//! schedule and the layouts (pp, ep, dp) ∈ {(2,1,1), (4,1,1), (2,2,1), (1,4,1), (2,2,2)}, 20
//! steps on the same global batches give the same losses (1e-5 relative) and the same final
//! parameters, as do DualPipe with an uneven `stage_layers` split and with sub-batches; how many
//! actions run at once changes when things run, not the bits; a dead or silent rank is named,
//! never waited for forever.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::job::{Job, Launch};
use flotilla_actors::pipeline;
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{Config, Schedule};
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::fabric::{BoxFuture, Fabric, FabricError, Inbox, Payload, Rank, Tag};
use flotilla_runtime::storage::sim::SimStorage;

const STEPS: u64 = 20;
const MICRO: usize = 8;

/// A run's per-step losses and its parameters by name.
type Run = (Vec<f32>, BTreeMap<String, Vec<f32>>);

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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `steps` steps of the job `cfg` describes, through its actor tree; every rank must report the
/// same job-wide loss.
fn run_job(cfg: &Config, launch: Launch, steps: u64) -> Run {
    runtime().block_on(async {
        let storage = Arc::new(SimStorage::unlimited());
        let mut job = Job::start(cfg.clone(), storage, Arc::new(RealClock), true, launch)
            .await
            .expect("the job starts");
        let mut losses = Vec::new();
        for s in 0..steps {
            let all = job.step(s).await.expect("a step");
            assert!(
                all.iter().all(|st| st.loss == all[0].loss),
                "ranks report different losses at step {s}"
            );
            losses.push(all[0].loss);
        }
        let params = job.params(steps).await.expect("parameters");
        job.stop().await.expect("the job stops");
        (losses, params.into_iter().collect())
    })
}

/// The single-rank run of the same global batches (as many micro-batches of the same size).
fn reference(ep: usize, dp: usize, steps: u64) -> Run {
    let mut c = base();
    c.parallel.micro_batches = MICRO * ep * dp;
    run_job(&c, Launch::default(), steps)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn compare(what: &str, got: &Run, want: &Run) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: steps");
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
    let mut worst = 0.0f64;
    for (n, w) in &want.1 {
        let g = &got.1[n];
        let diff: f64 = g
            .iter()
            .zip(w)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(diff / norm.max(1e-6));
        assert!(
            diff <= 1e-5 * norm.max(1e-6),
            "{what}: {n} differs from the single-rank run by {diff:e} (norm {norm:e})"
        );
    }
    eprintln!(
        "{what}: losses {:.4} -> {:.4}; worst relative tensor difference {worst:.1e}",
        got.0[0],
        got.0[got.0.len() - 1]
    );
}

const LAYOUTS: [(usize, usize, usize); 5] = [(2, 1, 1), (4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 2, 2)];

fn every_layout(schedule: Schedule) {
    let mut refs = BTreeMap::new();
    for (pp, ep, dp) in LAYOUTS {
        if matches!(schedule, Schedule::DualPipe) && pp % 2 == 1 {
            // DualPipe pairs stage r with stage pp-1-r: pp = 1 is refused by the config.
            let c = layout(schedule, pp, ep, dp);
            assert!(
                c.validate().is_err(),
                "dualpipe with pp = {pp} must be refused"
            );
            continue;
        }
        let want = refs
            .entry((ep, dp))
            .or_insert_with(|| reference(ep, dp, STEPS));
        let got = run_job(&layout(schedule, pp, ep, dp), Launch::default(), STEPS);
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
    let got = run_job(&cfg, Launch::default(), steps);
    compare(
        "dualpipe pp=2 stage_layers=[3, 1]",
        &got,
        &reference(1, 1, steps),
    );
}

/// `sub_batches = 2`: each micro-batch runs as two sub-batches side by side in DualPipe's list
/// (pp = 2, ep = 2). The job still trains as the single rank does.
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
    let got = run_job(&cfg, Launch::default(), steps);
    compare(
        "dualpipe pp=2 ep=2 sub_batches=2",
        &got,
        &reference(2, 1, steps),
    );
}

/// How many actions a stage actor has in progress changes when phases run, never what they
/// compute: one at a time and two, three or six at once give the same losses and parameters,
/// bit for bit (W's run in the schedule's order, losses are summed in (micro-batch, stage)
/// order), for DualPipe with EP (its F&B pairs) and ZB1P (its deferred W's).
#[test]
fn the_window_changes_when_not_what() {
    for schedule in [Schedule::DualPipe, Schedule::Zb1p] {
        let cfg = layout(schedule, 2, 2, 1);
        let one = Launch {
            window: Some(1),
            ..Launch::default()
        };
        let want = run_job(&cfg, one, 3);
        for w in [2, 3, 6] {
            let launch = Launch {
                window: Some(w),
                ..Launch::default()
            };
            let got = run_job(&cfg, launch, 3);
            assert_eq!(got.0, want.0, "{schedule} window {w}: losses");
            for (name, v) in &want.1 {
                let g = &got.1[name];
                assert!(
                    g.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{schedule} window {w}: {name} differs"
                );
            }
        }
    }
}

/// A rank's endpoint that delivers nothing it sends (a rank gone silent).
#[derive(Debug)]
struct Silent(flotilla_runtime::fabric::inproc::InprocFabric);

impl Fabric for Silent {
    fn rank(&self) -> Rank {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn send(&self, _: Rank, _: Tag, _: Payload) -> BoxFuture<'_, Result<(), FabricError>> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>> {
        self.0.recv(src, tag, deadline)
    }
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError> {
        self.0.subscribe(channel)
    }
}

/// A job whose last rank is dead (marked failed on the fabric) or silent (sends nothing): the
/// step fails, well within the peer deadline when it is dead (its peers learn at once), within
/// about the deadline when it is silent — never a hang — and the error names `culprit` (a rank
/// waiting on a silent peer directly names it; in a pipeline a rank waiting on a live but stuck
/// peer may time out first and name that one).
fn with_last_rank_missing(cfg: &Config, dead: bool, culprit: &str) {
    let mut cfg = cfg.clone();
    cfg.supervision.peer_timeout_ms = if dead { 10_000 } else { 2000 };
    let world = cfg.world_size();
    runtime().block_on(async {
        let hub = InprocHub::new(world);
        let endpoints: Vec<Arc<dyn Fabric>> = (0..world)
            .map(|r| -> Arc<dyn Fabric> {
                if r == world - 1 && !dead {
                    Arc::new(Silent(hub.endpoint(r)))
                } else {
                    Arc::new(hub.endpoint(r))
                }
            })
            .collect();
        let launch = Launch {
            fabric: Some((Arc::clone(&hub), endpoints)),
            ..Launch::default()
        };
        let storage = Arc::new(SimStorage::unlimited());
        let mut job = Job::start(cfg.clone(), storage, Arc::new(RealClock), true, launch)
            .await
            .expect("the job starts");
        if dead {
            hub.fail_rank(world - 1, "killed by the test");
        }
        let started = std::time::Instant::now();
        let err = job
            .step(0)
            .await
            .expect_err("a step without the last rank fails");
        let took = started.elapsed();
        let _ = job.stop().await;
        // Dead: the peers learn at once (the deadline is 10 s); silent: a deadline of 2 s.
        assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
        assert!(err.to_string().contains(culprit), "{err}");
    });
}

#[test]
fn a_dead_rank_is_named_at_once() {
    with_last_rank_missing(&layout(Schedule::DualPipe, 2, 2, 1), true, "rank 3");
}

#[test]
fn a_silent_rank_fails_the_step_within_the_deadline() {
    with_last_rank_missing(
        &layout(Schedule::DualPipe, 2, 2, 1),
        false,
        "nothing arrived",
    );
}

#[test]
fn a_silent_expert_peer_is_named() {
    // Rank 0 waits for rank 1's rows ("from rank 1"); rank 1 itself, which still answers the
    // driver, waits for rank 0's experts, which wait for it: either failure names rank 1.
    with_last_rank_missing(&layout(Schedule::OneFOneB, 1, 2, 1), false, "rank 1");
}
