//! The in-process fabric: every rank is an endpoint on one shared hub, and a send moves the
//! buffer into the receiver's mailbox (no copy).
//!
//! Mailboxes are keyed by (source, destination, tag) and hold either queued messages or one
//! waiting receiver; empty mailboxes are removed, so tags may grow without bound. Marking a rank
//! failed wakes every receive that waits on it with [`FabricError::PeerFailed`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use super::{BoxFuture, Delivery, Fabric, FabricError, Inbox, Payload, Rank, Tag};

type Key = (Rank, Rank, Tag);

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Payload>,
    waiter: Option<oneshot::Sender<Payload>>,
}

#[derive(Default)]
struct HubState {
    boxes: HashMap<Key, Mailbox>,
    failed: BTreeMap<Rank, String>,
    /// Channel subscriptions, by (receiving rank, channel).
    subs: HashMap<(Rank, u32), UnboundedSender<Delivery>>,
    closed: bool,
}

/// The shared hub behind all endpoints of one job.
#[derive(Default)]
pub struct InprocHub {
    world: usize,
    state: Mutex<HubState>,
}

impl std::fmt::Debug for InprocHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InprocHub")
            .field("world", &self.world)
            .finish()
    }
}

impl InprocHub {
    /// A hub for `world` ranks.
    pub fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            world,
            state: Mutex::new(HubState::default()),
        })
    }

    /// All endpoints, rank order.
    pub fn endpoints(self: &Arc<Self>) -> Vec<InprocFabric> {
        (0..self.world).map(|r| self.endpoint(r)).collect()
    }

    /// The endpoint of `rank`.
    pub fn endpoint(self: &Arc<Self>, rank: Rank) -> InprocFabric {
        InprocFabric {
            rank,
            hub: Arc::clone(self),
        }
    }

    /// Mark `rank` failed: receives from it fail now and later, sends to it fail, and every
    /// subscriber is told.
    pub fn fail_rank(&self, rank: Rank, why: impl Into<String>) {
        let mut st = self.lock();
        let why = why.into();
        st.failed.insert(rank, why.clone());
        // Dropping a waiter's sender wakes it; it then finds the failure.
        for ((src, _, _), mb) in st.boxes.iter_mut() {
            if *src == rank {
                mb.waiter = None;
            }
        }
        st.subs.retain(|_, tx| {
            tx.send(Delivery::PeerFailed {
                rank,
                why: why.clone(),
            })
            .is_ok()
        });
    }

    /// Subscribe `rank` to `channel` (see [`Fabric::subscribe`]).
    fn subscribe(&self, rank: Rank, channel: u32) -> Result<Inbox, FabricError> {
        let mut st = self.lock();
        if st.closed {
            return Err(FabricError::Closed);
        }
        let (tx, rx) = unbounded_channel();
        // Messages that came before: their mailboxes, each in order (tags sorted, so the
        // order does not depend on the hash map's).
        let mut waiting: Vec<Key> = st
            .boxes
            .iter()
            .filter(|((_, dst, tag), mb)| {
                *dst == rank && tag.channel == channel && !mb.queue.is_empty()
            })
            .map(|(k, _)| *k)
            .collect();
        waiting.sort_unstable();
        for key in waiting {
            if let Some(mb) = st.boxes.remove(&key) {
                for payload in mb.queue {
                    let _ = tx.send(Delivery::Message {
                        src: key.0,
                        tag: key.2,
                        payload,
                    });
                }
            }
        }
        for (&r, why) in &st.failed {
            let _ = tx.send(Delivery::PeerFailed {
                rank: r,
                why: why.clone(),
            });
        }
        st.subs.insert((rank, channel), tx);
        Ok(rx)
    }

    /// Start the hub's traffic afresh, for a job rolled back to a checkpoint: forget every
    /// failure mark and every undelivered message (from the attempt that failed; the steps
    /// that follow reuse its tags). A receive still waiting is woken and fails with
    /// [`FabricError::Closed`]. A closed hub stays closed.
    pub fn reset(&self) {
        let mut st = self.lock();
        st.failed.clear();
        st.boxes.clear();
    }

    /// Close the hub: every pending and later operation fails with [`FabricError::Closed`],
    /// and every subscription's inbox closes.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for mb in st.boxes.values_mut() {
            mb.waiter = None;
        }
        st.subs.clear();
    }

    /// Number of live mailboxes (for tests: tags must not leak).
    pub fn mailboxes(&self) -> usize {
        self.lock().boxes.len()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, st: &HubState, peer: Rank) -> Result<(), FabricError> {
        if st.closed {
            return Err(FabricError::Closed);
        }
        if peer >= self.world {
            return Err(FabricError::NoSuchRank {
                rank: peer,
                world: self.world,
            });
        }
        if let Some(why) = st.failed.get(&peer) {
            return Err(FabricError::PeerFailed {
                rank: peer,
                why: why.clone(),
            });
        }
        Ok(())
    }

    fn deliver(&self, key: Key, payload: Payload) -> Result<(), FabricError> {
        let mut st = self.lock();
        self.check(&st, key.1)?;
        let payload = match st.subs.get(&(key.1, key.2.channel)) {
            Some(tx) => match tx.send(Delivery::Message {
                src: key.0,
                tag: key.2,
                payload,
            }) {
                Ok(()) => return Ok(()),
                // The subscriber is gone: back to the mailboxes.
                Err(e) => {
                    st.subs.remove(&(key.1, key.2.channel));
                    match e.0 {
                        Delivery::Message { payload, .. } => payload,
                        Delivery::PeerFailed { .. } => return Ok(()),
                    }
                }
            },
            None => payload,
        };
        let mb = st.boxes.entry(key).or_default();
        let payload = match mb.waiter.take() {
            Some(w) => match w.send(payload) {
                Ok(()) => {
                    if mb.queue.is_empty() {
                        st.boxes.remove(&key);
                    }
                    return Ok(());
                }
                // The receiver gave up (deadline) between registering and now: queue it.
                Err(p) => p,
            },
            None => payload,
        };
        mb.queue.push_back(payload);
        Ok(())
    }

    async fn take(&self, key: Key, deadline: Duration) -> Result<Payload, FabricError> {
        let rx = {
            let mut st = self.lock();
            if let Some(p) = Self::pop(&mut st, key) {
                return Ok(p);
            }
            self.check(&st, key.0)?;
            let mb = st.boxes.entry(key).or_default();
            if mb.waiter.is_some() {
                return Err(FabricError::Transport {
                    rank: key.0,
                    why: format!("two concurrent receives on tag {}", key.2),
                });
            }
            let (tx, rx) = oneshot::channel();
            mb.waiter = Some(tx);
            rx
        };
        let mut rx = rx;
        match tokio::time::timeout(deadline, &mut rx).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => {
                // Woken by failure or close.
                let mut st = self.lock();
                if let Some(p) = Self::pop(&mut st, key) {
                    return Ok(p);
                }
                self.check(&st, key.0)?;
                Err(FabricError::Closed)
            }
            Err(_) => {
                let mut st = self.lock();
                if let Some(mb) = st.boxes.get_mut(&key) {
                    mb.waiter = None;
                }
                // A message may have landed in our slot just before we gave up.
                if let Ok(p) = rx.try_recv() {
                    return Ok(p);
                }
                if let Some(p) = Self::pop(&mut st, key) {
                    return Ok(p);
                }
                st.boxes.remove(&key);
                Err(FabricError::Timeout {
                    src: key.0,
                    tag: key.2,
                    after: deadline,
                })
            }
        }
    }

    fn pop(st: &mut HubState, key: Key) -> Option<Payload> {
        let mb = st.boxes.get_mut(&key)?;
        let p = mb.queue.pop_front();
        if mb.queue.is_empty() && mb.waiter.is_none() {
            st.boxes.remove(&key);
        }
        p
    }
}

/// One rank's endpoint on an [`InprocHub`].
#[derive(Debug, Clone)]
pub struct InprocFabric {
    rank: Rank,
    hub: Arc<InprocHub>,
}

impl InprocFabric {
    /// The hub this endpoint belongs to.
    pub fn hub(&self) -> &Arc<InprocHub> {
        &self.hub
    }
}

impl Fabric for InprocFabric {
    fn rank(&self) -> Rank {
        self.rank
    }
    fn world(&self) -> usize {
        self.hub.world
    }
    fn send(
        &self,
        dst: Rank,
        tag: Tag,
        payload: Payload,
    ) -> BoxFuture<'_, Result<(), FabricError>> {
        let r = self.hub.deliver((self.rank, dst, tag), payload);
        Box::pin(std::future::ready(r))
    }
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>> {
        Box::pin(self.hub.take((src, self.rank, tag), deadline))
    }
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError> {
        self.hub.subscribe(self.rank, channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn moves_buffers_without_copy_and_keeps_fifo() {
        let hub = InprocHub::new(2);
        let eps = hub.endpoints();
        let data = vec![1.0f32; 1024];
        let ptr = data.as_ptr();
        eps[0]
            .send(1, Tag::new(0, 7), Payload::F32(data))
            .await
            .expect("send");
        eps[0]
            .send(1, Tag::new(0, 7), Payload::Bytes(vec![9]))
            .await
            .expect("send");
        let got = eps[1]
            .recv(0, Tag::new(0, 7), T)
            .await
            .expect("recv")
            .into_f32()
            .expect("f32");
        assert_eq!(got.as_ptr(), ptr, "the buffer moved, not copied");
        let b = eps[1].recv(0, Tag::new(0, 7), T).await.expect("recv");
        assert_eq!(b, Payload::Bytes(vec![9]));
        assert_eq!(hub.mailboxes(), 0);
    }

    #[tokio::test]
    async fn receiver_waiting_first_gets_message() {
        let hub = InprocHub::new(2);
        let eps = hub.endpoints();
        let rx = eps[1].clone();
        let h = tokio::spawn(async move { rx.recv(0, Tag::new(1, 1), T).await });
        tokio::task::yield_now().await;
        eps[0]
            .send(1, Tag::new(1, 1), Payload::Bytes(vec![1, 2]))
            .await
            .expect("send");
        assert_eq!(
            h.await.expect("join").expect("recv"),
            Payload::Bytes(vec![1, 2])
        );
        assert_eq!(hub.mailboxes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_names_the_peer() {
        let hub = InprocHub::new(3);
        let e = hub.endpoint(0);
        let err = e.recv(2, Tag::new(0, 5), Duration::from_millis(10)).await;
        assert!(
            matches!(err, Err(FabricError::Timeout { src: 2, .. })),
            "{err:?}"
        );
        assert_eq!(hub.mailboxes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_peer_wakes_waiters() {
        let hub = InprocHub::new(2);
        let e = hub.endpoint(0);
        let h =
            tokio::spawn(async move { e.recv(1, Tag::new(0, 0), Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        hub.fail_rank(1, "killed by test");
        let r = h.await.expect("join");
        assert!(
            matches!(r, Err(FabricError::PeerFailed { rank: 1, .. })),
            "{r:?}"
        );
        let s = hub
            .endpoint(0)
            .send(1, Tag::new(0, 0), Payload::Bytes(vec![]))
            .await;
        assert!(matches!(s, Err(FabricError::PeerFailed { rank: 1, .. })));
    }

    #[tokio::test]
    async fn unknown_rank_is_an_error() {
        let hub = InprocHub::new(2);
        let s = hub
            .endpoint(0)
            .send(5, Tag::new(0, 0), Payload::Bytes(vec![]))
            .await;
        assert!(matches!(
            s,
            Err(FabricError::NoSuchRank { rank: 5, world: 2 })
        ));
    }

    #[tokio::test]
    async fn a_subscriber_gets_every_message_of_its_channel_and_failures() {
        let hub = InprocHub::new(3);
        let eps = hub.endpoints();
        // One message before the subscription, two after, one on another channel.
        eps[0]
            .send(2, Tag::new(5, 1), Payload::Bytes(vec![1]))
            .await
            .expect("send");
        let mut inbox = eps[2].subscribe(5).expect("subscribe");
        eps[1]
            .send(2, Tag::new(5, 9), Payload::Bytes(vec![2]))
            .await
            .expect("send");
        eps[0]
            .send(2, Tag::new(6, 1), Payload::Bytes(vec![3]))
            .await
            .expect("send");
        eps[0]
            .send(2, Tag::new(5, 1), Payload::Bytes(vec![4]))
            .await
            .expect("send");
        let mut got = Vec::new();
        for _ in 0..3 {
            match inbox.recv().await {
                Some(Delivery::Message { src, tag, payload }) => {
                    got.push((src, tag.tag, payload.into_bytes().expect("bytes")[0]))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, vec![(0, 1, 1), (1, 9, 2), (0, 1, 4)]);
        // The other channel still goes through recv.
        let p = eps[2].recv(0, Tag::new(6, 1), T).await.expect("recv");
        assert_eq!(p, Payload::Bytes(vec![3]));
        hub.fail_rank(1, "gone");
        assert!(matches!(
            inbox.recv().await,
            Some(Delivery::PeerFailed { rank: 1, .. })
        ));
        hub.close();
        assert!(
            inbox.recv().await.is_none(),
            "closing the hub closes the inbox"
        );
    }

    #[tokio::test]
    async fn reset_forgets_failures_and_stale_messages() {
        let hub = InprocHub::new(2);
        let eps = hub.endpoints();
        eps[0]
            .send(1, Tag::new(0, 7), Payload::Bytes(vec![1]))
            .await
            .expect("send");
        hub.fail_rank(0, "died");
        hub.reset();
        assert_eq!(hub.mailboxes(), 0, "the stale message is gone");
        eps[0]
            .send(1, Tag::new(0, 7), Payload::Bytes(vec![2]))
            .await
            .expect("rank 0 may send again");
        let got = eps[1].recv(0, Tag::new(0, 7), T).await.expect("receive");
        assert!(matches!(got, Payload::Bytes(b) if b == vec![2]));
    }
}
