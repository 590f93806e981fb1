//! What to watch and how often: [`Config`] and the [`ConfigError`] a bad value gives.

use std::fmt;
use std::time::Duration;

use crate::ledger::attribution::NetworkPath;

/// How poolwatch watches one pool. Build it with [`Config::new`] and the setters; every
/// field documents its default. Values are checked by [`instrument_pool`](crate::watch::instrument_pool).
/// Any non-zero duration works, up to `Duration::MAX` ("never": waits longer than about 30
/// years are waited as 30 years).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The `db_client_connection_pool_name` label value. 1-64 characters from
    /// `A-Z a-z 0-9 _ - . :`. No default: you name the pool.
    pub pool_name: String,
    /// How often the pool's own gauges and its client-side ledger (its sockets against its
    /// count; no server cost) are sampled. Default 5 s.
    pub sample_interval: Duration,
    /// How often the server census (`pg_stat_activity`) runs, each wait drawn within ±20 % so
    /// replicas spread out. It also runs at once when the client-side ledger disagrees with
    /// the pool (at most once per 10 `sample_interval`s). While every sample's client-side
    /// ledger confirms the pool (a socket per connection, none unattributed, no session
    /// ended, no connection held over two samples; Linux, TCP, no pooler) the wait doubles
    /// after each census, up to 24 × this interval; the first disagreement brings it back.
    /// Default 900 s, so 6 h on a quiet replica (see docs/performance.md for the cost per
    /// replica).
    pub census_interval: Duration,
    /// How often the per-address reachability probe runs when nothing is wrong (±20 %); it
    /// also runs when connects fail or slow down (census or heartbeat connect failures,
    /// acquire errors and timeouts, creates slower than 1 s). After probes that found every
    /// address up with no connect trouble between them, the wait doubles, up to 8 × this
    /// interval. Each probe costs the server a forked backend. Default 10800 s (3 h; 24 h
    /// while nothing is wrong).
    pub reach_interval: Duration,
    /// Connect and statement timeout of the census's dedicated connection. Default 5 s; at
    /// most 2,147,483,647 ms (PostgreSQL's limit for `statement_timeout`).
    pub census_timeout: Duration,
    /// How often both heartbeats run (an acquire through the pool and a ping on the dedicated
    /// connection). Default 10 s. While the replica is quiet (no app acquire, both paths
    /// healthy) the wait doubles up to 12 × this, at most 120 s; activity brings it back.
    pub heartbeat_interval: Duration,
    /// The bound of each heartbeat (acquire + query). Default 5 s.
    pub heartbeat_timeout: Duration,
    /// The longest wait between two reconnect attempts of the direct heartbeat (the wait
    /// doubles from `heartbeat_interval` after each failure). Default 60 s.
    pub heartbeat_max_backoff: Duration,
    /// What you declare about the deployment (replicas, network path, pooler, refresh cadence,
    /// listener, dedicated connection): facts poolwatch cannot see from inside one process.
    /// Default: one replica, nothing else declared. The declaring setters below write here.
    pub deployment: Deployment,
    /// How often the [hazard lint](crate::health::hazards) re-reads the server settings while
    /// poolwatch's connection stays up; while they stay the same the wait doubles, up to 30 ×
    /// this interval (60 s, 120 s … 1,800 s), and a change found brings it back. So a live
    /// `ALTER ROLE .. SET` or `ALTER SYSTEM` + reload is flagged within 30 ×
    /// `hazard_recheck_interval` + one heartbeat wait (up to 120 s on a quiet replica) +
    /// `heartbeat_timeout`. Each re-read is
    /// one query on poolwatch's own connection (no new session). Default 60 s.
    pub hazard_recheck_interval: Duration,
    /// How long a connection checked out through [`WatchedPool`](crate::acquire::watched_pool::WatchedPool) may be
    /// held before it is reported as a leak or stuck suspect. Default `None` (off).
    pub leak_threshold: Option<Duration>,
    /// How long a socket to the database may keep unacknowledged bytes in its send queue,
    /// census after census, before it counts in `poolwatch_client_sockets_send_queue_stuck`
    /// (a silent peer). Default 30 s.
    pub send_queue_stuck_after: Duration,
    /// How many series poolwatch exports for this pool. Default [`Detail::Standard`]: the
    /// set every shipped alert and dashboard needs (about 60 series per pool).
    pub detail: Detail,
}

/// How much detail poolwatch exports for a pool ("how to watch", not a fact about your
/// deployment). The shipped alerts and dashboards work at both levels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Detail {
    /// The series budget (docs/metrics.md, "Series budget"): states only once seen non-zero, a count
    /// of configuration hazards instead of one series per hazard, a count of reachable
    /// addresses instead of series per address, coarse histogram buckets
    /// ([`catalog::buckets`](crate::catalog::buckets)).
    #[default]
    Standard,
    /// Every breakdown from the start: every session and TCP state, every hazard, every
    /// resolved address, and (with [`export`](crate::export) helpers) the fine
    /// [`SECONDS_BUCKETS`](crate::catalog::SECONDS_BUCKETS).
    Full,
}

impl Config {
    /// A config with defaults for the pool named `pool_name`.
    pub fn new(pool_name: impl Into<String>) -> Self {
        Config {
            pool_name: pool_name.into(),
            sample_interval: Duration::from_secs(5),
            census_interval: Duration::from_secs(900),
            reach_interval: Duration::from_secs(10800),
            census_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(5),
            heartbeat_max_backoff: Duration::from_secs(60),
            deployment: Deployment::default(),
            leak_threshold: None,
            detail: Detail::Standard,
            hazard_recheck_interval: Duration::from_secs(60),
            send_queue_stuck_after: Duration::from_secs(30),
        }
    }

    /// Sets [`Config::hazard_recheck_interval`].
    pub fn hazard_recheck_interval(mut self, every: Duration) -> Self {
        self.hazard_recheck_interval = every;
        self
    }

    /// Sets [`Config::heartbeat_interval`].
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat_interval = every;
        self
    }

    /// Sets [`Config::heartbeat_timeout`].
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// Sets [`Config::heartbeat_max_backoff`].
    pub fn heartbeat_max_backoff(mut self, max: Duration) -> Self {
        self.heartbeat_max_backoff = max;
        self
    }

    /// Declares [`Deployment::expect_refresh_every`].
    pub fn expect_refresh_every(mut self, every: Duration) -> Self {
        self.deployment = self.deployment.expect_refresh_every(every);
        self
    }

    /// Declares [`Deployment::replicas`].
    pub fn replicas(mut self, n: u32) -> Self {
        self.deployment = self.deployment.replicas(n);
        self
    }

    /// Declares [`Deployment::pooler_idle_timeout`].
    pub fn pooler_idle_timeout(mut self, timeout: Duration) -> Self {
        self.deployment = self.deployment.pooler_idle_timeout(timeout);
        self
    }

    /// Declares [`Deployment::network_path`].
    pub fn network_path(mut self, path: NetworkPath) -> Self {
        self.deployment = self.deployment.network_path(path);
        self
    }

    /// Declares the pooler's admin console URL ([`Deployment::pooler_admin`]), e.g.
    /// `postgres://stats@pgbouncer:6432/pgbouncer`. Implies [`NetworkPath::Pooler`](NetworkPath::Pooler).
    /// The password, if any, is never logged.
    pub fn pooler_admin(mut self, url: impl Into<String>) -> Self {
        self.deployment = self.deployment.pooler_admin(url);
        self
    }

    /// Points poolwatch's dedicated connection (census + direct heartbeat) straight at the
    /// database server, e.g. when the pool goes through PgBouncer in transaction mode: the
    /// census then reads the real server, and the direct heartbeat tells the pooler's health
    /// from the server's. The password, if any, is never logged.
    pub fn direct_connect_options(mut self, options: sqlx::postgres::PgConnectOptions) -> Self {
        self.deployment = self.deployment.direct_connect_options(options);
        self
    }

    /// Sets everything declared about the deployment at once ([`Config::deployment`]).
    pub fn deployment(mut self, deployment: Deployment) -> Self {
        self.deployment = deployment;
        self
    }

    /// Sets [`Config::sample_interval`].
    pub fn sample_interval(mut self, every: Duration) -> Self {
        self.sample_interval = every;
        self
    }

    /// Sets [`Config::census_interval`].
    pub fn census_interval(mut self, every: Duration) -> Self {
        self.census_interval = every;
        self
    }

    /// Sets [`Config::reach_interval`].
    pub fn reach_interval(mut self, every: Duration) -> Self {
        self.reach_interval = every;
        self
    }

    /// Sets [`Config::census_timeout`].
    pub fn census_timeout(mut self, timeout: Duration) -> Self {
        self.census_timeout = timeout;
        self
    }

    /// Turns the leak watch on: a checkout held longer than `threshold` is a suspect
    /// ([`Config::leak_threshold`], off by default).
    pub fn leak_threshold(mut self, threshold: Duration) -> Self {
        self.leak_threshold = Some(threshold);
        self
    }

    /// Sets [`Config::send_queue_stuck_after`].
    pub fn send_queue_stuck_after(mut self, bound: Duration) -> Self {
        self.send_queue_stuck_after = bound;
        self
    }

    /// Sets [`Config::detail`], e.g. `Detail::Full` for every per-state, per-hazard and
    /// per-address series.
    pub fn detail(mut self, detail: Detail) -> Self {
        self.detail = detail;
        self
    }

    /// Checks every field; the error names the first bad one and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("pool_name", &self.pool_name, "name the pool, e.g. Config::new(\"main\")")?;
        for (field, value) in [
            ("sample_interval", self.sample_interval),
            ("census_interval", self.census_interval),
            ("reach_interval", self.reach_interval),
            ("census_timeout", self.census_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("heartbeat_max_backoff", self.heartbeat_max_backoff),
            ("leak_threshold", self.leak_threshold.unwrap_or(Duration::MAX)),
            ("hazard_recheck_interval", self.hazard_recheck_interval),
            ("send_queue_stuck_after", self.send_queue_stuck_after),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "is zero", "use a positive duration (see the field's default)"));
            }
        }
        // Durations that become server settings (census_timeout is the dedicated connection's
        // `statement_timeout`): PostgreSQL takes at most 2,147,483,647 ms and refuses the
        // whole connection above it, so the census would stay down with no hint why.
        for (field, value) in [("census_timeout", self.census_timeout)] {
            if value.as_millis() > MAX_SERVER_MS {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "is {value:?}, above PostgreSQL's limit for a timeout setting (2147483647 ms, about 24.8 days)"
                    ),
                    "use a timeout of at most 2147483647 ms (a few seconds is typical)",
                ));
            }
        }
        self.deployment.validate()
    }
}

/// What the user declares about the deployment: facts poolwatch cannot see from inside one
/// process (how many replicas, what lies between the pool and the server, what the app does
/// on a connection). [`Config`] is how to watch; this is what is being watched. The lint
/// ([`hazards::lint`](crate::health::hazards::lint)) and the census read it; the `poolwatch
/// doctor` builds one from its flags.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Deployment {
    /// The app refreshes something on a pool connection this often (a lock
    /// refresh, a job heartbeat). Default `None` (nothing declared).
    pub expect_refresh_every: Option<Duration>,
    /// How many processes run this pool against the same server. Default 1.
    pub replicas: u32,
    /// The pool goes through a pooler (PgBouncer `server_idle_timeout` /
    /// `client_idle_timeout`, Supavisor, an L7 proxy) that ends connections idle this long.
    /// Default `None` (no pooler declared).
    pub pooler_idle_timeout: Option<Duration>,
    /// What lies between the pool and the server: decides how sessions are attributed
    /// to this process (see [`NetworkPath`]). Default `None`: inferred:
    /// `Pooler` when [`Deployment::pooler_admin`] is set or [`Config::direct_connect_options`] points
    /// at another host or port than the pool; otherwise `Direct` over TCP, and `Nat` (a nonce)
    /// for a unix socket or a system without the socket list (not Linux).
    pub network_path: Option<NetworkPath>,
    /// The pooler's admin console (PgBouncer: database `pgbouncer`, a user in
    /// `stats_users`), as a URL. With it the census reads `SHOW CLIENTS` and `SHOW POOLS` and
    /// the phantom gap stays exact behind the pooler. Default `None`.
    pub pooler_admin: Option<PoolerAdmin>,
    /// The app runs a LISTEN listener on this server. `None`: no listener declared
    /// (default); `Some(None)`: a listener without keepalive; `Some(Some(d))`: a listener
    /// that runs `SELECT 1` every `d`.
    pub listener_keepalive: Option<Option<Duration>>,
    /// Where poolwatch's dedicated connection goes. Default `None`: the pool's own server and
    /// role. Set it when the pool goes through a pooler (see [`Config::direct_connect_options`]).
    pub direct_connect_options: Option<DirectOptions>,
}

impl Default for Deployment {
    fn default() -> Self {
        Deployment {
            expect_refresh_every: None,
            replicas: 1,
            pooler_idle_timeout: None,
            network_path: None,
            pooler_admin: None,
            listener_keepalive: None,
            direct_connect_options: None,
        }
    }
}

impl Deployment {
    /// One replica, nothing else declared.
    pub fn new() -> Self {
        Deployment::default()
    }

    /// Declares [`Deployment::replicas`].
    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = n;
        self
    }

    /// Declares [`Deployment::pooler_idle_timeout`].
    pub fn pooler_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pooler_idle_timeout = Some(timeout);
        self
    }

    /// Declares [`Deployment::expect_refresh_every`].
    pub fn expect_refresh_every(mut self, every: Duration) -> Self {
        self.expect_refresh_every = Some(every);
        self
    }

    /// Declares a listener and its keepalive period ([`Deployment::listener_keepalive`]).
    pub fn listener_keepalive(mut self, every: Option<Duration>) -> Self {
        self.listener_keepalive = Some(every);
        self
    }

    /// Declares [`Deployment::network_path`].
    pub fn network_path(mut self, path: NetworkPath) -> Self {
        self.network_path = Some(path);
        self
    }

    /// Declares the pooler's admin console URL ([`Deployment::pooler_admin`]). The password,
    /// if any, is never logged.
    pub fn pooler_admin(mut self, url: impl Into<String>) -> Self {
        self.pooler_admin = Some(PoolerAdmin(url.into()));
        self
    }

    /// Points poolwatch's dedicated connection straight at the database server
    /// ([`Config::direct_connect_options`] says when).
    pub fn direct_connect_options(mut self, options: sqlx::postgres::PgConnectOptions) -> Self {
        self.direct_connect_options = Some(DirectOptions(options));
        self
    }

    /// Checks the declarations; the error names the first bad one and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("expect_refresh_every", self.expect_refresh_every.unwrap_or(Duration::MAX)),
            ("pooler_idle_timeout", self.pooler_idle_timeout.unwrap_or(Duration::MAX)),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "is zero", "use a positive duration (see the field's default)"));
            }
        }
        if self.replicas == 0 {
            return Err(ConfigError::new(
                "replicas",
                "is zero",
                "declare how many processes run this pool (at least 1)",
            ));
        }
        if let Some(admin) = &self.pooler_admin {
            admin.options()?;
            if matches!(self.network_path, Some(NetworkPath::Direct | NetworkPath::Nat)) {
                return Err(ConfigError::new(
                    "network_path",
                    "contradicts pooler_admin (a pooler's console is declared)",
                    "declare NetworkPath::Pooler, or drop pooler_admin",
                ));
            }
        }
        if self.listener_keepalive == Some(Some(Duration::ZERO)) {
            return Err(ConfigError::new(
                "listener_keepalive",
                "is zero",
                "use a positive period, or None for a listener without keepalive",
            ));
        }
        Ok(())
    }
}

/// The pooler admin console's URL; its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolerAdmin(String);

impl PoolerAdmin {
    /// The connect options the URL gives (with the same `ignore_startup_parameters`-safe
    /// defaults as any sqlx connection).
    pub(crate) fn options(&self) -> Result<sqlx::postgres::PgConnectOptions, ConfigError> {
        self.0.parse::<sqlx::postgres::PgConnectOptions>().map_err(|_| {
            ConfigError::new(
                "pooler_admin",
                "is not a postgres:// URL",
                "give the admin console as postgres://user[:password]@host:port/pgbouncer",
            )
        })
    }
}

impl fmt::Debug for PoolerAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.options() {
            Ok(o) => write!(f, "PoolerAdmin({}:{}/{})", o.get_host(), o.get_port(), o.get_database().unwrap_or("")),
            Err(_) => f.write_str("PoolerAdmin(<not a URL>)"),
        }
    }
}

/// The largest value PostgreSQL accepts for a millisecond timeout setting (`statement_timeout`,
/// `idle_session_timeout`...): `INT_MAX`.
pub(crate) const MAX_SERVER_MS: u128 = 2_147_483_647;

/// Checks a user-given name used as a label value (pool, listener): 1-64 characters from
/// `A-Z a-z 0-9 _ - . :`. `fix_empty` says how to name it.
pub(crate) fn check_name(field: &'static str, name: &str, fix_empty: &'static str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(field, "is empty", fix_empty));
    }
    if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c)) {
        return Err(ConfigError::new(
            field,
            format!("{name:?} is not a valid label value"),
            "use 1-64 characters from A-Z a-z 0-9 _ - . :",
        ));
    }
    Ok(())
}

/// A [`Config`] value poolwatch cannot use, or a setup it cannot run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault, e.g. `census_interval`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
    /// How to fix it.
    pub fix: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>, fix: &'static str) -> Self {
        ConfigError { field, problem: problem.into(), fix }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "poolwatch: `{}` {}; fix: {}", self.field, self.problem, self.fix)
    }
}

impl std::error::Error for ConfigError {}

/// Connect options for poolwatch's dedicated connection ([`Config::direct_connect_options`]).
/// Its `Debug` shows host, port, database and user, never the password.
#[derive(Clone)]
pub struct DirectOptions(pub(crate) sqlx::postgres::PgConnectOptions);

impl std::fmt::Debug for DirectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectOptions")
            .field("host", &self.0.get_host())
            .field("port", &self.0.get_port())
            .field("database", &self.0.get_database())
            .field("username", &self.0.get_username())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::new("main").validate(), Ok(()));
        let at_limit = Config::new("main").census_timeout(Duration::from_millis(2_147_483_647));
        assert_eq!(at_limit.validate(), Ok(()));
    }

    #[test]
    fn pooler_admin_debug_hides_the_password() {
        let c = Config::new("a").pooler_admin("postgres://stats:s3cret@127.0.0.1:6432/pgbouncer");
        assert_eq!(c.validate(), Ok(()));
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret") && shown.contains("6432"), "{shown}");
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases = [
            (Config::new(""), "pool_name"),
            (Config::new("has space"), "pool_name"),
            (Config::new("x".repeat(65)), "pool_name"),
            (Config::new("a").sample_interval(Duration::ZERO), "sample_interval"),
            (Config::new("a").census_interval(Duration::ZERO), "census_interval"),
            (Config::new("a").reach_interval(Duration::ZERO), "reach_interval"),
            (Config::new("a").census_timeout(Duration::ZERO), "census_timeout"),
            (Config::new("a").heartbeat_interval(Duration::ZERO), "heartbeat_interval"),
            (Config::new("a").heartbeat_timeout(Duration::ZERO), "heartbeat_timeout"),
            (Config::new("a").heartbeat_max_backoff(Duration::ZERO), "heartbeat_max_backoff"),
            (Config::new("a").expect_refresh_every(Duration::ZERO), "expect_refresh_every"),
            (Config::new("a").pooler_idle_timeout(Duration::ZERO), "pooler_idle_timeout"),
            (Config::new("a").replicas(0), "replicas"),
            (
                Config::new("a").deployment(Deployment::default().listener_keepalive(Some(Duration::ZERO))),
                "listener_keepalive",
            ),
            (Config::new("a").leak_threshold(Duration::ZERO), "leak_threshold"),
            (Config::new("a").pooler_admin("not a url"), "pooler_admin"),
            (
                Config::new("a")
                    .pooler_admin("postgres://s@127.0.0.1:6432/pgbouncer")
                    .network_path(NetworkPath::Direct),
                "network_path",
            ),
            (Config::new("a").hazard_recheck_interval(Duration::ZERO), "hazard_recheck_interval"),
            (Config::new("a").census_timeout(Duration::from_millis(2_147_483_648)), "census_timeout"),
            (Config::new("a").census_timeout(Duration::MAX), "census_timeout"),
            (Config::new("a").send_queue_stuck_after(Duration::ZERO), "send_queue_stuck_after"),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field);
            assert!(err.to_string().contains(field) && err.to_string().contains("fix:"), "{err}");
        }
    }

    #[test]
    fn direct_options_never_show_the_password() {
        let o = DirectOptions(sqlx::postgres::PgConnectOptions::new_without_pgpass().host("db").password("s3cret"));
        let shown = format!("{o:?}");
        assert!(shown.contains("db") && !shown.contains("s3cret"), "{shown}");
    }
}
