//! Lifecycle figures: connections opened, closed by reason, and the oldest connection's age
//! (what pgx, bb8 and Go's `database/sql` report and sqlx does not).
//!
//! sqlx 0.9 has hooks for a connection opened (`after_connect`), handed out from the idle
//! queue (`before_acquire`) and given back (`after_release`), each with the connection's age,
//! but none for a close, and its pool counts only what is open now (`size()`). So:
//!
//! - **opened** is counted by the `after_connect` hook;
//! - **closed** = opened minus what the pool counts open, read at each sample;
//! - **the reason** of each close is inferred from sqlx's rules and what the hooks last saw of
//!   each connection: the pool is closed (`pool_closed`); a connection idle past `idle_timeout`
//!   (`idle_timeout`: only sqlx's reaper closes idle ones); one older than `max_lifetime`
//!   (`max_lifetime`: the reaper, or on release, where sqlx checks the age before
//!   `after_release`); anything else is `broken` (a failed ping on release or on acquire, a
//!   failed connection dropped by the app, or a `close()` / `detach()` by the app).
//! - **the oldest age** is the oldest connection the hooks saw opened and not yet counted closed.
//!
//! What sqlx hides: which connection closed. When several could have closed, the one sqlx's
//! queue order makes likeliest is taken (the longest idle). A connection opened for an acquire
//! goes to the app without `before_acquire`: until its first release it reads as idle since
//! its connect, so a broken close next to it can read as `idle_timeout` when it is held longer
//! than `idle_timeout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, counter, gauge};
use sqlx::PgPool;

use crate::catalog::{self, POOL_NAME};

/// Why a connection closed, as far as sqlx lets it be told (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Idle past the pool's `idle_timeout` (closed by sqlx's reaper).
    IdleTimeout,
    /// Older than the pool's `max_lifetime`.
    MaxLifetime,
    /// Any other close: a failed ping, an error, or closed or detached by the app.
    Broken,
    /// The pool was closed.
    PoolClosed,
}

impl CloseReason {
    /// Every reason, in the order of [`LifecycleFigures::closed`].
    pub const ALL: [CloseReason; 4] =
        [CloseReason::IdleTimeout, CloseReason::MaxLifetime, CloseReason::Broken, CloseReason::PoolClosed];

    /// The label value (`reason` of `poolwatch_connections_closed_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::Broken => "broken",
            CloseReason::PoolClosed => "pool_closed",
        }
    }
}

/// The lifecycle figures of one pool (needs the hooks of
/// [`instrument_options_named`](crate::instrument_options_named)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LifecycleFigures {
    /// Connections opened since the hooks were installed.
    pub opened: u64,
    /// Connections closed, by reason, indexed like [`CloseReason::ALL`].
    pub closed: [u64; 4],
    /// Connections opened and not yet counted closed.
    pub open: u32,
    /// How old the oldest of them is (`None`: none open).
    pub oldest_age: Option<Duration>,
}

impl LifecycleFigures {
    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL.iter().position(|r| *r == reason).map_or(0, |i| self.closed[i])
    }
}

/// One connection as the hooks last saw it.
#[derive(Debug, Clone, Copy)]
struct Conn {
    /// When `after_connect` ran (at most a few µs before sqlx's own `created_at`).
    created: Instant,
    /// Since when it has been idle, by the last hook (connect or release); `None`: handed out.
    idle_since: Option<Instant>,
}

/// The lifecycle ledger of one pool name, kept with its other bare-pool figures
/// (`bare::BareFigures`, the one registry of pools by name).
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    opened: AtomicU64,
    closed: [AtomicU64; 4],
    conns: Mutex<Vec<Conn>>,
}

impl Lifecycle {
    /// `after_connect`: one more connection, idle as far as the hooks know.
    pub(crate) fn on_connect(&self) {
        let now = Instant::now();
        self.opened.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut conns) = self.conns.lock() {
            conns.push(Conn { created: now, idle_since: Some(now) });
        }
    }

    /// `before_acquire` (`idle_since` = `None`) or `after_release` (`Some(now)`): the
    /// connection of age `age` (the one opened nearest `now - age`) changed hands.
    pub(crate) fn seen(&self, age: Duration, idle_since: Option<Instant>) {
        let Some(created) = Instant::now().checked_sub(age) else { return };
        let Ok(mut conns) = self.conns.lock() else { return };
        let distance = |c: &Conn| c.created.max(created) - c.created.min(created);
        if let Some(c) = conns.iter_mut().min_by_key(|c| distance(c)) {
            c.idle_since = idle_since;
        }
    }

    /// Counts the closes since the last call: the connections the hooks saw opened that the
    /// pool no longer counts. Returns how many closed, by reason (like [`CloseReason::ALL`]).
    pub(crate) fn reconcile(&self, pool: &PgPool) -> [u64; 4] {
        let mut new = [0u64; 4];
        let Ok(mut conns) = self.conns.lock() else { return new };
        // Read under the lock: `after_connect` runs after the pool counted the connection, so
        // a connection being opened makes this read low, never high.
        let size = pool.size() as usize;
        let gone = conns.len().saturating_sub(size);
        if gone == 0 {
            return new;
        }
        let options = pool.options();
        let now = Instant::now();
        for _ in 0..gone {
            let (i, reason) = if pool.is_closed() {
                (oldest(&conns), CloseReason::PoolClosed)
            } else {
                pick(&conns, now, options.get_idle_timeout(), options.get_max_lifetime())
            };
            conns.swap_remove(i);
            let r = CloseReason::ALL.iter().position(|x| *x == reason).unwrap_or(2);
            new[r] += 1;
            self.closed[r].fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// The figures now (after [`reconcile`](Self::reconcile)).
    pub(crate) fn figures(&self) -> LifecycleFigures {
        let now = Instant::now();
        let (open, oldest_age) = self.conns.lock().map_or((0, None), |conns| {
            let oldest = conns.iter().map(|c| now.saturating_duration_since(c.created)).max();
            (u32::try_from(conns.len()).unwrap_or(u32::MAX), oldest)
        });
        LifecycleFigures {
            opened: self.opened.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
            open,
            oldest_age,
        }
    }
}

fn oldest(conns: &[Conn]) -> usize {
    conns.iter().enumerate().min_by_key(|(_, c)| c.created).map_or(0, |(i, _)| i)
}

/// The connection that most likely closed, and why: the longest idle one past `idle_timeout`
/// (sqlx's reaper checks that first), else the oldest past `max_lifetime`, else the longest
/// idle one (a failed ping on acquire takes the head of sqlx's idle queue) or the oldest.
fn pick(
    conns: &[Conn],
    now: Instant,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
) -> (usize, CloseReason) {
    let longest_idle = conns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.idle_since.map(|t| (i, now.saturating_duration_since(t))))
        .max_by_key(|(_, idle)| *idle);
    if let (Some((i, idle)), Some(timeout)) = (longest_idle, idle_timeout)
        && idle >= timeout
    {
        return (i, CloseReason::IdleTimeout);
    }
    let o = oldest(conns);
    if let (Some(c), Some(max)) = (conns.get(o), max_lifetime)
        && now.saturating_duration_since(c.created) >= max
    {
        return (o, CloseReason::MaxLifetime);
    }
    (longest_idle.map_or(o, |(i, _)| i), CloseReason::Broken)
}

/// One watched pool's lifecycle metrics: the oldest age always, the counters (at 0 from the
/// start) at [`Detail::Full`](crate::Detail::Full) (the series budget of `Detail::Standard`).
#[derive(Debug)]
pub(crate) struct Published {
    ledger: Arc<Lifecycle>,
    pool: PgPool,
    oldest: Gauge,
    /// The closes by reason (the opens are `poolwatch_pool_connects_total`, counted by the
    /// same hook in `bare.rs`).
    closed: Option<[Counter; 4]>,
}

impl Published {
    /// The metrics of `pool_name`, if its options carry the hooks.
    pub(crate) fn new(pool: &PgPool, pool_name: &str, detail: crate::Detail) -> Option<Published> {
        let ledger = crate::acquire::bare::lifecycle_of(pool_name)?;
        let p = pool_name.to_owned();
        let closed = (detail == crate::Detail::Full).then(|| {
            CloseReason::ALL.map(
                |r| counter!(catalog::CONNECTIONS_CLOSED.name, POOL_NAME => p.clone(), catalog::REASON => r.as_str()),
            )
        });
        let published = Published {
            oldest: gauge!(catalog::CONNECTION_OLDEST_AGE.name, POOL_NAME => p),
            closed,
            ledger,
            pool: pool.clone(),
        };
        published.update();
        Some(published)
    }

    /// Counts the closes since the last update and publishes the figures.
    pub(crate) fn update(&self) -> LifecycleFigures {
        self.ledger.reconcile(&self.pool);
        let f = self.ledger.figures();
        self.oldest.set(f.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        if let Some(closed) = &self.closed {
            for (c, n) in closed.iter().zip(f.closed) {
                c.absolute(n);
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_likeliest_close_is_picked_by_sqlx_rules() {
        let now = Instant::now();
        let ago = |s: u64| now - Duration::from_secs(s);
        let conns = [
            Conn { created: ago(100), idle_since: None },
            Conn { created: ago(50), idle_since: Some(ago(40)) },
            Conn { created: ago(30), idle_since: Some(ago(5)) },
        ];
        let s = Duration::from_secs;
        assert_eq!(pick(&conns, now, Some(s(30)), None), (1, CloseReason::IdleTimeout));
        assert_eq!(pick(&conns, now, Some(s(60)), Some(s(90))), (0, CloseReason::MaxLifetime));
        assert_eq!(pick(&conns, now, Some(s(60)), Some(s(120))), (1, CloseReason::Broken));
        assert_eq!(pick(&conns, now, None, None), (1, CloseReason::Broken));
    }
}
