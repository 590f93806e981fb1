//! The builder: validated bounds and labels, then a recorder, a global install and an optional
//! `/metrics` listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::recorder::{PrometheusHandle, PrometheusRecorder};
use super::series::Layout;
use crate::catalog::{self, Kind};
use crate::{config::ConfigError, config::Detail};

/// The bounds of histograms nobody gave bounds for: the Prometheus client libraries' default.
pub const DEFAULT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A Prometheus exporter for the whole app (poolwatch's metrics and yours), built so a scrape
/// stays cheap with many pools: each series' name and labels are rendered once, when it is
/// registered, and histograms keep fixed buckets (no samples are stored).
///
/// poolwatch's histograms get [`catalog::buckets`] at [`Detail::Standard`] ([`detail`](Self::detail)
/// changes that); other histograms get [`DEFAULT_BUCKETS`] unless [`buckets`](Self::buckets)
/// names them. There are no summaries, and no unit suffixes are added: names are rendered as
/// recorded, with invalid characters turned into `_`.
///
/// A pool's series (label `db_client_connection_pool_name`) leave the exposition once its
/// watch has ended (dropped, shut down, or its pool closed) and nothing holds them any more
/// (its `WatchedPool` handles, listeners and the pool itself dropped): a process that opens
/// and closes a pool per tenant keeps only the series of the pools alive.
///
/// ```no_run
/// # fn run() -> Result<(), poolwatch::ConfigError> {
/// // Inside a Tokio runtime (the listener is a Tokio task):
/// let metrics = poolwatch::export::Exporter::new()
///     .with_http_listener(([127, 0, 0, 1], 9184))
///     .install()?;
/// # let _ = metrics; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Exporter {
    listen: Option<SocketAddr>,
    global_labels: Vec<(String, String)>,
    buckets: HashMap<String, Vec<f64>>,
    default_buckets: Vec<f64>,
}

impl Default for Exporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Exporter {
    /// No listener, no global labels, poolwatch's buckets at [`Detail::Standard`].
    pub fn new() -> Self {
        Exporter {
            listen: None,
            global_labels: Vec::new(),
            buckets: HashMap::new(),
            default_buckets: DEFAULT_BUCKETS.to_vec(),
        }
        .detail(Detail::Standard)
    }

    /// poolwatch's histogram bounds at `detail` (`Detail::Full`: [`catalog::SECONDS_BUCKETS`]).
    pub fn detail(mut self, detail: Detail) -> Self {
        for m in catalog::ALL.iter().filter(|m| m.kind == Kind::Histogram) {
            let bounds = catalog::buckets(m.name, detail).unwrap_or(catalog::SECONDS_BUCKETS);
            self.buckets.insert(m.name.to_owned(), bounds.to_vec());
        }
        self
    }

    /// Serves the exposition over HTTP/1.1 at `addr` (`GET` or `HEAD` on `/metrics`; other
    /// paths answer 404, other methods 405) once installed, with keep-alive, and gzipped for
    /// scrapers that send `Accept-Encoding: gzip`.
    ///
    /// **Exposure**: there is no authentication and no TLS, and every metric of the app is
    /// served (pool names, server addresses, your own series). Bind loopback (`127.0.0.1`) or a
    /// private interface your scraper reaches, never `0.0.0.0` on a host with a public address.
    ///
    /// **Bounded**: at most 32 connections are held at once, kept-alive ones included (more
    /// are closed as soon as they are accepted, never queued); each request head must arrive
    /// within 20 s of the accept or of the previous answer (so idle kept-alive connections are
    /// closed after 20 s), a connection where no byte moves for 20 s is dropped, and scrapes
    /// that arrive while a render is made share the next one (rendered on Tokio's blocking
    /// pool). Idle or slow clients cannot use up the app's descriptors or CPU.
    pub fn with_http_listener(mut self, addr: impl Into<SocketAddr>) -> Self {
        self.listen = Some(addr.into());
        self
    }

    /// A label on every series (e.g. `region`). A series' own label of the same name wins.
    pub fn global_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.global_labels.retain(|(k, _)| *k != key);
        self.global_labels.push((key, value.into()));
        self
    }

    /// The bounds of the histogram named `metric` (as recorded, e.g. `http_request_seconds`).
    pub fn buckets(mut self, metric: &str, bounds: &[f64]) -> Result<Self, ConfigError> {
        self.buckets.insert(metric.to_owned(), checked("buckets", bounds)?);
        Ok(self)
    }

    /// The bounds of every histogram without its own.
    pub fn default_buckets(mut self, bounds: &[f64]) -> Result<Self, ConfigError> {
        self.default_buckets = checked("default_buckets", bounds)?;
        Ok(self)
    }

    /// The recorder, not installed; take its [`handle`](PrometheusRecorder::handle) first.
    pub fn build_recorder(self) -> PrometheusRecorder {
        PrometheusRecorder::new(Layout {
            global_labels: self.global_labels,
            buckets: self.buckets.into_iter().map(|(k, v)| (k, Arc::from(v))).collect(),
            default_buckets: Arc::from(self.default_buckets),
        })
    }

    /// Installs the recorder as the process's `metrics` recorder and, with
    /// [`with_http_listener`](Self::with_http_listener), starts serving (a Tokio task: call it
    /// inside a Tokio runtime). Errors name the field at fault: a port that cannot be bound,
    /// no runtime, or another recorder already installed.
    pub fn install(self) -> Result<PrometheusHandle, ConfigError> {
        let field = ListenField { name: "with_http_listener", fix: "free the port or choose another address" };
        let (recorder, serving) = match self.listen {
            Some(addr) => self.serve_on(addr, field).map(|(r, task)| (r, Some(task)))?,
            None => (self.build_recorder(), None),
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            if let Some(task) = serving {
                task.abort();
            }
            return Err(ConfigError::new(
                "install",
                "another metrics recorder is already installed in this process",
                "install one recorder per process; to keep yours, give it poolwatch's buckets (export::with_buckets for metrics-exporter-prometheus)",
            ));
        }
        Ok(handle)
    }

    /// The recorder (not installed) and the task serving it on `addr`: bound and spawned
    /// here, so a bad address fails before anything is installed.
    pub(crate) fn serve_on(
        self,
        addr: SocketAddr,
        field: ListenField,
    ) -> Result<(PrometheusRecorder, tokio::task::JoinHandle<()>), ConfigError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::new(
                field.name,
                "the /metrics listener needs a Tokio runtime and none is running",
                "call it inside the Tokio runtime (e.g. in #[tokio::main])",
            )
        })?;
        let _entered = runtime.enter();
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| ConfigError::new(field.name, format!("cannot listen on {addr}: {e}"), field.fix))?;
        let recorder = self.build_recorder();
        let task = runtime.spawn(super::http::serve(listener, recorder.handle()));
        Ok((recorder, task))
    }
}

/// How errors about the listener name it: `with_http_listener` here, `prometheus_listen` in
/// `telemetry::init`.
pub(crate) struct ListenField {
    pub(crate) name: &'static str,
    pub(crate) fix: &'static str,
}

fn checked(field: &'static str, bounds: &[f64]) -> Result<Vec<f64>, ConfigError> {
    if bounds.is_empty() {
        return Err(ConfigError::new(
            field,
            "no bounds given",
            "give at least one finite bound, e.g. &[0.01, 0.1, 1.0]",
        ));
    }
    if bounds.iter().any(|b| !b.is_finite()) {
        return Err(ConfigError::new(
            field,
            format!("bounds {bounds:?} hold a NaN or an infinity"),
            "give finite bounds only: +Inf is always added",
        ));
    }
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ConfigError::new(
            field,
            format!("bounds {bounds:?} are not strictly increasing"),
            "sort the bounds and remove duplicates",
        ));
    }
    Ok(bounds.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder as _;

    fn meta() -> metrics::Metadata<'static> {
        metrics::Metadata::new("t", metrics::Level::INFO, None)
    }

    #[test]
    fn bad_bounds_name_the_field() {
        for (bounds, words) in
            [(&[][..], "no bounds"), (&[1.0, f64::NAN][..], "NaN"), (&[1.0, 1.0][..], "strictly increasing")]
        {
            let e = Exporter::new().buckets("x", bounds).unwrap_err();
            assert_eq!(e.field, "buckets");
            assert!(e.problem.contains(words), "{e}");
        }
        assert_eq!(Exporter::new().default_buckets(&[2.0, 1.0]).unwrap_err().field, "default_buckets");
    }

    #[test]
    fn renders_each_kind_in_the_text_format() {
        let recorder =
            Exporter::new().global_label("region", "eu").buckets("req_seconds", &[0.1, 1.0]).unwrap().build_recorder();
        let handle = recorder.handle();
        let labels = [metrics::Label::new("pool", "a\"b")];
        recorder.describe_counter("jobs_total".into(), None, "Jobs\ndone.".into());
        let c = recorder.register_counter(&metrics::Key::from_parts("jobs_total", labels.to_vec()), &meta());
        c.increment(2);
        c.increment(3);
        let g = recorder
            .register_gauge(&metrics::Key::from_parts("depth", vec![metrics::Label::new("region", "us")]), &meta());
        g.set(1.5);
        g.decrement(0.5);
        let h = recorder.register_histogram(&metrics::Key::from_name("lat.seconds"), &meta());
        let h2 = recorder.register_histogram(&metrics::Key::from_name("req_seconds"), &meta());
        for v in [0.05, 0.1, 0.5, 7.0, f64::NAN] {
            h.record(v);
            h2.record(v);
        }
        let text = handle.render();
        let expected_counter =
            "# HELP jobs_total Jobs\\ndone.\n# TYPE jobs_total counter\njobs_total{region=\"eu\",pool=\"a\\\"b\"} 5\n";
        assert!(text.contains(expected_counter), "{text}");
        assert!(text.contains("# TYPE depth gauge\ndepth{region=\"us\"} 1\n"), "{text}");
        assert!(text.contains("req_seconds_bucket{region=\"eu\",le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("req_seconds_bucket{region=\"eu\",le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("req_seconds_bucket{region=\"eu\",le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("req_seconds_sum{region=\"eu\"} 7.65\n"), "{text}");
        assert!(text.contains("req_seconds_count{region=\"eu\"} 4\n"), "{text}");
        // `lat.seconds` has no bounds of its own: the defaults, and its name made valid.
        assert!(text.contains("lat_seconds_bucket{region=\"eu\",le=\"0.005\"} 0\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{region=\"eu\",le=\"0.05\"} 1\n"), "{text}");
        // Registering again returns the same series.
        recorder.register_counter(&metrics::Key::from_parts("jobs_total", labels.to_vec()), &meta()).increment(1);
        assert!(handle.render().contains("pool=\"a\\\"b\"} 6\n"));
    }

    #[test]
    fn install_without_a_runtime_names_the_listener() {
        let e = Exporter::new().with_http_listener(([127, 0, 0, 1], 0)).install().unwrap_err();
        assert_eq!(e.field, "with_http_listener");
    }
}
