//! One small, stable set of causes for connection failures, shared by every part of
//! poolwatch (census, heartbeats, listener, acquire spans).
//!
//! A cause is used as the `cause` metric label and the `error.type` span attribute, so the
//! set is closed: adding a cause is a minor change, renaming one is breaking.

use std::fmt;
use std::io::ErrorKind;

/// Why a connection or an operation on it failed.
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
    /// Anything else.
    Other,
}

impl Cause {
    /// Every cause, in a fixed order (for dashboards, docs and tests).
    pub const ALL: [Cause; 16] = [
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
            Cause::Other => "other",
        }
    }

    /// Classifies a sqlx error.
    pub fn of(err: &sqlx::Error) -> Cause {
        match err {
            sqlx::Error::Database(db) => db.code().map_or(Cause::Other, |c| Cause::of_sqlstate(&c)),
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
    fn socket_errors_lose_the_connection_pool_errors_do_not() {
        let io = |kind| sqlx::Error::Io(std::io::Error::from(kind));
        assert!(connection_lost(&io(ErrorKind::UnexpectedEof)));
        assert!(connection_lost(&io(ErrorKind::ConnectionReset)));
        assert!(!connection_lost(&sqlx::Error::PoolTimedOut));
        assert!(!connection_lost(&sqlx::Error::PoolClosed));
    }
}
