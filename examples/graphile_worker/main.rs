//! graphile_worker (a job queue on sqlx 0.9) on an instrumented pool, set up as the README's
//! "Apps whose pool is driven by a library" says: its queries go through the bare `PgPool`, so
//! the pool's hooks and sqlx's own acquire events give the acquire figures, and its LISTEN
//! connection is a `WatchedListener` (driver.rs: graphile's own driver with LISTEN swapped).
//!
//! Runs `--jobs N` jobs (default 1000), ends graphile's LISTEN session halfway (as a server
//! restart, a failover or an admin would), and prints the figures. With `DATABASE_URL` unset
//! it starts a throwaway PostgreSQL cluster. Needs sqlx 0.9 (the default feature):
//!
//! ```sh
//! cargo run --example graphile_worker --features prometheus -- --jobs 1000
//! ```

#[path = "../../tests/support/cluster.rs"]
mod cluster;
mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use graphile_worker::{IntoTaskHandlerResult, JobSpec, TaskHandler, WorkerContext, WorkerOptions};
use poolwatch::sqlx;
use poolwatch::{Config, ListenerConfig, instrument_options_named, instrument_pool, sqlx_acquire_layer};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tracing_subscriber::layer::SubscriberExt;

/// Jobs that ran.
static DONE: AtomicU64 = AtomicU64::new(0);

/// A job with a query of its own on the worker's pool, as a real one would have.
#[derive(Serialize, Deserialize)]
struct SendReceipt {
    order: u64,
}

impl TaskHandler for SendReceipt {
    const IDENTIFIER: &'static str = "send_receipt";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        sqlx::query("SELECT pg_sleep(0.002), $1::int8")
            .bind(i64::try_from(self.order).unwrap_or(i64::MAX))
            .execute(ctx.pg_pool())
            .await
            .map_err(|e| e.to_string())?;
        DONE.fetch_add(1, Ordering::Relaxed);
        Ok::<(), String>(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let jobs: u64 = match std::env::args().skip_while(|a| a != "--jobs").nth(1) {
        Some(n) => n.parse().map_err(|_| "--jobs takes a number of jobs, e.g. --jobs 1000")?,
        None => 1000,
    };
    let cluster = cluster::Cluster::for_example(); // removed at exit if throwaway
    let options = cluster.options();

    // 1. The app's Prometheus recorder (read back at the end here) and poolwatch's layer for
    //    sqlx's own acquire events.
    let metrics = poolwatch::export::Exporter::new().install()?;
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(sqlx_acquire_layer()))?;
    // 2. The pool, with the hooks that count every acquire whoever makes it, watched.
    let pool = instrument_options_named(PgPoolOptions::new().max_connections(5), "jobs").connect_with(options).await?;
    let watch = instrument_pool(&pool, Config::new("jobs").census_interval(Duration::from_secs(1)))?;
    // 3. graphile_worker on that pool, its LISTEN watched. 8 job slots share 5 connections:
    //    each NOTIFY wakes them all at once, and the wait shows in the wait-time histogram.
    let worker = WorkerOptions::default()
        .database(driver::WatchedDriver::new(pool.clone(), ListenerConfig::new("jobs", "graphile_worker")))
        .concurrency(8)
        .listen_os_shutdown_signals(false)
        .define_job::<SendReceipt>()
        .init()
        .await?;
    let worker = Arc::new(worker);
    let running = tokio::spawn({
        let worker = Arc::clone(&worker);
        async move { worker.run().await }
    });

    let started = Instant::now();
    let utils = worker.create_utils();
    let mut worst_phantom = 0;
    for order in 0..jobs {
        utils.add_job(SendReceipt { order }, JobSpec::default()).await?;
        if order == jobs / 2 {
            // graphile's LISTEN session ends: poolwatch counts the reconnect, by cause.
            let killed: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(driver::WatchedDriver::APPLICATION_NAME)
            .fetch_all(&pool)
            .await?;
            println!("ended graphile's LISTEN session ({} backend)", killed.len());
        }
        worst_phantom = worst_phantom.max(watch.snapshot().phantom.unwrap_or(0).abs());
    }
    while DONE.load(Ordering::Relaxed) < jobs {
        worst_phantom = worst_phantom.max(watch.snapshot().phantom.unwrap_or(0).abs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = watch.sample_now().await;
    println!(
        "{jobs} jobs in {:.1} s; phantom gap: at most {worst_phantom} at the censuses during the run, {:?} at the end",
        started.elapsed().as_secs_f64(),
        last.phantom
    );
    worker.request_shutdown();
    running.await??;

    let shown = [
        "poolwatch_pool_connects_total",
        "poolwatch_pool_idle_acquires_total",
        "poolwatch_pool_releases_total",
        "poolwatch_pool_slow_acquires_total",
        "db_client_connection_wait_time_seconds_count",
        "db_client_connection_wait_time_seconds_sum",
        "poolwatch_listener_reconnects_total",
        "poolwatch_listener_downtime_seconds_sum",
        "poolwatch_phantom_connections",
        "poolwatch_stranded_slots",
    ];
    let text = metrics.render();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if shown.contains(&name) {
            println!("{line}");
        }
    }
    watch.shutdown().await;
    Ok(())
}
