//! Getting poolwatch's metrics to Prometheus. poolwatch only emits through the `metrics`
//! facade (like every metrics-rs library); the app installs one recorder. With feature
//! `prometheus`, two ways:
//!
//! - [`Exporter`]: a recorder for the whole app whose scrapes stay cheap with many pools (each
//!   series' name and labels are rendered once, at registration), with poolwatch's histogram
//!   buckets. It serves `/metrics` itself or hands you a [`PrometheusHandle`] to serve.
//! - `metrics-exporter-prometheus`, if the app already runs it: [`with_buckets`] on your
//!   builder, or [`prometheus_builder`]. Its scrapes cost more per series
//!   (`benches/render_cost.rs` prints both).
//! - With feature `otel-metrics`, [`otel::OtelRecorder`]: poolwatch's metrics as
//!   OpenTelemetry instruments (semantic-convention names and units, poolwatch's bounds) on
//!   your SDK's meter, for OTLP export.
//! - Any other recorder (e.g. the OpenTelemetry SDK through `metrics-exporter-opentelemetry`
//!   or `metrics-util`): give each histogram of [`catalog::ALL`](crate::catalog::ALL) the
//!   bounds of [`catalog::buckets`](crate::catalog::buckets) (an OTel `View` with an
//!   explicit-bucket aggregation per instrument name), or use base-2 exponential histograms.
//!   Without bounds many recorders fall back to summaries, and the shipped `_bucket` panels
//!   and alerts show no data.

#[cfg(feature = "prometheus")]
mod exporter;
#[cfg(feature = "prometheus")]
mod http;
#[cfg(feature = "otel-metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel-metrics")))]
pub mod otel;
#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
mod recorder;
#[cfg(feature = "prometheus")]
mod render;
#[cfg(feature = "prometheus")]
mod retire;
#[cfg(feature = "prometheus")]
mod series;
#[cfg(feature = "prometheus")]
mod text;

/// A pool's watch has ended (stopped, dropped, or its pool closed and drained): with feature
/// `prometheus`, its series leave the exposition of every [`Exporter`] once nothing holds them
/// any more. (metrics-exporter-prometheus keeps series until its `idle_timeout` passes: see
/// [`prometheus_builder`].)
pub(crate) fn pool_ended(pool_name: &str) {
    #[cfg(feature = "prometheus")]
    retire::pool_ended(pool_name);
    #[cfg(not(feature = "prometheus"))]
    let _ = pool_name;
}

#[cfg(feature = "prometheus")]
pub(crate) use exporter::ListenField;

/// `Exporter`'s `/metrics` listener serving `handle` on `listener` (for the benches, through
/// `internals`).
#[cfg(feature = "prometheus")]
pub(crate) async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    http::serve(listener, handle).await;
}
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use exporter::{DEFAULT_BUCKETS, Exporter};
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use prometheus::{prometheus_builder, with_buckets};
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use recorder::{PrometheusHandle, PrometheusRecorder};
