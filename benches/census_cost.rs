//! What one server census costs, with many idle backends on the server.
//!
//! `cargo bench --bench census_cost` prints milliseconds per census (mean, p50, p99) with 0 and
//! 200 idle backends besides the watched pool. Under `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (backends, rounds) = if full { (200, 500) } else { (10, 5) };
    let cluster = cluster::Cluster::start();
    let pool =
        PgPoolOptions::new().max_connections(5).min_connections(5).connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("bench").census_interval(Duration::from_secs(3600))).unwrap();

    println!("census cost ({rounds} censuses each, watched pool of 5):");
    let mut probe = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let app_name = watch.application_name().to_owned();
    measure(&watch, 0, rounds).await;
    query_alone(&mut probe, &app_name, 0, rounds).await;
    let mut idle = Vec::new();
    for _ in 0..backends {
        idle.push(PgConnection::connect_with(&cluster.options()).await.unwrap());
    }
    measure(&watch, backends, rounds).await;
    query_alone(&mut probe, &app_name, backends, rounds).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.map(|c| c.total()), Some(5), "the census counts only the watched pool");
    drop(idle);
}

/// The census's SQL alone, on a plain connection: the server's share of the cost.
async fn query_alone(conn: &mut PgConnection, app_name: &str, backends: usize, rounds: usize) {
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let _: Vec<(Option<String>, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM pg_stat_activity WHERE application_name = $1 GROUP BY state")
                .bind(app_name)
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {backends:>3} other idle backends, the SQL alone:"), ms);
}

async fn measure(watch: &poolwatch::PoolWatch, backends: usize, rounds: usize) {
    for _ in 0..rounds.min(20) {
        watch.census_now().await.unwrap();
    }
    let mut ms: Vec<f64> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        watch.census_now().await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {backends:>3} other idle backends, whole census:"), ms);
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
}
