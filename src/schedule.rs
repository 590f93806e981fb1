//! Time arithmetic for the background tasks' schedules, safe for every duration `Config`
//! accepts (`Duration::MAX` is a common way to say "never"), and the supervision of the tasks.
//!
//! Tokio's `Instant + Duration`, `Duration::mul_f64` and `Interval`'s next tick panic on
//! overflow: every wait the tasks schedule goes through [`bounded`] first.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// The longest wait a task schedules: about 30 years (Tokio's own "far future"). A longer
/// period means "never" in practice, and stays clear of `Instant` overflow.
pub(crate) const HORIZON: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `d`, at most [`HORIZON`].
pub(crate) fn bounded(d: Duration) -> Duration {
    d.min(HORIZON)
}

/// `from + d`, with `d` bounded; never panics (a deadline past the clock's range is `from`
/// plus one second, which only an `Instant` near its own limit could need).
pub(crate) fn after(from: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    from.checked_add(bounded(d)).or_else(|| from.checked_add(Duration::from_secs(1))).unwrap_or(from)
}

/// Like [`after`], for `std::time::Instant`.
pub(crate) fn after_std(from: std::time::Instant, d: Duration) -> std::time::Instant {
    from.checked_add(bounded(d)).or_else(|| from.checked_add(Duration::from_secs(1))).unwrap_or(from)
}

/// `tokio::time::interval` with a bounded, non-zero period (Tokio panics on zero and on a
/// period whose next tick overflows its clock).
pub(crate) fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(bounded(period).max(Duration::from_nanos(1)));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// `every` ±20 %, drawn afresh each time, so replicas started together spread out. Bounded:
/// never panics.
pub(crate) fn jitter(every: Duration) -> Duration {
    scale(every, 0.8 + 0.4 * unit())
}

/// `d × factor` (factor ≥ 0), bounded, never panicking (`Duration::mul_f64` panics on
/// overflow and on NaN).
pub(crate) fn scale(d: Duration, factor: f64) -> Duration {
    let d = bounded(d);
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).map_or(d, bounded)
}

/// A fresh draw in [0, 1) (no RNG crate: a randomly keyed hash of the time and the pid).
fn unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Capped exponential backoff: `base × 2^(attempt-1)`, at most `cap`, ±20 % jitter.
/// `attempt` counts from 1.
pub(crate) fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    jitter(base.saturating_mul(1 << exp).min(cap))
}

/// The longest census wait while the client-side ledger confirms the pool, in
/// `census_interval`s (6 h at the default 900 s): the server's CPU per quiet replica falls
/// from 8.2 to 0.34 µs/s at 1,000 backends; a silent peer (a leak with the socket still open)
/// is seen within 7.2 h instead of 18 min (docs/performance.md).
pub(crate) const CENSUS_STRETCH: u32 = 24;

/// The longest scheduled reachability wait while every probe finds every address up and no
/// connect had trouble, in `reach_interval`s (24 h at the default 3 h). Trouble still probes
/// within seconds and a down address every 10 samples.
pub(crate) const REACH_STRETCH: u32 = 8;

/// `base × 2^streak`, at most `base × cap`, ±20 %: the wait after `streak` quiet rounds.
pub(crate) fn stretched(base: Duration, streak: u32, cap: u32) -> Duration {
    let factor = 1u32.checked_shl(streak.min(31)).unwrap_or(u32::MAX).min(cap.max(1));
    jitter(base.saturating_mul(factor))
}

/// How soon a failed census is retried: 5 s, 10 s, 20 s … (±20 %), capped at a quarter of
/// `census_interval` and at 2 min, so one failure does not hold `census_up` at 0 for a whole
/// interval (900 s by default).
pub(crate) fn census_retry(census_interval: Duration, failures: u32) -> Duration {
    let cap = (census_interval / 4).min(Duration::from_secs(120));
    backoff(Duration::from_secs(5).min(cap), cap, failures)
}

/// A fault a test injects into a supervised task (see `PoolWatch::inject_fault`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The sample and census task panics at its next poll.
    PanicWatch,
    /// The heartbeat task panics at its next poll.
    PanicHeartbeat,
    /// The sample and census task stops making progress until [`Fault::Resume`].
    StallWatch,
    /// The heartbeat task stops making progress until [`Fault::Resume`].
    StallHeartbeat,
    /// Clears every stall.
    Resume,
}

const PANIC: u8 = 1;
const STALL: u8 = 2;

/// The test-only faults of one task, and the waker that makes an injected one take effect.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Faults {
    pub(crate) fn panic(&self) {
        self.armed.fetch_or(PANIC, Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn stall(&self, on: bool) {
        if on {
            self.armed.fetch_or(STALL, Ordering::SeqCst);
        } else {
            self.armed.fetch_and(!STALL, Ordering::SeqCst);
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

/// A task's future with its panics caught (returned as `Err`) and the test faults applied.
pub(crate) struct Supervised<'a, T> {
    inner: Pin<Box<dyn Future<Output = T> + Send + 'a>>,
    faults: &'a Faults,
}

impl<'a, T> Supervised<'a, T> {
    pub(crate) fn new(inner: impl Future<Output = T> + Send + 'a, faults: &'a Faults) -> Self {
        Supervised { inner: Box::pin(inner), faults }
    }
}

impl<T> std::fmt::Debug for Supervised<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Supervised")
    }
}

impl<T> Future for Supervised<'_, T> {
    type Output = Result<T, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Ok(mut w) = this.faults.waker.lock()
            && !w.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            *w = Some(cx.waker().clone());
        }
        let armed = this.faults.armed.fetch_and(!PANIC, Ordering::SeqCst);
        if armed & STALL != 0 {
            return Poll::Pending;
        }
        let inner = this.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            if armed & PANIC != 0 {
                std::panic::panic_any("poolwatch: fault injected by a test");
            }
            inner.poll(cx)
        })) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// The text of a panic's payload (`&str` or `String`; anything else is unnamed).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".to_owned())
}

/// The unix time now, in seconds (0 before 1970).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations from zero to `Duration::MAX`, with the edges.
    pub(crate) fn sweep() -> Vec<Duration> {
        let mut v = vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1),
            Duration::from_secs(1),
            Duration::from_secs(900),
            HORIZON,
            HORIZON + Duration::from_nanos(1),
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(u64::MAX),
            Duration::MAX - Duration::from_nanos(1),
            Duration::MAX,
        ];
        // Every power of two of seconds, and of nanoseconds.
        v.extend((0..64).map(|e| Duration::from_secs(1u64 << e)));
        v.extend((0..64).map(|e| Duration::from_nanos(1u64 << e)));
        v
    }

    #[test]
    fn jitter_stays_within_20_percent_and_varies() {
        let every = Duration::from_secs(300);
        let draws: Vec<Duration> = (0..200).map(|_| jitter(every)).collect();
        assert!(draws.iter().all(|d| *d >= every.mul_f64(0.8) && *d <= every.mul_f64(1.2)), "{draws:?}");
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 100, "draws vary: {}", distinct.len());
    }

    #[test]
    fn arithmetic_never_panics_from_zero_to_max() {
        let now = tokio::time::Instant::now();
        let std_now = std::time::Instant::now();
        for d in sweep() {
            let j = jitter(d);
            assert!(j <= bounded(d).mul_f64(1.2) + Duration::from_nanos(1), "{d:?} -> {j:?}");
            assert!(after(now, d) >= now && after_std(std_now, d) >= std_now, "{d:?}");
            for f in [0.0, 0.5, 1.2, 10.0, f64::NAN, f64::INFINITY, -1.0] {
                let _ = scale(d, f);
            }
            for n in [0, 1, 2, 31, 64, u32::MAX] {
                assert!(backoff(d, d, n) <= bounded(d).mul_f64(1.2) + Duration::from_nanos(1), "{d:?} {n}");
                assert!(census_retry(d, n) <= Duration::from_secs(144), "{d:?} {n}");
            }
        }
    }

    #[tokio::test]
    async fn intervals_tick_twice_at_any_period() {
        // Tokio's own `interval(Duration::MAX)` panics computing the second tick.
        for d in sweep() {
            let mut i = interval(d);
            i.tick().await;
            tokio::select! {
                _ = i.tick() => {}
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    }

    #[test]
    fn census_retries_come_soon_and_back_off() {
        let interval = Duration::from_secs(900);
        let first = census_retry(interval, 1);
        assert!(first >= Duration::from_secs(4) && first <= Duration::from_secs(6), "{first:?}");
        let late = census_retry(interval, 20);
        assert!(late >= Duration::from_secs(96) && late <= Duration::from_secs(144), "{late:?}");
        let fast = census_retry(Duration::from_secs(1), 3);
        assert!(fast <= Duration::from_millis(300), "a quarter of a short interval at most: {fast:?}");
    }

    #[test]
    fn a_panic_is_caught_and_named() {
        let faults = Faults::default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let got = rt.block_on(Supervised::new(async { panic!("boom {}", 1) }, &faults));
        assert_eq!(got, Err::<(), _>("boom 1".to_owned()));
        faults.panic();
        let got = rt.block_on(Supervised::new(async { 7 }, &faults));
        assert_eq!(got, Err("poolwatch: fault injected by a test".to_owned()));
        assert_eq!(rt.block_on(Supervised::new(async { 7 }, &faults)), Ok(7));
    }
}
