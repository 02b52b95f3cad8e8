//! The expert-parallel (EP) group as a MoE layer sees it: a blocking all-to-all, behind a trait.
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
    /// Forward: token-owner → expert-owner, the dispatched input rows.
    Dispatch,
    /// Forward: expert-owner → token-owner, the experts' output rows.
    Combine,
    /// B: token-owner → expert-owner, the gradient of the experts' output rows.
    GradDispatch,
    /// B: expert-owner → token-owner, the gradient of the experts' input rows.
    GradCombine,
}

/// The expert-parallel group as the MoE layer sees it: a blocking all-to-all over the EP group.
/// Implementations live outside the model (the actors crate runs it over the fabric). A failed
/// exchange (dead peer, timeout) must not panic: it returns zero-filled buffers of the expected
/// sizes and reports the failure to its owner out of band; the layer carries on.
pub trait ExpertExchange: Send + Sync + std::fmt::Debug {
    /// EP group size P (routed experts are split evenly: rank i owns experts i·E/P .. (i+1)·E/P).
    fn size(&self) -> usize;
    /// This rank's index in the EP group.
    fn index(&self) -> usize;
    /// Per-expert row counts: `send[p]` (E/P counts, for peer p's experts) goes to peer p;
    /// returns `recv[q]`, what peer q sent (E/P counts for this rank's experts).
    /// `send[index()]` is this rank's own.
    fn counts(&self, layer: usize, send: Vec<Vec<u32>>) -> Vec<Vec<u32>>;
    /// Rows of `hidden`-wide f32 data: `send[p]` goes to peer p; returns `recv[q]` from each
    /// peer q, whose lengths the caller knows from the counts (`recv_lens[q]` elements).
    fn rows(
        &self,
        layer: usize,
        phase: ExchangePhase,
        send: Vec<Vec<f32>>,
        recv_lens: &[usize],
    ) -> Vec<Vec<f32>>;
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

    #[derive(Debug)]
    enum Payload {
        Counts(Vec<u32>),
        Rows(Vec<f32>),
    }

    /// `(layer, phase or None for the counts, source)`.
    type Key = (usize, Option<ExchangePhase>, usize);

    #[derive(Debug)]
    struct Inbox {
        rx: Receiver<(Key, Payload)>,
        /// Messages that arrived before they were asked for, FIFO per key.
        early: HashMap<Key, VecDeque<Payload>>,
    }

    /// One rank's end of an in-process EP group.
    #[derive(Debug)]
    pub struct ThreadExchange {
        index: usize,
        to: Vec<Sender<(Key, Payload)>>,
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

    impl ThreadExchange {
        fn all_to_all(
            &self,
            layer: usize,
            phase: Option<ExchangePhase>,
            send: Vec<Payload>,
        ) -> Vec<Payload> {
            assert_eq!(send.len(), self.to.len(), "one message per peer");
            for (p, msg) in send.into_iter().enumerate() {
                self.to[p]
                    .send(((layer, phase, self.index), msg))
                    .expect("peer alive");
            }
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

    impl ExpertExchange for ThreadExchange {
        fn size(&self) -> usize {
            self.to.len()
        }
        fn index(&self) -> usize {
            self.index
        }
        fn counts(&self, layer: usize, send: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
            let send = send.into_iter().map(Payload::Counts).collect();
            self.all_to_all(layer, None, send)
                .into_iter()
                .map(|m| match m {
                    Payload::Counts(c) => c,
                    Payload::Rows(_) => panic!("rows where counts were expected"),
                })
                .collect()
        }
        fn rows(
            &self,
            layer: usize,
            phase: ExchangePhase,
            send: Vec<Vec<f32>>,
            recv_lens: &[usize],
        ) -> Vec<Vec<f32>> {
            let send = send.into_iter().map(Payload::Rows).collect();
            let got: Vec<Vec<f32>> = self
                .all_to_all(layer, Some(phase), send)
                .into_iter()
                .map(|m| match m {
                    Payload::Rows(r) => r,
                    Payload::Counts(_) => panic!("counts where rows were expected"),
                })
                .collect();
            let lens: Vec<usize> = got.iter().map(Vec::len).collect();
            assert_eq!(lens, recv_lens, "layer {layer} {phase:?}: received lengths");
            got
        }
    }
}
