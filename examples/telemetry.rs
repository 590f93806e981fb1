//! One-call telemetry: `/metrics` on 127.0.0.1:9184 and OTLP spans to the collector named by
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (none set: logs only).
//!
//! ```sh
//! DATABASE_URL=postgres://app:secret@127.0.0.1/app \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=demo \
//!   cargo run --example telemetry --features telemetry
//! curl -s 127.0.0.1:9184/metrics   # while it runs
//! ```

use std::time::Duration;

use poolwatch::telemetry::{self, TelemetryConfig};
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = telemetry::init(TelemetryConfig::default())?; // keep it: flushes spans on drop
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL=postgres://user:password@host/db")?;
    let pool = PgPoolOptions::new().max_connections(5).connect(&url).await?;
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
