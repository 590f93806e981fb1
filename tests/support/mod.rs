//! Shared test support: the throwaway cluster and a reader for the exported metrics.

#![allow(dead_code)]

pub mod cluster;
pub mod exact;
pub mod logs;
#[cfg(feature = "telemetry")]
pub mod otlp;
pub mod password;
pub mod pgbouncer;
pub mod prometheus;
pub mod proxy;
pub mod spans;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use cluster::Cluster;

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

/// The value of the series `name{labels}` in the rendered `/metrics` text, if present.
/// `labels` must all match; other labels on the series are ignored.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = recorder().render();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
        if series_name != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if all { value.parse().ok() } else { None }
    })
}

/// The sum of every series `name{labels..}` (other labels free), 0 when none is present.
pub fn metric_sum(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = recorder().render();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let all = series_name == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within` with `what`.
/// `within` is a floor of 30 s whatever the caller asks: a loaded machine (CI, other builds,
/// `scripts/flake-check`) may take that long, and a passing test never waits it out.
pub async fn eventually<T>(within: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let within = within.max(Duration::from_secs(30));
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
