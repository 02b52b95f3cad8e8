//! The clock seam: the one place that knows whether time is real or virtual.
//!
//! Both clocks read `tokio::time`, so a simulated cluster runs the same code on tokio's paused
//! clock (virtual time that auto-advances when every task is idle). They differ in what
//! [`Clock::charge`] does with the cost of a compute operation: the real clock has already spent
//! that time doing the work, so it does nothing; the virtual clock sleeps for it, which is how a
//! simulated device's modelled cost becomes elapsed time.
//!
//! tokio's timer wheel has a resolution of one millisecond, too coarse for links whose latency is
//! a few microseconds and kernels of a few. The virtual clock therefore runs dilated: one
//! modelled nanosecond is one tokio millisecond ([`DILATION`]), so every sleep rounds up by at
//! most a nanosecond of modelled time (a thousand-step run of DeepSeek-V3-sized steps is still
//! far inside tokio's range). Code on the virtual clock converts with [`dilate`] before it
//! sleeps and measures with [`Clock::elapsed`], which converts back; what sleeps undilated on
//! the paused clock (supervisor backoff, control-plane timeouts) takes a millionth of its time
//! in modelled terms.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// tokio time per unit of modelled time on the virtual clock.
pub const DILATION: u32 = 1_000_000;

/// Modelled duration → tokio duration on the virtual clock.
pub fn dilate(d: Duration) -> Duration {
    d * DILATION
}

/// tokio duration on the virtual clock → modelled duration.
pub fn undilate(d: Duration) -> Duration {
    d / DILATION
}

/// A boxed future, as returned by the seams' object-safe traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Time as the actors see it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant (tokio's, so it follows a paused clock in simulation).
    fn now(&self) -> Instant;
    /// Time since `since`, in the world's own terms (modelled time on the virtual clock).
    fn elapsed(&self, since: Instant) -> Duration;
    /// Wait for `d`.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
    /// Account for compute that cost `cost`: a no-op when the work really ran, a virtual sleep
    /// when the cost was modelled.
    fn charge(&self, cost: Duration) -> BoxFuture<'static, ()>;
    /// Whether time is virtual (simulated cluster).
    fn is_virtual(&self) -> bool;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time through tokio: compute costs are already spent when they are reported.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn elapsed(&self, since: Instant) -> Duration {
        Instant::now().duration_since(since)
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
    fn charge(&self, _cost: Duration) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
    fn is_virtual(&self) -> bool {
        false
    }
}

/// Virtual time: run under a current-thread runtime with a paused clock
/// (`tokio::time::pause()` or `#[tokio::test(start_paused = true)]`); charged costs advance it.
#[derive(Debug, Default, Clone, Copy)]
pub struct VirtualClock;

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn elapsed(&self, since: Instant) -> Duration {
        undilate(Instant::now().duration_since(since))
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(dilate(d)))
    }
    fn charge(&self, cost: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(dilate(cost)))
    }
    fn is_virtual(&self) -> bool {
        true
    }
}

/// Run `fut` with a deadline on `clock`'s time base; `Err(elapsed)` when it runs out.
pub async fn with_deadline<F: Future>(
    clock: &dyn Clock,
    limit: Duration,
    fut: F,
) -> Result<F::Output, Duration> {
    let start = clock.now();
    tokio::select! {
        out = fut => Ok(out),
        () = clock.sleep(limit) => Err(clock.elapsed(start)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn virtual_charge_advances_time_real_charge_does_not() {
        let v = VirtualClock;
        let t0 = v.now();
        v.charge(Duration::from_micros(3)).await;
        assert_eq!(v.elapsed(t0), Duration::from_micros(3));
        let r = RealClock;
        let t1 = r.now();
        r.charge(Duration::from_secs(3)).await;
        assert_eq!(r.now().duration_since(t1), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_reports_elapsed() {
        let c = VirtualClock;
        let r = with_deadline(&c, Duration::from_millis(50), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Duration::from_millis(50)));
        let ok = with_deadline(&c, Duration::from_millis(50), async { 7 }).await;
        assert_eq!(ok, Ok(7));
    }
}
