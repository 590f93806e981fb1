//! Incident 3 on a real server: a connection holds session-scoped advisory locks and sits
//! idle in an open transaction; another task blocks on one of those locks; work stops. The
//! census shows the stuck transaction's age, the lock waiter and the locks held; the watched
//! pool reports the connection held too long with the place that acquired it.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Executor;
use support::{Cluster, POOL, eventually, metric, recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_transaction_lock_waiter_and_advisory_locks_are_visible() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 4).await;
    let config = Config::new("stuck")
        .sample_interval(Duration::from_millis(100))
        .census_interval(Duration::from_millis(200))
        .leak_threshold(Duration::from_millis(500));
    let watch = instrument_pool(&pool, config).unwrap();
    let db = watch.pool();
    let progress = watch.progress();

    // The shared "group" connection: two session-scoped advisory locks, then a transaction
    // left open (idle in transaction): the task that should finish it is wedged.
    let mut group = db.acquire().await.unwrap();
    group.execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2); BEGIN; SELECT 1").await.unwrap();
    progress.tick();
    // Another worker blocks on lock 1: an `active` session waiting for a lock.
    let blocked = tokio::spawn({
        let db = db.clone();
        async move {
            let mut conn = db.acquire().await.unwrap();
            conn.execute("SELECT pg_advisory_lock(1)").await.unwrap();
            conn.execute("SELECT pg_advisory_unlock_all()").await.unwrap();
        }
    });

    let s = eventually(Duration::from_secs(10), "the census sees the stuck transaction and the waiter", async || {
        let s = watch.census_now().await.ok()?;
        let server = s.server.clone()?;
        (server.lock_waiters == 1 && server.longest_in("idle_in_transaction") >= Duration::from_secs(1)).then_some(s)
    })
    .await;
    let server = s.server.unwrap();
    assert_eq!(server.get("idle_in_transaction"), 1, "{server:?}");
    assert_eq!(server.get("active"), 1, "the waiter is active, waiting: {server:?}");
    assert!(server.longest_in("active") >= Duration::from_millis(500), "{server:?}");
    assert_eq!((server.advisory_locks, server.advisory_locks_max_per_session), (2, 2), "{server:?}");

    // The same figures on /metrics, without per-session labels.
    let gauge = |name: &str| metric(name, &[(POOL, "stuck")]);
    let published = eventually(Duration::from_secs(3), "the lock figures are published", async || {
        (gauge("poolwatch_server_lock_waiters") == Some(1.0)).then_some(())
    });
    published.await;
    assert_eq!(gauge("poolwatch_server_advisory_locks"), Some(2.0));
    assert_eq!(gauge("poolwatch_server_advisory_locks_max_per_session"), Some(2.0));
    let stuck_for =
        metric("poolwatch_server_longest_in_state_seconds", &[(POOL, "stuck"), ("state", "idle_in_transaction")]);
    assert!(stuck_for.is_some_and(|v| v >= 1.0), "{stuck_for:?}");
    // Both checked-out connections are leak/stuck suspects; work has stopped.
    eventually(Duration::from_secs(3), "two leak suspects", async || {
        (gauge("poolwatch_leak_suspect_connections") == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(gauge("poolwatch_progress_total"), Some(1.0), "no progress since the wedge");
    let here = format!("{}:", file!());
    let warned = support::spans::events_at(tracing::Level::WARN)
        .into_iter()
        .any(|e| e.fields.values().any(|v| v.contains(&here)));
    assert!(warned, "a leak-suspect WARN names the acquiring line in {here}");

    // Unwedge: the transaction ends and the locks go; the waiter gets its lock and finishes.
    group.execute("COMMIT; SELECT pg_advisory_unlock_all()").await.unwrap();
    drop(group);
    tokio::time::timeout(Duration::from_secs(10), blocked).await.expect("the waiter proceeds").unwrap();
    let s = eventually(Duration::from_secs(5), "locks and waiters back to zero", async || {
        let s = watch.census_now().await.ok()?;
        let server = s.server.clone()?;
        (server.lock_waiters == 0 && server.advisory_locks == 0 && server.get("idle_in_transaction") == 0).then_some(s)
    })
    .await;
    assert_eq!(s.server.unwrap().longest_in("idle_in_transaction"), Duration::ZERO);
}
