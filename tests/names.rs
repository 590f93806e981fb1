//! Metric names every metrics stack accepts, and that people cannot mistake for each other.
//! Prometheus text 0.0.4 names series; OpenMetrics (and the prometheus-client crate, the OTel
//! collector's receiver) names families: a counter `x_total` is the family `x`, a histogram `x`
//! also owns `x_bucket`, `x_count` and `x_sum`. Two catalog metrics that claim one name there are
//! one family twice, and the whole scrape is rejected. tests/export.rs checks a real scrape
//! with a real OpenMetrics parser; this checks the catalog itself, without a server.

use poolwatch::catalog::{self, Kind, Metric};

/// Every name `m` claims in OpenMetrics: its family name and the sample names of its family.
fn claimed(m: &Metric) -> Vec<String> {
    let family = m.name.strip_suffix("_total").unwrap_or(m.name);
    let suffixes: &[&str] = match m.kind {
        Kind::Counter => &["", "_total", "_created"],
        Kind::Gauge => &[""],
        Kind::Histogram => &["", "_bucket", "_count", "_sum", "_created"],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

/// The edit distance between `a` and `b` (insertions, deletions, substitutions).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// No two catalog metrics claim one OpenMetrics name: no gauge `x` beside a counter `x_total`,
/// no histogram whose `_count`, `_sum` or `_bucket` is another metric's name.
#[test]
fn no_two_metrics_share_an_openmetrics_family() {
    let mut clashes = Vec::new();
    for (i, a) in catalog::ALL.iter().enumerate() {
        for b in &catalog::ALL[i + 1..] {
            let (ca, cb) = (claimed(a), claimed(b));
            if let Some(name) = ca.iter().find(|n| cb.contains(n)) {
                clashes.push(format!("{} and {} both claim {name}", a.name, b.name));
            }
        }
    }
    assert!(clashes.is_empty(), "one OpenMetrics family twice: {clashes:#?}");
}

/// No two metrics' names (or family names) are within two edits of each other: a name a letter
/// or two from another is a query that silently reads the wrong metric.
#[test]
fn no_two_names_differ_by_a_letter_or_two() {
    let mut close = Vec::new();
    for (i, a) in catalog::ALL.iter().enumerate() {
        for b in &catalog::ALL[i + 1..] {
            for na in claimed(a).iter().filter(|n| !n.ends_with("_created")) {
                for nb in claimed(b).iter().filter(|n| !n.ends_with("_created")) {
                    let d = distance(na, nb);
                    if d <= 2 {
                        close.push(format!("{na} and {nb} ({d} edits; metrics {} and {})", a.name, b.name));
                    }
                }
            }
        }
    }
    assert!(close.is_empty(), "names too close to tell apart: {close:#?}");
}

#[test]
fn distance_counts_edits() {
    assert_eq!(distance("poolwatch_config_hazard", "poolwatch_config_hazards"), 1);
    assert_eq!(distance("abc", "abc"), 0);
    assert_eq!(distance("kitten", "sitting"), 3);
    assert_eq!(distance("", "ab"), 2);
}
