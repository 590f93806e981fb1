//! Series of pools that are gone leave the exposition. A multi-tenant app opens and closes a
//! pool per tenant: without this, every tenant ever seen keeps its ~50 series forever.
//!
//! When a pool's watch ends, its name is marked retired in every live recorder. A sweep (at a
//! render or a retirement, at most once a second) then takes out every series labelled with a
//! retired pool name, but only once **no** series of that pool is held outside the recorder
//! (a watch still ending, a `WatchedPool`, the pool's lifecycle hooks, a listener, a new watch
//! of the same name): a series taken out while someone holds its handle would silently stop
//! updating. Each series is checked again under its registry shard's write lock, where no new
//! handle can be made, so a handle is never orphaned. A name stays retired until its series
//! are gone. The bare-acquire figures (`acquire::bare`) hold one handle on a few series of
//! every pool they know: that alone does not keep a pool, and they are forgotten with it
//! unless the pool's hooks are still alive.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use metrics::Key;

use super::series::Inner;
use crate::catalog;
use crate::registry;

/// Sweeps at most this often: each visits every series.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Holders of a series nobody else holds: the registry and the index.
const INTERNAL: usize = 2;

/// The series `acquire::bare` holds per known pool (see `sweep`).
const BARE: [&str; 5] = [
    catalog::WAIT_TIME.name,
    catalog::SLOW_ACQUIRES.name,
    catalog::POOL_CONNECTS.name,
    catalog::IDLE_ACQUIRES.name,
    catalog::RELEASES.name,
];

/// Every recorder built in this process (a pool's end reaches each): a
/// [`registry`](crate::registry) table of `Weak<Inner>`.
pub(super) fn subscribe(inner: &Arc<Inner>) {
    let mut all = registry::lock::<Weak<Inner>>();
    all.retain(|r| r.strong_count() > 0);
    all.push(Arc::downgrade(inner));
}

/// A pool's watch has ended: its series go once nothing holds them.
pub(super) fn pool_ended(pool_name: &str) {
    let live: Vec<Arc<Inner>> = registry::lock::<Weak<Inner>>().iter().filter_map(Weak::upgrade).collect();
    for inner in live {
        inner.retired.lock().unwrap_or_else(PoisonError::into_inner).names.insert(pool_name.to_owned());
        sweep_if_due(&inner);
    }
}

/// Sweeps unless there is nothing to retire or the last sweep was less than a second ago.
pub(super) fn sweep_if_due(inner: &Inner) {
    let names = {
        let mut retired = inner.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let recent = retired.last_sweep.is_some_and(|at| at.elapsed() < SWEEP_EVERY);
        if retired.names.is_empty() || recent {
            return;
        }
        retired.last_sweep = Some(Instant::now());
        retired.names.clone()
    };
    let done = sweep(inner, &names);
    inner.retired.lock().unwrap_or_else(PoisonError::into_inner).names.retain(|n| !done.contains(n));
}

/// The pool name of `key`, if `wanted` says so.
fn pool_of(key: &Key, wanted: impl Fn(&str) -> bool) -> Option<&str> {
    key.labels().find(|l| l.key() == catalog::POOL_NAME).map(|l| l.value()).filter(|v| wanted(v))
}

/// Takes out the series of `names` whose pool has no series held outside the recorder;
/// returns the names whose series are all gone.
pub(super) fn sweep(inner: &Inner, names: &HashSet<String>) -> HashSet<String> {
    let registry = &inner.registry;
    let mut held: HashSet<String> = HashSet::new();
    let mut note = |key: &Key, holders: usize| {
        // The bare-acquire figures hold one handle more for as long as their pool is known:
        // that alone does not keep a pool (a live watch holds many series of its own).
        let known = usize::from(BARE.contains(&key.name()));
        if let Some(pool) = pool_of(key, |p| names.contains(p))
            && holders > INTERNAL + known
        {
            held.insert(pool.to_owned());
        }
    };
    registry.visit_counters(|k, c| note(k, Arc::strong_count(c)));
    registry.visit_gauges(|k, g| note(k, Arc::strong_count(g)));
    registry.visit_histograms(|k, h| note(k, Arc::strong_count(h)));
    let gone: HashSet<&str> = names.iter().map(String::as_str).filter(|n| !held.contains(*n)).collect();
    if gone.is_empty() {
        return HashSet::new();
    }
    // Their bare-acquire figures go too, unless the pool (its hooks) is still alive.
    crate::acquire::bare::forget_unheld(|p| gone.contains(p));
    // Checked again where no handle can be made: a handle taken since is kept, with its pool.
    let (mut removed, mut kept) = (HashSet::new(), HashSet::new());
    let mut take = |key: &Key, id: usize, holders: usize| -> bool {
        let Some(pool) = pool_of(key, |p| gone.contains(p)) else { return true };
        if holders == INTERNAL {
            removed.insert(id);
            false
        } else {
            kept.insert(pool.to_owned());
            true
        }
    };
    registry.retain_counters(|k, c| take(k, Arc::as_ptr(c) as *const () as usize, Arc::strong_count(c)));
    registry.retain_gauges(|k, g| take(k, Arc::as_ptr(g) as *const () as usize, Arc::strong_count(g)));
    registry.retain_histograms(|k, h| take(k, Arc::as_ptr(h) as *const () as usize, Arc::strong_count(h)));
    inner.index.remove(&removed);
    gone.into_iter().filter(|n| !kept.contains(*n)).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use metrics::{Label, Metadata, Recorder as _};

    use super::*;

    fn key(name: &'static str, pool: &'static str) -> Key {
        Key::from_parts(name, vec![Label::new(catalog::POOL_NAME, pool)])
    }

    fn meta() -> Metadata<'static> {
        Metadata::new("t", metrics::Level::INFO, None)
    }

    #[test]
    fn a_retired_pool_leaves_once_nothing_holds_its_series() {
        let recorder = crate::export::Exporter::new().build_recorder();
        let handle = recorder.handle();
        let held = recorder.register_gauge(&key("g", "gone"), &meta());
        held.set(1.0);
        recorder.register_counter(&key("c_total", "gone"), &meta()).increment(2);
        recorder.register_histogram(&key("h_seconds", "gone"), &meta()).record(0.1);
        recorder.register_counter(&key("c_total", "alive"), &meta()).increment(1);
        let names = HashSet::from(["gone".to_owned()]);
        assert!(sweep(&recorder.inner, &names).is_empty(), "a held series keeps its whole pool");
        assert!(handle.render().contains("c_total{db_client_connection_pool_name=\"gone\"} 2\n"));
        drop(held);
        assert_eq!(sweep(&recorder.inner, &names), names);
        let text = handle.render();
        assert!(!text.contains("\"gone\"") && !text.contains("# TYPE g "), "{text}");
        assert!(text.contains("c_total{db_client_connection_pool_name=\"alive\"} 1\n"), "{text}");
        // One handle on a series the bare-acquire figures hold does not keep the pool's other
        // series; that series itself stays (it is held) and keeps the name retired.
        let wait = recorder.register_histogram(&key(catalog::WAIT_TIME.name, "half"), &meta());
        recorder.register_gauge(&key("g", "half"), &meta()).set(1.0);
        let half = HashSet::from(["half".to_owned()]);
        assert!(sweep(&recorder.inner, &half).is_empty(), "a held series keeps the name retired");
        let text = handle.render();
        assert!(!text.contains("g{db_client_connection_pool_name=\"half\"}"), "{text}");
        assert!(text.contains("pool_name=\"half\",le=\"+Inf\"} 0\n"), "{text}");
        drop(wait);
        assert_eq!(sweep(&recorder.inner, &half), half);
        // Registered again: a new series from zero, rendered.
        recorder.register_counter(&key("c_total", "gone"), &meta()).increment(1);
        assert!(handle.render().contains("c_total{db_client_connection_pool_name=\"gone\"} 1\n"));
    }
}
