//! A `metrics` recorder built for cheap scrapes: each series' name and labels are sanitised and
//! written out once, when the series is registered, so rendering `/metrics` only appends
//! numbers. (metrics-exporter-prometheus rebuilds and re-escapes every label set on every
//! scrape: `benches/render_cost.rs` shows both side by side.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[cfg(test)]
use metrics::Label;
use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{Registry, Storage};

use super::{render, retire};

/// The Prometheus type of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Family {
    Counter,
    Gauge,
    Histogram,
}

impl Family {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Family::Counter => "counter",
            Family::Gauge => "gauge",
            Family::Histogram => "histogram",
        }
    }
}

/// A counter and its rendered `name{labels}`.
pub(super) struct CounterSeries {
    pub(super) line: Box<str>,
    pub(super) value: AtomicU64,
}

impl CounterFn for CounterSeries {
    fn increment(&self, value: u64) {
        self.value.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.value.fetch_max(value, Ordering::Relaxed);
    }
}

/// A gauge (an `f64` in bits) and its rendered `name{labels}`.
pub(super) struct GaugeSeries {
    pub(super) line: Box<str>,
    pub(super) bits: AtomicU64,
}

impl GaugeFn for GaugeSeries {
    fn increment(&self, value: f64) {
        add_f64(&self.bits, value);
    }

    fn decrement(&self, value: f64) {
        add_f64(&self.bits, -value);
    }

    fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }
}

fn add_f64(bits: &AtomicU64, delta: f64) {
    let _ = bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + delta).to_bits()));
}

/// A histogram with fixed bounds: recording is a search and two atomic adds, and memory stays
/// the same however many samples arrive.
pub(super) struct HistogramSeries {
    pub(super) bounds: Arc<[f64]>,
    /// Per bound, not cumulative.
    pub(super) buckets: Box<[AtomicU64]>,
    pub(super) count: AtomicU64,
    pub(super) sum: AtomicU64,
    /// `name_bucket{labels,le="…"}` per bound and for `+Inf`, then `name_sum{…}`, `name_count{…}`.
    pub(super) lines: Box<[Box<str>]>,
}

impl HistogramFn for HistogramSeries {
    fn record(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        // The count first and the bucket with Release: a render that sees the bucket (Acquire)
        // then sees the count, so no bucket ever exceeds `+Inf`.
        self.count.fetch_add(1, Ordering::Relaxed);
        add_f64(&self.sum, value);
        let i = self.bounds.partition_point(|b| *b < value);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Release);
        }
    }
}

#[derive(Clone)]
pub(super) enum Series {
    Counter(Arc<CounterSeries>),
    Gauge(Arc<GaugeSeries>),
    Histogram(Arc<HistogramSeries>),
}

impl Series {
    /// The series' identity: the address of its shared state.
    pub(super) fn id(&self) -> usize {
        match self {
            Series::Counter(c) => Arc::as_ptr(c) as *const () as usize,
            Series::Gauge(g) => Arc::as_ptr(g) as *const () as usize,
            Series::Histogram(h) => Arc::as_ptr(h) as *const () as usize,
        }
    }
}

/// Every series by family, in name order.
pub(super) type Families = BTreeMap<(String, Family), Arc<Vec<Series>>>;
/// Sanitised name → escaped description.
pub(super) type Help = HashMap<String, String>;

/// Every series by family and the families' descriptions: what a render reads. A render takes
/// a snapshot (two `Arc` clones) and renders outside the locks; a registration meanwhile copies
/// what it changes (`Arc::make_mut`), so a scrape never blocks a registration.
pub(super) struct Index {
    families: Mutex<Arc<Families>>,
    help: Mutex<Arc<Help>>,
    pub(super) layout: Layout,
}

/// What the builder fixed: global labels and histogram bounds.
pub(super) struct Layout {
    pub(super) global_labels: Vec<(String, String)>,
    pub(super) buckets: HashMap<String, Arc<[f64]>>,
    pub(super) default_buckets: Arc<[f64]>,
}

impl Index {
    pub(super) fn new(layout: Layout) -> Self {
        Index { families: Mutex::default(), help: Mutex::default(), layout }
    }

    /// What a render reads, as of now.
    pub(super) fn snapshot(&self) -> (Arc<Help>, Arc<Families>) {
        let help = Arc::clone(&self.help.lock().unwrap_or_else(PoisonError::into_inner));
        let families = Arc::clone(&self.families.lock().unwrap_or_else(PoisonError::into_inner));
        (help, families)
    }

    fn add(&self, name: String, family: Family, series: Series) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::make_mut(Arc::make_mut(&mut families).entry((name, family)).or_default()).push(series);
    }

    /// Takes out the series whose [`Series::id`] is in `ids`, and the families left empty.
    pub(super) fn remove(&self, ids: &HashSet<usize>) {
        if ids.is_empty() {
            return;
        }
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::make_mut(&mut families).retain(|_, series| {
            if series.iter().any(|s| ids.contains(&s.id())) {
                Arc::make_mut(series).retain(|s| !ids.contains(&s.id()));
            }
            !series.is_empty()
        });
    }

    fn describe(&self, key: &KeyName, description: &str) {
        let name = render::metric_name(key.as_str());
        let help = render::escape_help(description);
        Arc::make_mut(&mut self.help.lock().unwrap_or_else(PoisonError::into_inner)).insert(name, help);
    }

    /// `k="v",…` for the key's labels after the global ones (a key's label wins over a global
    /// one of the same name).
    fn labels(&self, key: &Key) -> String {
        let mut pairs: Vec<(&str, &str)> =
            self.layout.global_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for label in key.labels() {
            match pairs.iter_mut().find(|(k, _)| *k == label.key()) {
                Some(pair) => pair.1 = label.value(),
                None => pairs.push((label.key(), label.value())),
            }
        }
        let mut out = String::new();
        for (i, (k, v)) in pairs.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            render::push_label(&mut out, k, v);
        }
        out
    }
}

/// Joins a name, an optional suffix and `{labels[,extra]}`.
fn line(name: &str, suffix: &str, labels: &str, extra: Option<&str>) -> Box<str> {
    let mut s = String::with_capacity(name.len() + suffix.len() + labels.len() + 24);
    s.push_str(name);
    s.push_str(suffix);
    match (labels.is_empty(), extra) {
        (true, None) => {}
        (true, Some(e)) => {
            let _ = write!(s, "{{{e}}}");
        }
        (false, None) => {
            let _ = write!(s, "{{{labels}}}");
        }
        (false, Some(e)) => {
            let _ = write!(s, "{{{labels},{e}}}");
        }
    }
    s.into_boxed_str()
}

impl Storage<Key> for Index {
    type Counter = Arc<CounterSeries>;
    type Gauge = Arc<GaugeSeries>;
    type Histogram = Arc<HistogramSeries>;

    fn counter(&self, key: &Key) -> Self::Counter {
        let name = render::metric_name(key.name());
        let series =
            Arc::new(CounterSeries { line: line(&name, "", &self.labels(key), None), value: AtomicU64::new(0) });
        self.add(name, Family::Counter, Series::Counter(series.clone()));
        series
    }

    fn gauge(&self, key: &Key) -> Self::Gauge {
        let name = render::metric_name(key.name());
        let series = Arc::new(GaugeSeries {
            line: line(&name, "", &self.labels(key), None),
            bits: AtomicU64::new(0f64.to_bits()),
        });
        self.add(name, Family::Gauge, Series::Gauge(series.clone()));
        series
    }

    fn histogram(&self, key: &Key) -> Self::Histogram {
        let name = render::metric_name(key.name());
        let labels = self.labels(key);
        let bounds = self.layout.buckets.get(key.name()).unwrap_or(&self.layout.default_buckets).clone();
        let mut lines: Vec<Box<str>> =
            bounds.iter().map(|b| line(&name, "_bucket", &labels, Some(&format!("le=\"{b}\"")))).collect();
        lines.push(line(&name, "_bucket", &labels, Some("le=\"+Inf\"")));
        lines.push(line(&name, "_sum", &labels, None));
        lines.push(line(&name, "_count", &labels, None));
        let series = Arc::new(HistogramSeries {
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
            lines: lines.into_boxed_slice(),
        });
        self.add(name, Family::Histogram, Series::Histogram(series.clone()));
        series
    }
}

/// The recorder: install it with [`Exporter::install`](super::Exporter::install), or hand it
/// to `metrics::set_global_recorder` yourself after taking its [`handle`](Self::handle).
pub struct PrometheusRecorder {
    pub(super) inner: Arc<Inner>,
}

/// The registry (handles by key) and the index (what a render reads) hold each series; a
/// handle the app or a watch keeps is a third holder. Also the pools whose series are to go.
pub(super) struct Inner {
    pub(super) registry: Registry<Key, Arc<Index>>,
    pub(super) index: Arc<Index>,
    pub(super) retired: Mutex<retire::Retired>,
}

impl std::fmt::Debug for PrometheusRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusRecorder").finish_non_exhaustive()
    }
}

impl PrometheusRecorder {
    pub(super) fn new(layout: Layout) -> Self {
        let index = Arc::new(Index::new(layout));
        let inner = Arc::new(Inner { registry: Registry::new(index.clone()), index, retired: Mutex::default() });
        retire::subscribe(&inner);
        PrometheusRecorder { inner }
    }

    /// Renders into any writer (tests stall one mid-render).
    #[cfg(test)]
    fn render_into_writer(&self, out: &mut impl std::fmt::Write) {
        render::render(&self.inner.index, out);
    }

    /// A handle that renders what this recorder holds.
    pub fn handle(&self) -> PrometheusHandle {
        PrometheusHandle { inner: Arc::clone(&self.inner) }
    }
}

impl metrics::Recorder for PrometheusRecorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        self.inner.registry.get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        self.inner.registry.get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        self.inner.registry.get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Renders the recorder's series in the Prometheus text format (version 0.0.4), families in
/// name order. Cheap to clone; serve it from your own HTTP route if you do not use
/// [`Exporter::with_http_listener`](super::Exporter::with_http_listener).
#[derive(Clone)]
pub struct PrometheusHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PrometheusHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusHandle").finish_non_exhaustive()
    }
}

impl PrometheusHandle {
    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    /// Appends the exposition to `out` (reuse one buffer between scrapes). Series of pools
    /// whose watch has ended, and that nothing holds any more, are taken out first (at most
    /// once a second).
    pub fn render_into(&self, out: &mut String) {
        retire::sweep_if_due(&self.inner);
        render::render(&self.inner.index, out);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use metrics::Recorder as _;

    use super::*;

    /// A render's output that stops at its first write until told to go on (or 30 s passed).
    struct Stalled {
        started: Option<mpsc::Sender<()>>,
        go: mpsc::Receiver<()>,
        went_on_when_told: Option<bool>,
    }

    impl std::fmt::Write for Stalled {
        fn write_str(&mut self, _: &str) -> std::fmt::Result {
            if let Some(started) = self.started.take() {
                let _ = started.send(());
                self.went_on_when_told = Some(self.go.recv_timeout(Duration::from_secs(30)).is_ok());
            }
            Ok(())
        }
    }

    fn meta() -> Metadata<'static> {
        Metadata::new("t", metrics::Level::INFO, None)
    }

    #[test]
    fn a_registration_completes_during_a_slow_render() {
        let recorder = Arc::new(crate::export::Exporter::new().build_recorder());
        recorder.register_counter(&Key::from_name("before_total"), &meta()).increment(1);
        let (started, render_started) = mpsc::channel();
        let (go, gone) = mpsc::channel();
        let r = Arc::clone(&recorder);
        let render = std::thread::spawn(move || {
            let mut out = Stalled { started: Some(started), go: gone, went_on_when_told: None };
            r.render_into_writer(&mut out);
            out.went_on_when_told
        });
        render_started.recv().expect("the render started");
        // While the render is stalled: a new family, a new series of an old one, a description.
        recorder.describe_gauge("during".into(), None, "Registered during a render.".into());
        recorder.register_gauge(&Key::from_name("during"), &meta()).set(1.0);
        recorder.register_counter(&Key::from_parts("before_total", vec![Label::new("k", "v")]), &meta()).increment(1);
        let _ = go.send(());
        let went_on = render.join().expect("render thread");
        assert_eq!(went_on, Some(true), "the registrations waited for the render to end");
        let text = recorder.handle().render();
        assert!(text.contains("# HELP during Registered during a render.\n") && text.contains("during 1\n"), "{text}");
    }
}
