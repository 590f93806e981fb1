//! Replays incident 1 (leaked listener slots) at an accelerated pace and shows poolwatch's
//! ledger: the pool's count of used connections climbs while the server's real count stays
//! flat; `poolwatch_client_gap` (the pool's sockets, every sample) and
//! `poolwatch_phantom_connections` (the server census) measure the gap.
//!
//! Run: `cargo run --example incident_replay` (starts a throwaway PostgreSQL cluster when
//! `DATABASE_URL` is unset). Options: `--seconds N` (default 45), `--metrics-addr ADDR`
//! (default 127.0.0.1:9184). Exits by itself, or on Ctrl-C, with a summary.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Cause, Config, Diagnosis, HeartbeatFigures, Snapshot, instrument_pool};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
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
    let _cluster; // keeps the throwaway server alive until the end
    let options: PgConnectOptions = match std::env::var("DATABASE_URL") {
        Ok(url) => url.parse()?,
        Err(_) => {
            println!("DATABASE_URL is unset: starting a throwaway PostgreSQL cluster ...");
            let c = cluster::Cluster::start();
            let o = c.options();
            _cluster = c;
            o
        }
    };
    // The README's setup: a Prometheus recorder with poolwatch's histogram buckets.
    poolwatch::export::prometheus_builder()
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
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "Ctrl-C",
            _ = tick.tick() => {
                let s = watch.snapshot();
                first.get_or_insert_with(|| s.clone());
                println!("{}", line(started.elapsed(), &s, &watch.heartbeat(), &counts));
                if started.elapsed() >= args.duration {
                    break "time is up";
                }
                if s.pool.used >= s.pool.max && counts.app_failed.load(Ordering::Relaxed) > 0 {
                    break "the pool is wedged: every slot is leaked and the app's acquires time out";
                }
            }
        }
    };
    listener.abort();
    app.abort();
    let last = watch.census_now().await.unwrap_or_else(|_| watch.snapshot());
    summary(reason, started.elapsed(), &last, &watch.heartbeat(), &counts);
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
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args =
            Args { duration: Duration::from_secs(45), metrics_addr: "127.0.0.1:9184".parse().map_err(|_| "addr")? };
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
                _ => return Err(format!("unknown option {flag}; use --seconds N or --metrics-addr HOST:PORT")),
            }
        }
        Ok(args)
    }
}
