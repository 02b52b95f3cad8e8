//! The expert-parallel (EP) group as a MoE layer sees it: an all-to-all in two halves (post,
//! wait), behind a trait.
//!
//! The model crate holds no fabric and no async: the runtime implements [`ExpertExchange`] over
//! its communicator and hands a `&dyn ExpertExchange` to the layers through
//! [`crate::layers::Ctx::ep`]. With an exchange of size `P > 1`, rank `i` runs only the routed
//! experts [`experts_of`]`(E, P, i)`; the rest of the layer (router, shared experts, balance loss,
//! loads) stays on the token-owner. See [`crate::layers::moe`] for where the four all-to-alls go.

use std::ops::Range;

/// Which of a MoE layer's four all-to-alls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangePhase {
    /// Forward: token-owner → expert-owner, the per-expert row counts and the dispatched input
    /// rows, in one message.
    Dispatch,
    /// Forward: expert-owner → token-owner, the experts' output rows.
    Combine,
    /// B: token-owner → expert-owner, the gradient of the experts' output rows.
    GradDispatch,
    /// B: expert-owner → token-owner, the gradient of the experts' input rows.
    GradCombine,
}

/// The expert-parallel group as the MoE layer sees it: an all-to-all over the EP group in two
/// halves, so that the layer can compute something else while the bytes move.
/// Implementations live outside the model (the actors crate runs it over the fabric). A failed
/// exchange (dead peer, timeout) must not panic: [`ExpertExchange::wait`] returns what it has
/// (parts may be short, long or empty) and reports the failure to its owner out of band; the
/// layer reads what is missing as zeros and carries on.
pub trait ExpertExchange: Send + Sync + std::fmt::Debug {
    /// EP group size P (routed experts are split evenly: rank i owns experts i·E/P .. (i+1)·E/P).
    fn size(&self) -> usize;
    /// This rank's index in the EP group.
    fn index(&self) -> usize;
    /// Starts the all-to-all `(layer, phase)`: `send[p]` goes to peer p (`send[index()]` is this
    /// rank's own part, kept for [`ExpertExchange::wait`]). Returns without waiting for peers.
    fn post(&self, layer: usize, phase: ExchangePhase, send: Vec<Vec<f32>>);
    /// Completes the all-to-all `(layer, phase)` posted before: `recv[q]`, what peer q sent
    /// (any length; the layer's message format says what it holds).
    fn wait(&self, layer: usize, phase: ExchangePhase) -> Vec<Vec<f32>>;
}

/// The routed experts EP rank `rank` of `ranks` owns: `rank·E/P .. (rank+1)·E/P`.
pub fn experts_of(n_experts: usize, ranks: usize, rank: usize) -> Range<usize> {
    let ranks = ranks.max(1);
    let rank = rank.min(ranks - 1);
    rank * n_experts / ranks..(rank + 1) * n_experts / ranks
}

/// In-process EP groups for tests: one [`ExpertExchange`] per thread, over `std::sync::mpsc`.
#[cfg(test)]
pub(crate) mod threads {
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};

    use super::{ExchangePhase, ExpertExchange};

    /// `(layer, phase, source)`.
    type Key = (usize, ExchangePhase, usize);

    #[derive(Debug)]
    struct Inbox {
        rx: Receiver<(Key, Vec<f32>)>,
        /// Messages that arrived before they were asked for, FIFO per key.
        early: HashMap<Key, VecDeque<Vec<f32>>>,
    }

    /// One rank's end of an in-process EP group.
    #[derive(Debug)]
    pub struct ThreadExchange {
        index: usize,
        to: Vec<Sender<(Key, Vec<f32>)>>,
        inbox: Mutex<Inbox>,
    }

    /// An EP group of `p` ranks; hand element `i` to the thread running rank `i`.
    pub fn group(p: usize) -> Vec<ThreadExchange> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..p).map(|_| channel()).unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(index, rx)| ThreadExchange {
                index,
                to: txs.clone(),
                inbox: Mutex::new(Inbox {
                    rx,
                    early: HashMap::new(),
                }),
            })
            .collect()
    }

    impl ExpertExchange for ThreadExchange {
        fn size(&self) -> usize {
            self.to.len()
        }
        fn index(&self) -> usize {
            self.index
        }
        fn post(&self, layer: usize, phase: ExchangePhase, send: Vec<Vec<f32>>) {
            assert_eq!(send.len(), self.to.len(), "one message per peer");
            for (p, msg) in send.into_iter().enumerate() {
                self.to[p]
                    .send(((layer, phase, self.index), msg))
                    .expect("peer alive");
            }
        }
        fn wait(&self, layer: usize, phase: ExchangePhase) -> Vec<Vec<f32>> {
            let mut inbox = self.inbox.lock().expect("inbox");
            (0..self.to.len())
                .map(|q| {
                    let key = (layer, phase, q);
                    loop {
                        if let Some(m) = inbox.early.get_mut(&key).and_then(VecDeque::pop_front) {
                            return m;
                        }
                        let (k, m) = inbox.rx.recv().expect("peer alive");
                        inbox.early.entry(k).or_default().push_back(m);
                    }
                })
                .collect()
        }
    }
}
