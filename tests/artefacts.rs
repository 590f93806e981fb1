//! The operational artefacts (alert rules, their promtool unit tests, the Alertmanager example,
//! the Grafana dashboard, the runbooks) are consistent with each other and with the crate:
//! every metric name they use is in `poolwatch::catalog`, the real `promtool` and `amtool`
//! accept them, every alert has a severity, a runbook and a firing and a non-firing unit test.
//!
//! Needs `promtool` (Debian package `prometheus`) and `amtool` (`prometheus-alertmanager`):
//! `scripts/prereqs` installs both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use poolwatch::catalog;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const RUNBOOK_BASE: &str = "https://github.com/poolwatch/poolwatch/blob/main/";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files in `dir` (relative to the crate root) whose name ends with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no {dir}/*{suffix} file");
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn rule_files() -> Vec<PathBuf> {
    files("alerts", ".rules.yml")
}

fn rule_test_files() -> Vec<PathBuf> {
    files("alerts/tests", ".yml")
}

fn dashboards() -> Vec<(PathBuf, Json)> {
    files("dashboards", ".json")
        .into_iter()
        .map(|p| {
            let json =
                serde_json::from_str(&read(&p)).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()));
            (p, json)
        })
        .collect()
}

/// One alerting rule, as written in a rule file.
#[derive(Debug)]
struct Alert {
    name: String,
    expr: String,
    severity: Option<String>,
    runbook_url: Option<String>,
}

fn alerts() -> Vec<Alert> {
    let mut alerts = Vec::new();
    for path in rule_files() {
        let doc = yaml(&path);
        for group in doc["groups"].as_sequence().expect("a rule file has `groups`") {
            for rule in group["rules"].as_sequence().expect("a group has `rules`") {
                let Some(name) = rule["alert"].as_str() else { continue };
                alerts.push(Alert {
                    name: name.to_owned(),
                    expr: rule["expr"].as_str().unwrap_or_default().to_owned(),
                    severity: rule["labels"]["severity"].as_str().map(str::to_owned),
                    runbook_url: rule["annotations"]["runbook_url"].as_str().map(str::to_owned),
                });
            }
        }
    }
    assert!(!alerts.is_empty(), "no alerting rule found");
    alerts
}

/// Every `(source, expression)` pair: alert exprs, dashboard targets and template queries.
fn expressions() -> Vec<(String, String)> {
    let mut exprs: Vec<(String, String)> =
        alerts().into_iter().map(|a| (format!("alert {}", a.name), a.expr)).collect();
    for path in rule_files() {
        for group in yaml(&path)["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let (Some(name), Some(expr)) = (rule["record"].as_str(), rule["expr"].as_str()) {
                    exprs.push((format!("recording rule {name}"), expr.to_owned()));
                }
            }
        }
    }
    for (path, dash) in dashboards() {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        for panel in panels(&dash) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default().to_owned();
                exprs.push((format!("{file} panel {:?}", panel["title"].as_str().unwrap_or("?")), expr));
            }
        }
        for var in dash["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(q) = var["query"]["query"].as_str().or(var["query"].as_str()) {
                exprs.push((format!("{file} variable {}", var["name"]), q.to_owned()));
            }
        }
    }
    exprs
}

/// The panels of a dashboard that show data (rows are layout only).
fn panels(dash: &Json) -> Vec<&Json> {
    dash["panels"].as_array().expect("dashboard has panels").iter().filter(|p| p["type"] != "row").collect()
}

/// The metric names an expression uses: identifiers starting with `db_client_connection_` or
/// `poolwatch_`, outside string literals, that are not one of the catalog's label keys.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let label_keys: BTreeSet<&str> =
        catalog::ALL.iter().flat_map(|m| m.labels.iter().copied()).chain([catalog::POOL_NAME]).collect();
    let mut unquoted = String::new();
    let mut in_string = false;
    let mut previous = ' ';
    for c in expr.chars() {
        if c == '"' && previous != '\\' {
            in_string = !in_string;
            unquoted.push(' ');
        } else {
            unquoted.push(if in_string { ' ' } else { c });
        }
        previous = c;
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("db_client_connection_") || t.starts_with("poolwatch_"))
        .filter(|t| !label_keys.contains(t))
        .map(str::to_owned)
        .collect()
}

fn base_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| series.strip_suffix(s)).unwrap_or(series)
}

#[test]
fn metric_names_in_alerts_and_dashboards_are_in_the_catalog() {
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (source, expr) in expressions() {
        assert!(!expr.trim().is_empty(), "{source} has an empty expression");
        for name in metric_names(&expr) {
            match catalog::find(&name) {
                Some(metric) => {
                    used.insert(metric.name);
                }
                None => {
                    missing.entry(base_name(&name).to_owned()).or_default().insert(source.clone());
                }
            }
        }
    }
    // The scan must see the core names, or it checks nothing.
    for core in [catalog::CONNECTION_COUNT.name, catalog::PHANTOM_CONNECTIONS.name, catalog::CENSUS_UP.name] {
        assert!(used.contains(core), "{core} not found in any alert or dashboard: the scan is broken");
    }
    let report: Vec<String> = missing.iter().map(|(name, sources)| format!("{name} (used by {sources:?})")).collect();
    assert!(
        missing.is_empty(),
        "{} metric name(s) used by alerts/dashboards are not in poolwatch::catalog (add them there, or fix the typo):\n  {}",
        report.len(),
        report.join("\n  ")
    );
}

#[test]
fn every_catalog_metric_is_on_the_dashboard() {
    let mut on_dashboard = BTreeSet::new();
    for (_, dash) in dashboards() {
        for panel in panels(&dash) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                on_dashboard.extend(metric_names(target["expr"].as_str().unwrap_or_default()));
            }
        }
    }
    let absent: Vec<&str> = catalog::ALL
        .iter()
        .filter(|m| !on_dashboard.iter().any(|n| catalog::find(n).is_some_and(|f| f.name == m.name)))
        .map(|m| m.name)
        .collect();
    assert!(absent.is_empty(), "metrics the crate exports but no dashboard panel shows: {absent:?}");
}

#[test]
fn metric_name_scan_skips_labels_and_strings_and_maps_histogram_series() {
    let names = metric_names(
        r#"sum by (db_client_connection_pool_name, le) (rate(db_client_connection_wait_time_seconds_bucket{db_client_connection_state="poolwatch_fake"}[5m])) > poolwatch_census_up"#,
    );
    let expected: BTreeSet<String> =
        ["db_client_connection_wait_time_seconds_bucket", "poolwatch_census_up"].map(String::from).into();
    assert_eq!(names, expected);
    assert_eq!(base_name("db_client_connection_wait_time_seconds_bucket"), "db_client_connection_wait_time_seconds");
    assert!(catalog::find("poolwatch_no_such_metric").is_none());
}

/// Runs a Prometheus tool and returns its combined output, failing with a clear message when
/// the tool is not installed or the command fails.
fn run_tool(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).current_dir(root()).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{tool}` ({e}). It comes with Debian package {}; run scripts/prereqs to install it.",
            if tool == "promtool" { "`prometheus`" } else { "`prometheus-alertmanager`" }
        )
    });
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "`{tool} {}` failed:\n{text}", args.join(" "));
    text
}

fn relative(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.strip_prefix(root()).unwrap_or(p).display().to_string()).collect()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let rules = relative(&rule_files());
    let mut args = vec!["check", "rules"];
    args.extend(rules.iter().map(String::as_str));
    let out = run_tool("promtool", &args);
    assert!(out.contains("SUCCESS"), "{out}");

    let tests = relative(&rule_test_files());
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = run_tool("promtool", &args);
    assert_eq!(out.matches("SUCCESS").count(), tests.len(), "every test file passes:\n{out}");
}

#[test]
fn promtool_parses_every_dashboard_expression() {
    // Grafana variables replaced by values PromQL accepts, then checked as recording rules.
    let mut rules = String::from("groups:\n  - name: dashboard-expressions\n    rules:\n");
    let mut n = 0;
    for (source, expr) in expressions().into_iter().filter(|(s, _)| s.contains(" panel ")) {
        let expr = expr.replace("$__rate_interval", "5m").replace("$pool", ".*").replace("$instance", ".*");
        n += 1;
        rules.push_str(&format!(
            "      # {source}\n      - record: dashboard:expr{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = tempfile::Builder::new().prefix("poolwatch-dashboard-exprs-").suffix(".yml").tempfile().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    let out = run_tool("promtool", &["check", "rules", file.path().to_str().unwrap()]);
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

#[test]
fn amtool_accepts_the_alertmanager_example_and_routes_by_severity() {
    let config = "alerts/alertmanager.yml";
    let out = run_tool("amtool", &["check-config", config]);
    assert!(out.contains("SUCCESS"), "{out}");
    let file = format!("--config.file={config}");
    for (labels, receiver) in [
        (["severity=critical", "alertname=PoolwatchPoolExhausted"], "page"),
        (["severity=warning", "alertname=PoolwatchPhantomGapGrowing"], "ticket"),
    ] {
        let out = run_tool("amtool", &["config", "routes", "test", &file, labels[0], labels[1]]);
        assert_eq!(out.lines().next().map(str::trim), Some(receiver), "{labels:?} routes to {receiver}: {out}");
    }

    // Grouping by alert, job and pool (pools of two services may share a name, "main"), with
    // the `cluster` slot documented; database-down inhibits pool-exhausted for the same pool.
    let am = yaml(&root().join(config));
    let group_by: Vec<&str> =
        am["route"]["group_by"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(group_by, ["alertname", "job", catalog::POOL_NAME]);
    let text = read(&root().join(config));
    assert!(
        text.contains("#   group_by: [alertname, cluster, job, db_client_connection_pool_name]"),
        "alerts/alertmanager.yml documents where `cluster` goes"
    );
    let inhibits_exhausted = am["inhibit_rules"].as_sequence().unwrap().iter().any(|rule| {
        let text = serde_yaml::to_string(rule).unwrap();
        let source = serde_yaml::to_string(&rule["source_matchers"]).unwrap();
        source.contains("PoolwatchDatabaseDown")
            && text.contains("PoolwatchPoolExhausted")
            && text.contains(catalog::POOL_NAME)
    });
    assert!(inhibits_exhausted, "PoolwatchDatabaseDown must inhibit PoolwatchPoolExhausted for the same pool");

    // Every alert name the Alertmanager config mentions exists (a typo would silently not match).
    let names: BTreeSet<String> = alerts().into_iter().map(|a| a.name).collect();
    let text = read(&root().join(config));
    for word in text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| w.starts_with("Poolwatch")) {
        assert!(names.contains(word), "alerts/alertmanager.yml names {word}, which is no alert");
    }
}

#[test]
fn every_alert_has_severity_a_runbook_and_firing_and_quiet_unit_tests() {
    let alerts = alerts();
    let mut names = BTreeSet::new();
    for alert in &alerts {
        assert!(names.insert(alert.name.as_str()), "alert {} defined twice", alert.name);
        let severity = alert.severity.as_deref();
        assert!(matches!(severity, Some("critical" | "warning")), "{}: severity {severity:?}", alert.name);
        let url = alert.runbook_url.as_deref().unwrap_or_else(|| panic!("{} has no runbook_url", alert.name));
        let page = format!("docs/runbooks/{}.md", alert.name);
        assert_eq!(url, format!("{RUNBOOK_BASE}{page}"), "{}: runbook_url", alert.name);
        let runbook = std::fs::read_to_string(root().join(&page)).unwrap_or_else(|_| panic!("{page} is missing"));
        assert!(runbook.starts_with(&format!("# {}\n", alert.name)), "{page} starts with `# {}`", alert.name);
        for section in [
            "## Meaning",
            "## Impact",
            "## Confirm",
            "## Likely causes",
            "## Mitigate",
            "## Fix",
            "```promql",
            "```sql",
        ] {
            assert!(runbook.contains(section), "{page} has no `{section}`");
        }
        let index = read(&root().join("docs/runbooks/README.md"));
        assert!(
            index.contains(&format!("[{}]({}.md)", alert.name, alert.name)),
            "docs/runbooks/README.md lists {}",
            alert.name
        );
    }
    for page in files("docs/runbooks", ".md") {
        let stem = page.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(stem == "README" || names.contains(stem), "{} belongs to no alert", page.display());
    }

    // alertname -> (has a case expecting it to fire, has a case expecting silence)
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for path in rule_test_files() {
        let doc = yaml(&path);
        for test in doc["tests"].as_sequence().expect("a test file has `tests`") {
            assert!(
                test["input_series"].as_sequence().is_some_and(|s| !s.is_empty()),
                "{}: a test without input",
                path.display()
            );
            for series in test["input_series"].as_sequence().unwrap() {
                let s = series["series"].as_str().unwrap_or_default();
                // postgres_exporter's series (alerts/fleet-gap.rules.yml) are per database, not per pool.
                let exporter = s.starts_with(catalog::EXPORTER_SESSIONS);
                assert!(
                    exporter || s.contains(catalog::POOL_NAME),
                    "{}: input series {s} lacks the pool label",
                    path.display()
                );
            }
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_owned();
                assert!(names.contains(name.as_str()), "{}: tests unknown alert {name}", path.display());
                let fires = case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
                let entry = cases.entry(name).or_default();
                if fires { entry.0 = true } else { entry.1 = true }
            }
        }
    }
    for name in &names {
        let (fires, quiet) = cases.get(*name).copied().unwrap_or_default();
        assert!(fires, "{name} has no unit test where it fires");
        assert!(quiet, "{name} has no unit test where it stays silent");
    }
}

#[test]
fn dashboard_is_valid_and_every_panel_explains_itself() {
    for (path, dash) in dashboards() {
        let file = path.display();
        assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "{file}: schemaVersion");
        assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "{file}: uid");
        let vars = dash["templating"]["list"].as_array().expect("templating.list");
        let var = |name: &str| {
            vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{file}: no ${name} variable"))
        };
        assert_eq!(var("datasource")["type"], "datasource");
        assert_eq!(var("datasource")["query"], "prometheus");
        grafana_10_rules(&file.to_string(), &dash);
        assert_eq!(dash["editable"], false, "{file}: uneditable-dashboard (provisioned, changed in the mixin)");
        dashboard_linter_rules(&file.to_string(), &dash);
        let mut ids = BTreeSet::new();
        for panel in dash["panels"].as_array().unwrap() {
            assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "{file}: duplicate panel id {}", panel["id"]);
            assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: a panel without title");
        }
        for panel in panels(&dash) {
            let title = panel["title"].as_str().unwrap();
            let description = panel["description"].as_str().unwrap_or_default();
            assert!(
                description.len() >= 40,
                "{file}: panel {title:?} needs a description saying what it means for on-call"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: panel {title:?} uses the datasource variable"
            );
            let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
            let targets = targets.unwrap_or_else(|| panic!("{file}: panel {title:?} has no targets"));
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{file}: panel {title:?} has a target without expression");
                assert!(expr.contains("$pool"), "{file}: panel {title:?} ignores the $pool variable: {expr}");
            }
        }
        let rows: Vec<&str> = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == "row")
            .filter_map(|p| p["title"].as_str())
            .collect();
        let topics: &[&str] = if file.to_string().ends_with("poolwatch.json") {
            &["Ledger", "Acquire", "Listener", "Heartbeat", "Sockets", "Leak suspects"]
        } else {
            &["Ledger across the fleet", "Health of every replica"]
        };
        for topic in topics {
            assert!(rows.iter().any(|r| r.starts_with(topic)), "{file}: no `{topic}` row in {rows:?}");
        }
    }
}

/// The schemaVersion Grafana 10.0 writes: the oldest Grafana mixin/README.md promises. Later
/// Grafanas migrate it up; Grafana 10 would load a newer one without knowing its fields.
const GRAFANA_10_SCHEMA: u64 = 38;
/// Core panel types Grafana 10.0 ships (no plugin to install) that the dashboards may use.
const GRAFANA_10_PANELS: &[&str] =
    &["row", "timeseries", "stat", "table", "gauge", "bargauge", "text", "state-timeline", "status-history"];

/// What keeps the dashboards importable from Grafana 10.0 on: schemaVersion at most 38, core
/// panel types of 10.0 only, no library panels (they live in one Grafana instance), every
/// panel and variable on the datasource variable; and nothing the migrations 39-41 would
/// rewrite (a `timeSeriesTable` transformation, a non-string `refresh`,
/// `timepicker.time_options`), so 10, 11 and 12 show the same dashboard.
fn grafana_10_rules(file: &str, dash: &Json) {
    let version = dash["schemaVersion"].as_u64().unwrap_or(u64::MAX);
    assert!(version <= GRAFANA_10_SCHEMA, "{file}: schemaVersion {version} is newer than Grafana 10.0 writes (38)");
    assert!(dash["refresh"].is_string(), "{file}: refresh must be a string (schema 40 rewrites it)");
    assert!(dash["timepicker"]["time_options"].is_null(), "{file}: timepicker.time_options (schema 41 drops it)");
    let mut all: Vec<&Json> = dash["panels"].as_array().expect("panels").iter().collect();
    let nested: Vec<&Json> = all.iter().flat_map(|p| p["panels"].as_array().into_iter().flatten()).collect();
    all.extend(nested);
    for panel in all {
        let (title, kind) = (panel["title"].as_str().unwrap_or_default(), panel["type"].as_str().unwrap_or_default());
        assert!(
            GRAFANA_10_PANELS.contains(&kind),
            "{file}: panel {title:?} type {kind:?} is not a Grafana 10 core panel"
        );
        assert!(panel["libraryPanel"].is_null(), "{file}: panel {title:?} is a library panel");
        let transformations = panel["transformations"].as_array().into_iter().flatten();
        for t in transformations {
            assert_ne!(t["id"], "timeSeriesTable", "{file}: panel {title:?}: timeSeriesTable (schema 39 rewrites it)");
        }
        if kind != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{file}: panel {title:?} datasource");
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating.list").iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{file}: variable {} datasource", v["name"]);
    }
}

/// The units Grafana knows that poolwatch's panels use (dashboard-linter's panel-units-rule
/// accepts these among others).
const GRAFANA_UNITS: &[&str] = &["short", "none", "s", "ms", "percentunit", "percent", "bool", "dateTimeFromNow"];

/// dashboard-linter's rules (grafana/dashboard-linter), checked on the JSON: a `datasource`
/// variable; `job` and `instance` query variables on it, multi-select with allValue `.+`,
/// reloaded on time change; every panel on the datasource variable with a title, a description
/// and a known unit; every query with `job` and `instance` matchers, `$__rate_interval` in
/// every rate/increase, and counters only inside rate/irate/increase.
fn dashboard_linter_rules(file: &str, dash: &Json) {
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{file}: no ${name}"));
    let ds = var("datasource");
    assert_eq!(
        (&ds["type"], &ds["query"], &ds["label"]),
        (&Json::from("datasource"), &Json::from("prometheus"), &Json::from("Data source")),
        "{file}: template-datasource-rule"
    );
    for (name, label) in [("job", "Job"), ("instance", "Instance"), ("pool", "Pool")] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{file}: ${name} is a query variable");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{file}: ${name} uses the datasource variable");
        assert_eq!(v["label"], label, "{file}: ${name} label");
        assert_eq!(
            (v["multi"].as_bool(), v["allValue"].as_str()),
            (Some(true), Some(".+")),
            "{file}: ${name} multi, allValue .+"
        );
        assert_eq!(v["refresh"], 2, "{file}: ${name} reloads on time range change");
        let query = v["query"]["query"].as_str().unwrap_or_default();
        assert!(
            query.starts_with("label_values(")
                && query.ends_with(&format!(", {})", if name == "pool" { catalog::POOL_NAME } else { name })),
            "{file}: ${name} query {query}"
        );
    }
    for panel in panels(dash) {
        let title = panel["title"].as_str().unwrap_or_default();
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or_default();
        assert!(GRAFANA_UNITS.contains(&unit), "{file}: panel {title:?} unit {unit:?} (panel-units-rule)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains(r#"job=~"$job""#),
                "{file}: panel {title:?} has no job matcher (target-job-rule): {expr}"
            );
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "{file}: panel {title:?} has no instance matcher: {expr}"
            );
            for func in ["rate(", "increase("] {
                for (i, _) in expr.match_indices(func) {
                    let range = expr[i..].split_once('[').map(|(_, r)| r.split(']').next().unwrap_or_default());
                    assert_eq!(
                        range,
                        Some("$__rate_interval"),
                        "{file}: panel {title:?} (target-rate-interval-rule): {expr}"
                    );
                }
            }
            for (i, _) in expr.match_indices("_total{") {
                let before = &expr[..i];
                let start = before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
                let wrapped = ["rate(", "increase(", "irate("].iter().any(|f| before[..start].ends_with(f));
                assert!(
                    wrapped,
                    "{file}: panel {title:?} reads a counter outside rate/increase (target-counter-agg-rule): {expr}"
                );
            }
        }
    }
}

#[test]
fn generated_files_match_the_mixin() {
    let out = Command::new("scripts/mixin")
        .arg("--check")
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/mixin ({e}); scripts/prereqs installs jsonnet"));
    assert!(
        out.status.success(),
        "alerts/ or dashboards/ differ from mixin/ (run scripts/mixin):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one path the mixin is imported by: where `jb install github.com/poolwatch/poolwatch/mixin`
/// vendors it.
const MIXIN_IMPORT: &str = "github.com/poolwatch/poolwatch/mixin/mixin.libsonnet";

/// The mixin installs with jsonnet-bundler (`mixin/jsonnetfile.json`, no dependencies), every
/// page and comment imports it by the one path jb vendors it under, and the README's example,
/// run against a `vendor/` laid out as jb lays it out, renders the alerts with its overrides.
#[test]
fn mixin_installs_with_jsonnet_bundler_and_imports_by_one_path() {
    let jb: Json = serde_json::from_str(&read(&root().join("mixin/jsonnetfile.json"))).expect("jsonnetfile.json");
    assert_eq!(jb["version"], 1, "mixin/jsonnetfile.json: version");
    assert_eq!(jb["dependencies"], Json::Array(vec![]), "mixin/jsonnetfile.json: no dependencies");

    let mut pages = vec![root().join("README.md"), root().join("mixin/README.md")];
    pages.extend(files("docs", ".md"));
    pages.extend(files("mixin", ".libsonnet"));
    for page in &pages {
        let text = read(page);
        for (i, _) in text.match_indices("import '") {
            let path = text[i + "import '".len()..].split('\'').next().unwrap_or_default();
            if path.ends_with("mixin.libsonnet") && path.contains('/') {
                assert_eq!(path, MIXIN_IMPORT, "{}: import path", page.display());
            }
        }
    }

    let readme = read(&root().join("mixin/README.md"));
    let example = readme.split("```jsonnet\n").nth(1).and_then(|r| r.split("```").next()).expect("a jsonnet example");
    assert!(example.contains(MIXIN_IMPORT), "mixin/README.md's example imports {MIXIN_IMPORT}");
    let vendor = std::env::temp_dir().join(format!("poolwatch-jb-vendor-{}", std::process::id()));
    let at = vendor.join(Path::new(MIXIN_IMPORT).parent().expect("mixin dir"));
    std::fs::create_dir_all(at.parent().expect("parent")).expect("vendor dir");
    std::os::unix::fs::symlink(root().join("mixin"), &at).expect("vendor the mixin");
    let out = Command::new("jsonnet").args(["-J", vendor.to_str().unwrap(), "-e", example]).output();
    std::fs::remove_dir_all(&vendor).ok();
    let out = out.expect("jsonnet (scripts/prereqs installs it)");
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the README example fails: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        rendered.contains("PoolwatchPoolSaturated") && rendered.contains(r#"job=~\"api|worker\""#),
        "the example renders the alerts with its jobSelector: {rendered}"
    );
}

/// The fleet query ships for sql_exporter (burningalchemist/sql_exporter, where
/// postgres_exporter's deprecated `--extend.query-path` users are sent) as for
/// postgres_exporter: the same SQL, the same series name and labels, so alerts/fleet-gap.rules.yml
/// reads either. (sql_exporter is not packaged here and needs Go 1.22 to build: the SQL and the
/// series are what tests/fleet.rs and tests/fleet_e2e.rs check through postgres_exporter.)
#[test]
fn fleet_query_ships_for_sql_exporter_as_for_postgres_exporter() {
    let pe = yaml(&root().join("alerts/postgres_exporter/queries.yaml"));
    let (name, pe_query) = pe.as_mapping().and_then(|m| m.iter().next()).expect("one postgres_exporter query");
    let pe_metrics = serde_yaml::to_string(&pe_query["metrics"]).unwrap();
    assert_eq!(format!("{}_count", name.as_str().unwrap()), catalog::EXPORTER_SESSIONS, "postgres_exporter's series");
    assert!(pe_metrics.contains("application_name") && pe_metrics.contains("state"), "{pe_metrics}");

    let collector = yaml(&root().join("alerts/sql_exporter/poolwatch.collector.yml"));
    let metrics = collector["metrics"].as_sequence().expect("collector metrics");
    assert_eq!(metrics.len(), 1, "one metric");
    let m = &metrics[0];
    let strings = |v: &Yaml| -> Vec<String> {
        v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
    };
    assert_eq!(m["metric_name"].as_str(), Some(catalog::EXPORTER_SESSIONS), "the series the fleet rules read");
    assert_eq!(m["type"].as_str(), Some("gauge"));
    assert_eq!(strings(&m["key_labels"]), ["application_name", "state"]);
    assert_eq!(strings(&m["values"]), ["count"]);
    assert_eq!(
        m["query"].as_str(),
        pe_query["query"].as_str(),
        "the same SQL as alerts/postgres_exporter/queries.yaml"
    );

    let config = yaml(&root().join("alerts/sql_exporter/sql_exporter.yml"));
    assert!(strings(&config["collector_files"]).iter().any(|f| f == "poolwatch.collector.yml"));
    assert_eq!(strings(&config["target"]["collectors"]), [collector["collector_name"].as_str().unwrap().to_owned()]);
    let dsn = config["target"]["data_source_name"].as_str().unwrap_or_default();
    let user = dsn.strip_prefix("postgres://").and_then(|rest| rest.split_once('@')).map(|(user, _)| user);
    assert!(user.is_some_and(|u| !u.contains(':')), "a postgres:// DSN with no password in the example: {dsn}");
}
