//! The runbooks' commands work on today's crate. One real server holds, at once, every problem
//! the runbooks diagnose, made by an instrumented pool the way an app makes them: a transaction
//! left idle holding a row lock and a session blocked on it, a leaked slot whose session ended,
//! a LISTEN session, a role out of connection slots, an idle-session kill, a `NetworkPath::Nat`
//! session (`... pw:<pool>:<nonce>`). Every SQL statement of every runbook's diagnosis is then
//! run with `psql`, as the engineer would paste it, and must name the offending sessions. Every
//! PromQL expression may only use names from `poolwatch::catalog` or the shipped recording rules.
//!
//! The runbooks write the pool `main`, the app `api` and the role `app`; the test's server uses
//! other names and substitutes them, so a runbook that spells another placeholder fails.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use poolwatch::attribution::NetworkPath;
use poolwatch::sqlx;
use poolwatch::{Config, catalog, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};
use support::{Cluster, eventually, recorder};

/// The test's pool, app and role, in place of the runbooks' `main`, `api` and `app`.
const POOL: &str = "rbk";
const APP: &str = "orders";
const ROLE: &str = "rbk_app";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every runbook page: (alert name, text).
fn runbooks() -> Vec<(String, String)> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs/runbooks"))
        .expect("docs/runbooks")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md") && !p.ends_with("README.md"))
        .collect();
    pages.sort();
    pages
        .into_iter()
        .map(|p| {
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            (name, std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
        })
        .collect()
}

/// The fenced blocks of `text` whose info string is exactly `lang`, outside the sections that
/// change things (`## Mitigate`, `## Fix`): what the engineer runs to diagnose.
fn diagnosis_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    // The open block: whether it is kept, and its text.
    let mut open: Option<(bool, String)> = None;
    let mut changing = false;
    for line in text.lines() {
        if let Some((keep, body)) = open.as_mut() {
            if line.trim_start().starts_with("```") {
                if *keep {
                    blocks.push(std::mem::take(body));
                }
                open = None;
            } else {
                body.push_str(line);
                body.push('\n');
            }
            continue;
        }
        if line.starts_with("## ") {
            changing = line.starts_with("## Mitigate") || line.starts_with("## Fix");
        }
        if let Some(info) = line.trim_start().strip_prefix("```") {
            open = Some((info.trim() == lang && !changing, String::new()));
        }
    }
    blocks
}

/// The statements of a SQL block: each ends with `;` at the end of a line (comments aside).
fn statements(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        current.push_str(line);
        current.push('\n');
        let code = line.split("--").next().unwrap_or_default().trim_end();
        if code.ends_with(';') {
            out.push(std::mem::take(&mut current));
        }
    }
    if current.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--")) {
        out.push(current);
    }
    out
}

/// Replaces the whole word `from` with `to` (ASCII word characters: letters, digits, `_`).
fn replace_word(text: &str, from: &str, to: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        out.push_str(&rest[..at]);
        let after = rest[at + from.len()..].chars().next();
        let whole = !out.chars().last().is_some_and(is_word) && !after.is_some_and(is_word);
        out.push_str(if whole { to } else { from });
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

/// The runbooks' placeholders replaced by the test's names.
fn substitute(sql: &str) -> String {
    replace_word(&replace_word(&replace_word(sql, "main", POOL), "app", ROLE), "api", APP)
}

/// Runs one statement with `psql` as the superuser; its rows, fields separated by `|`.
fn psql(url: &str, sql: &str) -> Result<Vec<String>, String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// Expected in place of a field: a row `role | limit | sessions | slots left | ...` of the test's
/// role with its limit and no slot left (sessions may pass the limit by one connect in flight).
const ROLE_FULL: &str = "<the role's row: no connection slot left>";

/// Whether `output` has the role's row with its limit and no slot left.
fn role_is_full(output: &str, limit: i64) -> bool {
    output.lines().any(|line| {
        let f: Vec<&str> = line.split('|').collect();
        f.len() > 5 && f[1] == ROLE && f[2] == limit.to_string() && f[4].parse::<i64>().is_ok_and(|left| left <= 0)
    })
}

/// One problem made live on the server, and what a runbook's output must show of it.
#[derive(Debug, Default)]
struct Live {
    /// Idle in a transaction, holding the row lock on `jobs` id 1.
    holder: i32,
    /// Blocked on the holder's lock.
    waiter: i32,
    /// The `NetworkPath::Nat` pool's session, idle in a transaction with an advisory lock.
    nat: i32,
    nat_tag: String,
    /// A pool connection that ran `LISTEN`.
    listener: i32,
    /// poolwatch's census connection.
    census: i32,
    /// The role's connection limit, reached.
    role_limit: i64,
}

impl Live {
    /// What each runbook's diagnosis must print: every field listed (between `|` or line ends).
    fn expected(&self) -> BTreeMap<&'static str, Vec<String>> {
        let tag = format!("{APP} pw:{POOL}");
        let pid = |p: i32| p.to_string();
        let role_full = ROLE_FULL.to_owned();
        let role_setting = "{idle_session_timeout=1h}".to_owned();
        let sessions = vec![tag.clone(), self.nat_tag.clone()];
        let mut e: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        e.insert("PoolwatchTransactionStuck", vec![pid(self.holder), pid(self.nat)]);
        e.insert("PoolwatchLockWait", vec![pid(self.waiter), pid(self.holder), format!("{{{}}}", self.holder)]);
        e.insert("PoolwatchLeakSuspects", vec![pid(self.holder), pid(self.waiter), pid(self.nat)]);
        e.insert("PoolwatchWorkStalled", vec![pid(self.holder), pid(self.waiter), pid(self.nat)]);
        e.insert("PoolwatchPoolSaturated", vec![pid(self.holder), pid(self.waiter), pid(self.listener), pid(self.nat)]);
        e.insert("PoolwatchStrandedSlots", vec![pid(self.holder), pid(self.listener), pid(self.nat)]);
        e.insert("PoolwatchPoolExhausted", [sessions.clone(), vec![role_full.clone()]].concat());
        e.insert("PoolwatchAcquireTimeouts", [sessions.clone(), vec![role_full.clone()]].concat());
        e.insert("PoolwatchAcquireWaiters", [sessions.clone(), vec![role_full.clone()]].concat());
        e.insert("PoolwatchCensusDown", vec![pid(self.census), role_full]);
        e.insert("PoolwatchPhantomGapGrowing", [sessions.clone(), vec![role_setting.clone()]].concat());
        e.insert("PoolwatchPhantomGapPresent", sessions.clone());
        e.insert("PoolwatchFleetPhantomGapGrowing", sessions.clone());
        e.insert("PoolwatchFleetPhantomGapShare", [sessions.clone(), vec![role_setting.clone()]].concat());
        e.insert("PoolwatchFleetGap", vec![tag.clone()]);
        e.insert("PoolwatchListenerDown", vec![pid(self.listener)]);
        e.insert("PoolwatchListenerReconnectLoop", vec![pid(self.listener), role_setting.clone()]);
        e.insert("PoolwatchListenerIdleSessionTimeout", vec![role_setting.clone()]);
        e.insert("PoolwatchClientSocketsCloseWait", vec![role_setting.clone()]);
        e.insert("PoolwatchConfigHazard", vec![role_setting]);
        e.insert("PoolwatchSlowConnects", vec![tag]);
        e
    }
}

async fn pid_of(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn).await.unwrap()
}

/// Whether the one-value query `sql` answers `t`.
fn server_shows(url: &str, sql: &str) -> bool {
    psql(url, sql).map(|rows| rows.first().is_some_and(|r| r == "t")).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_query_returns_the_sessions_of_its_live_problem() {
    recorder();
    let cluster = Cluster::start();
    let url = cluster.url();
    let setup = format!(
        "CREATE ROLE {ROLE} LOGIN; GRANT pg_read_all_stats TO {ROLE};
         ALTER ROLE {ROLE} SET idle_session_timeout = '1h';
         CREATE TABLE jobs (id int PRIMARY KEY, n int); INSERT INTO jobs VALUES (1, 0);
         GRANT ALL ON jobs TO {ROLE};"
    );
    psql(&url, &setup).expect("set up the role and the table");
    let options = cluster.options().username(ROLE).application_name(APP);
    let pool = PgPoolOptions::new().max_connections(8).connect_with(options.clone()).await.unwrap();
    // The default Config: what an app gets.
    let watch = instrument_pool(&pool, Config::new(POOL)).unwrap();
    eventually(Duration::from_secs(30), "the first census", async || watch.snapshot().server.map(|_| ())).await;
    let db = watch.pool();
    let mut live = Live::default();

    // Incident 3: a transaction left open holding a row lock, and a session blocked on it.
    let mut holder = db.begin().await.unwrap();
    live.holder = pid_of(&mut holder).await;
    holder.execute("UPDATE jobs SET n = n + 1 WHERE id = 1").await.unwrap();
    let mut waiter = db.acquire().await.unwrap();
    live.waiter = pid_of(&mut waiter).await;
    let blocked = tokio::spawn(async move {
        let _ = waiter.execute("UPDATE jobs SET n = n + 1 WHERE id = 1").await;
        waiter
    });
    let waits = format!("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = {}", live.waiter);
    eventually(Duration::from_secs(10), "the waiter waits on the lock", async || {
        server_shows(&url, &waits).then_some(())
    })
    .await;

    // Incident 1: a leaked slot whose session ended; the pool keeps counting it.
    let mut leaked = db.acquire().await.unwrap().leak();
    let leaked_pid = pid_of(&mut leaked).await;
    leaked.close().await.unwrap();
    let gone = format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {leaked_pid})");
    eventually(Duration::from_secs(10), "the leaked session ended", async || server_shows(&url, &gone).then_some(()))
        .await;

    // A LISTEN session on a pool connection (what a listener's connect callback does).
    let mut listener = db.acquire().await.unwrap();
    live.listener = pid_of(&mut listener).await;
    listener.execute("LISTEN jobs").await.unwrap();

    // A `NetworkPath::Nat` replica: its sessions carry the per-process nonce.
    let nat_pool = PgPoolOptions::new().max_connections(2).connect_with(options.clone()).await.unwrap();
    let nat_watch = instrument_pool(&nat_pool, Config::new(POOL).network_path(NetworkPath::Nat)).unwrap();
    live.nat_tag = nat_watch.application_name().to_owned();
    assert!(live.nat_tag.starts_with(&format!("{APP} pw:{POOL}:")), "{}", live.nat_tag);
    let mut nat = nat_watch.pool().begin().await.unwrap();
    live.nat = pid_of(&mut nat).await;
    nat.execute("SELECT pg_advisory_lock(42)").await.unwrap();

    // poolwatch's census connection.
    let census = format!("SELECT pid FROM pg_stat_activity WHERE application_name = 'poolwatch-census:{POOL}'");
    live.census = psql(&url, &census).unwrap().first().and_then(|p| p.parse().ok()).expect("the census session");

    // An idle-session kill: a session of the role with a short idle_session_timeout.
    let mut doomed =
        PgConnection::connect_with(&options.clone().options([("idle_session_timeout", "100ms")])).await.unwrap();
    let doomed_pid = pid_of(&mut doomed).await;
    let gone = format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {doomed_pid})");
    eventually(Duration::from_secs(10), "the server ends the idle session", async || {
        server_shows(&url, &gone).then_some(())
    })
    .await;
    drop(doomed);

    // The runbooks' per-connection fix: `options` in the app's URL beats the role's setting.
    let url_fix =
        format!("postgres://{ROLE}@127.0.0.1:{}/postgres?options=-c%20idle_session_timeout%3D0", cluster.port());
    let mut fixed = PgConnection::connect(&url_fix).await.unwrap();
    let value: String = sqlx::query_scalar("SHOW idle_session_timeout").fetch_one(&mut fixed).await.unwrap();
    assert_eq!(value, "0", "options=-c idle_session_timeout=0 in the URL overrides the role's 1h");
    fixed.close().await.unwrap();

    // The role out of connection slots: its limit is what it holds now, once poolwatch's
    // start-up lint connections (short-lived) are gone.
    let lint = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE usename = '{ROLE}' AND application_name LIKE 'poolwatch-lint:%')"
    );
    eventually(Duration::from_secs(10), "the start-up lint is done", async || server_shows(&url, &lint).then_some(()))
        .await;
    let count = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'");
    live.role_limit = psql(&url, &count).unwrap().first().and_then(|c| c.parse().ok()).expect("a count");
    psql(&url, &format!("ALTER ROLE {ROLE} CONNECTION LIMIT {}", live.role_limit)).unwrap();

    let failures = run_every_runbook(&url, &live);
    assert!(failures.is_empty(), "runbook queries that miss their live problem:\n{}", failures.join("\n"));

    drop((holder, nat, listener));
    blocked.abort();
    watch.shutdown().await;
    nat_watch.shutdown().await;
}

/// Runs each runbook's diagnosis SQL; the failures, one line each.
fn run_every_runbook(url: &str, live: &Live) -> Vec<String> {
    let expected = live.expected();
    let mut failures = Vec::new();
    for (name, text) in runbooks() {
        let must_show = expected.get(name.as_str());
        let mut output = String::new();
        for block in diagnosis_blocks(&text, "sql") {
            for statement in statements(&block) {
                let sql = substitute(&statement);
                match psql(url, &sql) {
                    Err(e) => failures.push(format!("{name}: `{}` fails: {}", sql.trim(), e.trim())),
                    Ok(rows) if rows.is_empty() && must_show.is_some() => {
                        failures.push(format!("{name}: `{}` returns nothing while its problem is live", sql.trim()))
                    }
                    Ok(rows) => rows.iter().for_each(|r| output.push_str(&format!("|{r}|\n"))),
                }
            }
        }
        for field in must_show.into_iter().flatten() {
            let shown = if field == ROLE_FULL {
                role_is_full(&output, live.role_limit)
            } else {
                output.contains(&format!("|{field}|"))
            };
            if !shown {
                failures.push(format!("{name}: its diagnosis does not show `{field}`; it printed:\n{output}"));
            }
        }
    }
    failures
}

/// The identifiers of a PromQL expression that name series: not functions, aggregations,
/// keywords, label names (inside `{}` or a `by`/`without`/`on`/`ignoring`/`group_*` list),
/// numbers, durations or strings.
fn promql_series_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const NOT_SERIES: [&str; 19] = [
        "and", "or", "unless", "offset", "bool", "inf", "nan", "Inf", "NaN", "sum", "count", "avg", "min", "max",
        "topk", "bottomk", "quantile", "stddev", "group",
    ];
    // Strings and label matchers blanked out.
    let mut text = Vec::new();
    let (mut in_string, mut braces, mut previous) = (false, 0u32, ' ');
    for c in expr.chars() {
        let blank = in_string || braces > 0 || c == '"' || c == '{' || c == '}';
        match c {
            '"' if previous != '\\' => in_string = !in_string,
            '{' if !in_string => braces += 1,
            '}' if !in_string => braces = braces.saturating_sub(1),
            _ => {}
        }
        text.push(if blank { ' ' } else { c });
        previous = c;
    }
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    // One entry per open parenthesis: whether it holds label names.
    let mut parens: Vec<bool> = Vec::new();
    let mut next_is_label_list = false;
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        if !is_ident(c) {
            match c {
                '(' => parens.push(std::mem::take(&mut next_is_label_list)),
                ')' => {
                    parens.pop();
                }
                '[' => {
                    // A range: skip to its end.
                    while i < text.len() && text[i] != ']' {
                        i += 1;
                    }
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && is_ident(text[i]) {
            i += 1;
        }
        let token: String = text[start..i].iter().collect();
        let next = text[i..].iter().find(|c| !c.is_whitespace()).copied();
        if LABEL_LISTS.contains(&token.as_str()) {
            next_is_label_list = next == Some('(');
            continue;
        }
        let in_label_list = parens.last().copied().unwrap_or(false);
        let skip = in_label_list
            || next == Some('(')
            || token.starts_with(|c: char| c.is_ascii_digit())
            || NOT_SERIES.contains(&token.as_str());
        if !skip {
            names.insert(token);
        }
    }
    names
}

/// The recording rules' names in the shipped rule files.
fn recording_rules() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("alerts")).expect("alerts/") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".rules.yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("rule file");
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        for group in doc["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let Some(name) = rule["record"].as_str() {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

#[test]
fn every_promql_name_in_the_runbooks_is_a_catalog_metric_or_a_recording_rule() {
    let mut known: BTreeSet<String> = recording_rules();
    for m in catalog::ALL {
        known.insert(m.name.to_owned());
        if m.kind == catalog::Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                known.insert(format!("{}{suffix}", m.name));
            }
        }
    }
    // Prometheus's own series and postgres_exporter's (alerts/postgres_exporter/queries.yaml).
    known.extend(["up".to_owned(), catalog::EXPORTER_SESSIONS.to_owned()]);
    let mut unknown = Vec::new();
    for (name, text) in runbooks() {
        for block in diagnosis_blocks(&text, "promql") {
            for line in block.lines().filter(|l| !l.trim_start().starts_with('#')) {
                for series in promql_series_names(line).into_iter().filter(|s| !known.contains(s)) {
                    unknown.push(format!("{name}: `{series}` in `{}`", line.trim()));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "PromQL names neither poolwatch nor its rules export:\n{}", unknown.join("\n"));
}

#[test]
fn the_promql_scan_finds_series_and_skips_labels_functions_and_keywords() {
    let names = promql_series_names(
        r#"sum by (le, path) (rate(x_bucket{a="b{c}"}[5m])) / on (job) group_left (pod) y - changes(z[6h]) > bool 0"#,
    );
    assert_eq!(names, ["x_bucket", "y", "z"].iter().map(|s| s.to_string()).collect());
    assert_eq!(statements("SELECT 1; -- one\n-- two\nSELECT\n 2;\n"), ["SELECT 1; -- one\n", "-- two\nSELECT\n 2;\n"]);
    assert_eq!(substitute("WHERE application_name LIKE '%pw:main' AND usename = 'app' -- api's domain"), {
        format!("WHERE application_name LIKE '%pw:{POOL}' AND usename = '{ROLE}' -- {APP}'s domain")
    });
}

/// One structure on every page, the names of today's crate, the role's real settings, and an
/// undo for every role-wide change.
#[test]
fn every_runbook_has_the_structure_today_s_names_and_an_undo_for_each_change() {
    let sections = [
        "## Meaning",
        "## Impact",
        "## Diagnosis",
        "### Confirm",
        "### Likely causes",
        "## Mitigate",
        "## Save before a restart",
        "## Escalation",
        "## Fix",
    ];
    let mut problems = Vec::new();
    for (name, text) in runbooks() {
        let mut at = 0;
        for section in sections {
            match text[at..].find(section) {
                Some(found) => at += found + section.len(),
                None => problems.push(format!("{name}: no `{section}` (in this order: {sections:?})")),
            }
        }
        if !text.contains("../incidents.md") {
            problems.push(format!("{name}: does not link the incidents page (../incidents.md)"));
        }
        if text.contains("shared/incidents") || text.contains("project brief") {
            problems.push(format!("{name}: cites incidents a reader cannot find; link ../incidents.md"));
        }
        // Before the stable tag, sessions were `... pw:main:<nonce>`; today the suffix is NAT only.
        if text.contains("pw:main:%") || text.contains("'poolwatch-census:main:") {
            problems.push(format!("{name}: filters on the old per-process application_name"));
        }
        if text.contains("SHOW idle_session_timeout") {
            problems.push(format!("{name}: `SHOW` reads your own session; read pg_db_role_setting"));
        }
        for line in text.lines().filter(|l| l.contains("ALTER ROLE app SET ")) {
            let setting = line.split("ALTER ROLE app SET ").nth(1).and_then(|s| s.split_whitespace().next());
            let setting = setting.unwrap_or_default();
            if !text.contains(&format!("ALTER ROLE app RESET {setting}")) {
                problems.push(format!("{name}: `ALTER ROLE app SET {setting}` without its undo"));
            }
        }
        if text.contains("Escalation") && !text.contains("owner") {
            problems.push(format!("{name}: escalation names no owner"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every PromQL line of every runbook parses: `promtool check rules` on them as recording rules.
#[test]
fn promtool_parses_every_runbook_expression() {
    let mut rules = String::from("groups:\n  - name: runbook-expressions\n    rules:\n");
    let mut n = 0;
    for (name, text) in runbooks() {
        for block in diagnosis_blocks(&text, "promql") {
            for line in block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                n += 1;
                let expr = serde_json::to_string(line).unwrap();
                rules.push_str(&format!("      # {name}\n      - record: runbook:expr{n}\n        expr: {expr}\n"));
            }
        }
    }
    let file = tempfile::Builder::new().prefix("poolwatch-runbook-exprs-").suffix(".yml").tempfile().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules", file.path().to_str().unwrap()])
        .output()
        .expect("promtool (Debian package `prometheus`; scripts/prereqs installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains(&format!("SUCCESS: {n} rules found")), "{text}");
}

/// PoolwatchLockWait's claim: the server breaks a deadlock between advisory locks of two
/// sessions (`deadlock detected`, 40P01). The session-level lock the loser already held stays
/// held: the winner waits until that session ends (here, its task drops the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_breaks_a_deadlock_between_advisory_locks() {
    let cluster = Cluster::shared();
    let mut tasks = Vec::new();
    let (held_tx, held_rx) = tokio::sync::watch::channel(0u32);
    for (mine, theirs) in [(1i64, 2i64), (2, 1)] {
        let options = cluster.options();
        let mut held = held_rx.clone();
        let held_tx = held_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&options).await.unwrap();
            let lock = "SELECT pg_advisory_lock($1)";
            sqlx::query(lock).bind(mine).execute(&mut conn).await.unwrap();
            held_tx.send_modify(|n| *n += 1);
            held.wait_for(|n| *n == 2).await.unwrap();
            // The loser's connection is dropped with its task: its locks go with the session.
            sqlx::query(lock).bind(theirs).execute(&mut conn).await.map(drop)
        }));
    }
    let mut codes = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.unwrap() {
            codes.push(e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()));
        }
    }
    assert_eq!(codes, [Some("40P01".to_owned())], "exactly one of the two is ended as a deadlock");
}
