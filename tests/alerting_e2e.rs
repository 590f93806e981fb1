//! End to end on real parts: PostgreSQL, this process's `/metrics`, a real Prometheus loading
//! `alerts/poolwatch.rules.yml` and a real Alertmanager running `alerts/alertmanager.yml`,
//! delivering to a webhook in this test. A pool held at its max must page nobody but open a
//! ticket for `PoolwatchPoolSaturated`, and the alert must clear when the pool frees up.
//!
//! The copies given to the daemons differ from the shipped files only in timing: every `for:`
//! is 2 s (the thresholds themselves are unit-tested by promtool), Alertmanager's `group_wait`
//! is 1 s, and the receivers' webhook URLs point at this test.
//!
//! This process's `/metrics` is the crate's own `export::Exporter` with its HTTP listener (the
//! README's setup), hence feature `prometheus`.

#![cfg(feature = "prometheus")]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolwatch::instrument_pool;
use serde_json::Value;
use support::prometheus::{Alertmanager, Prometheus, http_get};
use support::{Cluster, eventually, fast_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ALERT: &str = "PoolwatchPoolSaturated";

/// The shipped rule file with every `for:` shortened to 2 s.
fn fast_rules() -> String {
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/poolwatch.rules.yml")).unwrap();
    let mut out = String::new();
    for line in rules.lines() {
        match line.trim_start().strip_prefix("for: ") {
            Some(_) => out.push_str(&format!("{}for: 2s\n", &line[..line.len() - line.trim_start().len()])),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    assert!(out.contains("for: 2s") && !out.contains("for: 5m"));
    out
}

/// The shipped Alertmanager config, delivering to `webhook` after a 1 s group wait.
fn test_alertmanager_config(webhook: SocketAddr) -> String {
    let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/alertmanager.yml")).unwrap();
    assert!(config.contains("http://127.0.0.1:9095/") && config.contains("group_wait: 30s"));
    config.replace("http://127.0.0.1:9095/", &format!("http://{webhook}/")).replace("group_wait: 30s", "group_wait: 1s")
}

/// A webhook receiver (axum): records `(path, body)` of every request.
async fn webhook() -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
        let sink = Arc::clone(&sink);
        async move { sink.lock().unwrap().push((uri.to_string(), body)) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

async fn json(addr: SocketAddr, path: &str) -> Option<Value> {
    serde_json::from_str(&http_get(addr, path).await?).ok()
}

/// Prometheus's state of the alerting rule `name` ("inactive", "pending", "firing").
async fn rule_state(prometheus: SocketAddr, name: &str) -> Option<String> {
    let rules = json(prometheus, "/api/v1/rules?type=alert").await?;
    rules["data"]["groups"]
        .as_array()?
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .find_map(|r| (r["name"] == name).then(|| r["state"].as_str().unwrap_or_default().to_owned()))
}

/// When Prometheus last evaluated the alerting rule `name` (its `lastEvaluation`).
async fn rule_evaluated_at(prometheus: SocketAddr, name: &str) -> Option<String> {
    let rules = json(prometheus, "/api/v1/rules?type=alert").await?;
    rules["data"]["groups"]
        .as_array()?
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .find_map(|r| (r["name"] == name).then(|| r["lastEvaluation"].as_str().map(str::to_owned)))
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_reaches_alertmanager_as_a_ticket_and_clears() {
    // Installed before the pool is watched: the series registered at start are served too.
    let metrics = SocketAddr::from(([127, 0, 0, 1], support::cluster::free_port()));
    poolwatch::export::Exporter::new().with_http_listener(metrics).install().expect("install the recorder");
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 2).await;
    let watch = instrument_pool(&pool, fast_config("e2e")).unwrap();

    let (hook, received) = webhook().await;
    let dir = tempfile::Builder::new().prefix("poolwatch-e2e-").tempdir().unwrap();
    let am_config = dir.path().join("alertmanager.yml");
    std::fs::write(&am_config, test_alertmanager_config(hook)).unwrap();
    let alertmanager = Alertmanager::start(&am_config);
    let rules = fast_rules();
    let alerts_in_file = rules.lines().filter(|l| l.trim_start().starts_with("- alert: ")).count();
    let prometheus = Prometheus::start(metrics, &rules, alertmanager.addr);
    let logs = || format!("prometheus log:\n{}\nalertmanager log:\n{}", prometheus.log(), alertmanager.log());

    // Prometheus loaded every rule, scrapes the pool, and finds it healthy.
    let loaded = eventually(Duration::from_secs(180), "Prometheus loads the rules", async || {
        let rules = json(prometheus.addr, "/api/v1/rules?type=alert").await?;
        let n = rules["data"]["groups"]
            .as_array()?
            .iter()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(loaded, alerts_in_file, "every alert of the rule file is loaded\n{}", logs());
    eventually(Duration::from_secs(180), "Prometheus scrapes db_client_connection_max{pool=e2e} = 2", async || {
        let v = json(prometheus.addr, "/api/v1/query?query=db_client_connection_max").await?;
        v["data"]["result"]
            .as_array()?
            .iter()
            .find(|r| r["metric"]["db_client_connection_pool_name"] == "e2e" && r["value"][1] == "2")
            .map(|_| ())
    })
    .await;
    // Several evaluations with a free pool (counted, not slept for: a loaded machine slows them).
    let mut seen = Vec::new();
    eventually(Duration::from_secs(180), "3 evaluations of the rule after the pool was scraped", async || {
        let at = rule_evaluated_at(prometheus.addr, ALERT).await?;
        if !seen.contains(&at) {
            seen.push(at);
        }
        (seen.len() > 3).then_some(())
    })
    .await;
    assert_eq!(rule_state(prometheus.addr, ALERT).await.as_deref(), Some("inactive"), "{}", logs());
    assert!(received.lock().unwrap().is_empty(), "nothing is notified while the pool is healthy");

    // Saturate: hold both connections.
    let held = [pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
    let saturated_at = std::time::Instant::now();
    let delivered = eventually(Duration::from_secs(300), "Alertmanager delivers PoolwatchPoolSaturated", async || {
        let posts = received.lock().unwrap().clone();
        posts.into_iter().find_map(|(path, body)| {
            let v: Value = serde_json::from_str(&body).ok()?;
            let alert = v["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == ALERT && a["status"] == "firing")?
                .clone();
            Some((path, v["receiver"].clone(), alert))
        })
    })
    .await;
    let (path, receiver, alert) = delivered;
    eprintln!("PoolwatchPoolSaturated delivered to the webhook {:?} after saturating the pool", saturated_at.elapsed());
    assert_eq!(path, "/ticket", "a warning opens a ticket");
    assert_eq!(receiver, "ticket");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["labels"]["db_client_connection_pool_name"], "e2e");
    assert_eq!(alert["labels"]["job"], "app");
    assert_eq!(alert["annotations"]["summary"], format!("Pool e2e on {metrics}: all 2 connections checked out for 5m"));
    assert!(
        alert["annotations"]["runbook_url"].as_str().unwrap().ends_with("/docs/runbooks/PoolwatchPoolSaturated.md")
    );
    assert!(
        !received.lock().unwrap().iter().any(|(path, _)| path == "/page"),
        "nothing pages: no critical alert fired"
    );
    let in_alertmanager = json(alertmanager.addr, "/api/v2/alerts").await.unwrap();
    let listed = in_alertmanager
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == ALERT)
        .expect("listed by Alertmanager");
    assert_eq!(listed["receivers"][0]["name"], "ticket");

    // Free the pool: the alert resolves in Prometheus.
    drop(held);
    eventually(Duration::from_secs(180), "PoolwatchPoolSaturated resolves", async || {
        (rule_state(prometheus.addr, ALERT).await.as_deref() == Some("inactive")).then_some(())
    })
    .await;

    drop(prometheus);
    drop(alertmanager);
    drop(dir);
    watch.shutdown().await;
    pool.close().await;
    cluster.stop();
}

/// `POST` `body` (JSON) to `http://addr/path`; the response's status line (`None`: not
/// listening yet).
async fn http_post(addr: SocketAddr, path: &str, body: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.lines().next().map(str::to_owned)
}

/// Two services whose pools are both called "main" get one notification each: the shipped
/// Alertmanager config groups by job as well as by alert and pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_of_the_same_name_in_two_services_are_two_notifications() {
    let (hook, received) = webhook().await;
    let dir = std::env::temp_dir().join(format!("poolwatch-groups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let am_config = dir.join("alertmanager.yml");
    std::fs::write(&am_config, test_alertmanager_config(hook)).unwrap();
    let alertmanager = Alertmanager::start(&am_config);
    let alert = |job: &str, instance: &str| {
        format!(
            r#"{{"labels":{{"alertname":"{ALERT}","severity":"warning","job":"{job}","instance":"{instance}","db_client_connection_pool_name":"main"}}}}"#
        )
    };
    // Two instances of "api" (one problem) and one of "worker" (another).
    let body = format!("[{},{},{}]", alert("api", "a:9184"), alert("api", "b:9184"), alert("worker", "w:9184"));
    let status = eventually(Duration::from_secs(60), "Alertmanager accepts alerts", async || {
        let status = http_post(alertmanager.addr, "/api/v2/alerts", &body).await?;
        status.contains(" 200").then_some(status)
    })
    .await;
    assert!(status.contains(" 200"), "{status}\n{}", alertmanager.log());
    // Every alert grouped, and every group notified once.
    let groups = eventually(Duration::from_secs(60), "the alerts grouped and notified", async || {
        let groups = json(alertmanager.addr, "/api/v2/alerts/groups").await?;
        let list = groups.as_array()?;
        let alerts: usize = list.iter().map(|g| g["alerts"].as_array().map_or(0, Vec::len)).sum();
        let delivered = received.lock().unwrap().len();
        (alerts == 3 && delivered >= list.len()).then_some(groups)
    })
    .await;
    let mut sizes: Vec<(String, usize)> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["labels"]["job"].as_str().unwrap_or("").to_owned(), g["alerts"].as_array().map_or(0, Vec::len)))
        .collect();
    sizes.sort();
    assert_eq!(sizes, [("api".to_owned(), 2), ("worker".to_owned(), 1)], "{groups:#}");
    let notifications = received.lock().unwrap().clone();
    assert_eq!(notifications.len(), 2, "one notification per service: {notifications:#?}");
    std::fs::remove_dir_all(&dir).ok();
}
