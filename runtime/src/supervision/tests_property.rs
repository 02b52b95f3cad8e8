//! Property test of the real supervisor actor: random failure sequences (random child, random
//! time gaps) against a reference model of the restart-intensity rule. The pure tracker has its
//! own, larger property test in `intensity.rs`.

use std::time::Duration;

use proptest::prelude::*;

use super::events::{ChildEvent, event_channel};
use super::intensity::IntensityDecision;
use super::spec::SupervisorSpec;
use super::strategy::Strategy;
use super::supervisor::Supervisor;
use super::test_support::{Log, WorkerMsg, tell, wait_for, worker};

const CHILDREN: [&str; 3] = ["c0", "c1", "c2"];

/// Reference model: failure `i` happens at `times[i]`; it is one restart (whatever the strategy
/// restarts with it). The supervisor gives up at the first failure for which more than
/// `max_restarts` failures (itself included) are no older than `within`, and sees nothing after.
fn model(max_restarts: u32, within: Duration, times: &[Duration]) -> Vec<IntensityDecision> {
    let mut out = Vec::new();
    for (i, &now) in times.iter().enumerate() {
        let in_window = times[..=i].iter().filter(|&&r| now - r <= within).count();
        if in_window > max_restarts as usize {
            out.push(IntensityDecision::GiveUp);
            break;
        }
        out.push(IntensityDecision::Restart);
    }
    out
}

/// Drives the failures against a real supervisor and records what it decided each time.
async fn run(
    strategy: Strategy,
    max_restarts: u32,
    within: Duration,
    failures: &[(usize, u64)],
) -> Vec<IntensityDecision> {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let mut spec = SupervisorSpec::new(strategy)
        .with_intensity(max_restarts, within)
        .observer(tx);
    for id in CHILDREN {
        spec = spec.child(worker(id, &log));
    }
    let (sup, join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    let mut decisions = Vec::new();
    for &(child, gap_ms) in failures {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let id = CHILDREN[child];
        tell(&sup, id, WorkerMsg::Fail).await;
        // Skip what is left of the previous group restart: this failure's events follow its exit.
        wait_for(&mut rx, id, |e| matches!(e, ChildEvent::Exited { .. })).await;
        let (evt, _) = wait_for(&mut rx, id, |e| {
            matches!(
                e,
                ChildEvent::Restarted { .. } | ChildEvent::Escalated { .. }
            )
        })
        .await;
        if matches!(evt.event, ChildEvent::Escalated { .. }) {
            decisions.push(IntensityDecision::GiveUp);
            tokio::time::timeout(Duration::from_secs(600), join)
                .await
                .expect("a supervisor that gives up ends")
                .expect("task");
            return decisions;
        }
        decisions.push(IntensityDecision::Restart);
    }
    sup.stop(Duration::from_secs(600)).await.expect("stop");
    decisions
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn supervisor_gives_up_exactly_when_the_model_does(
        strategy in prop_oneof![
            Just(Strategy::OneForOne),
            Just(Strategy::OneForAll),
            Just(Strategy::RestForOne),
        ],
        max_restarts in 0u32..4,
        within_ms in 1u64..3_000,
        failures in proptest::collection::vec((0usize..3, prop_oneof![Just(0u64), 0u64..2_000]), 1..12),
    ) {
        let within = Duration::from_millis(within_ms);
        let mut at = Duration::ZERO;
        let times: Vec<Duration> = failures
            .iter()
            .map(|&(_, g)| { at += Duration::from_millis(g); at })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let got = rt.block_on(run(strategy, max_restarts, within, &failures));
        prop_assert_eq!(got, model(max_restarts, within, &times));
    }
}
