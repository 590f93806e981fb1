//! One small, stable set of causes for connection failures, shared by every part of
//! poolwatch (census, heartbeats, listener, acquire spans).
//!
//! A cause is used as the `cause` metric label and the `error.type` span attribute, so the
//! set is closed: adding a cause is a minor change, renaming one is breaking.

use std::fmt;
use std::io::ErrorKind;

/// Why a connection or an operation on it failed.
///
/// Every `cause` label and `error.type` span attribute takes its value from this one closed set,
/// shared by the census, heartbeats, listener and acquire spans. Renaming one is a breaking
/// change (CHANGELOG).
///
/// | cause | what produces it | alerts that use it |
/// |---|---|---|
/// | `idle_session_timeout` | SQLSTATE 57P05: the server ended a session idle longer than `idle_session_timeout` (incident 1); for a listener inferred when sqlx hides the FATAL (see `evidence`) | PoolwatchListenerIdleSessionTimeout, PoolwatchListenerReconnectLoop |
/// | `admin_shutdown` | 57P01: `pg_terminate_backend`, a fast or smart server shutdown | PoolwatchListenerReconnectLoop, PoolwatchDatabaseDown |
/// | `crash_shutdown` | 57P02: a backend crashed, the server restarted every session | PoolwatchDatabaseDown |
/// | `cannot_connect_now` | 57P03: the server is starting, stopping or in recovery | PoolwatchDatabaseDown, PoolwatchListenerDown |
/// | `idle_in_transaction_timeout` | 25P03: `idle_in_transaction_session_timeout` ended a session | PoolwatchListenerReconnectLoop |
/// | `too_many_connections` | 53300: no connection slot left on the server or pooler | PoolwatchDatabaseDown |
/// | `connection_ended` | unexpected EOF / 08006: the peer (server, pooler, proxy) closed the socket (incident 2's `CONNECTION_ENDED`) | PoolwatchListenerReconnectLoop |
/// | `connection_reset` | TCP RST from the peer, a proxy, a firewall or NAT | PoolwatchListenerReconnectLoop |
/// | `broken_pipe` | a write to a socket the peer had closed | PoolwatchListenerReconnectLoop |
/// | `timed_out` | poolwatch's own timeout, a socket timeout, `statement_timeout` (57014) | PoolwatchDatabaseDown, PoolwatchCensusDown |
/// | `refused` | nothing listens at the address / 08001, 08004 | PoolwatchDatabaseDown, PoolwatchCensusDown |
/// | `pool_timed_out` | `acquire()` waited `acquire_timeout` for a slot (incident 4) | PoolwatchPoolExhausted, PoolwatchAcquireTimeouts |
/// | `pool_closed` | the pool was closed | - |
/// | `tls` | TLS negotiation failed | PoolwatchDatabaseDown |
/// | `auth` | SQLSTATE class 28: authentication failed | PoolwatchDatabaseDown |
/// | `pooler_idle_timeout` | PgBouncer `client_idle_timeout`: the pooler closed a client connection idle (in the pool, or held by the app) longer than its limit; incident 1 behind a pooler | PoolwatchSessionsEndedByPooler |
/// | `pooler_wait_timeout` | PgBouncer `query_wait_timeout`: a query waited too long for one of the pooler's server connections; the pooler's pool (`default_pool_size`), not the app's, is exhausted | PoolwatchSessionsEndedByPooler |
/// | `other` | anything else | - |
///
/// Each case is driven by a real server or socket in the tests: `idle_session_timeout` on the
/// throwaway cluster, `pg_terminate_backend`, a stopped server, and a loopback proxy that resets
/// or half-closes connections.
///
/// # Behind a pooler
///
/// PgBouncer sends every error of its own as SQLSTATE 08P01 with the reason
/// as the message; [`Cause::of`] reads the message ([`Cause::of_pooler_message`]). Each row below is
/// triggered through a real PgBouncer in `tests/pooler_causes.rs`, in the app's error and, where
/// poolwatch's pool-path heartbeat meets it, in `poolwatch_heartbeat_failures_total{cause}` and the
/// `poolwatch.heartbeat` span's `error.type`:
///
/// | PgBouncer says (FATAL 08P01) | when | cause |
/// |---|---|---|
/// | `client_idle_timeout` | a client idle longer than `client_idle_timeout` (transaction mode; PgBouncer never applies it to a client linked to a server, i.e. a session-mode client after its first query) | `pooler_idle_timeout` |
/// | `query_wait_timeout` | a query waited `query_wait_timeout` for a server connection | `pooler_wait_timeout` |
/// | `no more connections allowed (max_client_conn)` | a new client over `max_client_conn` | `too_many_connections` |
/// | `server conn crashed?` | the server connection died under the client's query (server crash, network cut) | `connection_ended` |
/// | `idle transaction timeout` | PgBouncer's `idle_transaction_timeout` | `idle_in_transaction_timeout` |
/// | `query timeout`, `query_timeout` | PgBouncer's `query_timeout` | `timed_out` |
/// | `client_login_timeout (server down)`, `server login has been failing, ...` | PgBouncer cannot log in to the server behind it | `cannot_connect_now` |
/// | `client_login_timeout` | the client did not finish logging in within `client_login_timeout` | `timed_out` |
/// | `database removed`, `database configuration changed`, `suspend_timeout` | an admin's `KILL`, a `RELOAD` that changed `[databases]`, `SUSPEND` | `admin_shutdown` |
/// | `password authentication failed`, `server login failed: ...`, `no such user`, ... | authentication | `auth` |
/// | server FATALs (57P05, 57P01, ...) | forwarded by PgBouncer to a linked client (session mode, or mid-transaction) | the server's cause |
///
/// PgBouncer's `server_idle_timeout` and `server_lifetime` close only server connections no client
/// is linked to: the client never sees them (the next query gets another server connection), so
/// they produce no error and no cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// SQLSTATE 57P05: the server ended an idle session (`idle_session_timeout`).
    IdleSessionTimeout,
    /// SQLSTATE 57P01: an administrator ended the session (`pg_terminate_backend`, smart/fast shutdown).
    AdminShutdown,
    /// SQLSTATE 57P02: the server crashed or another backend crashed.
    CrashShutdown,
    /// SQLSTATE 57P03: the server is starting, stopping or in recovery.
    CannotConnectNow,
    /// SQLSTATE 25P03: `idle_in_transaction_session_timeout` ended the session.
    IdleInTransactionTimeout,
    /// SQLSTATE 53300: the server (or a pooler) has no connection slot left.
    TooManyConnections,
    /// The peer closed the connection (unexpected EOF, SQLSTATE 08006): the server, a pooler or a proxy hung up.
    ConnectionEnded,
    /// The peer reset the connection (TCP RST).
    ConnectionReset,
    /// A write hit a connection already closed by the peer.
    BrokenPipe,
    /// A timeout: poolwatch's own, a socket's, or `statement_timeout` (SQLSTATE 57014).
    TimedOut,
    /// Nothing listens at the address, or the server refused the connection.
    Refused,
    /// `acquire()` waited `acquire_timeout` and got no connection.
    PoolTimedOut,
    /// The pool is closed.
    PoolClosed,
    /// TLS negotiation failed.
    Tls,
    /// Authentication failed (SQLSTATE class 28).
    Auth,
    /// A pooler ended a client connection idle longer than its idle limit (PgBouncer
    /// `client_idle_timeout`): incident 1 behind a pooler. The fix is on the pool (an
    /// `idle_timeout` below the pooler's) or the pooler, never the server.
    PoolerIdleTimeout,
    /// A pooler gave up waiting for one of its server connections (PgBouncer
    /// `query_wait_timeout`): the pooler's own pool toward the server is exhausted, not the app's.
    PoolerWaitTimeout,
    /// Anything else.
    Other,
}

impl Cause {
    /// Every cause, in a fixed order (for dashboards, docs and tests).
    pub const ALL: [Cause; 18] = [
        Cause::IdleSessionTimeout,
        Cause::AdminShutdown,
        Cause::CrashShutdown,
        Cause::CannotConnectNow,
        Cause::IdleInTransactionTimeout,
        Cause::TooManyConnections,
        Cause::ConnectionEnded,
        Cause::ConnectionReset,
        Cause::BrokenPipe,
        Cause::TimedOut,
        Cause::Refused,
        Cause::PoolTimedOut,
        Cause::PoolClosed,
        Cause::Tls,
        Cause::Auth,
        Cause::PoolerIdleTimeout,
        Cause::PoolerWaitTimeout,
        Cause::Other,
    ];

    /// The label value, e.g. `idle_session_timeout`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Cause::IdleSessionTimeout => "idle_session_timeout",
            Cause::AdminShutdown => "admin_shutdown",
            Cause::CrashShutdown => "crash_shutdown",
            Cause::CannotConnectNow => "cannot_connect_now",
            Cause::IdleInTransactionTimeout => "idle_in_transaction_timeout",
            Cause::TooManyConnections => "too_many_connections",
            Cause::ConnectionEnded => "connection_ended",
            Cause::ConnectionReset => "connection_reset",
            Cause::BrokenPipe => "broken_pipe",
            Cause::TimedOut => "timed_out",
            Cause::Refused => "refused",
            Cause::PoolTimedOut => "pool_timed_out",
            Cause::PoolClosed => "pool_closed",
            Cause::Tls => "tls",
            Cause::Auth => "auth",
            Cause::PoolerIdleTimeout => "pooler_idle_timeout",
            Cause::PoolerWaitTimeout => "pooler_wait_timeout",
            Cause::Other => "other",
        }
    }

    /// Classifies a sqlx error.
    pub fn of(err: &sqlx::Error) -> Cause {
        match err {
            sqlx::Error::Database(db) => match db.code() {
                Some(code) if code == POOLER_SQLSTATE => Cause::of_pooler_message(db.message()),
                Some(code) => Cause::of_sqlstate(&code),
                None => Cause::Other,
            },
            sqlx::Error::Io(io) => Cause::of_io(io.kind()),
            sqlx::Error::Tls(_) => Cause::Tls,
            sqlx::Error::PoolTimedOut => Cause::PoolTimedOut,
            sqlx::Error::PoolClosed => Cause::PoolClosed,
            _ => Cause::Other,
        }
    }

    /// Classifies a server SQLSTATE.
    pub fn of_sqlstate(code: &str) -> Cause {
        match code {
            "57P05" => Cause::IdleSessionTimeout,
            "57P01" => Cause::AdminShutdown,
            "57P02" => Cause::CrashShutdown,
            "57P03" => Cause::CannotConnectNow,
            "25P03" => Cause::IdleInTransactionTimeout,
            "53300" => Cause::TooManyConnections,
            "08006" | "08003" => Cause::ConnectionEnded,
            "08001" | "08004" => Cause::Refused,
            "57014" => Cause::TimedOut,
            c if c.starts_with("28") => Cause::Auth,
            _ => Cause::Other,
        }
    }

    /// Classifies a pooler's error message. PgBouncer sends every error of its own as SQLSTATE
    /// 08P01 (`protocol_violation`) with the reason as the message, so the message is the only
    /// way to tell its kills apart. Matched on PgBouncer's wording (1.x); unknown text: `other`.
    /// The messages it knows and the cause of each: the "Behind a pooler" table on [`Cause`].
    pub fn of_pooler_message(message: &str) -> Cause {
        let m = message.trim();
        let starts = |p: &str| m.starts_with(p);
        if starts("client_idle_timeout") {
            Cause::PoolerIdleTimeout
        } else if starts("query_wait_timeout") {
            Cause::PoolerWaitTimeout
        } else if starts("no more connections allowed") {
            Cause::TooManyConnections
        } else if starts("server conn crashed?") || starts("server connection closed") || starts("unexpected eof") {
            Cause::ConnectionEnded
        } else if starts("idle transaction timeout") || starts("idle_transaction_timeout") {
            Cause::IdleInTransactionTimeout
        } else if starts("client_login_timeout (server down)")
            || starts("server login has been failing")
            || starts("pgbouncer cannot connect to server")
        {
            // The pooler cannot reach the server behind it: the database is down for the app.
            Cause::CannotConnectNow
        } else if starts("query timeout") || starts("query_timeout") || starts("client_login_timeout") {
            Cause::TimedOut
        } else if starts("database removed") || starts("suspend_timeout") || starts("database configuration changed") {
            // An administrator's act on the pooler: KILL, RELOAD with a changed [databases], SUSPEND.
            Cause::AdminShutdown
        } else if starts("server login failed")
            || starts("password authentication failed")
            || starts("SASL authentication failed")
            || starts("\"trust\" authentication failed")
            || starts("no such user")
            || starts("login rejected")
        {
            Cause::Auth
        } else {
            Cause::Other
        }
    }

    /// Classifies a client-side socket error.
    pub fn of_io(kind: ErrorKind) -> Cause {
        match kind {
            ErrorKind::UnexpectedEof | ErrorKind::NotConnected => Cause::ConnectionEnded,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Cause::ConnectionReset,
            ErrorKind::BrokenPipe => Cause::BrokenPipe,
            ErrorKind::TimedOut => Cause::TimedOut,
            ErrorKind::ConnectionRefused => Cause::Refused,
            _ => Cause::Other,
        }
    }
}

/// The SQLSTATE PgBouncer gives every error of its own (`protocol_violation`).
const POOLER_SQLSTATE: &str = "08P01";

/// Whether `err` means the connection is gone: any socket error, or a FATAL (or PANIC)
/// from the server, which closes the session after sending it.
pub(crate) fn connection_lost(err: &sqlx::Error) -> bool {
    use sqlx::postgres::{PgDatabaseError, PgSeverity};
    match err {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
        _ => false,
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Cause {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Cause::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "duplicate cause {s}");
            assert!(s.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'), "{s}");
        }
    }

    #[test]
    fn sqlstates_and_socket_errors_map_to_documented_causes() {
        assert_eq!(Cause::of_sqlstate("57P05"), Cause::IdleSessionTimeout);
        assert_eq!(Cause::of_sqlstate("57P01"), Cause::AdminShutdown);
        assert_eq!(Cause::of_sqlstate("25P03"), Cause::IdleInTransactionTimeout);
        assert_eq!(Cause::of_sqlstate("28P01"), Cause::Auth);
        assert_eq!(Cause::of_sqlstate("42P01"), Cause::Other);
        assert_eq!(Cause::of_io(ErrorKind::UnexpectedEof), Cause::ConnectionEnded);
        assert_eq!(Cause::of_io(ErrorKind::ConnectionReset), Cause::ConnectionReset);
        assert_eq!(Cause::of(&sqlx::Error::PoolTimedOut), Cause::PoolTimedOut);
    }

    #[test]
    fn pgbouncer_messages_map_to_named_causes() {
        let cases = [
            ("client_idle_timeout", Cause::PoolerIdleTimeout),
            ("query_wait_timeout", Cause::PoolerWaitTimeout),
            ("no more connections allowed (max_client_conn)", Cause::TooManyConnections),
            ("server conn crashed?", Cause::ConnectionEnded),
            ("idle transaction timeout", Cause::IdleInTransactionTimeout),
            ("client_login_timeout (server down)", Cause::CannotConnectNow),
            ("server login has been failing, try again later (server_login_retry)", Cause::CannotConnectNow),
            ("query timeout", Cause::TimedOut),
            ("client_login_timeout", Cause::TimedOut),
            ("database removed", Cause::AdminShutdown),
            ("password authentication failed", Cause::Auth),
            ("unsupported startup parameter: options", Cause::Other),
        ];
        for (message, cause) in cases {
            assert_eq!(Cause::of_pooler_message(message), cause, "{message}");
        }
    }

    #[test]
    fn socket_errors_lose_the_connection_pool_errors_do_not() {
        let io = |kind| sqlx::Error::Io(std::io::Error::from(kind));
        assert!(connection_lost(&io(ErrorKind::UnexpectedEof)));
        assert!(connection_lost(&io(ErrorKind::ConnectionReset)));
        assert!(!connection_lost(&sqlx::Error::PoolTimedOut));
        assert!(!connection_lost(&sqlx::Error::PoolClosed));
    }
}
