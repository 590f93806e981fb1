//! Why a session ended when the driver did not say: the evidence a [`WatchedListener`]
//! gathers and the rule that turns it into a [`Cause`].
//!
//! sqlx's `PgListener::try_recv` reads the server's `FATAL` (57P05 idle-session timeout,
//! 57P01 terminate) and drops it, then reports the end of file as a bare lost connection.
//! Two honest sources remain, and both are read on the listener's own connection at each
//! (re)connect, in one query (on reconnect, in the same round trip as LISTEN):
//! - the session's `idle_session_timeout` (`pg_settings`), compared with the time since the
//!   last command the listener sent (LISTEN or keepalive: notifications received do not
//!   count as activity for the server);
//! - the database's session-end counters (`pg_stat_database.sessions_killed`,
//!   `sessions_fatal`, PostgreSQL 14+), compared before and after the loss.
//!
//! [`WatchedListener`]: crate::listener::watched::WatchedListener

use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::cause::Cause;

/// What the server said about itself at one (re)connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ServerFacts {
    /// The session's `idle_session_timeout`; `None` when 0 (off) or unknown (before PostgreSQL 14).
    pub(crate) idle_session_timeout: Option<Duration>,
    /// The database's session-end counters; `None` before PostgreSQL 14.
    pub(crate) ends: Option<SessionEnds>,
}

/// `pg_stat_database` session-end counters of the current database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionEnds {
    /// Sessions ended by an operator or a shutdown (SIGTERM: `pg_terminate_backend`, fast shutdown).
    pub(crate) killed: i64,
    /// Sessions ended by a FATAL error (`idle_session_timeout` is one).
    pub(crate) fatal: i64,
}

impl ServerFacts {
    /// Whether the server has the facts (PostgreSQL 14+); older servers have neither the
    /// setting nor the counters, and their facts are the default (unknown).
    pub(crate) fn readable(conn: &PgConnection) -> bool {
        crate::server_version::has_session_counters(crate::server_version::of(conn))
    }

    /// Reads the facts on `conn`: one round trip, simple protocol (nothing prepared, so no
    /// Parse/Describe round trip and no statement cached), `current_setting` rather than the
    /// whole `pg_settings` view.
    pub(crate) async fn read(conn: &mut PgConnection) -> Result<ServerFacts, sqlx::Error> {
        if !Self::readable(conn) {
            return Ok(ServerFacts::default());
        }
        let row = crate::sqlx_adapter::fetch_one_simple(
            conn,
            "SELECT (extract(epoch FROM current_setting('idle_session_timeout')::interval) * 1000)::bigint, \
             sessions_killed, sessions_fatal FROM pg_stat_database WHERE datname = current_database()",
        )
        .await?;
        let (idle_ms, killed, fatal): (Option<i64>, Option<i64>, Option<i64>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        Ok(ServerFacts {
            idle_session_timeout: idle_ms.filter(|ms| *ms > 0).map(|ms| Duration::from_millis(ms.unsigned_abs())),
            ends: killed.zip(fatal).map(|(killed, fatal)| SessionEnds { killed, fatal }),
        })
    }

    /// The statements a listener appends to its LISTEN batch on reconnect (PostgreSQL 14+).
    /// A fresh backend has cold catalog caches, so this avoids every catalog lookup it can:
    /// `SHOW` needs none, and the counters are read by the database's oid (known from the first
    /// connect) with the two functions behind `pg_stat_database`, not through the view.
    /// Server time in a fresh backend: about 0.5 ms, against about 2.3 ms for [`ServerFacts::read`]'s query.
    pub(crate) fn reconnect_query(database: i64) -> String {
        format!(
            "SHOW idle_session_timeout;\
             SELECT pg_stat_get_db_sessions_killed({database}::oid), pg_stat_get_db_sessions_fatal({database}::oid)"
        )
    }

    /// The facts from the rows of a batch ending with [`ServerFacts::reconnect_query`].
    pub(crate) fn from_reconnect_rows(rows: &[PgRow]) -> Result<ServerFacts, sqlx::Error> {
        let [setting, counters] = rows else { return Err(sqlx::Error::RowNotFound) };
        let idle: String = setting.try_get(0)?;
        let (killed, fatal): (Option<i64>, Option<i64>) = (counters.try_get(0)?, counters.try_get(1)?);
        Ok(ServerFacts {
            idle_session_timeout: parse_ms_setting(&idle).filter(|t| !t.is_zero()),
            ends: killed.zip(fatal).map(|(killed, fatal)| SessionEnds { killed, fatal }),
        })
    }

    /// The oid of the connection's database, for [`ServerFacts::reconnect_query`].
    pub(crate) async fn database_oid(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
        let row = sqlx::raw_sql("SELECT oid::int8 FROM pg_database WHERE datname = current_database()")
            .fetch_one(conn)
            .await?;
        row.try_get(0)
    }
}

/// A millisecond setting as `SHOW` prints it: a whole number with the largest unit that
/// divides it (`0`, `250ms`, `10s`, `2min`, `1h`, `1d`). `None` when not in that form.
fn parse_ms_setting(shown: &str) -> Option<Duration> {
    let split = shown.find(|c: char| !c.is_ascii_digit()).unwrap_or(shown.len());
    let (number, unit) = shown.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms)?))
}

/// How a cause was established (the `poolwatch.listener.cause_basis` span attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Basis {
    /// The driver returned the error: the cause is exact.
    Observed,
    /// Inferred from the server's session-end counters (and the idle time for `idle_session_timeout`).
    ServerCounters,
    /// Inferred from the idle time alone (counters unavailable).
    IdleTime,
    /// Nothing pointed at the server: the peer closed the connection.
    NoServerEvidence,
}

impl Basis {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Basis::Observed => "observed",
            Basis::ServerCounters => "server_counters",
            Basis::IdleTime => "idle_time",
            Basis::NoServerEvidence => "no_server_evidence",
        }
    }
}

/// The rule for a connection lost with no error surfaced (documented in docs/listener.md):
/// 1. the session had been idle for at least `idle_session_timeout` (measured from just
///    before the last command was sent, so never underestimated) and the database's FATAL
///    count grew (or the counters are unavailable) → `idle_session_timeout`;
/// 2. else the database's killed count grew → `admin_shutdown`;
/// 3. else → `connection_ended` (the server did not end a session: a pooler, proxy or the
///    network closed it).
///
/// `before` are the counters read at the previous connect, `after` at the reconnect; a
/// decrease (statistics reset, crash restart) makes the counters unusable.
pub(crate) fn explain_silent_loss(
    idle_for: Duration,
    idle_session_timeout: Option<Duration>,
    before: Option<SessionEnds>,
    after: Option<SessionEnds>,
) -> (Cause, Basis) {
    let idle_expired = idle_session_timeout.is_some_and(|t| idle_for >= t);
    let grew = match (before, after) {
        (Some(b), Some(a)) if a.killed >= b.killed && a.fatal >= b.fatal => {
            Some((a.killed > b.killed, a.fatal > b.fatal))
        }
        _ => None,
    };
    match grew {
        Some((_, true)) if idle_expired => (Cause::IdleSessionTimeout, Basis::ServerCounters),
        Some((true, _)) => (Cause::AdminShutdown, Basis::ServerCounters),
        Some(_) => (Cause::ConnectionEnded, Basis::NoServerEvidence),
        None if idle_expired => (Cause::IdleSessionTimeout, Basis::IdleTime),
        None => (Cause::ConnectionEnded, Basis::NoServerEvidence),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ends(killed: i64, fatal: i64) -> Option<SessionEnds> {
        Some(SessionEnds { killed, fatal })
    }

    #[test]
    fn millisecond_settings_as_show_prints_them() {
        assert_eq!(parse_ms_setting("0"), Some(Duration::ZERO));
        assert_eq!(parse_ms_setting("10ms"), Some(Duration::from_millis(10)));
        assert_eq!(parse_ms_setting("2s"), Some(S * 2));
        assert_eq!(parse_ms_setting("3min"), Some(S * 180));
        assert_eq!(parse_ms_setting("1h"), Some(S * 3600));
        assert_eq!(parse_ms_setting("2d"), Some(S * 172_800));
        assert_eq!(parse_ms_setting("1.5s"), None);
        assert_eq!(parse_ms_setting("soon"), None);
    }

    #[test]
    fn the_silent_loss_rule() {
        let explain = explain_silent_loss;
        // Idle for the timeout and a FATAL counted: the server's idle-session timeout.
        assert_eq!(explain(S, Some(S), ends(0, 0), ends(0, 1)), (Cause::IdleSessionTimeout, Basis::ServerCounters));
        assert_eq!(explain(S * 3, Some(S), ends(0, 0), ends(0, 3)).0, Cause::IdleSessionTimeout);
        assert_eq!(explain(S * 99 / 100, Some(S), ends(0, 0), ends(0, 1)).0, Cause::ConnectionEnded);
        // Idle long enough, but the server ended no session: not the timeout.
        assert_eq!(explain(S * 2, Some(S), ends(0, 0), ends(0, 0)), (Cause::ConnectionEnded, Basis::NoServerEvidence));
        // A session killed, not idle long enough: an operator or a shutdown.
        assert_eq!(explain(S / 2, Some(S), ends(0, 0), ends(1, 0)), (Cause::AdminShutdown, Basis::ServerCounters));
        assert_eq!(explain(S * 5, None, ends(2, 0), ends(3, 1)).0, Cause::AdminShutdown);
        // FATAL counted but not idle long enough, nothing killed.
        assert_eq!(explain(S / 2, Some(S), ends(0, 0), ends(0, 1)).0, Cause::ConnectionEnded);
        // No counters (PostgreSQL < 14, or reset): the idle time alone.
        assert_eq!(explain(S, Some(S), None, None), (Cause::IdleSessionTimeout, Basis::IdleTime));
        assert_eq!(explain(S, Some(S), ends(5, 5), ends(0, 0)).1, Basis::IdleTime);
        assert_eq!(explain(S / 2, Some(S), None, None).0, Cause::ConnectionEnded);
        assert_eq!(explain(S * 9, None, None, None).0, Cause::ConnectionEnded);
    }
}
