//! The exhaustion snapshot (incident 4) on a real server: when an acquire through the watched
//! pool times out, one WARN (rate-limited) and a span event say who holds the pool's
//! connections, grouped by the call site that acquired them, who waits and for how long, and
//! what the census last saw; `poolwatch_acquire_oldest_wait_seconds` is PgBouncer's `maxwait`
//! for the app's own pool.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;
use support::{Cluster, POOL, eventually, metric, recorder};
use tracing::Level;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_timeout_says_who_holds_the_pool_who_waits_and_what_the_census_saw() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(cluster.options())
        .await
        .unwrap();
    let config = Config::new("snap")
        .sample_interval(Duration::from_millis(50))
        .census_interval(Duration::from_millis(200))
        // One heartbeat at start (it uses a pool slot), then none during the test.
        .heartbeat_interval(Duration::from_secs(3600));
    let watch = instrument_pool(&pool, config).unwrap();
    support::startup_heartbeat(&watch).await;
    let db = watch.pool();

    // Two slow requests at one call site, a transaction left open at another.
    let mut held = Vec::new();
    let mut site_a = 0;
    for _ in 0..2 {
        let (conn, at) = (db.acquire().await.unwrap(), line!());
        held.push(conn);
        site_a = at;
    }
    let (mut tx, site_b) = (db.begin().await.unwrap(), line!());
    tx.execute("SELECT 1").await.unwrap();
    eventually(Duration::from_secs(10), "the census sees the three sessions", async || {
        let server = watch.snapshot().server?;
        (server.total() == 3 && server.get("idle_in_transaction") == 1).then_some(())
    })
    .await;

    // A first caller waits; once it has waited a second, a second one comes.
    let first = tokio::spawn({
        let db = db.clone();
        async move { db.acquire().await.map(drop) }
    });
    let oldest = || metric("poolwatch_acquire_oldest_wait_seconds", &[(POOL, "snap")]).unwrap_or(0.0);
    eventually(Duration::from_secs(3), "the oldest wait shows as a gauge", async || (oldest() >= 1.0).then_some(()))
        .await;
    let second = tokio::spawn({
        let db = db.clone();
        async move { db.acquire().await.map(drop) }
    });
    assert!(matches!(first.await.unwrap(), Err(sqlx::Error::PoolTimedOut)));
    assert!(matches!(second.await.unwrap(), Err(sqlx::Error::PoolTimedOut)));

    let snapshots: Vec<_> = support::spans::events_at(Level::WARN)
        .into_iter()
        .chain(support::spans::events_at(Level::DEBUG))
        .filter(|e| e.fields.get("pool").map(String::as_str) == Some("snap") && e.name.starts_with("pool exhausted"))
        .collect();
    let warns: Vec<_> = snapshots.iter().filter(|e| e.level == Level::WARN).collect();
    assert_eq!(warns.len(), 1, "one WARN for two timeouts within the rate limit: {snapshots:#?}");
    assert_eq!(snapshots.len(), 2, "a span event for each timeout: {snapshots:#?}");
    let w = &warns[0].fields;
    println!("exhaustion WARN: {}", warns[0].name);
    let holders = &w["holders"];
    let here = file!();
    assert!(holders.contains(&format!("{here}:{site_a} x2 (oldest ")), "{holders}");
    assert!(holders.contains(&format!("{here}:{site_b} x1 (oldest ")), "{holders}");
    assert!(holders.find(&format!(":{site_a} ")) < holders.find(&format!(":{site_b} ")), "oldest first: {holders}");
    assert_eq!(w["held_through_watched_pool"], "3");
    assert_eq!(w["held_elsewhere"], "0");
    assert_eq!(w["waiters"], "1", "the second caller still waits when the first times out");
    assert!(w["oldest_wait_seconds"].parse::<f64>().unwrap() > 0.0, "{w:?}");
    let census = &w["census"];
    assert!(census.contains("pool 3 open / 0 idle") && census.contains("idle_in_transaction 1"), "{census}");
    assert!(census.contains("phantom 0"), "{census}");
    // The same snapshot is a span event of the timed-out acquire's span.
    assert_eq!(metric("db_client_connection_timeouts_total", &[(POOL, "snap")]), Some(2.0));

    eventually(Duration::from_secs(3), "no waiter left: the gauge is back to 0", async || {
        (oldest() == 0.0).then_some(())
    })
    .await;
    tx.rollback().await.unwrap();
    drop(held);
}
