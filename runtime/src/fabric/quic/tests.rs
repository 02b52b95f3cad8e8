//! Tests of the QUIC fabric on 127.0.0.1: payloads, FIFO, TLS refusal, limits, failures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::frame::{HEADER_LEN, encode_frame};
use super::*;

const T: Duration = Duration::from_secs(5);

fn opts() -> QuicOptions {
    QuicOptions {
        connect_timeout: Duration::from_secs(5),
        ..QuicOptions::default()
    }
}

async fn mesh(n: usize) -> Vec<QuicFabric> {
    QuicFabric::loopback_mesh(n, opts()).await.expect("mesh")
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test]
async fn two_ranks_exchange_payloads_in_fifo_order() {
    let m = mesh(2).await;
    let big: Vec<f32> = (0..(3 << 20) / 4).map(|i| i as f32 * 0.5).collect();
    let bf: Vec<u16> = (0..1000).map(|i| i as u16 ^ 0x3f80).collect();
    let send = async {
        m[0].send(1, Tag::new(1, 0), Payload::F32(big.clone()))
            .await?;
        m[0].send(1, Tag::new(1, 1), Payload::Bf16(bf.clone()))
            .await?;
        for i in 0..100u32 {
            let t = Tag::new(2, u64::from(i % 3));
            m[0].send(1, t, Payload::Bytes(i.to_le_bytes().to_vec()))
                .await?;
        }
        m[1].send(0, Tag::new(1, 0), Payload::Bytes(vec![])).await?;
        Ok::<_, FabricError>(())
    };
    let recv = async {
        // Receive out of send order: tags are matched independently.
        let b = m[1].recv(0, Tag::new(1, 1), T).await?;
        let f = m[1].recv(0, Tag::new(1, 0), T).await?;
        let mut seen = vec![Vec::new(); 3];
        for t in (0..3u64).rev() {
            for _ in 0..(100 + 2 - t) / 3 {
                let p = m[1].recv(0, Tag::new(2, t), T).await?.into_bytes()?;
                let mut x = [0u8; 4];
                x.copy_from_slice(&p);
                seen[t as usize].push(u32::from_le_bytes(x));
            }
        }
        let back = m[0].recv(1, Tag::new(1, 0), T).await?;
        Ok::<_, FabricError>((b, f, seen, back))
    };
    let (s, r) = tokio::join!(send, recv);
    s.expect("send");
    let (b, f, seen, back) = r.expect("recv");
    assert_eq!(b, Payload::Bf16(bf));
    assert_eq!(f, Payload::F32(big));
    for (t, got) in seen.iter().enumerate() {
        let want: Vec<u32> = (0..100).filter(|i| i % 3 == t as u32).collect();
        assert_eq!(got, &want, "FIFO on tag {t}");
    }
    assert_eq!(back, Payload::Bytes(vec![]));
    // A rank may send to itself.
    m[0].send(0, Tag::new(9, 9), Payload::Bytes(vec![7]))
        .await
        .expect("self send");
    assert_eq!(
        m[0].recv(0, Tag::new(9, 9), T).await.expect("self recv"),
        Payload::Bytes(vec![7])
    );
}

/// Striped and whole messages interleaved on one tag and on several tags at once keep their
/// order and their exact contents, whatever lanes and connections they take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_and_whole_messages_stay_fifo_per_tag() {
    let o = QuicOptions {
        stripe_bytes: 64 << 10,
        lanes: 3,
        connections: 2,
        ..opts()
    };
    let m = Arc::new(QuicFabric::loopback_mesh(2, o).await.expect("mesh"));
    // Message i on tag t: i-th size of a pattern mixing striped (>= 64 KiB) and whole ones.
    let size = |i: usize| [300_000usize, 5, 70_000, 0, 1 << 20, 16_385][i % 6];
    let value =
        |t: u64, i: usize, j: usize| ((t as usize * 1_000_003 + i * 7919 + j) % (1 << 24)) as f32;
    const TAGS: u64 = 4;
    const N: usize = 12;
    let send = {
        let m = Arc::clone(&m);
        tokio::spawn(async move {
            let mut sends = Vec::new();
            for t in 0..TAGS {
                let m = Arc::clone(&m);
                sends.push(tokio::spawn(async move {
                    for i in 0..N {
                        let data = (0..size(i)).map(|j| value(t, i, j)).collect();
                        m[0].send(1, Tag::new(3, t), Payload::F32(data)).await?;
                        if i % 4 == 0 {
                            let b = vec![i as u8; 70_000 + i];
                            m[0].send(1, Tag::new(4, t), Payload::Bytes(b)).await?;
                        }
                    }
                    Ok::<_, FabricError>(())
                }));
            }
            for s in sends {
                s.await.expect("join")?;
            }
            Ok::<_, FabricError>(())
        })
    };
    for t in (0..TAGS).rev() {
        for i in 0..N {
            let got = m[1]
                .recv(0, Tag::new(3, t), T)
                .await
                .expect("recv")
                .into_f32()
                .expect("f32");
            assert_eq!(got.len(), size(i), "tag {t} message {i}");
            assert!(
                got.iter().enumerate().all(|(j, &x)| x == value(t, i, j)),
                "tag {t} message {i}"
            );
        }
        for i in (0..N).step_by(4) {
            let got = m[1].recv(0, Tag::new(4, t), T).await.expect("recv");
            assert_eq!(got, Payload::Bytes(vec![i as u8; 70_000 + i]));
        }
    }
    send.await.expect("join").expect("sends");
}

/// The dialler picks the connection count; a listener configured otherwise follows it.
#[tokio::test]
async fn the_dialler_chooses_the_connection_count() {
    let ca = JobCa::generate().expect("ca");
    let three = QuicOptions {
        connections: 3,
        stripe_bytes: 64 << 10,
        ..opts()
    };
    let one = QuicOptions {
        connections: 1,
        ..opts()
    };
    let m = QuicFabric::loopback_mesh_with(&ca, vec![three, one])
        .await
        .expect("mesh");
    let data: Vec<f32> = (0..300_001).map(|i| i as f32).collect();
    for (s, d) in [(0, 1), (1, 0)] {
        m[s].send(d, Tag::new(1, 1), Payload::F32(data.clone()))
            .await
            .expect("send");
        let got = m[d].recv(s, Tag::new(1, 1), T).await.expect("recv");
        assert_eq!(got, Payload::F32(data.clone()));
    }
}

#[tokio::test]
async fn three_ranks_all_pairs() {
    let m = mesh(3).await;
    let sends = async {
        for (s, from) in m.iter().enumerate() {
            for d in 0..3 {
                if s != d {
                    let data = vec![(s * 10 + d) as f32; 1 << 18];
                    from.send(d, Tag::new(0, 1), Payload::F32(data)).await?;
                    from.send(d, Tag::new(0, 2), Payload::Bytes(vec![s as u8; 3]))
                        .await?;
                }
            }
        }
        Ok::<_, FabricError>(())
    };
    let recvs = async {
        for (d, to) in m.iter().enumerate() {
            for s in 0..3 {
                if s != d {
                    let b = to.recv(s, Tag::new(0, 2), T).await?;
                    assert_eq!(b, Payload::Bytes(vec![s as u8; 3]));
                    let f = to.recv(s, Tag::new(0, 1), T).await?.into_f32()?;
                    assert_eq!(f.len(), 1 << 18);
                    assert!(f.iter().all(|&x| x == (s * 10 + d) as f32));
                }
            }
        }
        Ok::<_, FabricError>(())
    };
    let (a, b) = tokio::join!(sends, recvs);
    a.expect("sends");
    b.expect("recvs");
}

/// quinn's endpoint advertises 1472 bytes unless told otherwise, which caps path-MTU discovery
/// whatever its upper bound: the endpoint must carry the options' bound.
#[test]
fn the_endpoint_advertises_the_configured_udp_payload() {
    let payload = |n: u16| {
        let o = QuicOptions {
            max_udp_payload: n,
            ..QuicOptions::default()
        };
        o.endpoint()
            .expect("endpoint config")
            .get_max_udp_payload_size()
    };
    assert_eq!(payload(1452), 1452);
    assert_eq!(payload(9000), 9000);
    assert_eq!(payload(65527), 65527);
    // Below QUIC's minimum datagram size, the minimum.
    assert_eq!(payload(500), 1200);
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused() {
    let job = JobCa::generate().expect("ca");
    let other = JobCa::generate().expect("ca");
    let o = QuicOptions {
        connect_timeout: Duration::from_millis(500),
        ..opts()
    };
    // The intruder listens as rank 1: rank 0 refuses its certificate.
    let r0 = QuicFabric::bind(0, 2, localhost(), &job, o.clone())
        .await
        .expect("bind");
    let intruder = QuicFabric::bind(1, 2, localhost(), &other, o.clone())
        .await
        .expect("bind");
    let addrs = [
        r0.local_addr().expect("a"),
        intruder.local_addr().expect("a"),
    ];
    let err = r0.connect_all(&addrs).await.expect_err("refused");
    assert!(
        matches!(&err, QuicError::Fabric(FabricError::Transport { rank: 1, why }) if why.contains("handshake")),
        "{err}"
    );
    // The intruder dials as rank 0: the real rank 1 refuses its certificate.
    let r1 = QuicFabric::bind(1, 2, localhost(), &job, o.clone())
        .await
        .expect("bind");
    let intruder0 = QuicFabric::bind(0, 2, localhost(), &other, o)
        .await
        .expect("bind");
    let addrs = [
        intruder0.local_addr().expect("a"),
        r1.local_addr().expect("a"),
    ];
    let (dialled, accepted) = tokio::join!(intruder0.connect_all(&addrs), r1.connect_all(&addrs));
    assert!(dialled.is_err(), "the intruder got in: {dialled:?}");
    let accepted = accepted.expect_err("rank 1 must not count the intruder as rank 0");
    assert!(accepted.to_string().contains("[0]"), "{accepted}");
    assert!(r1.connection(0).is_none());
}

#[tokio::test]
async fn oversized_frames_are_refused_by_sender_and_receiver() {
    let ca = JobCa::generate().expect("ca");
    let small = QuicOptions {
        max_frame_bytes: 1 << 20,
        ..opts()
    };
    let m = QuicFabric::loopback_mesh_with(&ca, vec![opts(), small])
        .await
        .expect("mesh");
    let s = m[1]
        .send(0, Tag::new(0, 0), Payload::Bytes(vec![0; (1 << 20) + 1]))
        .await;
    assert!(
        matches!(&s, Err(FabricError::Transport { rank: 0, why }) if why.contains("exceeds")),
        "{s:?}"
    );
    // Rank 0 allows 2 MiB, rank 1 does not: rank 1 refuses the frame and fails rank 0.
    m[0].send(1, Tag::new(0, 0), Payload::Bytes(vec![0; 2 << 20]))
        .await
        .expect("sent");
    let r = m[1].recv(0, Tag::new(0, 0), T).await;
    assert!(
        matches!(&r, Err(FabricError::PeerFailed { rank: 0, why }) if why.contains("exceeds")),
        "{r:?}"
    );
}

async fn inject(raw: &[u8]) -> Result<Payload, FabricError> {
    let m = mesh(2).await;
    let conn = m[0].connection(1).expect("connected");
    let mut s = conn.open_uni().await.expect("stream");
    s.write_all(raw).await.expect("write");
    s.finish().expect("finish");
    m[1].recv(0, Tag::new(0, 0), T).await
}

#[tokio::test]
async fn malformed_and_truncated_frames_fail_the_peer_by_name() {
    let r = inject(&[b'?'; HEADER_LEN]).await;
    assert!(
        matches!(&r, Err(FabricError::PeerFailed { rank: 0, why }) if why.contains("magic")),
        "{r:?}"
    );
    let whole = encode_frame(0, Tag::new(0, 0), Payload::Bytes(vec![1; 100])).expect("frame");
    let r = inject(&whole[..60]).await;
    assert!(
        matches!(&r, Err(FabricError::PeerFailed { rank: 0, why }) if why.contains("truncated")),
        "{r:?}"
    );
    let r = inject(&whole[..10]).await;
    assert!(
        matches!(&r, Err(FabricError::PeerFailed { rank: 0, why }) if why.contains("truncated")),
        "{r:?}"
    );
    // A frame that claims to come from another rank.
    let forged = encode_frame(1, Tag::new(0, 0), Payload::Bytes(vec![1])).expect("frame");
    let r = inject(&forged).await;
    assert!(
        matches!(&r, Err(FabricError::PeerFailed { rank: 0, why }) if why.contains("claiming")),
        "{r:?}"
    );
    // A well-formed frame goes through.
    let r = inject(&whole).await;
    assert_eq!(r, Ok(Payload::Bytes(vec![1; 100])));
}

#[tokio::test]
async fn a_closed_peer_fails_pending_receives() {
    let mut m = mesh(3).await;
    let r2 = m.pop().expect("rank 2");
    let pending = async {
        tokio::join!(
            m[0].recv(2, Tag::new(0, 0), Duration::from_secs(30)),
            m[1].recv(2, Tag::new(3, 3), Duration::from_secs(30)),
        )
    };
    let close = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(r2);
    };
    let start = Instant::now();
    let ((a, b), ()) = tokio::join!(pending, close);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    for r in [a, b] {
        assert!(
            matches!(&r, Err(FabricError::PeerFailed { rank: 2, .. })),
            "{r:?}"
        );
    }
    let s = m[0].send(2, Tag::new(0, 0), Payload::Bytes(vec![])).await;
    assert!(
        matches!(s, Err(FabricError::PeerFailed { rank: 2, .. })),
        "{s:?}"
    );
    // The others still talk.
    m[0].send(1, Tag::new(0, 0), Payload::Bytes(vec![5]))
        .await
        .expect("send");
    assert_eq!(
        m[1].recv(0, Tag::new(0, 0), T).await,
        Ok(Payload::Bytes(vec![5]))
    );
}

#[tokio::test]
async fn a_cancelled_send_leaves_the_stream_in_step() {
    // Small windows, so that the big send waits for the receiver.
    let small = QuicOptions {
        send_window: 256 << 10,
        stream_receive_window: 256 << 10,
        ..opts()
    };
    let m = QuicFabric::loopback_mesh(2, small).await.expect("mesh");
    let tag = Tag::new(5, 5);
    let big = Payload::Bytes(vec![3; 8 << 20]);
    let cancelled = tokio::time::timeout(Duration::from_millis(2), m[0].send(1, tag, big)).await;
    assert!(
        cancelled.is_err(),
        "the send should still have been in flight"
    );
    m[0].send(1, tag, Payload::Bytes(vec![4]))
        .await
        .expect("send");
    // The cancelled frame either went out whole or not at all; the next one follows intact.
    let first = m[1].recv(0, tag, T).await.expect("recv");
    if first != Payload::Bytes(vec![4]) {
        assert_eq!(first, Payload::Bytes(vec![3; 8 << 20]));
        let next = m[1].recv(0, tag, T).await.expect("recv");
        assert_eq!(next, Payload::Bytes(vec![4]));
    }
}

#[tokio::test]
async fn shutdown_delivers_the_last_sends_then_fails_the_peer() {
    let m = mesh(2).await;
    m[1].send(0, Tag::new(0, 1), Payload::F32(vec![2.5; 1 << 18]))
        .await
        .expect("send");
    m[1].shutdown().await;
    let got = m[0].recv(1, Tag::new(0, 1), T).await.expect("delivered");
    assert_eq!(got, Payload::F32(vec![2.5; 1 << 18]));
    let r = m[0].recv(1, Tag::new(0, 1), T).await;
    assert!(
        matches!(r, Err(FabricError::PeerFailed { rank: 1, .. })),
        "{r:?}"
    );
    let own = m[1].recv(0, Tag::new(0, 1), T).await;
    assert_eq!(own, Err(FabricError::Closed));
}

#[tokio::test]
async fn deadline_expiry_names_the_peer() {
    let m = mesh(2).await;
    let r = m[0]
        .recv(1, Tag::new(4, 2), Duration::from_millis(30))
        .await;
    assert!(
        matches!(r, Err(FabricError::Timeout { src: 1, tag, .. }) if tag == Tag::new(4, 2)),
        "{r:?}"
    );
}

async fn fabric_run(label: &str, o: QuicOptions) {
    const N: usize = 64 << 20;
    let m = QuicFabric::loopback_mesh(2, o).await.expect("mesh");
    for kind in ["bytes", "f32"] {
        let payload = match kind {
            "bytes" => Payload::Bytes(vec![7u8; N]),
            _ => Payload::F32(vec![1.5f32; N / 4]),
        };
        let start = Instant::now();
        let (s, r) = tokio::join!(
            m[0].send(1, Tag::new(0, 0), payload),
            m[1].recv(0, Tag::new(0, 0), Duration::from_secs(60))
        );
        s.expect("send");
        assert_eq!(r.expect("recv").byte_len(), N);
        let dt = start.elapsed();
        println!(
            "fabric {label} {kind}: 64 MiB in {dt:?} = {:.0} MiB/s",
            64.0 / dt.as_secs_f64()
        );
    }
}

/// One bare quinn stream (connection set up first, not timed), same TLS configuration.
async fn bare_run(label: &str, t: Arc<quinn::TransportConfig>) {
    const N: usize = 64 << 20;
    let ca = JobCa::generate().expect("ca");
    let (a, b) = (ca.issue(0).expect("id"), ca.issue(1).expect("id"));
    let server =
        Endpoint::server(b.server_config(t.clone()).expect("cfg"), localhost()).expect("s");
    let mut client = Endpoint::client(localhost()).expect("client");
    client.set_default_client_config(a.client_config(t).expect("cfg"));
    let addr = server.local_addr().expect("addr");
    let (sc, cc) = tokio::join!(
        async {
            server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn")
        },
        async {
            let c = client.connect(addr, &tls::rank_name(1)).expect("connect");
            c.await.expect("conn")
        }
    );
    let data = Bytes::from(vec![7u8; N]);
    let start = Instant::now();
    let recv = async {
        let mut s = sc.accept_uni().await.expect("stream");
        s.read_to_end(N + 1).await.expect("read").len()
    };
    let send = async {
        let mut s = cc.open_uni().await.expect("stream");
        s.write_chunk(data).await.expect("write");
        s.finish().expect("finish");
    };
    let (n, ()) = tokio::join!(recv, send);
    assert_eq!(n, N);
    let dt = start.elapsed();
    println!(
        "bare quinn {label}: 64 MiB in {dt:?} = {:.0} MiB/s",
        64.0 / dt.as_secs_f64()
    );
}

/// Throughput of 64 MiB between two ranks, against one bare quinn stream, on loopback. Run:
/// `cargo test -p flotilla-runtime fabric::quic -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_64mib() {
    for _ in 0..3 {
        fabric_run("(fabric windows)", opts()).await;
        bare_run(
            "(quinn default windows)",
            Arc::new(quinn::TransportConfig::default()),
        )
        .await;
        bare_run("(fabric windows)", opts().transport().expect("transport")).await;
    }
}
