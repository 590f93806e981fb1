//! What one Prometheus scrape costs the app: rendering `/metrics` for 50 watched pools, each
//! with a watched listener, on the recorder of the README's setup
//! (`poolwatch::export::prometheus_builder()`).
//!
//! `cargo bench --bench render_cost --features prometheus` prints milliseconds per render
//! (mean, p50, p99), bytes and series, first for 50 pools at `Detail::Standard`, then with 50
//! more pools at `Detail::Full` beside them (100 pools), against the same recorder holding
//! nothing but one bare counter. Under `cargo test` it runs a quick smoke pass with 5 pools.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, Detail, ListenerConfig, PoolWatch, WatchedListener, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (pools, rounds) = if full { (50, 300) } else { (5, 10) };
    let handle = poolwatch::export::prometheus_builder().install_recorder().expect("install the recorder");
    metrics::counter!("bare_app_requests_total").increment(1);
    let bare = measure(&handle, rounds);

    let cluster = cluster::Cluster::start_with(&[("max_connections", "400")]);
    let mut held = Vec::new();
    for (detail, offset) in [(Detail::Standard, 0), (Detail::Full, pools)] {
        for i in offset..offset + pools {
            held.push(watched(&cluster, &format!("pool-{i:03}"), detail).await);
        }
        // Every pool has published its census, heartbeats and reachability before timing.
        let deadline = Instant::now() + Duration::from_secs(120);
        while held.iter().any(|(_, w, _)| w.heartbeat().direct.successes == 0 || !w.snapshot().census_up) {
            assert!(Instant::now() < deadline, "pools did not settle");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = measure(&handle, rounds);
        println!(
            "{:3} pools + listeners (+{pools} {detail:?}): render on-CPU {:.2} ms; wall mean {:.2} ms, p50 {:.2} ms, \
             p99 {:.2} ms; {} series, {} KB | bare recorder: {:.3} ms, ratio {:.0}x",
            held.len(),
            r.cpu,
            r.mean,
            r.p50,
            r.p99,
            r.series,
            r.bytes / 1024,
            bare.mean,
            r.mean / bare.mean.max(1e-6),
        );
    }
    for (pool, watch, listener) in held {
        drop(listener);
        watch.shutdown().await;
        pool.close().await;
    }
}

async fn watched(cluster: &cluster::Cluster, name: &str, detail: Detail) -> (PgPool, PoolWatch, WatchedListener) {
    let pool =
        PgPoolOptions::new().max_connections(2).min_connections(0).connect_with(cluster.options()).await.unwrap();
    let config = Config::new(name)
        // The first census and heartbeats run at once; then the pools stay quiet while the
        // renders are timed, so the figures are the render's, not the census's.
        .census_interval(Duration::from_secs(120))
        .heartbeat_interval(Duration::from_secs(120))
        .detail(detail);
    let watch = instrument_pool(&pool, config).unwrap();
    let mut listener = WatchedListener::connect(cluster.options(), ListenerConfig::new(name, "jobs")).await.unwrap();
    listener.listen("jobs").await.unwrap();
    sqlx::query("SELECT 1").execute(&watch.pool()).await.unwrap();
    (pool, watch, listener)
}

struct Figures {
    /// On-CPU time per render (Linux: this thread's schedstat), unaffected by other processes.
    cpu: f64,
    mean: f64,
    p50: f64,
    p99: f64,
    bytes: usize,
    series: usize,
}

fn measure(handle: &metrics_exporter_prometheus::PrometheusHandle, rounds: usize) -> Figures {
    let mut ms = Vec::with_capacity(rounds);
    let mut text = String::new();
    let cpu_before = thread_cpu_ns();
    for _ in 0..rounds {
        let t = Instant::now();
        text = handle.render();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu = (thread_cpu_ns() - cpu_before) as f64 / 1e6 / rounds as f64;
    ms.sort_by(f64::total_cmp);
    Figures {
        cpu,
        mean: ms.iter().sum::<f64>() / rounds as f64,
        p50: ms[rounds / 2],
        p99: ms[(rounds * 99 / 100).min(rounds - 1)],
        bytes: text.len(),
        series: text.lines().filter(|l| !l.starts_with('#')).count(),
    }
}

/// Nanoseconds this thread has run on a CPU (Linux `/proc/thread-self/schedstat`), 0 elsewhere.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}
