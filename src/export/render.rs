//! The Prometheus text format (0.0.4): names, escaping, values.

use std::fmt::Write as _;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use super::recorder::{Index, Series};

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`: anything else becomes `_`.
pub(super) fn metric_name(name: &str) -> String {
    name.char_indices()
        .map(
            |(i, c)| {
                if c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()) { c } else { '_' }
            },
        )
        .collect()
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`: anything else becomes `_`.
fn label_name(name: &str) -> String {
    name.char_indices()
        .map(|(i, c)| if c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()) { c } else { '_' })
        .collect()
}

/// Appends `key="value"`, the value escaped (`\`, `"`, newline).
pub(super) fn push_label(out: &mut String, key: &str, value: &str) {
    out.push_str(&label_name(key));
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A `# HELP` text: `\` and newline escaped.
pub(super) fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn push_u64(out: &mut String, v: u64) {
    let _ = write!(out, "{v}");
}

fn push_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

pub(super) fn render(index: &Index, out: &mut String) {
    let help = index.help.lock().unwrap_or_else(PoisonError::into_inner);
    let families = index.families.lock().unwrap_or_else(PoisonError::into_inner);
    for ((name, family), series) in families.iter() {
        if let Some(text) = help.get(name) {
            let _ = writeln!(out, "# HELP {name} {text}");
        }
        let _ = writeln!(out, "# TYPE {name} {}", family.as_str());
        for s in series {
            match s {
                Series::Counter(c) => {
                    out.push_str(&c.line);
                    out.push(' ');
                    push_u64(out, c.value.load(Ordering::Relaxed));
                    out.push('\n');
                }
                Series::Gauge(g) => {
                    out.push_str(&g.line);
                    out.push(' ');
                    push_f64(out, f64::from_bits(g.bits.load(Ordering::Relaxed)));
                    out.push('\n');
                }
                Series::Histogram(h) => {
                    // Buckets first (Acquire), then the count: see `HistogramSeries::record`.
                    let mut cumulative = 0;
                    for (bucket, line) in h.buckets.iter().zip(h.lines.iter()) {
                        cumulative += bucket.load(Ordering::Acquire);
                        out.push_str(line);
                        out.push(' ');
                        push_u64(out, cumulative);
                        out.push('\n');
                    }
                    let count = h.count.load(Ordering::Relaxed).max(cumulative);
                    // The lines after the buckets' own: `+Inf`, `_sum`, `_count`.
                    let rest = h.lines.get(h.bounds.len()..).unwrap_or_default();
                    let values = [None, Some(h.sum.load(Ordering::Relaxed)), None];
                    for (line, value) in rest.iter().zip(values) {
                        out.push_str(line);
                        out.push(' ');
                        match value {
                            Some(bits) => push_f64(out, f64::from_bits(bits)),
                            None => push_u64(out, count),
                        }
                        out.push('\n');
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_valid() {
        assert_eq!(metric_name("db.client.connection.count"), "db_client_connection_count");
        assert_eq!(metric_name("9lives:x"), "_lives:x");
        assert_eq!(label_name("a:b-c"), "a_b_c");
        assert_eq!(label_name("0x"), "_x");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut s = String::new();
        push_label(&mut s, "k", "a\\b\"c\nd");
        assert_eq!(s, r#"k="a\\b\"c\nd""#);
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }

    #[test]
    fn special_floats_use_the_format_s_spelling() {
        let mut s = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.25, 3.0] {
            push_f64(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "NaN +Inf -Inf 0.25 3 ");
    }
}
