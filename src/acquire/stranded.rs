//! Stranded slots: connections the pool counts as checked out that the app does not hold
//! through the watched pool (e.g. stuck in sqlx's return-to-pool ping after the peer went
//! silent, a leak no census shows: the session still exists on the server).
//!
//! Read at each sample as `pool.size() - pool.num_idle() - checkouts WatchedPool knows of`.
//! A slot is briefly in neither place on every release (sqlx pings it before it goes back
//! idle) and while a connection is being opened, so the exported figure is the smallest of
//! the last [`READINGS`] samples: only a slot stranded at each of them counts.
//! Acquires made with the bare `PgPool` (not `watch.pool()`) count too: use the watched pool
//! everywhere, or read the figure as "checked out, not through WatchedPool".

use std::sync::Mutex;

use sqlx::PgPool;

use crate::catalog::{self, POOL_NAME};

/// How many consecutive samples a slot must be stranded in to count.
pub(crate) const READINGS: usize = 3;

#[derive(Debug)]
pub(crate) struct Stranded {
    readings: Mutex<Vec<u32>>,
    gauge: crate::gauges::LazyGauge,
}

impl Stranded {
    /// At `Detail::Standard` the series appears at the first stranded slot (the series budget).
    pub(crate) fn new(pool_name: &str, detail: crate::Detail) -> Stranded {
        let gauge = crate::gauges::LazyGauge::new(
            catalog::STRANDED_SLOTS.name,
            vec![(POOL_NAME, pool_name.to_owned())],
            detail == crate::Detail::Full,
        );
        Stranded { readings: Mutex::new(Vec::with_capacity(READINGS)), gauge }
    }

    /// Takes one reading and publishes the figure; returns it.
    pub(crate) fn sample(&self, pool: &PgPool, watched_checkouts: usize) -> u32 {
        let used = pool.size().saturating_sub(u32::try_from(pool.num_idle()).unwrap_or(u32::MAX));
        let now = used.saturating_sub(u32::try_from(watched_checkouts).unwrap_or(u32::MAX));
        let Ok(mut r) = self.readings.lock() else { return 0 };
        if r.len() == READINGS {
            r.remove(0);
        }
        r.push(now);
        let figure = if r.len() == READINGS { r.iter().copied().min().unwrap_or(0) } else { 0 };
        self.gauge.set(f64::from(figure));
        figure
    }

    /// The last published figure.
    pub(crate) fn figure(&self) -> u32 {
        self.readings
            .lock()
            .map(|r| if r.len() == READINGS { r.iter().copied().min().unwrap_or(0) } else { 0 })
            .unwrap_or(0)
    }
}
