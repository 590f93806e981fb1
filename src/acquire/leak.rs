//! Leak and stuck suspects: connections checked out through a
//! [`WatchedPool`](crate::WatchedPool) for longer than
//! [`Config::leak_threshold`](crate::Config::leak_threshold).
//!
//! Each checkout is entered in a small registry (a slab under a mutex, one entry per
//! connection checked out now, so memory is bounded by the pool size); the watch's background
//! task scans it a few times per threshold. No task is spawned per acquire, and nothing is
//! recorded when the threshold is off.

use std::fmt;
use std::panic::Location;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, counter, gauge};
use tracing::Span;

use crate::catalog::{self, POOL_NAME};

/// Where a connection was acquired.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Origin {
    /// `acquire()`, `begin()` or `try_acquire()` called at this place.
    Caller(&'static Location<'static>),
    /// A query run on `&WatchedPool` as an `Executor` (the connection is held for one query).
    Executor,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Caller(at) => write!(f, "{}:{}", at.file(), at.line()),
            Origin::Executor => f.write_str("a query run on &WatchedPool (Executor)"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    since: Instant,
    origin: Origin,
    span: Span,
    reported: bool,
}

#[derive(Debug, Default)]
struct Slab {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
}

/// The leak registry of one watched pool.
#[derive(Debug)]
pub(crate) struct Leaks {
    pool_name: String,
    threshold: Option<Duration>,
    slab: Mutex<Slab>,
    suspects: Gauge,
    total: Counter,
}

impl Leaks {
    pub(crate) fn new(pool_name: &str, threshold: Option<Duration>) -> Leaks {
        Leaks {
            pool_name: pool_name.to_owned(),
            threshold,
            slab: Mutex::new(Slab::default()),
            suspects: gauge!(catalog::LEAK_SUSPECTS.name, POOL_NAME => pool_name.to_owned()),
            total: counter!(catalog::LEAK_SUSPECTS_TOTAL.name, POOL_NAME => pool_name.to_owned()),
        }
    }

    /// How often the background task should scan: a quarter of the threshold, 10 ms to 1 s.
    pub(crate) fn scan_every(&self) -> Option<Duration> {
        self.threshold.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    /// Enters a checkout; `None` when leak detection is off.
    pub(crate) fn checkout(&self, since: Instant, origin: Origin) -> Option<usize> {
        self.threshold?;
        let entry = Entry { since, origin, span: Span::current(), reported: false };
        let mut slab = self.slab.lock().ok()?;
        Some(match slab.free.pop() {
            Some(slot) => {
                slab.entries[slot] = Some(entry);
                slot
            }
            None => {
                slab.entries.push(Some(entry));
                slab.entries.len() - 1
            }
        })
    }

    fn remove(&self, slot: usize) -> Option<Entry> {
        let mut slab = self.slab.lock().ok()?;
        let entry = slab.entries.get_mut(slot)?.take()?;
        slab.free.push(slot);
        if entry.reported {
            // Under the lock, so a scan's increment can never come after this decrement.
            self.suspects.decrement(1.0);
        }
        Some(entry)
    }

    /// The connection came back to the pool after `held`.
    pub(crate) fn returned(&self, slot: usize, held: Duration) {
        if let Some(entry) = self.remove(slot).filter(|e| e.reported) {
            tracing::info!(
                parent: &entry.span,
                pool = %self.pool_name,
                held_seconds = held.as_secs_f64(),
                acquired_at = %entry.origin,
                "leak suspect returned to the pool"
            );
        }
    }

    /// The connection left the pool for good: `leak()` (its slot stays taken forever, so it
    /// stays in the gauge) or `detach()` (its slot is freed).
    pub(crate) fn escaped(
        &self,
        slot: Option<usize>,
        origin: Origin,
        at: &'static Location<'static>,
        leaked: bool,
        held: Duration,
    ) {
        let Some(entry) = slot.and_then(|s| self.remove(s)) else { return };
        if !entry.reported {
            self.total.increment(1);
        }
        if leaked {
            self.suspects.increment(1.0);
        }
        let how = if leaked { "leak()" } else { "detach()" };
        tracing::warn!(
            parent: &entry.span,
            pool = %self.pool_name,
            held_seconds = held.as_secs_f64(),
            acquired_at = %origin,
            taken_out_at = %format_args!("{}:{}", at.file(), at.line()),
            "connection taken out of the pool with {how}: it will never be returned (leak suspect)"
        );
    }

    /// Reports every checkout held past the threshold that was not reported yet; returns
    /// how many it reported.
    pub(crate) fn scan(&self) -> usize {
        let Some(threshold) = self.threshold else { return 0 };
        let now = Instant::now();
        let mut found = Vec::new();
        if let Ok(mut slab) = self.slab.lock() {
            for entry in slab.entries.iter_mut().flatten() {
                let held = now.saturating_duration_since(entry.since);
                if !entry.reported && held >= threshold {
                    entry.reported = true;
                    self.suspects.increment(1.0);
                    self.total.increment(1);
                    found.push((entry.origin, entry.span.clone(), held));
                }
            }
        }
        let reported = found.len();
        for (origin, span, held) in found {
            tracing::warn!(
                parent: &span,
                pool = %self.pool_name,
                held_seconds = held.as_secs_f64(),
                threshold_seconds = threshold.as_secs_f64(),
                acquired_at = %origin,
                "connection checked out longer than leak_threshold: leak or stuck suspect"
            );
        }
        reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_are_reported_once_and_slots_are_reused() {
        let leaks = Leaks::new("unit", Some(Duration::from_millis(50)));
        let here = Origin::Caller(Location::caller());
        let old = Instant::now() - Duration::from_secs(1);
        let a = leaks.checkout(old, here).unwrap();
        let b = leaks.checkout(Instant::now(), here).unwrap();
        assert_eq!(leaks.scan(), 1, "only the connection held past the threshold");
        assert_eq!(leaks.scan(), 0, "reported once");
        leaks.returned(a, Duration::from_secs(1));
        leaks.returned(b, Duration::ZERO);
        for _ in 0..1000 {
            let s = leaks.checkout(Instant::now(), here).unwrap();
            leaks.returned(s, Duration::ZERO);
        }
        assert_eq!(leaks.slab.lock().unwrap().entries.len(), 2, "memory is bounded by checkouts at once");
    }

    #[test]
    fn nothing_is_registered_when_off() {
        let leaks = Leaks::new("unit", None);
        assert_eq!(leaks.checkout(Instant::now(), Origin::Executor), None);
        assert_eq!(leaks.scan(), 0);
        assert_eq!(leaks.scan_every(), None);
    }
}
