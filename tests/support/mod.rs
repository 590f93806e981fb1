//! Shared test support: the throwaway cluster, a reader for the exported metrics, and the
//! set-up several test files share (configs, pools, admin connections).

#![allow(dead_code)]

pub mod cluster;
pub mod exact;
pub mod logs;
#[cfg(feature = "telemetry")]
pub mod otlp;
#[cfg(feature = "telemetry")]
pub mod otlp_metrics;
pub mod password;
pub mod pgbouncer;
pub mod prometheus;
pub mod proxy;
pub mod spans;
pub mod wait;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor, PgPool};

pub use cluster::Cluster;
pub use wait::eventually;

/// The label naming a series' pool: the crate's own constant. Its literal value
/// (`db_client_connection_pool_name`, what the dashboards and alerts read) stays pinned where
/// the exposition is read as text: tests/export.rs, tests/fleet.rs, tests/alerting_e2e.rs.
pub use poolwatch::catalog::POOL_NAME as POOL;

/// The Prometheus recorder of this test binary, installed once, as an app would: with
/// poolwatch's histogram buckets, so histograms render as histograms.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for m in poolwatch::catalog::ALL.iter().filter(|m| m.kind == poolwatch::catalog::Kind::Histogram) {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(m.name.to_owned()), poolwatch::catalog::SECONDS_BUCKETS)
                .expect("valid buckets");
        }
        builder.install_recorder().expect("install the Prometheus recorder")
    })
}

/// The series `name{labels..}` of a text exposition (other labels free), with their values:
/// each series' label text (`a="x",b="y"}`, `}` when it has none) and value. Comment lines
/// are skipped; a label matches when the series holds `k="v"`.
pub fn series_values<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let all = series_name == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { Some((rest, value.parse().ok()?)) } else { None }
        })
        .collect()
}

/// The value of the series `name{labels}` in the rendered `/metrics` text, if present.
/// `labels` must all match; other labels on the series are ignored.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series_values(&recorder().render(), name, labels).first().map(|(_, value)| *value)
}

/// The sum of every series `name{labels..}` (other labels free), 0 when none is present.
pub fn metric_sum(name: &str, labels: &[(&str, &str)]) -> f64 {
    series_values(&recorder().render(), name, labels).iter().map(|(_, value)| value).sum()
}

/// A series of `name` for pool `pool`, 0 when absent.
pub fn pool_value(name: &str, pool: &str) -> f64 {
    metric(name, &[(POOL, pool)]).unwrap_or(0.0)
}

/// A config whose sampler and census run fast enough for a test to watch them: a sample
/// every 100 ms and a census every 300 ms, every other setting at its default.
pub fn fast_config(name: &str) -> Config {
    Config::new(name).sample_interval(Duration::from_millis(100)).census_interval(Duration::from_millis(300))
}

/// A config for a test that owns the pool and asks for each census (`census_now`): census
/// and pool heartbeat hourly, so the heartbeat runs once at start and no census runs unasked.
pub fn quiet_config(name: &str) -> Config {
    Config::new(name).heartbeat_interval(Duration::from_secs(3600)).census_interval(Duration::from_secs(3600))
}

/// Waits until `watch`'s start-up pool heartbeat has succeeded: for tests that run no other
/// heartbeat, and count pool connections once it no longer holds one.
pub async fn startup_heartbeat(watch: &PoolWatch) {
    eventually(Duration::from_secs(10), "the start-up heartbeat is done", async || {
        watch.heartbeat().pool.up.filter(|up| *up)
    })
    .await;
}

/// A pool of at most `max` connections to `cluster`.
pub async fn pool(cluster: &Cluster, max: u32) -> PgPool {
    PgPoolOptions::new().max_connections(max).connect_with(cluster.options()).await.expect("connect")
}

/// `n` connections acquired from `pool`, one after the other, held until dropped.
pub async fn hold(pool: &PgPool, n: usize) -> Vec<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.acquire().await.unwrap());
    }
    held
}

/// A connection of the test's own to `cluster` (outside any pool), to look at or act on
/// the server.
pub async fn admin(cluster: &Cluster) -> PgConnection {
    PgConnection::connect_with(&cluster.options()).await.expect("admin connection")
}

/// [`admin`], kept through the server's `idle_session_timeout` (set to 0 for its session):
/// for tests that set that timeout on the server.
pub async fn lasting_admin(cluster: &Cluster) -> PgConnection {
    let mut admin = admin(cluster).await;
    admin.execute("SET idle_session_timeout = 0").await.expect("disable idle timeout for the admin");
    admin
}

/// How many sessions on `cluster`'s server have the `application_name` `name` (a
/// connection of its own, every database).
pub async fn sessions_named(cluster: &Cluster, name: &str) -> i64 {
    let mut c = admin(cluster).await;
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(name)
        .fetch_one(&mut c)
        .await
        .unwrap()
}

/// How many sessions in `admin`'s database have an `application_name` `LIKE` `pattern`
/// (this test's database only: on the shared server the binary's other tests have theirs).
pub async fn sessions_like(admin: &mut PgConnection, pattern: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1 AND datname = current_database()",
    )
    .bind(pattern)
    .fetch_one(admin)
    .await
    .expect("count sessions")
}
