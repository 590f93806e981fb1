//! Progress reporting: the app counts units of work done, so an alert can tell "the pool is
//! busy and work flows" from "connections stay checked out but nothing gets done"
//! (incident 3: pods stayed up with their connections held and stopped processing).

use metrics::Counter;

/// A cheap, clonable handle that counts work done with one pool
/// (`poolwatch_progress_total{db_client_connection_pool_name=..}`).
///
/// Get one from [`PoolWatch::progress`](crate::watch::PoolWatch::progress) or [`Progress::new`], keep
/// it next to the work loop, and call [`tick`](Progress::tick) per job, batch or message.
/// Creating it registers the counter at 0, so the `PoolwatchWorkStalled` alert sees a flat
/// line even if no work was ever done.
///
/// ```
/// let progress = poolwatch::Progress::new("jobs");
/// for _batch in 0..3 {
///     // ... process a batch with the pool ...
///     progress.tick();
/// }
/// progress.add(10); // ten rows at once
/// ```
#[derive(Debug, Clone)]
pub struct Progress {
    counter: Counter,
}

impl Progress {
    /// A progress handle for the pool named `pool_name` (the name given to
    /// [`Config::new`](crate::config::Config::new)), bound to the recorder installed now.
    pub fn new(pool_name: &str) -> Progress {
        Progress { counter: crate::publish::health::progress(pool_name) }
    }

    /// One unit of work done.
    pub fn tick(&self) {
        self.counter.increment(1);
    }

    /// `n` units of work done.
    pub fn add(&self, n: u64) {
        self.counter.increment(n);
    }
}
