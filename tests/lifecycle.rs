//! Lifecycle figures on a real server: connections opened, closed by
//! reason (idle timeout, max lifetime, a killed backend, pool close) and the oldest one's age,
//! with the pool built as the README says (`instrument_options_named`).

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{CloseReason, Config, Detail, LifecycleFigures, PoolWatch, instrument_options_named, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool};
use support::{Cluster, POOL, eventually, metric, recorder};

/// A pool built with the lifecycle hooks and watched at `Detail::Full` (the counters), after
/// its one start-up heartbeat (none during the test: it would open and use connections).
async fn watched(cluster: &Cluster, name: &str, options: PgPoolOptions) -> (PgPool, PoolWatch) {
    recorder();
    let pool =
        instrument_options_named(options.min_connections(0), name).connect_with(cluster.options()).await.unwrap();
    let config = Config::new(name)
        .sample_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_secs(3600))
        .detail(Detail::Full);
    let watch = instrument_pool(&pool, config).unwrap();
    support::startup_heartbeat(&watch).await;
    (pool, watch)
}

fn figures(watch: &PoolWatch) -> LifecycleFigures {
    watch.lifecycle().expect("the pool carries the lifecycle hooks")
}

fn closed_metric(pool: &str, reason: CloseReason) -> Option<f64> {
    metric("poolwatch_connections_closed_total", &[(POOL, pool), ("reason", reason.as_str())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_are_counted_and_the_oldest_age_grows() {
    let cluster = Cluster::start();
    let options = PgPoolOptions::new().max_connections(4).idle_timeout(Duration::from_secs(1));
    let (pool, watch) = watched(&cluster, "lc_idle", options).await;
    // Counters exist at 0 from the start (Detail::Full).
    for reason in CloseReason::ALL {
        assert!(closed_metric("lc_idle", reason).is_some(), "no closed_total{{reason={}}} at start", reason.as_str());
    }
    let db = watch.pool();
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| db.acquire())).await;
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    let first = figures(&watch);
    assert!(first.opened >= 3 && first.open >= 3, "{first:?}");
    // The health report carries them too (for a readiness endpoint's JSON).
    let in_report = watch.health().lifecycle.expect("the report has the lifecycle figures");
    assert!(in_report.opened >= 3 && in_report.open >= 3, "{in_report:?}");
    let age = first.oldest_age.expect("connections are open");
    eventually(Duration::from_secs(10), "the oldest connection's age grows", async || {
        (figures(&watch).oldest_age? > age + Duration::from_millis(500)).then_some(())
    })
    .await;
    drop(held);
    // sqlx's reaper closes them once idle past 1 s.
    let f = eventually(Duration::from_secs(30), "every connection closed by the idle timeout", async || {
        let f = figures(&watch);
        (pool.size() == 0 && f.open == 0).then_some(f)
    })
    .await;
    assert_eq!(f.closed_for(CloseReason::IdleTimeout), f.opened, "{f:?}");
    assert_eq!(f.closed_for(CloseReason::Broken) + f.closed_for(CloseReason::MaxLifetime), 0, "{f:?}");
    assert_eq!(f.oldest_age, None);
    let opened = f.opened as f64;
    eventually(Duration::from_secs(10), "the metrics say so", async || {
        let m = metric("poolwatch_pool_connects_total", &[(POOL, "lc_idle")])?;
        let idle = closed_metric("lc_idle", CloseReason::IdleTimeout)?;
        let age = metric("poolwatch_connection_oldest_age_seconds", &[(POOL, "lc_idle")])?;
        (m == opened && idle == opened && age == 0.0).then_some(())
    })
    .await;
    drop(watch);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_closes_are_counted_and_the_oldest_age_resets() {
    let cluster = Cluster::start();
    let options = PgPoolOptions::new().max_connections(1).max_lifetime(Duration::from_secs(2));
    let (pool, watch) = watched(&cluster, "lc_life", options).await;
    let db = watch.pool();
    sqlx::query("SELECT 1").execute(&db).await.unwrap();
    let mut peak = Duration::ZERO;
    // Keep the one connection busy: sqlx closes it on a release past its lifetime, or its
    // reaper while idle; the next query opens a new one, younger.
    let f =
        eventually(Duration::from_secs(30), "a connection closed for its lifetime, a younger one open", async || {
            sqlx::query("SELECT 1").execute(&db).await.unwrap();
            let f = figures(&watch);
            let age = f.oldest_age?;
            peak = peak.max(age);
            (f.closed_for(CloseReason::MaxLifetime) >= 1 && age + Duration::from_millis(500) < peak).then_some(f)
        })
        .await;
    assert_eq!(f.closed_for(CloseReason::Broken) + f.closed_for(CloseReason::IdleTimeout), 0, "{f:?}");
    eventually(Duration::from_secs(10), "the metric says so", async || {
        (closed_metric("lc_life", CloseReason::MaxLifetime)? >= 1.0).then_some(())
    })
    .await;
    drop(watch);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_counted_as_broken() {
    let cluster = Cluster::start();
    let (pool, watch) = watched(&cluster, "lc_kill", PgPoolOptions::new().max_connections(1)).await;
    let db = watch.pool();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&db).await.unwrap();
    let before = figures(&watch);
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut admin).await.unwrap();
    assert!(killed);
    admin.close().await.unwrap();
    // The next acquire pings the idle connection (test_before_acquire), finds it dead, opens
    // another.
    let other: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&db).await.unwrap();
    assert_ne!(pid, other);
    let f = eventually(Duration::from_secs(10), "the killed connection counted as broken", async || {
        let f = figures(&watch);
        (f.closed_for(CloseReason::Broken) == 1).then_some(f)
    })
    .await;
    assert_eq!(f.opened, before.opened + 1, "{f:?}");
    assert_eq!(f.open, 1);
    assert_eq!(f.closed.iter().sum::<u64>(), 1, "{f:?}");
    eventually(Duration::from_secs(10), "the metric says so", async || {
        (closed_metric("lc_kill", CloseReason::Broken)? == 1.0).then_some(())
    })
    .await;
    drop(watch);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_pool_counts_pool_closed() {
    let cluster = Cluster::start();
    let (pool, watch) = watched(&cluster, "lc_close", PgPoolOptions::new().max_connections(3)).await;
    let db = watch.pool();
    let (a, b) = (db.acquire().await.unwrap(), db.acquire().await.unwrap());
    drop(a);
    // `a` goes back on a task of sqlx's (a ping first): wait until it is idle, or it can land
    // in the idle queue after `close()` emptied it (sqlx 0.8) and stay open.
    eventually(Duration::from_secs(10), "the first connection is idle", async || (pool.num_idle() == 1).then_some(()))
        .await;
    let opened = figures(&watch).opened;
    assert!(opened >= 2);
    // Closed while one connection is checked out: it closes when given back.
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close().await }
    });
    eventually(Duration::from_secs(10), "the pool is closed", async || pool.is_closed().then_some(())).await;
    drop(b);
    closing.await.unwrap();
    // sqlx closes the given-back connection on a task of its own. In sqlx 0.8 that can end
    // after `close()` returns: closing an idle connection hands back a permit it never held,
    // so `close()` stops waiting before the checked-out one is closed.
    // And sqlx 0.8 can leave that one open for good (docs/lifecycle.md): there the figures
    // must agree with the pool, whatever it left open.
    let left_open = |size: u32| if cfg!(feature = "sqlx-0_8") { size } else { 0 };
    let f = eventually(Duration::from_secs(10), "both connections counted closed", async || {
        let f = figures(&watch);
        (f.open == left_open(pool.size()) && f.open == pool.size()).then_some(f)
    })
    .await;
    let closed = opened - u64::from(f.open);
    assert_eq!(f.closed_for(CloseReason::PoolClosed), closed, "{f:?}");
    assert_eq!(f.closed.iter().sum::<u64>(), closed, "{f:?}");
    assert!(f.open > 0 || f.oldest_age.is_none(), "{f:?}");
    // The watch's task keeps counting after the close, until the pool is empty.
    eventually(Duration::from_secs(10), "the metric says so", async || {
        (closed_metric("lc_close", CloseReason::PoolClosed)? >= closed as f64).then_some(())
    })
    .await;
    drop(watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_hooks_there_are_no_lifecycle_figures() {
    let cluster = Cluster::start();
    recorder();
    let pool = support::pool(&cluster, 1).await;
    let watch = instrument_pool(&pool, Config::new("lc_none")).unwrap();
    assert_eq!(watch.lifecycle(), None);
    assert_eq!(watch.health().lifecycle, None);
    assert_eq!(metric("poolwatch_connection_oldest_age_seconds", &[(POOL, "lc_none")]), None);
    drop(watch);
    pool.close().await;
}
