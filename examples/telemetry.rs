//! One-call telemetry: `/metrics` on 127.0.0.1:9184 and OTLP spans to the collector named by
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (none set: logs only). With `DATABASE_URL` unset it starts a
//! throwaway PostgreSQL cluster, like the demo.
//!
//! ```sh
//! cargo run --example telemetry --features telemetry
//! DATABASE_URL=postgres://app:secret@127.0.0.1/app \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=demo \
//!   cargo run --example telemetry --features telemetry
//! curl -s 127.0.0.1:9184/metrics   # while it runs
//! ```

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::telemetry::{self, TelemetryConfig};
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = telemetry::init(TelemetryConfig::default())?; // keep it: flushes spans on drop
    let cluster = cluster::Cluster::for_example(); // removed at exit if throwaway
    let options = cluster.options();
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options).await?;
    let watch = poolwatch::instrument_pool(&pool, poolwatch::Config::new("main"))?;
    for _ in 0..10 {
        sqlx::query("SELECT 1").execute(&pool).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let snapshot = watch.census_now().await.map_err(|cause| format!("census failed: {cause}"))?;
    tracing::info!(phantom = ?snapshot.phantom, "census done; /metrics is on http://127.0.0.1:9184/metrics");
    if let Some(prometheus) = telemetry.prometheus() {
        println!("{}", prometheus.render());
    }
    watch.shutdown().await;
    Ok(())
}
