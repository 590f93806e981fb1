//! Re-tagging the connections a pool opened before `instrument_pool` is bounded as a whole:
//! against a hung server (every backend of the pool stopped with SIGSTOP) the re-tags run
//! together under one `census_timeout`, not one after another (up to `census_timeout` each),
//! and the first census follows.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use support::{Cluster, recorder};

/// Stopped backends, resumed on drop (also when the test fails).
struct Stopped(Vec<i32>);

impl Stopped {
    fn signal(pids: &[i32], sig: &str) {
        for pid in pids {
            let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} {pid}");
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        Stopped::signal(&self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retagging_against_a_hung_server_takes_one_timeout_not_one_per_connection() {
    recorder();
    let cluster = Cluster::start();
    let n = 8;
    let pool = support::pool(&cluster, n).await;
    let mut held = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..n {
        let mut conn = pool.acquire().await.unwrap();
        pids.push(sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap());
        held.push(conn);
    }
    drop(held);
    // sqlx gives connections back on a task of its own.
    while pool.num_idle() < n as usize {
        tokio::task::yield_now().await;
    }
    Stopped::signal(&pids, "-STOP");
    let _resume = Stopped(pids);

    let timeout = Duration::from_secs(2);
    let watch = instrument_pool(&pool, Config::new("hung_retag").census_timeout(timeout)).unwrap();
    let started = Instant::now();
    // The census waits for the re-tag; its own connection is not the pool's (not stopped).
    let s = watch.census_now().await.unwrap();
    let took = started.elapsed();
    println!("re-tag of {n} connections against a hung server, then a census: {took:?}; {s:?}");
    // One after another, each hung re-tag waits its whole timeout: at least n * timeout (16 s) by
    // construction. Together they take one timeout and a census; the bound only tells the two
    // apart (12 s of slack for a loaded machine), it measures no speed.
    assert!(took < timeout * (n - 1), "{took:?}");
}
