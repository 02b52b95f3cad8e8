//! Tests of ordered start and shutdown, kill after timeout, intensity and escalation, backoff,
//! dynamic children and the child API (tokio paused clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorStatus, SpawnErr};
use tokio::time::Instant;

use super::backoff::Backoff;
use super::children::ChildState;
use super::error::SupervisorError;
use super::events::{ChildEvent, ExitReason, event_channel};
use super::handle::SupervisorHandle;
use super::spec::{ChildSpec, ChildTemplate, Shutdown, SupervisorSpec};
use super::strategy::Restart;
use super::supervisor::Supervisor;
use super::test_support::{
    Log, Mode, Worker, WorkerMsg, cell_of, drain, settle, tell, wait_for, worker, worker_mode,
};

const LONG: Duration = Duration::from_secs(600);

fn is_restarted(e: &ChildEvent) -> bool {
    matches!(e, ChildEvent::Restarted { .. })
}

#[tokio::test(start_paused = true)]
async fn children_start_in_order_and_stop_in_reverse() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker("c", &log))
        .observer(tx);
    let (sup, join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    assert_eq!(log.entries(), vec!["start:a", "start:b", "start:c"]);
    sup.stop(LONG).await.expect("stop");
    assert_eq!(log.with_prefix("stop:"), vec!["c", "b", "a"]);
    join.await.expect("supervisor task");
    let events = drain(&mut rx);
    let stopped: Vec<&str> = events
        .iter()
        .filter(|(_, e)| *e == ChildEvent::Stopped)
        .map(|(c, _)| c.as_str())
        .collect();
    assert_eq!(stopped, vec!["c", "b", "a"]);
    assert!(
        rx.recv().await.is_none(),
        "the stream closes with the supervisor"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_stops_the_started_children_and_fails_the_supervisor_start() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker_mode("bad", &log, Mode::FailStart))
        .child(worker("c", &log))
        .observer(tx);
    let err = Supervisor::spawn(None, spec, None).await.err();
    match err {
        Some(SupervisorError::StartFailed { child, reason }) => {
            assert_eq!(child, "bad");
            assert!(reason.contains("bad refuses to start"), "{reason}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert_eq!(
        log.entries(),
        vec!["start:a", "start:b", "stop:b", "stop:a"]
    );
    let events = drain(&mut rx);
    assert!(
        matches!(&events[2], (c, ChildEvent::StartFailed { .. }) if c == "bad"),
        "{events:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_child_that_ignores_stop_is_killed_after_its_timeout() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .child(worker("a", &log).with_shutdown(Shutdown::Timeout(Duration::from_secs(1))))
        .child(worker("stuck", &log).with_shutdown(Shutdown::Timeout(Duration::from_secs(2))))
        .child(worker("brutal", &log).with_shutdown(Shutdown::Brutal))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    tell(&sup, "stuck", WorkerMsg::Block).await;
    settle().await;
    drain(&mut rx);

    let t0 = Instant::now();
    sup.stop(LONG).await.expect("stop");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2100),
        "killed after its 2 s timeout, took {took:?}"
    );
    let events = drain(&mut rx);
    assert_eq!(
        events,
        vec![
            ("brutal".into(), ChildEvent::Killed),
            ("stuck".into(), ChildEvent::Killed),
            ("a".into(), ChildEvent::Stopped),
        ]
    );
    // Killed children do not run post_stop; the graceful one does.
    assert_eq!(log.with_prefix("stop:"), vec!["a"]);
}

#[tokio::test(start_paused = true)]
async fn too_many_restarts_stop_the_children_in_reverse_and_fail_the_supervisor() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .with_intensity(2, Duration::from_secs(10))
        .child(worker("a", &log))
        .child(worker("b", &log))
        .child(worker("c", &log))
        .observer(tx);
    let (sup, join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    for _ in 0..2 {
        tell(&sup, "b", WorkerMsg::Fail).await;
        wait_for(&mut rx, "b", is_restarted).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drain(&mut rx);
    log.clear();
    tell(&sup, "b", WorkerMsg::Fail).await;
    let (evt, before) = wait_for(&mut rx, "b", |e| matches!(e, ChildEvent::Escalated { .. })).await;
    let before: Vec<_> = before.into_iter().map(|e| (e.child, e.event)).collect();
    assert_eq!(
        before[1..],
        [
            ("c".into(), ChildEvent::Stopped),
            ("a".into(), ChildEvent::Stopped)
        ]
    );
    let ChildEvent::Escalated { reason } = evt.event else {
        unreachable!()
    };
    assert!(
        reason.contains("more than 2 restart(s)") && reason.contains("`b`"),
        "{reason}"
    );
    assert_eq!(log.entries(), vec!["stop:c", "stop:a"]);
    tokio::time::timeout(LONG, join)
        .await
        .expect("supervisor ends")
        .expect("task");
    assert_eq!(sup.cell().get_status(), ActorStatus::Stopped);
    assert!(matches!(
        sup.which_children().await,
        Err(SupervisorError::Unreachable(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn restarts_spread_over_time_stay_within_the_intensity() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .with_intensity(1, Duration::from_secs(5))
        .child(worker("a", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    for n in 1..=5 {
        tell(&sup, "a", WorkerMsg::Fail).await;
        let (evt, _) = wait_for(&mut rx, "a", is_restarted).await;
        assert_eq!(evt.event, ChildEvent::Restarted { restarts: n });
        tokio::time::sleep(Duration::from_millis(5_001)).await;
    }
    sup.stop(LONG).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_that_gives_up_escalates_to_its_parent() {
    let log = Log::default();
    let (sub_tx, mut sub_rx) = event_channel();
    let (top_tx, mut top_rx) = event_channel();
    let sub = SupervisorSpec::one_for_one()
        .with_intensity(0, Duration::from_secs(5))
        .child(worker("x", &log))
        .child(worker("y", &log))
        .observer(sub_tx);
    let top = SupervisorSpec::one_for_one()
        .with_intensity(1, Duration::from_secs(60))
        .child(worker("peer", &log))
        .child(ChildSpec::supervisor("sub", sub))
        .observer(top_tx);
    let (root, root_join) = Supervisor::spawn(None, top, None).await.expect("spawn");
    let sub_handle =
        SupervisorHandle::from_cell(cell_of(&root, "sub").await).expect("a supervisor");
    drain(&mut top_rx);

    // x fails; `sub` allows no restart: it stops y and fails; `root` restarts `sub`.
    tell(&sub_handle, "x", WorkerMsg::Fail).await;
    let (esc, _) = wait_for(&mut sub_rx, "x", |e| {
        matches!(e, ChildEvent::Escalated { .. })
    })
    .await;
    assert_eq!(
        esc.supervisor, "sub",
        "nested supervisors are labelled by their child id"
    );
    let (_, before) = wait_for(&mut top_rx, "sub", is_restarted).await;
    assert!(
        matches!(&before[0].event, ChildEvent::Exited { reason: ExitReason::Escalated(e) }
            if e.contains("`x`") && e.contains("`sub`")),
        "{before:#?}"
    );
    // The new `sub` started its children again.
    wait_for(&mut sub_rx, "y", |e| *e == ChildEvent::Started).await;

    // Again within root's window: root gives up too, and the failure reaches the top.
    let sub_handle =
        SupervisorHandle::from_cell(cell_of(&root, "sub").await).expect("a supervisor");
    tell(&sub_handle, "y", WorkerMsg::Fail).await;
    let (esc, _) = wait_for(&mut top_rx, "sub", |e| {
        matches!(e, ChildEvent::Escalated { .. })
    })
    .await;
    assert!(matches!(esc.event, ChildEvent::Escalated { reason } if reason.contains("`y`")));
    tokio::time::timeout(LONG, root_join)
        .await
        .expect("root ends")
        .expect("task");
    assert_eq!(
        log.with_prefix("stop:").last().map(String::as_str),
        Some("peer")
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_restarts_on_the_paused_clock() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .with_intensity(10, Duration::from_secs(60))
        .with_backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_millis(300),
        ))
        .child(worker("a", &log))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    let mut delays = Vec::new();
    for _ in 0..4 {
        tell(&sup, "a", WorkerMsg::Fail).await;
        let (scheduled, _) = wait_for(&mut rx, "a", |e| {
            matches!(e, ChildEvent::RestartScheduled { .. })
        })
        .await;
        // While it waits, the supervisor still answers and shows the pending restart.
        assert_eq!(
            sup.child("a").await.expect("query").state,
            ChildState::RestartPending
        );
        let (restarted, _) = wait_for(&mut rx, "a", is_restarted).await;
        delays.push((restarted.at - scheduled.at).as_millis());
    }
    assert_eq!(delays, vec![100, 200, 300, 300]);
    sup.stop(LONG).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_failing_restart_counts_against_the_intensity_and_is_reported() {
    let starts = Arc::new(AtomicU32::new(0));
    let log = Log::default();
    let counter = starts.clone();
    let w = Worker {
        name: "flaky".into(),
        log: log.clone(),
        mode: Mode::Normal,
    };
    let flaky = ChildSpec::new("flaky", move |sup| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let w = w.clone();
        async move {
            if n > 0 {
                return Err(SpawnErr::StartupFailed("device lost".into()));
            }
            let (actor, _) = Worker::spawn_linked(None, w, (), sup).await?;
            Ok(actor.get_cell())
        }
    });
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::one_for_one()
        .with_intensity(3, Duration::from_secs(60))
        .child(flaky)
        .observer(tx);
    let (sup, join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    tell(&sup, "flaky", WorkerMsg::Fail).await;
    let (_, before) = wait_for(&mut rx, "flaky", |e| {
        matches!(e, ChildEvent::Escalated { .. })
    })
    .await;
    let failed = before
        .iter()
        .filter(|e| matches!(&e.event, ChildEvent::StartFailed { error } if error.contains("device lost")))
        .count();
    assert_eq!(
        failed, 3,
        "three restarts tried, the fourth exceeds the intensity"
    );
    assert_eq!(starts.load(Ordering::SeqCst), 4);
    tokio::time::timeout(LONG, join)
        .await
        .expect("supervisor ends")
        .expect("task");
}

#[tokio::test(start_paused = true)]
async fn simple_one_for_one_starts_and_restarts_dynamic_instances() {
    let log = Log::default();
    let template = ChildTemplate::for_actor("rank", {
        let log = log.clone();
        move |name: String| {
            (
                Worker {
                    name,
                    log: log.clone(),
                    mode: Mode::Normal,
                },
                (),
            )
        }
    });
    let (tx, mut rx) = event_channel();
    let spec = SupervisorSpec::simple_one_for_one(template)
        .with_intensity(10, Duration::from_secs(60))
        .observer(tx);
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    assert!(sup.which_children().await.expect("query").is_empty());
    let r1 = sup.start_child("gpu0".to_owned()).await.expect("start");
    let r2 = sup.start_child("gpu1".to_owned()).await.expect("start");
    assert_eq!((r1.id.as_str(), r2.id.as_str()), ("rank-1", "rank-2"));
    assert!(r1.dynamic && r1.state == ChildState::Running);
    let r2_cell = cell_of(&sup, "rank-2").await.get_id();

    tell(&sup, "rank-1", WorkerMsg::Fail).await;
    wait_for(&mut rx, "rank-1", is_restarted).await;
    assert_eq!(
        cell_of(&sup, "rank-2").await.get_id(),
        r2_cell,
        "only the failed instance"
    );
    assert_eq!(
        log.entries(),
        vec!["start:gpu0", "start:gpu1", "start:gpu0"]
    );

    sup.terminate_child("rank-2").await.expect("terminate");
    wait_for(&mut rx, "rank-2", |e| *e == ChildEvent::Removed).await;
    let ids: Vec<String> = sup
        .which_children()
        .await
        .expect("q")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec!["rank-1"]);

    match sup.start_child(42u32).await {
        Err(SupervisorError::StartFailed { child, reason }) => {
            assert_eq!(child, "rank-3");
            assert!(reason.contains("String"), "{reason}");
        }
        other => panic!("wrong argument type must fail: {other:?}"),
    }
    sup.stop(LONG).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn child_api_terminates_restarts_and_reports_errors() {
    let log = Log::default();
    let spec = SupervisorSpec::one_for_one()
        .child(worker("a", &log))
        .child(worker("b", &log).with_restart(Restart::Temporary));
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    assert!(matches!(
        sup.start_child(1u8).await,
        Err(SupervisorError::NotSimpleOneForOne)
    ));
    assert!(matches!(
        sup.terminate_child("zz").await,
        Err(SupervisorError::NoSuchChild(_))
    ));
    assert!(matches!(
        sup.restart_child("a").await,
        Err(SupervisorError::AlreadyRunning(_))
    ));

    sup.terminate_child("a").await.expect("terminate");
    assert_eq!(sup.child("a").await.expect("q").state, ChildState::Stopped);
    settle().await;
    assert_eq!(
        sup.child("a").await.expect("q").state,
        ChildState::Stopped,
        "not restarted"
    );
    let info = sup.restart_child("a").await.expect("restart");
    assert_eq!((info.state, info.restarts), (ChildState::Running, 0));
    sup.terminate_child("b").await.expect("terminate temporary");
    assert!(matches!(
        sup.child("b").await,
        Err(SupervisorError::NoSuchChild(_))
    ));
    assert_eq!(
        log.entries(),
        vec!["start:a", "start:b", "stop:a", "start:a", "stop:b"]
    );
    sup.stop(LONG).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn inconsistent_specs_are_rejected() {
    let log = Log::default();
    let dup = SupervisorSpec::one_for_one()
        .child(worker("a", &log))
        .child(worker("a", &log));
    assert!(matches!(
        Supervisor::spawn(None, dup, None).await.err(),
        Some(SupervisorError::InvalidSpec(m)) if m.contains("duplicate")
    ));
    let template = ChildTemplate::for_actor("w", {
        let log = log.clone();
        move |name: String| {
            (
                Worker {
                    name,
                    log: log.clone(),
                    mode: Mode::Normal,
                },
                (),
            )
        }
    });
    let mut wrong = SupervisorSpec::one_for_all();
    wrong.template = Some(template);
    assert!(matches!(
        Supervisor::spawn(None, wrong, None).await.err(),
        Some(SupervisorError::InvalidSpec(_))
    ));
    assert!(log.entries().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_that_stops_when_done_ends_after_its_last_worker() {
    let log = Log::default();
    let (tx, mut rx) = event_channel();
    let transient = |name| worker(name, &log).with_restart(Restart::Transient);
    let spec = SupervisorSpec::one_for_one()
        .with_intensity(3, LONG)
        .child(transient("a"))
        .child(transient("b"))
        .observer(tx)
        .stop_when_done();
    let (sup, join) = Supervisor::spawn(None, spec, None).await.expect("spawn");
    // A failure is restarted, not the end.
    tell(&sup, "a", WorkerMsg::Fail).await;
    settle().await;
    tell(&sup, "a", WorkerMsg::Exit).await;
    settle().await;
    assert!(!join.is_finished(), "b still runs");
    tell(&sup, "b", WorkerMsg::Exit).await;
    join.await.expect("the supervisor ends by itself");
    let events = drain(&mut rx);
    let b: Vec<&ChildEvent> = events
        .iter()
        .filter(|(c, _)| c == "b")
        .map(|(_, e)| e)
        .collect();
    assert_eq!(b.len(), 2, "{events:?}");
    assert!(matches!(
        b[1],
        ChildEvent::Exited {
            reason: ExitReason::Normal(_)
        }
    ));
    assert!(events.iter().any(|(c, e)| c == "a" && is_restarted(e)));
}
