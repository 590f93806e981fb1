//! What the client-side ledger costs per sample, with 1,000 other TCP sockets on the host
//! (500 loopback connections, both ends held by this process: the worst case for the
//! `/proc/self/fd` lookup too), and how long it stalls a runtime worker, side by side with the
//! whole-table read of `/proc/self/net/tcp` the socket census used before.
//!
//! `cargo bench --bench client_ledger_cost`. CPU time is this thread's
//! (`/proc/thread-self/schedstat`), so the figures hold on a loaded machine where wall times do
//! not. The worker stall is the longest single poll of `sample_now()` on a current-thread
//! runtime: the time the worker could run nothing else. Under `cargo test` it runs a quick
//! smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use poolwatch::sqlx;
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
    let config =
        Config::new("bench").sample_interval(Duration::from_secs(3600)).census_interval(Duration::from_secs(3600));
    let watch = instrument_pool(&pool, config).unwrap();
    watch.census_now().await.unwrap();
    let mut s = watch.sample_now().await;
    for _ in 0..200 {
        // The start-up lint's short-lived connection pauses the ledger for a moment.
        if s.sockets.is_some() && s.client_gap == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = watch.sample_now().await;
    }
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

    // The raw reads, on this thread: wall time and this thread's CPU time.
    let peers = [std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port()))];
    let cold = measure(samples, || {
        let c = poolwatch::process_sockets(&peers).unwrap();
        assert!(c.get("established") >= 10);
    });
    cold.report("  cold read (new netlink socket, /proc/self/fd scanned):");
    let mut reader = poolwatch::SocketReader::new();
    let dump = measure(samples, || {
        let c = reader.read(&peers).unwrap();
        assert!(c.get("established") >= 10);
    });
    dump.report("  full read (one filtered netlink dump: the kernel walks its TCP hash table):");
    let steady = measure(samples, || {
        let c = reader.read_with_hint(&peers, 10).unwrap();
        assert!(c.get("established") >= 10);
    });
    steady.report("  steady read (the known sockets looked up by address pair), what a steady sample costs:");
    let old = measure(samples, || {
        let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        std::hint::black_box(text.len());
    });
    old.report("  before: one read of /proc/self/net/tcp (the old socket census's read):");

    // The worker's share of a sample: the time spent inside polls of sample_now() on the
    // (single) runtime worker. The socket read itself is on the blocking pool.
    let mut polls = Vec::with_capacity(samples);
    let mut walls = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let timed = Timed::new(watch.sample_now());
        let (s, longest) = timed.await;
        walls.push(t.elapsed().as_secs_f64() * 1e3);
        polls.push(longest.as_secs_f64() * 1e3);
        assert_eq!(s.client_gap, Some(0));
    }
    report("  sample_now() wall (pool counters + the ledger on the blocking pool):", &mut walls);
    report("    longest poll on the runtime worker per sample (the worker stall):", &mut polls);
    let mut inline = Vec::with_capacity(samples);
    for _ in 0..samples.min(200) {
        let (_, longest) = Timed::new(async {
            // The old socket census: the whole table, read inside the async census.
            let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
            std::hint::black_box(text.len());
        })
        .await;
        inline.push(longest.as_secs_f64() * 1e3);
    }
    report("    before: the worker stall of the inline /proc/self/net/tcp read:", &mut inline);
    println!(
        "  ratio: steady read {:.3} ms CPU, full dump {:.3} ms CPU, /proc/self/net/tcp {:.3} ms CPU ({:.0}x less)",
        steady.cpu_mean(),
        dump.cpu_mean(),
        old.cpu_mean(),
        old.cpu_mean() / steady.cpu_mean().max(1e-6)
    );
    println!("  load: {}", load());
    watch.shutdown().await;
    drop(held);
}

/// Wall and this thread's CPU time of `n` runs of `f`.
struct Measured {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

fn measure(n: usize, mut f: impl FnMut()) -> Measured {
    let mut m = Measured { wall: Vec::with_capacity(n), cpu: Vec::with_capacity(n) };
    for _ in 0..n {
        let (c, t) = (thread_cpu_ns(), Instant::now());
        f();
        m.wall.push(t.elapsed().as_secs_f64() * 1e3);
        m.cpu.push((thread_cpu_ns() - c) as f64 / 1e6);
    }
    m
}

impl Measured {
    fn cpu_mean(&self) -> f64 {
        self.cpu.iter().sum::<f64>() / self.cpu.len() as f64
    }

    fn report(&self, what: &str) {
        println!("{what}");
        report("    wall:", &mut self.wall.clone());
        report("    CPU (this thread, /proc/thread-self/schedstat, includes that read):", &mut self.cpu.clone());
    }
}

/// This thread's time on CPU, in ns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// A future that records the longest single poll of the future it wraps.
struct Timed<F: std::future::Future> {
    inner: std::pin::Pin<Box<F>>,
    longest: Duration,
}

impl<F: std::future::Future> Timed<F> {
    fn new(inner: F) -> Self {
        Timed { inner: Box::pin(inner), longest: Duration::ZERO }
    }
}

impl<F: std::future::Future> std::future::Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let t = Instant::now();
        let r = self.inner.as_mut().poll(cx);
        let took = t.elapsed();
        self.longest = self.longest.max(took);
        match r {
            std::task::Poll::Ready(v) => std::task::Poll::Ready((v, self.longest)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
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
