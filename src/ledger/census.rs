//! The server census: which backends in `pg_stat_activity` really belong to this pool of this
//! process (see [`attribution`](crate::ledger::attribution) for how they are told apart).

use std::time::Duration;

use sqlx::postgres::PgConnection;

/// `pg_stat_activity.state` values, as label values (a fixed set); `unknown` is a NULL state,
/// seen when the census role may not read another role's session details.
pub const SESSION_STATES: [&str; 7] = [
    "active",
    "idle",
    "idle_in_transaction",
    "idle_in_transaction_aborted",
    "fastpath_function_call",
    "disabled",
    "unknown",
];

/// The pool's real server sessions, by state, indexed like [`SESSION_STATES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerCensus {
    /// `counts[i]` sessions are in state `SESSION_STATES[i]`.
    pub counts: [u32; 7],
    /// `longest[i]`: the longest any of those sessions has been in that state (since
    /// `state_change`). A long `idle_in_transaction` is a transaction left open; a long
    /// `active` a stuck or slow statement (incident 3). Zero where the role may not see it.
    pub longest: [Duration; 7],
    /// Sessions waiting for a lock now (`wait_event_type = 'Lock'`).
    pub lock_waiters: u32,
    /// Advisory locks the pool's sessions hold (session- and transaction-scoped).
    pub advisory_locks: u32,
    /// The most advisory locks any one of the pool's sessions holds.
    pub advisory_locks_max_per_session: u32,
    /// The client ports of the pool's sessions (TCP only), sorted: the client-side ledger
    /// tells apart the sockets of two pools to one address by them.
    pub client_ports: Vec<u16>,
}

impl ServerCensus {
    /// All the pool's real sessions, whatever their state.
    pub fn total(&self) -> u32 {
        self.counts.iter().sum()
    }

    /// Sessions in `state` (a name from [`SESSION_STATES`]); 0 for an unknown name.
    pub fn get(&self, state: &str) -> u32 {
        SESSION_STATES.iter().position(|s| *s == state).map_or(0, |i| self.counts[i])
    }

    /// The longest any session has been in `state`; zero for an unknown name.
    pub fn longest_in(&self, state: &str) -> Duration {
        SESSION_STATES.iter().position(|s| *s == state).map_or(Duration::ZERO, |i| self.longest[i])
    }
}

/// Maps a `pg_stat_activity.state` to its index in [`SESSION_STATES`].
fn state_index(state: Option<&str>) -> usize {
    let label = match state {
        Some("idle in transaction") => "idle_in_transaction",
        Some("idle in transaction (aborted)") => "idle_in_transaction_aborted",
        Some("fastpath function call") => "fastpath_function_call",
        Some(s) => s,
        None => "unknown",
    };
    SESSION_STATES.iter().position(|s| *s == label).unwrap_or(SESSION_STATES.len() - 1)
}

/// The query the census runs, with the pool's tagged `application_name` as `$1` (shown here
/// for DBAs): one row per state of the pool's sessions: how many, the longest in that state,
/// how many wait for a lock, the advisory locks they hold (total and most in one session) and
/// the sessions' client ports.
pub const CENSUS_SQL: &str = "\
    SELECT a.state, count(*), \
           max(extract(epoch FROM clock_timestamp() - a.state_change))::float8, \
           count(*) FILTER (WHERE a.wait_event_type = 'Lock'), \
           coalesce(sum(l.n), 0)::int8, coalesce(max(l.n), 0)::int8, \
           array_remove(array_agg(a.client_port), NULL) \
    FROM pg_stat_activity a \
    LEFT JOIN (SELECT pid, count(*) AS n FROM pg_locks \
               WHERE locktype = 'advisory' AND granted GROUP BY pid) l USING (pid) \
    WHERE a.application_name = $1 \
    GROUP BY a.state";

type Row = (Option<String>, i64, Option<f64>, i64, i64, i64, Vec<i32>);

/// Counts the sessions whose `application_name` is `app_name`.
pub(crate) async fn take(conn: &mut PgConnection, app_name: &str) -> Result<ServerCensus, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(CENSUS_SQL).bind(app_name).fetch_all(conn).await?;
    let mut census = ServerCensus::default();
    let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    for (state, n, longest, waiters, advisory, advisory_max, ports) in rows {
        census.client_ports.extend(ports.into_iter().filter_map(|p| u16::try_from(p).ok()));
        let i = state_index(state.as_deref());
        census.counts[i] += count(n);
        let longest = Duration::try_from_secs_f64(longest.unwrap_or(0.0).max(0.0)).unwrap_or(Duration::ZERO);
        census.longest[i] = census.longest[i].max(longest);
        census.lock_waiters += count(waiters);
        census.advisory_locks += count(advisory);
        census.advisory_locks_max_per_session = census.advisory_locks_max_per_session.max(count(advisory_max));
    }
    census.client_ports.sort_unstable();
    Ok(census)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_state_has_a_label() {
        assert_eq!(SESSION_STATES[state_index(Some("idle in transaction (aborted)"))], "idle_in_transaction_aborted");
        assert_eq!(SESSION_STATES[state_index(Some("active"))], "active");
        assert_eq!(SESSION_STATES[state_index(None)], "unknown");
        assert_eq!(SESSION_STATES[state_index(Some("something new"))], "unknown");
    }
}
