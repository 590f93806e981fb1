//! Tags the connections a pool opened before it was instrumented.
//!
//! `instrument_pool` changes the pool's connect options, so every connection opened from then
//! on carries the tag in its startup packet. Those opened before do not: the idle ones, and
//! also those in flight at that moment, which an app nearly always has right after
//! `connect_with` (sqlx returns the first connection to the pool, and opens the
//! `min_connections` fills, on tasks of their own). An untagged connection is counted by no
//! census: a false phantom slot for good. So the idle ones are taken at once, and the rest are
//! waited for until the pool settles (every connection idle, none opening); then all are
//! re-tagged, concurrently, under one overall deadline.
//!
//! Straight to the server, `set_config` re-tags a session (`pg_stat_activity` shows it at
//! once). Behind a pooler it does not, reliably: PgBouncer learns a client's
//! `application_name` only from the server's `ParameterStatus`, which the server sends only
//! when the value changes; a server connection that already carries the tag (another client
//! of the pool used it) reports nothing, and `SHOW CLIENTS` keeps the old name. So behind a
//! pooler the old connections are closed instead: the pool opens new ones (with the tag in the
//! startup packet) on demand, and sqlx refills `min_connections` at once.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How often the pool is looked at while waiting for it to settle (two atomic reads, no I/O).
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// The connections taken from the pool at instrument time, and how many it had besides.
#[derive(Debug, Default)]
pub(crate) struct Untagged {
    held: Vec<PoolConnection<Postgres>>,
    /// Connections counted by the pool but not idle then: checked out, or being opened or
    /// returned by sqlx's own tasks.
    elsewhere: u32,
}

impl Untagged {
    /// Takes the pool's idle connections now (no waiting, no ping), so the app cannot check
    /// them out before they are re-tagged.
    pub(crate) fn take(pool: &PgPool) -> Untagged {
        let held: Vec<_> = std::iter::from_fn(|| pool.try_acquire()).take(pool.num_idle()).collect();
        let elsewhere = pool.size().saturating_sub(u32::try_from(held.len()).unwrap_or(u32::MAX));
        Untagged { held, elsewhere }
    }
}

/// How the old connections get the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `set_config` on the session (straight to the server).
    SetConfig,
    /// Close them; the pool opens tagged ones (behind a pooler).
    Reconnect,
}

/// What a re-tag did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Connections re-tagged (or closed, with [`Method::Reconnect`]).
    pub(crate) retagged: usize,
    /// Re-tags that failed or did not finish before the deadline.
    pub(crate) failed: usize,
    /// Connections that were not idle at instrument time and that the pool never settled
    /// enough to reach before the deadline (checked out by the app all along, typically).
    pub(crate) unreached: u32,
}

/// The statement that re-tags a connection with `app_name` (a literal: simple protocol).
pub(crate) fn retag_sql(app_name: &str) -> String {
    format!("SELECT set_config('application_name', {}, false)", literal(app_name))
}

/// `s` as an SQL string literal, whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Re-tags `untagged` and then, if the pool had connections elsewhere, every connection of
/// the pool at the first moment all of them are idle; gives every connection back. Bounded by
/// `within` overall.
pub(crate) async fn retag(
    pool: &PgPool,
    untagged: Untagged,
    app_name: &str,
    method: Method,
    within: Duration,
) -> Outcome {
    let until = Instant::now() + within;
    let sql = (method == Method::SetConfig).then(|| retag_sql(app_name));
    let mut outcome = Outcome { retagged: 0, failed: 0, unreached: untagged.elsewhere };
    let held = untagged.held;
    let (ok, failed) = retag_all(held, &sql, until).await;
    (outcome.retagged, outcome.failed) = (ok, failed);
    while outcome.unreached > 0 && !pool.is_closed() && Instant::now() < until {
        let idle = pool.num_idle();
        if u32::try_from(idle).is_ok_and(|idle| idle >= pool.size()) {
            let held: Vec<_> = std::iter::from_fn(|| pool.try_acquire()).take(idle).collect();
            let complete = u32::try_from(held.len()).is_ok_and(|n| n >= pool.size());
            let (ok, failed) = retag_all(held, &sql, until).await;
            outcome.retagged += ok;
            outcome.failed += failed;
            if complete {
                outcome.unreached = 0;
                break;
            }
        }
        tokio::time::sleep_until(until.min(Instant::now() + SETTLE_POLL)).await;
    }
    outcome
}

/// Re-tags `held` concurrently with `sql`, or closes them without it; returns (succeeded,
/// failed). Each connection goes back to the pool as its statement ends; those still running
/// at `until` are cancelled (sqlx checks a cancelled connection before reusing it).
async fn retag_all(held: Vec<PoolConnection<Postgres>>, sql: &Option<String>, until: Instant) -> (usize, usize) {
    let mut set = JoinSet::new();
    for mut conn in held {
        match sql.clone() {
            Some(sql) => set.spawn(async move { crate::sqlx_adapter::fetch_all_text(&mut conn, sql).await.is_ok() }),
            None => set.spawn(async move { conn.close().await.is_ok() }),
        };
    }
    let (mut ok, mut failed) = (0, 0);
    let joined = tokio::time::timeout_at(until, async {
        while let Some(done) = set.join_next().await {
            match done {
                Ok(true) => ok += 1,
                _ => failed += 1,
            }
        }
    })
    .await;
    if joined.is_err() {
        failed += set.len();
        set.abort_all();
    }
    (ok, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_quoted_as_a_literal() {
        assert_eq!(retag_sql("api pw:main"), "SELECT set_config('application_name', E'api pw:main', false)");
        assert_eq!(literal(r"o'k\x"), r"E'o''k\\x'");
    }
}
