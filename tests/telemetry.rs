//! The telemetry pipeline with real parts: `telemetry::init` exporting spans over OTLP/gRPC to
//! an in-process collector, the Prometheus endpoint scraped over HTTP and linted by
//! `promtool check metrics`, an OTLP/HTTP pipeline, a collector that stops or hangs mid-test,
//! and a password that must never leave the connection string.
//!
//! A global subscriber and recorder can be installed once per process, so this binary has a
//! single test that runs the steps in order.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::telemetry::{self, OtlpProtocol, SpanPipeline, TelemetryConfig};
use poolwatch::{Cause, Config, ListenerConfig, WatchedListener, catalog, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::otlp::{Blackhole, ReceivedSpan, Receiver};
use support::password::password_role;
use support::{Cluster, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::SubscriberExt;

const SECRET: &str = "Pw6-s3cret-a91f7c";
const POOL: &str = "telemetry";
const SERVICE: &str = "poolwatch-telemetry-test";
const QUEUE: usize = 256;

/// The catalogued families this test makes poolwatch emit: the ledger, heartbeats, watched
/// acquires and a listener.
const EXERCISED: &[catalog::Metric] = &[
    catalog::HEARTBEAT_DURATION,
    catalog::HEARTBEAT_FAILURES,
    catalog::HEARTBEAT_UP,
    catalog::CONFIG_HAZARD,
    catalog::WAIT_TIME,
    catalog::PENDING_REQUESTS,
    catalog::TIMEOUTS,
    catalog::USE_TIME,
    catalog::LISTENER_CONNECTED,
    catalog::LISTENER_RECONNECTS,
    catalog::LISTENER_DOWNTIME,
    catalog::CONNECTION_COUNT,
    catalog::CONNECTION_MAX,
    catalog::CONNECTION_IDLE_MIN,
    catalog::SERVER_CONNECTIONS,
    catalog::PHANTOM_CONNECTIONS,
    catalog::CENSUS_UP,
    catalog::CENSUS_DURATION,
    catalog::CENSUS_ERRORS,
    catalog::CLIENT_SOCKETS,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_pipeline_end_to_end() {
    let logs = Logs::default();
    let mut grpc = Receiver::grpc().await;
    // The role is made before logs are captured: its CREATE ROLE statement holds the password.
    let cluster = Cluster::start();
    let url = password_role(&cluster, "app_pw", SECRET).await;

    // An exporter port already in use: a clear error, nothing installed.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let err = telemetry::init(TelemetryConfig::default().prometheus_listen(Some(busy_addr))).unwrap_err();
    assert_eq!(err.field, "prometheus_listen", "{err}");
    assert!(err.to_string().contains(&busy_addr.to_string()) && err.to_string().contains("fix:"), "{err}");
    drop(busy);

    let metrics_addr = free_addr();
    let guard = telemetry::init(
        TelemetryConfig::default()
            .prometheus_listen(Some(metrics_addr))
            .otlp(grpc.endpoint(), OtlpProtocol::Grpc)
            .service_name(SERVICE)
            .log_filter("debug")
            .max_queue_size(QUEUE)
            .export_interval(Duration::from_millis(100))
            .export_timeout(Duration::from_secs(1))
            .log_writer(logs.writer()),
    )
    .expect("telemetry::init");
    let again = telemetry::init(TelemetryConfig::default().prometheus_listen(None)).unwrap_err();
    assert_eq!(again.field, "install_subscriber", "{again}");

    // A pool that logs in with a password in its URL.
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .expect("pool with a password");
    let watch = instrument_pool(
        &pool,
        // Full detail: every family (per-hazard series included) reaches /metrics and promtool.
        Config::new(POOL)
            .detail(poolwatch::Detail::Full)
            .sample_interval(Duration::from_millis(100))
            .census_interval(Duration::from_millis(200))
            .heartbeat_interval(Duration::from_millis(200))
            .heartbeat_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    assert!(!format!("{watch:?}").contains(SECRET), "PoolWatch's Debug prints the password");
    queries(&pool, 20).await;
    watch.census_now().await.expect("census with the password role");

    // A census failure (server stopped) arrives as an ERROR span with `error.type`.
    tracing::info_span!("poolwatch.test.marker", "test.step" = "start").in_scope(|| {});
    cluster.stop();
    let cause = watch.census_now().await.expect_err("census with the server stopped");
    let failed =
        eventually(Duration::from_secs(10), "a failed poolwatch.census span at the gRPC receiver", async || {
            grpc.spans_named("poolwatch.census").into_iter().find(|s| s.attr("error.type") == Some(cause.as_str()))
        })
        .await;
    assert_census_span(&failed);
    assert!(failed.is_error(), "status: {failed:?}");
    for span in grpc.spans_named("poolwatch.census") {
        let error_type = span.attr("error.type");
        assert!(error_type.is_none() || Cause::ALL.iter().any(|c| Some(c.as_str()) == error_type), "{span:?}");
    }
    assert_eq!(failed.resource.get("service.name").map(String::as_str), Some(SERVICE));
    // ... and so does a failed heartbeat, on either path.
    let beat = eventually(Duration::from_secs(10), "a failed poolwatch.heartbeat span", async || {
        grpc.spans_named("poolwatch.heartbeat").into_iter().find(|s| s.is_error())
    })
    .await;
    assert_eq!(beat.attr("db.client.connection.pool.name"), Some(POOL), "{beat:?}");
    assert_eq!(beat.attr("db.system.name"), Some("postgresql"), "{beat:?}");
    assert!(beat.attr("path").is_some_and(|p| poolwatch::PATHS.contains(&p)), "{beat:?}");
    assert!(Cause::ALL.iter().any(|c| beat.attr("error.type") == Some(c.as_str())), "{beat:?}");
    cluster.start_server();
    eventually(Duration::from_secs(20), "the census recovers", async || watch.census_now().await.ok()).await;
    queries(&pool, 20).await;
    let ok = eventually(Duration::from_secs(10), "a successful poolwatch.census span", async || {
        grpc.spans_named("poolwatch.census").into_iter().find(|s| s.attr("error.type").is_none())
    })
    .await;
    assert_census_span(&ok);
    assert!(!ok.is_error(), "{ok:?}");
    assert!(grpc.spans_named("poolwatch.test.marker").len() == 1, "test span not received");

    // An acquire timeout through the watched pool arrives as a failed `db.pool.acquire`.
    let db = watch.pool();
    let held: Vec<_> = futures_held(&db, 5).await;
    let err = db.acquire().await.expect_err("every slot is held");
    assert_eq!(Cause::of(&err), Cause::PoolTimedOut);
    drop(held);
    let acquire = eventually(Duration::from_secs(10), "a failed db.pool.acquire span", async || {
        grpc.spans_named("db.pool.acquire").into_iter().find(|s| s.is_error())
    })
    .await;
    assert_eq!(acquire.attr("error.type"), Some("pool_timed_out"), "{acquire:?}");
    assert_eq!(acquire.attr("poolwatch.outcome"), Some("timeout"), "{acquire:?}");
    assert_eq!(acquire.attr("db.client.connection.pool.name"), Some(POOL), "{acquire:?}");
    assert_eq!(acquire.attr("server.address"), Some("127.0.0.1"), "{acquire:?}");

    // A listener whose session is terminated arrives as a `db.listener.reconnect` span.
    let mut listener = WatchedListener::connect_with(&pool, ListenerConfig::new(POOL, "jobs")).await.unwrap();
    listener.listen("jobs").await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE 'listen%'")
        .execute(&pool)
        .await
        .unwrap();
    let after = within(Duration::from_secs(10), listener.try_recv()).await.expect("reconnects on its own");
    assert!(after.is_none(), "a lost connection reads as Ok(None), as in sqlx");
    let reconnect = eventually(Duration::from_secs(10), "a db.listener.reconnect span", async || {
        grpc.spans_named("db.listener.reconnect").into_iter().next()
    })
    .await;
    assert_eq!(reconnect.attr("error.type"), Some("admin_shutdown"), "{reconnect:?}");
    assert_eq!(reconnect.attr("db.client.connection.pool.name"), Some(POOL), "{reconnect:?}");
    assert_eq!(reconnect.attr("db.system.name"), Some("postgresql"), "{reconnect:?}");
    drop(listener);

    // /metrics over real HTTP: every exercised family, all catalogued, and promtool-clean.
    let text = eventually(Duration::from_secs(10), "every exercised family on /metrics", async || {
        let text = scrape(metrics_addr).await;
        EXERCISED.iter().all(|m| text.contains(&format!("# TYPE {} ", m.name))).then_some(text)
    })
    .await;
    for m in EXERCISED {
        assert!(text.contains(&format!("# HELP {} ", m.name)), "{} has no help", m.name);
    }
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()) {
        if family.starts_with("poolwatch_") || family.starts_with("db_client_connection_") {
            assert!(catalog::find(family).is_some(), "{family} is on /metrics but not in the catalog");
        }
    }
    support::prometheus::promtool_check_metrics(&text);

    // The collector stops: queries and the census go on, nothing blocks.
    grpc.stop().await;
    let exported_before = guard.span_stats().unwrap().exported;
    for _ in 0..5 {
        queries(&pool, 10).await;
        within(Duration::from_secs(10), watch.census_now()).await.expect("census with the collector down");
    }

    // The collector hangs (accepts, never answers): a flood of spans stays bounded.
    let hole = Blackhole::bind(grpc.addr()).await;
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut max_queued = 0;
    for i in 0..50_000u32 {
        tracing::info_span!("poolwatch.test.flood", "test.index" = i).in_scope(|| {});
        if i % 1000 == 0 {
            max_queued = max_queued.max(guard.span_stats().unwrap().queued);
            queries(&pool, 1).await;
        }
    }
    let flood = started.elapsed();
    within(Duration::from_secs(10), watch.census_now()).await.expect("census while the collector hangs");
    let stats = guard.span_stats().unwrap();
    let rss_after = rss_kib();
    println!(
        "flood: 50000 spans in {flood:?}; stats {stats:?}; max queued {max_queued}; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(max_queued <= QUEUE && stats.queued <= QUEUE, "queue beyond its bound: {max_queued} {stats:?}");
    // A hung export holds the one batch in flight for `export_timeout` (1 s): nearly all of
    // the flood must be dropped, not buffered.
    assert!(stats.dropped > 25_000, "spans should be dropped, not buffered: {stats:?}");
    assert!(rss_after.saturating_sub(rss_before) < 64 * 1024, "RSS grew {rss_before} -> {rss_after} KiB");
    assert!(stats.exported >= exported_before);
    hole.stop().await;

    // The collector is back on the same address: export resumes by itself.
    let back = Receiver::grpc_on(grpc.addr()).await;
    let started = Instant::now();
    eventually(Duration::from_secs(20), "spans reach the collector again", async || {
        tracing::info_span!("poolwatch.test.marker", "test.step" = "back").in_scope(|| {});
        (!back.spans_named("poolwatch.test.marker").is_empty()).then_some(())
    })
    .await;
    println!("export resumed {:?} after the collector came back", started.elapsed());
    eventually(Duration::from_secs(10), "the recovery in the logs", async || {
        logs.text().contains("poolwatch OTLP span export recovered").then_some(())
    })
    .await;

    // The same spans over OTLP/HTTP, through a pipeline added to one's own subscriber.
    let http = Receiver::http().await;
    let pipeline = SpanPipeline::start(
        &TelemetryConfig::default()
            .otlp(http.endpoint(), OtlpProtocol::HttpProtobuf)
            .service_name(SERVICE)
            .export_interval(Duration::from_millis(100)),
    )
    .expect("HTTP span pipeline");
    let own = tracing_subscriber::registry().with(pipeline.layer().expect("layer"));
    cluster.stop();
    watch.census_now().with_subscriber(own).await.expect_err("census with the server stopped");
    let over_http = eventually(Duration::from_secs(10), "a failed census span at the HTTP receiver", async || {
        http.spans_named("poolwatch.census").into_iter().find(|s| s.attr("error.type").is_some())
    })
    .await;
    assert_census_span(&over_http);
    assert!(over_http.is_error());
    assert_eq!(over_http.resource.get("service.name").map(String::as_str), Some(SERVICE));
    // The receiver holds the span before the exporter has its answer and counts the batch.
    eventually(Duration::from_secs(10), "the pipeline counts the batch exported", async || {
        (pipeline.stats().exported >= 1).then_some(())
    })
    .await;
    pipeline.shutdown();
    cluster.start_server();
    let text = scrape(metrics_addr).await;

    eventually(Duration::from_secs(10), "the export failure in the logs", async || {
        logs.text().contains("poolwatch OTLP span export failing").then_some(())
    })
    .await;
    watch.shutdown().await;
    pool.close().await;
    let started = Instant::now();
    drop(guard);
    println!("guard dropped in {:?}", started.elapsed());

    // No secret anywhere: /metrics, every exported span, every log line (shutdown's included).
    let spans: Vec<ReceivedSpan> = [&grpc, &back, &http].iter().flat_map(|r| r.received_spans()).collect();
    let logged = logs.text();
    assert!(spans.len() >= 3 && logged.lines().count() > 10, "too little to scan: {} spans", spans.len());
    assert!(logged.contains("poolwatch census failed"), "the census failure was not logged");
    assert!(logged.contains("poolwatch dropped spans"), "the drop count was not logged at shutdown");
    assert!(!text.contains(SECRET), "the password is on /metrics");
    for span in &spans {
        assert!(!span.all_text().contains(SECRET), "the password is in span {span:?}");
    }
    let leaks: Vec<&str> = logged.lines().filter(|l| l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "the password is in {} log lines, e.g. {:?}", leaks.len(), leaks.first());
    println!("scanned {} bytes of /metrics, {} spans, {} log lines", text.len(), spans.len(), logged.lines().count());
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` alone
/// configure the export (default protocol HTTP/protobuf), in a child process of this binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_env_vars_configure_the_export() {
    let http = Receiver::http().await;
    let exe = std::env::current_exe().unwrap();
    let child = tokio::process::Command::new(exe)
        .args(["--exact", "env_child", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("POOLWATCH_TELEMETRY_CHILD", "1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", http.endpoint())
        .env("OTEL_SERVICE_NAME", "env-service")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,team=db")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output();
    let out = within(Duration::from_secs(60), child).await.unwrap();
    assert!(
        out.status.success(),
        "child: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let span = http.spans_named("poolwatch.test.env").pop().expect("the child's span at the HTTP receiver");
    assert_eq!(span.resource.get("service.name").map(String::as_str), Some("env-service"), "{span:?}");
    assert_eq!(span.resource.get("deployment.environment.name").map(String::as_str), Some("test"), "{span:?}");
    assert_eq!(span.resource.get("team").map(String::as_str), Some("db"), "{span:?}");
}

/// The child of [`standard_env_vars_configure_the_export`]: one-call setup from the
/// environment, one span, flushed when the guard drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by standard_env_vars_configure_the_export in a child process"]
async fn env_child() {
    if std::env::var_os("POOLWATCH_TELEMETRY_CHILD").is_none() {
        return;
    }
    let guard = telemetry::init(TelemetryConfig::default().prometheus_listen(None)).expect("init from env");
    tracing::info_span!("poolwatch.test.env").in_scope(|| tracing::info!("inside"));
    drop(guard);
}

fn assert_census_span(span: &ReceivedSpan) {
    assert_eq!(span.attr("db.system.name"), Some("postgresql"), "{span:?}");
    assert_eq!(span.attr("db.client.connection.pool.name"), Some(POOL), "{span:?}");
}

async fn futures_held(db: &poolwatch::WatchedPool, n: usize) -> Vec<poolwatch::WatchedConnection> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(db.acquire().await.expect("a free slot"));
    }
    held
}

async fn queries(pool: &PgPool, n: usize) {
    for _ in 0..n {
        let one: i32 = within(Duration::from_secs(10), sqlx::query_scalar("SELECT 1").fetch_one(pool))
            .await
            .expect("a query while telemetry is exporting");
        assert_eq!(one, 1);
    }
}

/// Runs `f`, panicking if it takes longer than `limit` (a generous bound: blocking shows
/// up as a hang, not as a few milliseconds).
async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("blocked for more than {limit:?}"))
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], support::cluster::free_port()))
}

/// `GET /metrics` over a real TCP connection; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every log line the fmt layer writes.
#[derive(Debug, Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn writer(&self) -> tracing_subscriber::fmt::writer::BoxMakeWriter {
        let logs = self.clone();
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || logs.clone())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
