//! Replays incident 1 (leaked listener slots) at an accelerated pace and shows poolwatch's
//! ledger: the pool's count of used connections climbs while the server's real count stays
//! flat; `poolwatch_client_gap` (the pool's sockets, every sample) and
//! `poolwatch_phantom_connections` (the server census) measure the gap.
//!
//! Run: `cargo run --example incident_replay` (starts a throwaway PostgreSQL cluster when
//! `DATABASE_URL` is unset). Options: `--seconds N` (default 45), `--metrics-addr ADDR`
//! (default 127.0.0.1:9184), `--prometheus ADDR` (a Prometheus scraping this replay with the
//! shipped rules: its alerts join the live view and the summary; `scripts/demo` starts one),
//! `--time-scale N` (how much faster than real time those rules run, for the printout),
//! `--chart PATH` (an SVG of pool-believed vs server-real, the gap and the alert moments).
//! Exits by itself, or on Ctrl-C, with a summary.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Cause, Config, Diagnosis, HeartbeatFigures, Snapshot, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

/// How long the server lets the LISTEN session sit idle (incident: 1 h).
const IDLE_SESSION_TIMEOUT: &str = "2s";
/// The listener's reconnect delay (incident: 10 s).
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Counts {
    reconnects: AtomicU64,
    killed_idle: AtomicU64,
    app_ok: AtomicU64,
    app_failed: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse()?;
    let cluster = cluster::Cluster::for_example(); // removed at exit if throwaway
    let options = cluster.options();
    // The README's setup: a Prometheus recorder with poolwatch's histogram buckets.
    poolwatch::export::Exporter::new()
        .with_http_listener(args.metrics_addr)
        .install()
        .map_err(|e| format!("cannot serve /metrics on {} ({e}); pass --metrics-addr", args.metrics_addr))?;

    let pool =
        PgPoolOptions::new().max_connections(10).acquire_timeout(Duration::from_secs(2)).connect_with(options).await?;
    let watch = instrument_pool(
        &pool,
        Config::new("demo")
            .sample_interval(Duration::from_millis(500))
            .census_interval(Duration::from_secs(1))
            .heartbeat_interval(Duration::from_secs(1))
            .heartbeat_timeout(Duration::from_millis(800)),
    )?;
    println!("poolwatch is watching pool \"demo\" (max 10); metrics at http://{}/metrics", args.metrics_addr);
    println!(
        "replaying incident 1: a listener takes a pool connection and leaks it; the server ends the idle \
         LISTEN session after {IDLE_SESSION_TIMEOUT} (57P05); the listener reconnects and leaks another slot.\n"
    );

    let counts = Arc::new(Counts::default());
    let listener = tokio::spawn(leaky_listener(pool.clone(), Arc::clone(&counts)));
    let app = tokio::spawn(app_traffic(pool.clone(), Arc::clone(&counts)));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut first: Option<Snapshot> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut alerts: BTreeMap<String, AlertTimes> = BTreeMap::new();
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "Ctrl-C",
            _ = tick.tick() => {
                let s = watch.snapshot();
                let t = started.elapsed();
                first.get_or_insert_with(|| s.clone());
                println!("{}", line(t, &s, &watch.heartbeat(), &counts));
                samples.push(Sample {
                    t: t.as_secs_f64(),
                    believed: f64::from(s.pool.open),
                    real: s.server.as_ref().map(|r| r.total() as f64),
                    gap: s.phantom.map(|p| p as f64),
                });
                if let Some(prometheus) = args.prometheus {
                    for (name, state) in alert_states(prometheus).await {
                        let times = alerts.entry(name.clone()).or_default();
                        let slot = if state == "firing" { &mut times.firing } else { &mut times.pending };
                        if slot.is_none() {
                            *slot = Some(t.as_secs_f64());
                            println!("t={:>3}s  ALERT {name} {state}{}", t.as_secs(), at_scale(t, args.time_scale));
                        }
                    }
                }
                if started.elapsed() >= args.duration {
                    break "time is up";
                }
                // With Prometheus, keep going: the alerts on the wedged pool still have to fire.
                if args.prometheus.is_none() && s.pool.used >= s.pool.max && counts.app_failed.load(Ordering::Relaxed) > 0 {
                    break "the pool is wedged: every slot is leaked and the app's acquires time out";
                }
            }
        }
    };
    listener.abort();
    app.abort();
    let last = watch.census_now().await.unwrap_or_else(|_| watch.snapshot());
    summary(reason, started.elapsed(), &last, &watch.heartbeat(), &counts);
    if args.prometheus.is_some() {
        alert_summary(&alerts, args.time_scale);
    }
    if let Some(path) = &args.chart {
        let svg = chart(&samples, &alerts, args.time_scale, last.pool.max);
        match std::fs::write(path, svg) {
            Ok(()) => println!("chart: {}", path.display()),
            Err(e) => println!("chart: cannot write {} ({e})", path.display()),
        }
    }
    watch.shutdown().await;
    // Every slot is leaked: pool.close() would wait forever (that is the incident), so don't.
    Ok(())
}

/// The buggy listener: its connect step takes a pool connection and never gives the slot back.
async fn leaky_listener(pool: PgPool, counts: Arc<Counts>) {
    loop {
        let Ok(mut conn) = pool.acquire().await else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        let set = sqlx::query("SELECT set_config('idle_session_timeout', $1, false)").bind(IDLE_SESSION_TIMEOUT);
        if set.execute(&mut *conn).await.is_err() || conn.execute("LISTEN jobs").await.is_err() {
            continue;
        }
        let mut raw = conn.leak(); // the bug: the pool still counts this slot as acquired
        // The listener only receives, so the server sees the session as idle and ends it.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if let Err(e) = raw.execute("SELECT 1").await {
            if Cause::of(&e) == Cause::IdleSessionTimeout {
                counts.killed_idle.fetch_add(1, Ordering::Relaxed);
            }
            counts.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// The rest of the app: a short query every 200 ms.
async fn app_traffic(pool: PgPool, counts: Arc<Counts>) {
    loop {
        let ok = match pool.acquire().await {
            Ok(mut c) => c.execute("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        let counter = if ok { &counts.app_ok } else { &counts.app_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn up(p: &poolwatch::PathFigures) -> &'static str {
    match p.up {
        Some(true) => "ok",
        Some(false) => "FAIL",
        None => "?",
    }
}

fn line(t: Duration, s: &Snapshot, hb: &HeartbeatFigures, c: &Counts) -> String {
    let real = s.server.as_ref().map_or("?".into(), |r| r.total().to_string());
    let phantom = s.phantom.map_or("?".into(), |p| p.to_string());
    let client_gap = s.client_gap.map_or("?".into(), |g| g.to_string());
    format!(
        "t={:>3}s  pool used {:>2}/{} idle {:>2} | server real {:>2} | phantom gap {:>2} | client gap {:>2} | heartbeat pool {:<4} direct {:<4} | listener reconnects {:>2} | app queries ok {:>4} failed {:>3}",
        t.as_secs(),
        s.pool.used,
        s.pool.max,
        s.pool.idle,
        real,
        phantom,
        client_gap,
        up(&hb.pool),
        up(&hb.direct),
        c.reconnects.load(Ordering::Relaxed),
        c.app_ok.load(Ordering::Relaxed),
        c.app_failed.load(Ordering::Relaxed),
    )
}

fn summary(reason: &str, t: Duration, s: &Snapshot, hb: &HeartbeatFigures, c: &Counts) {
    println!("\n--- summary ({reason}, after {}s) ---", t.as_secs());
    println!("pool believes: {} open, {} used, {} idle (max {})", s.pool.open, s.pool.used, s.pool.idle, s.pool.max);
    match &s.server {
        Some(r) => println!(
            "server really has: {} sessions of this pool ({} idle, {} active)",
            r.total(),
            r.get("idle"),
            r.get("active")
        ),
        None => println!("server really has: unknown (no successful census)"),
    }
    println!("poolwatch_phantom_connections = {} (slots the pool counts that do not exist)", s.phantom.unwrap_or(0));
    if let Some(gap) = s.client_gap {
        println!(
            "poolwatch_client_gap = {gap} (slots without an established socket, seen on every sample at no server cost)"
        );
    }
    println!(
        "listener reconnects: {} ({} ended by idle_session_timeout, SQLSTATE 57P05)",
        c.reconnects.load(Ordering::Relaxed),
        c.killed_idle.load(Ordering::Relaxed)
    );
    println!("app queries: {} ok, {} failed", c.app_ok.load(Ordering::Relaxed), c.app_failed.load(Ordering::Relaxed));
    let diagnosis = match hb.diagnosis() {
        Some(Diagnosis::PoolSide) => {
            "pool path fails, direct path fine: the POOL is exhausted or leaking, the database is healthy"
        }
        Some(Diagnosis::DatabaseOrNetwork) => "both paths fail: the database or the network",
        Some(Diagnosis::Healthy) => "both paths fine",
        _ => "not enough heartbeats yet",
    };
    println!("heartbeats: {diagnosis}");
    println!("In production the gap grows one slot per server kill; alert on its growth long before it reaches max.");
}

struct Args {
    duration: Duration,
    metrics_addr: SocketAddr,
    prometheus: Option<SocketAddr>,
    time_scale: u32,
    chart: Option<PathBuf>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            duration: Duration::from_secs(45),
            metrics_addr: "127.0.0.1:9184".parse().map_err(|_| "addr")?,
            prometheus: None,
            time_scale: 1,
            chart: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or(format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--seconds" => {
                    let n: u64 =
                        value.parse().map_err(|_| format!("--seconds: {value:?} is not a whole number of seconds"))?;
                    args.duration = Duration::from_secs(n);
                }
                "--metrics-addr" => {
                    args.metrics_addr = value
                        .parse()
                        .map_err(|_| format!("--metrics-addr: {value:?} is not HOST:PORT, e.g. 127.0.0.1:9184"))?;
                }
                "--prometheus" => {
                    args.prometheus = Some(
                        value
                            .parse()
                            .map_err(|_| format!("--prometheus: {value:?} is not HOST:PORT, e.g. 127.0.0.1:9090"))?,
                    );
                }
                "--time-scale" => {
                    args.time_scale = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(format!("--time-scale: {value:?} is not a positive whole number"))?;
                }
                "--chart" => args.chart = Some(PathBuf::from(value)),
                _ => {
                    return Err(format!(
                        "unknown option {flag}; use --seconds N, --metrics-addr HOST:PORT, --prometheus HOST:PORT, \
                         --time-scale N or --chart PATH"
                    ));
                }
            }
        }
        Ok(args)
    }
}

/// One line of the chart: its value in a sample, if known.
type Value = fn(&Sample) -> Option<f64>;

/// One second of the replay, for the chart.
struct Sample {
    t: f64,
    believed: f64,
    real: Option<f64>,
    gap: Option<f64>,
}

/// When an alert was first seen pending and first seen firing (seconds into the replay).
#[derive(Default)]
struct AlertTimes {
    pending: Option<f64>,
    firing: Option<f64>,
}

/// `(alertname, state)` of every active alert of the Prometheus at `addr` (empty when it does
/// not answer).
async fn alert_states(addr: SocketAddr) -> Vec<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /api/v1/alerts HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    };
    let Ok(Some(body)) = tokio::time::timeout(Duration::from_millis(500), body).await else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut states: Vec<(String, String)> = json["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["labels"]["alertname"].as_str()?.to_owned(), a["state"].as_str()?.to_owned())))
        .collect();
    // Pending before firing, so a first sighting already firing still shows both steps in order.
    states.sort_by_key(|(_, state)| state == "firing");
    states
}

/// ` (≈ 2.5 h at incident pace)` for a replay time `t` at `scale`; nothing at scale 1.
fn at_scale(t: Duration, scale: u32) -> String {
    if scale <= 1 {
        return String::new();
    }
    let real = t.as_secs_f64() * f64::from(scale);
    if real >= 3600.0 {
        format!(" (≈ {:.1} h at the rules' real pace)", real / 3600.0)
    } else {
        format!(" (≈ {:.0} min at the rules' real pace)", real / 60.0)
    }
}

fn alert_summary(alerts: &BTreeMap<String, AlertTimes>, scale: u32) {
    let mut fired: Vec<(&String, f64)> = alerts.iter().filter_map(|(n, t)| Some((n, t.firing?))).collect();
    fired.sort_by(|a, b| a.1.total_cmp(&b.1));
    if fired.is_empty() {
        println!("alerts fired: none");
    }
    for (name, t) in fired {
        let pending = alerts[name].pending.map_or(String::new(), |p| format!(", pending from t={p:.0}s"));
        println!("alert fired: {name} at t={t:.0}s{}{pending}", at_scale(Duration::from_secs_f64(t), scale));
    }
    for (name, t) in alerts.iter().filter(|(_, t)| t.firing.is_none()) {
        println!("alert pending, not fired: {name} (from t={:.0}s)", t.pending.unwrap_or(0.0));
    }
}

/// An SVG line chart: what the pool believes is open, what the server really has, the gap,
/// and a marker where each alert started firing.
fn chart(samples: &[Sample], alerts: &BTreeMap<String, AlertTimes>, scale: u32, max: u32) -> String {
    let (w, h, left, right, top, bottom) = (1080.0, 480.0, 60.0, 330.0, 40.0, 50.0);
    let t_end = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let y_max = f64::from(max.max(1)) + 1.0;
    let x = |t: f64| left + (t / t_end) * (w - left - right);
    let y = |v: f64| h - bottom - (v / y_max) * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">poolwatch demo: incident 1 replayed (pool \"demo\", max {max})</text>\n"
    );
    for i in 0..=max {
        let yy = y(f64::from(i));
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{i}</text>\n",
            w - right,
            left - 6.0,
            yy + 4.0
        );
    }
    let step = if t_end > 120.0 { 30.0 } else { 10.0 };
    let mut t = 0.0;
    while t <= t_end {
        svg +=
            &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0}s</text>\n", x(t), h - bottom + 18.0);
        t += step;
    }
    let scale_note = if scale > 1 { format!(" (rules at {scale}x real time)") } else { String::new() };
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds into the replay{scale_note}</text>\n",
        x(t_end / 2.0),
        h - 12.0
    );
    let series: [(&str, &str, Value); 3] = [
        ("pool believes open", "#1f77b4", |s| Some(s.believed)),
        ("server really has", "#2ca02c", |s| s.real),
        ("gap (phantom)", "#d62728", |s| s.gap),
    ];
    for (i, (name, color, value)) in series.iter().enumerate() {
        let points: Vec<String> =
            samples.iter().filter_map(|s| Some(format!("{:.1},{:.1}", x(s.t), y(value(s)?)))).collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\" points=\"{}\"/>\n",
            points.join(" ")
        );
        let ly = top + 10.0 + 20.0 * i as f64;
        svg += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0
        );
    }
    let mut fired: Vec<(&String, f64)> = alerts.iter().filter_map(|(n, t)| Some((n, t.firing?))).collect();
    fired.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (i, (name, t)) in fired.iter().enumerate() {
        let xx = x(*t);
        let ly = top + 80.0 + 18.0 * i as f64;
        svg += &format!(
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#ff7f0e\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{xx:.1}\" y=\"{:.1}\" fill=\"#ff7f0e\" text-anchor=\"middle\">{}</text>\
             <text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"#ff7f0e\">{} {name} fires at {t:.0}s</text>\n",
            h - bottom,
            top - 4.0,
            i + 1,
            w - right + 15.0,
            i + 1
        );
    }
    svg += "</svg>\n";
    svg
}
