//! The README documents every metric the crate exports.

#[test]
fn readme_metric_table_lists_every_catalogued_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let missing: Vec<&str> =
        poolwatch::catalog::ALL.iter().map(|m| m.name).filter(|n| !readme.contains(&format!("| `{n}` |"))).collect();
    assert!(missing.is_empty(), "README's metric table lacks: {missing:?}");
}
