//! An app with one pool and no pool hooks (nothing changed but `instrument_pool` and the
//! layer): sqlx's slow-acquire events still reach that pool's figures, and its wait histogram
//! stays empty rather than holding only the slow tail.

mod support;

use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool, sqlx_acquire_layer};
use sqlx::postgres::PgPoolOptions;
use support::{Cluster, POOL, eventually, metric, recorder};
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_pool_gets_sqlx_slow_acquire_events_without_hooks() {
    recorder();
    let subscriber = tracing_subscriber::registry().with(sqlx_acquire_layer());
    tracing::subscriber::set_global_default(subscriber).expect("install the subscriber");
    let cluster = Cluster::start();
    let options = PgPoolOptions::new().max_connections(1).acquire_slow_threshold(Duration::from_millis(100));
    let pool = options.connect_with(cluster.options()).await.expect("connect");
    let watch = instrument_pool(&pool, Config::new("lone").census_interval(Duration::from_secs(60))).unwrap();
    let slow = || metric("poolwatch_pool_slow_acquires_total", &[(POOL, "lone")]);
    assert_eq!(slow(), Some(0.0), "at 0 from the start: the layer is installed");

    let held = pool.acquire().await.unwrap();
    let started = Instant::now();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { drop(pool.acquire().await.unwrap()) }
    });
    eventually(Duration::from_secs(10), "the waiter waits past the slow threshold", async || {
        (started.elapsed() > Duration::from_millis(250)).then_some(())
    })
    .await;
    drop(held);
    waiter.await.unwrap();

    eventually(Duration::from_secs(5), "the slow acquire is counted", async || slow().filter(|n| *n >= 1.0)).await;
    let waits = metric("db_client_connection_wait_time_seconds_count", &[(POOL, "lone")]).unwrap_or(0.0);
    assert_eq!(waits, 0.0, "acquire_time_level is off: no wait histogram of slow acquires alone");
    watch.shutdown().await;
}
