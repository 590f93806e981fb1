//! How long a listener takes to come back after the server ends its session: poolwatch's
//! `WatchedListener` against sqlx's own `PgListener`, side by side in one run.
//!
//! One cycle: `pg_terminate_backend` of the listener's session, then `try_recv` until the
//! listener reports the reconnect (`Ok(None)`, LISTEN re-established). The two listeners take
//! turns, so both see the same machine load. `cargo bench --bench listener_reconnect` runs
//! 2,000 cycles each and prints the time per cycle, the ratio and the process RSS growth per
//! phase; under `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{ListenerConfig, WatchedListener};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener, PgPoolOptions};

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cycles = std::env::var("CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(if full { 2000 } else { 20 });
    let cluster = cluster::Cluster::start();
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let pool = |name: &'static str| {
        PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(cluster.options().application_name(name))
    };
    let (bare_pool, watched_pool) = (pool("bench-sqlx"), pool("bench-poolwatch"));
    let mut bare = PgListener::connect_with(&bare_pool).await.unwrap();
    bare.listen("bench").await.unwrap();
    let mut watched =
        WatchedListener::connect_with(&watched_pool, ListenerConfig::new("bench", "bench")).await.unwrap();
    watched.listen("bench").await.unwrap();

    // Warm-up, then the measured turns.
    for _ in 0..5 {
        kill(&mut admin, "bench-sqlx").await;
        while bare.try_recv().await.unwrap().is_some() {}
        kill(&mut admin, "bench-poolwatch").await;
        while watched.try_recv().await.unwrap().is_some() {}
    }
    let (mut t_bare, mut t_watched) = (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    for _ in 0..cycles {
        t_bare.push(cycle(&mut admin, "bench-sqlx", async || bare.try_recv().await.unwrap().is_some()).await);
        t_watched
            .push(cycle(&mut admin, "bench-poolwatch", async || watched.try_recv().await.unwrap().is_some()).await);
    }
    println!("listener reconnect after pg_terminate_backend ({cycles} cycles each, taking turns):");
    let bare_ms = report("  sqlx PgListener:           ", t_bare);
    let watched_ms = report("  poolwatch WatchedListener: ", t_watched);
    println!("  ratio WatchedListener / PgListener (mean): {:.3}", watched_ms / bare_ms);

    // Memory: each listener alone for a phase, RSS growth of the whole process.
    let phase = cycles.min(500);
    let before = rss_kb();
    for _ in 0..phase {
        cycle(&mut admin, "bench-sqlx", async || bare.try_recv().await.unwrap().is_some()).await;
    }
    let mid = rss_kb();
    for _ in 0..phase {
        cycle(&mut admin, "bench-poolwatch", async || watched.try_recv().await.unwrap().is_some()).await;
    }
    let after = rss_kb();
    println!(
        "  RSS growth over {phase} more cycles: PgListener {} kB, WatchedListener {} kB",
        mid - before,
        after - mid
    );
    check_alive(&mut admin, &mut bare, &mut watched).await;
}

/// Both listeners still receive after all the cycles.
async fn check_alive(admin: &mut PgConnection, bare: &mut PgListener, watched: &mut WatchedListener) {
    sqlx::query("NOTIFY bench, 'done'").execute(admin).await.unwrap();
    let a = tokio::time::timeout(Duration::from_secs(30), bare.recv()).await.unwrap().unwrap();
    let b = tokio::time::timeout(Duration::from_secs(30), watched.recv()).await.unwrap().unwrap();
    assert_eq!((a.payload(), b.payload()), ("done", "done"));
}

/// Ends the session named `app` and returns once the server has sent the signal.
async fn kill(admin: &mut PgConnection, app: &str) {
    let n: i64 =
        sqlx::query_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1")
            .bind(app)
            .fetch_one(&mut *admin)
            .await
            .unwrap();
    assert_eq!(n, 1, "one listener session named {app}");
}

/// One cycle: kill, then `try_recv` until the reconnect is reported. Milliseconds.
async fn cycle(admin: &mut PgConnection, app: &str, mut recv: impl AsyncFnMut() -> bool) -> f64 {
    let t = Instant::now();
    kill(admin, app).await;
    while recv().await {}
    t.elapsed().as_secs_f64() * 1e3
}

fn report(what: &str, mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
    mean
}

/// The process's resident set size in kB (Linux).
fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
