//! `metrics-exporter-prometheus` with poolwatch's histogram buckets.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::catalog::{self, Kind};
use crate::config::Detail;

/// A `PrometheusBuilder` whose poolwatch histograms render as histograms, with the coarse
/// buckets of [`Detail::Standard`]. Chain your own settings (`with_http_listener`,
/// `add_global_label`, buckets for your metrics) and install it:
///
/// **Pools that come and go** (a pool per tenant): this exporter does not know when a pool's
/// watch ends, so its series stay (about 50 per pool). Its `idle_timeout(mask, Some(t))`
/// drops series not updated for `t`, and a series it drops while poolwatch still holds the
/// handle stops updating until registered again. Only gauges are safe to time out, with `t`
/// longer than the longest quiet spell of a live pool's gauge (`Config::reach_interval`, 3 h
/// by default, and a listener's last notification): `idle_timeout(MetricKindMask::GAUGE,
/// Some(..))`. Counters (alerts read them from 0 with `increase()`) and histograms of closed
/// pools still stay: for pool churn use [`Exporter`](super::Exporter), which takes a pool's
/// series out once its watch has ended and nothing holds them.
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
