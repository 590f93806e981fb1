//! Optional helpers for the app's own recorder. poolwatch only emits through the `metrics`
//! facade (like every metrics-rs library); these helpers configure a recorder so its
//! histograms render as histograms, with poolwatch's buckets.
//!
//! - `metrics-exporter-prometheus` (feature `prometheus`): [`prometheus_builder`] or
//!   [`with_buckets`] on a builder you already have.
//! - Any other recorder (e.g. the OpenTelemetry SDK through `metrics-exporter-opentelemetry`
//!   or `metrics-util`): give each histogram of [`catalog::ALL`](crate::catalog::ALL) the
//!   bounds of [`catalog::buckets`](crate::catalog::buckets) (an OTel `View` with an
//!   explicit-bucket aggregation per instrument name), or use base-2 exponential histograms.
//!   Without bounds many recorders fall back to summaries, and the shipped `_bucket` panels
//!   and alerts show no data.

#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
pub use prometheus::{prometheus_builder, with_buckets};
