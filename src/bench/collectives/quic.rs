//! The QUIC part of `flotilla bench collectives`: the QUIC fabric between endpoints on
//! 127.0.0.1, beside a bare single-stream quinn transfer of the same bytes (same transport
//! settings, server-only TLS) and a plain TCP loopback stream. Each transfer is `bytes` sent one
//! way and a one-byte acknowledgement back, repeated, after one untimed warm-up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use flotilla_runtime::fabric::quic::{QuicFabric, QuicOptions};
use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Tag};

const DEADLINE: Duration = Duration::from_secs(120);

fn mib_per_s(bytes: usize, reps: usize, total: Duration) -> f64 {
    (bytes * reps) as f64 / (1 << 20) as f64 / total.as_secs_f64()
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

/// MiB/s of `bytes` f32 payloads from rank 0 to rank 1 of a two-rank QUIC fabric.
pub async fn fabric_mib_per_s(bytes: usize, reps: usize) -> Result<f64> {
    let m = mesh(2).await?;
    let (a, b) = (Arc::clone(&m[0]), Arc::clone(&m[1]));
    let echo = tokio::spawn(async move {
        for i in 0..=reps as u64 {
            let p = b.recv(0, Tag::new(7, i), DEADLINE).await?;
            if p.byte_len() != bytes / 4 * 4 {
                return Err(FabricError::Transport {
                    rank: 0,
                    why: format!("{} bytes arrived", p.byte_len()),
                });
            }
            b.send(0, Tag::new(8, i), Payload::Bytes(vec![1])).await?;
        }
        Ok(())
    });
    let mut total = Duration::ZERO;
    for i in 0..=reps as u64 {
        let payload = Payload::F32(vec![1.0f32; bytes / 4]);
        let t = Instant::now();
        a.send(1, Tag::new(7, i), payload).await?;
        a.recv(1, Tag::new(8, i), DEADLINE).await?;
        if i > 0 {
            total += t.elapsed();
        }
    }
    echo.await.context("joining the receiving rank")??;
    close(m).await;
    Ok(mib_per_s(bytes, reps, total))
}

/// MiB/s of `bytes` over one bidirectional quinn stream between two endpoints on 127.0.0.1.
pub async fn bare_quinn_mib_per_s(bytes: usize, reps: usize) -> Result<f64> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .context("a self-signed certificate")?;
    let cert = ck.cert.der().clone();
    let key = quinn::rustls::pki_types::PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
    let transport = QuicOptions::default()
        .transport()
        .map_err(|e| anyhow!("{e}"))?;
    let mut sc = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key.into())
        .context("quinn server config")?;
    sc.transport_config(Arc::clone(&transport));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = quinn::Endpoint::server(sc, any).context("binding the quinn server")?;
    let addr = server.local_addr()?;
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(cert).context("trusting the certificate")?;
    let mut cc = quinn::ClientConfig::with_root_certificates(Arc::new(roots))
        .context("quinn client config")?;
    cc.transport_config(transport);
    let mut client = quinn::Endpoint::client(any).context("binding the quinn client")?;
    client.set_default_client_config(cc);

    let srv = tokio::spawn(async move {
        let incoming = server.accept().await.context("no connection")?;
        let conn = incoming.await.context("accepting")?;
        let (mut s, mut r) = conn.accept_bi().await.context("accepting a stream")?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..=reps {
            r.read_exact(&mut buf).await.context("reading")?;
            s.write_all(&[1]).await.context("acknowledging")?;
        }
        s.finish().ok();
        conn.closed().await;
        anyhow::Ok(())
    });
    let conn = client
        .connect(addr, "localhost")
        .context("connecting")?
        .await
        .context("handshake")?;
    let (mut s, mut r) = conn.open_bi().await.context("opening a stream")?;
    let buf = vec![1u8; bytes];
    let mut ack = [0u8; 1];
    let mut total = Duration::ZERO;
    for i in 0..=reps {
        let t = Instant::now();
        s.write_all(&buf).await.context("writing")?;
        r.read_exact(&mut ack).await.context("reading the ack")?;
        if i > 0 {
            total += t.elapsed();
        }
    }
    s.finish().ok();
    conn.close(0u32.into(), b"done");
    srv.await.context("joining the server")??;
    client.wait_idle().await;
    Ok(mib_per_s(bytes, reps, total))
}

/// MiB/s of `bytes` over a plain TCP stream on 127.0.0.1 (blocking sockets, no Nagle).
pub fn tcp_mib_per_s(bytes: usize, reps: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding")?;
    let addr = listener.local_addr()?;
    let srv = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..=reps {
            s.read_exact(&mut buf)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr).context("connecting")?;
    c.set_nodelay(true)?;
    let buf = vec![1u8; bytes];
    let mut ack = [0u8; 1];
    let mut total = Duration::ZERO;
    for i in 0..=reps {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut ack)?;
        if i > 0 {
            total += t.elapsed();
        }
    }
    let r = srv.join().map_err(|_| anyhow!("the TCP reader panicked"))?;
    r.context("the TCP reader")?;
    ensure!(total > Duration::ZERO, "no time measured");
    Ok(mib_per_s(bytes, reps, total))
}
