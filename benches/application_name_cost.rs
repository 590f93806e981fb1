//! What the attribution tag costs behind PgBouncer in transaction mode: the `SET
//! application_name` statements PgBouncer sends the server when it hands a server connection
//! to a client whose `application_name` differs from the one the connection last carried.
//!
//! `cargo bench --bench application_name_cost` runs the same load (several "processes", i.e.
//! pools each watched by its own `instrument_pool`, sharing one PgBouncer pool) with the
//! per-process nonce tag (`NetworkPath::Nat`, the old default) and with the stable tag, and
//! counts the SETs in the server's statement log (`log_statement = all`) per 1,000
//! transactions. Under `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/pgbouncer.rs"]
mod pgbouncer;

use std::time::{Duration, Instant};

use poolwatch::attribution::NetworkPath;
use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let per_pool = if full { 2_500 } else { 100 };
    let processes = 4;
    let cluster = cluster::Cluster::start_with(&[("log_statement", "all")]);
    let bouncer = pgbouncer::PgBouncer::start(cluster.port(), &[("default_pool_size", "4")]);
    println!(
        "SET application_name sent by PgBouncer 1.x (transaction mode, pool size 4), {processes} processes x {per_pool} transactions:"
    );
    let cases: [(&str, Option<NetworkPath>, bool); 3] = [
        ("before: per-process nonce tag", Some(NetworkPath::Nat), false),
        ("after: stable tag", None, false),
        ("after: stable tag, 2 pool names", None, true),
    ];
    for (what, path, two_pools) in cases {
        let log = cluster.log();
        let (before, queries_before) = (count_sets(&log), count_queries(&log));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..processes {
            let pool =
                PgPoolOptions::new().max_connections(2).connect_lazy_with(bouncer.options().application_name("api"));
            // Two pools of the app (two pool names, so two tags) sharing PgBouncer's pool.
            let name = if two_pools && p % 2 == 1 { "jobs" } else { "main" };
            let mut config = Config::new(name)
                .direct_connect_options(cluster.options())
                .heartbeat_interval(Duration::from_secs(3600))
                .census_interval(Duration::from_secs(3600));
            if let Some(path) = path {
                config = config.network_path(path);
            }
            // These pools stand for separate processes, but live in one: a process may watch
            // one pool per name, so each watch is dropped once it has tagged its pool (the tag
            // stays on the pool's connect options; only the tag matters to PgBouncer).
            drop(instrument_pool(&pool, config).unwrap());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_pool {
                    pool.execute(sqlx::raw_sql("SELECT 1")).await.unwrap();
                }
                pool.close().await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        // The server's log is written asynchronously: wait until it stops growing.
        let mut sets = count_sets(&cluster.log()) - before;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = count_sets(&cluster.log()) - before;
            if now == sets {
                break;
            }
            sets = now;
        }
        let transactions = processes * per_pool;
        // The app's statements the server ran in the window (the denominator, server-side).
        let ran = count_queries(&cluster.log()) - queries_before;
        println!(
            "  {what:<32} {:>7.1} SET application_name per 1,000 transactions ({sets} SETs; {ran} of {transactions} app transactions in the log; {:.0} tx/s)",
            sets as f64 * 1000.0 / ran.max(1) as f64,
            transactions as f64 / took.as_secs_f64()
        );
    }
}

fn count_sets(log: &str) -> usize {
    log.matches("SET application_name=").count()
}

fn count_queries(log: &str) -> usize {
    log.matches("statement: SELECT 1").count()
}
