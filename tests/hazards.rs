//! The configuration hazard lint against real server settings: a clean setup, settings in
//! postgresql.conf, `ALTER SYSTEM` picked up after a reconnect, and per-role settings.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use poolwatch::hazards::Hazard;
use poolwatch::sqlx;
use poolwatch::{Config, ListenerConfig, PoolWatch, WatchedListener, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor, PgPool};
use support::{Cluster, POOL, eventually, metric, recorder};

/// Per-hazard series (checked here) are `Detail::Full`; the default's hazard count is in
/// tests/export.rs.
fn config(name: &str) -> Config {
    Config::new(name)
        .detail(poolwatch::Detail::Full)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_secs(2))
}

/// Waits for the first lint and returns the hazard names it found.
async fn linted(watch: &PoolWatch) -> BTreeSet<&'static str> {
    eventually(Duration::from_secs(20), "the hazard lint read the server settings", async || watch.server_settings())
        .await;
    watch.hazards().iter().map(|f| f.hazard.as_str()).collect()
}

/// Each found hazard is 1 in `poolwatch_config_hazard_active`, every other one 0.
fn assert_gauges(pool_name: &str, found: &BTreeSet<&str>) {
    for h in Hazard::ALL {
        let v = metric("poolwatch_config_hazard_active", &[(POOL, pool_name), ("hazard", h.as_str())]);
        let want = if found.contains(h.as_str()) { 1.0 } else { 0.0 };
        assert_eq!(v, Some(want), "{pool_name}: poolwatch_config_hazard_active{{hazard=\"{h}\"}}");
    }
}

fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

async fn pool(options: PgPoolOptions, cluster: &Cluster) -> PgPool {
    options.connect_with(cluster.options()).await.unwrap()
}

/// sqlx's defaults on a default server are clean; `ALTER SYSTEM SET idle_session_timeout`
/// is picked up when poolwatch's dedicated connection reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_setup_has_none_and_alter_system_is_seen_after_a_reconnect() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = pool(PgPoolOptions::new().max_connections(5), &cluster).await;
    let watch = instrument_pool(&pool, config("hz_clean")).unwrap();
    assert_eq!(linted(&watch).await, set(&[]), "{:?}", watch.hazards());
    assert_gauges("hz_clean", &set(&[]));
    let settings = watch.server_settings().unwrap();
    assert_eq!(settings.idle_session_timeout, None);
    assert_eq!(settings.max_connections, 300, "the harness's max_connections");
    assert!(settings.superuser);

    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("ALTER SYSTEM SET idle_session_timeout = '2s'").await.unwrap();
    admin.execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(Duration::from_secs(10), "new sessions see the new setting", async || {
        let mut fresh = PgConnection::connect_with(&cluster.options()).await.ok()?;
        let v: String = sqlx::query_scalar("SHOW idle_session_timeout").fetch_one(&mut fresh).await.ok()?;
        (v == "2s").then_some(())
    })
    .await;
    assert_eq!(watch.hazards(), vec![], "no reconnect yet: the lint has not run again");
    // Kill poolwatch's dedicated connection: the direct heartbeat reconnects and re-lints.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'poolwatch-census:hz_clean') t",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1, "poolwatch's dedicated connection exists");
    let want = set(&["idle_connections_killed_by_idle_session_timeout", "max_lifetime_unset_or_too_long"]);
    eventually(Duration::from_secs(20), "the re-lint finds the new hazards", async || {
        let found: BTreeSet<_> = watch.hazards().iter().map(|f| f.hazard.as_str()).collect();
        (found == want).then_some(())
    })
    .await;
    assert_eq!(watch.server_settings().unwrap().idle_session_timeout, Some(Duration::from_secs(2)));
    assert_gauges("hz_clean", &want);
    let detail = &watch.hazards()[0].detail;
    assert!(detail.contains("idle_session_timeout=2s"), "{detail}");

    // Another reconnect re-lints, but each hazard is reported only once, with its fix.
    let lints_before = warns_for("hz_clean");
    let linted_before = lints_for("hz_clean");
    let failures_before = watch.heartbeat().direct.failures;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'poolwatch-census:hz_clean'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the direct heartbeat reconnected", async || {
        let h = watch.heartbeat();
        (h.direct.failures > failures_before && h.direct.up == Some(true)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "the reconnect re-linted the settings", async || {
        (lints_for("hz_clean") > linted_before).then_some(())
    })
    .await;
    let warns = warns_for("hz_clean");
    assert_eq!(warns, lints_before, "no second WARN for the same hazards");
    assert_eq!(warns.iter().map(|(h, _)| h.as_str()).collect::<BTreeSet<_>>(), want);
    for (hazard, message) in &warns {
        assert!(message.contains("Fix:") && message.contains(hazard.as_str()), "{message}");
    }
}

/// How many times the hazard lint of one pool ran (its DEBUG line).
fn lints_for(pool_name: &str) -> usize {
    support::spans::events_at(tracing::Level::DEBUG)
        .into_iter()
        .filter(|e| e.name == "poolwatch linted the server settings")
        .filter(|e| e.fields.get("pool").map(String::as_str) == Some(pool_name))
        .count()
}

/// The hazard WARNs logged for one pool: (hazard, message).
fn warns_for(pool_name: &str) -> Vec<(String, String)> {
    support::spans::events_at(tracing::Level::WARN)
        .into_iter()
        .filter(|e| e.fields.get("pool").map(String::as_str) == Some(pool_name))
        .filter_map(|e| Some((e.fields.get("hazard")?.clone(), e.name)))
        .collect()
}

/// Incident 1's settings in postgresql.conf: a 1 s `idle_session_timeout` against minimum
/// connections, a listener without keepalive and a slow refresh. The listeners are
/// `WatchedListener`s on the pool's name: they tell the lint their keepalive, nothing declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_hazards_from_postgresql_conf() {
    recorder();
    let cluster = Cluster::start_with(&[("idle_session_timeout", "1s")]);
    let risky = pool(PgPoolOptions::new().max_connections(4).min_connections(2), &cluster).await;
    let _listener = WatchedListener::connect(cluster.options(), ListenerConfig::new("hz_ist", "jobs")).await.unwrap();
    let declared = config("hz_ist").expect_refresh_every(Duration::from_secs(5));
    let watch = instrument_pool(&risky, declared).unwrap();
    let want = set(&[
        "min_connections_killed_by_idle_session_timeout",
        "listener_without_keepalive",
        "refresh_slower_than_idle_session_timeout",
        "max_lifetime_unset_or_too_long",
        "acquire_timeout_longer_than_refresh",
    ]);
    assert_eq!(linted(&watch).await, want, "{:#?}", watch.hazards());
    assert_gauges("hz_ist", &want);

    // The same server, a pool that recycles in time and a listener keepalive that is too slow.
    let options = PgPoolOptions::new()
        .max_connections(4)
        .idle_timeout(Duration::from_millis(200))
        .max_lifetime(Duration::from_millis(300));
    let careful = pool(options, &cluster).await;
    let slow_keepalive = ListenerConfig::new("hz_ist_ok", "jobs").keepalive(Duration::from_secs(2));
    let _listener2 = WatchedListener::connect(cluster.options(), slow_keepalive).await.unwrap();
    let watch2 = instrument_pool(&careful, config("hz_ist_ok")).unwrap();
    let want = set(&["listener_keepalive_slower_than_idle_timeout"]);
    assert_eq!(linted(&watch2).await, want, "{:#?}", watch2.hazards());
    assert_gauges("hz_ist_ok", &want);
}

/// `ALTER ROLE ... SET` and a role `CONNECTION LIMIT` apply to the pool's role only; the
/// server capacity and the pool's idle timeout are checked against the declared figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_role_settings_and_capacity() {
    recorder();
    let cluster = Cluster::start();
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE ROLE app LOGIN CONNECTION LIMIT 5").await.unwrap();
    admin.execute("ALTER ROLE app SET idle_in_transaction_session_timeout = '1s'").await.unwrap();
    let app_options = cluster.options().username("app");
    let app_pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(app_options)
        .await
        .unwrap();
    let watch = instrument_pool(&app_pool, config("hz_role").expect_refresh_every(Duration::from_secs(5))).unwrap();
    let want = set(&["refresh_slower_than_idle_in_transaction_timeout", "max_connections_over_role_limit"]);
    assert_eq!(linted(&watch).await, want, "{:#?}", watch.hazards());
    assert_gauges("hz_role", &want);
    let settings = watch.server_settings().unwrap();
    assert_eq!(settings.role_connection_limit, Some(5));
    assert!(!settings.superuser);
    assert_eq!(settings.usable_connections(), 300 - 3, "superuser_reserved_connections = 3");

    // The superuser's pool on the same server: no per-role hazard, but 30 replicas of
    // max_connections 10 overflow the server, and a 2 s idle_timeout reaps between refreshes.
    let options = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(2))
        .idle_timeout(Duration::from_secs(2));
    let big = pool(options, &cluster).await;
    let declared = config("hz_capacity").replicas(30).expect_refresh_every(Duration::from_secs(5));
    let watch2 = instrument_pool(&big, declared).unwrap();
    let want = set(&["max_connections_over_server_capacity", "refresh_slower_than_idle_timeout"]);
    assert_eq!(linted(&watch2).await, want, "{:#?}", watch2.hazards());
    assert_gauges("hz_capacity", &want);
    let found = watch2.hazards();
    let detail = &found.iter().find(|f| f.hazard == Hazard::MaxConnectionsOverServerCapacity).unwrap().detail;
    assert!(detail.contains("330 > 300"), "{detail}");
}

/// A live `ALTER ROLE .. SET idle_session_timeout` while poolwatch's
/// connection stays up is flagged by the periodic re-check, and clears when reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_alter_role_is_flagged_by_the_periodic_recheck() {
    recorder();
    let cluster = Cluster::start();
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE ROLE live LOGIN SUPERUSER").await.unwrap();
    let options = PgPoolOptions::new().max_connections(3).max_lifetime(Duration::from_secs(600));
    let pool = options.connect_with(cluster.options().username("live")).await.unwrap();
    let listener = ListenerConfig::new("hz_live", "jobs");
    let _listener = WatchedListener::connect(cluster.options().username("live"), listener).await.unwrap();
    let config = config("hz_live").hazard_recheck_interval(Duration::from_millis(300));
    let watch = instrument_pool(&pool, config).unwrap();
    assert!(!linted(&watch).await.contains("listener_without_keepalive"), "{:?}", watch.hazards());
    let connects_before = watch.heartbeat().direct.failures;

    admin.execute("ALTER ROLE live SET idle_session_timeout = '2s'").await.unwrap();
    eventually(Duration::from_secs(30), "the re-check flags the listener", async || {
        watch.hazards().iter().any(|f| f.hazard == Hazard::ListenerWithoutKeepalive).then_some(())
    })
    .await;
    assert_eq!(
        metric("poolwatch_config_hazard_active", &[(POOL, "hz_live"), ("hazard", "listener_without_keepalive")]),
        Some(1.0)
    );
    assert_eq!(
        watch.heartbeat().direct.failures,
        connects_before,
        "found without a reconnect of poolwatch's connection"
    );

    admin.execute("ALTER ROLE live RESET idle_session_timeout").await.unwrap();
    eventually(Duration::from_secs(30), "the hazard clears", async || {
        (!watch.hazards().iter().any(|f| f.hazard == Hazard::ListenerWithoutKeepalive)).then_some(())
    })
    .await;
}

/// New sessions the server has started so far, counted as a DBA counts them
/// (`pg_stat_database.sessions`, every database; PostgreSQL 14+).
async fn sessions(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT sum(sessions)::bigint FROM pg_stat_database").fetch_one(admin).await.unwrap()
}

/// A quiet replica (one pool, no traffic) opens no new backend while the hazard lint re-reads
/// the settings: the re-read runs on poolwatch's own connection. A role-level
/// `ALTER ROLE .. SET idle_session_timeout` after start-up is still found, by a re-read,
/// without a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_replica_opens_no_backend_per_recheck() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE ROLE app LOGIN").await.unwrap();
    admin.execute("CREATE DATABASE app OWNER app").await.unwrap();
    // One connection: on a loaded machine a heartbeat can come before sqlx has taken the last
    // one back (its return-to-pool ping runs in a task), and a larger pool opens another.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(cluster.options().username("app").database("app"))
        .await
        .unwrap();
    let config = Config::new("hz_quiet")
        .heartbeat_interval(Duration::from_millis(100))
        .hazard_recheck_interval(Duration::from_millis(200));
    let watch = instrument_pool(&pool, config).unwrap();
    linted(&watch).await;
    // Start-up is over (the fresh lint session, the census, the pool's first connection)
    // once a re-read and a pool heartbeat came after it.
    eventually(Duration::from_secs(30), "start-up is over", async || {
        (lints_for("hz_quiet") >= 2 && watch.heartbeat().pool.successes >= 2).then_some(())
    })
    .await;
    let before = sessions(&mut admin).await;
    let lints = lints_for("hz_quiet");
    const RECHECKS: usize = 4;
    eventually(Duration::from_secs(30), "several re-reads of the settings", async || {
        (lints_for("hz_quiet") >= lints + RECHECKS).then_some(())
    })
    .await;
    // The heartbeats after the last re-read: a lint session has ended (and been counted) by then.
    let beats = watch.heartbeat().direct.successes;
    eventually(Duration::from_secs(30), "two more direct heartbeats", async || {
        (watch.heartbeat().direct.successes >= beats + 2).then_some(())
    })
    .await;
    let opened = sessions(&mut admin).await - before;
    assert_eq!(opened, 0, "new backends over {RECHECKS} re-reads of the settings (want 0: the re-read opens nothing)");

    admin.execute("ALTER ROLE app SET idle_session_timeout = '1s'").await.unwrap();
    let before = sessions(&mut admin).await;
    let found = eventually(Duration::from_secs(30), "a re-read finds the role's idle_session_timeout", async || {
        watch.hazards().into_iter().find(|f| f.hazard == Hazard::IdleConnectionsKilledByIdleSessionTimeout)
    })
    .await;
    assert!(found.detail.contains("idle_session_timeout=1s"), "{}", found.detail);
    assert_eq!(watch.server_settings().unwrap().idle_session_timeout, Some(Duration::from_secs(1)));
    assert!(!watch.server_settings().unwrap().superuser, "the pool's role, not poolwatch's");
    assert_eq!(sessions(&mut admin).await - before, 0, "found without a new session");
}

/// At the defaults (a re-read every 60 s, heartbeats every 10 s), a quiet replica opens no
/// backend over a re-read interval: nothing runs a connection per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_replica_at_the_defaults_opens_no_backend_over_a_recheck_interval() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let mut admin = support::lasting_admin(&cluster).await;
    let pool = PgPoolOptions::new().connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("hz_quiet_defaults")).unwrap();
    linted(&watch).await;
    eventually(Duration::from_secs(30), "a heartbeat after the start-up lint", async || {
        (watch.heartbeat().pool.successes >= 2).then_some(())
    })
    .await;
    let before = sessions(&mut admin).await;
    eventually(Duration::from_secs(120), "the periodic re-read of the settings", async || {
        (lints_for("hz_quiet_defaults") >= 2).then_some(())
    })
    .await;
    // An app acquire brings the quiet replica's stretched heartbeat back to its interval.
    drop(watch.pool().acquire().await.unwrap());
    let beats = watch.heartbeat().direct.successes;
    eventually(Duration::from_secs(30), "a direct heartbeat after the re-read", async || {
        (watch.heartbeat().direct.successes > beats).then_some(())
    })
    .await;
    let opened = sessions(&mut admin).await - before;
    assert_eq!(opened, 0, "new backends over one hazard_recheck_interval at the defaults");
}
