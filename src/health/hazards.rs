//! The configuration hazard lint: server settings × pool options × what the app declares in
//! its [`Deployment`], checked at start-up, after each reconnect of the dedicated connection
//! and every [`Config::hazard_recheck_interval`](crate::config::Config::hazard_recheck_interval).
//!
//! Each [`Hazard`] is a known failure mode (incidents 1 and 2). A found hazard is reported
//! once as a WARN that says the consequence and the fix, and as
//! `poolwatch_config_hazard_active{hazard="<name>"} 1` (0 for the hazards not found).

use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, Row};

use crate::config::Deployment;

/// A configuration that leads to a known failure. The names are fixed label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Hazard {
    /// `min_connections` > 0 and the pool never recycles idle connections before the server's
    /// `idle_session_timeout`: the minimum connections all die together (incident 1's amplifier).
    MinConnectionsKilledByIdleSessionTimeout,
    /// `min_connections` = 0 but idle connections can outlive `idle_session_timeout`: the
    /// server kills them in the pool; each costs a failed ping and a reconnect.
    IdleConnectionsKilledByIdleSessionTimeout,
    /// The declared refresh interval is longer than the pool's `idle_timeout`: every refresh
    /// meets a reaped connection and pays a connect (incident 2).
    RefreshSlowerThanIdleTimeout,
    /// The declared refresh interval is at least the server's `idle_session_timeout`: a
    /// connection held between refreshes is killed (57P05).
    RefreshSlowerThanIdleSessionTimeout,
    /// The declared refresh interval is at least `idle_in_transaction_session_timeout`: a lock
    /// held in an open transaction between refreshes is killed (25P03) and released.
    RefreshSlowerThanIdleInTransactionTimeout,
    /// The declared refresh interval is longer than the declared pooler idle timeout: the
    /// pooler ends the connection between refreshes (incident 2, `CONNECTION_ENDED`).
    RefreshSlowerThanPoolerIdleTimeout,
    /// A listener is declared without keepalive on a server (or pooler) that ends idle
    /// sessions: it is killed every idle period and reconnects (incident 1).
    ListenerWithoutKeepalive,
    /// The declared listener keepalive is not shorter than the idle limit it must beat.
    ListenerKeepaliveSlowerThanIdleTimeout,
    /// `max_connections` × replicas (+ poolwatch's own connection each) is above what the
    /// server accepts for this role (`max_connections` minus reserved slots).
    MaxConnectionsOverServerCapacity,
    /// `max_connections` × replicas (+ poolwatch's own) is above the role's `CONNECTION LIMIT`.
    MaxConnectionsOverRoleLimit,
    /// `max_lifetime` is unset, or longer than the server's `idle_session_timeout` or the
    /// declared pooler idle timeout.
    MaxLifetimeUnsetOrTooLong,
    /// The pool's `acquire_timeout` is longer than the declared refresh interval: a refresh
    /// that waits for a slot misses its next tick before it gives up.
    AcquireTimeoutLongerThanRefresh,
}

impl Hazard {
    /// Every hazard, in a fixed order.
    pub const ALL: [Hazard; 12] = [
        Hazard::MinConnectionsKilledByIdleSessionTimeout,
        Hazard::IdleConnectionsKilledByIdleSessionTimeout,
        Hazard::RefreshSlowerThanIdleTimeout,
        Hazard::RefreshSlowerThanIdleSessionTimeout,
        Hazard::RefreshSlowerThanIdleInTransactionTimeout,
        Hazard::RefreshSlowerThanPoolerIdleTimeout,
        Hazard::ListenerWithoutKeepalive,
        Hazard::ListenerKeepaliveSlowerThanIdleTimeout,
        Hazard::MaxConnectionsOverServerCapacity,
        Hazard::MaxConnectionsOverRoleLimit,
        Hazard::MaxLifetimeUnsetOrTooLong,
        Hazard::AcquireTimeoutLongerThanRefresh,
    ];

    /// The label value, e.g. `min_connections_killed_by_idle_session_timeout`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Hazard::MinConnectionsKilledByIdleSessionTimeout => "min_connections_killed_by_idle_session_timeout",
            Hazard::IdleConnectionsKilledByIdleSessionTimeout => "idle_connections_killed_by_idle_session_timeout",
            Hazard::RefreshSlowerThanIdleTimeout => "refresh_slower_than_idle_timeout",
            Hazard::RefreshSlowerThanIdleSessionTimeout => "refresh_slower_than_idle_session_timeout",
            Hazard::RefreshSlowerThanIdleInTransactionTimeout => "refresh_slower_than_idle_in_transaction_timeout",
            Hazard::RefreshSlowerThanPoolerIdleTimeout => "refresh_slower_than_pooler_idle_timeout",
            Hazard::ListenerWithoutKeepalive => "listener_without_keepalive",
            Hazard::ListenerKeepaliveSlowerThanIdleTimeout => "listener_keepalive_slower_than_idle_timeout",
            Hazard::MaxConnectionsOverServerCapacity => "max_connections_over_server_capacity",
            Hazard::MaxConnectionsOverRoleLimit => "max_connections_over_role_limit",
            Hazard::MaxLifetimeUnsetOrTooLong => "max_lifetime_unset_or_too_long",
            Hazard::AcquireTimeoutLongerThanRefresh => "acquire_timeout_longer_than_refresh",
        }
    }

    /// What goes wrong.
    pub const fn consequence(self) -> &'static str {
        match self {
            Hazard::MinConnectionsKilledByIdleSessionTimeout => {
                "the pool's minimum connections sit idle past the server's idle_session_timeout and are all killed together (57P05)"
            }
            Hazard::IdleConnectionsKilledByIdleSessionTimeout => {
                "idle pool connections outlive the server's idle_session_timeout and are killed in the pool; acquires pay a failed ping and a reconnect"
            }
            Hazard::RefreshSlowerThanIdleTimeout => {
                "every refresh finds its connection reaped by the pool's idle_timeout and pays a new connect"
            }
            Hazard::RefreshSlowerThanIdleSessionTimeout => {
                "a connection held between refreshes is killed by the server's idle_session_timeout; the refresh fails (57P05)"
            }
            Hazard::RefreshSlowerThanIdleInTransactionTimeout => {
                "a lock held in an open transaction between refreshes is killed by idle_in_transaction_session_timeout (25P03) and released"
            }
            Hazard::RefreshSlowerThanPoolerIdleTimeout => {
                "the pooler ends the connection between refreshes; the refresh meets a closed connection (connection_ended)"
            }
            Hazard::ListenerWithoutKeepalive => {
                "a listener that only receives notifications is idle to the server/pooler and is killed every idle period; each reconnect can lose notifications (and leak a slot, incident 1)"
            }
            Hazard::ListenerKeepaliveSlowerThanIdleTimeout => {
                "the listener keepalive comes too late: the server/pooler ends the listener session first"
            }
            Hazard::MaxConnectionsOverServerCapacity => {
                "at full load the replicas ask for more connections than the server accepts; connects fail with too_many_connections (53300)"
            }
            Hazard::MaxConnectionsOverRoleLimit => {
                "at full load the replicas ask for more connections than the role's CONNECTION LIMIT; connects fail (53300)"
            }
            Hazard::MaxLifetimeUnsetOrTooLong => {
                "connections are not recycled before the server or pooler ends them, or never recycled at all"
            }
            Hazard::AcquireTimeoutLongerThanRefresh => {
                "a refresh waiting for a pool slot keeps waiting past its next tick; the lock or lease can expire meanwhile"
            }
        }
    }

    /// How to fix it.
    pub const fn fix(self) -> &'static str {
        match self {
            Hazard::MinConnectionsKilledByIdleSessionTimeout => {
                "set the pool's idle_timeout and max_lifetime well below idle_session_timeout (both below half of it), lower min_connections, or raise/disable idle_session_timeout for this role"
            }
            Hazard::IdleConnectionsKilledByIdleSessionTimeout => {
                "set the pool's idle_timeout below half of idle_session_timeout, or raise/disable idle_session_timeout for this role"
            }
            Hazard::RefreshSlowerThanIdleTimeout => {
                "refresh more often than the pool's idle_timeout, raise idle_timeout, or keep min_connections for the refresher"
            }
            Hazard::RefreshSlowerThanIdleSessionTimeout => {
                "refresh more often than idle_session_timeout, or raise/disable it for this role (ALTER ROLE ... SET idle_session_timeout)"
            }
            Hazard::RefreshSlowerThanIdleInTransactionTimeout => {
                "refresh more often than idle_in_transaction_session_timeout, hold the lock as a session advisory lock, or raise the timeout for this role"
            }
            Hazard::RefreshSlowerThanPoolerIdleTimeout => {
                "refresh more often than the pooler's idle timeout, raise it, and retry connection_ended as transient"
            }
            Hazard::ListenerWithoutKeepalive => {
                "run SELECT 1 on the listener's connection more often than the idle limit (ListenerConfig::keepalive on a WatchedListener), or give the listener a role without idle_session_timeout"
            }
            Hazard::ListenerKeepaliveSlowerThanIdleTimeout => {
                "make the listener keepalive shorter than half the idle limit"
            }
            Hazard::MaxConnectionsOverServerCapacity => {
                "lower max_connections so that replicas × (max_connections + 1) fits the server, raise the server's max_connections, or put a pooler in front"
            }
            Hazard::MaxConnectionsOverRoleLimit => {
                "lower max_connections, or raise the role's limit (ALTER ROLE ... CONNECTION LIMIT)"
            }
            Hazard::MaxLifetimeUnsetOrTooLong => {
                "set the pool's max_lifetime below the server's idle_session_timeout and the pooler's idle timeout (sqlx default: 30 min)"
            }
            Hazard::AcquireTimeoutLongerThanRefresh => {
                "set the pool's acquire_timeout below the refresh interval, or give the refresher its own connection"
            }
        }
    }
}

impl fmt::Display for Hazard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One hazard found, with the figures that raised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Which hazard.
    pub hazard: Hazard,
    /// The figures, e.g. `min_connections=5, idle_timeout=10m, idle_session_timeout=1s`.
    pub detail: String,
}

/// The server settings the lint reads, as seen by a session of the pool's role and database
/// (so `ALTER ROLE/DATABASE ... SET` apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSettings {
    /// `idle_session_timeout` (`None`: 0, off, or PostgreSQL < 14).
    pub idle_session_timeout: Option<Duration>,
    /// `idle_in_transaction_session_timeout` (`None`: 0, off).
    pub idle_in_transaction_session_timeout: Option<Duration>,
    /// `tcp_keepalives_idle` (`None`: 0, the OS default, or a unix socket).
    pub tcp_keepalives_idle: Option<Duration>,
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16+, else 0).
    pub reserved_connections: u32,
    /// Whether the session's role is a superuser (may use the reserved slots).
    pub superuser: bool,
    /// The role's `CONNECTION LIMIT` (`None`: unlimited).
    pub role_connection_limit: Option<u32>,
}

impl ServerSettings {
    /// Connections this role can open: `max_connections` minus the slots reserved for others.
    pub fn usable_connections(&self) -> u32 {
        if self.superuser {
            self.max_connections
        } else {
            self.max_connections.saturating_sub(self.superuser_reserved_connections + self.reserved_connections)
        }
    }

    /// Reads the settings on `conn` (one simple-protocol query, so it works through a
    /// transaction-mode pooler). Any role can run it; `poolwatch doctor` uses it too.
    pub async fn read(conn: &mut PgConnection) -> Result<ServerSettings, sqlx::Error> {
        let rows = crate::sqlx_adapter::fetch_all_simple(
            conn,
            "SELECT name, setting FROM pg_settings WHERE name IN ('idle_session_timeout', \
             'idle_in_transaction_session_timeout', 'tcp_keepalives_idle', 'max_connections', \
             'superuser_reserved_connections', 'reserved_connections') \
             UNION ALL SELECT 'rolsuper', rolsuper::text FROM pg_roles WHERE rolname = current_user \
             UNION ALL SELECT 'rolconnlimit', rolconnlimit::text FROM pg_roles WHERE rolname = current_user",
        )
        .await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let mut s = ServerSettings::default();
        for (name, value) in rows {
            s.apply(&name, &value);
        }
        Ok(s)
    }

    /// Takes one `name = value` row of [`read`](Self::read)'s query (`pg_settings` units:
    /// ms for the session timeouts, s for `tcp_keepalives_idle`).
    pub(crate) fn apply(&mut self, name: &str, value: &str) {
        let s = self;
        let n: i64 = value.parse().unwrap_or(0);
        let positive = u64::try_from(n).ok().filter(|n| *n > 0);
        let count = u32::try_from(n).unwrap_or(0);
        match name {
            "idle_session_timeout" => s.idle_session_timeout = positive.map(Duration::from_millis),
            "idle_in_transaction_session_timeout" => {
                s.idle_in_transaction_session_timeout = positive.map(Duration::from_millis)
            }
            "tcp_keepalives_idle" => s.tcp_keepalives_idle = positive.map(Duration::from_secs),
            "max_connections" => s.max_connections = count,
            "superuser_reserved_connections" => s.superuser_reserved_connections = count,
            "reserved_connections" => s.reserved_connections = count,
            "rolsuper" => s.superuser = value == "true",
            "rolconnlimit" => s.role_connection_limit = u32::try_from(n).ok(),
            _ => {}
        }
    }
}

/// The pool options the lint compares (read from `pool.options()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// `get_max_connections()`.
    pub max_connections: u32,
    /// `get_min_connections()`.
    pub min_connections: u32,
    /// `get_idle_timeout()`.
    pub idle_timeout: Option<Duration>,
    /// `get_max_lifetime()`.
    pub max_lifetime: Option<Duration>,
    /// `get_acquire_timeout()`.
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    /// Reads a pool's options.
    pub fn of(options: &PgPoolOptions) -> PoolSettings {
        PoolSettings {
            max_connections: options.get_max_connections(),
            min_connections: options.get_min_connections(),
            idle_timeout: options.get_idle_timeout(),
            max_lifetime: options.get_max_lifetime(),
            acquire_timeout: options.get_acquire_timeout(),
        }
    }

    /// The longest an idle connection can stay in the pool: sqlx's reaper runs every
    /// min(idle_timeout, max_lifetime) and closes connections past either, so a connection
    /// can sit idle up to twice that. `None`: never recycled.
    pub fn longest_idle(&self) -> Option<Duration> {
        let period = match (self.idle_timeout, self.max_lifetime) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some(period.saturating_mul(2))
    }
}

/// Checks the three sources against each other; pure, so every rule is unit-tested.
pub fn lint(server: &ServerSettings, pool: &PoolSettings, deployment: &Deployment) -> Vec<Finding> {
    let mut found = Vec::new();
    idle_session_rules(&mut found, server, pool);
    if let Some(refresh) = deployment.expect_refresh_every {
        refresh_rules(&mut found, server, pool, deployment.pooler_idle_timeout, refresh);
    }
    let idle_limit = [server.idle_session_timeout, deployment.pooler_idle_timeout].into_iter().flatten().min();
    if let (Some(keepalive), Some(limit)) = (deployment.listener_keepalive, idle_limit) {
        listener_rules(&mut found, server, deployment.pooler_idle_timeout, keepalive, limit);
    }
    capacity_rules(&mut found, server, pool, deployment);
    lifetime_rules(&mut found, server, pool, deployment.pooler_idle_timeout, idle_limit);
    found
}

/// The server's `idle_session_timeout` against the pool's idle connections.
fn idle_session_rules(found: &mut Vec<Finding>, server: &ServerSettings, pool: &PoolSettings) {
    let Some(ist) = server.idle_session_timeout else { return };
    if pool.longest_idle().is_some_and(|l| l < ist) {
        return;
    }
    let detail = format!(
        "min_connections={}, idle_timeout={}, max_lifetime={}, idle_session_timeout={}",
        pool.min_connections,
        show(pool.idle_timeout),
        show(pool.max_lifetime),
        show(Some(ist))
    );
    let hazard = if pool.min_connections > 0 {
        Hazard::MinConnectionsKilledByIdleSessionTimeout
    } else {
        Hazard::IdleConnectionsKilledByIdleSessionTimeout
    };
    found.push(Finding { hazard, detail });
}

/// A connection refreshed every `refresh` (a lock, a LISTEN) against every idle limit.
fn refresh_rules(
    found: &mut Vec<Finding>,
    server: &ServerSettings,
    pool: &PoolSettings,
    pooler: Option<Duration>,
    refresh: Duration,
) {
    let mut add = |hazard: Hazard, detail: String| found.push(Finding { hazard, detail });
    let r = show(Some(refresh));
    if let Some(idle) = pool.idle_timeout.filter(|idle| refresh > *idle) {
        add(Hazard::RefreshSlowerThanIdleTimeout, format!("refresh every {r}, pool idle_timeout={}", show(Some(idle))));
    }
    if let Some(ist) = server.idle_session_timeout.filter(|ist| refresh >= *ist) {
        add(
            Hazard::RefreshSlowerThanIdleSessionTimeout,
            format!("refresh every {r}, idle_session_timeout={}", show(Some(ist))),
        );
    }
    if let Some(iit) = server.idle_in_transaction_session_timeout.filter(|t| refresh >= *t) {
        add(
            Hazard::RefreshSlowerThanIdleInTransactionTimeout,
            format!("refresh every {r}, idle_in_transaction_session_timeout={}", show(Some(iit))),
        );
    }
    if let Some(p) = pooler.filter(|p| refresh > *p) {
        add(
            Hazard::RefreshSlowerThanPoolerIdleTimeout,
            format!("refresh every {r}, pooler idle timeout={}", show(Some(p))),
        );
    }
    if pool.acquire_timeout > refresh {
        add(
            Hazard::AcquireTimeoutLongerThanRefresh,
            format!("refresh every {r}, acquire_timeout={}", show(Some(pool.acquire_timeout))),
        );
    }
}

/// A listener's keepalive (`None`: declared without one) against the tightest idle `limit`.
fn listener_rules(
    found: &mut Vec<Finding>,
    server: &ServerSettings,
    pooler: Option<Duration>,
    keepalive: Option<Duration>,
    limit: Duration,
) {
    let limits = format!(
        "idle_session_timeout={}, pooler idle timeout={}, tcp_keepalives_idle={}",
        show(server.idle_session_timeout),
        show(pooler),
        show(server.tcp_keepalives_idle)
    );
    let (hazard, detail) = match keepalive {
        None => (Hazard::ListenerWithoutKeepalive, format!("listener declared without keepalive; {limits}")),
        Some(k) if k >= limit => (
            Hazard::ListenerKeepaliveSlowerThanIdleTimeout,
            format!("listener keepalive every {}; {limits}", show(Some(k))),
        ),
        Some(_) => return,
    };
    found.push(Finding { hazard, detail });
}

/// Every replica's pool at its max, plus poolwatch's connection, against the server's and the
/// role's connection limits. Through a pooler the server's slots are the pooler's, not the pool's.
fn capacity_rules(found: &mut Vec<Finding>, server: &ServerSettings, pool: &PoolSettings, deployment: &Deployment) {
    let demand = u64::from(deployment.replicas) * (u64::from(pool.max_connections) + 1);
    if deployment.pooler_idle_timeout.is_none()
        && server.max_connections > 0
        && demand > u64::from(server.usable_connections())
    {
        found.push(Finding {
            hazard: Hazard::MaxConnectionsOverServerCapacity,
            detail: format!(
                "replicas={} × (max_connections={} + 1 poolwatch) = {demand} > {} usable (server max_connections={}, reserved={})",
                deployment.replicas,
                pool.max_connections,
                server.usable_connections(),
                server.max_connections,
                server.max_connections - server.usable_connections()
            ),
        });
    }
    if let Some(limit) = server.role_connection_limit.filter(|l| demand > u64::from(*l)) {
        found.push(Finding {
            hazard: Hazard::MaxConnectionsOverRoleLimit,
            detail: format!(
                "replicas={} × (max_connections={} + 1) = {demand} > role CONNECTION LIMIT {limit}",
                deployment.replicas, pool.max_connections
            ),
        });
    }
}

/// `max_lifetime` unset, or longer than the tightest idle limit.
fn lifetime_rules(
    found: &mut Vec<Finding>,
    server: &ServerSettings,
    pool: &PoolSettings,
    pooler: Option<Duration>,
    limit: Option<Duration>,
) {
    let ist = server.idle_session_timeout;
    let detail = match (pool.max_lifetime, limit) {
        (None, _) => format!("max_lifetime unset; {}", limits_text(ist, pooler)),
        (Some(l), Some(limit)) if l > limit => format!("max_lifetime={}; {}", show(Some(l)), limits_text(ist, pooler)),
        _ => return,
    };
    found.push(Finding { hazard: Hazard::MaxLifetimeUnsetOrTooLong, detail });
}

fn limits_text(ist: Option<Duration>, pooler: Option<Duration>) -> String {
    format!("idle_session_timeout={}, pooler idle timeout={}", show(ist), show(pooler))
}

fn show(d: Option<Duration>) -> String {
    match d {
        None => "off".to_owned(),
        Some(d) if d.subsec_millis() == 0 => format!("{}s", d.as_secs()),
        Some(d) => format!("{}ms", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool() -> PoolSettings {
        PoolSettings::of(&PgPoolOptions::new())
    }

    fn server() -> ServerSettings {
        ServerSettings { max_connections: 100, superuser_reserved_connections: 3, ..ServerSettings::default() }
    }

    fn names(found: &[Finding]) -> Vec<&'static str> {
        found.iter().map(|f| f.hazard.as_str()).collect()
    }

    #[test]
    fn sqlx_defaults_on_a_default_server_are_clean() {
        assert_eq!(names(&lint(&server(), &pool(), &Deployment::new())), Vec::<&str>::new());
    }

    #[test]
    fn each_rule_fires_on_its_own_figures() {
        let s = |secs| ServerSettings { idle_session_timeout: Some(Duration::from_secs(secs)), ..server() };
        let min5 = PoolSettings { min_connections: 5, ..pool() };
        let cases: Vec<(ServerSettings, PoolSettings, Config, Hazard)> = vec![
            (s(60), min5, Config::new("a"), Hazard::MinConnectionsKilledByIdleSessionTimeout),
            (s(60), pool(), Config::new("a"), Hazard::IdleConnectionsKilledByIdleSessionTimeout),
            (
                server(),
                PoolSettings { idle_timeout: Some(Duration::from_secs(20)), ..pool() },
                Config::new("a").expect_refresh_every(Duration::from_secs(300)),
                Hazard::RefreshSlowerThanIdleTimeout,
            ),
            (
                s(60),
                pool(),
                Config::new("a").expect_refresh_every(Duration::from_secs(300)),
                Hazard::RefreshSlowerThanIdleSessionTimeout,
            ),
            (
                ServerSettings { idle_in_transaction_session_timeout: Some(Duration::from_secs(60)), ..server() },
                pool(),
                Config::new("a").expect_refresh_every(Duration::from_secs(300)),
                Hazard::RefreshSlowerThanIdleInTransactionTimeout,
            ),
            (
                server(),
                pool(),
                Config::new("a")
                    .expect_refresh_every(Duration::from_secs(300))
                    .pooler_idle_timeout(Duration::from_secs(60)),
                Hazard::RefreshSlowerThanPoolerIdleTimeout,
            ),
            (s(60), pool(), listener(None), Hazard::ListenerWithoutKeepalive),
            (s(60), pool(), listener(Some(Duration::from_secs(90))), Hazard::ListenerKeepaliveSlowerThanIdleTimeout),
            (server(), pool(), Config::new("a").replicas(10), Hazard::MaxConnectionsOverServerCapacity),
            (
                ServerSettings { role_connection_limit: Some(5), ..server() },
                pool(),
                Config::new("a"),
                Hazard::MaxConnectionsOverRoleLimit,
            ),
            (
                server(),
                PoolSettings { max_lifetime: None, ..pool() },
                Config::new("a"),
                Hazard::MaxLifetimeUnsetOrTooLong,
            ),
            (
                server(),
                pool(),
                Config::new("a").expect_refresh_every(Duration::from_secs(5)),
                Hazard::AcquireTimeoutLongerThanRefresh,
            ),
        ];
        assert_eq!(cases.len(), Hazard::ALL.len(), "one case per hazard");
        for (server, pool, config, hazard) in cases {
            let found = lint(&server, &pool, &config.deployment);
            assert!(found.iter().any(|f| f.hazard == hazard), "{hazard} not found in {:?}", names(&found));
        }
    }

    /// A config whose deployment has a listener with `keepalive`.
    fn listener(keepalive: Option<Duration>) -> Config {
        Config::new("a").deployment(crate::config::Deployment::default().listener_keepalive(keepalive))
    }

    #[test]
    fn recycling_before_the_server_kill_is_safe() {
        let server = ServerSettings { idle_session_timeout: Some(Duration::from_secs(60)), ..server() };
        let pool = PoolSettings {
            min_connections: 5,
            idle_timeout: Some(Duration::from_secs(20)),
            max_lifetime: Some(Duration::from_secs(25)),
            ..pool()
        };
        let listener = listener(Some(Duration::from_secs(20)));
        assert_eq!(names(&lint(&server, &pool, &listener.deployment)), Vec::<&str>::new());
    }

    #[test]
    fn names_are_unique_snake_case_with_consequence_and_fix() {
        let mut seen = std::collections::HashSet::new();
        for h in Hazard::ALL {
            assert!(seen.insert(h.as_str()), "{h} twice");
            assert!(h.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{h}");
            assert!(!h.consequence().is_empty() && !h.fix().is_empty());
        }
    }
}
