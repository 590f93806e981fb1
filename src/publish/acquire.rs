//! The acquire path's handles: the watched pool's timings, the leak watch and the bare
//! pool's hooks. Recorded on the hot path by their owners, created only here.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::LazyGauge;
use crate::catalog::{self, POOL_NAME};

/// What [`WatchedPool`](crate::acquire::watched_pool::WatchedPool)'s acquires record.
#[derive(Debug)]
pub(crate) struct AcquireMetrics {
    pub(crate) wait: Histogram,
    pub(crate) pending: Gauge,
    pub(crate) timeouts: Counter,
    pub(crate) use_time: Histogram,
    pub(crate) create: Histogram,
}

impl AcquireMetrics {
    pub(crate) fn new(pool_name: &str) -> AcquireMetrics {
        let p = || pool_name.to_owned();
        AcquireMetrics {
            wait: histogram!(catalog::WAIT_TIME.name, POOL_NAME => p()),
            pending: gauge!(catalog::PENDING_REQUESTS.name, POOL_NAME => p()),
            timeouts: counter!(catalog::TIMEOUTS.name, POOL_NAME => p()),
            use_time: histogram!(catalog::USE_TIME.name, POOL_NAME => p()),
            create: histogram!(catalog::CREATE_TIME.name, POOL_NAME => p()),
        }
    }
}

/// The leak watch's suspects now and counted.
#[derive(Debug)]
pub(crate) struct LeakMetrics {
    /// At `Detail::Standard` registered at the first suspect (the alert reads `> 0`).
    pub(crate) suspects: LazyGauge,
    pub(crate) total: Counter,
}

impl LeakMetrics {
    pub(crate) fn new(pool_name: &str, eager: bool) -> LeakMetrics {
        LeakMetrics {
            suspects: LazyGauge::new(catalog::LEAK_SUSPECTS.name, vec![(POOL_NAME, pool_name.to_owned())], eager),
            total: counter!(catalog::LEAK_SUSPECTS_TOTAL.name, POOL_NAME => pool_name.to_owned()),
        }
    }
}

/// The wait histogram a bare pool's acquire events feed (the same series as the watched
/// pool's).
pub(crate) fn bare_wait(pool_name: &str) -> Histogram {
    histogram!(catalog::WAIT_TIME.name, POOL_NAME => pool_name.to_owned())
}

/// Slow acquires of a bare pool, at 0 from its creation.
pub(crate) fn slow_acquires(pool_name: &str) -> Counter {
    let c = counter!(catalog::SLOW_ACQUIRES.name, POOL_NAME => pool_name.to_owned());
    c.increment(0);
    c
}

/// The counters the pool's hooks feed (`instrument_options_named`), at 0 from their creation.
#[derive(Debug)]
pub(crate) struct HookCounters {
    pub(crate) connects: Counter,
    pub(crate) idle_acquires: Counter,
    pub(crate) releases: Counter,
}

impl HookCounters {
    pub(crate) fn new(pool_name: &str) -> HookCounters {
        let p = || pool_name.to_owned();
        let h = HookCounters {
            connects: counter!(catalog::POOL_CONNECTS.name, POOL_NAME => p()),
            idle_acquires: counter!(catalog::IDLE_ACQUIRES.name, POOL_NAME => p()),
            releases: counter!(catalog::RELEASES.name, POOL_NAME => p()),
        };
        for c in [&h.connects, &h.idle_acquires, &h.releases] {
            c.increment(0);
        }
        h
    }
}
