//! An in-process OTLP metrics receiver on loopback: the `opentelemetry-proto` tonic
//! `MetricsService`, keeping every metric it gets as a [`ReceivedMetric`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One data point: its attributes (as text), and a histogram's bounds and count or a number.
#[derive(Debug, Clone, Default)]
pub struct Point {
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// A histogram's explicit bucket bounds.
    pub bounds: Vec<f64>,
    /// A histogram's observation count.
    pub count: u64,
    /// A gauge's or sum's value.
    pub value: f64,
}

/// One metric of one export request.
#[derive(Debug, Clone)]
pub struct ReceivedMetric {
    /// The instrument name, e.g. `db.client.connection.wait_time`.
    pub name: String,
    /// Its unit, e.g. `s`.
    pub unit: String,
    /// `histogram`, `gauge`, `sum` (or `other`).
    pub kind: &'static str,
    /// A sum's monotonicity.
    pub monotonic: bool,
    /// Its data points.
    pub points: Vec<Point>,
}

type Store = Arc<Mutex<Vec<ReceivedMetric>>>;

/// A running receiver; stopped on drop.
#[derive(Debug)]
pub struct MetricsReceiver {
    addr: SocketAddr,
    metrics: Store,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetricsReceiver {
    /// A gRPC receiver (`MetricsService/Export`) on a free loopback port.
    pub async fn grpc() -> MetricsReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the metrics receiver");
        let addr = listener.local_addr().expect("receiver address");
        let metrics = Store::default();
        let service = Collector { metrics: Arc::clone(&metrics) };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        MetricsReceiver { addr, metrics, shutdown: Some(shutdown), task: Some(task) }
    }

    /// `http://addr`, for an OTLP exporter.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every metric received so far, in order (one per metric per export).
    pub fn received(&self) -> Vec<ReceivedMetric> {
        self.metrics.lock().unwrap().clone()
    }

    /// The last export of the metric `name`, if any.
    pub fn latest(&self, name: &str) -> Option<ReceivedMetric> {
        self.metrics.lock().unwrap().iter().rev().find(|m| m.name == name).cloned()
    }
}

impl Drop for MetricsReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Collector {
    metrics: Store,
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut store = self.metrics.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                store.extend(sm.metrics.into_iter().map(received));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn received(m: opentelemetry_proto::tonic::metrics::v1::Metric) -> ReceivedMetric {
    let number = |v: Option<number_data_point::Value>| match v {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN,
    };
    let (kind, monotonic, points) = match m.data {
        Some(metric::Data::Histogram(h)) => {
            let points = h
                .data_points
                .into_iter()
                .map(|p| Point {
                    attributes: flatten(&p.attributes),
                    bounds: p.explicit_bounds,
                    count: p.count,
                    value: p.sum.unwrap_or(f64::NAN),
                })
                .collect();
            ("histogram", false, points)
        }
        Some(metric::Data::Gauge(g)) => {
            let points = g
                .data_points
                .into_iter()
                .map(|p| Point { attributes: flatten(&p.attributes), value: number(p.value), ..Point::default() })
                .collect();
            ("gauge", false, points)
        }
        Some(metric::Data::Sum(s)) => {
            let points = s
                .data_points
                .into_iter()
                .map(|p| Point { attributes: flatten(&p.attributes), value: number(p.value), ..Point::default() })
                .collect();
            ("sum", s.is_monotonic, points)
        }
        _ => ("other", false, Vec::new()),
    };
    ReceivedMetric { name: m.name, unit: m.unit, kind, monotonic, points }
}

fn flatten(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}
