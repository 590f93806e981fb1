//! poolwatch's metrics as OpenTelemetry instruments (feature `otel-metrics`): a `metrics`
//! recorder that creates each instrument under its semantic-convention name and unit, with the
//! catalog's histogram bounds, and turns labels into attributes. A generic `metrics` → OTel
//! bridge would keep the Prometheus names (`db_client_connection_wait_time_seconds`) and give
//! every seconds histogram the SDK's default bounds (0 to 10,000, meant for milliseconds), so
//! every observation would land in the first bucket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{Key, KeyName, Metadata, SharedString, Unit};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

use crate::catalog::{self, Kind, Metric};
use crate::config::Detail;

/// The OpenTelemetry name and unit of a catalog metric: the semantic conventions' own for
/// `db.client.connection.*`; for poolwatch's, `poolwatch.` and the rest of the name, its unit
/// suffix moved to the unit (`_seconds` → `s`, `_bytes` → `By`) and `_total` dropped from
/// counters (no gauge shares a counter's base name: `tests/names.rs`). Counts get an annotation
/// (`{connection}`) when the name ends in a plural noun, else `1`. An OTLP → Prometheus
/// translation gives back the catalog's name.
pub fn otel_name(metric: &Metric) -> (String, String) {
    /// The `db.client.connection.*` semantic conventions (v1.27 and later).
    const SEMCONV: &[(&str, &str, &str)] = &[
        (catalog::CONNECTION_COUNT.name, "db.client.connection.count", "{connection}"),
        (catalog::CONNECTION_MAX.name, "db.client.connection.max", "{connection}"),
        (catalog::CONNECTION_IDLE_MIN.name, "db.client.connection.idle.min", "{connection}"),
        (catalog::PENDING_REQUESTS.name, "db.client.connection.pending_requests", "{request}"),
        (catalog::TIMEOUTS.name, "db.client.connection.timeouts", "{timeout}"),
        (catalog::WAIT_TIME.name, "db.client.connection.wait_time", "s"),
        (catalog::USE_TIME.name, "db.client.connection.use_time", "s"),
        (catalog::CREATE_TIME.name, "db.client.connection.create_time", "s"),
    ];
    if let Some((_, name, unit)) = SEMCONV.iter().find(|(prometheus, _, _)| *prometheus == metric.name) {
        return ((*name).to_owned(), (*unit).to_owned());
    }
    let rest = metric.name.strip_prefix("poolwatch_").unwrap_or(metric.name);
    let rest = match rest.strip_suffix("_total") {
        Some(base) if metric.kind == Kind::Counter => base,
        _ => rest,
    };
    let (rest, unit) = if let Some(base) = rest.strip_suffix("_seconds") {
        (base, "s".to_owned())
    } else if let Some(base) = rest.strip_suffix("_bytes") {
        (base, "By".to_owned())
    } else {
        (rest, count_unit(rest.strip_suffix("_total").unwrap_or(rest)))
    };
    (format!("poolwatch.{rest}"), unit)
}

/// `{connection}` for a name ending in `connections`, `1` for one that does not end in a
/// plural noun (`census_up`, `client_gap`).
fn count_unit(name: &str) -> String {
    let last = name.rsplit('_').next().unwrap_or(name);
    let singular = if let Some(stem) = last.strip_suffix("sses") {
        format!("{stem}ss")
    } else if let Some(stem) = last.strip_suffix("ies") {
        format!("{stem}y")
    } else if let Some(stem) = last.strip_suffix('s').filter(|s| !s.ends_with('s') && !s.is_empty()) {
        stem.to_owned()
    } else {
        return "1".to_owned();
    };
    format!("{{{singular}}}")
}

/// The OpenTelemetry attribute for a label key: the semantic conventions' for the pool name
/// and connection state, the key itself for poolwatch's own (`state`, `cause`, `listener`, ...).
pub fn otel_attribute(label: &str) -> &str {
    match label {
        catalog::POOL_NAME => "db.client.connection.pool.name",
        catalog::CONNECTION_STATE => "db.client.connection.state",
        other => other,
    }
}

/// A `metrics` recorder that records into OpenTelemetry instruments of `meter`: poolwatch's
/// metrics under their semantic-convention names and units ([`otel_name`]) with the catalog's
/// histogram bounds ([`catalog::buckets`]), labels as attributes ([`otel_attribute`]). Other
/// metrics of the app keep the name and unit they were described with.
///
/// ```no_run
/// # fn run(meter: opentelemetry::metrics::Meter) {
/// // `meter`: your SDK `MeterProvider`'s `provider.meter("poolwatch")`.
/// let recorder = poolwatch::export::otel::OtelRecorder::new(meter);
/// metrics::set_global_recorder(recorder).expect("no other recorder installed");
/// # }
/// ```
pub struct OtelRecorder {
    meter: Meter,
    detail: Detail,
    described: Mutex<HashMap<String, (Option<Unit>, SharedString)>>,
    counters: Mutex<HashMap<Key, Arc<CounterSeries>>>,
    gauges: Mutex<HashMap<Key, Arc<GaugeSeries>>>,
    histograms: Mutex<HashMap<Key, Arc<HistogramSeries>>>,
}

impl std::fmt::Debug for OtelRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelRecorder").field("detail", &self.detail).finish_non_exhaustive()
    }
}

/// What an instrument is created with.
struct Spec {
    name: String,
    /// Empty when unknown (OTel's default).
    unit: String,
    help: String,
    bounds: Option<Vec<f64>>,
}

impl OtelRecorder {
    /// Records into `meter`, with the histogram bounds of [`Detail::Standard`].
    pub fn new(meter: Meter) -> Self {
        OtelRecorder {
            meter,
            detail: Detail::Standard,
            described: Mutex::default(),
            counters: Mutex::default(),
            gauges: Mutex::default(),
            histograms: Mutex::default(),
        }
    }

    /// The histogram bounds of `detail` (`Detail::Full`: [`catalog::SECONDS_BUCKETS`]).
    pub fn detail(mut self, detail: Detail) -> Self {
        self.detail = detail;
        self
    }

    /// The instrument of `name` (as recorded): from the catalog, else as described.
    fn spec(&self, name: &str, kind: Kind) -> Spec {
        match catalog::ALL.iter().find(|m| m.name == name && m.kind == kind) {
            Some(m) => {
                let (otel, unit) = otel_name(m);
                let bounds = catalog::buckets(m.name, self.detail).map(<[f64]>::to_vec);
                Spec { name: otel, unit, help: m.help.to_owned(), bounds }
            }
            None => {
                let described = self.described.lock().unwrap_or_else(PoisonError::into_inner);
                let (unit, help) = described.get(name).cloned().unwrap_or((None, SharedString::const_str("")));
                Spec {
                    name: name.to_owned(),
                    unit: unit.map(|u| ucum(u).to_owned()).unwrap_or_default(),
                    help: help.to_string(),
                    bounds: None,
                }
            }
        }
    }

    fn describe(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        let mut described = self.described.lock().unwrap_or_else(PoisonError::into_inner);
        described.insert(key.as_str().to_owned(), (unit, description));
    }
}

/// A `metrics` unit as UCUM (what OTel units are written in).
fn ucum(unit: Unit) -> &'static str {
    match unit {
        Unit::Count => "1",
        Unit::Percent => "%",
        Unit::Seconds => "s",
        Unit::Milliseconds => "ms",
        Unit::Microseconds => "us",
        Unit::Nanoseconds => "ns",
        Unit::Tebibytes => "TiBy",
        Unit::Gibibytes => "GiBy",
        Unit::Mebibytes => "MiBy",
        Unit::Kibibytes => "KiBy",
        Unit::Bytes => "By",
        Unit::TerabitsPerSecond => "Tbit/s",
        Unit::GigabitsPerSecond => "Gbit/s",
        Unit::MegabitsPerSecond => "Mbit/s",
        Unit::KilobitsPerSecond => "kbit/s",
        Unit::BitsPerSecond => "bit/s",
        Unit::CountPerSecond => "1/s",
    }
}

/// A key's labels as attributes.
fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels().map(|l| KeyValue::new(otel_attribute(l.key()).to_owned(), l.value().to_owned())).collect()
}

/// The series of `key` in `map`, made by `make` the first time: one handle per series, so
/// gauge increments and counter totals add up across every handle registered for it. (The
/// SDK returns the same instrument for the same name, so making one per series is cheap.)
fn series<T>(map: &Mutex<HashMap<Key, Arc<T>>>, key: &Key, make: impl FnOnce() -> T) -> Arc<T> {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(map.entry(key.clone()).or_insert_with(|| Arc::new(make())))
}

impl metrics::Recorder for OtelRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(series(&self.counters, key, || {
            let spec = self.spec(key.name(), Kind::Counter);
            let b = self.meter.u64_counter(spec.name).with_description(spec.help);
            let instrument = b.with_unit(spec.unit).build();
            CounterSeries { instrument, attributes: attributes(key), total: AtomicU64::new(0) }
        }))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(series(&self.gauges, key, || {
            let spec = self.spec(key.name(), Kind::Gauge);
            let b = self.meter.f64_gauge(spec.name).with_description(spec.help);
            let instrument = b.with_unit(spec.unit).build();
            GaugeSeries { instrument, attributes: attributes(key), value: AtomicU64::new(0f64.to_bits()) }
        }))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::from_arc(series(&self.histograms, key, || {
            let spec = self.spec(key.name(), Kind::Histogram);
            let b = self.meter.f64_histogram(spec.name).with_description(spec.help).with_unit(spec.unit);
            let instrument = match spec.bounds {
                Some(bounds) => b.with_boundaries(bounds).build(),
                None => b.build(),
            };
            HistogramSeries { instrument, attributes: attributes(key) }
        }))
    }
}

/// A counter series; `total` turns `metrics`' absolute values into the deltas OTel adds.
struct CounterSeries {
    instrument: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    total: AtomicU64,
}

impl metrics::CounterFn for CounterSeries {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
        self.instrument.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.total.fetch_max(value, Ordering::Relaxed);
        // Registered at 0 too: the series exists from the start, as on Prometheus.
        self.instrument.add(value.saturating_sub(before), &self.attributes);
    }
}

/// A gauge series; `value` (f64 bits) turns increments into the values OTel records.
struct GaugeSeries {
    instrument: opentelemetry::metrics::Gauge<f64>,
    attributes: Vec<KeyValue>,
    value: AtomicU64,
}

impl GaugeSeries {
    fn change(&self, by: f64) {
        let mut now = 0.0;
        let _ = self.value.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            now = f64::from_bits(bits) + by;
            Some(now.to_bits())
        });
        self.instrument.record(now, &self.attributes);
    }
}

impl metrics::GaugeFn for GaugeSeries {
    fn increment(&self, value: f64) {
        self.change(value);
    }

    fn decrement(&self, value: f64) {
        self.change(-value);
    }

    fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
        self.instrument.record(value, &self.attributes);
    }
}

struct HistogramSeries {
    instrument: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl metrics::HistogramFn for HistogramSeries {
    fn record(&self, value: f64) {
        self.instrument.record(value, &self.attributes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every catalog metric gets a unique OTel name in a known namespace, with a UCUM unit
    /// (`s`, `By`, `1` or an `{annotation}`), and no Prometheus suffix left in it.
    #[test]
    fn every_catalog_metric_maps_to_a_unique_otel_name_and_unit() {
        let mut seen = std::collections::HashMap::new();
        for m in catalog::ALL {
            let (name, unit) = otel_name(m);
            println!("{:55} {:?} → {name} [{unit}]", m.name, m.kind);
            if let Some(other) = seen.insert(name.clone(), m.name) {
                panic!("{} and {other} both map to {name}", m.name);
            }
            assert!(name.starts_with("db.client.connection.") || name.starts_with("poolwatch."), "{name}");
            assert!(!name.contains("_seconds") && !name.contains("_bytes"), "{name}: unit suffix left");
            let annotation = unit.strip_prefix('{').and_then(|u| u.strip_suffix('}'));
            let valid = ["s", "By", "1"].contains(&unit.as_str())
                || annotation.is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(valid, "{name}: unit {unit}");
            if m.unit == Unit::Seconds || m.kind == Kind::Histogram {
                assert_eq!(unit, "s", "{}", m.name);
            }
            if m.name.starts_with("db_client_connection_") {
                assert!(name.starts_with("db.client.connection."), "{} has no semconv name", m.name);
            }
        }
        let named = |m: &Metric| otel_name(m);
        assert_eq!(named(&catalog::CONNECTION_COUNT), ("db.client.connection.count".into(), "{connection}".into()));
        assert_eq!(named(&catalog::WAIT_TIME), ("db.client.connection.wait_time".into(), "s".into()));
        assert_eq!(named(&catalog::CONNECTION_IDLE_MIN).0, "db.client.connection.idle.min");
        assert_eq!(named(&catalog::SERVER_CONNECTIONS), ("poolwatch.server_connections".into(), "{connection}".into()));
        assert_eq!(named(&catalog::CENSUS_DURATION), ("poolwatch.census_duration".into(), "s".into()));
        assert_eq!(
            named(&catalog::LISTENER_RECONNECTS),
            ("poolwatch.listener_reconnects".into(), "{reconnect}".into())
        );
        assert_eq!(named(&catalog::SERVER_ADDRESSES).1, "{address}");
        assert_eq!(named(&catalog::CENSUS_UP).1, "1");
        assert_eq!(named(&catalog::LEAK_SUSPECTS).0, "poolwatch.leak_suspect_connections");
        assert_eq!(named(&catalog::LEAK_SUSPECTS_TOTAL).0, "poolwatch.leak_suspects");
    }

    #[test]
    fn pool_and_state_labels_become_semconv_attributes() {
        assert_eq!(otel_attribute(catalog::POOL_NAME), "db.client.connection.pool.name");
        assert_eq!(otel_attribute(catalog::CONNECTION_STATE), "db.client.connection.state");
        assert_eq!(otel_attribute(catalog::CAUSE), "cause");
    }
}
