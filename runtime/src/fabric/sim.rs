//! The simulated fabric: the in-process fabric behind modelled links, on virtual time.
//!
//! A message of `b` bytes from rank `s` to rank `d` occupies `s`'s egress and `d`'s ingress
//! for `b / bandwidth` (the link's bandwidth: intra-host or inter-host), starting when both are
//! free, and arrives `latency` after it finished. Queuing per port is what makes contention
//! show: eight ranks sending to one receiver take eight times as long. The sender's `send`
//! completes when its bytes have left (like a NIC's send completion); delivery is a spawned task.
//! Run it under a paused tokio clock; like [`crate::clock::VirtualClock`], it runs dilated
//! (modelled durations are multiplied by [`crate::clock::DILATION`] before sleeping, and receive
//! deadlines too), so microsecond latencies survive tokio's millisecond timer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::dilate;

use super::inproc::{InprocFabric, InprocHub};
use super::{BoxFuture, Fabric, FabricError, Inbox, Payload, Rank, Tag};

/// The physics of the simulated links.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkModel {
    /// Host of each rank (`host_of[rank]`).
    pub host_of: Vec<usize>,
    /// Bandwidth between ranks of one host, bytes per second.
    pub intra_host_bytes_per_s: f64,
    /// Bandwidth between hosts, bytes per second.
    pub inter_host_bytes_per_s: f64,
    /// One-way latency of every message.
    pub latency: Duration,
}

impl LinkModel {
    /// Time on the wire for `bytes` from `src` to `dst`.
    pub fn transfer_time(&self, src: Rank, dst: Rank, bytes: usize) -> Duration {
        let same_host = self.host_of.get(src) == self.host_of.get(dst);
        let bw = if same_host {
            self.intra_host_bytes_per_s
        } else {
            self.inter_host_bytes_per_s
        };
        if bw <= 0.0 || src == dst {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 / bw)
    }
}

#[derive(Debug)]
struct Ports {
    egress_free: Vec<Instant>,
    ingress_free: Vec<Instant>,
}

/// Shared state of a simulated network: the hub, the link model and each rank's port queues.
#[derive(Debug)]
pub struct SimNetwork {
    hub: Arc<InprocHub>,
    model: LinkModel,
    ports: Mutex<Ports>,
}

impl SimNetwork {
    /// A network for `model.host_of.len()` ranks.
    pub fn new(model: LinkModel) -> Arc<Self> {
        let world = model.host_of.len();
        let now = Instant::now();
        Arc::new(Self {
            hub: InprocHub::new(world),
            ports: Mutex::new(Ports {
                egress_free: vec![now; world],
                ingress_free: vec![now; world],
            }),
            model,
        })
    }

    /// All endpoints, rank order.
    pub fn endpoints(self: &Arc<Self>) -> Vec<SimFabric> {
        (0..self.model.host_of.len())
            .map(|r| SimFabric {
                inner: self.hub.endpoint(r),
                net: Arc::clone(self),
            })
            .collect()
    }

    /// The hub underneath (to inject failures).
    pub fn hub(&self) -> &Arc<InprocHub> {
        &self.hub
    }

    /// Reserve the ports for a transfer; returns when it finishes leaving the sender.
    fn reserve(&self, src: Rank, dst: Rank, bytes: usize) -> Instant {
        let wire = self.model.transfer_time(src, dst, bytes);
        let mut p = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (Some(&e), Some(&i)) = (p.egress_free.get(src), p.ingress_free.get(dst)) else {
            return now;
        };
        let start = now.max(e).max(i);
        let done = start + dilate(wire);
        p.egress_free[src] = done;
        p.ingress_free[dst] = done;
        done
    }
}

/// One rank's endpoint on a [`SimNetwork`].
#[derive(Debug, Clone)]
pub struct SimFabric {
    inner: InprocFabric,
    net: Arc<SimNetwork>,
}

impl Fabric for SimFabric {
    fn rank(&self) -> Rank {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send(
        &self,
        dst: Rank,
        tag: Tag,
        payload: Payload,
    ) -> BoxFuture<'_, Result<(), FabricError>> {
        Box::pin(async move {
            if dst >= self.world() {
                return Err(FabricError::NoSuchRank {
                    rank: dst,
                    world: self.world(),
                });
            }
            let left = self.net.reserve(self.rank(), dst, payload.byte_len());
            tokio::time::sleep_until(left).await;
            let arrive = left + dilate(self.net.model.latency);
            let inner = self.inner.clone();
            // Delivery after the latency must not hold up the sender.
            tokio::spawn(async move {
                tokio::time::sleep_until(arrive).await;
                // A failed destination drops the message, as a dead NIC would.
                let _ = inner.send(dst, tag, payload).await;
            });
            Ok(())
        })
    }
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>> {
        self.inner.recv(src, tag, dilate(deadline))
    }
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError> {
        self.inner.subscribe(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::undilate;

    fn net(world: usize, per_host: usize) -> Arc<SimNetwork> {
        SimNetwork::new(LinkModel {
            host_of: (0..world).map(|r| r / per_host).collect(),
            intra_host_bytes_per_s: 100e9,
            inter_host_bytes_per_s: 1e9,
            latency: Duration::from_micros(10),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn transfer_takes_latency_plus_bytes_over_bandwidth() {
        let n = net(2, 1);
        let eps = n.endpoints();
        let t0 = Instant::now();
        eps[0]
            .send(1, Tag::new(0, 0), Payload::Bytes(vec![0; 1_000_000]))
            .await
            .expect("send");
        eps[1]
            .recv(0, Tag::new(0, 0), Duration::from_secs(1))
            .await
            .expect("recv");
        assert_eq!(
            undilate(Instant::now() - t0),
            Duration::from_micros(1000 + 10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn incast_queues_at_the_receiver() {
        let n = net(4, 1);
        let eps = n.endpoints();
        let t0 = Instant::now();
        let mut hs = Vec::new();
        for e in &eps[1..] {
            let e = e.clone();
            hs.push(tokio::spawn(async move {
                e.send(0, Tag::new(0, 0), Payload::Bytes(vec![0; 1_000_000]))
                    .await
            }));
        }
        for h in hs {
            h.await.expect("join").expect("send");
        }
        for src in 1..4 {
            eps[0]
                .recv(src, Tag::new(0, 0), Duration::from_secs(1))
                .await
                .expect("recv");
        }
        // Three 1 ms transfers serialised on rank 0's ingress, then the latency.
        assert_eq!(
            undilate(Instant::now() - t0),
            Duration::from_micros(3000 + 10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn intra_host_is_faster() {
        let n = net(2, 2);
        assert_eq!(
            n.model.transfer_time(0, 1, 100_000_000),
            Duration::from_millis(1)
        );
    }
}
