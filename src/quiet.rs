//! When the heartbeats may stretch: a quiet replica (no app acquire, both paths healthy,
//! nothing abnormal) beats less often, and the first sign of activity brings the base
//! interval back. A beat costs the server a backend wake-up (docs/performance.md); on a
//! quiet replica it only tells what the last one did.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest wait between two beats of a quiet replica, in `heartbeat_interval`s
/// (120 s at the default 10 s).
pub(crate) const BEAT_STRETCH: u32 = 12;

/// The longest stretched wait whatever the interval: `PoolwatchWatchStalled` fires when no
/// beat was seen for 300 s, so a quiet replica must beat well within that.
pub(crate) const BEAT_STRETCH_CEILING: Duration = Duration::from_secs(120);

/// The longest wait between two beats: `base` × [`BEAT_STRETCH`], at most
/// [`BEAT_STRETCH_CEILING`], never below `base`.
pub(crate) fn longest_beat_wait(base: Duration) -> Duration {
    base.saturating_mul(BEAT_STRETCH).min(BEAT_STRETCH_CEILING).max(base)
}

/// The wait before the next beat after `quiet` quiet beats in a row: `base` × 2^`quiet`, at
/// most [`longest_beat_wait`] (10 s, 20 s, 40 s, 80 s, 120 s … at the defaults).
pub(crate) fn beat_wait(base: Duration, quiet: u32) -> Duration {
    let factor = 1u32.checked_shl(quiet.min(31)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(longest_beat_wait(base))
}

/// The longest wait that keeps the pool's idle connection open between beats: half the pool's
/// `idle_timeout` when it keeps no minimum, so a stretched beat never finds its connection
/// reaped and opens a new backend each time (`None`: no bound).
pub(crate) fn idle_bound(idle_timeout: Option<Duration>, min_connections: u32) -> Option<Duration> {
    idle_timeout.filter(|_| min_connections == 0).map(|t| t / 2)
}

/// App activity seen since the last beat. The hot path (an acquire) pays an atomic load,
/// a store the first time after a beat, and a wake-up only while a stretched wait sleeps.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Set by app activity; the heartbeat takes it at each beat.
    seen: AtomicBool,
    /// Set while the heartbeat sleeps a stretched wait.
    stretched: AtomicBool,
    wake: Notify,
    /// The pool's open connections at the last sample.
    open: AtomicU32,
}

impl Activity {
    /// The app acquired a connection (or held one at a sample).
    pub(crate) fn touch(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
        }
        if self.stretched.load(Ordering::Relaxed) && self.stretched.swap(false, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// A sample's look at the pool: the app holds a connection, or the pool opened or
    /// closed one (acquires that bypass `WatchedPool` show only this way).
    pub(crate) fn look(&self, open: u32, app_holds: bool) {
        if self.open.swap(open, Ordering::Relaxed) != open || app_holds {
            self.touch();
        }
    }

    /// Whether the app was active since the last call.
    pub(crate) fn take(&self) -> bool {
        self.seen.swap(false, Ordering::Relaxed)
    }

    /// The heartbeat sleeps a stretched wait (`true`) or the base one (`false`).
    pub(crate) fn set_stretched(&self, on: bool) {
        self.stretched.store(on, Ordering::Relaxed);
    }

    /// Resolves at the first activity while [`set_stretched`](Activity::set_stretched) is on.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_beats_stretch_to_twelve_intervals_and_stay_under_the_stall_alert() {
        let base = Duration::from_secs(10);
        let waits: Vec<u64> = (0..7).map(|n| beat_wait(base, n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 120, 120, 120]);
        // Over a simulated quiet day: ≈ 720 beats instead of 8,640.
        let (mut at, mut beats) = (Duration::ZERO, 0u32);
        while at < Duration::from_secs(86_400) {
            at += beat_wait(base, beats);
            beats += 1;
        }
        assert!(beats <= 725, "{beats} beats in a quiet day");
        // A long interval never stretches past the ceiling, one past it does not stretch.
        assert_eq!(beat_wait(Duration::from_secs(30), 10), Duration::from_secs(120));
        assert_eq!(beat_wait(Duration::from_secs(600), 10), Duration::from_secs(600));
        assert_eq!(beat_wait(Duration::MAX, u32::MAX), Duration::MAX);
        assert_eq!(beat_wait(Duration::from_millis(100), 10), Duration::from_millis(1200));
    }

    #[test]
    fn a_stretched_wait_stays_within_half_the_idle_timeout_of_a_pool_without_a_minimum() {
        let t = Duration::from_secs(30);
        assert_eq!(idle_bound(Some(t), 0), Some(Duration::from_secs(15)));
        assert_eq!(idle_bound(Some(t), 1), None, "the pool keeps its minimum open");
        assert_eq!(idle_bound(None, 0), None);
        assert_eq!(idle_bound(Some(Duration::MAX), 0), Some(Duration::MAX / 2));
    }

    #[test]
    fn activity_is_taken_once_and_wakes_only_a_stretched_wait() {
        let a = Activity::default();
        assert!(!a.take());
        a.touch();
        a.touch();
        assert!(a.take());
        assert!(!a.take(), "taken");
        a.set_stretched(true);
        a.touch();
        assert!(!a.stretched.load(Ordering::Relaxed), "the first acquire ends the stretch");
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build();
        let Ok(rt) = rt else { return };
        let woke = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), a.woken()).await.is_ok() });
        assert!(woke, "the stored wake-up is delivered");
    }
}
