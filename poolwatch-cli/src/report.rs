//! What `poolwatch doctor` found, as plain data: doctor.rs and startup.rs fill it, render.rs
//! prints it as tables or JSON (fields in declaration order). Server strings are cleaned where
//! they are read; main.rs cleans and scrubs the whole output once more.

use serde::Serialize;

/// Everything the doctor found; the exit status is 1 when `problems` is not empty.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// Host list, port, user and database: never the password.
    pub(crate) target: Target,
    pub(crate) addresses: Vec<Address>,
    pub(crate) server: Option<Server>,
    pub(crate) sessions: Vec<SessionGroup>,
    pub(crate) stuck: Vec<StuckSession>,
    pub(crate) stuck_after_seconds: f64,
    pub(crate) advisory_locks: Vec<LockHolder>,
    pub(crate) pool: PoolFlags,
    pub(crate) hazards: Vec<HazardFound>,
    /// What the role could not see, and why.
    pub(crate) not_seen: Vec<String>,
    pub(crate) pooler: Option<Pooler>,
    /// Why the exit status is non-zero (empty: healthy).
    pub(crate) problems: Vec<String>,
    pub(crate) took_seconds: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub(crate) hosts: Vec<String>,
    pub(crate) user: String,
    pub(crate) database: String,
    pub(crate) password_given: bool,
}

/// One probed address of one host (or the host, when it did not resolve).
#[derive(Debug, Serialize)]
pub(crate) struct Address {
    pub(crate) host: String,
    pub(crate) address: Option<String>,
    /// `up`, or the cause (`refused`, `timed_out`, ...), or a resolve error.
    pub(crate) tcp: String,
    pub(crate) tcp_seconds: f64,
    pub(crate) startup: Option<Startup>,
}

/// What the server answered to the startup packet.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Startup {
    /// `ok`: the server asked for credentials or let us in; `rejected`: it answered with an
    /// error; `failed`: no PostgreSQL answer within the bound.
    pub(crate) outcome: &'static str,
    /// e.g. `authentication ok (trust)`, `asks for SCRAM-SHA-256`, `FATAL 28000 ...`.
    pub(crate) detail: String,
    pub(crate) seconds: f64,
}

/// The server as read after logging in on a live address.
#[derive(Debug, Serialize)]
pub(crate) struct Server {
    pub(crate) via: String,
    pub(crate) version: String,
    pub(crate) user: String,
    pub(crate) superuser: bool,
    pub(crate) read_all_stats: bool,
    pub(crate) login_seconds: f64,
    pub(crate) max_connections: u32,
    pub(crate) reserved_connections: u32,
    pub(crate) usable_connections: u32,
    pub(crate) client_sessions: u32,
    /// Usable connections left for this role (`usable - client_sessions`).
    pub(crate) headroom: i64,
    pub(crate) idle_session_timeout_seconds: Option<f64>,
    pub(crate) idle_in_transaction_session_timeout_seconds: Option<f64>,
    pub(crate) tcp_keepalives_idle_seconds: Option<f64>,
    pub(crate) role_connection_limit: Option<u32>,
}

#[derive(Debug, Serialize)]
pub(crate) struct SessionGroup {
    pub(crate) application_name: String,
    /// `pg_stat_activity.state`; `hidden` where the role may not see it.
    pub(crate) state: String,
    pub(crate) count: i64,
}

#[derive(Debug, Serialize)]
pub(crate) struct StuckSession {
    pub(crate) pid: i32,
    pub(crate) user: String,
    pub(crate) application_name: String,
    pub(crate) state: String,
    pub(crate) in_state_seconds: f64,
    pub(crate) transaction_seconds: Option<f64>,
    pub(crate) waiting_on: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct LockHolder {
    pub(crate) pid: i32,
    pub(crate) user: String,
    pub(crate) application_name: String,
    pub(crate) state: String,
    pub(crate) held: i64,
    pub(crate) waiting: i64,
}

/// The pool settings and declared deployment given on the command line.
#[derive(Debug, Serialize)]
pub(crate) struct PoolFlags {
    pub(crate) max_connections: u32,
    pub(crate) min_connections: u32,
    pub(crate) idle_timeout_seconds: Option<f64>,
    pub(crate) max_lifetime_seconds: Option<f64>,
    pub(crate) acquire_timeout_seconds: f64,
    pub(crate) replicas: u32,
    pub(crate) refresh_every_seconds: Option<f64>,
    pub(crate) pooler_idle_timeout_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct HazardFound {
    pub(crate) hazard: &'static str,
    pub(crate) detail: String,
    pub(crate) consequence: &'static str,
    pub(crate) fix: &'static str,
}

/// PgBouncer's `SHOW POOLS`, every cell as text, or why it could not be read.
#[derive(Debug, Serialize)]
pub(crate) struct Pooler {
    pub(crate) columns: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
    pub(crate) error: Option<String>,
}
