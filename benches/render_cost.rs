//! What one Prometheus scrape costs the app: rendering `/metrics` for 50 watched pools, each
//! with a watched listener, side by side in one run on both recorders poolwatch documents:
//! `poolwatch::export::Exporter` (the README's setup) and metrics-exporter-prometheus with
//! `poolwatch::export::prometheus_builder()`'s buckets. Both are fed the same series through a
//! `metrics-util` fanout.
//!
//! `cargo bench --bench render_cost --features prometheus` prints on-CPU milliseconds per render
//! (and wall mean, p50, p99), bytes and series: first for 50 pools at `Detail::Standard`, then
//! with 50 more pools at `Detail::Full` beside them (100 pools), against a recorder holding one
//! bare counter. Under `cargo test` it runs a quick pass with 5 pools, and checks that both
//! recorders render the same series.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, Detail, ListenerConfig, PoolWatch, WatchedListener, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (pools, rounds) = if full { (50, 300) } else { (5, 10) };
    let ours = poolwatch::export::Exporter::new().build_recorder();
    let ours_handle = ours.handle();
    let mep = poolwatch::export::prometheus_builder().build_recorder();
    let mep_handle = mep.handle();
    let fanout = metrics_util::layers::FanoutBuilder::default().add_recorder(ours).add_recorder(mep).build();
    metrics::set_global_recorder(fanout).expect("install the recorders");
    let renderers: [(&str, Render); 2] = [
        ("poolwatch::export::Exporter", Box::new(move || ours_handle.render())),
        ("metrics-exporter-prometheus", Box::new(move || mep_handle.render())),
    ];
    record_cost(if full { 2_000_000 } else { 20_000 });
    registration_during_renders(if full { 10_000 } else { 3_000 });
    metrics::counter!("bare_app_requests_total").increment(1);
    let bare: Vec<Figures> = renderers.iter().map(|(_, r)| measure(r, rounds)).collect();

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
        let figures: Vec<Figures> = renderers.iter().map(|(_, r)| measure(r, rounds)).collect();
        for (((name, render), r), bare) in renderers.iter().zip(&figures).zip(&bare) {
            if let Ok(path) = std::env::var("RENDER_DUMP") {
                let file = format!("{path}.{}.{}", held.len(), name.split(':').next().unwrap_or(name));
                std::fs::write(file, render()).expect("write the rendered text");
            }
            println!(
                "{:3} pools + listeners (+{pools} {detail:?}) {name:28}: render on-CPU {:.2} ms; wall mean {:.2} ms, \
                 p50 {:.2} ms, p99 {:.2} ms; {} series, {} KB | bare: {:.3} ms",
                held.len(),
                r.cpu,
                r.mean,
                r.p50,
                r.p99,
                r.series,
                r.bytes / 1024,
                bare.mean,
            );
        }
        // The on-CPU clock ticks coarsely: a ratio only when both read more than zero.
        let cpu_ratio = if figures[0].cpu > 0.0 && figures[1].cpu > 0.0 {
            format!("{:.1}x", figures[1].cpu / figures[0].cpu)
        } else {
            "n/a (too few rounds)".to_owned()
        };
        println!(
            "{:3} pools: metrics-exporter-prometheus / poolwatch::export::Exporter: on-CPU {cpu_ratio}, wall mean {:.1}x",
            held.len(),
            figures[1].mean / figures[0].mean.max(1e-9)
        );
        // Both render the same series: same names, labels and `le` bounds.
        let [a, b] = [&renderers[0].1, &renderers[1].1].map(|r| series(&r()));
        assert_eq!(a.symmetric_difference(&b).collect::<Vec<_>>(), Vec::<&String>::new(), "the recorders differ");
        assert!(a.iter().any(|s| s.starts_with("db_client_connection_wait_time_seconds_bucket{")), "no histogram");
    }
    for (pool, watch, listener) in held {
        drop(listener);
        watch.shutdown().await;
        pool.close().await;
    }
}

type Render = Box<dyn Fn() -> String>;

/// What recording costs on each recorder (one thread, handles registered once): a histogram
/// sample and a counter increment, in ns.
fn record_cost(n: u32) {
    use metrics::Recorder as _;
    let meta = metrics::Metadata::new("bench", metrics::Level::INFO, None);
    let key = || {
        metrics::Key::from_parts(
            "db.client.connection.wait_time",
            vec![metrics::Label::new("db_client_connection_pool_name", "pool-000")],
        )
    };
    let ours = poolwatch::export::Exporter::new().build_recorder();
    let mep = poolwatch::export::prometheus_builder().build_recorder();
    let mut rows = Vec::new();
    for (name, h, c) in [
        ("poolwatch::export::Exporter", ours.register_histogram(&key(), &meta), ours.register_counter(&key(), &meta)),
        ("metrics-exporter-prometheus", mep.register_histogram(&key(), &meta), mep.register_counter(&key(), &meta)),
    ] {
        let t = Instant::now();
        for i in 0..n {
            h.record(f64::from(i % 1000) * 1e-4);
        }
        let hist = t.elapsed().as_nanos() as f64 / f64::from(n);
        let t = Instant::now();
        for _ in 0..n {
            c.increment(1);
        }
        let count = t.elapsed().as_nanos() as f64 / f64::from(n);
        rows.push((name, hist, count));
    }
    // metrics-exporter-prometheus keeps every sample until a render drains it.
    let _ = mep.handle().render();
    for (name, hist, count) in rows {
        println!("record on {name:28}: histogram sample {hist:.1} ns, counter increment {count:.1} ns ({n} each)");
    }
}

/// What a scrape does to a registration (a new pool, a new cause): the time to register a
/// series on `poolwatch::export::Exporter` holding `series` others, idle and while another
/// thread renders without pause. A render reads a snapshot, so the two stay close; a render
/// that held the lock for its whole duration made registrations wait for it.
fn registration_during_renders(series: usize) {
    use metrics::Recorder as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let meta = metrics::Metadata::new("bench", metrics::Level::INFO, None);
    let recorder = Arc::new(poolwatch::export::Exporter::new().build_recorder());
    let key = |i: usize, family: &str| {
        metrics::Key::from_parts(
            format!("bench_{family}_{}", i % 50),
            vec![metrics::Label::new("db_client_connection_pool_name", format!("pool-{i}"))],
        )
    };
    for i in 0..series {
        recorder.register_gauge(&key(i, "old"), &meta).set(1.0);
    }
    let renders = Arc::new(AtomicU32::new(0));
    // 500 registrations, and for as long as it takes the renderer (if any) to render 20 times.
    let register = |from: usize, rendering: bool| {
        let mut us = Vec::new();
        let mut i = from;
        while us.len() < 500 || (rendering && renders.load(Ordering::Relaxed) < 20) {
            let t = Instant::now();
            recorder.register_gauge(&key(i, "new"), &meta).set(1.0);
            us.push(t.elapsed().as_secs_f64() * 1e6);
            i += 1;
        }
        us.sort_by(f64::total_cmp);
        (us[us.len() / 2], us[us.len() * 99 / 100], us[us.len() - 1], us.len())
    };
    let idle = register(0, false);
    let stop = Arc::new(AtomicBool::new(false));
    let (handle, stopping, rendered) = (recorder.handle(), Arc::clone(&stop), Arc::clone(&renders));
    let renderer = std::thread::spawn(move || {
        while !stopping.load(Ordering::Relaxed) {
            std::hint::black_box(handle.render());
            rendered.fetch_add(1, Ordering::Relaxed);
        }
    });
    let busy = register(1_000_000, true);
    stop.store(true, Ordering::Relaxed);
    let _ = renderer.join();
    let renders = renders.load(Ordering::Relaxed);
    println!(
        "register a series beside {series} on poolwatch::export::Exporter: idle p50 {:.1} us, p99 {:.1} us, max {:.1} us; \
         {} during {renders} back-to-back renders: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        idle.0, idle.1, idle.2, busy.3, busy.0, busy.1, busy.2
    );
}

/// Each sample's identity (`name{labels}`), labels sorted.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let id = &l[..l.rfind(' ').unwrap_or(l.len())];
            match id.split_once('{') {
                Some((name, labels)) => {
                    let mut parts: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    parts.sort_unstable();
                    format!("{name}{{{}}}", parts.join(","))
                }
                None => id.to_owned(),
            }
        })
        .collect()
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

fn measure(render: &dyn Fn() -> String, rounds: usize) -> Figures {
    let mut ms = Vec::with_capacity(rounds);
    let mut text = String::new();
    let cpu_before = thread_cpu_ns();
    for _ in 0..rounds {
        let t = Instant::now();
        text = render();
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
