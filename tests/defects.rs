//! Defects found by the fault matrix, each on a real server: a second
//! `instrument_pool` on a watched pool, a census timeout PostgreSQL cannot take, a census
//! after `pool.close()`, and census figures published before any census ran.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Cause, Config, instrument_pool};
use sqlx::Connection;
use support::{Cluster, POOL, eventually, metric, quiet_config, recorder};

async fn sessions_named(cluster: &Cluster, pattern: &str) -> i64 {
    let mut admin = support::admin(cluster).await;
    let n = support::sessions_like(&mut admin, pattern).await;
    let _ = admin.close().await;
    n
}

/// Defect 1: a second `instrument_pool` re-tagged the pool, and the first watch then found
/// none of its sessions: a phantom gap the size of the pool, a false leak alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instrument_pool_on_a_watched_pool_is_refused() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 4).await;
    let first = instrument_pool(&pool, quiet_config("dup_first")).expect("the first watch");
    let err = instrument_pool(&pool, quiet_config("dup_second")).expect_err("a second watch on the same pool");
    assert_eq!(err.field, "pool", "{err}");
    assert!(err.to_string().contains("already instrumented") && err.to_string().contains("fix:"), "{err}");

    // The first watch still counts every session: no phantom while nothing leaked.
    let held = [pool.acquire().await.unwrap(), pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
    let s = eventually(Duration::from_secs(30), "a settled census", async || {
        first.census_now().await.ok().filter(|s| s.pool.open == s.server.as_ref().map_or(0, |c| c.total()))
    })
    .await;
    assert_eq!(s.phantom, Some(0), "{s:?}");
    assert!(s.server.as_ref().is_some_and(|c| c.total() >= 3), "{s:?}");
    drop(held);

    // Once the first watch is gone the pool may be instrumented again, with one tag.
    first.shutdown().await;
    // Connections checked out at instrument time keep their old tag (documented): let sqlx's
    // spawned returns bring them back first, so the new watch re-tags them all.
    eventually(Duration::from_secs(30), "every connection back idle", async || {
        (pool.num_idle() == pool.size() as usize).then_some(())
    })
    .await;
    let again = instrument_pool(&pool, quiet_config("dup_again")).expect("instrument again after shutdown");
    assert_eq!(again.application_name().matches("pw:").count(), 1, "{}", again.application_name());
    let s = eventually(Duration::from_secs(30), "a settled census", async || {
        again.census_now().await.ok().filter(|s| s.pool.open == s.server.as_ref().map_or(0, |c| c.total()))
    })
    .await;
    assert_eq!(s.phantom, Some(0), "{s:?}");
    drop(again);
    // Dropping the handle frees the pool as well.
    instrument_pool(&pool, quiet_config("dup_dropped")).expect("instrument again after drop");
}

/// Defect 2: `census_timeout` becomes the dedicated connection's `statement_timeout`; above
/// 2,147,483,647 ms PostgreSQL refused the connection and the census stayed down for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_census_timeout_postgres_cannot_take_is_a_config_error() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    for too_long in [Duration::from_millis(2_147_483_648), Duration::MAX] {
        let err =
            instrument_pool(&pool, quiet_config("timeout_big").census_timeout(too_long)).expect_err("out of range");
        assert_eq!(err.field, "census_timeout", "{err}");
        assert!(err.to_string().contains("2147483647 ms"), "{err}");
    }
    // The largest value the server takes works end to end.
    let watch =
        instrument_pool(&pool, quiet_config("timeout_max").census_timeout(Duration::from_millis(2_147_483_647)))
            .expect("the limit itself is valid");
    let s = watch.census_now().await.expect("the server takes statement_timeout = 2147483647");
    assert!(s.census_up);
}

/// Defect 5: after `pool.close()` a census reopened poolwatch's own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_census_and_no_new_connection_after_the_pool_closes() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    let watch = instrument_pool(&pool, quiet_config("closed")).unwrap();
    watch.census_now().await.expect("a census while open");
    tokio::time::timeout(Duration::from_secs(30), pool.close()).await.expect("the pool closes");
    eventually(Duration::from_secs(30), "poolwatch's connections closed", async || {
        (sessions_named(&cluster, "poolwatch-%closed%").await == 0).then_some(())
    })
    .await;
    for _ in 0..3 {
        assert_eq!(watch.census_now().await.map(|_| ()), Err(Cause::PoolClosed));
    }
    assert_eq!(sessions_named(&cluster, "poolwatch-%closed%").await, 0, "poolwatch opened a new connection");
    assert!(!watch.snapshot().census_up || watch.snapshot().server.is_some());
}

/// Defect 7: before the first census, `/metrics` showed `poolwatch_phantom_connections 0`
/// next to `poolwatch_census_up 0`: a figure nobody measured read as "healthy".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_figures_are_absent_until_a_census_succeeds() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    // The census reads a database that does not exist: it fails at every tick.
    let direct = cluster.options().database("no_such_database");
    let config = Config::new("unmeasured")
        .census_interval(Duration::from_millis(100))
        .heartbeat_interval(Duration::from_secs(3600))
        .direct_connect_options(direct);
    let watch = instrument_pool(&pool, config).unwrap();
    let labels = [(POOL, "unmeasured")];
    eventually(Duration::from_secs(30), "a few failed censuses", async || {
        (support::metric_sum("poolwatch_census_errors_total", &labels) >= 2.0).then_some(())
    })
    .await;
    assert_eq!(metric("poolwatch_census_up", &labels), Some(0.0));
    for name in [
        "poolwatch_phantom_connections",
        "poolwatch_server_connections",
        "poolwatch_server_longest_in_state_seconds",
        "poolwatch_client_sockets",
    ] {
        assert_eq!(metric(name, &labels), None, "{name} must be absent before a census succeeded");
    }
    drop(watch);

    // A census that succeeds publishes them.
    let pool2 = support::pool(&cluster, 2).await;
    let watch = instrument_pool(&pool2, config_measured()).unwrap();
    watch.census_now().await.expect("a census");
    let labels = [(POOL, "measured")];
    assert!(metric("poolwatch_phantom_connections", &labels).is_some());
    assert!(metric("poolwatch_server_connections", &labels).is_some());
    assert_eq!(metric("poolwatch_census_up", &labels), Some(1.0));
}

fn config_measured() -> Config {
    quiet_config("measured")
}
