//! The `/metrics` listener: HTTP/1.1, one response per connection, `GET` and `HEAD` on
//! `/metrics` only. Built so that no client can hurt the app: a bounded number of connections
//! at once (more are closed as soon as they are accepted), one deadline per connection for
//! reading the request and writing the answer, and one render shared by the scrapes that
//! arrive together, made on Tokio's blocking pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};

use super::PrometheusHandle;

/// Connections served at once: a few scrapers and health checks need far fewer. Every
/// connection past this is closed at once, so idle clients cannot use up the app's descriptors.
const MAX_CONNECTIONS: usize = 32;
/// Reading the request and writing the answer, together: a slow or silent client is dropped
/// after this long.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Request heads longer than this are refused (scrapers send a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// The only path served.
const PATH: &[u8] = b"/metrics";

pub(super) async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let renders = Arc::new(Renders { handle, latest: Mutex::new(None) });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => {
                    let renders = Arc::clone(&renders);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &renders)).await;
                        drop(slot);
                    });
                }
                // Full: closed now (dropping the stream), never queued.
                Err(_) => drop(stream),
            },
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::debug!(error = %e, "poolwatch /metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The latest render and when it started: scrapes that arrive while one is made wait for it
/// and share the next, so a burst of scrapes costs at most two renders, never one each.
struct Renders {
    handle: PrometheusHandle,
    latest: Mutex<Option<(Instant, Arc<str>)>>,
}

impl Renders {
    /// An exposition whose render started no earlier than `arrived` (when the request came);
    /// `None` if the render could not run (the runtime is shutting down).
    async fn body(&self, arrived: Instant) -> Option<Arc<str>> {
        let mut latest = self.latest.lock().await;
        if let Some((started, body)) = latest.as_ref()
            && *started >= arrived
        {
            return Some(Arc::clone(body));
        }
        let started = Instant::now();
        let handle = self.handle.clone();
        // CPU work that grows with the series: off the app's runtime workers.
        let body: Arc<str> = Arc::from(tokio::task::spawn_blocking(move || handle.render()).await.ok()?);
        *latest = Some((started, Arc::clone(&body)));
        Some(body)
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
}

/// Reads `METHOD SP TARGET SP VERSION`: `/metrics` (any query string) by `GET` or `HEAD`.
fn ask(head: &[u8]) -> Ask {
    let mut parts = head.split(|b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    if path != PATH {
        return Ask::NotFound;
    }
    match method {
        b"GET" => Ask::Metrics { head_only: false },
        b"HEAD" => Ask::Metrics { head_only: true },
        _ => Ask::BadMethod,
    }
}

/// Reads the request head; `None` when the client closed, failed, or sent too much.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(head);
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

/// One request, one answer; the caller bounds the whole of it by `CONNECTION_DEADLINE`.
async fn answer(mut stream: TcpStream, renders: &Renders) {
    let Some(head) = read_head(&mut stream).await else { return };
    let (status, extra, body, head_only) = match ask(&head) {
        Ask::Metrics { head_only } => match renders.body(Instant::now()).await {
            Some(body) => ("200 OK", "", body, head_only),
            None => ("503 Service Unavailable", "", Arc::from(""), false),
        },
        Ask::NotFound => ("404 Not Found", "", Arc::from("poolwatch serves /metrics only\n"), false),
        Ask::BadMethod => ("405 Method Not Allowed", "Allow: GET, HEAD\r\n", Arc::from(""), false),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = async {
        stream.write_all(response.as_bytes()).await?;
        if !head_only {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.shutdown().await
    }
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_and_head_on_metrics_are_served() {
        assert_eq!(ask(b"GET /metrics HTTP/1.1\r\n\r\n"), Ask::Metrics { head_only: false });
        assert_eq!(ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Ask::Metrics { head_only: false });
        assert_eq!(ask(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Ask::Metrics { head_only: true });
        assert_eq!(ask(b"POST /metrics HTTP/1.1\r\n\r\n"), Ask::BadMethod);
        for other in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"GET /metricsx HTTP/1.1", b"GET /admin HTTP/1.1", b"", b"GET"] {
            assert_eq!(ask(other), Ask::NotFound, "{}", String::from_utf8_lossy(other));
        }
    }

    /// 64 scrapes that arrive together share one render.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_that_arrive_together_share_one_render() {
        let recorder = super::super::Exporter::new().build_recorder();
        let renders = Arc::new(Renders { handle: recorder.handle(), latest: Mutex::new(None) });
        let arrived = Instant::now();
        let scrapes: Vec<_> = (0..64)
            .map(|_| {
                let renders = Arc::clone(&renders);
                tokio::spawn(async move { renders.body(arrived).await })
            })
            .collect();
        let mut bodies: Vec<Arc<str>> = Vec::new();
        for s in scrapes {
            let body = s.await.expect("scrape").expect("rendered");
            if !bodies.iter().any(|b| Arc::ptr_eq(b, &body)) {
                bodies.push(body);
            }
        }
        assert_eq!(bodies.len(), 1, "64 scrapes that arrived together got {} renders", bodies.len());
        // A scrape that arrives after a render gets a new one.
        let later = renders.body(Instant::now()).await.expect("rendered");
        assert!(!Arc::ptr_eq(&later, &bodies[0]), "a later scrape reused an older render");
    }
}
