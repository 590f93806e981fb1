//! Every pool behind a pooler attributed exactly, from its first connection: two busy pools of
//! one process on one real PgBouncer (one with `min_connections`, both opened before
//! `instrument_pool`), poolwatch at its default `Config` plus the README's pooler declarations
//! (`pooler_admin`, `direct_connect_options`), in transaction and in session mode.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch, Snapshot, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Row};
use support::pgbouncer::PgBouncer;
use support::{Cluster, POOL, eventually, metric, recorder};

/// A query every ~20 ms on `pool` until `stop`; owned by the test (joined at the end).
fn busy(pool: &PgPool, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let (pool, stop) = (pool.clone(), Arc::clone(stop));
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            // Simple protocol: transaction mode may hand each message to another server.
            let _ = sqlx::raw_sql("SELECT 1").execute(&pool).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// PgBouncer's `SHOW CLIENTS` (application_name, port), for failure messages.
async fn clients(bouncer: &PgBouncer) -> Vec<(String, String)> {
    let Ok(mut c) = PgConnection::connect_with(&bouncer.admin_options()).await else { return Vec::new() };
    let rows = sqlx::raw_sql("SHOW CLIENTS").fetch_all(&mut c).await.unwrap_or_default();
    let text = |r: &sqlx::postgres::PgRow, col: &str| r.try_get_unchecked::<Option<String>, _>(col).ok().flatten();
    rows.iter()
        .map(|r| (text(r, "application_name").unwrap_or_default(), text(r, "port").unwrap_or_default()))
        .collect()
}

/// The census and a sample now on both watches: (phantom, client gap) of each.
async fn readings(a: &PoolWatch, b: &PoolWatch) -> [(Option<i64>, Option<i64>); 2] {
    let pair = |s: Option<Snapshot>| s.map_or((None, None), |s| (s.phantom, s.client_gap));
    [pair(a.census_now().await.ok()), pair(b.census_now().await.ok())]
}

/// Waits until `want` is read `times` censuses in a row on both pools.
async fn steady(a: &PoolWatch, b: &PoolWatch, want: [(i64, i64); 2], what: &str, bouncer: &PgBouncer) {
    let want = want.map(|(p, g)| (Some(p), Some(g)));
    let mut in_a_row = 0;
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while in_a_row < 5 {
        let r = readings(a, b).await;
        in_a_row = if r == want { in_a_row + 1 } else { 0 };
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: (phantom, client gap) of both pools read {r:?}, want {want:?}; SHOW CLIENTS {:?}", {
                clients(bouncer).await
            });
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{what}: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_busy_pools_on_one_pgbouncer_read_zero_and_exact_with_a_leak() {
    recorder();
    let cluster = Cluster::start();
    for mode in ["transaction", "session"] {
        let bouncer = PgBouncer::start(cluster.port(), &[("pool_mode", mode), ("client_idle_timeout", "2")]);
        // Both opened before instrument_pool, as an app does: a first connection each, and
        // min_connections fills in the background.
        let a =
            PgPoolOptions::new().max_connections(3).min_connections(2).connect_with(bouncer.options()).await.unwrap();
        let b = PgPoolOptions::new().max_connections(3).connect_with(bouncer.options()).await.unwrap();
        let declared = |name: &str| bouncer.declared(Config::new(name), &cluster);
        let (na, nb) = (format!("pgb_two_a_{mode}"), format!("pgb_two_b_{mode}"));
        let wa = instrument_pool(&a, declared(&na)).unwrap();
        let wb = instrument_pool(&b, declared(&nb)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = [busy(&a, &stop), busy(&b, &stop)];

        steady(&wa, &wb, [(0, 0), (0, 0)], &format!("{mode}: healthy"), &bouncer).await;
        eventually(Duration::from_secs(30), "the exported gauges read 0", async || {
            let all = [&na, &nb].iter().all(|n| {
                metric("poolwatch_phantom_connections", &[(POOL, n)]) == Some(0.0)
                    && metric("poolwatch_client_gap", &[(POOL, n)]) == Some(0.0)
            });
            all.then_some(())
        })
        .await;

        // A leaked slot on pool a: its raw connection closed, the pool still counts it.
        let raw = a.acquire().await.unwrap().leak();
        raw.close().await.unwrap();
        steady(&wa, &wb, [(1, 1), (0, 0)], &format!("{mode}: one leaked slot"), &bouncer).await;

        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        wa.shutdown().await;
        wb.shutdown().await;
        b.close().await;
        // Pool a's close would wait for the leaked slot forever.
        drop(a);
    }
}
