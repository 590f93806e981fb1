//! Leak and stuck suspects: connections checked out through a
//! [`WatchedPool`](crate::acquire::watched_pool::WatchedPool) for longer than
//! [`Config::leak_threshold`](crate::config::Config::leak_threshold).
//!
//! Each checkout is entered in a small registry (a slab under a mutex, one entry per
//! connection checked out now, so memory is bounded by the pool size): its time and the call
//! site that acquired it. The registry always runs, because the exhaustion snapshot (who holds
//! the pool when an acquire times out) and the stranded-slot count need it; it costs one
//! uncontended lock per acquire and per release. With a threshold set, the entry also keeps
//! the caller's span and the watch's background task scans the registry a few times per
//! threshold. No task is spawned per acquire.

use std::fmt;
use std::panic::Location;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Span;

use crate::publish::acquire::LeakMetrics;

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
    /// The caller's span, for leak reports (only with a threshold: cloning it costs).
    span: Option<Span>,
    reported: bool,
}

impl Origin {
    fn same(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::Caller(a), Origin::Caller(b)) => {
                std::ptr::eq(*a, *b) || (a.file() == b.file() && a.line() == b.line() && a.column() == b.column())
            }
            (Origin::Executor, Origin::Executor) => true,
            _ => false,
        }
    }
}

/// The connections checked out from one call site now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Holders {
    pub(crate) origin: String,
    pub(crate) count: usize,
    pub(crate) oldest: Duration,
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
    /// Slots taken out for good with `leak()`: still counted by the pool, held by the app.
    leaked: std::sync::atomic::AtomicUsize,
    /// Some acquire went through the watched pool: until then the app's checkouts are all
    /// elsewhere (a library on the bare pool), and "not through WatchedPool" means nothing.
    used: std::sync::atomic::AtomicBool,
    metrics: LeakMetrics,
    /// Suspects now; changed under the slab's lock only.
    suspect_count: std::sync::atomic::AtomicU64,
}

impl Leaks {
    pub(crate) fn new(pool_name: &str, threshold: Option<Duration>, eager: bool) -> Leaks {
        Leaks {
            pool_name: pool_name.to_owned(),
            threshold,
            slab: Mutex::new(Slab::default()),
            leaked: std::sync::atomic::AtomicUsize::new(0),
            used: std::sync::atomic::AtomicBool::new(false),
            metrics: LeakMetrics::new(pool_name, eager),
            suspect_count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Moves the suspects gauge by `by` (called under the slab's lock).
    fn suspects_add(&self, by: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = if by >= 0 {
            self.suspect_count.fetch_add(by.unsigned_abs(), Relaxed) + by.unsigned_abs()
        } else {
            self.suspect_count.fetch_sub(by.unsigned_abs(), Relaxed).saturating_sub(by.unsigned_abs())
        };
        self.metrics.suspects.set(now as f64);
    }

    /// How often the background task should scan: a quarter of the threshold, 10 ms to 1 s.
    pub(crate) fn scan_every(&self) -> Option<Duration> {
        self.threshold.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    /// Enters a checkout; `None` only if the registry's lock is poisoned.
    pub(crate) fn checkout(&self, since: Instant, origin: Origin) -> Option<usize> {
        let span = self.threshold.map(|_| Span::current());
        let entry = Entry { since, origin, span, reported: false };
        // A load first: after the first acquire this is a read of a shared line, not a write
        // every acquire makes every core re-fetch.
        if !self.used.load(std::sync::atomic::Ordering::Relaxed) {
            self.used.store(true, std::sync::atomic::Ordering::Relaxed);
        }
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

    /// Connections checked out through the watched pool now, slots lost to `leak()` included;
    /// `None` until the first acquire through the watched pool.
    pub(crate) fn checked_out_if_used(&self) -> Option<usize> {
        self.used.load(std::sync::atomic::Ordering::Relaxed).then(|| self.checked_out())
    }

    /// Connections checked out through the watched pool now, slots lost to `leak()` included.
    pub(crate) fn checked_out(&self) -> usize {
        let leaked = self.leaked.load(std::sync::atomic::Ordering::Relaxed);
        self.slab.lock().map(|s| s.entries.len() - s.free.len()).unwrap_or(0) + leaked
    }

    /// Who holds the pool's connections now, grouped by acquiring call site, oldest first.
    pub(crate) fn holders(&self) -> Vec<Holders> {
        let now = Instant::now();
        let mut groups: Vec<(Origin, usize, Instant)> = Vec::new();
        if let Ok(slab) = self.slab.lock() {
            for e in slab.entries.iter().flatten() {
                match groups.iter_mut().find(|g| g.0.same(&e.origin)) {
                    Some(g) => {
                        g.1 += 1;
                        g.2 = g.2.min(e.since);
                    }
                    None => groups.push((e.origin, 1, e.since)),
                }
            }
        }
        groups.sort_by_key(|g| g.2);
        groups
            .into_iter()
            .map(|(origin, count, since)| Holders {
                origin: origin.to_string(),
                count,
                oldest: now.saturating_duration_since(since),
            })
            .collect()
    }

    fn remove(&self, slot: usize) -> Option<Entry> {
        let mut slab = self.slab.lock().ok()?;
        let entry = slab.entries.get_mut(slot)?.take()?;
        slab.free.push(slot);
        if entry.reported {
            // Under the lock, so a scan's increment can never come after this decrement.
            self.suspects_add(-1);
        }
        Some(entry)
    }

    /// The connection came back to the pool after `held`.
    pub(crate) fn returned(&self, slot: usize, held: Duration) {
        if let Some(entry) = self.remove(slot).filter(|e| e.reported) {
            tracing::info!(
                parent: entry.span.as_ref().and_then(Span::id),
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
        if leaked {
            self.leaked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.threshold.is_some() {
            if !entry.reported {
                self.metrics.total.increment(1);
            }
            if leaked {
                self.suspects_add(1);
            }
        }
        let how = if leaked { "leak()" } else { "detach()" };
        if self.threshold.is_none() {
            // Off: the slot just leaves the registry, unreported.
            return;
        }
        tracing::warn!(
            parent: entry.span.as_ref().and_then(Span::id),
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
                    self.suspects_add(1);
                    self.metrics.total.increment(1);
                    found.push((entry.origin, entry.span.clone().unwrap_or_else(Span::none), held));
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
        let leaks = Leaks::new("unit", Some(Duration::from_millis(50)), true);
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
    fn off_registers_holders_but_reports_nothing() {
        let leaks = Leaks::new("unit", None, true);
        let here = Origin::Caller(Location::caller());
        let old = Instant::now() - Duration::from_secs(5);
        let a = leaks.checkout(old, here).unwrap();
        let b = leaks.checkout(Instant::now(), here).unwrap();
        let c = leaks.checkout(Instant::now(), Origin::Executor).unwrap();
        assert_eq!(leaks.scan(), 0);
        assert_eq!(leaks.scan_every(), None);
        assert_eq!(leaks.checked_out(), 3);
        let holders = leaks.holders();
        assert_eq!(holders.len(), 2, "{holders:?}");
        assert_eq!((holders[0].count, holders[0].origin.contains("leak.rs")), (2, true), "{holders:?}");
        assert!(holders[0].oldest >= Duration::from_secs(5));
        assert_eq!(holders[1].count, 1);
        for s in [a, b, c] {
            leaks.returned(s, Duration::ZERO);
        }
        assert_eq!(leaks.checked_out(), 0);
    }
}
