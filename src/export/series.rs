//! The series a recorder holds and the index a render reads: each series' name and labels are
//! sanitised and written out once, when the series is registered, so rendering `/metrics`
//! only appends numbers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use metrics::{CounterFn, GaugeFn, HistogramFn, Key, KeyName};
use metrics_util::registry::{Registry, Storage};

use super::text;

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

    pub(super) fn describe(&self, key: &KeyName, description: &str) {
        let name = text::metric_name(key.as_str());
        let help = text::escape_help(description);
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
            text::push_label(&mut out, k, v);
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
        let name = text::metric_name(key.name());
        let series =
            Arc::new(CounterSeries { line: line(&name, "", &self.labels(key), None), value: AtomicU64::new(0) });
        self.add(name, Family::Counter, Series::Counter(series.clone()));
        series
    }

    fn gauge(&self, key: &Key) -> Self::Gauge {
        let name = text::metric_name(key.name());
        let series = Arc::new(GaugeSeries {
            line: line(&name, "", &self.labels(key), None),
            bits: AtomicU64::new(0f64.to_bits()),
        });
        self.add(name, Family::Gauge, Series::Gauge(series.clone()));
        series
    }

    fn histogram(&self, key: &Key) -> Self::Histogram {
        let name = text::metric_name(key.name());
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

/// The registry (handles by key) and the index (what a render reads) hold each series; a
/// handle the app or a watch keeps is a third holder. Also the pools whose series are to go.
pub(super) struct Inner {
    pub(super) registry: Registry<Key, Arc<Index>>,
    pub(super) index: Arc<Index>,
    pub(super) retired: Mutex<Retired>,
}

/// The retired pool names of one recorder and its last sweep.
#[derive(Debug, Default)]
pub(super) struct Retired {
    pub(super) names: HashSet<String>,
    pub(super) last_sweep: Option<Instant>,
}
