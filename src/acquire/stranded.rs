//! Stranded slots: connections the pool counts as checked out that the app does not hold
//! through the watched pool (e.g. stuck in sqlx's return-to-pool ping after the peer went
//! silent, a leak no census shows: the session still exists on the server).
//!
//! Read at each sample as `pool.size() - pool.num_idle() - checkouts WatchedPool knows of`.
//! A slot is briefly in neither place on every release (sqlx pings it before it goes back
//! idle) and while a connection is being opened, so the exported figure is the smallest of
//! the last [`READINGS`] samples: only a slot stranded at each of them counts.
//!
//! With [`instrument_options_named`](crate::acquire::bare::instrument_options_named)'s hooks the reading is
//! exact on any pool, whoever drives it: the slots the app gave back (`after_release` seen,
//! not acquired again) that the pool does not count idle (sqlx 0.9.0 strands a permit this
//! way when the return-to-pool ping meets a silent peer, sqlx #4349). It is published from the
//! first sample on, and never counts a library's work.
//!
//! Without the hooks it is judged only once the app has acquired through the watched pool at least once: a pool that
//! only a library drives (a job queue, an ORM on the bare `PgPool`) has every checkout "not
//! through WatchedPool", so the figure would count the library's work, not stranded slots.
//! Until then it is absent (no series, `None` in the health report), not 0. From then on,
//! acquires made with the bare `PgPool` count too: use the watched pool everywhere, or read
//! the figure as "checked out, not through WatchedPool".

use std::sync::Mutex;

use sqlx::PgPool;

/// How many consecutive samples a slot must be stranded in to count.
pub(crate) const READINGS: usize = 3;

#[derive(Debug)]
pub(crate) struct Stranded {
    readings: Mutex<Vec<u32>>,
}

impl Stranded {
    pub(crate) fn new() -> Stranded {
        Stranded { readings: Mutex::new(Vec::with_capacity(READINGS)) }
    }

    /// Takes one reading; returns the figure. `released_not_idle` is the
    /// hooks' reading (`None` without them); else `watched_checkouts` is `None` until the
    /// app's first acquire through the watched pool: nothing is read.
    pub(crate) fn read(
        &self,
        pool: &PgPool,
        watched_checkouts: Option<usize>,
        released_not_idle: Option<u32>,
    ) -> Option<u32> {
        let now = match released_not_idle {
            Some(reading) => reading,
            None => {
                let watched = watched_checkouts?;
                let used = pool.size().saturating_sub(u32::try_from(pool.num_idle()).unwrap_or(u32::MAX));
                used.saturating_sub(u32::try_from(watched).unwrap_or(u32::MAX))
            }
        };
        let Ok(mut r) = self.readings.lock() else { return None };
        if r.len() == READINGS {
            r.remove(0);
        }
        r.push(now);
        judged(&r)
    }

    /// The last figure; `None` before [`READINGS`] samples since the first acquire
    /// through the watched pool.
    pub(crate) fn figure(&self) -> Option<u32> {
        self.readings.lock().ok().and_then(|r| judged(&r))
    }
}

/// The smallest of the last [`READINGS`] readings, once there are that many.
fn judged(readings: &[u32]) -> Option<u32> {
    if readings.len() == READINGS { readings.iter().copied().min() } else { None }
}
