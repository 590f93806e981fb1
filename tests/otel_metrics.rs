//! poolwatch's metrics over OTLP, as an app that exports with the OpenTelemetry SDK gets them:
//! `export::otel::OtelRecorder` installed as the global `metrics` recorder on an SDK
//! `MeterProvider` whose periodic reader exports over gRPC to an in-process OTLP receiver, and
//! a real watched pool on a real server. Checks the semantic-convention names, units,
//! attributes and histogram bounds that arrive.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use poolwatch::catalog::{self, Kind};
use poolwatch::export::otel::{OtelRecorder, otel_name};
use poolwatch::sqlx;
use sqlx::postgres::PgPoolOptions;
use support::otlp_metrics::{MetricsReceiver, Point, ReceivedMetric};
use support::{Cluster, eventually};

const POOL: &str = "db.client.connection.pool.name";
const NAME: &str = "otel";

/// The points of `metric` for the test's pool.
fn of_pool(metric: &ReceivedMetric) -> Vec<Point> {
    metric.points.iter().filter(|p| p.attributes.get(POOL).is_some_and(|v| v == NAME)).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_metrics_arrive_over_otlp_under_semantic_convention_names() {
    let receiver = MetricsReceiver::grpc().await;
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(receiver.endpoint())
        .build()
        .expect("OTLP metric exporter");
    let reader = PeriodicReader::builder(exporter).with_interval(Duration::from_millis(200)).build();
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    metrics::set_global_recorder(OtelRecorder::new(provider.meter("poolwatch"))).expect("install the recorder");

    let cluster = Cluster::shared();
    let options = PgPoolOptions::new().max_connections(4).min_connections(0);
    let pool =
        poolwatch::instrument_options_named(options, NAME).connect_with(cluster.options()).await.expect("connect");
    let watch = poolwatch::instrument_pool(&pool, support::fast_config(NAME)).expect("instrument");
    for _ in 0..5 {
        sqlx::query("SELECT 1").execute(&watch.pool()).await.expect("query");
    }
    let wait = eventually(Duration::from_secs(60), "wait_time, connection count and connects exported", async || {
        let connects = receiver.latest("poolwatch.pool_connects")?;
        let count = receiver.latest("db.client.connection.count")?;
        let wait = receiver.latest("db.client.connection.wait_time")?;
        let ready = of_pool(&wait).iter().any(|p| p.count > 0)
            && of_pool(&connects).iter().any(|p| p.value >= 1.0)
            && !of_pool(&count).is_empty();
        ready.then_some(wait)
    })
    .await;

    // The acquire wait: seconds, with the catalog's bounds (not the SDK's 0..10,000).
    assert_eq!((wait.kind, wait.unit.as_str()), ("histogram", "s"), "{wait:?}");
    for p in of_pool(&wait) {
        assert_eq!(p.bounds, catalog::WAIT_BUCKETS, "{wait:?}");
    }
    // Connections by state: the semconv attributes.
    let count = receiver.latest("db.client.connection.count").expect("count");
    assert_eq!((count.kind, count.unit.as_str()), ("gauge", "{connection}"), "{count:?}");
    let states: BTreeSet<&str> = count
        .points
        .iter()
        .filter_map(|p| p.attributes.get("db.client.connection.state").map(String::as_str))
        .collect();
    assert!(!states.is_empty() && states.iter().all(|s| ["used", "idle"].contains(s)), "{count:?}");
    let connects = receiver.latest("poolwatch.pool_connects").expect("connects");
    assert_eq!((connects.kind, connects.monotonic), ("sum", true), "{connects:?}");

    // Everything that arrived: a catalog metric's OTel name, unit and kind, semconv attribute
    // keys, and the catalog's bounds on every histogram.
    let received = receiver.received();
    let names: BTreeSet<&str> = received.iter().map(|m| m.name.as_str()).collect();
    println!("{} metrics received: {names:?}", names.len());
    for m in &received {
        let entry = catalog::ALL.iter().find(|c| otel_name(c).0 == m.name);
        let entry = entry.unwrap_or_else(|| panic!("{} is not a catalog metric's OTel name", m.name));
        assert_eq!(m.unit, otel_name(entry).1, "{}", m.name);
        let kind = match entry.kind {
            Kind::Counter => "sum",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert_eq!(m.kind, kind, "{}", m.name);
        for p in &m.points {
            assert!(p.attributes.contains_key(POOL), "{}: no {POOL} in {:?}", m.name, p.attributes);
            assert!(p.attributes.keys().all(|k| !k.starts_with("db_client_")), "{}: {:?}", m.name, p.attributes);
            if let Some(bounds) = catalog::buckets(entry.name, poolwatch::Detail::Standard) {
                assert_eq!(p.bounds, bounds, "{}", m.name);
            }
        }
    }
    assert!(names.len() >= 15, "only {} poolwatch metrics arrived: {names:?}", names.len());
    drop(watch);
    pool.close().await;
    let _ = provider.shutdown();
}
