//! Heartbeats on two paths against a real server: a healthy pool, an exhausted pool
//! (incident 4's "pool or database?"), and a stopped server that comes back.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Cause, Config, Diagnosis, PoolWatch, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::spans::spans_named;
use support::{Cluster, POOL, eventually, metric, recorder};

fn config(name: &str) -> Config {
    Config::new(name)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(500))
        .heartbeat_max_backoff(Duration::from_millis(400))
}

fn up(name: &str, path: &str) -> Option<f64> {
    metric("poolwatch_heartbeat_up", &[(POOL, name), ("path", path)])
}

/// Sum of `poolwatch_heartbeat_failures_total` over causes for one pool and path, and the
/// causes seen.
fn failures(name: &str, path: &str) -> (f64, Vec<String>) {
    let text = recorder().render();
    let mut total = 0.0;
    let mut causes = Vec::new();
    for (labels, value) in
        support::series_values(&text, "poolwatch_heartbeat_failures_total", &[(POOL, name), ("path", path)])
    {
        total += value;
        // A series at 0 (registered from the start for an alert) is no failure.
        if value == 0.0 {
            continue;
        }
        if let Some(cause) = labels.split("cause=\"").nth(1).and_then(|r| r.split('"').next()) {
            causes.push(cause.to_owned());
        }
    }
    (total, causes)
}

fn beats(name: &str, path: &str) -> f64 {
    metric("poolwatch_heartbeat_duration_seconds_count", &[(POOL, name), ("path", path)]).unwrap_or(0.0)
}

async fn pool(cluster: &Cluster, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(cluster.options())
        .await
        .unwrap()
}

async fn both_up(watch: &PoolWatch, name: &str, within: Duration) {
    eventually(within, "both heartbeat paths up", async || {
        let h = watch.heartbeat();
        (h.pool.up == Some(true)
            && h.direct.up == Some(true)
            && up(name, "pool") == Some(1.0)
            && up(name, "direct") == Some(1.0))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_pool_has_figures_on_both_paths() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = pool(&cluster, 5).await;
    // No beat may fail here, so a timeout no loaded machine reaches.
    let watch = instrument_pool(&pool, config("hb_healthy").heartbeat_timeout(Duration::from_secs(20))).unwrap();
    both_up(&watch, "hb_healthy", Duration::from_secs(20)).await;
    eventually(Duration::from_secs(20), "several heartbeats recorded on both paths", async || {
        (beats("hb_healthy", "pool") >= 3.0 && beats("hb_healthy", "direct") >= 3.0).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    for (path, f) in [("pool", h.pool), ("direct", h.direct)] {
        let took = f.last_duration.expect("a duration");
        // A beat that succeeded finished within heartbeat_timeout by definition: no bound on how fast.
        assert!(took > Duration::ZERO, "{path}: {took:?}");
        assert_eq!(f.last_cause, None, "{path}");
        assert!(f.successes >= 3, "{path}: {f:?}");
        let sum = metric("poolwatch_heartbeat_duration_seconds_sum", &[(POOL, "hb_healthy"), ("path", path)]).unwrap();
        assert!(sum > 0.0, "{path} duration sum {sum}");
        println!("healthy {path}: last {took:?}, mean {:.3} ms", sum / beats("hb_healthy", path) * 1e3);
    }
    assert_eq!(failures("hb_healthy", "pool").0, 0.0);
    assert_eq!(failures("hb_healthy", "direct").0, 0.0);
    assert_eq!(h.diagnosis(), Some(Diagnosis::Healthy));
    // The pool heartbeat returns its connection at once: nothing stays checked out.
    eventually(Duration::from_secs(5), "no slot held between heartbeats", async || {
        (pool.size() == pool.num_idle() as u32).then_some(())
    })
    .await;
    watch.shutdown().await;
}

/// Incident 4: every slot is taken. The pool path fails with `pool_timed_out` while the
/// direct path stays up, so the verdict is "pool exhausted or leaked", not "database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_fails_the_pool_path_only() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = pool(&cluster, 3).await;
    // The direct path must not fail here: a timeout a loaded machine does not reach on it.
    let watch = instrument_pool(&pool, config("hb_exhausted").heartbeat_timeout(Duration::from_secs(3))).unwrap();
    both_up(&watch, "hb_exhausted", Duration::from_secs(20)).await;

    // Two slots held by app tasks, one leaked for good (incident 1's way to lose a slot).
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(pool.acquire().await.unwrap());
    }
    let _leaked = pool.acquire().await.unwrap().leak();
    eventually(Duration::from_secs(20), "pool path down, direct path up", async || {
        let h = watch.heartbeat();
        (h.pool.up == Some(false) && h.direct.up == Some(true)).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    assert_eq!(h.pool.last_cause, Some(Cause::PoolTimedOut));
    assert_eq!(h.diagnosis(), Some(Diagnosis::PoolSide));
    assert_eq!(up("hb_exhausted", "pool"), Some(0.0));
    assert_eq!(up("hb_exhausted", "direct"), Some(1.0));
    let (n, causes) = failures("hb_exhausted", "pool");
    assert!(n >= 1.0 && causes == ["pool_timed_out"], "{n} {causes:?}");
    assert_eq!(failures("hb_exhausted", "direct").0, 0.0, "the direct path never took a pool slot");
    let took = h.pool.last_duration.unwrap();
    // It waited out heartbeat_timeout (3 s) before failing; a loaded machine only adds to that.
    assert!(took >= Duration::from_millis(2950), "failed before heartbeat_timeout: {took:?}");
    println!("exhausted: pool heartbeat failed after {took:?}, direct {:?}", h.direct.last_duration.unwrap());

    // One WARN span per failed heartbeat, with the OTel attributes and nothing sensitive.
    let spans: Vec<_> = spans_named("poolwatch.heartbeat")
        .into_iter()
        .filter(|s| s.fields.get("db.client.connection.pool.name").map(String::as_str) == Some("hb_exhausted"))
        .filter(|s| s.level == tracing::Level::WARN)
        .collect();
    assert!(!spans.is_empty(), "a WARN span per failed heartbeat");
    for s in &spans {
        assert_eq!(s.fields.get("error.type").map(String::as_str), Some("pool_timed_out"), "{s:?}");
        assert_eq!(s.fields.get("path").map(String::as_str), Some("pool"), "{s:?}");
        assert_eq!(s.fields.get("db.system.name").map(String::as_str), Some("postgresql"), "{s:?}");
    }

    // The app gives two slots back: the pool path recovers (the leaked one stays lost).
    drop(held);
    eventually(Duration::from_secs(20), "pool path up again", async || {
        (watch.heartbeat().pool.up == Some(true)).then_some(())
    })
    .await;
    assert_eq!(up("hb_exhausted", "pool"), Some(1.0));
    drop(watch);
}

/// The server stops: both paths fail (database or network), nothing panics or hangs, and
/// both recover once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_fails_both_paths_and_both_recover() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = pool(&cluster, 3).await;
    let config = config("hb_stopped")
        .heartbeat_timeout(Duration::from_millis(200))
        .heartbeat_max_backoff(Duration::from_millis(800));
    let watch = instrument_pool(&pool, config).unwrap();
    both_up(&watch, "hb_stopped", Duration::from_secs(20)).await;

    tokio::task::block_in_place(|| cluster.stop());
    eventually(Duration::from_secs(20), "both paths down", async || {
        let h = watch.heartbeat();
        (h.pool.up == Some(false) && h.direct.up == Some(false)).then_some(())
    })
    .await;
    let h = watch.heartbeat();
    assert_eq!(h.diagnosis(), Some(Diagnosis::DatabaseOrNetwork));
    assert_eq!(up("hb_stopped", "pool"), Some(0.0));
    assert_eq!(up("hb_stopped", "direct"), Some(0.0));
    let (pool_failures, pool_causes) = failures("hb_stopped", "pool");
    let (direct_failures, direct_causes) = failures("hb_stopped", "direct");
    assert!(pool_failures >= 1.0 && direct_failures >= 1.0);
    assert!(!direct_causes.iter().any(|c| c == "pool_timed_out"), "the direct path has no pool: {direct_causes:?}");
    println!("stopped: pool causes {pool_causes:?}, direct causes {direct_causes:?}");
    // Backoff: while down, the direct path reconnects less often than the pool path beats.
    // Counted over 12 failed pool beats, however long the machine takes for them: at a 100 ms
    // interval against a 400 ms backoff cap, the direct path makes at most about a third as many.
    let before = watch.heartbeat();
    let now = eventually(Duration::from_secs(60), "12 more failed pool heartbeats", async || {
        let now = watch.heartbeat();
        (now.pool.failures >= before.pool.failures + 12).then_some(now)
    })
    .await;
    let (pool_during, direct_during) =
        (now.pool.failures - before.pool.failures, now.direct.failures - before.direct.failures);
    println!("while down: {pool_during} pool heartbeats, {direct_during} direct reconnect attempts");
    assert!(direct_during < pool_during, "direct reconnects back off: {direct_during} vs {pool_during}");

    tokio::task::block_in_place(|| cluster.start_server());
    both_up(&watch, "hb_stopped", Duration::from_secs(30)).await;
    let after = watch.heartbeat();
    assert!(after.pool.successes > h.pool.successes && after.direct.successes > h.direct.successes);
    tokio::time::timeout(Duration::from_secs(10), watch.shutdown()).await.expect("shutdown is not stuck");
}

/// Closing the pool stops the heartbeat task too (no task keeps beating a closed pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_close_stops_the_heartbeats() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let pool = pool(&cluster, 2).await;
    let watch = instrument_pool(&pool, config("hb_close")).unwrap();
    both_up(&watch, "hb_close", Duration::from_secs(20)).await;
    let open = watch.heartbeat();
    tokio::time::timeout(Duration::from_secs(60), pool.close()).await.expect("pool closes");
    // A beat in flight at the close may still land: wait until the figures stop moving (unchanged
    // over 10 heartbeat intervals), then watch 20 more intervals. A running task beats every 100 ms.
    let settled = eventually(Duration::from_secs(60), "the heartbeat figures settle", async || {
        let before = watch.heartbeat();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        (watch.heartbeat() == before).then_some(before)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(watch.heartbeat(), settled, "no heartbeat after the pool closed");
    assert!(settled.pool.successes >= open.pool.successes);
    assert_eq!(settled.pool.last_cause, None, "no pool_closed failure counted");
    tokio::time::timeout(Duration::from_secs(10), watch.shutdown()).await.expect("shutdown is not stuck");
}
