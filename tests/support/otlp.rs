//! In-process OTLP receivers on loopback: gRPC (the `opentelemetry-proto` tonic service) and
//! HTTP/protobuf (`POST /v1/traces`, decoded with prost). They keep every span they get as a
//! [`ReceivedSpan`]; [`Receiver::stop`] closes the port mid-test; [`Blackhole`] accepts
//! connections and never answers (a hung collector).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// One span as the collector saw it, attributes flattened to strings.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The span name, e.g. `poolwatch.census`.
    pub name: String,
    /// Span attributes (`error.type`, `db.system.name`, ...).
    pub attributes: BTreeMap<String, String>,
    /// Resource attributes of the batch (`service.name`, ...).
    pub resource: BTreeMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// Status message.
    pub status_message: String,
    /// Events: (name, attributes).
    pub events: Vec<(String, BTreeMap<String, String>)>,
}

impl ReceivedSpan {
    /// The attribute's value, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Whether the span's status is ERROR.
    pub fn is_error(&self) -> bool {
        self.status_code == 2
    }

    /// Everything the span carries as text (for secret scans).
    pub fn all_text(&self) -> String {
        let mut text = format!("{} {}\n", self.name, self.status_message);
        let maps = std::iter::once(&self.attributes)
            .chain(std::iter::once(&self.resource))
            .chain(self.events.iter().map(|(_, a)| a));
        for map in maps {
            for (k, v) in map {
                text.push_str(&format!("{k}={v}\n"));
            }
        }
        for (name, _) in &self.events {
            text.push_str(name);
            text.push('\n');
        }
        text
    }
}

type Store = Arc<Mutex<Vec<ReceivedSpan>>>;

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    grpc: bool,
    spans: Store,
    requests: Arc<Mutex<usize>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    /// A gRPC receiver (`TraceService/Export`) on a free loopback port.
    pub async fn grpc() -> Receiver {
        Receiver::grpc_on("127.0.0.1:0".parse().expect("address")).await
    }

    /// A gRPC receiver on `addr` (e.g. where a stopped one listened: the collector is back).
    pub async fn grpc_on(addr: SocketAddr) -> Receiver {
        let listener = bind(addr).await;
        let addr = listener.local_addr().expect("receiver address");
        let spans = Store::default();
        let requests = Arc::new(Mutex::new(0));
        let service = Collector { spans: Arc::clone(&spans), requests: Arc::clone(&requests) };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Receiver { addr, grpc: true, spans, requests, shutdown: Some(shutdown), task: Some(task) }
    }

    /// An HTTP/protobuf receiver (`POST /v1/traces`) on a free loopback port.
    pub async fn http() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the HTTP receiver");
        let addr = listener.local_addr().expect("receiver address");
        let spans = Store::default();
        let requests = Arc::new(Mutex::new(0));
        let (shutdown, mut stopped) = oneshot::channel::<()>();
        let (store, count) = (Arc::clone(&spans), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => if let Ok((stream, _)) = accepted {
                        connections.spawn(serve_http(stream, Arc::clone(&store), Arc::clone(&count)));
                    },
                }
            }
            connections.abort_all();
        });
        Receiver { addr, grpc: false, spans, requests, shutdown: Some(shutdown), task: Some(task) }
    }

    /// The endpoint to configure the exporter with (`http://127.0.0.1:port`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far, in arrival order.
    pub fn received_spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The received spans with this name.
    pub fn spans_named(&self, name: &str) -> Vec<ReceivedSpan> {
        self.received_spans().into_iter().filter(|s| s.name == name).collect()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }

    /// Stops listening and closes its connections; the port then refuses connections.
    pub async fn stop(&mut self) {
        self.shutdown.take();
        if let Some(mut task) = self.task.take() {
            // A gRPC graceful shutdown may wait on an idle client connection: cut it short.
            if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
                task.abort();
            }
        }
        let refused = TcpStream::connect(self.addr).await.is_err();
        assert!(refused || self.grpc, "the HTTP receiver still accepts connections after stop");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.take();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct Collector {
    spans: Store,
    requests: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.spans, &self.requests, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn keep(store: &Store, requests: &Arc<Mutex<usize>>, request: ExportTraceServiceRequest) {
    *requests.lock().unwrap() += 1;
    let mut spans = store.lock().unwrap();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| flatten(&r.attributes)).unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let status = span.status.unwrap_or_default();
                spans.push(ReceivedSpan {
                    name: span.name,
                    attributes: flatten(&span.attributes),
                    resource: resource.clone(),
                    status_code: status.code,
                    status_message: status.message,
                    events: span.events.iter().map(|e| (e.name.clone(), flatten(&e.attributes))).collect(),
                });
            }
        }
    }
}

fn flatten(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(text).unwrap_or_default())).collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().map(text).collect::<Vec<_>>().join(","),
        Some(any_value::Value::KvlistValue(l)) => l
            .values
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value.as_ref().map(text).unwrap_or_default()))
            .collect(),
        Some(any_value::Value::BytesValue(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Serves HTTP/1.1 keep-alive requests on one connection: `POST /v1/traces` with a
/// protobuf body (Content-Length framed, as the exporter sends it).
async fn serve_http(mut stream: TcpStream, store: Store, requests: Arc<Mutex<usize>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
        let status = if head.starts_with("POST /v1/traces ") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(request) => {
                    keep(&store, &requests, request);
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        } else {
            "404 Not Found"
        };
        let reply = ExportTraceServiceResponse::default().encode_to_vec();
        let mut response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        )
        .into_bytes();
        response.extend_from_slice(&reply);
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// A collector that hangs: accepts connections on `addr` and never reads or answers.
#[derive(Debug)]
pub struct Blackhole {
    task: JoinHandle<()>,
}

impl Blackhole {
    /// Listens on `addr` (e.g. a stopped receiver's address).
    pub async fn bind(addr: SocketAddr) -> Blackhole {
        let listener = bind(addr).await;
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Blackhole { task }
    }
}

impl Blackhole {
    /// Stops listening and closes the held connections; returns once the port is free.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Binds `addr`, retrying for a while: the previous listener on a reused port may still be
/// closing.
async fn bind(addr: SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
