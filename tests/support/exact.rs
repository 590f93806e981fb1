//! A recorder that keeps every figure exactly: counters and gauges as atomics, histograms as
//! an exact count and sum. For tests that check counts to the unit while other threads render
//! `/metrics`: the Prometheus exporter drains histogram samples at each render, and a sample
//! recorded in the instant of that drain can be lost (seen under CPU load), which is no
//! poolwatch defect. Install it for one watch with `metrics::with_local_recorder`: the
//! handles poolwatch registers there keep recording into it from any thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// An exact histogram: how many samples and their sum.
#[derive(Debug, Default)]
pub struct Exact {
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl HistogramFn for Exact {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some((f64::from_bits(b) + value).to_bits()));
    }
}

/// Every series registered through it, by name and labels.
#[derive(Debug, Default)]
pub struct ExactRecorder {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Exact>>>,
}

fn find<T>(map: &Mutex<HashMap<Key, Arc<T>>>, name: &str, labels: &[(&str, &str)]) -> Option<Arc<T>> {
    let map = map.lock().unwrap();
    map.iter()
        .find(|(k, _)| {
            k.name() == name && labels.iter().all(|(n, v)| k.labels().any(|l| l.key() == *n && l.value() == *v))
        })
        .map(|(_, v)| Arc::clone(v))
}

impl ExactRecorder {
    /// A counter's value, if registered.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        find(&self.counters, name, labels).map(|c| c.load(Ordering::Acquire))
    }

    /// A gauge's value, if registered.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        find(&self.gauges, name, labels).map(|g| f64::from_bits(g.load(Ordering::Acquire)))
    }

    /// A histogram's sample count and sum, if registered.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<(u64, f64)> {
        find(&self.histograms, name, labels)
            .map(|h| (h.count.load(Ordering::Acquire), f64::from_bits(h.sum_bits.load(Ordering::Acquire))))
    }
}

impl Recorder for ExactRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::clone(self.counters.lock().unwrap().entry(key.clone()).or_default()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::clone(self.gauges.lock().unwrap().entry(key.clone()).or_default()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::clone(self.histograms.lock().unwrap().entry(key.clone()).or_default()))
    }
}
