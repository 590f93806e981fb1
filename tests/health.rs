//! `watch.health()` with a real pool in each state: ok, failing when the pool is exhausted
//! (the database fine), failing when the database is down, degraded by a growing then standing
//! phantom gap (incident 1's leaked slots), by a configuration hazard, and with the pool's
//! listeners listed.

mod support;

use std::time::Duration;

use poolwatch::report::{HealthReport, HealthStatus};
use poolwatch::sqlx;
use poolwatch::{Config, ListenerConfig, PoolWatch, WatchedListener, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use support::{Cluster, eventually, recorder};

fn config(name: &str) -> Config {
    Config::new(name)
        .sample_interval(Duration::from_millis(50))
        .census_interval(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(100))
        // Long enough for a connect to the restarted server on a loaded machine: a beat cut
        // shorter cancels the pool's own reconnect each time.
        .heartbeat_timeout(Duration::from_secs(3))
        .heartbeat_max_backoff(Duration::from_millis(200))
}

fn codes(h: &HealthReport) -> Vec<&'static str> {
    h.reasons.iter().map(|r| r.code).collect()
}

async fn until(watch: &PoolWatch, what: &str, f: impl Fn(&HealthReport) -> bool) -> HealthReport {
    eventually(Duration::from_secs(90), what, async || Some(watch.health()).filter(&f)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_then_failing_when_exhausted_then_ok_then_failing_when_the_database_stops() {
    recorder();
    let cluster = Cluster::start();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(cluster.options())
        .await
        .unwrap();
    let watch = instrument_pool(&pool, config("health_a")).unwrap();
    let h = until(&watch, "ok with both heartbeats up", |h| {
        h.status == HealthStatus::Ok && h.heartbeat.diagnosis == Some("healthy") && h.gap.census_up
    })
    .await;
    assert!(h.reasons.is_empty() && h.gap.phantom == Some(0), "{h:?}");
    assert_eq!(h.addresses_down, 0);

    // Every slot held: the app cannot get a connection, the database is fine.
    let db = watch.pool();
    let held = vec![db.acquire().await.unwrap(), db.acquire().await.unwrap()];
    let h = until(&watch, "failing: pool side", |h| h.status == HealthStatus::Failing).await;
    assert_eq!(codes(&h)[0], "pool_heartbeat_failing", "{h:?}");
    assert_eq!(h.heartbeat.diagnosis, Some("pool_side"));
    assert_eq!(h.heartbeat.pool.last_cause, Some("pool_timed_out"));
    assert_eq!((h.pool.used, h.pool.max), (2, 2));
    #[cfg(feature = "serde")]
    {
        let json = serde_json::to_value(&h).unwrap();
        println!("{}", serde_json::to_string_pretty(&json).unwrap());
        assert_eq!(json["status"], "failing");
        assert_eq!(json["reasons"][0]["code"], "pool_heartbeat_failing");
        assert_eq!(json["heartbeat"]["direct"]["up"], true);
        assert_eq!(json["pool"]["used"], 2);
    }
    drop(held);
    until(&watch, "ok again once the slots are back", |h| h.status == HealthStatus::Ok).await;

    // The database stops: both paths fail.
    cluster.stop();
    let h = until(&watch, "failing: database", |h| codes(h).first() == Some(&"database_unreachable")).await;
    assert_eq!(h.status, HealthStatus::Failing);
    assert_eq!(h.heartbeat.diagnosis, Some("database_or_network"));
    cluster.start_server();
    until(&watch, "ok after the restart", |h| h.status == HealthStatus::Ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_slots_make_the_gap_grow_then_stand_degraded() {
    recorder();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 10).await;
    let watch = instrument_pool(&pool, config("health_b")).unwrap();
    until(&watch, "ok", |h| h.status == HealthStatus::Ok && h.gap.census_up).await;
    let db = watch.pool();
    // Incident 1: a slot leaks and its session ends; the pool keeps counting it.
    for leaked in 1..=3i64 {
        let conn = db.acquire().await.unwrap().leak();
        sqlx::Connection::close(conn).await.unwrap();
        let phantom = eventually(Duration::from_secs(10), "the census sees the leak", async || {
            watch.snapshot().phantom.filter(|p| *p == leaked)
        });
        phantom.await;
    }
    let h = until(&watch, "degraded: the gap grows", |h| h.gap.growing).await;
    assert_eq!(h.status, HealthStatus::Degraded);
    assert!(codes(&h).contains(&"phantom_gap_growing"), "{h:?}");
    assert_eq!(h.gap.phantom, Some(3));
    assert_eq!(h.stranded_slots.unwrap_or(0), 0, "leak() slots are the app's, not stranded: {h:?}");
    let h = until(&watch, "degraded: the gap stands", |h| !h.gap.growing).await;
    assert_eq!(codes(&h), ["phantom_gap"], "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hazard_is_degraded_and_the_pools_listeners_are_listed() {
    recorder();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 10).await;
    // 40 replicas × (10 + 1) connections do not fit the server's 300.
    let watch = instrument_pool(&pool, config("health_c").replicas(40)).unwrap();
    let listener = WatchedListener::connect((*pool.connect_options()).clone(), ListenerConfig::new("health_c", "jobs"))
        .await
        .unwrap();
    let h = until(&watch, "degraded by the hazard", |h| !h.hazards.is_empty()).await;
    assert_eq!(h.status, HealthStatus::Degraded);
    assert_eq!(codes(&h), ["config_hazard"], "{h:?}");
    assert_eq!(h.hazards[0].hazard, "max_connections_over_server_capacity");
    assert!(!h.hazards[0].fix.is_empty());
    assert_eq!(h.listeners.len(), 1, "{h:?}");
    assert_eq!((h.listeners[0].name.as_str(), h.listeners[0].connected), ("jobs", true));
    drop(listener);
    assert!(watch.health().listeners.is_empty(), "a dropped listener leaves the report");
}

/// The role runs out of connection slots (its `CONNECTION LIMIT` reached, 53300): the pool is
/// below its maximum and cannot open a connection, while poolwatch's own connection answers.
/// That is not this process holding its slots, and a restart would drop the connections it
/// still has: the report says `pool_cannot_grow`, not `pool_heartbeat_failing`. At the default
/// `Config`, as an app runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_out_of_connection_slots_reads_pool_cannot_grow_not_exhausted() {
    recorder();
    let cluster = Cluster::start();
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .arg(cluster.url())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    psql("CREATE ROLE full_role LOGIN");
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(cluster.options().username("full_role"))
        .await
        .unwrap();
    let watch = instrument_pool(&pool, Config::new("health_full")).unwrap();
    until(&watch, "ok with both heartbeats up", |h| {
        h.status == HealthStatus::Ok && h.heartbeat.diagnosis == Some("healthy") && h.gap.census_up
    })
    .await;
    let db = watch.pool();
    let mut held = vec![db.acquire().await.unwrap(), db.acquire().await.unwrap()];
    while pool.num_idle() > 0 {
        held.push(db.acquire().await.unwrap());
    }
    // The role's limit is what it holds now (poolwatch's start-up lint connection aside).
    let count = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'full_role' \
                 AND application_name NOT LIKE 'poolwatch-lint:%'";
    psql(&format!("ALTER ROLE full_role CONNECTION LIMIT {}", psql(count)));
    // A caller of the app waits too, as under load.
    let waiter = tokio::spawn({
        let db = db.clone();
        async move { db.acquire().await.map(drop) }
    });

    let h = until(&watch, "failing: the pool cannot grow", |h| h.status == HealthStatus::Failing).await;
    #[cfg(feature = "serde")]
    println!("{}", serde_json::to_string_pretty(&h).unwrap());
    assert_eq!(codes(&h)[0], "pool_cannot_grow", "{h:?}");
    assert!(!codes(&h).contains(&"pool_heartbeat_failing"), "not the process's slots: {h:?}");
    assert_eq!(h.heartbeat.direct.up, Some(true), "the database answers: {h:?}");
    assert!(h.pool.open < h.pool.max, "{:?}", h.pool);
    assert!(h.reasons[0].message.contains("do not restart"), "{}", h.reasons[0].message);
    assert!(matches!(waiter.await.unwrap(), Err(sqlx::Error::PoolTimedOut)));

    // The undo: the role's limit reset, the pool grows again.
    psql("ALTER ROLE full_role CONNECTION LIMIT -1");
    until(&watch, "ok once the role has slots again", |h| h.status == HealthStatus::Ok).await;
    drop(held);
    watch.shutdown().await;
}
