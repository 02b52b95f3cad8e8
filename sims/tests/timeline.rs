//! The simulator's pipeline against the schedule's own timeline: on a free link, with a dense
//! model whose stages cost the same, every rank's simulated bubble equals the bubble that
//! `flotilla schedule` computes for the F, B and W costs the simulated device charged, within
//! 2%, for every schedule, when units start in the list's order (`parallel.start_order =
//! "list"`). The default order (`"ready"`: a B goes as soon as its gradient is in) keeps
//! DualPipe on its timeline too; for ZB1P it does not (a B that overtakes a forward delays
//! the next stage: bubble 0.188 ms against the timeline's 0.142 ms in this test's setting).

use flotilla_runtime::config::{Config, DeviceKind, FabricKind, Schedule, SimConfig, StartOrder};
use flotilla_sims::timeline::{self, Measured};

/// A dense model (no MoE, no MTP) with `layers_per_stage` decoder layers per model stage,
/// whose embedding and head cost little beside a layer, on `pp` simulated ranks linked by a
/// free link (no latency, no bandwidth limit, no launch cost).
fn free_link(schedule: Schedule, pp: usize, micro_batches: usize) -> Config {
    let mut c = Config::default();
    c.job.steps = 1;
    c.optimizer.warmup_steps = 1;
    c.checkpoint.interval = 0;
    c.data.source = "synthetic".into();
    c.data.seq_len = 256;
    c.data.batch_size = micro_batches;
    let m = &mut c.model;
    m.vocab_size = 64;
    m.hidden_size = 512;
    m.intermediate_size = 2048;
    m.num_attention_heads = 8;
    m.q_lora_rank = Some(256);
    m.kv_lora_rank = 128;
    m.qk_nope_head_dim = 32;
    m.qk_rope_head_dim = 16;
    m.v_head_dim = 32;
    m.max_position_embeddings = 256;
    m.num_nextn_predict_layers = 0;
    c.parallel.pp = pp;
    c.parallel.schedule = schedule;
    c.parallel.micro_batches = micro_batches;
    c.parallel.start_order = StartOrder::List;
    let stages = if schedule == Schedule::DualPipeV {
        2 * pp
    } else {
        pp
    };
    c.model.num_hidden_layers = 4 * stages;
    c.model.first_k_dense_replace = c.model.num_hidden_layers;
    c.cluster.ranks_per_host = pp;
    c.cluster.device = DeviceKind::Sim;
    c.cluster.fabric = FabricKind::Sim;
    c.cluster.sim = Some(SimConfig {
        link_gbps: 1e12,
        link_latency_us: 0.0,
        intra_host_gbps: 1e12,
        launch_overhead_us: 0.0,
        ..SimConfig::default()
    });
    c
}

fn check(schedule: Schedule, pp: usize, micro_batches: usize) {
    check_in(free_link(schedule, pp, micro_batches));
}

fn check_in(cfg: Config) {
    let schedule = cfg.parallel.schedule;
    cfg.validate().expect("a valid config");
    let run = flotilla_sims::run(cfg.clone(), None).expect("the simulated job runs");
    let spans = timeline::spans(&run.trace).expect("trace");
    let m: Measured = timeline::measure(&cfg, &spans).expect("measured");
    assert!(
        m.spread < 0.01,
        "{schedule:?}: one stage's F, B or W costs differ by {:.2}%",
        m.spread * 100.0
    );
    let t = timeline::scheduled(&cfg, &m).expect("timeline");
    println!(
        "{schedule:?}: simulated bubbles {:?} s, the schedule's {:?} s",
        m.bubble, t.bubble
    );
    for (r, (sim, sched)) in m.bubble.iter().zip(&t.bubble).enumerate() {
        let tol = 0.02 * sched.max(1e-3 * t.makespan);
        assert!(
            (sim - sched).abs() <= tol,
            "{schedule:?} rank {r}: simulated bubble {sim:.6} s, schedule's {sched:.6} s \
             (makespans {:.6} / {:.6} s; costs {:?})",
            m.makespan,
            t.makespan,
            m.costs
        );
    }
}

#[test]
fn gpipe_bubbles_match_the_schedule_timeline() {
    check(Schedule::GPipe, 4, 8);
}

#[test]
fn one_f_one_b_bubbles_match_the_schedule_timeline() {
    check(Schedule::OneFOneB, 4, 8);
}

#[test]
fn zb1p_bubbles_match_the_schedule_timeline() {
    check(Schedule::Zb1p, 4, 8);
}

#[test]
fn dualpipe_bubbles_match_the_schedule_timeline() {
    check(Schedule::DualPipe, 4, 8);
}

#[test]
fn dualpipev_bubbles_match_the_schedule_timeline() {
    check(Schedule::DualPipeV, 4, 8);
}

#[test]
fn dualpipe_keeps_its_timeline_with_backwards_started_when_ready() {
    let mut cfg = free_link(Schedule::DualPipe, 4, 8);
    cfg.parallel.start_order = StartOrder::Ready;
    check_in(cfg);
}
