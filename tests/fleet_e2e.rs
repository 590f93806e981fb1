//! Fleet scale, end to end: 20 app processes (this test binary re-run as a replica), each
//! watching one pool with a listener against one real PostgreSQL, one of them leaking a pool
//! slot every 2 s; a real Prometheus scrapes all of them and evaluates the mixin's fleet
//! recording rules and alerts (rendered from `mixin/` with a test time scale). The fleet alert
//! must name the leaking replica, every recording rule (the fleet-gap ones read a real
//! postgres_exporter) and every query of the fleet dashboard must return data.
//!
//! Robust on a loaded 2-core machine: Prometheus scrapes every 3 s with a 3 s timeout (a busy
//! replica may take more than a second to answer), the rule windows are a few scrapes long,
//! every step waits on a condition, replicas census every 3 s and heartbeat every 5 s, and
//! each replica exits as soon as the test process ends (its stdin closes), or after 15 min.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, ListenerConfig, WatchedListener};
use serde_json::Value as Json;
use sqlx::postgres::PgPoolOptions;
use support::prometheus::{PostgresExporter, Prometheus, http_get, url_encode};
use support::{Cluster, eventually};

const REPLICAS: usize = 20;
const LEAKER: usize = 7;
/// Prometheus' scrape interval and timeout.
const SCRAPE: Duration = Duration::from_secs(3);
/// What the fleet dashboard's `$__rate_interval` becomes: Grafana's default, 4 scrapes.
const RATE_INTERVAL: &str = "12s";

/// The replica processes, killed on drop.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The mixin's fleet rules and alerts at a test time scale (seconds instead of hours), as a
/// user overrides `_config`. JSON is valid YAML for Prometheus.
fn fleet_rules() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let program = r#"
        local m = (import 'mixin.libsonnet') + { _config+:: {
          gapPresentWindow: '10s', fleetGrowthWindow: '45s', fleetGrowthMinSlots: 2,
          fleetGapShare: 0.02, recordingRateWindow: '12s',
          forDurations+: { PoolwatchFleetPhantomGapShare: '6s', PoolwatchFleetPhantomGapGrowing: '6s' },
        } };
        { groups: m.prometheusRules.groups + [g for g in m.prometheusAlerts.groups if g.name == 'poolwatch-fleet'] }
    "#;
    let out = Command::new("jsonnet")
        .args(["-J", "mixin", "-e", program])
        .current_dir(root)
        .output()
        .expect("run jsonnet (scripts/prereqs installs it)");
    assert!(out.status.success(), "jsonnet: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn query(prometheus: SocketAddr, promql: &str) -> Vec<Json> {
    let body = http_get(prometheus, &format!("/api/v1/query?query={}", url_encode(promql))).await.unwrap_or_default();
    let json: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
    json["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_20_replicas_names_the_leaking_one() {
    let cluster = Cluster::start_with(&[("max_connections", "200")]);
    let ports: Vec<u16> = (0..REPLICAS).map(|_| support::cluster::free_port()).collect();
    let exe = std::env::current_exe().expect("test binary");
    // The leaking replica starts leaking once this file exists: after Prometheus scrapes the
    // whole fleet, so the growth is seen from its start on a loaded machine too.
    let go = support::cluster::temp_dir("fleet-go").join("leak");
    let mut fleet = Fleet(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let child = Command::new(&exe)
            .args(["--exact", "replica", "--ignored", "--nocapture", "--test-threads=1"])
            .env("POOLWATCH_REPLICA", i.to_string())
            .env("POOLWATCH_REPLICA_LEAKS", if i == LEAKER { "1" } else { "0" })
            .env("POOLWATCH_REPLICA_METRICS", format!("127.0.0.1:{port}"))
            .env("POOLWATCH_REPLICA_DB", cluster.url())
            .env("POOLWATCH_REPLICA_GO", &go)
            // The replica reads its stdin to know when the test is gone (EOF).
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a replica");
        fleet.0.push(child);
    }
    let targets: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
    let started = Instant::now();
    for t in &targets {
        eventually(Duration::from_secs(120), "every replica serves /metrics with a census", async || {
            http_get(*t, "/metrics").await.filter(|m| m.contains("poolwatch_census_up")).map(|_| ())
        })
        .await;
    }
    println!("{REPLICAS} replicas up in {:.1}s", started.elapsed().as_secs_f64());

    // postgres_exporter with poolwatch's query file: the server side of the fleet-gap rules.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exporter = PostgresExporter::start(&cluster.url(), &root.join("alerts/postgres_exporter/queries.yaml"));
    let prometheus = Prometheus::start_jobs_every(
        &[("api", targets.clone()), ("postgres", vec![exporter.addr])],
        &fleet_rules(),
        SCRAPE,
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let up = query(prometheus.addr, r#"count(up{job="api"} == 1)"#).await;
        if up.first().and_then(|u| u["value"][1].as_str()) == Some(&REPLICAS.to_string()) {
            break;
        }
        let raw = http_get(prometheus.addr, "/api/v1/query?query=up").await;
        assert!(Instant::now() < deadline, "Prometheus does not scrape the fleet: {raw:?}\n{}", prometheus.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    std::fs::write(&go, "go").expect("signal the leak");
    let leak_started = Instant::now();
    println!("leak signalled {:.1}s after start", started.elapsed().as_secs_f64());
    let leaker = targets[LEAKER].to_string();
    let deadline = Instant::now() + Duration::from_secs(240);
    let fired = loop {
        let alerts: Vec<Json> = match http_get(prometheus.addr, "/api/v1/alerts").await {
            Some(body) => serde_json::from_str::<Json>(&body)
                .ok()
                .and_then(|j| j["data"]["alerts"].as_array().cloned())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let growing: Vec<String> = alerts
            .iter()
            .filter(|a| a["labels"]["alertname"] == "PoolwatchFleetPhantomGapGrowing" && a["state"] == "firing")
            .map(|a| a["labels"]["instance"].as_str().unwrap_or("").to_owned())
            .collect();
        if !growing.is_empty() {
            break growing;
        }
        if Instant::now() > deadline {
            let gaps = query(prometheus.addr, "poolwatch_phantom_connections != 0").await;
            let up = query(prometheus.addr, "count(up == 1)").await;
            panic!(
                "PoolwatchFleetPhantomGapGrowing did not fire in 240s; alerts {alerts:?}; non-zero gaps {gaps:?}; \
                 targets up {up:?}; Prometheus log:\n{}",
                prometheus.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "PoolwatchFleetPhantomGapGrowing firing {:.1}s after the leak started, naming {fired:?}",
        leak_started.elapsed().as_secs_f64()
    );
    assert_eq!(fired, vec![leaker.clone()], "the fleet alert names the leaking replica, and only it");

    let share = eventually(Duration::from_secs(120), "PoolwatchFleetPhantomGapShare fires", async || {
        let body = http_get(prometheus.addr, "/api/v1/alerts").await?;
        let json: Json = serde_json::from_str(&body).ok()?;
        json["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "PoolwatchFleetPhantomGapShare" && a["state"] == "firing")
            .map(|a| a["value"].as_str().unwrap_or("").to_owned())
    })
    .await;
    println!("PoolwatchFleetPhantomGapShare firing, share {share} (1 of {REPLICAS})");
    assert!(share.starts_with("5e-02") || share.starts_with("0.05"), "one replica of 20: {share}");

    // Every recording rule and every query of the fleet dashboard returns data.
    let rules: Json = serde_json::from_str(&fleet_rules()).expect("rules JSON");
    let records: Vec<String> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect();
    assert!(records.len() >= 10, "{records:?}");
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/poolwatch-fleet.json"))
            .expect("fleet dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries: Vec<(String, String)> = records.iter().map(|r| (format!("rule {r}"), r.clone())).collect();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let expr = expr
                .replace("$job", ".+")
                .replace("$instance", ".+")
                .replace("$pool", ".+")
                .replace("$__rate_interval", RATE_INTERVAL);
            queries.push((format!("panel {:?}", panel["title"].as_str().unwrap_or("?")), expr));
        }
    }
    for (what, promql) in &queries {
        let result = eventually(Duration::from_secs(60), &format!("{what} returns data"), async || {
            let r = query(prometheus.addr, promql).await;
            (!r.is_empty()).then_some(r)
        })
        .await;
        println!("{what}: {} series", result.len());
    }
    // Server side (postgres_exporter) against the fleet's pools: the leaked slots, at most 8.
    let gap = query(prometheus.addr, "application_name:poolwatch_fleet_gap_connections:sum").await;
    let gap: f64 = gap.first().and_then(|g| g["value"][1].as_str()?.parse().ok()).unwrap_or(0.0);
    assert!((2.0..=8.0).contains(&gap), "the fleet gap counts the leaker's slots: {gap}");
    println!("fleet gap (pools believe minus server sessions, whole job): {gap}");
    let series = query(prometheus.addr, r#"count({job="api"})"#).await;
    println!(
        "figures: {REPLICAS} replicas, {} series scraped in job api ({} per replica), {} queries with data",
        series[0]["value"][1].as_str().unwrap_or("?"),
        series[0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).map_or(0.0, |v| v / REPLICAS as f64),
        queries.len()
    );
    drop(fleet);
    drop(prometheus);
    drop(exporter);
}

/// One app process of the fleet: run by the test above (`--ignored --exact replica`), with its
/// setup in POOLWATCH_REPLICA_* variables; the README's setup, one pool, one listener, traffic.
#[tokio::test]
#[ignore = "a replica process of fleet_of_20_replicas_names_the_leaking_one, started by it"]
async fn replica() {
    let index: usize = std::env::var("POOLWATCH_REPLICA").expect("run by the fleet test").parse().expect("index");
    let leaks = std::env::var("POOLWATCH_REPLICA_LEAKS").as_deref() == Ok("1");
    let metrics: SocketAddr = std::env::var("POOLWATCH_REPLICA_METRICS").expect("addr").parse().expect("addr");
    let db: sqlx::postgres::PgConnectOptions = std::env::var("POOLWATCH_REPLICA_DB").expect("db").parse().expect("url");
    let go = std::path::PathBuf::from(std::env::var("POOLWATCH_REPLICA_GO").expect("go file"));
    poolwatch::export::Exporter::new().with_http_listener(metrics).install().expect("recorder");
    let pool =
        PgPoolOptions::new().max_connections(10).min_connections(0).connect_with(db.clone()).await.expect("pool");
    let watch = poolwatch::instrument_pool(
        &pool,
        Config::new("main")
            .sample_interval(Duration::from_millis(500))
            .census_interval(Duration::from_secs(3))
            .heartbeat_interval(Duration::from_secs(5)),
    )
    .expect("instrument");
    let mut listener = WatchedListener::connect(db, ListenerConfig::new("main", "jobs")).await.expect("listener");
    listener.listen("jobs").await.expect("LISTEN");
    let db = watch.pool();
    let mut held = Vec::new();
    // Exit when the test process is gone (stdin at EOF), whatever killed it; at the latest
    // after 15 min.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut tick = 0u32;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tick += 1;
        let _ = sqlx::query("SELECT 1").execute(&db).await;
        // The leaking replica, once told to: every 3 s a connection is checked out, its server
        // session ends (as incident 1's listener slot did) and the app keeps holding it; at
        // most 8 of its 10 slots.
        if leaks
            && tick.is_multiple_of(6)
            && held.len() < 8
            && go.exists()
            && let Ok(mut conn) = db.acquire().await
        {
            {
                let pid: Result<i32, _> = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await;
                if let Ok(pid) = pid {
                    let _ = sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&db).await;
                    held.push(conn);
                }
            }
        }
    }
    assert!(index < REPLICAS && (!leaks || !held.is_empty()), "replica {index} ran; leaking: {leaks}");
}
