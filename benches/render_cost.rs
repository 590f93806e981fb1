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
//!
//! Then the same exposition scraped over loopback HTTP, in the same run: the hand-written
//! listener poolwatch had before hyper (one request per connection, kept below as a baseline)
//! and today's listener (a new connection per scrape, a kept-alive one, and a kept-alive one
//! with `Accept-Encoding: gzip` as Prometheus sends), as the process's on-CPU time per scrape
//! (server and client together) and wall time.

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
    let served = ours.handle();
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
        http_scrapes(&served, rounds, held.len()).await;
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

/// Scrapes of `handle`'s exposition over loopback HTTP: the old hand-written listener against
/// today's, `rounds` each, on this runtime (server and client in this process).
async fn http_scrapes(handle: &poolwatch::export::PrometheusHandle, rounds: usize, pools: usize) {
    let bind = || async { tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind") };
    let (old, new) = (bind().await, bind().await);
    let (old_addr, new_addr) = (old.local_addr().expect("addr"), new.local_addr().expect("addr"));
    let old_task = tokio::spawn(old_listener::serve(old, handle.clone()));
    let new_task = tokio::spawn(poolwatch::internals::serve_metrics(new, handle.clone()));
    let cases = [
        ("old listener, a connection per scrape", old_addr, false, false),
        ("hyper listener, a connection per scrape", new_addr, false, false),
        ("hyper listener, kept alive", new_addr, true, false),
        ("hyper listener, kept alive, gzip", new_addr, true, true),
    ];
    for (name, addr, keep, gzip) in cases {
        let mut kept: Option<tokio::net::TcpStream> = None;
        let mut ms = Vec::with_capacity(rounds);
        let mut bytes = 0;
        let cpu_before = process_cpu_ns();
        for _ in 0..rounds {
            let t = Instant::now();
            let mut stream = match kept.take() {
                Some(s) => s,
                None => tokio::net::TcpStream::connect(addr).await.expect("connect"),
            };
            let close = if keep { "" } else { "Connection: close\r\n" };
            let encoding = if gzip { "Accept-Encoding: gzip\r\n" } else { "" };
            let request = format!("GET /metrics HTTP/1.1\r\nHost: bench\r\n{close}{encoding}\r\n");
            bytes = scrape_once(&mut stream, &request).await;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            if keep {
                kept = Some(stream);
            }
        }
        let cpu = (process_cpu_ns() - cpu_before) as f64 / 1e6 / rounds as f64;
        ms.sort_by(f64::total_cmp);
        println!(
            "{pools:3} pools, scrape over HTTP, {name:42}: on-CPU {cpu:.2} ms (process), wall p50 {:.2} ms, p99 {:.2} ms; \
             {} KB on the wire",
            ms[rounds / 2],
            ms[(rounds * 99 / 100).min(rounds - 1)],
            bytes / 1024
        );
    }
    old_task.abort();
    new_task.abort();
}

/// One `GET` and its answer (read by `Content-Length`): the body's length, asserted 200.
async fn scrape_once(stream: &mut tokio::net::TcpStream, request: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let (end, length) = loop {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the listener closed before answering");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let length = head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok());
            break (end + 4, length.expect("a Content-Length"));
        }
    };
    while buf.len() < end + length {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the listener closed mid-answer");
        buf.extend_from_slice(&chunk[..n]);
    }
    length
}

/// CPU time this process has used so far, every thread's (exited ones included: Tokio's
/// blocking threads come and go, so a sum over the live threads' schedstat can shrink), in ns.
fn process_cpu_ns() -> u64 {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which lives on this stack.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let us =
        |t: libc::timeval| u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0);
    (us(usage.ru_utime) + us(usage.ru_stime)) * 1_000
}

/// The `/metrics` listener poolwatch had before hyper, kept as the bench's baseline: one
/// request per connection, 32 connections at once, 5 s each, renders shared.
mod old_listener {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use poolwatch::export::PrometheusHandle;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Mutex, Semaphore};

    pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
        let slots = Arc::new(Semaphore::new(32));
        let renders = Arc::new(Renders { handle, latest: Mutex::new(None) });
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                let renders = Arc::clone(&renders);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &renders)).await;
                    drop(slot);
                });
            }
        }
    }

    struct Renders {
        handle: PrometheusHandle,
        latest: Mutex<Option<(Instant, Arc<str>)>>,
    }

    impl Renders {
        async fn body(&self, arrived: Instant) -> Option<Arc<str>> {
            let mut latest = self.latest.lock().await;
            if let Some((started, body)) = latest.as_ref()
                && *started >= arrived
            {
                return Some(Arc::clone(body));
            }
            let started = Instant::now();
            let handle = self.handle.clone();
            let body: Arc<str> = Arc::from(tokio::task::spawn_blocking(move || handle.render()).await.ok()?);
            *latest = Some((started, Arc::clone(&body)));
            Some(body)
        }
    }

    async fn answer(mut stream: TcpStream, renders: &Renders) {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let Some(body) = renders.body(Instant::now()).await else { return };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = async {
            stream.write_all(response.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await
        }
        .await;
    }
}
