//! What the server pays for watching: one server census at 10, 200 and 1,000 other backends
//! (wall time and the server's CPU time), one reachability probe (the backend the server
//! forks for it), and the projection to 1,000 replicas at the default cadence.
//!
//! `cargo bench --bench census_cost` (root, or a user that may read the server's
//! `/proc/<pid>/stat`). Server CPU is read from the kernel: the census backend's
//! `/proc/<pid>/schedstat` (ns) before and after N censuses; a probe's backend lives a few ms,
//! so its CPU is the postmaster's own plus its reaped children's (`/proc/<pid>/stat`, clock
//! ticks) over N probes. Under `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolwatch::{Config, instrument_pool, probe_addresses};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};

const REPLICAS: f64 = 1000.0;

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (steps, rounds, probes): (&[usize], usize, usize) =
        if full { (&[10, 200, 1000], 300, 300) } else { (&[10], 5, 5) };
    let cluster = cluster::Cluster::start_with(&[("max_connections", "1100")]);
    let defaults = Config::new("bench");
    let pool =
        PgPoolOptions::new().max_connections(5).min_connections(5).connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("bench").census_interval(Duration::from_secs(3600))).unwrap();
    watch.census_now().await.unwrap();
    let mut probe = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let census_pid: i32 =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'poolwatch-census:bench:%'")
            .fetch_one(&mut probe)
            .await
            .unwrap();
    let app_name = watch.application_name().to_owned();
    println!("server cost of watching ({rounds} censuses per step; watched pool of 5; PostgreSQL on loopback):");
    println!("  load: {}", uptime());

    let mut idle = Vec::new();
    let mut census_cpu_at_1000 = 0.0;
    for &backends in steps {
        while idle.len() < backends {
            idle.push(PgConnection::connect_with(&cluster.options()).await.unwrap());
        }
        for _ in 0..rounds.min(20) {
            watch.census_now().await.unwrap();
        }
        let cpu_before = schedstat_ns(census_pid);
        let mut ms = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            watch.census_now().await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let server_ms = (schedstat_ns(census_pid) - cpu_before) as f64 / 1e6 / rounds as f64;
        census_cpu_at_1000 = server_ms;
        report(&format!("  {backends:>4} other backends, whole census (+ a sample):"), ms);
        println!("  {backends:>4} other backends, census server CPU: {server_ms:.3} ms per census");
        query_alone(&mut probe, &app_name, backends, rounds).await;
    }
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.map(|c| c.total()), Some(5), "the census counts only the watched pool");
    drop(idle);
    // The other backends exit and are reaped before the probes are measured: their CPU would
    // count in the postmaster's children's time.
    for _ in 0..600 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
            .fetch_one(&mut probe)
            .await
            .unwrap();
        if n <= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The reachability probe: a TCP connect the postmaster forks a backend for.
    let server = SocketAddr::from(([127, 0, 0, 1], cluster.port()));
    let postmaster = parent_pid(census_pid);
    let before = process_cpu_with_children_ms(postmaster);
    let t = Instant::now();
    for _ in 0..probes {
        let r = probe_addresses(&[server], Duration::from_secs(5)).await;
        assert!(r[0].up, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = t.elapsed().as_secs_f64() * 1e3 / probes as f64;
    // Let the last forked backends exit and be reaped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe_ms = (process_cpu_with_children_ms(postmaster) - before) / probes as f64;
    println!(
        "  reachability probe, 1 address: server CPU {probe_ms:.2} ms per probe (postmaster + forked backend), {wall:.2} ms per round incl. a 10 ms pause"
    );

    // The direct heartbeat's SELECT 1 on the dedicated connection, for scale.
    let my_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut probe).await.unwrap();
    let before = schedstat_ns(my_pid);
    for _ in 0..rounds {
        sqlx::query("SELECT 1").execute(&mut probe).await.unwrap();
    }
    let select1_ms = (schedstat_ns(my_pid) - before) as f64 / 1e6 / rounds as f64;
    println!("  direct heartbeat SELECT 1: server CPU {select1_ms:.3} ms each");

    let census_every = defaults.census_interval.as_secs_f64();
    let reach_every = defaults.reach_interval.as_secs_f64();
    let per_replica = census_cpu_at_1000 / 1e3 / census_every + probe_ms / 1e3 / reach_every;
    let heartbeat = select1_ms / 1e3 / defaults.heartbeat_interval.as_secs_f64();
    println!(
        "projected server CPU, {REPLICAS} replicas at the defaults (census every {census_every} s ±20 %, probe every {reach_every} s ±20 %):"
    );
    println!(
        "  census + probes: {:.4} cores ({:.4} census + {:.4} probes); the old cadence (census every 15 s, a probe after each): {:.3} cores",
        per_replica * REPLICAS,
        census_cpu_at_1000 / 1e3 / census_every * REPLICAS,
        probe_ms / 1e3 / reach_every * REPLICAS,
        (census_cpu_at_1000 + probe_ms) / 1e3 / 15.0 * REPLICAS,
    );
    println!(
        "  besides: the direct heartbeat's SELECT 1 every {} s: {:.4} cores",
        defaults.heartbeat_interval.as_secs(),
        heartbeat * REPLICAS
    );
    println!("  load: {}", uptime());
}

/// One row of the census's result.
type CensusRow = (Option<String>, i64, Option<f64>, i64, i64, i64, Vec<i32>);

/// The census's SQL alone, on a plain connection, with its server CPU.
async fn query_alone(conn: &mut PgConnection, app_name: &str, backends: usize, rounds: usize) {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
    for (what, sql) in [
        ("the census SQL", poolwatch::CENSUS_SQL),
        (
            "counts only",
            "SELECT state, count(*), 0::float8, 0::int8, 0::int8, 0::int8, array_agg(client_port) FROM pg_stat_activity WHERE application_name = $1 GROUP BY state",
        ),
    ] {
        let before = schedstat_ns(pid);
        let mut ms = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let _: Vec<CensusRow> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(app_name).fetch_all(&mut *conn).await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let cpu = (schedstat_ns(pid) - before) as f64 / 1e6 / rounds as f64;
        report(&format!("  {backends:>4} other backends, {what} alone (server CPU {cpu:.3} ms):"), ms);
    }
}

/// Nanoseconds on CPU of a process (first field of `/proc/<pid>/schedstat`).
fn schedstat_ns(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("read schedstat (run as root)");
    text.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat field")
}

/// utime + stime + cutime + cstime of a process, in ms.
fn process_cpu_with_children_ms(pid: i32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &text[text.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14-17 of stat; after the comm field the index is 11-14.
    let ticks: u64 = f[11..15].iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
    ticks as f64 * 1000.0 / 100.0 // USER_HZ
}

fn parent_pid(pid: i32) -> i32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &text[text.rfind(')').expect("comm") + 2..];
    after_comm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("ppid")
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| format!("load average {}", l.split_whitespace().take(3).collect::<Vec<_>>().join(", ")))
        .unwrap_or_default()
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
}
