//! Progress reporting on a real server (incident 3): the counter exists at 0 as soon as the
//! handle exists, stays flat while a connection is held and no work is reported, and moves
//! with `tick`/`add` from any clone.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, Progress, instrument_pool};
use support::{Cluster, POOL, eventually, metric, recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_flat_while_a_connection_is_held_and_moves_with_ticks() {
    recorder();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 4).await;
    let config = Config::new("worker").sample_interval(Duration::from_millis(50));
    let watch = instrument_pool(&pool, config).unwrap();
    let labels = [(POOL, "worker")];

    let progress = watch.progress();
    assert_eq!(metric("poolwatch_progress_total", &labels), Some(0.0), "registered at 0 before any work");

    // The wedged worker of incident 3: a connection checked out, no work reported.
    let mut held = pool.acquire().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *held).await.unwrap();
    let used = [(POOL, "worker"), ("db_client_connection_state", "used")];
    eventually(Duration::from_secs(5), "the pool gauge shows the held connection", async || {
        metric("db_client_connection_count", &used).filter(|v| *v >= 1.0)
    })
    .await;
    // Only the app's ticks move the counter (no background task does): no wait needed.
    assert_eq!(metric("poolwatch_progress_total", &labels), Some(0.0), "nothing reported, nothing counted");

    // Work resumes: ticks from the handle and from a clone on another task both count.
    progress.tick();
    let clone = progress.clone();
    tokio::spawn(async move { clone.add(10) }).await.unwrap();
    assert_eq!(metric("poolwatch_progress_total", &labels), Some(11.0));
    // A second handle for the same pool adds to the same series; another pool has its own.
    Progress::new("worker").tick();
    Progress::new("other").add(5);
    assert_eq!(metric("poolwatch_progress_total", &labels), Some(12.0));
    assert_eq!(metric("poolwatch_progress_total", &[(POOL, "other")]), Some(5.0));

    drop(held);
    watch.shutdown().await;
    pool.close().await;
    cluster.stop();
}
