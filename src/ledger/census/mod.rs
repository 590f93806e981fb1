//! The server census: which backends in `pg_stat_activity` really belong to this pool of this
//! process (see [`attribution`](crate::ledger::attribution) for how they are told apart).
//!
//! [`query`] holds the SQL and the sums; [`settle`] reads the pool, the server (or the pooler)
//! and the process's sockets at one moment, and attributes the sessions that vanished since
//! the last census (with [`ended`](crate::ledger::ended)). It computes; the watch publishes.

pub(crate) mod query;
pub(crate) mod settle;

pub use query::{CENSUS_SQL, SESSION_STATES, ServerCensus};
