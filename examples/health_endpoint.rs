//! A readiness endpoint serving `watch.health()` with axum: `GET /health` answers 200 with the
//! report while the pool is `ok` or `degraded`, 503 when it is `failing` (take the instance
//! out of rotation: the app cannot get a working connection). With `DATABASE_URL` unset it
//! starts a throwaway PostgreSQL cluster, like the demo.
//!
//! ```sh
//! cargo run --example health_endpoint --features serde          # serves 127.0.0.1:9185
//! curl -s 127.0.0.1:9185/health
//! cargo run --example health_endpoint --features serde -- --once # prints one answer, exits
//! ```

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use poolwatch::PoolWatch;
use poolwatch::report::{HealthReport, HealthStatus};
use poolwatch::sqlx;
use sqlx::postgres::PgPoolOptions;

async fn health(State(watch): State<Arc<PoolWatch>>) -> (StatusCode, Json<HealthReport>) {
    let report = watch.health();
    let code = match report.status {
        HealthStatus::Failing => StatusCode::SERVICE_UNAVAILABLE,
        HealthStatus::Ok | HealthStatus::Degraded => StatusCode::OK,
    };
    (code, Json(report))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let once = std::env::args().any(|a| a == "--once");
    let cluster = cluster::Cluster::for_example(); // removed at exit if throwaway
    let options = cluster.options();
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options).await?;
    let config = poolwatch::Config::new("main").heartbeat_interval(Duration::from_secs(2));
    let watch = Arc::new(poolwatch::instrument_pool(&pool, config)?);
    let app = Router::new().route("/health", get(health)).with_state(Arc::clone(&watch));
    let listener = tokio::net::TcpListener::bind(if once { "127.0.0.1:0" } else { "127.0.0.1:9185" }).await?;
    let address = listener.local_addr()?;
    if !once {
        println!("serving http://{address}/health");
        axum::serve(listener, app).await?;
        return Ok(());
    }
    // --once: wait for the first heartbeat, ask the endpoint once over plain HTTP, print it.
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    while watch.heartbeat().pool.up.is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = get_once(address).await?;
    println!("{answer}");
    server.abort();
    Ok(())
}

/// `GET /health` with a bare HTTP/1.1 request (no client crate needed).
async fn get_once(address: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}
