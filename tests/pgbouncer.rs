//! Incident 2's setting: the pool goes through a real PgBouncer in transaction mode.

mod support;

use std::time::Duration;

use poolwatch::hazards::Hazard;
use poolwatch::sqlx;
use poolwatch::{Cause, CloseReason, Config, Diagnosis, instrument_options_named, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use support::pgbouncer::PgBouncer;
use support::{Cluster, POOL, eventually, metric, recorder};

/// Per-hazard series (checked here) are `Detail::Full`; the default's hazard count is in
/// tests/export.rs.
fn config(name: &str) -> Config {
    Config::new(name)
        .detail(poolwatch::Detail::Full)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_secs(1))
}

/// The pool heartbeat works through PgBouncer (simple protocol, no named statements); the
/// declared pooler idle timeout raises the refresh hazard; the direct connection goes
/// straight to the server, so when PgBouncer dies the verdict is "pool path", not "database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_pooler_hazard_through_pgbouncer_in_transaction_mode() {
    recorder();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("server_idle_timeout", "10")]);
    let pool = PgPoolOptions::new().max_connections(4).connect_lazy_with(bouncer.options());
    let declared = config("pgb")
        .expect_refresh_every(Duration::from_secs(30))
        .pooler_idle_timeout(Duration::from_secs(10))
        .direct_connect_options(cluster.options());
    let watch = instrument_pool(&pool, declared).unwrap();

    eventually(Duration::from_secs(20), "several heartbeats on both paths", async || {
        let h = watch.heartbeat();
        (h.pool.successes >= 5 && h.direct.successes >= 5).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    assert_eq!((h.pool.failures, h.direct.failures), (0, 0), "{h:?}");
    println!(
        "through pgbouncer: pool {:?}, direct {:?}",
        h.pool.last_duration.unwrap(),
        h.direct.last_duration.unwrap()
    );

    let found =
        eventually(Duration::from_secs(20), "the lint ran", async || watch.server_settings().map(|_| watch.hazards()))
            .await;
    let names: Vec<&str> = found.iter().map(|f| f.hazard.as_str()).collect();
    assert!(names.contains(&"refresh_slower_than_pooler_idle_timeout"), "{names:?}");
    assert!(!names.contains(&"max_connections_over_server_capacity"), "not checked behind a pooler: {names:?}");
    let gauge = |h: Hazard| metric("poolwatch_config_hazard_active", &[(POOL, "pgb"), ("hazard", h.as_str())]);
    assert_eq!(gauge(Hazard::RefreshSlowerThanPoolerIdleTimeout), Some(1.0));
    assert_eq!(gauge(Hazard::MaxConnectionsOverServerCapacity), Some(0.0));

    // PgBouncer dies, the server lives: only the pool path fails.
    drop(bouncer);
    eventually(Duration::from_secs(20), "pool path down, direct up", async || {
        let h = watch.heartbeat();
        (h.pool.up == Some(false) && h.direct.up == Some(true)).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    assert_eq!(h.diagnosis(), Some(Diagnosis::PoolSide));
    println!("pgbouncer gone: pool path cause {:?}", h.pool.last_cause);
    assert!(matches!(h.pool.last_cause, Some(Cause::PoolTimedOut | Cause::Refused | Cause::ConnectionEnded)), "{h:?}");
    watch.shutdown().await;
}

/// Why `direct_connect_options` exists: without it the dedicated connection goes through
/// PgBouncer too, which refuses its `options` startup parameter (per-session timeouts),
/// while the pool path works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_direct_options_the_direct_path_fails_through_pgbouncer() {
    recorder();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[]);
    let pool = PgPoolOptions::new().max_connections(2).connect_lazy_with(bouncer.options());
    let watch = instrument_pool(&pool, config("pgb_nodirect")).unwrap();
    eventually(Duration::from_secs(20), "pool path up, direct path down", async || {
        let h = watch.heartbeat();
        (h.pool.successes >= 3 && h.direct.up == Some(false)).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    println!("direct through pgbouncer: {:?}", h.direct.last_cause);
    assert_eq!(h.pool.up, Some(true));
    assert_eq!(h.diagnosis(), Some(Diagnosis::DirectOnly));
    assert!(bouncer.log().contains("unsupported startup parameter"), "{}", bouncer.log());
    watch.shutdown().await;
}

/// Incident 2's setting for a pool a library drives: the bare-pool hooks and the lifecycle
/// ledger behind a transaction-mode PgBouncer whose `client_idle_timeout` ends idle pool
/// connections. sqlx's ping on the next acquire finds such a connection dead, closes it and
/// opens another: every close is `broken`, every open is a counted connect, and the ledger
/// agrees with the pool. (How many the pooler ends depends on the machine's speed, so the test
/// checks what must hold for any count.) Simple-protocol queries (`raw_sql`): transaction
/// mode hands a client whichever server connection is free, where a named statement may already
/// exist, and sqlx's unnamed one can be parsed on one server and bound on another (seen in the
/// flake check: "unnamed prepared statement does not exist").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_lifecycle_through_pgbouncer() {
    recorder();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("client_idle_timeout", "1")]);
    let options = instrument_options_named(PgPoolOptions::new().max_connections(2), "pgb_hooks");
    let pool = options.connect_lazy_with(bouncer.options());
    // One start-up heartbeat, then none: only the test's queries use the pool.
    let config = config("pgb_hooks")
        .heartbeat_interval(Duration::from_secs(3600))
        .heartbeat_timeout(Duration::from_secs(10))
        .direct_connect_options(cluster.options());
    let watch = instrument_pool(&pool, config).unwrap();
    eventually(Duration::from_secs(20), "the start-up heartbeat through PgBouncer", async || {
        watch.heartbeat().pool.up.filter(|up| *up)
    })
    .await;
    sqlx::raw_sql("SELECT 1").execute(&pool).await.unwrap();
    eventually(Duration::from_secs(30), "PgBouncer ends an idle pool connection", async || {
        bouncer.log().contains("client_idle_timeout").then_some(())
    })
    .await;
    // The next query's ping meets the dead connection; sqlx opens another.
    sqlx::raw_sql("SELECT 1").execute(&pool).await.unwrap();
    let f = eventually(Duration::from_secs(20), "the dead connection counted closed", async || {
        let f = watch.lifecycle()?;
        (f.closed_for(CloseReason::Broken) >= 1 && f.open as usize == pool.size() as usize).then_some(f)
    })
    .await;
    assert_eq!(f.closed.iter().sum::<u64>(), f.closed_for(CloseReason::Broken), "every close is broken: {f:?}");
    assert_eq!(f.opened, f.closed_for(CloseReason::Broken) + u64::from(f.open), "{f:?}");
    assert!(f.opened >= 2, "{f:?}");
    let hook = |name: &str| metric(name, &[(POOL, "pgb_hooks")]).unwrap_or(-1.0);
    eventually(Duration::from_secs(10), "the hook counters say so", async || {
        (hook("poolwatch_pool_connects_total") == f.opened as f64).then_some(())
    })
    .await;
    // Three acquires (the heartbeat's, two queries'), each from the idle queue or a connect.
    let acquires = hook("poolwatch_pool_idle_acquires_total") + hook("poolwatch_pool_connects_total");
    assert!(acquires >= 3.0, "{acquires} acquires counted");
    eventually(Duration::from_secs(10), "three releases (sqlx gives back on a task of its own)", async || {
        (hook("poolwatch_pool_releases_total") >= 3.0).then_some(())
    })
    .await;
    // `lifecycle()` only reads; the next sample publishes what it counted.
    let broken = || metric("poolwatch_connections_closed_total", &[(POOL, "pgb_hooks"), ("reason", "broken")]);
    let want = f.closed_for(CloseReason::Broken) as f64;
    eventually(Duration::from_secs(10), "the next sample publishes the closes", async || {
        (broken() == Some(want)).then_some(())
    })
    .await;
    watch.shutdown().await;
    pool.close().await;
}
