//! `metrics-exporter-prometheus` with poolwatch's histogram buckets.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::Detail;
use crate::catalog::{self, Kind};

/// A `PrometheusBuilder` whose poolwatch histograms render as histograms, with the coarse
/// buckets of [`Detail::Standard`]. Chain your own settings (`with_http_listener`,
/// `add_global_label`, buckets for your metrics) and install it:
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// poolwatch::export::prometheus_builder()
///     .with_http_listener(([127, 0, 0, 1], 9184))
///     .install()?; // inside a Tokio runtime
/// # Ok(()) }
/// ```
pub fn prometheus_builder() -> PrometheusBuilder {
    with_buckets(PrometheusBuilder::new(), Detail::Standard)
}

/// Sets the bucket bounds of every poolwatch histogram on `builder`:
/// [`catalog::buckets`] at `detail` (`Detail::Full`: [`catalog::SECONDS_BUCKETS`], 18 bounds).
/// Other metrics keep the builder's settings.
pub fn with_buckets(mut builder: PrometheusBuilder, detail: Detail) -> PrometheusBuilder {
    for m in catalog::ALL.iter().filter(|m| m.kind == Kind::Histogram) {
        let bounds = catalog::buckets(m.name, detail).unwrap_or(catalog::SECONDS_BUCKETS);
        // Errors only on an empty list; every list in the catalog has bounds (unit test).
        builder = match builder.set_buckets_for_metric(Matcher::Full(m.name.to_owned()), bounds) {
            Ok(b) => b,
            Err(_) => unreachable!("poolwatch bucket lists are non-empty"),
        };
    }
    builder
}
