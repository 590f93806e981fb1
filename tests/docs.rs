//! The documentation stays true to the code: docs/metrics.md lists every catalogued metric (its
//! table is generated from `poolwatch::catalog::ALL`), every promise names a test that exists,
//! and every local link points at a file (and heading) that exists.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use poolwatch::catalog::{self, Kind};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The page that holds the generated metric table, and the markers around the table.
const METRICS_PAGE: &str = "docs/metrics.md";
const TABLE_BEGIN: &str =
    "<!-- BEGIN metric table: generated from poolwatch::catalog::ALL by tests/docs.rs; do not edit -->";
const TABLE_END: &str = "<!-- END metric table -->";
/// Set to 1 to rewrite the generated table of docs/metrics.md instead of failing on a stale one.
const BLESS: &str = "POOLWATCH_BLESS";

/// The metric table, rendered from the catalog: one row per metric, in `catalog::ALL`'s order.
fn metric_table() -> String {
    let mut table = String::from("| metric | type | unit | labels | help |\n|---|---|---|---|---|\n");
    for m in catalog::ALL {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let labels: Vec<String> = m.labels.iter().map(|l| format!("`{l}`")).collect();
        let help = m.help.replace('|', "\\|");
        writeln!(table, "| `{}` | {kind} | {} | {} | {help} |", m.name, m.unit.as_str(), labels.join(", ")).unwrap();
    }
    table
}

/// docs/metrics.md's table is the catalog's: a metric added, renamed or re-described in
/// `src/catalog.rs` fails here until the page is regenerated, and every catalogued metric has
/// its row.
#[test]
fn metrics_page_table_is_generated_from_the_catalog() {
    let path = Path::new(ROOT).join(METRICS_PAGE);
    let mut page = std::fs::read_to_string(&path).unwrap();
    let begin = page.find(TABLE_BEGIN).unwrap_or_else(|| panic!("{METRICS_PAGE} lacks the line {TABLE_BEGIN}"));
    let start = begin + TABLE_BEGIN.len();
    let end =
        start + page[start..].find(TABLE_END).unwrap_or_else(|| panic!("{METRICS_PAGE} lacks the line {TABLE_END}"));
    let wanted = format!("\n{}", metric_table());
    if page[start..end] != wanted {
        assert!(
            std::env::var(BLESS).is_ok_and(|v| v == "1"),
            "{METRICS_PAGE}'s metric table differs from poolwatch::catalog::ALL: regenerate it with \
             `{BLESS}=1 cargo test --test docs` and commit the file"
        );
        page = format!("{}{wanted}{}", &page[..start], &page[end..]);
        std::fs::write(&path, &page).unwrap();
        eprintln!("{METRICS_PAGE}: metric table regenerated from poolwatch::catalog::ALL");
    }
    let missing: Vec<&str> =
        catalog::ALL.iter().map(|m| m.name).filter(|n| !page.contains(&format!("| `{n}` |"))).collect();
    assert!(missing.is_empty(), "{METRICS_PAGE}'s metric table lacks: {missing:?}");
}

/// docs/guarantees.md names the test behind each promise (`path::function`, or a promtool test
/// file): each one exists, so a promise cannot outlive the test that held it.
#[test]
fn every_guarantee_names_a_test_that_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let page = std::fs::read_to_string(format!("{root}/docs/guarantees.md")).unwrap();
    let mut named = 0;
    let mut missing = Vec::new();
    for cell in page.split('`').skip(1).step_by(2) {
        let (file, function) = match cell.split_once("::") {
            Some((file, function)) if file.ends_with(".rs") => (file, Some(function)),
            _ if cell.starts_with("alerts/tests/") => (cell, None),
            _ => continue,
        };
        named += 1;
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap_or_default();
        let found = match function {
            Some(f) => text.contains(&format!("fn {f}(")),
            None => !text.is_empty(),
        };
        if !found {
            missing.push(cell.to_owned());
        }
    }
    assert!(named >= 20, "the page names {named} tests");
    assert!(missing.is_empty(), "docs/guarantees.md names tests that do not exist: {missing:?}");
}

/// The Markdown pages a reader follows links between: the README, docs/ (runbooks included),
/// the mixin's README and ARCHITECTURE.md.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "md") {
                out.push(path);
            }
        }
    }
    let root = Path::new(ROOT);
    let mut pages: Vec<PathBuf> =
        ["README.md", "ARCHITECTURE.md", "mixin/README.md"].iter().map(|p| root.join(p)).collect();
    walk(&root.join("docs"), &mut pages);
    pages.sort();
    pages
}

/// The page's text outside fenced code blocks (a link-like text in code is not a link).
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of the page's inline links and images: `[text](target)`, `![alt](target)`.
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        // `[alt](path "title")`: the target is the first word.
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.trim_matches(|c| c == '<' || c == '>').to_owned());
        rest = &rest[end..];
    }
    targets
}

/// GitHub's anchors of a page's headings: lower case, punctuation but `-` and `_` dropped,
/// spaces to `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(prose: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose.lines() {
        let Some(title) = line.strip_prefix('#').map(|t| t.trim_start_matches('#')) else { continue };
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    seen
}

/// Every link from a page to a local file points at a file that exists, and a link to a heading
/// (`page.md#heading`, `#heading`) at a heading that exists: moving a section cannot leave a
/// dead link behind.
#[test]
fn every_local_link_in_the_docs_resolves() {
    let pages = pages();
    let mut dead = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = prose(&std::fs::read_to_string(page).unwrap());
        let shown = page.strip_prefix(ROOT).unwrap_or(page).display().to_string();
        for target in link_targets(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            if !resolved.exists() {
                dead.push(format!("{shown}: {target} (no such file)"));
                continue;
            }
            if let Some(fragment) = fragment
                && resolved.extension().is_some_and(|x| x == "md")
            {
                let heads = anchors(&prose(&std::fs::read_to_string(&resolved).unwrap()));
                if !heads.contains(fragment) {
                    dead.push(format!("{shown}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(checked >= 50, "only {checked} local links found in {} pages", pages.len());
    assert!(dead.is_empty(), "dead local links:\n{}", dead.join("\n"));
}

/// A reader cannot open an internal tracker's "issue 12" or "(#12)": the docs cite none (a
/// line that links a public upstream issue by its URL is fine).
#[test]
fn docs_cite_no_internal_issue_numbers() {
    let mut found = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let issue = lower.match_indices("issue").any(|(at, _)| {
                let after = &lower[at + "issue".len()..];
                let digits = after.strip_prefix(' ').or_else(|| after.strip_prefix('-')).unwrap_or("");
                digits.starts_with(|c: char| c.is_ascii_digit())
            });
            // `(#12)`, `sqlx #4349`: a number after `#` at the start of a word.
            let hash = line.match_indices('#').any(|(at, _)| {
                let before = line[..at].chars().next_back();
                before.is_none_or(|c| c == ' ' || c == '(') && line[at + 1..].starts_with(|c: char| c.is_ascii_digit())
            });
            let cites = issue || hash;
            if cites && !line.contains("://") {
                found.push(format!("{}:{}: {line}", page.strip_prefix(ROOT).unwrap_or(&page).display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "internal issue numbers a reader cannot open:\n{}", found.join("\n"));
}
