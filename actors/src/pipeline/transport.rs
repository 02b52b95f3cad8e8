//! Blocking point-to-point transport for a rank's compute threads: pipeline activations and
//! gradients between stages, and the expert-parallel all-to-all ([`FabricExchange`]).
//!
//! The compute threads are plain OS threads (the model is synchronous), so they drive the async
//! fabric with `Handle::block_on`. Every message is tagged with the step, the micro-batch and what
//! it is, so that the executor's streams (or an F&B pair's halves), running at the same time on
//! several threads, never take each other's messages. Every receive has the job's peer deadline; a
//! failure is kept (the first one wins) and turned into the step's error by the executor — the
//! model layer waiting on the exchange gets empty parts (read as zeros) and never panics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Rank, Tag};
use tokio::runtime::Handle;

use super::baton::Baton;
use super::profile::Activity;

/// Fabric channel of pipeline activations and gradients.
pub const PIPE_CHANNEL: u32 = 0x5050_0000;
/// Fabric channel of the expert-parallel all-to-all.
pub const EP_CHANNEL: u32 = 0x4550_0000;

/// Which of a MoE layer's four all-to-alls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangePhase {
    /// Forward: token-owner → expert-owner, the per-expert row counts and the dispatched rows.
    Dispatch,
    /// Forward: expert-owner → token-owner, the experts' output rows.
    Combine,
    /// B: token-owner → expert-owner, the gradient of the experts' output rows.
    GradDispatch,
    /// B: expert-owner → token-owner, the gradient of the experts' input rows.
    GradCombine,
}

/// Direction of a pipeline message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// A stage's output activation, to the next stage.
    Act = 0,
    /// The gradient of a stage's input, to the previous stage.
    Grad = 1,
}

/// The first failure of a rank's step, shared by its threads.
#[derive(Debug, Clone, Default)]
pub struct Failure(Arc<Mutex<Option<String>>>);

impl Failure {
    /// Record `why` unless something failed already.
    pub fn set(&self, why: String) {
        if let Ok(mut g) = self.0.lock()
            && g.is_none()
        {
            *g = Some(why);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// What a rank's expert all-to-alls cost in one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExchangeStats {
    /// Seconds the compute threads waited for peers' all-to-all messages.
    pub wait_s: f64,
    /// Bytes this rank sent to its EP peers.
    pub bytes_sent: u64,
    /// All-to-alls run.
    pub exchanges: u64,
    /// Seconds the rank's compute baton was held: its streams' compute, waits excluded.
    pub baton_held_s: f64,
}

/// A rank's blocking view of the fabric for one step.
#[derive(Debug, Clone)]
pub struct Link {
    pub fabric: Arc<dyn Fabric>,
    pub rt: Handle,
    pub deadline: Duration,
    pub step: u64,
    pub failure: Failure,
    pub stats: Arc<Mutex<ExchangeStats>>,
    /// Held by the computing stream; handed over around every blocking receive.
    pub baton: Baton,
}

impl Link {
    /// Receive with the deadline; when it passes, wait once more as long in case the silent peer
    /// is itself stuck on another (it started waiting later, so its own deadline passes later)
    /// and is about to be marked failed — then its failure, naming the real culprit, is what
    /// this rank reports. A silent peer is blamed after at most twice the deadline.
    pub fn recv(&self, src: Rank, tag: Tag) -> Result<Payload, FabricError> {
        self.baton.release();
        let t0 = std::time::Instant::now();
        let r = self.recv_blocking(src, tag);
        let what = if tag.channel == EP_CHANNEL {
            Activity::Exchange
        } else {
            Activity::Pipe
        };
        self.baton.profile().record(what, tag.tag, t0);
        self.baton.acquire();
        r
    }

    fn recv_blocking(&self, src: Rank, tag: Tag) -> Result<Payload, FabricError> {
        match self.rt.block_on(self.fabric.recv(src, tag, self.deadline)) {
            Err(FabricError::Timeout { .. }) => {
                let grace = self.deadline.max(Duration::from_millis(100));
                self.rt
                    .block_on(self.fabric.recv(src, tag, grace))
                    .map_err(|e| match e {
                        FabricError::Timeout { src, tag, .. } => FabricError::Timeout {
                            src,
                            tag,
                            after: self.deadline + grace,
                        },
                        other => other,
                    })
            }
            other => other,
        }
    }

    fn pipe_tag(&self, chunk: usize, stage: usize, dir: Dir) -> Tag {
        Tag::new(
            PIPE_CHANNEL,
            (self.step & 0xff_ffff) << 40
                | ((chunk as u64) & 0xffff) << 24
                | ((stage as u64) & 0xffff) << 8
                | dir as u64,
        )
    }

    /// Send a stage boundary tensor (with its virtual timestamp appended as two words).
    pub fn send_pipe(
        &self,
        dst: Rank,
        chunk: usize,
        stage: usize,
        dir: Dir,
        mut data: Vec<f32>,
        stamp: f64,
    ) -> Result<(), String> {
        let bits = stamp.to_bits();
        data.push(f32::from_bits((bits >> 32) as u32));
        data.push(f32::from_bits(bits as u32));
        let tag = self.pipe_tag(chunk, stage, dir);
        self.rt
            .block_on(self.fabric.send(dst, tag, Payload::F32(data)))
            .map_err(|e| {
                format!("sending {dir:?} of chunk {chunk} stage {stage} to rank {dst}: {e}")
            })
    }

    /// Receive a stage boundary tensor of `len` values and its timestamp.
    pub fn recv_pipe(
        &self,
        src: Rank,
        chunk: usize,
        stage: usize,
        dir: Dir,
        len: usize,
    ) -> Result<(Vec<f32>, f64), String> {
        let tag = self.pipe_tag(chunk, stage, dir);
        let what = || format!("{dir:?} of chunk {chunk} stage {stage} from rank {src}");
        let mut v = self
            .recv(src, tag)
            .and_then(Payload::into_f32)
            .map_err(|e| format!("receiving {}: {e}", what()))?;
        if v.len() != len + 2 {
            return Err(format!(
                "receiving {}: {} values, expected {len}",
                what(),
                v.len().saturating_sub(2)
            ));
        }
        let lo = v.pop().map_or(0, f32::to_bits);
        let hi = v.pop().map_or(0, f32::to_bits);
        Ok((v, f64::from_bits(u64::from(hi) << 32 | u64::from(lo))))
    }
}

/// The EP all-to-all of one micro-batch's stage pass, over the fabric.
#[derive(Debug)]
pub struct FabricExchange {
    pub link: Link,
    /// Global ranks of the EP group, by EP index.
    pub group: Vec<Rank>,
    pub index: usize,
    pub chunk: usize,
    /// This rank's own part of each posted exchange, by tag, until it is waited for.
    pub own: Mutex<HashMap<Tag, Vec<f32>>>,
}

impl FabricExchange {
    pub fn new(link: Link, group: Vec<Rank>, index: usize, chunk: usize) -> FabricExchange {
        FabricExchange {
            link,
            group,
            index,
            chunk,
            own: Mutex::default(),
        }
    }

    fn tag(&self, layer: usize, phase: ExchangePhase) -> Tag {
        Tag::new(
            EP_CHANNEL,
            (self.link.step & 0xff_ffff) << 40
                | ((self.chunk as u64) & 0xffff) << 24
                | ((layer as u64) & 0xffff) << 8
                | phase_code(phase),
        )
    }

    /// Send `send[p]` to every peer and keep our own.
    fn send_all(&self, tag: Tag, mut send: Vec<Vec<f32>>) -> Result<(), String> {
        let p = self.group.len();
        if send.len() != p {
            return Err(format!(
                "all-to-all of {} parts in a group of {p}",
                send.len()
            ));
        }
        if let Some(f) = self.link.failure.get() {
            return Err(f);
        }
        let mine = std::mem::take(&mut send[self.index]);
        self.own
            .lock()
            .map_err(|_| "a compute thread panicked".to_string())?
            .insert(tag, mine);
        let bytes: usize = send.iter().map(|v| v.len() * 4).sum();
        for (q, part) in send.into_iter().enumerate() {
            if q != self.index {
                let dst = self.group[q];
                self.link
                    .rt
                    .block_on(self.link.fabric.send(dst, tag, Payload::F32(part)))
                    .map_err(|e| format!("expert all-to-all {tag} to rank {dst}: {e}"))?;
            }
        }
        if let Ok(mut st) = self.link.stats.lock() {
            st.bytes_sent += bytes as u64;
        }
        Ok(())
    }

    /// Receive every peer's part of `tag`; our own is the one we kept.
    fn recv_all(&self, tag: Tag) -> Result<Vec<Vec<f32>>, String> {
        if let Some(f) = self.link.failure.get() {
            return Err(f);
        }
        let mine = self
            .own
            .lock()
            .map_err(|_| "a compute thread panicked".to_string())?
            .remove(&tag)
            .ok_or_else(|| format!("internal: expert all-to-all {tag} waited for, not posted"))?;
        let mut out = Vec::with_capacity(self.group.len());
        let waiting = std::time::Instant::now();
        for (q, &src) in self.group.iter().enumerate() {
            if q == self.index {
                out.push(Vec::new());
                continue;
            }
            let v = self
                .link
                .recv(src, tag)
                .and_then(Payload::into_f32)
                .map_err(|e: FabricError| {
                    format!("expert all-to-all {tag} from rank {src}: {e}")
                })?;
            out.push(v);
        }
        out[self.index] = mine;
        if let Ok(mut st) = self.link.stats.lock() {
            st.wait_s += waiting.elapsed().as_secs_f64();
            st.exchanges += 1;
        }
        Ok(out)
    }
}

fn phase_code(phase: ExchangePhase) -> u64 {
    match phase {
        ExchangePhase::Dispatch => 1,
        ExchangePhase::Combine => 2,
        ExchangePhase::GradDispatch => 3,
        ExchangePhase::GradCombine => 4,
    }
}

impl FabricExchange {
    /// EP group size.
    pub fn size(&self) -> usize {
        self.group.len()
    }

    /// Starts the all-to-all `(layer, phase)`: `send[p]` goes to EP index `p` (this rank's own
    /// part is kept for [`FabricExchange::wait`]). A failure is recorded for the executor.
    pub fn post(&self, layer: usize, phase: ExchangePhase, send: Vec<Vec<f32>>) {
        if let Err(why) = self.send_all(self.tag(layer, phase), send) {
            self.link.failure.set(why);
        }
    }

    /// Completes the all-to-all `(layer, phase)`: `recv[q]` is what EP index `q` sent. On a
    /// failure (recorded for the executor) every part comes back empty.
    pub fn wait(&self, layer: usize, phase: ExchangePhase) -> Vec<Vec<f32>> {
        self.recv_all(self.tag(layer, phase)).unwrap_or_else(|why| {
            self.link.failure.set(why);
            vec![Vec::new(); self.group.len()]
        })
    }
}
