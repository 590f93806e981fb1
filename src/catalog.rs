//! The metric catalog: the only place a metric name, unit, description or label key is
//! spelled. Dashboards and alert rules may use only names listed in [`ALL`] (a test checks).
//!
//! Names follow the OpenTelemetry `db.client.connection.*` conventions translated to
//! Prometheus: dots become underscores, the unit is a suffix, counters end in `_total`.
//! Every metric carries the [`POOL_NAME`] label.

use metrics::Unit;

/// Label key on every metric: the pool name given in [`Config::new`](crate::config::Config::new).
pub const POOL_NAME: &str = "db_client_connection_pool_name";
/// Label key of `db_client_connection_count`: `used` or `idle`.
pub const CONNECTION_STATE: &str = "db_client_connection_state";
/// Label key for a state from a fixed set (server session state, socket state).
pub const STATE: &str = "state";
/// Label key for a [`Cause`](crate::cause::Cause).
pub const CAUSE: &str = "cause";

/// What kind of instrument a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// A value sampled now.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric: its name, kind, unit, description and label keys.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit (also the name's suffix where it has one).
    pub unit: Unit,
    /// The help text.
    pub help: &'static str,
    /// Label keys besides [`POOL_NAME`].
    pub labels: &'static [&'static str],
}

const fn gauge(name: &'static str, unit: Unit, help: &'static str, labels: &'static [&'static str]) -> Metric {
    Metric { name, kind: Kind::Gauge, unit, help, labels }
}
const fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Metric {
    Metric { name, kind: Kind::Counter, unit: Unit::Count, help, labels }
}
#[allow(dead_code)] // first used by the acquire and heartbeat histograms
const fn histogram(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Metric {
    Metric { name, kind: Kind::Histogram, unit: Unit::Seconds, help, labels }
}

/// Connections the pool counts, by state (`used` = checked out, `idle`). OTel's
/// `db.client.connection.count`; not `_count` here: Prometheus reserves that suffix for
/// histograms and summaries (`promtool check metrics` rejects it).
pub const CONNECTION_COUNT: Metric = gauge(
    "db_client_connection_count",
    Unit::Count,
    "Connections the pool believes are open, by state (used = checked out, idle).",
    &[CONNECTION_STATE],
);
/// The pool's `max_connections`.
pub const CONNECTION_MAX: Metric = gauge("db_client_connection_max", Unit::Count, "The pool's max_connections.", &[]);
/// The pool's `min_connections`.
pub const CONNECTION_IDLE_MIN: Metric =
    gauge("db_client_connection_idle_min", Unit::Count, "The pool's min_connections.", &[]);
/// Server sessions that really belong to this pool of this process, by `pg_stat_activity.state`.
pub const SERVER_CONNECTIONS: Metric = gauge(
    "poolwatch_server_connections",
    Unit::Count,
    "Server sessions (pg_stat_activity) that really belong to this pool of this process, by state.",
    &[STATE],
);
/// Connections the pool counts as open minus those that really exist on the server.
pub const PHANTOM_CONNECTIONS: Metric = gauge(
    "poolwatch_phantom_connections",
    Unit::Count,
    "Connections the pool counts as open minus connections that really exist on the server (leaked or dead slots).",
    &[],
);
/// The longest any of the pool's sessions has been in its state, by state.
pub const SERVER_LONGEST_IN_STATE: Metric = gauge(
    "poolwatch_server_longest_in_state_seconds",
    Unit::Seconds,
    "The longest any of this pool's server sessions has been in its current state, by state. Long idle_in_transaction: a transaction left open; long active: a stuck statement.",
    &[STATE],
);
/// The pool's sessions waiting for a lock now.
pub const SERVER_LOCK_WAITERS: Metric = gauge(
    "poolwatch_server_lock_waiters",
    Unit::Count,
    "This pool's server sessions waiting for a lock now (wait_event_type = Lock).",
    &[],
);
/// Advisory locks held by the pool's sessions.
pub const SERVER_ADVISORY_LOCKS: Metric = gauge(
    "poolwatch_server_advisory_locks",
    Unit::Count,
    "Advisory locks held by this pool's server sessions (session- and transaction-scoped).",
    &[],
);
/// The most advisory locks one of the pool's sessions holds.
pub const SERVER_ADVISORY_LOCKS_MAX: Metric = gauge(
    "poolwatch_server_advisory_locks_max_per_session",
    Unit::Count,
    "The most advisory locks any one of this pool's server sessions holds: work groups tied to one session.",
    &[],
);
/// 1 if the last server census succeeded, else 0.
pub const CENSUS_UP: Metric =
    gauge("poolwatch_census_up", Unit::Count, "1 if the last server census succeeded, else 0.", &[]);
/// How long the last server census took.
pub const CENSUS_DURATION: Metric = gauge(
    "poolwatch_census_duration_seconds",
    Unit::Seconds,
    "How long the last server census took (connect included when it had to reconnect).",
    &[],
);
/// Failed censuses, by cause.
pub const CENSUS_ERRORS: Metric =
    counter("poolwatch_census_errors_total", "Server censuses that failed, by cause.", &[CAUSE]);
/// This process's TCP sockets to the database address, by TCP state (Linux only).
pub const CLIENT_SOCKETS: Metric = gauge(
    "poolwatch_client_sockets",
    Unit::Count,
    "This process's TCP sockets to the database address, by TCP state (Linux only). close_wait > 0: the server hung up and the app has not noticed.",
    &[STATE],
);

// --- progress ---
/// Units of work the app reported done with this pool ([`Progress`](crate::health::progress::Progress)).
pub const PROGRESS: Metric = counter(
    "poolwatch_progress_total",
    "Units of work the app reported done with this pool (Progress::tick). Flat while connections stay checked out: work stalled.",
    &[],
);

// --- telemetry ---
/// The fine bucket bounds (seconds) of every poolwatch histogram at
/// [`Detail::Full`](crate::config::Detail::Full) (wait, use, create, heartbeat, listener downtime),
/// from 100 µs (an idle acquire) to 60 s (a connect stuck across several resolved addresses):
/// 21 series per histogram. [`buckets`] gives the coarse default set per histogram;
/// `export::with_buckets(builder, Detail::Full)` applies these.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The coarse buckets of [`Detail::Standard`](crate::config::Detail::Standard), chosen per histogram
/// for what its alert or panel asks: few enough that one pool stays within its series budget.
/// Acquire wait: 10 ms (an idle acquire is below) to 10 s (near `acquire_timeout`).
pub const WAIT_BUCKETS: &[f64] = &[0.01, 0.1, 1.0, 10.0];
/// Connection use: a query (10 ms) to a held connection (1 min).
pub const USE_BUCKETS: &[f64] = &[0.01, 0.1, 1.0, 10.0];
/// Connect: `PoolwatchSlowConnects` reads the share above 2.5 s.
pub const CREATE_BUCKETS: &[f64] = &[0.01, 0.1, 2.5];
/// Heartbeat (a ping or `SELECT 1`): healthy (< 100 ms) or slow; `poolwatch_heartbeat_up` says down.
pub const HEARTBEAT_BUCKETS: &[f64] = &[0.1];
/// Listener downtime: a clean reconnect (< 1 s) to a long outage.
pub const DOWNTIME_BUCKETS: &[f64] = &[1.0, 10.0, 60.0];

/// The bucket bounds of the histogram `name` at `detail`: [`SECONDS_BUCKETS`] for
/// [`Detail::Full`](crate::config::Detail::Full), the coarse per-histogram set for
/// [`Detail::Standard`](crate::config::Detail::Standard); `None` for a name that is not a histogram.
/// [`export::Exporter`](crate::export) and `export::prometheus_builder` apply them; give the same bounds to any
/// other recorder (an OpenTelemetry `View`).
pub fn buckets(name: &str, detail: crate::config::Detail) -> Option<&'static [f64]> {
    let coarse = match name {
        n if n == WAIT_TIME.name => WAIT_BUCKETS,
        n if n == USE_TIME.name => USE_BUCKETS,
        n if n == CREATE_TIME.name => CREATE_BUCKETS,
        n if n == HEARTBEAT_DURATION.name => HEARTBEAT_BUCKETS,
        n if n == LISTENER_DOWNTIME.name => DOWNTIME_BUCKETS,
        n if find(n).is_some_and(|m| m.kind == Kind::Histogram) => SECONDS_BUCKETS,
        _ => return None,
    };
    Some(if detail == crate::config::Detail::Full { SECONDS_BUCKETS } else { coarse })
}

/// Names kept in their OpenTelemetry form although `promtool check metrics` reserves the
/// `_count` suffix for histograms: `db.client.connection.count` becomes
/// `db_client_connection_count`, the name OTel-instrumented services share. promtool's only
/// finding on poolwatch's output is this one (tests/telemetry.rs checks).
pub const LINT_EXCEPTIONS: &[&str] = &["db_client_connection_count"];

// --- listener reconnects ---
/// Label key of the listener metrics: the name given to a [`WatchedListener`](crate::listener::watched::WatchedListener).
pub const LISTENER: &str = "listener";
/// 1 while a watched listener's connection is up and LISTENing, else 0.
pub const LISTENER_CONNECTED: Metric = gauge(
    "poolwatch_listener_connected",
    Unit::Count,
    "1 while the LISTEN/NOTIFY listener's connection is up and listening, else 0 (notifications sent at 0 are lost).",
    &[LISTENER],
);
/// Label key saying how a listener's loss cause is known: `observed` (the error was read),
/// `server_counters` or `idle_time` (inferred), `no_server_evidence`.
pub const EVIDENCE: &str = "evidence";
/// Listener connections lost and re-established, by cause and by how the cause is known.
pub const LISTENER_RECONNECTS: Metric = counter(
    "poolwatch_listener_reconnects_total",
    "LISTEN/NOTIFY listener connections lost and re-established, by cause of the loss and how it is known (evidence: observed, server_counters, idle_time, no_server_evidence).",
    &[LISTENER, CAUSE, EVIDENCE],
);
/// Time from a listener's lost connection to LISTEN re-established: the data-loss window.
pub const LISTENER_DOWNTIME: Metric = histogram(
    "poolwatch_listener_downtime_seconds",
    "Time from a listener's lost connection to LISTEN re-established; notifications sent in that window are lost.",
    &[LISTENER],
);
/// Notifications a watched listener delivered.
pub const LISTENER_NOTIFICATIONS: Metric =
    counter("poolwatch_listener_notifications_total", "Notifications the listener delivered to the app.", &[LISTENER]);
/// Unix time of the last notification a watched listener delivered.
pub const LISTENER_LAST_NOTIFICATION: Metric = gauge(
    "poolwatch_listener_last_notification_timestamp_seconds",
    Unit::Seconds,
    "Unix time of the last notification the listener delivered.",
    &[LISTENER],
);

// --- heartbeats and config hazards ---
/// Label key of the heartbeat metrics: `pool` (an acquire through the pool) or `direct` (a
/// ping on the dedicated connection outside the pool).
pub const PATH: &str = "path";
/// Label key of `poolwatch_config_hazard_active`: a [`Hazard`](crate::health::hazards::Hazard) name.
pub const HAZARD: &str = "hazard";
/// How long each heartbeat took, by path.
pub const HEARTBEAT_DURATION: Metric = histogram(
    "poolwatch_heartbeat_duration_seconds",
    "How long each heartbeat took, by path (pool = acquire, pinged by the pool or followed by SELECT 1; direct = ping on the dedicated connection), failures included.",
    &[PATH],
);
/// How many configuration hazards the last lint found (always present, unlike the
/// per-hazard series of [`Detail::Standard`](crate::config::Detail::Standard)).
pub const CONFIG_HAZARDS: Metric = gauge(
    "poolwatch_config_hazards",
    Unit::Count,
    "How many configuration hazards the last lint found (poolwatch_config_hazard_active names each one found).",
    &[],
);
/// Failed heartbeats, by path and cause.
pub const HEARTBEAT_FAILURES: Metric = counter(
    "poolwatch_heartbeat_failures_total",
    "Heartbeats that failed, by path and cause. pool failing while direct succeeds: pool exhausted or leaked; both: database or network.",
    &[PATH, CAUSE],
);
/// 1 if the last heartbeat on the path succeeded, else 0.
pub const HEARTBEAT_UP: Metric =
    gauge("poolwatch_heartbeat_up", Unit::Count, "1 if the last heartbeat on the path succeeded, else 0.", &[PATH]);
/// 1 for each configuration hazard found at start-up or after a reconnect, 0 for the others.
pub const CONFIG_HAZARD: Metric = gauge(
    "poolwatch_config_hazard_active",
    Unit::Count,
    "1 if the server, pool or declared settings combine into a known failure mode (see the hazard's WARN log and docs), else 0.",
    &[HAZARD],
);

// --- acquire, use and connect ---
/// How long `WatchedPool` acquires waited for a connection (successful acquires).
pub const WAIT_TIME: Metric = histogram(
    "db_client_connection_wait_time_seconds",
    "How long a successful acquire waited to obtain a connection: through the watched pool, or any acquire read from sqlx's own events by sqlx_acquire_layer.",
    &[],
);
/// Callers waiting for a connection now.
pub const PENDING_REQUESTS: Metric = gauge(
    "db_client_connection_pending_requests",
    Unit::Count,
    "Acquires through the watched pool that are waiting for a connection now.",
    &[],
);
/// Acquires that timed out (`acquire_timeout` passed with no connection).
pub const TIMEOUTS: Metric = counter(
    "db_client_connection_timeouts_total",
    "Acquires through the watched pool that waited acquire_timeout and got no connection.",
    &[],
);
/// How long connections were checked out (acquire to release).
pub const USE_TIME: Metric = histogram(
    "db_client_connection_use_time_seconds",
    "How long a connection acquired through the watched pool was checked out (acquire to release).",
    &[],
);
/// How long opening a new connection took.
pub const CREATE_TIME: Metric = histogram(
    "db_client_connection_create_time_seconds",
    "How long a watched acquire that opened a new connection took until the connection was ready (needs instrument_options).",
    &[],
);
/// The longest any acquire through the watched pool has been waiting now (PgBouncer's `maxwait`).
pub const OLDEST_WAIT: Metric = gauge(
    "poolwatch_acquire_oldest_wait_seconds",
    Unit::Seconds,
    "How long the oldest acquire through the watched pool that is still waiting has waited (0: nobody waits). PgBouncer's maxwait, for the app's own pool.",
    &[],
);
/// Slots the pool counts as checked out that the app does not hold through the watched pool.
pub const STRANDED_SLOTS: Metric = gauge(
    "poolwatch_stranded_slots",
    Unit::Count,
    "Connections the pool counts as checked out that the app does not hold through the watched pool, at each of the last 3 samples (e.g. stuck in sqlx's return-to-pool ping after the peer went silent; bare-pool acquires count too).",
    &[],
);
/// Sockets to the database whose send queue stayed non-empty for `send_queue_stuck_after`.
pub const SEND_QUEUE_STUCK: Metric = gauge(
    "poolwatch_client_sockets_send_queue_stuck",
    Unit::Count,
    "This process's sockets to the database whose send queue has stayed non-empty at every census for send_queue_stuck_after: the peer stopped acknowledging (silent peer, dropped NAT flow). Linux only.",
    &[],
);
/// Connections checked out longer than `leak_threshold` now (plus slots lost to `leak()`).
pub const LEAK_SUSPECTS: Metric = gauge(
    "poolwatch_leak_suspect_connections",
    Unit::Count,
    "Connections checked out longer than leak_threshold now, plus pool slots lost to leak().",
    &[],
);
/// Connections ever reported as leak or stuck suspects.
pub const LEAK_SUSPECTS_TOTAL: Metric = counter(
    "poolwatch_leak_suspects_total",
    "Connections reported as leak or stuck suspects (held past leak_threshold, leak() or detach()).",
    &[],
);

// --- per-address reachability (branch reach, incident 4) ---
/// Label key of the per-address metrics: one address the database host resolves to, as
/// `IP:port`. The one label whose values come from outside poolwatch (the DNS answer); bounded
/// by [`reach::MAX_ADDRESSES`](crate::health::reach::MAX_ADDRESSES) per probe and
/// [`reach::MAX_SERIES`](crate::health::reach::MAX_SERIES) per pool.
pub const SERVER_ADDRESS: &str = "server_address";
/// How many addresses the pool's database host resolved to at the last probe.
pub const SERVER_ADDRESSES: Metric = gauge(
    "poolwatch_server_addresses",
    Unit::Count,
    "How many addresses the pool's database host resolved to at the last probe (0: resolution failed).",
    &[],
);
/// How many probed addresses failed a TCP connect at the last probe (always present, unlike
/// the per-address series of [`Detail::Full`](crate::config::Detail::Full)).
pub const SERVER_ADDRESSES_DOWN: Metric = gauge(
    "poolwatch_server_addresses_down",
    Unit::Count,
    "How many of the addresses the database host resolved to failed a TCP connect within census_timeout at the last probe (poolwatch_server_address_up names them with Detail::Full).",
    &[],
);
/// 1 if a TCP connect to the address succeeded within census_timeout at the last probe, else 0.
pub const SERVER_ADDRESS_UP: Metric = gauge(
    "poolwatch_server_address_up",
    Unit::Count,
    "1 if a TCP connect to this resolved address of the database host succeeded within census_timeout at the last probe, else 0 (NaN: no longer in the DNS answer).",
    &[SERVER_ADDRESS],
);
/// How long the last TCP connect to the address took (until it failed or timed out when down).
pub const SERVER_ADDRESS_CONNECT_TIME: Metric = gauge(
    "poolwatch_server_address_connect_seconds",
    Unit::Seconds,
    "How long the last TCP connect (handshake only) to this resolved address took; when down, until it was refused or timed out (NaN: no longer in the DNS answer).",
    &[SERVER_ADDRESS],
);

// --- acquires that bypass WatchedPool ---
/// Connections the pool opened, min-connection fills included (its `after_connect` hook).
pub const POOL_CONNECTS: Metric = counter(
    "poolwatch_pool_connects_total",
    "Connections the pool opened, whoever acquired (its after_connect hook; needs instrument_options_named).",
    &[],
);
/// Acquires that got an idle connection, from any caller (the pool's `before_acquire` hook).
pub const IDLE_ACQUIRES: Metric = counter(
    "poolwatch_pool_idle_acquires_total",
    "Acquires that got an idle connection, whoever acquired (before_acquire hook; needs instrument_options_named).",
    &[],
);
/// Connections given back to the pool (its `after_release` hook).
pub const RELEASES: Metric = counter(
    "poolwatch_pool_releases_total",
    "Connections given back to the pool and kept, whoever acquired (after_release hook; needs instrument_options_named).",
    &[],
);
/// Acquires sqlx itself reported as slower than `acquire_slow_threshold` (2 s by default).
pub const SLOW_ACQUIRES: Metric = counter(
    "poolwatch_pool_slow_acquires_total",
    "Acquires slower than the pool's acquire_slow_threshold, from sqlx's own events (needs sqlx_acquire_layer).",
    &[],
);

// --- the ledger behind a pooler, ended sessions ---
/// Sessions of this pool that ended without the pool closing them, by cause.
pub const SESSIONS_ENDED: Metric = counter(
    "poolwatch_sessions_ended_total",
    "Sessions of this pool (this process) that ended without the pool closing them (server or pooler kill, proxy), by cause where known; sqlx replaces them silently.",
    &[CAUSE],
);
/// Clients waiting for a server connection in the pooler's pool of this app's database and user.
pub const POOLER_WAITING_CLIENTS: Metric = gauge(
    "poolwatch_pooler_waiting_clients",
    Unit::Count,
    "Clients waiting for a server connection in the pooler's pool of this pool's database and user (PgBouncer cl_waiting; all replicas).",
    &[],
);
/// How long the oldest waiting client of the pooler's pool has waited.
pub const POOLER_MAX_WAIT: Metric = gauge(
    "poolwatch_pooler_max_wait_seconds",
    Unit::Seconds,
    "How long the oldest client waiting in the pooler's pool of this pool's database and user has waited (PgBouncer maxwait).",
    &[],
);
/// The pooler's server connections for this app's database and user, `active` or `idle`.
pub const POOLER_SERVER_CONNECTIONS: Metric = gauge(
    "poolwatch_pooler_server_connections",
    Unit::Count,
    "The pooler's server connections for this pool's database and user: active (linked to a client) or idle (PgBouncer sv_active; sv_idle + sv_used + sv_tested).",
    &[STATE],
);

// --- the ledger at fleet scale ---
/// Label key of [`POOL_INFO`]: the pool's stable `application_name` tag
/// ([`attribution::fleet_tag`](crate::ledger::attribution::fleet_tag)).
pub const APPLICATION_NAME: &str = "application_name";
/// The pool's connections without an established socket, read on every sample.
pub const CLIENT_GAP: Metric = gauge(
    "poolwatch_client_gap",
    Unit::Count,
    "Connections the pool counts as open minus its established TCP sockets, on every sample (no server cost). Above 0: slots whose connection the server or a pooler closed.",
    &[],
);
/// 1, labelled with the pool's stable `application_name` tag: joins the pool's own counts
/// with postgres_exporter's per-`application_name` counts (`alerts/fleet-gap.rules.yml`).
pub const POOL_INFO: Metric = gauge(
    "poolwatch_pool_info",
    Unit::Count,
    "Always 1; application_name is the pool's stable tag on the server (the same in every replica), for joins with postgres_exporter.",
    &[APPLICATION_NAME],
);

// --- connection lifecycle ---
/// Label key of [`CONNECTIONS_CLOSED`]: a [`CloseReason`](crate::ledger::snapshot::CloseReason).
pub const REASON: &str = "reason";
/// Connections the pool closed, by reason (needs
/// [`instrument_options_named`](crate::acquire::bare::instrument_options_named); [`Detail::Full`](crate::config::Detail::Full)).
pub const CONNECTIONS_CLOSED: Metric = counter(
    "poolwatch_connections_closed_total",
    "Connections that left the pool, by reason: idle_timeout, max_lifetime, broken (failed ping, error, closed or detached by the app), pool_closed. Inferred from sqlx's rules (sqlx has no close hook); see docs/lifecycle.md.",
    &[REASON],
);
/// The age of the oldest connection the pool holds (needs
/// [`instrument_options_named`](crate::acquire::bare::instrument_options_named)).
pub const CONNECTION_OLDEST_AGE: Metric = gauge(
    "poolwatch_connection_oldest_age_seconds",
    Unit::Seconds,
    "How long ago the oldest connection the pool holds was opened (0: none). Grows without bound when max_lifetime is off: connections never re-resolve the host.",
    &[],
);

/// Label key of [`TASK_RESTARTS`]: `watch` (samples and censuses) or `heartbeat`.
pub const TASK: &str = "task";
/// When the last sample completed: a frozen value means the watch stopped.
pub const LAST_SAMPLE: Metric = gauge(
    "poolwatch_last_sample_timestamp_seconds",
    Unit::Seconds,
    "Unix time of the last completed sample of the pool's counters (every sample_interval). time() minus it is the watch's silence: a value that stops moving means poolwatch's task stopped and every other figure of the pool is frozen.",
    &[],
);
/// When the last census succeeded.
pub const LAST_CENSUS: Metric = gauge(
    "poolwatch_last_census_timestamp_seconds",
    Unit::Seconds,
    "Unix time of the last successful server census (absent before one).",
    &[],
);
/// When the heartbeat task was last seen completing a tick.
pub const LAST_HEARTBEAT: Metric = gauge(
    "poolwatch_last_heartbeat_timestamp_seconds",
    Unit::Seconds,
    "Unix time at which a sample last saw a new heartbeat (either path, success or failure): the heartbeat task is alive.",
    &[],
);
/// How old the census-derived figures are.
pub const CENSUS_AGE: Metric = gauge(
    "poolwatch_census_age_seconds",
    Unit::Seconds,
    "How old the census-derived figures (server sessions, phantom gap, lock waiters, longest in state) are, at the last sample: since the last successful census, or since the watch started before one. The census runs every census_interval (900 s by default), sooner after a failure or to confirm what it saw.",
    &[],
);
/// Background tasks restarted after a panic.
pub const TASK_RESTARTS: Metric = counter(
    "poolwatch_task_restarts_total",
    "poolwatch background tasks restarted after a panic, by task (watch: samples and censuses; heartbeat). Any increase is a poolwatch bug: please report it with the log line.",
    &[TASK],
);

/// Every metric poolwatch emits.
pub const ALL: &[Metric] = &[
    CONNECTION_COUNT,
    CONNECTION_MAX,
    CONNECTION_IDLE_MIN,
    SERVER_CONNECTIONS,
    PHANTOM_CONNECTIONS,
    CENSUS_UP,
    CENSUS_DURATION,
    CENSUS_ERRORS,
    CLIENT_SOCKETS,
    SERVER_LONGEST_IN_STATE,
    SERVER_LOCK_WAITERS,
    SERVER_ADVISORY_LOCKS,
    SERVER_ADVISORY_LOCKS_MAX,
    // --- progress ---
    PROGRESS,
    // --- listener reconnects ---
    LISTENER_CONNECTED,
    LISTENER_RECONNECTS,
    LISTENER_DOWNTIME,
    LISTENER_NOTIFICATIONS,
    LISTENER_LAST_NOTIFICATION,
    // --- heartbeats and config hazards ---
    HEARTBEAT_DURATION,
    HEARTBEAT_FAILURES,
    HEARTBEAT_UP,
    CONFIG_HAZARD,
    CONFIG_HAZARDS,
    // --- acquire, use and connect ---
    WAIT_TIME,
    PENDING_REQUESTS,
    TIMEOUTS,
    USE_TIME,
    CREATE_TIME,
    OLDEST_WAIT,
    STRANDED_SLOTS,
    SEND_QUEUE_STUCK,
    // --- acquires that bypass WatchedPool ---
    POOL_CONNECTS,
    IDLE_ACQUIRES,
    RELEASES,
    SLOW_ACQUIRES,
    LEAK_SUSPECTS,
    LEAK_SUSPECTS_TOTAL,
    // --- per-address reachability (branch reach, incident 4) ---
    SERVER_ADDRESSES,
    SERVER_ADDRESSES_DOWN,
    SERVER_ADDRESS_UP,
    SERVER_ADDRESS_CONNECT_TIME,
    // --- the ledger behind a pooler, ended sessions ---
    SESSIONS_ENDED,
    POOLER_WAITING_CLIENTS,
    POOLER_MAX_WAIT,
    POOLER_SERVER_CONNECTIONS,
    // --- the ledger at fleet scale ---
    CLIENT_GAP,
    POOL_INFO,
    // --- connection lifecycle ---
    CONNECTIONS_CLOSED,
    CONNECTION_OLDEST_AGE,
    // --- liveness of the background tasks ---
    LAST_SAMPLE,
    LAST_CENSUS,
    LAST_HEARTBEAT,
    CENSUS_AGE,
    TASK_RESTARTS,
];

/// Series the fleet rules read from postgres_exporter with poolwatch's query file
/// (`alerts/postgres_exporter/queries.yaml`), not from poolwatch: server sessions by the
/// pool's stable tag (`application_name`) and `state`.
pub const EXPORTER_SESSIONS: &str = "pg_stat_activity_by_app_count";

/// Looks a metric up by its Prometheus name (a histogram's `_bucket`, `_sum` and `_count`
/// series resolve to the histogram).
pub fn find(series: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| {
        m.name == series
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"].iter().any(|s| series.strip_suffix(s) == Some(m.name)))
    })
}

/// Describes every metric (unit and help text) to the installed `metrics` recorder.
/// Called by [`instrument_pool`](crate::watch::instrument_pool); harmless to call again.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("db_client_connection_") || m.name.starts_with("poolwatch_"));
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
            let reserved =
                ["_count", "_sum", "_bucket"].iter().any(|s| m.name.ends_with(s)) && !LINT_EXCEPTIONS.contains(&m.name);
            assert!(!reserved, "{}: suffix reserved for histograms (promtool)", m.name);
            if m.unit == Unit::Seconds {
                assert!(m.name.ends_with("_seconds"), "{} is in seconds", m.name);
            }
            assert!(!m.help.is_empty());
        }
        assert_eq!(find("poolwatch_phantom_connections").map(|m| m.name), Some(PHANTOM_CONNECTIONS.name));
        assert!(find("poolwatch_phantom_connections_bucket").is_none());
        assert_eq!((SECONDS_BUCKETS.first(), SECONDS_BUCKETS.last()), (Some(&0.0001), Some(&60.0)));
        assert!(SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        for m in ALL {
            let coarse = buckets(m.name, crate::config::Detail::Standard);
            assert_eq!(coarse.is_some(), m.kind == Kind::Histogram, "{}", m.name);
            let coarse = coarse.unwrap_or(&[1.0]);
            assert!(coarse.len() <= 5 && coarse.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
        }
    }
}
