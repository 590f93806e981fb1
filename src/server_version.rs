//! Which PostgreSQL versions have what poolwatch reads or sets: one gate per feature, each a
//! plain function of `server_version_num` (sqlx reads it from the startup handshake), so the
//! versions that cannot run here (12, 13, 16+) are covered by unit tests.

use std::sync::atomic::{AtomicU32, Ordering};

/// The first version with `idle_session_timeout` (a setting an older server rejects, FATAL
/// when sent in the startup packet).
pub(crate) const IDLE_SESSION_TIMEOUT: u32 = 140_000;

/// The first version with `pg_stat_database.sessions_killed` / `sessions_fatal` (and
/// `pg_stat_get_db_sessions_killed`/`_fatal`).
pub(crate) const SESSION_COUNTERS: u32 = 140_000;

/// Whether `version` has `idle_session_timeout`. Unknown (a proxy that does not report the
/// version): assumed, and a failing `SET` is ignored.
pub(crate) fn has_idle_session_timeout(version: Option<u32>) -> bool {
    version.is_none_or(|v| v >= IDLE_SESSION_TIMEOUT)
}

/// Whether `version` has the session-end counters of `pg_stat_database`. Unknown: assumed.
pub(crate) fn has_session_counters(version: Option<u32>) -> bool {
    version.is_none_or(|v| v >= SESSION_COUNTERS)
}

/// A version the tests make poolwatch believe (0: the server's own).
static PRETEND: AtomicU32 = AtomicU32::new(0);

/// The version of the server `conn` talks to, as poolwatch's gates see it.
pub(crate) fn of(conn: &sqlx::PgConnection) -> Option<u32> {
    match PRETEND.load(Ordering::Relaxed) {
        0 => conn.server_version_num(),
        v => Some(v),
    }
}

/// For tests only: makes every gate of this process see `version_num` (e.g. `130000`) instead
/// of the server's own (`None`: the server's again). Lets PostgreSQL 15 run the paths taken on
/// older servers.
#[doc(hidden)]
pub fn pretend_server_version(version_num: Option<u32>) {
    PRETEND.store(version_num.unwrap_or(0), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_by_version() {
        for (v, idle, counters) in [
            (120_000, false, false),
            (130_014, false, false),
            (140_000, true, true),
            (150_018, true, true),
            (180_000, true, true),
        ] {
            assert_eq!(has_idle_session_timeout(Some(v)), idle, "{v}");
            assert_eq!(has_session_counters(Some(v)), counters, "{v}");
        }
        assert!(has_idle_session_timeout(None) && has_session_counters(None), "unknown: assumed");
    }
}
