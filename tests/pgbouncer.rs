//! Incident 2's setting: the pool goes through a real PgBouncer in transaction mode.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Cause, Config, Diagnosis, Hazard, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use support::pgbouncer::PgBouncer;
use support::{Cluster, eventually, metric, recorder};

const POOL: &str = "db_client_connection_pool_name";

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
    let gauge = |h: Hazard| metric("poolwatch_config_hazard", &[(POOL, "pgb"), ("hazard", h.as_str())]);
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
