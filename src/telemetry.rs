//! The optional one-call setup (cargo feature `telemetry`): a Prometheus `/metrics` endpoint
//! and a `tracing` subscriber that logs and exports spans over OTLP.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Reads OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES.
//! let _telemetry = poolwatch::telemetry::init(poolwatch::telemetry::TelemetryConfig::default())?;
//! # Ok(()) }
//! ```
//!
//! The core never installs anything: apps that already have a `metrics` recorder or a
//! `tracing` subscriber skip [`init`] (or turn a part off in [`TelemetryConfig`]) and may add
//! [`SpanPipeline::layer`] to their own subscriber. Span export never blocks the app: ended
//! spans go to a bounded queue; when it is full (collector down or slow) they are dropped and
//! counted in [`SpanStats::dropped`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::export::PrometheusHandle;
use opentelemetry::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tokio::task::JoinHandle;
use tracing::Subscriber;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use crate::{catalog, config::ConfigError};

/// A setup [`init`] cannot run: the error names the [`TelemetryConfig`] field and the fix.
pub type TelemetryError = ConfigError;

/// The default `/metrics` address: loopback only, so nothing is exposed by accident.
pub const DEFAULT_PROMETHEUS_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9184);

/// Targets whose own spans are never exported (the export path itself: no feedback loop).
const QUIET_TARGETS: &str = "h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off,\
                             opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (collector port 4317). Needs a multi-thread Tokio runtime to flush on shutdown.
    Grpc,
    /// HTTP/protobuf, `POST /v1/traces` (collector port 4318). Runs on its own thread.
    HttpProtobuf,
}

/// What [`init`] installs. Every field documents its default; `None` means "from the
/// standard environment variable, else the default".
#[derive(Debug)]
#[non_exhaustive]
pub struct TelemetryConfig {
    /// Where `/metrics` listens. Default `127.0.0.1:9184`. `None`: no Prometheus recorder
    /// (keep your own). No authentication, every metric of the app: bind loopback or a
    /// private interface.
    pub prometheus_listen: Option<SocketAddr>,
    /// Install the global `tracing` subscriber (logs + OTLP spans). Default `true`; `false`
    /// keeps your own (add [`SpanPipeline::layer`] to it for OTLP export).
    pub install_subscriber: bool,
    /// The OTLP endpoint, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318`
    /// (HTTP; `/v1/traces` is added when no path is given). Default: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`; when neither is set, spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// The OTLP transport. Default: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`), else HTTP/protobuf.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// `service.name` of the exported resource. Default: `OTEL_SERVICE_NAME`, else
    /// `unknown_service`. `OTEL_RESOURCE_ATTRIBUTES` is always read.
    pub service_name: Option<String>,
    /// Which log events are printed (`EnvFilter` syntax). Default: `RUST_LOG`, else `info`.
    pub log_filter: Option<String>,
    /// Which spans are exported (`EnvFilter` syntax). Default `info,poolwatch=debug`:
    /// poolwatch's spans are DEBUG when they succeed.
    pub span_filter: String,
    /// Spans waiting for export, at most. Default 2048; beyond it spans are dropped and counted.
    pub max_queue_size: usize,
    /// How often queued spans are sent. Default 5 s.
    pub export_interval: Duration,
    /// Timeout of one export, and of the final flush on drop. Default 5 s.
    pub export_timeout: Duration,
    log_writer: Option<BoxMakeWriter>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            prometheus_listen: Some(DEFAULT_PROMETHEUS_LISTEN),
            install_subscriber: true,
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            log_filter: None,
            span_filter: "info,poolwatch=debug".to_owned(),
            max_queue_size: 2048,
            export_interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(5),
            log_writer: None,
        }
    }
}

impl TelemetryConfig {
    /// Sets [`TelemetryConfig::prometheus_listen`].
    pub fn prometheus_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.prometheus_listen = addr;
        self
    }

    /// Sets [`TelemetryConfig::install_subscriber`].
    pub fn install_subscriber(mut self, install: bool) -> Self {
        self.install_subscriber = install;
        self
    }

    /// Sets [`TelemetryConfig::otlp_endpoint`] and [`TelemetryConfig::otlp_protocol`].
    pub fn otlp(mut self, endpoint: impl Into<String>, protocol: OtlpProtocol) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self.otlp_protocol = Some(protocol);
        self
    }

    /// Sets [`TelemetryConfig::service_name`].
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Sets [`TelemetryConfig::log_filter`].
    pub fn log_filter(mut self, filter: impl Into<String>) -> Self {
        self.log_filter = Some(filter.into());
        self
    }

    /// Sets [`TelemetryConfig::span_filter`].
    pub fn span_filter(mut self, filter: impl Into<String>) -> Self {
        self.span_filter = filter.into();
        self
    }

    /// Sets [`TelemetryConfig::max_queue_size`].
    pub fn max_queue_size(mut self, spans: usize) -> Self {
        self.max_queue_size = spans;
        self
    }

    /// Sets [`TelemetryConfig::export_interval`].
    pub fn export_interval(mut self, every: Duration) -> Self {
        self.export_interval = every;
        self
    }

    /// Sets [`TelemetryConfig::export_timeout`].
    pub fn export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = timeout;
        self
    }

    /// Where log lines go. Default stderr.
    pub fn log_writer(mut self, writer: BoxMakeWriter) -> Self {
        self.log_writer = Some(writer);
        self
    }

    /// Whether spans are exported: an endpoint is configured here or in the environment.
    pub fn otlp_enabled(&self) -> bool {
        if env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none") {
            return false;
        }
        self.otlp_endpoint.is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
    }

    fn protocol(&self) -> Result<OtlpProtocol, TelemetryError> {
        if let Some(p) = self.otlp_protocol {
            return Ok(p);
        }
        let value = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
        match value.as_deref() {
            None | Some("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
            Some("grpc") => Ok(OtlpProtocol::Grpc),
            Some(other) => Err(ConfigError::new(
                "otlp_protocol",
                format!("OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported"),
                "use `grpc` or `http/protobuf`",
            )),
        }
    }

    fn validate(&self) -> Result<(), TelemetryError> {
        if self.max_queue_size == 0 {
            return Err(ConfigError::new("max_queue_size", "is zero", "use a positive size (default 2048)"));
        }
        for (field, value) in [("export_interval", self.export_interval), ("export_timeout", self.export_timeout)] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "is zero", "use a positive duration (see the field's default)"));
            }
        }
        Ok(())
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Installs the Prometheus recorder with its `/metrics` listener and the global `tracing`
/// subscriber (fmt logs + OTLP spans), as configured. Must be called inside a Tokio runtime.
/// Keep the guard: dropping it flushes the queued spans and stops the listener.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    config.validate()?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        ConfigError::new("runtime", "no Tokio runtime is running", "call telemetry::init inside a Tokio runtime")
    })?;
    let _entered = runtime.enter();
    if config.install_subscriber && tracing::dispatcher::has_been_set() {
        return Err(ConfigError::new(
            "install_subscriber",
            "a global tracing subscriber is already installed",
            "set install_subscriber(false) and add SpanPipeline::layer() to your subscriber",
        ));
    }
    let prometheus = match config.prometheus_listen {
        Some(addr) => Some(prometheus(addr)?),
        None => None,
    };
    let spans =
        if config.install_subscriber && config.otlp_enabled() { Some(SpanPipeline::start(&config)?) } else { None };
    let (handle, listener) = match prometheus {
        Some((recorder, listener)) => {
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| {
                listener.abort();
                ConfigError::new(
                    "prometheus_listen",
                    "a global metrics recorder is already installed",
                    "set prometheus_listen(None) to keep your own recorder",
                )
            })?;
            catalog::describe();
            (Some(handle), Some(listener))
        }
        None => (None, None),
    };
    if config.install_subscriber {
        let log_filter = config.log_filter.clone().or_else(|| env("RUST_LOG")).unwrap_or_else(|| "info".to_owned());
        let log_filter = EnvFilter::try_new(&log_filter).map_err(|e| {
            ConfigError::new(
                "log_filter",
                format!("{log_filter:?}: {e}"),
                "use EnvFilter syntax, e.g. `info,poolwatch=debug`",
            )
        })?;
        let ansi = config.log_writer.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let writer = config.log_writer.unwrap_or_else(|| BoxMakeWriter::new(std::io::stderr));
        let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer).with_filter(log_filter);
        let otlp = spans.as_ref().map(|p| p.layer()).transpose()?;
        let subscriber = Registry::default().with(fmt).with(otlp).with(crate::acquire::bare::sqlx_acquire_layer());
        tracing::subscriber::set_global_default(subscriber).map_err(|_| {
            ConfigError::new(
                "install_subscriber",
                "a global tracing subscriber is already installed",
                "set install_subscriber(false) and add SpanPipeline::layer() to your subscriber",
            )
        })?;
    }
    Ok(TelemetryGuard { prometheus: handle, listener, spans })
}

/// Builds the recorder with poolwatch's histogram buckets and starts the `/metrics` listener.
fn prometheus(addr: SocketAddr) -> Result<(crate::export::PrometheusRecorder, JoinHandle<()>), TelemetryError> {
    let field = crate::export::ListenField {
        name: "prometheus_listen",
        fix: "free the port or choose another with prometheus_listen(Some(addr)); None keeps your own recorder",
    };
    crate::export::Exporter::new().serve_on(addr, field)
}

/// What [`init`] installed. Dropping it flushes the queued spans (bounded by
/// `export_timeout`) and stops the `/metrics` listener; the recorder and subscriber stay
/// installed (they are global).
#[derive(Debug)]
pub struct TelemetryGuard {
    prometheus: Option<PrometheusHandle>,
    listener: Option<JoinHandle<()>>,
    spans: Option<SpanPipeline>,
}

impl TelemetryGuard {
    /// The installed recorder's handle (renders the `/metrics` text), if [`init`] installed one.
    pub fn prometheus(&self) -> Option<&PrometheusHandle> {
        self.prometheus.as_ref()
    }

    /// The span export figures, if spans are exported.
    pub fn span_stats(&self) -> Option<SpanStats> {
        self.spans.as_ref().map(SpanPipeline::stats)
    }

    /// Sends the queued spans now (blocks up to `export_timeout`).
    pub fn flush(&self) {
        if let Some(spans) = &self.spans {
            spans.flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
        if let Some(spans) = self.spans.take() {
            spans.shutdown();
        }
    }
}

/// Span export figures (counts since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpanStats {
    /// Spans waiting in the queue now (at most `max_queue_size`).
    pub queued: usize,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans in batches the collector refused or never answered (down, slow, unreachable).
    pub failed: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counts {
    queued: AtomicUsize,
    exported: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    failing: AtomicBool,
}

/// The OTLP span export: a batch processor behind a bounded queue, on its own thread.
/// [`init`] builds one; with your own subscriber, build it with [`SpanPipeline::start`] and
/// add [`SpanPipeline::layer`].
#[derive(Debug)]
pub struct SpanPipeline {
    provider: SdkTracerProvider,
    counts: Arc<Counts>,
    span_filter: String,
    timeout: Duration,
}

impl SpanPipeline {
    /// Starts the exporter described by `config` (endpoint, protocol, queue, resource). A
    /// gRPC exporter must be started inside a Tokio runtime.
    pub fn start(config: &TelemetryConfig) -> Result<SpanPipeline, TelemetryError> {
        config.validate()?;
        let exporter = exporter(config)?;
        let counts = Arc::new(Counts::default());
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size)
            .with_scheduled_delay(config.export_interval)
            .build();
        let processor = BoundedProcessor {
            inner: BatchSpanProcessor::builder(CountingExporter { inner: exporter, counts: Arc::clone(&counts) })
                .with_batch_config(batch)
                .build(),
            counts: Arc::clone(&counts),
            capacity: config.max_queue_size,
        };
        let mut resource = Resource::builder();
        if let Some(name) = &config.service_name {
            resource = resource.with_service_name(name.clone());
        }
        let provider =
            SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build()).build();
        Ok(SpanPipeline { provider, counts, span_filter: config.span_filter.clone(), timeout: config.export_timeout })
    }

    /// The `tracing-opentelemetry` layer feeding this pipeline, filtered by `span_filter`.
    pub fn layer<S>(&self) -> Result<impl Layer<S> + use<S>, TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let directives = format!("{},{QUIET_TARGETS}", self.span_filter);
        let filter = EnvFilter::try_new(&directives).map_err(|e| {
            ConfigError::new(
                "span_filter",
                format!("{:?}: {e}", self.span_filter),
                "use EnvFilter syntax, e.g. `info,poolwatch=debug`",
            )
        })?;
        let tracer = self.provider.tracer("poolwatch");
        Ok(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter))
    }

    /// The export figures so far.
    pub fn stats(&self) -> SpanStats {
        let c = &self.counts;
        SpanStats {
            queued: c.queued.load(Ordering::Relaxed),
            exported: c.exported.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Sends the queued spans now (blocks up to the export timeout).
    pub fn flush(&self) {
        let _ = blocking(|| self.provider.force_flush());
    }

    /// Flushes and stops the exporter (blocks up to the export timeout), then logs how many
    /// spans were dropped, if any.
    pub fn shutdown(self) {
        let timeout = self.timeout;
        let _ = blocking(|| self.provider.shutdown_with_timeout(timeout));
        let stats = self.stats();
        if stats.dropped > 0 || stats.failed > 0 {
            tracing::warn!(
                dropped = stats.dropped,
                failed = stats.failed,
                exported = stats.exported,
                "poolwatch dropped spans: the export queue was full or the collector failed"
            );
        }
    }
}

/// Runs a blocking flush without stalling the other tasks of a multi-thread runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn exporter(config: &TelemetryConfig) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let built = match config.protocol()? {
        OtlpProtocol::Grpc => {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(ConfigError::new(
                    "otlp_protocol",
                    "the gRPC exporter needs a Tokio runtime",
                    "start it inside a Tokio runtime, or use OtlpProtocol::HttpProtobuf",
                ));
            }
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(config.export_timeout);
            if let Some(endpoint) = &config.otlp_endpoint {
                b = b.with_endpoint(endpoint.clone());
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(config.export_timeout);
            if let Some(endpoint) = &config.otlp_endpoint {
                b = b.with_endpoint(http_traces_url(endpoint));
            }
            b.build()
        }
    };
    built.map_err(|e| {
        ConfigError::new(
            "otlp_endpoint",
            e.to_string(),
            "set an http:// URL, e.g. http://127.0.0.1:4318 (HTTP) or :4317 (gRPC)",
        )
    })
}

/// `http://host:4318` → `http://host:4318/v1/traces`; a URL with a path is kept.
fn http_traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest).contains('/');
    if has_path { endpoint.to_owned() } else { format!("{trimmed}/v1/traces") }
}

/// Bounds the queue exactly: a span enters the batch processor only while fewer than
/// `capacity` are waiting; otherwise it is dropped and counted (never blocks).
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    counts: Arc<Counts>,
    capacity: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let reserved = self
            .counts
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < self.capacity).then_some(q + 1));
        if reserved.is_ok() {
            self.inner.on_end(span);
        } else {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts what the collector accepted or refused, and logs once when export starts or
/// stops failing (not once per batch).
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    counts: Arc<Counts>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let _ = self.counts.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)));
        let result = self.inner.export(batch).await;
        let c = &self.counts;
        match &result {
            Ok(()) => {
                c.exported.fetch_add(n as u64, Ordering::Relaxed);
                if c.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("poolwatch OTLP span export recovered");
                }
            }
            Err(e) => {
                c.failed.fetch_add(n as u64, Ordering::Relaxed);
                if !c.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        dropped = c.dropped.load(Ordering::Relaxed),
                        "poolwatch OTLP span export failing; spans are lost until the collector answers \
                         (the app is not slowed: the queue is bounded)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoint_gets_the_traces_path_only_when_it_has_none() {
        assert_eq!(http_traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_traces_url("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/custom/v1/traces"), "http://c:4318/custom/v1/traces");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (TelemetryConfig::default().max_queue_size(0), "max_queue_size"),
            (TelemetryConfig::default().export_interval(Duration::ZERO), "export_interval"),
            (TelemetryConfig::default().export_timeout(Duration::ZERO), "export_timeout"),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field);
        }
        assert_eq!(TelemetryConfig::default().prometheus_listen, Some(DEFAULT_PROMETHEUS_LISTEN));
        assert!(DEFAULT_PROMETHEUS_LISTEN.ip().is_loopback());
    }
}
