//! The server census: which backends in `pg_stat_activity` really belong to this pool of this
//! process (see [`attribution`](crate::attribution) for how they are told apart).

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

/// Counts the sessions whose `application_name` is `app_name`.
pub(crate) async fn take(conn: &mut PgConnection, app_name: &str) -> Result<ServerCensus, sqlx::Error> {
    let rows: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM pg_stat_activity WHERE application_name = $1 GROUP BY state")
            .bind(app_name)
            .fetch_all(conn)
            .await?;
    let mut census = ServerCensus::default();
    for (state, n) in rows {
        census.counts[state_index(state.as_deref())] += u32::try_from(n).unwrap_or(u32::MAX);
    }
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
