//! Tests of the restart strategies and restart types on real actors (tokio paused clock).

use std::time::Duration;

use super::children::ChildState;
use super::events::{ChildEvent, ExitReason, event_channel};
use super::spec::SupervisorSpec;
use super::strategy::Restart;
use super::supervisor::Supervisor;
use super::test_support::{Log, WorkerMsg, cell_of, drain, tell, wait_for, worker};

fn roomy(spec: SupervisorSpec) -> SupervisorSpec {
    spec.with_intensity(100, Duration::from_secs(60))
}

fn is_restarted(e: &ChildEvent) -> bool {
    matches!(e, ChildEvent::Restarted { .. })
}

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_failed_child() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_one())
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker("c", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    let (a0, b0, c0) = (
        cell_of(&sup, "a").await,
        cell_of(&sup, "b").await,
        cell_of(&sup, "c").await,
    );
    drain(&mut rx);
    log.clear();

    tell(&sup, "b", WorkerMsg::Fail).await;
    let (restarted, before) = wait_for(&mut rx, "b", is_restarted).await;
    assert_eq!(restarted.event, ChildEvent::Restarted { restarts: 1 });
    let before: Vec<_> = before.into_iter().map(|e| (e.child, e.event)).collect();
    assert_eq!(
        before,
        vec![(
            "b".to_owned(),
            ChildEvent::Exited {
                reason: ExitReason::Failed("b crashed".into())
            }
        )]
    );
    assert_eq!(log.entries(), vec!["start:b"]);
    assert_eq!(cell_of(&sup, "a").await.get_id(), a0.get_id());
    assert_eq!(cell_of(&sup, "c").await.get_id(), c0.get_id());
    assert_ne!(cell_of(&sup, "b").await.get_id(), b0.get_id());
    let counts: Vec<_> = sup
        .which_children()
        .await
        .expect("query")
        .into_iter()
        .map(|c| (c.id, c.restarts))
        .collect();
    assert_eq!(
        counts,
        vec![("a".into(), 0), ("b".into(), 1), ("c".into(), 0)]
    );
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn one_for_all_stops_the_others_in_reverse_then_restarts_all_in_order() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_all())
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker("c", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    drain(&mut rx);
    log.clear();

    tell(&sup, "b", WorkerMsg::Fail).await;
    wait_for(&mut rx, "c", is_restarted).await;
    // b failed (no post_stop); c then a were stopped; then a, b, c started in order.
    assert_eq!(
        log.entries(),
        vec!["stop:c", "stop:a", "start:a", "start:b", "start:c"]
    );
    for c in sup.which_children().await.expect("query") {
        assert_eq!((c.state, c.restarts), (ChildState::Running, 1), "{}", c.id);
    }
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::rest_for_one())
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker("c", &log))
        .child(worker("d", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    let a0 = cell_of(&sup, "a").await.get_id();
    drain(&mut rx);
    log.clear();

    tell(&sup, "b", WorkerMsg::Fail).await;
    wait_for(&mut rx, "d", is_restarted).await;
    assert_eq!(
        log.entries(),
        vec!["stop:d", "stop:c", "start:b", "start:c", "start:d"]
    );
    assert_eq!(cell_of(&sup, "a").await.get_id(), a0);
    let counts: Vec<u32> = sup
        .which_children()
        .await
        .expect("query")
        .iter()
        .map(|c| c.restarts)
        .collect();
    assert_eq!(counts, vec![0, 1, 1, 1]);
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn permanent_is_restarted_even_after_a_normal_exit() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_one())
        .child(worker("p", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    tell(&sup, "p", WorkerMsg::Exit).await;
    let (_, before) = wait_for(&mut rx, "p", is_restarted).await;
    let exit = ChildEvent::Exited {
        reason: ExitReason::Normal(Some("done".into())),
    };
    assert!(before.iter().any(|e| e.event == exit), "{before:#?}");
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn transient_is_not_restarted_after_a_normal_exit_but_is_after_a_failure_or_kill() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_one())
        .child(worker("t1", &log).with_restart(Restart::Transient))
        .child(worker("t2", &log).with_restart(Restart::Transient))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    drain(&mut rx);

    // Normal exit: stays known, stopped, not restarted.
    tell(&sup, "t1", WorkerMsg::Exit).await;
    wait_for(&mut rx, "t1", |e| matches!(e, ChildEvent::Exited { .. })).await;
    // Abnormal exit of t2 is restarted, and nothing happened to t1 in between.
    tell(&sup, "t2", WorkerMsg::Fail).await;
    let (_, between) = wait_for(&mut rx, "t2", is_restarted).await;
    assert!(between.iter().all(|e| e.child == "t2"), "{between:#?}");
    let t1 = sup.child("t1").await.expect("query");
    assert_eq!((t1.state, t1.restarts), (ChildState::Stopped, 0));

    // A kill is abnormal too.
    cell_of(&sup, "t2").await.kill();
    let (evt, before) = wait_for(&mut rx, "t2", is_restarted).await;
    assert_eq!(evt.event, ChildEvent::Restarted { restarts: 2 });
    let killed = ChildEvent::Exited {
        reason: ExitReason::Killed,
    };
    assert!(before.iter().any(|e| e.event == killed), "{before:#?}");
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn temporary_is_never_restarted_and_is_forgotten() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_one())
        .child(worker("a", &log))
        .child(worker("tmp", &log).with_restart(Restart::Temporary))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    drain(&mut rx);
    tell(&sup, "tmp", WorkerMsg::Fail).await;
    let (_, before) = wait_for(&mut rx, "tmp", |e| *e == ChildEvent::Removed).await;
    assert_eq!(before.len(), 1, "only the exit before removal: {before:#?}");
    let ids: Vec<String> = sup
        .which_children()
        .await
        .expect("query")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec!["a"]);
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn group_restart_stops_and_drops_temporary_children_and_skips_stopped_ones() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = roomy(SupervisorSpec::one_for_all())
        .child(worker("a", &log))
        .child(worker("tmp", &log).with_restart(Restart::Temporary))
        .child(worker("tr", &log).with_restart(Restart::Transient))
        .child(worker("c", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    // The transient child ends normally first: it is then not part of the group restart.
    tell(&sup, "tr", WorkerMsg::Exit).await;
    wait_for(&mut rx, "tr", |e| matches!(e, ChildEvent::Exited { .. })).await;
    drain(&mut rx);
    log.clear();

    tell(&sup, "a", WorkerMsg::Fail).await;
    wait_for(&mut rx, "c", is_restarted).await;
    assert_eq!(
        log.entries(),
        vec!["stop:c", "stop:tmp", "start:a", "start:c"]
    );
    let children: Vec<(String, ChildState)> = sup
        .which_children()
        .await
        .expect("query")
        .into_iter()
        .map(|c| (c.id, c.state))
        .collect();
    assert_eq!(
        children,
        vec![
            ("a".into(), ChildState::Running),
            ("tr".into(), ChildState::Stopped),
            ("c".into(), ChildState::Running),
        ]
    );
    sup.stop(Duration::from_secs(60)).await.expect("stop");
}
