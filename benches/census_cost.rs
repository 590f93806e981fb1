//! What one server census costs, with many idle backends on the server.
//!
//! `cargo bench --bench census_cost` prints milliseconds per census (mean, p50, p99) with 0 and
//! 200 idle backends besides the watched pool, and through a real PgBouncer with the pooler
//! census (`pooler_admin`: `SHOW CLIENTS` + `SHOW POOLS` on the admin console, 200 other
//! clients on the pooler). Under `cargo test` it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/pgbouncer.rs"]
mod pgbouncer;

use std::time::{Duration, Instant};

use poolwatch::{Config, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (backends, rounds) = if full { (200, 500) } else { (10, 5) };
    let cluster = cluster::Cluster::start();
    // README's order: instrument the pool before it opens connections, so all are tagged.
    let pool = PgPoolOptions::new().max_connections(5).min_connections(5).connect_lazy_with(cluster.options());
    let watch = instrument_pool(&pool, Config::new("bench").census_interval(Duration::from_secs(3600))).unwrap();
    fill(&pool).await;

    println!("census cost ({rounds} censuses each, watched pool of 5):");
    let mut probe = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let app_name = watch.application_name().to_owned();
    measure(&watch, "idle backends", 0, rounds).await;
    query_alone(&mut probe, &app_name, 0, rounds).await;
    let mut idle = Vec::new();
    for _ in 0..backends {
        idle.push(PgConnection::connect_with(&cluster.options()).await.unwrap());
    }
    measure(&watch, "idle backends", backends, rounds).await;
    query_alone(&mut probe, &app_name, backends, rounds).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.map(|c| c.total()), Some(5), "the census counts only the watched pool");
    drop(idle);
    through_the_pooler(&cluster, backends, rounds).await;
}

/// Opens the pool's 5 connections and returns them to the pool.
async fn fill(pool: &sqlx::PgPool) {
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.acquire().await.unwrap());
    }
}

/// The census through PgBouncer with `pooler_admin`, and the admin console's two SHOWs alone.
async fn through_the_pooler(cluster: &cluster::Cluster, clients: usize, rounds: usize) {
    let bouncer = pgbouncer::PgBouncer::start(cluster.port(), &[("max_client_conn", "400")]);
    let pool = PgPoolOptions::new().max_connections(5).min_connections(5).connect_lazy_with(bouncer.options());
    let config = Config::new("bench_pooler")
        .census_interval(Duration::from_secs(3600))
        .direct_connect_options(cluster.options())
        .pooler_admin(bouncer.admin_url());
    let watch = instrument_pool(&pool, config).unwrap();
    fill(&pool).await;
    assert_eq!(watch.census_now().await.unwrap().phantom, Some(0), "the pooler census matches every connection");
    let mut admin = PgConnection::connect_with(&bouncer.admin_options()).await.unwrap();
    println!("through PgBouncer (transaction mode) with pooler_admin, watched pool of 5:");
    measure(&watch, "pooler clients", 0, rounds).await;
    shows_alone(&mut admin, 0, rounds).await;
    let mut others = Vec::new();
    for _ in 0..clients {
        others.push(PgConnection::connect_with(&bouncer.options()).await.unwrap());
    }
    measure(&watch, "pooler clients", clients, rounds).await;
    shows_alone(&mut admin, clients, rounds).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.pooler.map(|p| p.clients), Some(5), "the pooler census counts only the watched pool");
    assert_eq!(s.phantom, Some(0));
}

async fn shows_alone(admin: &mut PgConnection, clients: usize, rounds: usize) {
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        admin.execute(sqlx::raw_sql("SHOW CLIENTS")).await.unwrap();
        admin.execute(sqlx::raw_sql("SHOW POOLS")).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {clients:>3} other pooler clients, SHOW CLIENTS + SHOW POOLS alone:"), ms);
}

/// One row of `CENSUS_SQL`.
type CensusRow = (Option<String>, Option<i32>, Option<f64>, bool, i64);

/// The census's SQL alone, on a plain connection: the server's share of the cost.
async fn query_alone(conn: &mut PgConnection, app_name: &str, backends: usize, rounds: usize) {
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let keys: Vec<String> = (0..5).map(|i| format!("127.0.0.1 {}", 40000 + i)).collect();
        let _: Vec<CensusRow> =
            sqlx::query_as(poolwatch::CENSUS_SQL).bind(app_name).bind(&keys).fetch_all(&mut *conn).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {backends:>3} other idle backends, the SQL alone:"), ms);
}

async fn measure(watch: &poolwatch::PoolWatch, what: &str, backends: usize, rounds: usize) {
    for _ in 0..rounds.min(20) {
        watch.census_now().await.unwrap();
    }
    let mut ms: Vec<f64> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        watch.census_now().await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {backends:>3} other {what}, whole census:"), ms);
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
}
