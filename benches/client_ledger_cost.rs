//! What the client-side ledger costs per sample, with 1,000 other TCP sockets on the host
//! (500 loopback connections, both ends held by this process: the worst case for the
//! `/proc/self/fd` lookup too), and how long it stalls a runtime worker, side by side with the
//! whole-table read of `/proc/self/net/tcp` the socket census used before.
//!
//! `cargo bench --bench client_ledger_cost`. The stall is measured on a current-thread
//! runtime: a task that only yields records the longest gap between two of its turns while
//! the watch samples; any blocking work on the worker shows up as that gap. Under
//! `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poolwatch::{Config, instrument_pool};
use sqlx::postgres::PgPoolOptions;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (others, samples) = if full { (500, 2000) } else { (10, 20) };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(run(others, samples));
}

async fn run(pairs: usize, samples: usize) {
    let cluster = cluster::Cluster::start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut held = Vec::new();
    for _ in 0..pairs {
        let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        held.push((c, listener.accept().unwrap().0));
    }
    let pool =
        PgPoolOptions::new().max_connections(10).min_connections(10).connect_with(cluster.options()).await.unwrap();
    let config = Config::new("bench").sample_interval(Duration::from_secs(3600)).census_interval(Duration::from_secs(3600));
    let watch = instrument_pool(&pool, config).unwrap();
    let s = watch.census_now().await.unwrap();
    let sockets = s.sockets.as_ref().expect("the ledger reads sockets");
    assert_eq!(sockets.get("established"), 10, "only the pool's sockets: {sockets:?}");
    assert_eq!(s.client_gap, Some(0));
    let host_sockets = std::fs::read_to_string("/proc/net/tcp").map(|t| t.lines().count() - 1).unwrap_or(0)
        + std::fs::read_to_string("/proc/net/tcp6").map(|t| t.lines().count() - 1).unwrap_or(0);
    println!(
        "client-side ledger, one sample ({samples} samples; pool of 10; {} other sockets held here; {host_sockets} TCP sockets on the host; source {:?}):",
        2 * pairs,
        sockets.source
    );
    println!("  load: {}", load());

    // The raw read, on this thread: what a blocking thread spends per sample.
    let peers = [std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port()))];
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let c = poolwatch::process_sockets(&peers).unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(c.get("established") >= 10);
    }
    report("  netlink read, cold (new netlink socket, /proc/self/fd scanned):", &mut ms);

    let stall = Stall::start();
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let s = watch.sample_now().await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(s.client_gap, Some(0));
    }
    let (longest, turns) = stall.stop().await;
    report("  sample_now() (pool counters + the ledger on the blocking pool, steady):", &mut ms);
    println!("    longest runtime-worker stall while sampling: {longest:.3} ms ({turns} turns of the yielding task)");

    let stall = Stall::start();
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        // The old socket census: the whole table, read inline on the worker.
        let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        std::hint::black_box(text.len());
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::task::yield_now().await;
    }
    let (longest, turns) = stall.stop().await;
    report("  before: read /proc/self/net/tcp inline (the old socket census's read):", &mut ms);
    println!("    longest runtime-worker stall: {longest:.3} ms ({turns} turns)");
    println!("  load: {}", load());
    watch.shutdown().await;
    drop(held);
}

/// A task that only yields, recording the longest gap between two of its turns.
struct Stall {
    stop: Arc<AtomicBool>,
    longest_ns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Stall {
    fn start() -> Stall {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_ns = Arc::new(AtomicU64::new(0));
        let (s, l) = (Arc::clone(&stop), Arc::clone(&longest_ns));
        let task = tokio::spawn(async move {
            let mut turns = 0;
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
                let now = Instant::now();
                l.fetch_max((now - last).as_nanos() as u64, Ordering::Relaxed);
                last = now;
                turns += 1;
            }
            turns
        });
        Stall { stop, longest_ns, task }
    }

    async fn stop(self) -> (f64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let turns = self.task.await.unwrap();
        (self.longest_ns.load(Ordering::Relaxed) as f64 / 1e6, turns)
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| format!("load average {}", l.split_whitespace().take(3).collect::<Vec<_>>().join(", ")))
        .unwrap_or_default()
}

fn report(what: &str, ms: &mut [f64]) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
}
