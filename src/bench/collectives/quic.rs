//! The QUIC part of `flotilla bench collectives`: one-way transfers between two OS processes on
//! 127.0.0.1 (this process sends, a child `flotilla bench collectives --p2p-worker …` receives),
//! over the QUIC fabric, over a bare single-stream quinn connection (one connection, one stream,
//! the fabric's transport settings, quinn's default sockets, no framing), over the same with
//! the fabric's enlarged UDP socket buffers, and over a plain TCP stream. Each transfer is
//! `bytes` sent one way and a one-byte acknowledgement back, repeated `reps` times after one
//! untimed warm-up; the time is the sender's, from the first byte to the last acknowledgement.
//! The fabric moves f32 payloads (a fresh `Vec<f32>` per repetition, filled before the timer
//! starts); the baselines move one reused byte buffer.
//!
//! Each record also gives `cpu_cores`: both processes' CPU time over the transfer divided by its
//! wall time. `FLOTILLA_QUIC_CONNS`, `FLOTILLA_QUIC_LANES`, `FLOTILLA_QUIC_STRIPE`,
//! `FLOTILLA_QUIC_SOCKBUF` and `FLOTILLA_QUIC_MTU` (the path-MTU discovery bound, which the bare
//! quinn baselines share) override the fabric's options for these transfers (tuning; both
//! processes read them).
//!
//! Also the in-process loopback mesh on which the collectives sweep runs over QUIC.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use flotilla_runtime::fabric::quic::launch::{self, Children};
use flotilla_runtime::fabric::quic::{JobCa, QuicFabric, QuicOptions};
use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Tag};

const DEADLINE: Duration = Duration::from_secs(120);

/// One of the measured transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The QUIC fabric (mutual TLS, framing, striping over its connections).
    Fabric,
    /// One quinn connection and stream, quinn's default UDP sockets.
    BareQuinn,
    /// The same with the fabric's UDP socket buffers.
    BareQuinnBigSockets,
    /// A plain TCP stream (no Nagle).
    Tcp,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::Fabric,
        Transport::BareQuinn,
        Transport::BareQuinnBigSockets,
        Transport::Tcp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Fabric => "quic_fabric",
            Transport::BareQuinn => "bare_quinn",
            Transport::BareQuinnBigSockets => "bare_quinn_big_sockets",
            Transport::Tcp => "tcp",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| anyhow!("unknown transport {s:?}"))
    }
}

fn mib_per_s(bytes: usize, reps: usize, total: Duration) -> f64 {
    (bytes * reps) as f64 / (1 << 20) as f64 / total.as_secs_f64()
}

/// One transfer measurement.
#[derive(Debug, Clone, Copy)]
pub struct P2p {
    /// Timed repetitions' bytes over their time.
    pub mib_per_s: f64,
    /// CPU time of both processes over every repetition (warm-up included) divided by its
    /// wall time: the cores the transfer kept busy (None where /proc is missing).
    pub cpu_cores: Option<f64>,
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat` (Linux,
/// 100 ticks per second).
fn cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Times the sender's loop: CPU and wall clock from creation to [`Meter::done`].
struct Meter {
    cpu: Option<f64>,
    wall: Instant,
    timed: Duration,
}

impl Meter {
    fn start() -> Self {
        Self {
            cpu: cpu_secs(),
            wall: Instant::now(),
            timed: Duration::ZERO,
        }
    }

    /// The result, given the child's CPU seconds over its loop.
    fn done(&self, bytes: usize, reps: usize, child_cpu: Option<f64>) -> P2p {
        let wall = self.wall.elapsed().as_secs_f64();
        let mine = cpu_secs().zip(self.cpu).map(|(b, a)| b - a);
        P2p {
            mib_per_s: mib_per_s(bytes, reps, self.timed),
            cpu_cores: mine.zip(child_cpu).map(|(a, b)| (a + b) / wall),
        }
    }
}

/// The child's `cpu <seconds>` line, if it sent one.
fn child_cpu(kids: &Children) -> Option<f64> {
    let (_, line) = kids.recv_line(Duration::from_secs(10)).ok()?;
    line.strip_prefix("cpu ")?.trim().parse().ok()
}

/// Report this process's CPU seconds since `since` to the parent.
fn report_cpu(since: Option<f64>) -> Result<()> {
    let used = cpu_secs().zip(since).map_or(-1.0, |(b, a)| b - a);
    launch::child_send_line(&format!("cpu {used}")).map_err(|e| anyhow!("{e}"))
}

/// A loopback QUIC mesh of `n` ranks in this process.
pub async fn mesh(n: usize) -> Result<Vec<Arc<QuicFabric>>> {
    let mesh = QuicFabric::loopback_mesh(n, QuicOptions::default())
        .await
        .map_err(|e| anyhow!("building a {n}-rank QUIC loopback mesh: {e}"))?;
    Ok(mesh.into_iter().map(Arc::new).collect())
}

/// Close a mesh cleanly.
pub async fn close(mesh: Vec<Arc<QuicFabric>>) {
    for f in &mesh {
        f.shutdown().await;
    }
}

/// The fabric's options for the transfers (tuning: `FLOTILLA_QUIC_{CONNS,LANES,STRIPE,SOCKBUF,MTU}`).
fn fabric_opts() -> QuicOptions {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let mut o = QuicOptions::default();
    if let Some(v) = env("FLOTILLA_QUIC_CONNS") {
        o.connections = v;
    }
    if let Some(v) = env("FLOTILLA_QUIC_LANES") {
        o.lanes = v;
    }
    if let Some(v) = env("FLOTILLA_QUIC_STRIPE") {
        o.stripe_bytes = v as u64;
    }
    if let Some(v) = env("FLOTILLA_QUIC_SOCKBUF") {
        o.socket_buffer_bytes = v;
    }
    if let Some(v) = env("FLOTILLA_QUIC_MTU") {
        o.max_udp_payload = v.clamp(1200, 65527) as u16;
    }
    o
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The command that runs the receiving side of `t` in a child process.
fn worker(t: Transport, bytes: usize, reps: usize) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the flotilla binary")?;
    let mut c = Command::new(exe);
    c.args(["bench", "collectives", "--p2p-worker"])
        .arg(format!("{},{bytes},{reps}", t.name()));
    Ok(c)
}

/// `bytes` one way from this process to a child process over `t`.
pub async fn p2p(t: Transport, bytes: usize, reps: usize) -> Result<P2p> {
    let mib = match t {
        Transport::Fabric => fabric_sender(bytes, reps).await,
        Transport::BareQuinn | Transport::BareQuinnBigSockets => bare_sender(t, bytes, reps).await,
        Transport::Tcp => {
            let cmd = worker(t, bytes, reps)?;
            tokio::task::spawn_blocking(move || tcp_sender(cmd, bytes, reps))
                .await
                .context("joining the TCP sender")?
        }
    };
    mib.with_context(|| format!("{} transfer of {bytes} bytes", t.name()))
}

async fn fabric_sender(bytes: usize, reps: usize) -> Result<P2p> {
    let ca = JobCa::generate().map_err(|e| anyhow!("{e}"))?;
    let cmd = worker(Transport::Fabric, bytes, reps)?;
    let mut cmd = Some(cmd);
    let (a, kids) = launch::parent_mesh(&ca, 2, localhost(), fabric_opts(), |_| {
        cmd.take().unwrap_or_else(|| Command::new("false"))
    })
    .await
    .map_err(|e| anyhow!("joining the receiving process: {e}"))?;
    let mut m = Meter::start();
    for i in 0..=reps as u64 {
        let payload = Payload::F32(vec![1.0f32; bytes / 4]);
        let t = Instant::now();
        a.send(1, Tag::new(7, i), payload).await?;
        a.recv(1, Tag::new(8, i), DEADLINE).await?;
        if i > 0 {
            m.timed += t.elapsed();
        }
    }
    let (kids, child) = tokio::task::spawn_blocking(move || {
        let c = child_cpu(&kids);
        (kids, c)
    })
    .await
    .context("reading the child's CPU time")?;
    let r = m.done(bytes, reps, child);
    a.shutdown().await;
    finish(kids).await?;
    Ok(r)
}

/// Wait for the child, which must exit cleanly.
async fn finish(kids: Children) -> Result<()> {
    let status = tokio::task::spawn_blocking(move || kids.wait(DEADLINE))
        .await
        .context("joining the child")?
        .map_err(|e| anyhow!("{e}"))?;
    ensure!(
        status.iter().all(|s| s.success()),
        "the receiving process failed: {status:?}"
    );
    Ok(())
}

/// The lines `addr <a>` (and `cert <hex>` for quinn) of the receiving child.
fn child_fields(kids: &Children, want: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for w in want {
        let (_, line) = kids.recv_line(DEADLINE).map_err(|e| anyhow!("{e}"))?;
        let v = line
            .strip_prefix(w)
            .ok_or_else(|| anyhow!("expected `{w}` from the child, got {line:?}"))?;
        out.push(v.trim().to_string());
    }
    Ok(out)
}

async fn bare_sender(t: Transport, bytes: usize, reps: usize) -> Result<P2p> {
    let cmd = worker(t, bytes, reps)?;
    let mut cmd = Some(cmd);
    let kids = Children::spawn_raw(vec![1], |_| {
        cmd.take().unwrap_or_else(|| Command::new("false"))
    })
    .map_err(|e| anyhow!("{e}"))?;
    let fields = tokio::task::spawn_blocking(move || {
        let f = child_fields(&kids, &["addr", "cert"]);
        (kids, f)
    })
    .await
    .context("reading the child's address")?;
    let (kids, fields) = fields;
    let fields = fields?;
    let addr: SocketAddr = fields[0].parse().context("the child's address")?;
    let cert = launch::unhex(&fields[1]).map_err(|e| anyhow!("{e}"))?;
    let transport = fabric_opts().transport().map_err(|e| anyhow!("{e}"))?;
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(cert.into()).context("trusting the certificate")?;
    let mut cc = quinn::ClientConfig::with_root_certificates(Arc::new(roots))
        .context("quinn client config")?;
    cc.transport_config(transport);
    let mut client = quinn_endpoint(t, None)?;
    client.set_default_client_config(cc);
    let conn = client
        .connect(addr, "localhost")
        .context("connecting")?
        .await
        .context("handshake")?;
    let (mut s, mut r) = conn.open_bi().await.context("opening a stream")?;
    let buf = vec![1u8; bytes];
    let mut ack = [0u8; 1];
    let mut m = Meter::start();
    for i in 0..=reps {
        let t = Instant::now();
        s.write_all(&buf).await.context("writing")?;
        r.read_exact(&mut ack).await.context("reading the ack")?;
        if i > 0 {
            m.timed += t.elapsed();
        }
    }
    let (kids, child) = tokio::task::spawn_blocking(move || {
        let c = child_cpu(&kids);
        (kids, c)
    })
    .await
    .context("reading the child's CPU time")?;
    let res = m.done(bytes, reps, child);
    s.finish().ok();
    let _ = r.read_to_end(16).await;
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    finish(kids).await?;
    Ok(res)
}

/// A quinn endpoint on 127.0.0.1: quinn's own socket, or (for
/// [`Transport::BareQuinnBigSockets`]) one with the fabric's socket buffers.
fn quinn_endpoint(t: Transport, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let sock = std::net::UdpSocket::bind(localhost()).context("binding UDP")?;
    if t == Transport::BareQuinnBigSockets {
        let n = fabric_opts().socket_buffer_bytes;
        let state = quinn::udp::UdpSocketState::new((&sock).into())?;
        state.set_recv_buffer_size((&sock).into(), n)?;
        state.set_send_buffer_size((&sock).into(), n)?;
    }
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let endpoint = fabric_opts().endpoint().map_err(|e| anyhow!("{e}"))?;
    quinn::Endpoint::new(endpoint, server, sock, runtime).context("a quinn endpoint")
}

fn tcp_sender(cmd: Command, bytes: usize, reps: usize) -> Result<P2p> {
    let mut cmd = Some(cmd);
    let kids = Children::spawn_raw(vec![1], |_| {
        cmd.take().unwrap_or_else(|| Command::new("false"))
    })
    .map_err(|e| anyhow!("{e}"))?;
    let addr: SocketAddr = child_fields(&kids, &["addr"])?[0]
        .parse()
        .context("the child's address")?;
    let mut c = TcpStream::connect(addr).context("connecting")?;
    c.set_nodelay(true)?;
    let buf = vec![1u8; bytes];
    let mut ack = [0u8; 1];
    let mut m = Meter::start();
    for i in 0..=reps {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut ack)?;
        if i > 0 {
            m.timed += t.elapsed();
        }
    }
    let res = m.done(bytes, reps, child_cpu(&kids));
    let status = kids.wait(DEADLINE).map_err(|e| anyhow!("{e}"))?;
    ensure!(
        status.iter().all(|s| s.success()),
        "the receiving process failed: {status:?}"
    );
    ensure!(m.timed > Duration::ZERO, "no time measured");
    Ok(res)
}

/// The receiving child: `spec` is `<transport>,<bytes>,<reps>`.
pub async fn run_worker(spec: &str) -> Result<()> {
    let mut parts = spec.split(',');
    let (Some(t), Some(b), Some(r), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("--p2p-worker takes <transport>,<bytes>,<reps>, got {spec:?}");
    };
    let t = Transport::parse(t)?;
    let bytes: usize = b.parse().context("bytes")?;
    let reps: usize = r.parse().context("reps")?;
    match t {
        Transport::Fabric => fabric_receiver(bytes, reps).await,
        Transport::BareQuinn | Transport::BareQuinnBigSockets => {
            bare_receiver(t, bytes, reps).await
        }
        Transport::Tcp => tokio::task::spawn_blocking(move || tcp_receiver(bytes, reps))
            .await
            .context("joining the TCP receiver")?,
    }
}

async fn fabric_receiver(bytes: usize, reps: usize) -> Result<()> {
    let b = launch::child_mesh(localhost(), fabric_opts())
        .await
        .map_err(|e| anyhow!("joining the sender: {e}"))?;
    let cpu = cpu_secs();
    for i in 0..=reps as u64 {
        let p = b.recv(0, Tag::new(7, i), DEADLINE).await?;
        if p.byte_len() != bytes / 4 * 4 {
            return Err(FabricError::Transport {
                rank: 0,
                why: format!("{} bytes arrived", p.byte_len()),
            }
            .into());
        }
        b.send(0, Tag::new(8, i), Payload::Bytes(vec![1])).await?;
    }
    report_cpu(cpu)?;
    b.shutdown().await;
    Ok(())
}

async fn bare_receiver(t: Transport, bytes: usize, reps: usize) -> Result<()> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .context("a self-signed certificate")?;
    let cert = ck.cert.der().clone();
    let key = quinn::rustls::pki_types::PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
    let transport = fabric_opts().transport().map_err(|e| anyhow!("{e}"))?;
    let mut sc = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key.into())
        .context("quinn server config")?;
    sc.transport_config(transport);
    let server = quinn_endpoint(t, Some(sc))?;
    launch::child_send_line(&format!("addr {}", server.local_addr()?))?;
    launch::child_send_line(&format!("cert {}", launch::hex(&cert)))?;
    let incoming = server.accept().await.context("no connection")?;
    let conn = incoming.await.context("accepting")?;
    let (mut s, mut r) = conn.accept_bi().await.context("accepting a stream")?;
    let mut buf = vec![0u8; bytes];
    let cpu = cpu_secs();
    for _ in 0..=reps {
        r.read_exact(&mut buf).await.context("reading")?;
        s.write_all(&[1]).await.context("acknowledging")?;
    }
    report_cpu(cpu)?;
    s.finish().ok();
    conn.closed().await;
    server.wait_idle().await;
    Ok(())
}

fn tcp_receiver(bytes: usize, reps: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding")?;
    launch::child_send_line(&format!("addr {}", listener.local_addr()?))?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; bytes];
    let cpu = cpu_secs();
    for _ in 0..=reps {
        s.read_exact(&mut buf)?;
        s.write_all(&[1])?;
    }
    report_cpu(cpu)?;
    Ok(())
}
