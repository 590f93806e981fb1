//! Renders a recorder's series in the Prometheus text format, families in name order.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::series::{Index, Series};
use super::text::{push_f64, push_u64};

/// A sample's value: a count or a float.
enum Value {
    Count(u64),
    Float(f64),
}

/// `line value\n`.
fn sample(out: &mut impl Write, line: &str, value: Value) {
    let _ = out.write_str(line);
    let _ = out.write_char(' ');
    match value {
        Value::Count(v) => push_u64(out, v),
        Value::Float(v) => push_f64(out, v),
    }
    let _ = out.write_char('\n');
}

pub(super) fn render(index: &Index, out: &mut impl Write) {
    let (help, families) = index.snapshot();
    for ((name, family), series) in families.iter() {
        if let Some(text) = help.get(name) {
            let _ = writeln!(out, "# HELP {name} {text}");
        }
        let _ = writeln!(out, "# TYPE {name} {}", family.as_str());
        for s in series.iter() {
            match s {
                Series::Counter(c) => sample(out, &c.line, Value::Count(c.value.load(Ordering::Relaxed))),
                Series::Gauge(g) => {
                    sample(out, &g.line, Value::Float(f64::from_bits(g.bits.load(Ordering::Relaxed))));
                }
                Series::Histogram(h) => {
                    // Buckets first (Acquire), then the count: see `HistogramSeries::record`.
                    let mut cumulative = 0;
                    for (bucket, line) in h.buckets.iter().zip(h.lines.iter()) {
                        cumulative += bucket.load(Ordering::Acquire);
                        sample(out, line, Value::Count(cumulative));
                    }
                    let count = h.count.load(Ordering::Relaxed).max(cumulative);
                    // The lines after the buckets' own: `+Inf`, `_sum`, `_count`.
                    let rest = h.lines.get(h.bounds.len()..).unwrap_or_default();
                    let values = [None, Some(h.sum.load(Ordering::Relaxed)), None];
                    for (line, value) in rest.iter().zip(values) {
                        let value = value.map_or(Value::Count(count), |bits| Value::Float(f64::from_bits(bits)));
                        sample(out, line, value);
                    }
                }
            }
        }
    }
}
