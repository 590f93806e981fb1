//! Acquires that bypass `WatchedPool` (a library holding the bare `PgPool`): the pool's hooks
//! (`instrument_options_named`) count every acquire and release, and sqlx's own acquire
//! events, read by `sqlx_acquire_layer`, give each acquire's wait, attributed to the right
//! pool among several, and never twice for a `WatchedPool` acquire.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, instrument_options_named, instrument_pool, sqlx_acquire_layer};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::{Cluster, eventually, pool_value, recorder};
use tracing_subscriber::layer::SubscriberExt;

/// The app's setup: a Prometheus recorder and a subscriber with poolwatch's layer.
fn setup() {
    recorder();
    static SUBSCRIBER: OnceLock<()> = OnceLock::new();
    SUBSCRIBER.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(sqlx_acquire_layer());
        tracing::subscriber::set_global_default(subscriber).expect("install the subscriber");
    });
}

/// The bare-pool figures of `pool`: connects, idle acquires, releases, waits seen, slow.
fn figures(pool: &str) -> [f64; 5] {
    [
        pool_value("poolwatch_pool_connects_total", pool),
        pool_value("poolwatch_pool_idle_acquires_total", pool),
        pool_value("poolwatch_pool_releases_total", pool),
        pool_value("db_client_connection_wait_time_seconds_count", pool),
        pool_value("poolwatch_pool_slow_acquires_total", pool),
    ]
}

async fn pool(cluster: &Cluster, name: &str, options: PgPoolOptions) -> PgPool {
    instrument_options_named(options, name).connect_with(cluster.options()).await.expect("connect")
}

/// The figures once every connection of `p` is back in the pool (the release hook runs in a
/// spawned task, before the connection is idle again).
async fn settled(name: &str, p: &PgPool) -> [f64; 5] {
    let what = format!("every connection of {name} idle");
    eventually(Duration::from_secs(10), &what, async || (p.num_idle() as u32 == p.size()).then(|| figures(name))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_sqlx_events_count_every_bare_acquire_of_each_pool() {
    setup();
    let cluster = Cluster::start();
    let a = pool(&cluster, "bare_a", PgPoolOptions::new().max_connections(2)).await;
    let b = pool(&cluster, "bare_b", PgPoolOptions::new().max_connections(3)).await;
    assert_eq!(figures("bare_a")[4], 0.0, "the slow counter exists at 0");
    let a0 = settled("bare_a", &a).await;
    let b0 = settled("bare_b", &b).await;

    // A library on pool a: 10 queries one after another, each one acquire of the idle connection.
    for _ in 0..10 {
        sqlx::query("SELECT 1").execute(&a).await.unwrap();
    }
    // Pool b: two connections held at once (the second one is opened), then 5 queries.
    let first = b.acquire().await.unwrap();
    let second = b.acquire().await.unwrap();
    drop((first, second));
    for _ in 0..5 {
        sqlx::query("SELECT 1").execute(&b).await.unwrap();
    }

    let a1 = settled("bare_a", &a).await;
    let b1 = settled("bare_b", &b).await;
    // Acquires (opened + idle), releases, waits seen by the layer, slow ones. (sqlx may or may
    // not keep the connection `connect_with` opened, so the first query may open one.)
    let delta =
        |x: [f64; 5], y: [f64; 5]| -> [f64; 4] { [y[0] + y[1] - x[0] - x[1], y[2] - x[2], y[3] - x[3], y[4] - x[4]] };
    assert_eq!(delta(a0, a1), [10.0, 10.0, 10.0, 0.0], "pool a: {a0:?} -> {a1:?}");
    assert_eq!(delta(b0, b1), [7.0, 7.0, 7.0, 0.0], "pool b: {b0:?} -> {b1:?}");
    assert!(b1[0] - b0[0] >= 1.0, "two held at once: one was opened");
}

/// A `WatchedPool` acquire records its wait itself; the layer leaves sqlx's event for it alone.
/// Every acquire, watched or bare, heartbeat included, is one wait: hooks and waits agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_acquire_is_one_wait_not_two() {
    setup();
    let cluster = Cluster::start();
    let bare = pool(&cluster, "bare_mixed", PgPoolOptions::new().max_connections(3)).await;
    let config = Config::new("bare_mixed").census_interval(Duration::from_secs(60));
    let watch = instrument_pool(&bare, config).expect("instrument");
    let watched = watch.pool();
    for i in 0..20 {
        if i % 2 == 0 {
            sqlx::query("SELECT 1").execute(&watched).await.unwrap();
        } else {
            sqlx::query("SELECT 1").execute(&bare).await.unwrap();
        }
    }
    let f = eventually(Duration::from_secs(10), "hooks and waits agree", async || {
        let f = settled("bare_mixed", &bare).await;
        (f[0] + f[1] == f[3]).then_some(f)
    })
    .await;
    assert!(f[0] + f[1] >= 20.0, "20 queries, each an acquire: {f:?}");
    watch.shutdown().await;
}

/// sqlx reports an acquire slower than `acquire_slow_threshold` at WARN by default: the layer
/// counts it for the right pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_bare_acquire_is_counted_with_its_wait() {
    setup();
    let cluster = Cluster::start();
    let options = PgPoolOptions::new().max_connections(1).acquire_slow_threshold(Duration::from_millis(100));
    let p = pool(&cluster, "bare_slow", options).await;
    let before = settled("bare_slow", &p).await;
    let sum_before = pool_value("db_client_connection_wait_time_seconds_sum", "bare_slow");

    let held = p.acquire().await.unwrap();
    let started = Instant::now();
    let waiter = tokio::spawn({
        let p = p.clone();
        async move { drop(p.acquire().await.unwrap()) }
    });
    // Hold the only connection until the waiter has waited past the threshold.
    eventually(Duration::from_secs(10), "the waiter waits past the slow threshold", async || {
        (started.elapsed() > Duration::from_millis(250)).then_some(())
    })
    .await;
    drop(held);
    waiter.await.unwrap();

    let after = settled("bare_slow", &p).await;
    assert_eq!(after[4] - before[4], 1.0, "one slow acquire: {before:?} -> {after:?}");
    assert_eq!(after[3] - before[3], 2.0, "both acquires' waits");
    let waited = pool_value("db_client_connection_wait_time_seconds_sum", "bare_slow") - sum_before;
    assert!(waited >= 0.1, "the slow acquire's wait is in the histogram: {waited}");
}
