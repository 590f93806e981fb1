//! The README documents every metric the crate exports.

#[test]
fn readme_metric_table_lists_every_catalogued_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let missing: Vec<&str> =
        poolwatch::catalog::ALL.iter().map(|m| m.name).filter(|n| !readme.contains(&format!("| `{n}` |"))).collect();
    assert!(missing.is_empty(), "README's metric table lacks: {missing:?}");
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
