//! The README's setup, literally: `poolwatch::export::Exporter` with an HTTP listener,
//! installed inside a Tokio runtime as the app's global recorder, `/metrics` read over HTTP
//! from a real watched pool with a real listener on a real server. Checks that promtool parses
//! the exposition, that every histogram the shipped dashboards and alerts read renders `_bucket` series, that every counter an alert reads
//! with `increase()`/`rate()` exists at 0 from the start, and the series budget per pool and
//! per listener.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, Detail, ListenerConfig, WatchedListener};
use sqlx::postgres::PgPoolOptions;
use support::prometheus::http_get;
use support::{Cluster, POOL, eventually};

/// The README's "Use it" setup, with a free loopback port instead of 9184.
fn install_recorder() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], support::cluster::free_port()));
        // Installed inside a runtime of its own on a thread that lives as long as the process,
        // as an app's main runtime would: the listener outlives the test that installed it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                poolwatch::export::Exporter::new().with_http_listener(addr).install().expect("install the recorder");
                tx.send(()).expect("report");
                std::future::pending::<()>().await
            })
        });
        rx.recv().expect("the recorder was installed");
        addr
    })
}

/// `/metrics` over HTTP, as Prometheus scrapes it.
async fn scrape(addr: SocketAddr) -> String {
    eventually(Duration::from_secs(30), "GET /metrics answers", async || http_get(addr, "/metrics").await).await
}

/// The sample lines of `text` whose labels contain `pool`'s label (and, when given, `listener`).
fn series<'a>(text: &'a str, pool: &str, listener: Option<bool>) -> Vec<&'a str> {
    let pool_label = format!("{POOL}=\"{pool}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&pool_label))
        .filter(|l| listener.is_none_or(|want| l.contains("listener=\"") == want))
        .collect()
}

/// Every `<histogram>_bucket` name in the shipped alerts and dashboards.
fn bucket_names_used() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::new();
    for dir in ["alerts", "dashboards"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                text.push_str(&std::fs::read_to_string(&path).expect("read file"));
            }
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.ends_with("_bucket") && poolwatch::catalog::find(t).is_some())
        .map(str::to_owned)
        .collect()
}

/// A pool watched as the README says, with short intervals, and a listener on it.
async fn watched(
    cluster: &Cluster,
    name: &str,
    detail: Detail,
) -> (sqlx::PgPool, poolwatch::PoolWatch, WatchedListener) {
    // The lifecycle hooks too: their series count in the budget.
    let pool = poolwatch::instrument_options_named(PgPoolOptions::new().max_connections(4).min_connections(0), name)
        .connect_with(cluster.options())
        .await
        .expect("connect");
    let config = Config::new(name)
        .sample_interval(Duration::from_millis(100))
        .census_interval(Duration::from_millis(200))
        .heartbeat_interval(Duration::from_millis(200))
        .detail(detail);
    let watch = poolwatch::instrument_pool(&pool, config).expect("instrument");
    let mut listener =
        WatchedListener::connect(cluster.options(), ListenerConfig::new(name, "jobs")).await.expect("listener");
    listener.listen("jobs").await.expect("LISTEN");
    (pool, watch, listener)
}

/// Waits until the census, both heartbeats, the hazard lint, the reachability probe and the
/// stranded-slot figure have published, and some traffic went through the watched pool.
async fn settled(addr: SocketAddr, watch: &poolwatch::PoolWatch, name: &str) -> String {
    let db = watch.pool();
    for _ in 0..5 {
        sqlx::query("SELECT 1").execute(&db).await.expect("query");
    }
    eventually(Duration::from_secs(60), "census, heartbeats, lint and probe published", async || {
        let text = scrape(addr).await;
        let has = |needle: &str| series(&text, name, Some(false)).iter().any(|l| l.starts_with(needle));
        let ready = has("poolwatch_census_up")
            && has("poolwatch_heartbeat_up{")
            && has("poolwatch_config_hazards")
            && has("poolwatch_server_addresses_down")
            && has("poolwatch_client_gap")
            && watch.heartbeat().pool.successes > 0
            && watch.heartbeat().direct.successes > 0
            // Stranded slots are judged 3 samples after the first acquire through WatchedPool.
            && watch.health().stranded_slots.is_some();
        ready.then_some(text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_setup_renders_every_used_histogram_with_buckets() {
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let (pool, watch, _listener) = watched(&cluster, "readme", Detail::Standard).await;
    let text = settled(addr, &watch, "readme").await;
    let used = bucket_names_used();
    assert!(used.len() >= 5, "the shipped artefacts read these histograms: {used:?}");
    for bucket in &used {
        let base = bucket.trim_end_matches("_bucket");
        assert!(text.contains(&format!("# TYPE {base} histogram")), "{base} is not rendered as a histogram:\n{text}");
        let lines: Vec<_> =
            text.lines().filter(|l| l.starts_with(&format!("{bucket}{{")) && l.contains("\"readme\"")).collect();
        assert!(lines.iter().any(|l| l.contains("le=\"+Inf\"")), "no {bucket} series for pool readme:\n{text}");
        println!("{bucket}: {} series", lines.len());
    }
    assert!(!text.contains(" summary"), "a poolwatch histogram rendered as a summary:\n{text}");
    drop(watch);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_parses_the_exposition() {
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let (pool, watch, _listener) = watched(&cluster, "promtool", Detail::Full).await;
    let text = settled(addr, &watch, "promtool").await;
    support::prometheus::promtool_check_metrics(&text);
    assert!(text.contains("# HELP db_client_connection_count "), "descriptions become HELP lines:\n{text}");
    drop(watch);
    pool.close().await;
}

/// The exposition is valid for both formats a scraper may read it as: Prometheus text 0.0.4
/// (`promtool check metrics`) and OpenMetrics (prometheus_client's parser, reading the
/// families as an OpenMetrics consumer maps them). In OpenMetrics a counter `x_total` is the
/// family `x`, so a gauge `x` beside it, or a histogram whose `_count` is another metric's
/// name, is one family twice: the whole scrape is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_is_valid_prometheus_text_and_openmetrics() {
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let (pool, watch, _listener) = watched(&cluster, "formats", Detail::Full).await;
    let _progress = watch.progress();
    // The families a healthy direct pool does not publish: census errors (a census that reads a
    // database that does not exist) and the pooler's figures (a pool behind PgBouncer).
    let failing_pool = support::pool(&cluster, 1).await;
    let failing = Config::new("formats_failing")
        .census_interval(Duration::from_millis(100))
        .direct_connect_options(cluster.options().database("no_such_database"));
    let failing = poolwatch::instrument_pool(&failing_pool, failing).expect("instrument");
    let bouncer = support::pgbouncer::PgBouncer::start(cluster.port(), &[]);
    let pooled_pool = PgPoolOptions::new().max_connections(2).connect_lazy_with(bouncer.options());
    let pooled = Config::new("formats_pooled").sample_interval(Duration::from_millis(100));
    let pooled = poolwatch::instrument_pool(&pooled_pool, bouncer.declared(pooled, &cluster)).expect("instrument");
    settled(addr, &watch, "formats").await;
    let text = eventually(Duration::from_secs(60), "every catalog family in one scrape", async || {
        let text = scrape(addr).await;
        let absent = poolwatch::catalog::ALL.iter().any(|m| !text.contains(&format!("# TYPE {} ", m.name)));
        (!absent).then_some(text)
    })
    .await;
    support::prometheus::promtool_check_metrics(&text);
    let families = support::prometheus::openmetrics_families(&support::prometheus::as_openmetrics(&text));
    for m in poolwatch::catalog::ALL {
        let family = m.name.strip_suffix("_total").unwrap_or(m.name);
        assert!(families.iter().any(|f| f.split(' ').next() == Some(family)), "{family} not read:\n{families:?}");
    }
    println!("{} families read as OpenMetrics", families.len());
    for (watch, pool) in [(watch, pool), (failing, failing_pool), (pooled, pooled_pool)] {
        drop(watch);
        pool.close().await;
    }
}

/// The counters every alert reads with `increase()` / `rate()`, with their equality
/// matchers (`cause="idle_session_timeout"`): `(metric, [(label, value)])`.
fn alert_counter_selectors() -> Vec<(String, Vec<(String, String)>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root.join("alerts")).expect("read alerts") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".rules.yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read rules");
        for func in ["increase(", "rate("] {
            for (i, _) in text.match_indices(func) {
                let rest = &text[i + func.len()..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let Some(m) = poolwatch::catalog::find(&name) else { continue };
                if m.kind != poolwatch::catalog::Kind::Counter {
                    continue;
                }
                let mut matchers = Vec::new();
                if let Some(body) = rest[name.len()..].strip_prefix('{').and_then(|b| b.split_once('}')).map(|b| b.0) {
                    for m in body.split(',') {
                        if let Some((k, v)) = m.split_once('=')
                            && !k.ends_with(['!', '='])
                            && !v.starts_with('~')
                            && k.trim() != "job"
                        {
                            matchers.push((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()));
                        }
                    }
                }
                found.push((name, matchers));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_that_alerts_read_exist_at_zero_from_the_start() {
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let (pool, watch, _listener) = watched(&cluster, "zeros", Detail::Standard).await;
    let _progress = watch.progress();
    // Read before any failure, timeout, reconnect or unit of work could happen.
    let text = scrape(addr).await;
    let selectors = alert_counter_selectors();
    assert!(
        selectors.iter().any(|(n, m)| n == "poolwatch_listener_reconnects_total" && !m.is_empty()),
        "the idle-session alert's selector is found: {selectors:?}"
    );
    for (name, matchers) in &selectors {
        let line = series(&text, "zeros", None).into_iter().find(|l| {
            l.starts_with(&format!("{name}{{")) && matchers.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        });
        let line = line.unwrap_or_else(|| panic!("no {name}{matchers:?} series at start:\n{text}"));
        assert!(line.ends_with(" 0"), "{line} is not 0 at start");
    }
    drop(watch);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_budget_per_pool_and_per_listener() {
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let mut figures = Vec::new();
    for (name, detail) in [("budget", Detail::Standard), ("full", Detail::Full)] {
        let (pool, watch, _listener) = watched(&cluster, name, detail).await;
        let _progress = watch.progress();
        let text = settled(addr, &watch, name).await;
        let (per_pool, per_listener) = (series(&text, name, Some(false)), series(&text, name, Some(true)));
        let mut families: Vec<(String, usize)> = Vec::new();
        for line in &per_pool {
            let family = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"].iter().fold(family, |f, s| f.strip_suffix(s).unwrap_or(f));
            match families.iter_mut().find(|(f, _)| f == family) {
                Some((_, n)) => *n += 1,
                None => families.push((family.to_owned(), 1)),
            }
        }
        println!("{name} ({detail:?}): {} series per pool, {} per listener", per_pool.len(), per_listener.len());
        for (family, n) in &families {
            println!("  {n:3} {family}");
        }
        figures.push((per_pool.len(), per_listener.len()));
        drop(watch);
        pool.close().await;
    }
    let (standard, full) = (figures[0], figures[1]);
    // 60 before the liveness figures (three timestamps, the census age, restarts per task).
    assert!(standard.0 <= 70, "{} series per pool at Detail::Standard (budget 70)", standard.0);
    assert!(standard.1 <= 15, "{} series per listener (budget 15)", standard.1);
    assert!(full.0 > standard.0, "Detail::Full adds the breakdowns ({} vs {})", full.0, standard.0);
}

/// Set in the child process of `idle_connections_cannot_starve_the_app`: `<metrics port> <database url>`.
const APP_ENV: &str = "POOLWATCH_EXPORT_LIMITED_APP";
/// The descriptor limit of the app in that test (a common default).
const APP_NOFILE: u32 = 1024;
/// The idle connections another process holds to the app's listener.
const IDLE_CONNECTIONS: usize = 3000;
/// The app's own new database connections opened while they are held.
const APP_CONNECTS: usize = 8;

/// The app half of `idle_connections_cannot_starve_the_app`, run only in the child process that
/// test starts under `prlimit --nofile=1024`: the README's exporter and listener, a watched pool
/// at the default `Config`; on `connect` from stdin it opens new database connections and
/// reports how many worked and how many descriptors it holds.
#[test]
#[ignore = "run by idle_connections_cannot_starve_the_app in a child process"]
fn limited_app_child() {
    let Ok(spec) = std::env::var(APP_ENV) else { return };
    let (port, url) = spec.split_once(' ').expect("port and url");
    let addr = SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>().expect("port")));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        poolwatch::export::Exporter::new().with_http_listener(addr).install().expect("install the recorder");
        let pool = PgPoolOptions::new()
            .max_connections(APP_CONNECTS as u32)
            .min_connections(0)
            .connect(url)
            .await
            .expect("connect");
        let watch = poolwatch::instrument_pool(&pool, Config::new("limited")).expect("instrument");
        sqlx::query("SELECT 1").execute(&pool).await.expect("query");
        println!("app: ready");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() != "connect" {
                break;
            }
            // A pool of its own, so every connection is new.
            let fresh = PgPoolOptions::new()
                .max_connections(APP_CONNECTS as u32)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(20))
                .connect_lazy(url)
                .expect("lazy pool");
            let attempts = (0..APP_CONNECTS).map(|_| async {
                let mut conn = fresh.acquire().await?;
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                Ok::<_, sqlx::Error>(conn)
            });
            let results = futures_util::future::join_all(attempts).await;
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let error = results.iter().find_map(|r| r.as_ref().err().map(ToString::to_string)).unwrap_or_default();
            let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
            println!("app: connected {ok} of {APP_CONNECTS}; descriptors {fds}; first error: {error}");
            drop(results);
            fresh.close().await;
        }
        drop(watch);
        pool.close().await;
    });
}

/// Another process holds thousands of idle connections to the `/metrics` listener of an app
/// limited to 1,024 descriptors: the app's own new database connections and a scrape still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_app() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let cluster = Cluster::shared();
    let port = support::cluster::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={APP_NOFILE}:{APP_NOFILE}"))
        .arg("--")
        .arg(exe)
        .args(["--exact", "limited_app_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(APP_ENV, format!("{port} {}", cluster.url()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the app under prlimit");
    let pid = child.id().expect("pid");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_report = async || loop {
        let line = out.next_line().await.expect("read the app").expect("the app exited early");
        // libtest's `test limited_app_child ... ` may precede the first report on its line.
        if let Some(at) = line.find("app: ") {
            return line[at + "app: ".len()..].to_owned();
        }
    };
    assert_eq!(next_report().await, "ready");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files") && l.contains(&format!(" {APP_NOFILE} "))),
        "the app runs with {APP_NOFILE} descriptors:\n{limits}"
    );

    // The other process: connections opened and never written to, 200 connects at a time.
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    let mut refused = 0;
    for _ in 0..IDLE_CONNECTIONS / 200 {
        let batch =
            (0..200).map(|_| tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)));
        for r in futures_util::future::join_all(batch).await {
            match r {
                Ok(Ok(stream)) => held.push(stream),
                _ => refused += 1,
            }
        }
    }
    let app_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    println!("holding {} idle connections ({refused} connects not completed); app descriptors {app_fds}", held.len());
    // 32 served at once, plus the app's own (runtime, pool, poolwatch's connections).
    assert!(app_fds <= 128, "the app holds {app_fds} descriptors with {} idle connections to /metrics", held.len());

    stdin.write_all(b"connect\n").await.expect("tell the app");
    let report = next_report().await;
    println!("while they are held: {report}");
    assert!(report.starts_with(&format!("connected {APP_CONNECTS} of {APP_CONNECTS};")), "{report}");
    let text = scrape(addr).await;
    assert!(text.contains("db_client_connection_pool_name=\"limited\""), "the scrape serves the app:\n{text}");
    let app_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    println!("scraped {} bytes with {} idle connections held; app descriptors {app_fds}", text.len(), held.len());
    drop(held);
    drop(stdin);
    let _ = child.wait().await;
}

/// `GET` and `HEAD` on `/metrics` only: other paths answer 404, other methods 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_metrics_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = install_recorder();
    metrics::describe_counter!("export_test_requests_total", "Requests the app served (a series of its own).");
    metrics::counter!("export_test_requests_total").increment(1);
    let ask = async |request: &str| {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // One request per connection here: read to the end.
        let request = request.replacen("\r\n", "\r\nConnection: close\r\n", 1);
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    };
    let get = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 200 OK\r\n") && get.contains("export_test_requests_total 1\n"), "{get}");
    let head = ask("HEAD /metrics?x=1 HTTP/1.1\r\n\r\n").await;
    let (status, body) = head.split_once("\r\n\r\n").expect("a head");
    assert!(status.starts_with("HTTP/1.1 200 OK") && !status.contains("Content-Length: 0\r"), "{head}");
    assert_eq!(body, "", "HEAD has no body");
    for path in ["/", "/admin", "/metricsx", "/debug/pprof"] {
        let r = ask(&format!("GET {path} HTTP/1.1\r\n\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{path}: {r}");
    }
    let post = ask("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
}

/// A multi-tenant app: a pool per tenant at the default `Config`, instrumented, used once,
/// then `watch.shutdown()` and `pool.close()`. Once all are gone, their series have left the
/// exposition: what remains is within twice one live pool's series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pools_leave_nothing_behind() {
    const TENANTS: usize = 200;
    const AT_ONCE: usize = 4;
    let addr = install_recorder();
    let cluster = Cluster::shared();
    let of_tenants =
        |text: &str| text.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("{POOL}=\"tenant-"))).count();
    let tenant = async |i: usize| {
        let name = format!("tenant-{i:03}");
        let options = PgPoolOptions::new().max_connections(2).min_connections(0);
        let pool =
            poolwatch::instrument_options_named(options, &name).connect_with(cluster.options()).await.expect("connect");
        let watch = poolwatch::instrument_pool(&pool, Config::new(&name)).expect("instrument");
        sqlx::query("SELECT 1").execute(&watch.pool()).await.expect("query");
        watch.census_now().await.expect("census");
        (pool, watch)
    };
    // The app's own series, which stay.
    metrics::describe_counter!("tenant_app_requests_total", "Requests the app served (a series of its own).");
    metrics::counter!("tenant_app_requests_total").increment(1);
    // One tenant alive: its series once its heartbeats have published too.
    let (pool, watch) = tenant(0).await;
    let one_pool = eventually(Duration::from_secs(60), "the first tenant's heartbeats published", async || {
        let ready = watch.heartbeat().pool.successes > 0 && watch.heartbeat().direct.successes > 0;
        ready.then_some(())?;
        Some(series(&scrape(addr).await, "tenant-000", None).len())
    })
    .await;
    let ids = |text: &str| -> BTreeSet<String> {
        series(text, "tenant-000", None).iter().map(|l| l[..l.rfind(' ').unwrap_or(l.len())].to_owned()).collect()
    };
    let before = ids(&scrape(addr).await);
    watch.shutdown().await;
    pool.close().await;
    drop(pool);
    // The tenant comes back at once, while its name is retired: the sweeps of the churn below
    // must leave every series of the live pool.
    let (back_pool, back) = tenant(0).await;
    for first in (1..TENANTS).step_by(AT_ONCE) {
        let batch = (first..(first + AT_ONCE).min(TENANTS)).map(|i| async move {
            let (pool, watch) = tenant(i).await;
            watch.shutdown().await;
            pool.close().await;
        });
        futures_util::future::join_all(batch).await;
    }
    let mut left = (usize::MAX, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let text = scrape(addr).await;
        left = (of_tenants(&text), text.len());
        if left.0 <= 2 * one_pool {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{TENANTS} tenants closed: {} of their series left ({} bytes of /metrics); one live pool: {one_pool}",
        left.0, left.1
    );
    if left.0 > 2 * one_pool {
        let text = scrape(addr).await;
        let mut pools: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split(&format!("{POOL}=\"")).nth(1)?.split('"').next())
            .filter(|p| p.starts_with("tenant-"))
            .collect();
        pools.dedup();
        println!("pools left: {pools:?}");
    }
    assert!(scrape(addr).await.contains("\ntenant_app_requests_total 1\n"), "the app's own series stay");
    back.census_now().await.expect("census of the tenant that came back");
    let after = ids(&scrape(addr).await);
    let lost: Vec<&String> = before.difference(&after).collect();
    assert!(lost.is_empty(), "the live tenant lost series to the sweeps: {lost:?}");
    back.shutdown().await;
    back_pool.close().await;
    assert!(
        left.0 <= 2 * one_pool,
        "{} series of {TENANTS} closed tenants are still exposed ({} bytes of /metrics); one live pool has {one_pool}",
        left.0,
        left.1
    );
}

/// A `/metrics` listener of its own (not the installed one, which other tests scrape), with
/// `series` counters recorded in it.
async fn own_listener(series: usize) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let addr = SocketAddr::from(([127, 0, 0, 1], support::cluster::free_port()));
    let (recorder, task) = poolwatch::internals::metrics_listener(addr).expect("listen");
    metrics::with_local_recorder(&recorder, || {
        for i in 0..series {
            metrics::counter!("own_listener_requests_total", "route" => format!("/route/{i}")).increment(i as u64);
        }
    });
    // The recorder lives as long as the test process: its handle serves the listener.
    std::mem::forget(recorder);
    (addr, task)
}

/// One HTTP/1.1 response read off a kept-alive connection: its head, and its body (by
/// `Content-Length`, empty for `HEAD`). `None` if the server closed the connection first.
async fn response(stream: &mut tokio::net::TcpStream, head_only: bool) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().expect("length")))
        .unwrap_or(0);
    let mut body = buf[end + 4..].to_vec();
    let length = if head_only { 0 } else { length };
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some((head, body))
}

/// Sends `request` on `stream` and reads its response.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(request.as_bytes()).await.ok()?;
    response(stream, request.starts_with("HEAD ")).await
}

/// HTTP/1.1 keep-alive: several requests on one TCP connection are all answered, 404 and 405
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_keeps_connections_alive() {
    let (addr, task) = own_listener(3).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let (head, first) = exchange(&mut stream, get).await.expect("first answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(String::from_utf8_lossy(&first).contains("own_listener_requests_total{route=\"/route/2\"} 2"));
    let (head, _) =
        exchange(&mut stream, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("404 on the same connection");
    assert!(head.starts_with("HTTP/1.1 404 Not Found"), "{head}");
    let (head, _) = exchange(&mut stream, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("405 on the same connection");
    assert!(head.starts_with("HTTP/1.1 405 ") && head.contains("Allow: GET, HEAD"), "{head}");
    let (head, body) = exchange(&mut stream, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("HEAD");
    assert!(head.starts_with("HTTP/1.1 200 OK") && body.is_empty(), "{head}");
    let (head, second) = exchange(&mut stream, get).await.expect("second GET on the same connection");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(first, second);
    task.abort();
}

/// `Accept-Encoding: gzip` gets the exposition gzipped (`Content-Encoding: gzip`, `Vary`),
/// which decodes to the plain answer byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_gzips_when_asked() {
    use std::io::Read;
    let (addr, task) = own_listener(200).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (plain_head, plain) =
        exchange(&mut stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("plain answer");
    assert!(!plain_head.to_ascii_lowercase().contains("content-encoding"), "{plain_head}");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (head, gzipped) = exchange(&mut stream, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .expect("gzip answer");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-encoding: gzip") && lower.contains("vary: accept-encoding"), "{head}");
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(&gzipped[..]).read_to_end(&mut decoded).expect("a gzip body");
    println!("{} bytes plain, {} gzipped", plain.len(), gzipped.len());
    assert!(gzipped.len() < plain.len() / 3, "{} bytes gzipped of {}", gzipped.len(), plain.len());
    assert_eq!(String::from_utf8_lossy(&decoded), String::from_utf8_lossy(&plain));
    task.abort();
}

/// The connection bound counts kept-alive connections: with 32 answered and held open, a new
/// connection is closed unanswered; a slot comes back when a client closes, and the server
/// closes kept-alive connections left idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_bound_holds_with_kept_alive_connections() {
    use tokio::io::AsyncReadExt;
    const BOUND: usize = 32;
    let (addr, task) = own_listener(1).await;
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for i in 0..BOUND {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (head, _) = exchange(&mut stream, get).await.unwrap_or_else(|| panic!("connection {i} unanswered"));
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        held.push(stream);
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(exchange(&mut extra, get).await.is_none(), "connection {} was answered past the bound", BOUND + 1);
    // A client closes: its slot comes back.
    drop(held.pop());
    eventually(Duration::from_secs(30), "a slot freed by a client's close serves a new connection", async || {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        exchange(&mut stream, get).await.map(|_| held.push(stream))
    })
    .await;
    // Left idle, every kept-alive connection is closed by the server.
    for stream in &mut held {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(120), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "an idle kept-alive connection stayed open: {read:?}");
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(exchange(&mut stream, get).await.is_some(), "no slot came back from the idle connections");
    task.abort();
}

/// A client that sends its request head a byte at a time, forever (slowloris), is cut off:
/// the head deadline does not restart with each byte, and its slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_cuts_off_a_head_sent_byte_by_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, task) = own_listener(1).await;
    let (mut read, mut write) = tokio::net::TcpStream::connect(addr).await.expect("connect").into_split();
    let closed = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = read.read_to_end(&mut answer).await;
        answer
    });
    write.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").await.expect("send");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut sent = 0u32;
    // A byte every 250 ms, until the server closes the connection (or 120 s of bytes).
    while !closed.is_finished() && sent < 480 {
        tick.tick().await;
        if write.write_all(b"a").await.is_err() {
            break;
        }
        sent += 1;
    }
    let answer = tokio::time::timeout(Duration::from_secs(30), closed).await.expect("closed").expect("reader");
    println!("cut off after {sent} bytes, a byte every 250 ms; answer: {:?}", String::from_utf8_lossy(&answer));
    assert!(sent < 480, "a head trickled for 120 s was never cut off");
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "the trickled head was answered");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(exchange(&mut stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.is_some(), "no scrape after it");
    task.abort();
}
