//! The bench's modelled network link: the in-process hub behind per-rank egress ports that
//! delay the expert all-to-all (its dispatches and combines, [`is_all_to_all`]) on the wall
//! clock (see the parent module's doc).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flotilla_actors::wire::is_all_to_all;
use flotilla_runtime::fabric::inproc::{InprocFabric, InprocHub};
use flotilla_runtime::fabric::{BoxFuture, Fabric, FabricError, Inbox, Payload, Rank, Tag};
use tokio::runtime::Handle;

// The modelled link.

/// A message on its way: delivered to the hub at `at`.
struct InFlight {
    at: Instant,
    seq: u64,
    src: Rank,
    dst: Rank,
    tag: Tag,
    payload: Payload,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Default)]
struct LinkState {
    /// Bytes per second of every egress port; `None`: free (no delay at all).
    bytes_per_s: Option<f64>,
    latency: Duration,
    egress_free: Vec<Option<Instant>>,
    /// Modelled seconds each rank's egress port was busy, since the last `take`.
    busy_s: Vec<f64>,
    /// EP bytes each rank sent, since the last `take`.
    bytes: Vec<u64>,
    /// Per (rank, all-to-all tag): bytes the rank sent, and the largest message it received.
    xfer: HashMap<(Rank, Tag), (u64, u64)>,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// Sum and maximum of how late deliveries were against their modelled arrival.
    late_sum_s: f64,
    late_max_s: f64,
    delivered: u64,
    /// Every modelled message, while recording (`DelayNet::record`).
    log: Option<Vec<Wire>>,
    /// A delivery due within this long is waited for by spinning, not sleeping.
    spin: Duration,
    shutdown: bool,
}

/// One modelled message: posted by `src` at `posted`, on `src`'s egress port from `start` to
/// `left`, due at `dst` at `due` (`left` + latency).
#[derive(Debug, Clone)]
pub struct Wire {
    pub src: Rank,
    pub dst: Rank,
    pub tag: u64,
    pub bytes: u64,
    pub posted: Instant,
    pub start: Instant,
    pub left: Instant,
    pub due: Instant,
}

struct Shared {
    hub: Arc<InprocHub>,
    state: Mutex<LinkState>,
    wake: Condvar,
    rt: Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The in-process hub behind a modelled wall-clock link on the expert all-to-all channel.
pub struct DelayNet {
    shared: Arc<Shared>,
    nic: Option<JoinHandle<()>>,
}

/// What a rank's link did since the last [`DelayNet::take`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkUse {
    /// Modelled seconds the rank's egress port was busy.
    pub busy_s: f64,
    /// EP bytes the rank sent.
    pub bytes: u64,
    /// Σ over the rank's all-to-alls of the longer side: what it sends (serialized on its port)
    /// or the largest message it receives. An all-to-all cannot end sooner on this link.
    pub a2a_bytes: u64,
    /// `a2a_bytes` in seconds on the link (0 on a free link).
    pub a2a_s: f64,
}

impl DelayNet {
    /// A network of `world` ranks; `bytes_per_s = None` is a free link.
    pub fn new(world: usize, bytes_per_s: Option<f64>, latency: Duration, rt: Handle) -> Self {
        let shared = Arc::new(Shared {
            hub: InprocHub::new(world),
            state: Mutex::new(LinkState {
                bytes_per_s,
                latency,
                egress_free: vec![None; world],
                busy_s: vec![0.0; world],
                bytes: vec![0; world],
                ..LinkState::default()
            }),
            wake: Condvar::new(),
            rt,
        });
        let s = shared.clone();
        let nic = std::thread::Builder::new()
            .name("bench-nic".into())
            .spawn(move || {
                super::affinity::precise_timers();
                deliver_loop(&s)
            })
            .ok();
        DelayNet { shared, nic }
    }

    pub fn hub(&self) -> &Arc<InprocHub> {
        &self.shared.hub
    }

    /// The endpoint of `rank`.
    pub fn endpoint(&self, rank: Rank) -> DelayFabric {
        DelayFabric {
            inner: self.shared.hub.endpoint(rank),
            net: self.shared.clone(),
        }
    }

    /// `rank`'s link use since the last call, and reset it.
    pub fn take(&self, rank: Rank) -> LinkUse {
        let mut st = self.shared.lock();
        let mut a2a_bytes = 0;
        st.xfer.retain(|&(r, _), &mut (out, inn)| {
            if r == rank {
                a2a_bytes += out.max(inn);
            }
            r != rank
        });
        let u = LinkUse {
            busy_s: st.busy_s.get(rank).copied().unwrap_or(0.0),
            bytes: st.bytes.get(rank).copied().unwrap_or(0),
            a2a_bytes,
            a2a_s: st
                .bytes_per_s
                .filter(|b| *b > 0.0)
                .map_or(0.0, |b| a2a_bytes as f64 / b),
        };
        if let Some(b) = st.busy_s.get_mut(rank) {
            *b = 0.0;
        }
        if let Some(b) = st.bytes.get_mut(rank) {
            *b = 0;
        }
        u
    }

    /// Set the link's bandwidth (`None`: a free link) for the messages sent from now on.
    pub fn set_bandwidth(&self, bytes_per_s: Option<f64>) {
        self.shared.lock().bytes_per_s = bytes_per_s;
    }

    /// Spin for deliveries due within `d` instead of sleeping (waking from a sleep is late by
    /// tens of microseconds); only worth it where the delivery thread has a core of its own.
    pub fn spin_for(&self, d: Duration) {
        self.shared.lock().spin = d;
    }

    /// Start (or stop) logging every modelled message; the log so far is dropped.
    pub fn record(&self, on: bool) {
        self.shared.lock().log = on.then(Vec::new);
    }

    /// The messages logged since [`DelayNet::record`].
    pub fn log(&self) -> Vec<Wire> {
        self.shared.lock().log.clone().unwrap_or_default()
    }

    /// Mean and maximum lateness of deliveries against the model (seconds), and their count.
    pub fn lateness(&self) -> (f64, f64, u64) {
        let st = self.shared.lock();
        (
            st.late_sum_s / st.delivered.max(1) as f64,
            st.late_max_s,
            st.delivered,
        )
    }
}

impl Drop for DelayNet {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.nic.take() {
            let _ = h.join();
        }
    }
}

/// The delivery thread: hands each message to the hub at its modelled arrival time.
fn deliver_loop(s: &Shared) {
    let mut st = s.lock();
    loop {
        let now = Instant::now();
        let due = match st.queue.peek() {
            None if st.shutdown => return,
            None => None,
            Some(Reverse(m)) => Some(m.at),
        };
        match due {
            Some(at) if at <= now => {
                let Some(Reverse(m)) = st.queue.pop() else {
                    continue;
                };
                let late = now.saturating_duration_since(m.at).as_secs_f64();
                st.late_sum_s += late;
                st.late_max_s = st.late_max_s.max(late);
                st.delivered += 1;
                drop(st);
                // A failed destination drops the message, as a dead NIC would.
                let _ =
                    s.rt.block_on(s.hub.endpoint(m.src).send(m.dst, m.tag, m.payload));
                st = s.lock();
            }
            Some(at) if at - now <= st.spin => {
                // Spin without the lock: senders may queue meanwhile (an earlier arrival is
                // seen on the next turn, which is at most `spin` away).
                drop(st);
                while Instant::now() < at {
                    std::hint::spin_loop();
                }
                st = s.lock();
            }
            Some(at) => {
                let sleep = at - now - st.spin;
                st = s
                    .wake
                    .wait_timeout(st, sleep)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            None => {
                st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// One rank's endpoint on a [`DelayNet`].
#[derive(Clone)]
pub struct DelayFabric {
    inner: InprocFabric,
    net: Arc<Shared>,
}

impl std::fmt::Debug for DelayFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayFabric")
            .field("rank", &self.inner.rank())
            .finish()
    }
}

impl Fabric for DelayFabric {
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
        let src = self.rank();
        if !is_all_to_all(tag) || dst == src || dst >= self.world() {
            return self.inner.send(dst, tag, payload);
        }
        let bytes = payload.byte_len();
        let mut st = self.net.lock();
        st.bytes[src] += bytes as u64;
        st.xfer.entry((src, tag)).or_default().0 += bytes as u64;
        let got = &mut st.xfer.entry((dst, tag)).or_default().1;
        *got = (*got).max(bytes as u64);
        let Some(bw) = st.bytes_per_s.filter(|b| *b > 0.0) else {
            drop(st);
            return self.inner.send(dst, tag, payload);
        };
        let wire = bytes as f64 / bw;
        let now = Instant::now();
        let start = st.egress_free[src].map_or(now, |f| f.max(now));
        let left = start + Duration::from_secs_f64(wire);
        st.egress_free[src] = Some(left);
        st.busy_s[src] += wire;
        let at = left + st.latency;
        if let Some(log) = st.log.as_mut() {
            log.push(Wire {
                src,
                dst,
                tag: tag.tag,
                bytes: bytes as u64,
                posted: now,
                start,
                left,
                due: at,
            });
        }
        st.seq += 1;
        let seq = st.seq;
        st.queue.push(Reverse(InFlight {
            at,
            seq,
            src,
            dst,
            tag,
            payload,
        }));
        drop(st);
        self.net.wake.notify_all();
        Box::pin(std::future::ready(Ok(())))
    }
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>> {
        self.inner.recv(src, tag, deadline)
    }
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError> {
        // Delayed messages reach the hub at their arrival time, and a subscription with it.
        self.inner.subscribe(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(5);

    /// An all-to-all message's tag: a dispatch of micro-batch `chunk`.
    fn ep(chunk: u64) -> Tag {
        use flotilla_actors::wire::{Key, Kind, SHARD_CHANNEL};
        Key::new(0, 0, chunk as usize, 0, Kind::Dispatch).tag(SHARD_CHANNEL)
    }

    #[test]
    fn ep_messages_take_bytes_over_bandwidth_and_queue_on_the_egress_port() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let net = DelayNet::new(2, Some(1e8), Duration::ZERO, rt.handle().clone());
        let (a, b) = (net.endpoint(0), net.endpoint(1));
        let t0 = Instant::now();
        for tag in [1, 2] {
            rt.block_on(a.send(1, ep(tag), Payload::Bytes(vec![0; 4_000_000])))
                .expect("send");
        }
        // `send` does not wait for the wire.
        assert!(
            t0.elapsed() < Duration::from_millis(20),
            "{:?}",
            t0.elapsed()
        );
        rt.block_on(b.recv(0, ep(1), S)).expect("first");
        let first = t0.elapsed();
        rt.block_on(b.recv(0, ep(2), S)).expect("second");
        let second = t0.elapsed();
        // 4 MB at 100 MB/s is 40 ms on the wire; the second waits for the first to leave. (The
        // upper bounds leave room for a loaded CI machine.)
        assert!(
            first >= Duration::from_millis(40) && first < Duration::from_millis(400),
            "{first:?}"
        );
        assert!(
            second >= Duration::from_millis(80) && second < Duration::from_millis(600),
            "{second:?}"
        );
        let u = net.take(0);
        assert_eq!((u.bytes, u.a2a_bytes), (8_000_000, 8_000_000));
        assert!((u.busy_s - 0.08).abs() < 1e-9);
        assert!((u.a2a_s - 0.08).abs() < 1e-9);
        // The receiver's all-to-alls take as long: it waits for the bytes.
        let u = net.take(1);
        assert_eq!((u.bytes, u.a2a_bytes), (0, 8_000_000));
        // Other channels pass straight through and are not counted.
        let t1 = Instant::now();
        rt.block_on(a.send(1, Tag::new(1, 0), Payload::Bytes(vec![0; 4_000_000])))
            .expect("send");
        rt.block_on(b.recv(0, Tag::new(1, 0), S)).expect("recv");
        assert!(t1.elapsed() < Duration::from_millis(40));
        assert_eq!(net.take(0).bytes, 0);
    }

    #[test]
    fn a_symmetric_exchange_costs_one_transfer_per_round() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let net = DelayNet::new(2, Some(1e9), Duration::ZERO, rt.handle().clone());
        let rounds = 20u64;
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for r in 0..2 {
                let (net, h) = (&net, rt.handle().clone());
                s.spawn(move || {
                    let f = net.endpoint(r);
                    for i in 0..rounds {
                        h.block_on(f.send(1 - r, ep(i), Payload::F32(vec![0.0; 250_000])))
                            .expect("send");
                        h.block_on(f.recv(1 - r, ep(i), S)).expect("recv");
                    }
                });
            }
        });
        // 20 rounds of 1 ms each way at once: at least 20 ms of wire time, and each port busy
        // for 20 ms, not 40 (the exact accounting below; wall time only bounds it from below, as a
        // loaded machine may add any delay).
        let dt = t0.elapsed().as_secs_f64();
        assert!(dt >= 0.020, "{dt}");
        let u = net.take(0);
        assert!((u.busy_s - 0.020).abs() < 1e-9);
        assert_eq!(u.a2a_bytes, 20_000_000);
    }
}
