//! A Prometheus recorder that renders the `*_time_seconds` histograms with poolwatch's
//! recommended buckets, as an app would configure it. Use it instead of `support::recorder()`
//! in a test binary that checks histograms (only one recorder can be installed per binary).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The recorder of this test binary, installed once with [`poolwatch::DURATION_BUCKETS`].
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_time_seconds".into()), poolwatch::DURATION_BUCKETS)
            .expect("valid buckets")
            .install_recorder()
            .expect("install the Prometheus recorder")
    })
}

/// The value of the series `name{labels}` in this recorder's `/metrics` text, if present.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    recorder().render().lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
        if series_name != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if all { value.parse().ok() } else { None }
    })
}
