//! The QUIC fabric between OS processes on 127.0.0.1: this test binary re-executes itself
//! (`--exact child_rank`, with `FLOTILLA_QUIC_CHILD` naming the scenario) as ranks `1..world`,
//! ships them identities from the job CA and joins them through
//! `flotilla_runtime::fabric::quic::launch`. Payloads are integer-valued, so every element is
//! checked exactly; messages mix tags, dtypes, sizes below and above the striping threshold,
//! and whole and striped messages on one tag (FIFO). A peer whose certificate comes from another
//! CA is refused both when it listens and when it dials.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use flotilla_runtime::fabric::quic::launch::{self, Children};
use flotilla_runtime::fabric::quic::{JobCa, QuicError, QuicFabric, QuicOptions};
use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Rank, Tag};

/// Set in a child: the scenario it runs.
const CHILD_ENV: &str = "FLOTILLA_QUIC_CHILD";
/// Generous: two cores are shared with other work.
const T: Duration = Duration::from_secs(30);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn opts() -> QuicOptions {
    QuicOptions {
        connect_timeout: T,
        // Low enough that the 1.5 MiB messages below are striped.
        stripe_bytes: 1 << 20,
        ..QuicOptions::default()
    }
}

/// Options of the refusal scenarios: failing handshakes should not take long.
fn quick() -> QuicOptions {
    QuicOptions {
        connect_timeout: Duration::from_secs(3),
        ..opts()
    }
}

/// The command that runs `scenario` as a child rank.
fn child(scenario: &'static str) -> impl FnMut(Rank) -> Command {
    move |_| {
        let exe = std::env::current_exe().expect("the test binary");
        let mut c = Command::new(exe);
        c.args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, scenario);
        c
    }
}

/// Element `j` of the f32 message `k` from `src` to `dst`: an integer below 2^24, exact in f32.
fn value(src: Rank, dst: Rank, k: usize, j: usize) -> f32 {
    ((src * 1_000_003 + dst * 7_919 + k * 131 + j) % (1 << 24)) as f32
}

/// Lengths (f32 elements) of the messages on the mixed tag: striped (>= 1 MiB) and whole.
const MIXED: [usize; 5] = [393_217, 3, 262_144, 0, 300_001];

async fn send_all(f: &QuicFabric, dst: Rank) -> Result<(), FabricError> {
    let me = f.rank();
    for k in 0..5u64 {
        let b = vec![me as u8, dst as u8, k as u8];
        f.send(dst, Tag::new(1, k), Payload::Bytes(b)).await?;
    }
    for (k, &n) in MIXED.iter().enumerate() {
        let data = (0..n).map(|j| value(me, dst, k, j)).collect();
        f.send(dst, Tag::new(2, 0), Payload::F32(data)).await?;
    }
    let bf: Vec<u16> = (0..(3 << 20) / 2).map(|j| (j * 31 + me) as u16).collect();
    f.send(dst, Tag::new(3, 9), Payload::Bf16(bf)).await
}

async fn check_all(f: &QuicFabric, src: Rank) -> Result<(), FabricError> {
    let me = f.rank();
    // Receive in another order than sent: tags are matched independently.
    let bf = f.recv(src, Tag::new(3, 9), T).await?;
    let want: Vec<u16> = (0..(3 << 20) / 2).map(|j| (j * 31 + src) as u16).collect();
    assert!(bf == Payload::Bf16(want), "bf16 from rank {src}");
    for (k, &n) in MIXED.iter().enumerate() {
        let got = f.recv(src, Tag::new(2, 0), T).await?.into_f32()?;
        assert_eq!(got.len(), n, "message {k} from rank {src}");
        let bad = (0..n).find(|&j| got[j] != value(src, me, k, j));
        assert_eq!(
            bad, None,
            "message {k} from rank {src}: first wrong element"
        );
    }
    for k in (0..5u64).rev() {
        let got = f.recv(src, Tag::new(1, k), T).await?;
        assert_eq!(got, Payload::Bytes(vec![src as u8, me as u8, k as u8]));
    }
    Ok(())
}

/// Every rank sends everything to every other rank, checks what it got, then all meet at a
/// barrier before shutting down (so no rank closes while others still read from it).
async fn exchange(f: &QuicFabric) {
    let (me, world) = (f.rank(), f.world());
    let peers: Vec<Rank> = (0..world).filter(|&p| p != me).collect();
    let sends = async {
        for &p in &peers {
            send_all(f, p).await?;
        }
        Ok::<_, FabricError>(())
    };
    let checks = async {
        for &p in &peers {
            check_all(f, p).await?;
        }
        Ok::<_, FabricError>(())
    };
    let (s, c) = tokio::join!(sends, checks);
    s.expect("sends");
    c.expect("checks");
    for &p in &peers {
        f.send(p, Tag::new(9, 0), Payload::Bytes(vec![1]))
            .await
            .expect("barrier send");
    }
    for &p in &peers {
        f.recv(p, Tag::new(9, 0), T).await.expect("barrier recv");
    }
    f.shutdown().await;
}

/// The child side of every scenario; does nothing unless started by a parent test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_rank() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    match scenario.as_str() {
        "exchange" => {
            let f = launch::child_mesh(localhost(), opts()).await.expect("join");
            exchange(&f).await;
        }
        // Holds a certificate of another CA: joining must fail.
        "intruder" => {
            let r = launch::child_mesh(localhost(), quick()).await;
            assert!(r.is_err(), "the intruder got in");
        }
        // Receives what `throughput_two_processes` sends, acknowledging each message.
        "sink" => {
            let f = launch::child_mesh(localhost(), tuned())
                .await
                .expect("join");
            for i in 0..=SINK_REPS {
                let p = f.recv(0, Tag::new(7, i), T).await.expect("recv");
                assert_eq!(p.byte_len(), SINK_BYTES);
                f.send(0, Tag::new(8, i), Payload::Bytes(vec![1]))
                    .await
                    .expect("ack");
            }
            f.shutdown().await;
        }
        other => panic!("unknown scenario {other}"),
    }
    launch::child_send_line("ok").expect("stdout");
}

async fn mesh_of(world: usize) {
    let ca = JobCa::generate().expect("ca");
    let (f, kids) = launch::parent_mesh(&ca, world, localhost(), opts(), child("exchange"))
        .await
        .expect("mesh");
    exchange(&f).await;
    let status = tokio::task::spawn_blocking(move || kids.wait(T))
        .await
        .expect("join")
        .expect("children exit");
    assert!(status.iter().all(|s| s.success()), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_exchange_exact_payloads() {
    mesh_of(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_exchange_exact_payloads() {
    mesh_of(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_a_foreign_certificate_is_refused() {
    let job = JobCa::generate().expect("ca");
    let other = JobCa::generate().expect("ca");

    // The intruder listens as rank 1: rank 0 (this process) refuses its certificate.
    let r0 = QuicFabric::bind(0, 2, localhost(), &job, quick())
        .await
        .expect("bind");
    let ids = vec![other.issue(1).expect("issue")];
    let mut kids = Children::spawn_with_ids(ids, 2, child("intruder")).expect("spawn");
    let addrs = kids
        .addrs(r0.local_addr().expect("addr"), T)
        .expect("addrs");
    kids.send_peers(&addrs).expect("peers");
    let err = r0.connect_all(&addrs).await.expect_err("refused");
    assert!(
        matches!(&err, QuicError::Fabric(FabricError::Transport { rank: 1, why }) if why.contains("handshake")),
        "{err}"
    );
    let st = tokio::task::spawn_blocking(move || kids.wait(T)).await;
    assert!(st.expect("join").expect("exit").iter().all(|s| s.success()));

    // The intruder dials as rank 0: rank 1 (this process) refuses it and never counts it.
    let r1 = QuicFabric::bind(1, 2, localhost(), &job, quick())
        .await
        .expect("bind");
    let ids = vec![other.issue(0).expect("issue")];
    let mut kids = Children::spawn_with_ids(ids, 2, child("intruder")).expect("spawn");
    let (rank, line) = kids.recv_line(T).expect("address line");
    assert_eq!(rank, 0);
    let intruder: SocketAddr = line
        .strip_prefix("addr ")
        .and_then(|a| a.parse().ok())
        .expect("an address");
    let addrs = [intruder, r1.local_addr().expect("addr")];
    kids.send_peers(&addrs).expect("peers");
    let err = r1.connect_all(&addrs).await.expect_err("refused");
    assert!(err.to_string().contains("[0]"), "{err}");
    let st = tokio::task::spawn_blocking(move || kids.wait(T)).await;
    assert!(st.expect("join").expect("exit").iter().all(|s| s.success()));
}

const SINK_BYTES: usize = 64 << 20;
const SINK_REPS: u64 = 8;

/// Options from `FLOTILLA_QUIC_{CONNS,LANES}` (tuning runs of `throughput_two_processes`).
fn tuned() -> QuicOptions {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let mut o = opts();
    o.connections = env("FLOTILLA_QUIC_CONNS").unwrap_or(o.connections);
    o.lanes = env("FLOTILLA_QUIC_LANES").unwrap_or(o.lanes);
    o
}

/// MiB/s of 64 MiB f32 messages from this process to a child. Run:
/// `cargo test --release -p flotilla-runtime --test quic_multiproc -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_two_processes() {
    let ca = JobCa::generate().expect("ca");
    let (f, kids) = launch::parent_mesh(&ca, 2, localhost(), tuned(), child("sink"))
        .await
        .expect("mesh");
    let mut total = Duration::ZERO;
    for i in 0..=SINK_REPS {
        let p = Payload::F32(vec![1.0; SINK_BYTES / 4]);
        let t = std::time::Instant::now();
        f.send(1, Tag::new(7, i), p).await.expect("send");
        f.recv(1, Tag::new(8, i), T).await.expect("ack");
        if i > 0 {
            total += t.elapsed();
        }
    }
    let mib = (SINK_BYTES as u64 * SINK_REPS) as f64 / f64::from(1 << 20) / total.as_secs_f64();
    println!("quic fabric, two processes: {mib:.0} MiB/s ({:?})", tuned());
    f.shutdown().await;
    let st = tokio::task::spawn_blocking(move || kids.wait(T)).await;
    assert!(st.expect("join").expect("exit").iter().all(|s| s.success()));
}
