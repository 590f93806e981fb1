//! The socket census beside a big app: its system calls never run on a runtime worker.
//!
//! A current-thread runtime is the worst case: the app, the watch and every census share one
//! thread, so a census's blocking read (netlink, `/proc/self/fd` with thousands of entries)
//! would stall every task of the app for its whole length. Each read emits a trace event where
//! it runs; a subscriber set on the runtime's thread only sees the reads made on it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use support::Cluster;

/// Open sockets of the app beside the pool (each with its accepted end: twice as many
/// descriptors).
const APP_SOCKETS: usize = 1_000;
const CENSUSES: usize = 40;

/// Counts the socket reads made on the thread its subscriber is the default of.
struct ReadsHere(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> Layer<S> for ReadsHere {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "poolwatch::sockets" {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn censuses_never_stall_a_current_thread_runtime() {
    let reads_here = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(ReadsHere(Arc::clone(&reads_here)));
    let _on_this_thread = tracing::subscriber::set_default(subscriber);
    // A read made on this thread is seen (so the check at the end can fail); from then on
    // tracing asks this subscriber about the reads' event wherever it is emitted.
    poolwatch::process_sockets(&["127.0.0.1:9".parse().unwrap()]).unwrap();
    assert_eq!(reads_here.swap(0, Ordering::Relaxed), 1, "a read on this thread is counted");
    let cluster = Cluster::start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let held: Vec<_> = (0..APP_SOCKETS)
        .map(|_| {
            let client = std::net::TcpStream::connect(address).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    // A plain thread ticking beside: how long the machine itself keeps a thread waiting.
    let control_stop = Arc::new(AtomicBool::new(false));
    let control = std::thread::spawn({
        let stop = Arc::clone(&control_stop);
        move || {
            let (mut last, mut worst) = (Instant::now(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                let now = Instant::now();
                worst = worst.max(now.duration_since(last));
                last = now;
            }
            worst
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (worst, censuses) = runtime.block_on(async {
        let pool =
            PgPoolOptions::new().max_connections(3).min_connections(3).connect_with(cluster.options()).await.unwrap();
        let config = Config::new("current-thread").census_interval(Duration::from_secs(3600));
        let watch = instrument_pool(&pool, config).unwrap();
        watch.census_now().await.unwrap();
        // The app: a task that wants to run every millisecond, and notes its longest wait.
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let ticker = tokio::spawn({
            let (stop, worst_us) = (Arc::clone(&stop), Arc::clone(&worst_us));
            async move {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let now = Instant::now();
                    let gap = u64::try_from(now.duration_since(last).as_micros()).unwrap_or(u64::MAX);
                    worst_us.fetch_max(gap, Ordering::Relaxed);
                    last = now;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        for _ in 0..CENSUSES {
            let s = watch.census_now().await.unwrap();
            assert_eq!(s.server.map(|c| c.total()), Some(3), "the census still counts the pool");
        }
        let censuses = started.elapsed() / CENSUSES as u32;
        stop.store(true, Ordering::Relaxed);
        ticker.await.unwrap();
        watch.shutdown().await;
        pool.close().await;
        (Duration::from_micros(worst_us.load(Ordering::Relaxed)), censuses)
    });
    control_stop.store(true, Ordering::Relaxed);
    let machine = control.join().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "longest poll gap of a 1 ms app task over {CENSUSES} censuses beside {APP_SOCKETS} sockets: {:.1} ms \
         (a plain thread's longest: {:.1} ms; a census took {:.1} ms; load {})",
        worst.as_secs_f64() * 1e3,
        machine.as_secs_f64() * 1e3,
        censuses.as_secs_f64() * 1e3,
        load.split_whitespace().next().unwrap_or("?")
    );
    // No read ran on the runtime's thread: each ran on Tokio's blocking pool.
    assert_eq!(reads_here.load(Ordering::Relaxed), 0, "socket reads ran on the runtime's thread");
    drop(held);
}
