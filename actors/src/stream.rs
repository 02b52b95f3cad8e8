//! A rank's compute stream: where its actors issue device work (DESIGN.md, "what issue a phase
//! and it is done mean in each world").
//!
//! A job is a closure over the rank's device and its state on it ([`OnDevice`]): a phase of a
//! stage pass, the experts' work on what the EP group dispatched, an optimizer update, a
//! snapshot. Jobs run one at a time, each with the whole device; the issuing actor gets the
//! result back as a future, which it turns into a message to itself, so it keeps answering
//! while the device works. Of the jobs waiting, the one of the most urgent [`Class`] runs first
//! (the experts' work, which peers wait for; then the pipeline's F, B and W phases by their
//! place in the rank's action list; then the step's own work), and a W runs only after every W
//! of a smaller ordinal this step: gradients are summed in the schedule's order, so a step's
//! bits do not depend on timing.
//!
//! - On the CPU ([`Stream::on_thread`]) a thread of the rank owns the device and the state and
//!   runs the jobs, each inside the device's thread pool.
//! - On the simulated device ([`Stream::virtual_time`]) a task of the rank serves the queue on
//!   the paused clock: when the stream is free it chooses the most urgent job among those issued
//!   up to this instant (it waits one timer tick first, so that every job issued at the instant
//!   it became free is there to be chosen), runs it (shapes only, no arithmetic), holds the
//!   stream for the device's modelled cost and then answers. The stream's timeline is what a
//!   GPU's would be, and compute and communication overlap as they would there.
//!
//! A job that panics fails its own future (with the panic's message) and leaves the stream
//! running; the rank's state may then be half-updated, which is why a failed step is rolled back.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_model::{Cost, Device};

use crate::error::JobError;
use tokio::sync::oneshot;

use crate::store::RankStore;

/// What a job works with.
pub struct OnDevice<'a> {
    pub dev: &'a dyn Device,
    pub store: &'a mut RankStore,
}

/// How urgent a job is (earlier variants first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The routed experts' work on rows that token-owners wait for.
    Experts,
    /// Forward, backward (B) and weight-gradient (W) phases, by their place in the rank's
    /// action list (the gradient all-reduce of a finished group before them all).
    Compute,
    /// The step's own work (begin, statistics, update, snapshots).
    Step,
}

/// Where a job goes in the queue, and what it is (for the trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub class: Class,
    /// Place in the rank's action list (earlier first within a class).
    pub pos: u64,
    /// For a W: its ordinal among this step's W's (it waits for every smaller one).
    pub w: Option<u32>,
    /// What the job is, in a word ("forward", "experts", …), its micro-batch, and the
    /// pipeline stage it works for (if one).
    pub what: &'static str,
    pub chunk: usize,
    pub stage: Option<usize>,
}

impl Order {
    /// A job of `class` at place `pos`: `what` for micro-batch `chunk`.
    pub fn new(class: Class, pos: u64, what: &'static str, chunk: usize) -> Order {
        Order {
            class,
            pos,
            w: None,
            what,
            chunk,
            stage: None,
        }
    }

    /// The step's own work.
    pub const STEP: Order = Order {
        class: Class::Step,
        pos: 0,
        w: None,
        what: "step",
        chunk: 0,
        stage: None,
    };
}

/// One job as it ran, in seconds since its step began (modelled on the simulated device).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Span {
    pub what: &'static str,
    pub chunk: usize,
    pub stage: Option<usize>,
    pub start: f64,
    pub end: f64,
}

type Output = Box<dyn Any + Send>;
type Job = Box<dyn FnOnce(&mut OnDevice<'_>) -> Output + Send>;
type Reply = oneshot::Sender<Result<Output, String>>;

struct Queued {
    order: Order,
    seq: u64,
    job: Job,
    reply: Reply,
}

#[derive(Default)]
struct Sched {
    queue: Vec<Queued>,
    next_w: u32,
    seq: u64,
    closed: bool,
}

impl Sched {
    /// Whether a queued job may run now.
    fn runnable(&self) -> bool {
        self.queue
            .iter()
            .any(|q| q.order.w.is_none_or(|w| w == self.next_w))
    }

    /// The most urgent job allowed to run now.
    fn take(&mut self) -> Option<Queued> {
        let next_w = self.next_w;
        let i = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, q)| q.order.w.is_none_or(|w| w == next_w))
            .min_by_key(|(_, q)| (q.order.class, q.order.pos, q.seq))
            .map(|(i, _)| i)?;
        let q = self.queue.swap_remove(i);
        if q.order.w.is_some() {
            self.next_w += 1;
        }
        Some(q)
    }
}

/// The simulated world's state: the device and the rank's state, served by [`serve_virtual`].
struct Virtual {
    dev: Box<dyn Device>,
    store: Mutex<RankStore>,
    /// Wakes the serving task: a job was issued, or the stream closed.
    issued: tokio::sync::Notify,
}

/// The paused clock's resolution (one tokio timer tick; one virtual nanosecond, see
/// [`flotilla_runtime::clock::DILATION`]).
const TICK: Duration = Duration::from_millis(1);

struct Shared {
    sched: Mutex<Sched>,
    wake: Condvar,
    sim: Option<Virtual>,
    /// What the jobs cost since it was last taken.
    cost: Mutex<Cost>,
    /// The jobs of the current step, and when it began.
    spans: Mutex<(Vec<Span>, Option<Started>)>,
    /// Every job takes this many times its own time (1: none): an injected slow device
    /// ([`Stream::slow_down`]).
    slowdown: AtomicU64,
    /// The device thread of a real stream, joined when the stream closes: the device and the
    /// rank's state are dropped there, and a GPU's teardown should finish before the process
    /// exits (a 40 GB CUDA job segfaulted at exit while this thread was left running).
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// When a step began, on the stream's own time base.
#[derive(Debug, Clone, Copy)]
enum Started {
    Wall(std::time::Instant),
    Virtual(tokio::time::Instant),
}

impl Shared {
    fn sched(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The factor as [`Stream::slow_down`] set it (the bits of an `f64`).
    fn slowdown(&self) -> f64 {
        f64::from_bits(self.slowdown.load(Ordering::Relaxed))
    }

    fn add_cost(&self, c: &Cost) {
        self.cost.lock().unwrap_or_else(|p| p.into_inner()).add(c);
    }

    fn spans(&self) -> MutexGuard<'_, (Vec<Span>, Option<Started>)> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a job that ran from `start` to `end` (wall clock).
    fn record_wall(&self, o: &Order, start: std::time::Instant, end: std::time::Instant) {
        let mut g = self.spans();
        if let Some(Started::Wall(t0)) = g.1 {
            let at = |t: std::time::Instant| t.saturating_duration_since(t0).as_secs_f64();
            g.0.push(Span {
                what: o.what,
                chunk: o.chunk,
                stage: o.stage,
                start: at(start),
                end: at(end),
            });
        }
    }

    /// Record a job reserved from `start` to `end` on virtual time.
    fn record_virtual(&self, o: &Order, start: tokio::time::Instant, end: tokio::time::Instant) {
        let mut g = self.spans();
        if let Some(Started::Virtual(t0)) = g.1 {
            let at = |t: tokio::time::Instant| {
                flotilla_runtime::clock::undilate(t.saturating_duration_since(t0)).as_secs_f64()
            };
            g.0.push(Span {
                what: o.what,
                chunk: o.chunk,
                stage: o.stage,
                start: at(start),
                end: at(end),
            });
        }
    }
}

/// A rank's compute stream (cheap to clone: every actor of the rank holds one). When the last
/// clone goes, the stream closes (a CPU stream's thread ends).
#[derive(Clone)]
pub struct Stream(Arc<Handle>);

/// What the clones of a [`Stream`] share; closes the stream when dropped.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.sched().closed = true;
        self.0.wake.notify_all();
        if let Some(v) = &self.0.sim {
            v.issued.notify_one();
        }
        // Wait for the device thread to run out its queue and drop the device (never from that
        // thread itself).
        let thread = self
            .0
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.shared().sim.is_some() {
            "virtual"
        } else {
            "thread"
        };
        write!(f, "Stream({mode})")
    }
}

/// Why a job gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the job panicked: {0}")]
    Panicked(String),
    #[error("the stream is closed")]
    Closed,
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast::<&str>()
            .map_or_else(|_| "a panic".to_string(), |s| (*s).to_string()),
    }
}

/// Runs `job` with the device and the state, turning a panic into its message.
fn run(job: Job, dev: &dyn Device, store: &mut RankStore) -> Result<Output, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut job = Some(job);
        let mut out = None;
        dev.on_device_threads(&mut || {
            if let Some(j) = job.take() {
                out = Some(j(&mut OnDevice {
                    dev,
                    store: &mut *store,
                }));
            }
        });
        out
    }))
    .map_err(panic_text)?
    .ok_or_else(|| "the device did not run the job".to_string())
}

impl Stream {
    /// A stream whose jobs run on a thread of its own (`name`), which builds the device and
    /// the rank's state with `build` and owns them.
    pub async fn on_thread(
        name: String,
        build: impl FnOnce() -> Result<(Box<dyn Device>, RankStore), JobError> + Send + 'static,
    ) -> Result<Stream, JobError> {
        let shared = Arc::new(Shared {
            sched: Mutex::new(Sched::default()),
            wake: Condvar::new(),
            sim: None,
            cost: Mutex::new(Cost::default()),
            spans: Mutex::new((Vec::new(), None)),
            slowdown: AtomicU64::new(1.0f64.to_bits()),
            thread: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let (ready, built) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let (dev, mut store) = match build() {
                    Ok(b) => {
                        let _ = ready.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                while let Some(q) = next_job(&worker) {
                    let start = std::time::Instant::now();
                    let r = run(q.job, dev.as_ref(), &mut store);
                    let extra = worker.slowdown() - 1.0;
                    if extra > 0.0 {
                        std::thread::sleep(start.elapsed().mul_f64(extra));
                    }
                    worker.record_wall(&q.order, start, std::time::Instant::now());
                    worker.add_cost(&dev.take_cost());
                    let _ = q.reply.send(r);
                }
            })
            .map_err(|e| JobError::Config(format!("cannot start a compute thread: {e}")))?;
        *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        let handle = Stream(Arc::new(Handle(shared)));
        match built.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(JobError::Model(
                "the compute thread died while starting".into(),
            )),
        }
    }

    /// A stream on virtual time (the simulated device): its serving task is spawned on the
    /// current tokio runtime, whose clock should be paused.
    pub fn virtual_time(dev: Box<dyn Device>, store: RankStore) -> Stream {
        let shared = Arc::new(Shared {
            sched: Mutex::new(Sched::default()),
            wake: Condvar::new(),
            sim: Some(Virtual {
                dev,
                store: Mutex::new(store),
                issued: tokio::sync::Notify::new(),
            }),
            cost: Mutex::new(Cost::default()),
            spans: Mutex::new((Vec::new(), None)),
            slowdown: AtomicU64::new(1.0f64.to_bits()),
            thread: Mutex::new(None),
        });
        tokio::spawn(serve_virtual(Arc::clone(&shared)));
        Stream(Arc::new(Handle(shared)))
    }

    /// What the jobs cost since the last call (measured on real devices, modelled on the
    /// simulated one).
    pub fn take_cost(&self) -> Cost {
        std::mem::take(&mut *self.shared().cost.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn shared(&self) -> &Shared {
        &self.0.0
    }

    /// From now on every job takes `factor` times its own time (on the CPU the stream's thread
    /// sleeps for the rest after the job; on the simulated device the modelled cost is scaled):
    /// an injected slow device, as a straggler's ([`crate::faults::FaultPlan::with_slow_rank`]).
    /// The results are the same, only later.
    pub fn slow_down(&self, factor: f64) {
        let f = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self.shared().slowdown.store(f.to_bits(), Ordering::Relaxed);
    }

    /// Whether time on this stream is modelled (the simulated device).
    pub fn is_virtual(&self) -> bool {
        self.shared().sim.is_some()
    }

    /// A new step: its W's count from 0 again, its spans start afresh from now.
    pub fn new_step(&self) {
        self.shared().sched().next_w = 0;
        let started = if self.is_virtual() {
            Started::Virtual(tokio::time::Instant::now())
        } else {
            Started::Wall(std::time::Instant::now())
        };
        *self.shared().spans() = (Vec::new(), Some(started));
    }

    /// The jobs of the current (or last) step, in the order they ran.
    pub fn spans(&self) -> Vec<Span> {
        self.shared().spans().0.clone()
    }

    /// Issue `f` with `order`; its result once it has run.
    pub async fn run<R: Send + 'static>(
        &self,
        order: Order,
        f: impl FnOnce(&mut OnDevice<'_>) -> R + Send + 'static,
    ) -> Result<R, StreamError> {
        let rx = self.issue(order, Box::new(move |d| Box::new(f(d)) as Output));
        match rx.await {
            Ok(Ok(out)) => out
                .downcast::<R>()
                .map(|b| *b)
                .map_err(|_| StreamError::Panicked("a job's result of another type".into())),
            Ok(Err(why)) => Err(StreamError::Panicked(why)),
            Err(_) => Err(StreamError::Closed),
        }
    }

    fn issue(&self, order: Order, job: Job) -> oneshot::Receiver<Result<Output, String>> {
        let (reply, rx) = oneshot::channel();
        {
            let mut s = self.shared().sched();
            if s.closed {
                return rx;
            }
            s.seq += 1;
            let seq = s.seq;
            s.queue.push(Queued {
                order,
                seq,
                job,
                reply,
            });
        }
        match &self.shared().sim {
            None => self.shared().wake.notify_one(),
            Some(v) => v.issued.notify_one(),
        }
        rx
    }
}

/// Serve a virtual stream's queue until it is closed and empty: whenever the stream is free,
/// let every job issued at this instant arrive (one tick: the paused clock moves on only when
/// no task can run), take the most urgent, run it, hold the stream for its modelled cost, answer.
async fn serve_virtual(shared: Arc<Shared>) {
    let Some(v) = shared.sim.as_ref() else {
        return;
    };
    loop {
        loop {
            {
                let s = shared.sched();
                if s.runnable() {
                    break;
                }
                if s.closed && s.queue.is_empty() {
                    return;
                }
            }
            v.issued.notified().await;
        }
        tokio::time::sleep(TICK).await;
        let Some(q) = shared.sched().take() else {
            continue;
        };
        let start = tokio::time::Instant::now();
        let result = {
            let mut store = v.store.lock().unwrap_or_else(|p| p.into_inner());
            run(q.job, v.dev.as_ref(), &mut store)
        };
        let c = v.dev.take_cost();
        shared.add_cost(&c);
        let end = start + flotilla_runtime::clock::dilate(seconds(c.seconds * shared.slowdown()));
        shared.record_virtual(&q.order, start, end);
        tokio::time::sleep_until(end).await;
        let _ = q.reply.send(result);
    }
}

/// A modelled cost in seconds as a duration (negative or NaN costs count as none).
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO)
}

/// The thread's next job, waiting for one; `None` once the stream is closed and empty.
fn next_job(shared: &Shared) -> Option<Queued> {
    let mut s = shared.sched();
    loop {
        if let Some(q) = s.take() {
            return Some(q);
        }
        if s.closed && s.queue.is_empty() {
            return None;
        }
        s = shared.wake.wait(s).unwrap_or_else(|p| p.into_inner());
    }
}
