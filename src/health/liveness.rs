//! Whether the background tasks are still running: the time of the last completed sample,
//! census and heartbeat, published as unix timestamps (`time() - x` is their age in PromQL)
//! and judged by [`health()`](crate::watch::PoolWatch::health). A stalled or dead task otherwise
//! leaves its last figures in place, and a dashboard reads "ok" forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::health::heartbeat::PATHS;
use crate::publish::health::LivenessMetrics;
use crate::schedule::unix_now;

/// "Never": no completion recorded yet.
const NEVER: u64 = u64::MAX;

/// The last completions of one watch's tasks.
#[derive(Debug)]
pub(crate) struct Liveness {
    started: Instant,
    /// Milliseconds after `started` of the last completed sample, census and heartbeat tick.
    sample_ms: AtomicU64,
    census_ms: AtomicU64,
    heartbeat_ms: AtomicU64,
    /// Heartbeats counted (both paths) when the last sample looked.
    heartbeats_seen: AtomicU64,
    metrics: LivenessMetrics,
}

/// How long ago each task last completed (`None`: never yet).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Ages {
    /// Since the watch started.
    pub(crate) watch: Duration,
    pub(crate) sample: Option<Duration>,
    pub(crate) census: Option<Duration>,
    pub(crate) heartbeat: Option<Duration>,
}

impl Liveness {
    pub(crate) fn new(pool_name: &str) -> Liveness {
        Liveness {
            started: Instant::now(),
            sample_ms: AtomicU64::new(NEVER),
            census_ms: AtomicU64::new(NEVER),
            heartbeat_ms: AtomicU64::new(NEVER),
            heartbeats_seen: AtomicU64::new(0),
            metrics: LivenessMetrics::new(pool_name, PATHS),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn age(&self, at: &AtomicU64) -> Option<Duration> {
        match at.load(Ordering::Relaxed) {
            NEVER => None,
            ms => Some(Duration::from_millis(self.now_ms().saturating_sub(ms))),
        }
    }

    /// A sample completed; `heartbeats` is both paths' heartbeat count now (successes and
    /// failures): when it moved, the heartbeat task is alive.
    pub(crate) fn sampled(&self, heartbeats: u64) {
        self.sample_ms.store(self.now_ms(), Ordering::Relaxed);
        self.metrics.last_sample.set(unix_now());
        self.heartbeats(heartbeats);
        // Measured from the watch's start until the first census.
        let age = self.age(&self.census_ms).unwrap_or(self.started.elapsed());
        self.metrics.census_age.set(age.as_secs_f64());
    }

    /// A census succeeded.
    pub(crate) fn census_done(&self) {
        self.census_ms.store(self.now_ms(), Ordering::Relaxed);
        self.metrics.last_census.set(unix_now());
        self.metrics.census_age.set(0.0);
    }

    /// Both paths' heartbeat count now (successes and failures): when it moved since the
    /// last look, the heartbeat task is alive.
    fn heartbeats(&self, count: u64) {
        if self.heartbeats_seen.swap(count, Ordering::Relaxed) != count {
            self.heartbeat_ms.store(self.now_ms(), Ordering::Relaxed);
            self.metrics.last_heartbeat.set(unix_now());
        }
    }

    /// The ages now; `heartbeats` as for [`Liveness::sampled`] (the heartbeat is judged on
    /// its own, even while the sample task is stalled).
    pub(crate) fn ages(&self, heartbeats: u64) -> Ages {
        self.heartbeats(heartbeats);
        Ages {
            watch: self.started.elapsed(),
            sample: self.age(&self.sample_ms),
            census: self.age(&self.census_ms),
            heartbeat: self.age(&self.heartbeat_ms),
        }
    }

    /// The sample and census task died: its figures are unknown until it runs again.
    pub(crate) fn watch_lost(&self) {
        self.metrics.watch_lost();
    }

    /// The heartbeat task died: both paths' figures are unknown until it runs again.
    pub(crate) fn heartbeat_lost(&self) {
        self.metrics.heartbeat_lost();
    }
}

/// How old each task's figures may get before [`health()`](crate::watch::PoolWatch::health) calls
/// them stale, and the interval each is expected at (for the message).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) sample: Duration,
    pub(crate) sample_every: Duration,
    pub(crate) census: Duration,
    pub(crate) census_every: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) heartbeat_every: Duration,
}

impl Limits {
    /// A few intervals of each task, plus the time its slowest step may legitimately take
    /// (the census and the probes block the sample loop for up to a few `census_timeout`s).
    /// Saturating: any duration `Config` accepts.
    pub(crate) fn of(c: &crate::config::Config) -> Limits {
        let slack = c.census_timeout.saturating_mul(4);
        let sample = c.sample_interval.saturating_mul(3).saturating_add(slack);
        // A heartbeat is seen at a sample: never stale sooner than the sample is. A quiet
        // replica's beats stretch (up to 120 s at the defaults): the longest wait plus two
        // base intervals, so a stretched beat is never stale and a stopped task shows
        // (160 s at the defaults, within `PoolwatchWatchStalled`'s 300 s).
        let beat_every = crate::quiet::longest_beat_wait(c.heartbeat_interval);
        let beat = beat_every
            .saturating_add(c.heartbeat_interval.saturating_mul(2))
            .saturating_add(c.heartbeat_timeout.saturating_mul(2))
            .saturating_add(c.census_timeout.saturating_mul(2))
            .max(sample);
        // Two missed censuses (each up to 1.2 × the longest wait with the jitter): while the
        // client-side ledger confirms the pool the wait stretches to CENSUS_STRETCH intervals.
        // A stalled task shows sooner as a stale sample (the census runs in the same task).
        let census_every = c.census_interval.saturating_mul(crate::schedule::CENSUS_STRETCH);
        let census = crate::schedule::scale(census_every, 2.4).saturating_add(slack).saturating_add(sample);
        Limits {
            sample,
            sample_every: c.sample_interval,
            census,
            census_every,
            heartbeat: beat,
            heartbeat_every: beat_every,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_at_the_defaults_and_at_the_extremes() {
        let l = Limits::of(&crate::config::Config::new("a"));
        assert_eq!(l.sample, Duration::from_secs(35), "3 × 5 s + 4 × 5 s");
        assert_eq!(l.heartbeat, Duration::from_secs(160), "120 s (the stretched beat) + 2 × 10 s + 2 × 5 s + 2 × 5 s");
        assert_eq!(l.heartbeat_every, Duration::from_secs(120));
        assert_eq!(l.census, Duration::from_secs(51840 + 20 + 35), "2.4 × 6 h (the stretched census) + slack");
        let max = crate::config::Config::new("a")
            .sample_interval(Duration::MAX)
            .census_interval(Duration::MAX)
            .heartbeat_interval(Duration::MAX)
            .heartbeat_timeout(Duration::MAX);
        let l = Limits::of(&max);
        assert_eq!((l.sample, l.heartbeat), (Duration::MAX, Duration::MAX));
    }
}
