//! The census query and its sums.

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
        self.counts.iter().fold(0, |a: u32, b| a.saturating_add(*b))
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

/// The query the census runs (shown here for DBAs): one row per session of the pool, with
/// the pool's `application_name` as `$1` and, when sessions are matched by port, this process's
/// sockets as `$2` (`'<addr> <port>'` strings; NULL: no port filter; a session whose address
/// the census role may not see has a NULL port and is kept): its state, client port, how long
/// it has been in that state, whether it waits for a lock, and the advisory locks it holds.
/// The sessions are counted in the process, never labelled per session.
///
/// With `$2`, only the backends whose client port is one of `$2`'s (or hidden from the role)
/// are read in full, by pid: building `pg_stat_activity`'s row for every backend of a busy
/// server is most of what the view costs. Without it, the whole view is read.
pub const CENSUS_SQL: &str = "\
    SELECT a.state, a.client_port, \
           extract(epoch FROM clock_timestamp() - a.state_change)::float8, \
           coalesce(a.wait_event_type = 'Lock', false), coalesce(l.n, 0)::int8 \
    FROM (SELECT s.* FROM pg_stat_get_backend_idset() b(id) \
          CROSS JOIN LATERAL pg_stat_get_activity(pg_stat_get_backend_pid(b.id)) s \
          WHERE $2::text[] IS NOT NULL \
            AND coalesce(pg_stat_get_backend_client_port(b.id) IN \
                (SELECT split_part(k, ' ', 2)::int FROM unnest($2::text[]) k), true) \
          UNION ALL \
          SELECT s.* FROM pg_stat_get_activity(NULL) s WHERE $2::text[] IS NULL) a \
    LEFT JOIN (SELECT pid, count(*) AS n FROM pg_locks \
               WHERE locktype = 'advisory' AND granted GROUP BY pid) l USING (pid) \
    WHERE a.application_name = $1 \
      AND ($2::text[] IS NULL OR a.client_port IS NULL \
           OR host(a.client_addr) || ' ' || a.client_port = ANY($2::text[]))";

type Row = (Option<String>, Option<i32>, Option<f64>, bool, i64);

/// One session of the pool, as the census saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Session {
    /// The client port the server shows (this process's local port when matched by port);
    /// `None` when the census role may not see it (no `pg_read_all_stats`).
    pub(crate) port: Option<u16>,
    state: usize,
    in_state: Duration,
    waiting: bool,
    advisory: u32,
}

impl Session {
    /// How long it had been idle (`idle` state) when seen; `None` when not idle.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        (SESSION_STATES[self.state] == "idle").then_some(self.in_state)
    }
}

/// Sums sessions into the census figures.
pub(crate) fn aggregate<'a>(sessions: impl Iterator<Item = &'a Session>) -> ServerCensus {
    let mut census = ServerCensus::default();
    for s in sessions {
        census.counts[s.state] += 1;
        census.longest[s.state] = census.longest[s.state].max(s.in_state);
        census.lock_waiters += u32::from(s.waiting);
        census.advisory_locks += s.advisory;
        census.advisory_locks_max_per_session = census.advisory_locks_max_per_session.max(s.advisory);
        census.client_ports.extend(s.port);
    }
    census.client_ports.sort_unstable();
    census
}

/// The `'<addr> <port>'` keys of `$2` for sockets with these local ends (both spellings of an
/// IPv4 address: plain and IPv4-mapped IPv6, as the server may show either).
pub(crate) fn port_keys(locals: impl Iterator<Item = std::net::SocketAddr>) -> Vec<String> {
    let mut keys = Vec::new();
    for local in locals {
        let ip = local.ip().to_canonical();
        keys.push(format!("{ip} {}", local.port()));
        if let std::net::IpAddr::V4(v4) = ip {
            keys.push(format!("{} {}", v4.to_ipv6_mapped(), local.port()));
        }
    }
    keys
}

/// Lists the sessions whose `application_name` is `app_name` (and, with `ports`, whose client
/// address and port are one of those keys, or hidden from the census role).
pub(crate) async fn take(
    conn: &mut PgConnection,
    app_name: &str,
    ports: Option<&[String]>,
) -> Result<Vec<Session>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(CENSUS_SQL).bind(app_name).bind(ports).fetch_all(conn).await?;
    Ok(rows
        .into_iter()
        .map(|(state, port, seconds, waiting, advisory)| Session {
            port: port.and_then(|p| u16::try_from(p).ok()),
            state: state_index(state.as_deref()),
            in_state: Duration::try_from_secs_f64(seconds.unwrap_or(0.0).max(0.0)).unwrap_or(Duration::ZERO),
            waiting,
            advisory: u32::try_from(advisory).unwrap_or(u32::MAX),
        })
        .collect())
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
