//! The `/metrics` listener, on hyper: HTTP/1.1 with keep-alive, `GET` and `HEAD` on `/metrics`
//! only (404 elsewhere, 405 for other methods), gzip when the scraper asks for it. Built so that
//! no client can hurt the app: a bounded number of connections at once, kept-alive ones
//! included (more are closed as soon as they are accepted), a deadline for each request head
//! (which also closes kept-alive connections left idle), a connection where no byte moves for
//! as long is dropped (a client that stops reading its answer), and one render shared by the
//! scrapes that arrive together, made on Tokio's blocking pool.

use std::convert::Infallible;
use std::io::Write as _;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OnceCell, Semaphore};

use super::PrometheusHandle;

/// Connections held at once, kept-alive ones included: a few scrapers and health checks need
/// far fewer. Every connection past this is closed at once, never queued, so idle clients
/// cannot use up the app's descriptors.
const MAX_CONNECTIONS: usize = 32;
/// How long a connection has to send each request head in full, counted from its accept or
/// from the end of its previous answer: slow heads (slowloris) and kept-alive connections left
/// idle are closed after this, so their slots come back.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection where no byte moved either way for this long is dropped: hyper bounds reading
/// the head, this bounds a client that stops reading its answer.
const STALL_TIMEOUT: Duration = IDLE_TIMEOUT;
/// hyper's read buffer, which bounds a request head (scrapers send a few hundred bytes);
/// 8 KiB is hyper's minimum.
const MAX_BUF: usize = 16 * 1024;
/// The only path served.
const PATH: &str = "/metrics";
/// The Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let renders = Arc::new(Renders { handle, latest: Mutex::new(None) });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => {
                    let renders = Arc::clone(&renders);
                    tokio::spawn(async move {
                        connection(stream, renders).await;
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

/// Serves one connection's requests until the client closes it, its head deadline passes, or
/// no byte moved for `STALL_TIMEOUT`; the slot is freed when this returns.
async fn connection(stream: TcpStream, renders: Arc<Renders>) {
    let started = Instant::now();
    let moved = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked { inner: stream, started, moved: Arc::clone(&moved) });
    let service = hyper::service::service_fn(move |request| {
        let renders = Arc::clone(&renders);
        async move { Ok::<_, Infallible>(respond(&renders, &request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Title case: the header names clients and tests matched before hyper.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(MAX_BUF)
        .title_case_headers(true);
    let mut conn = pin!(builder.serve_connection(io, service));
    loop {
        let last = moved.load(Ordering::Relaxed);
        let deadline = started + Duration::from_millis(last) + STALL_TIMEOUT;
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(deadline.into()) => {
                if moved.load(Ordering::Relaxed) == last {
                    return;
                }
            }
        }
    }
}

/// The socket, noting when a byte last moved (milliseconds since the accept).
struct Tracked {
    inner: TcpStream,
    started: Instant,
    moved: Arc<AtomicU64>,
}

impl Tracked {
    fn note<T>(&self, poll: &Poll<std::io::Result<T>>, progressed: bool) {
        if progressed && matches!(poll, Poll::Ready(Ok(_))) {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.moved.store(ms, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(&poll, buf.filled().len() > before);
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        let progressed = matches!(poll, Poll::Ready(Ok(n)) if n > 0);
        self.note(&poll, progressed);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let progressed = matches!(poll, Poll::Ready(Ok(n)) if n > 0);
        self.note(&poll, progressed);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One render: the exposition and, made once when a scraper first asks for it, its gzip form.
struct Render {
    text: Bytes,
    gzip: OnceCell<Option<Bytes>>,
}

impl Render {
    /// The gzip form, compressed on the blocking pool once per render; `None` if that failed.
    async fn gzip(&self) -> Option<Bytes> {
        let text = self.text.clone();
        let made =
            self.gzip.get_or_init(|| async move { tokio::task::spawn_blocking(move || gzip(&text)).await.ok()? });
        made.await.clone()
    }
}

fn gzip(text: &[u8]) -> Option<Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(text.len() / 4), flate2::Compression::fast());
    encoder.write_all(text).ok()?;
    encoder.finish().ok().map(Bytes::from)
}

/// The latest render and when it started: scrapes that arrive while one is made wait for it
/// and share the next, so a burst of scrapes costs at most two renders, never one each.
struct Renders {
    handle: PrometheusHandle,
    latest: Mutex<Option<(Instant, Arc<Render>)>>,
}

impl Renders {
    /// A render that started no earlier than `arrived` (when the request came); `None` if the
    /// render could not run (the runtime is shutting down).
    async fn body(&self, arrived: Instant) -> Option<Arc<Render>> {
        let mut latest = self.latest.lock().await;
        if let Some((started, render)) = latest.as_ref()
            && *started >= arrived
        {
            return Some(Arc::clone(render));
        }
        let started = Instant::now();
        let handle = self.handle.clone();
        // CPU work that grows with the series: off the app's runtime workers.
        let text = tokio::task::spawn_blocking(move || handle.render()).await.ok()?;
        let render = Arc::new(Render { text: Bytes::from(text), gzip: OnceCell::new() });
        *latest = Some((started, Arc::clone(&render)));
        Some(render)
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics,
    NotFound,
    BadMethod,
}

/// `/metrics` (any query string) by `GET` or `HEAD`; the path is judged first.
fn ask(method: &Method, path: &str) -> Ask {
    if path != PATH {
        Ask::NotFound
    } else if method == Method::GET || method == Method::HEAD {
        Ask::Metrics
    } else {
        Ask::BadMethod
    }
}

/// Whether an `Accept-Encoding` value accepts gzip (`gzip` or `x-gzip`, with a q-value other
/// than 0).
fn accepts_gzip(accept: &str) -> bool {
    accept.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")).and_then(|q| q.parse::<f32>().ok()) == Some(0.0)
        });
        (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && !refused
    })
}

/// The answer to one request (hyper leaves out the body of a `HEAD` answer).
async fn respond(renders: &Renders, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match ask(request.method(), request.uri().path()) {
        Ask::Metrics => {}
        Ask::NotFound => return plain(StatusCode::NOT_FOUND, "poolwatch serves /metrics only\n"),
        Ask::BadMethod => {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "");
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    }
    let Some(render) = renders.body(Instant::now()).await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "");
    };
    let wants_gzip =
        request.headers().get_all(header::ACCEPT_ENCODING).iter().any(|v| v.to_str().is_ok_and(accepts_gzip));
    let gzipped = if wants_gzip { render.gzip().await } else { None };
    let mut response = plain(StatusCode::OK, "");
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    let body = match gzipped {
        Some(body) => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            body
        }
        None => render.text.clone(),
    };
    *response.body_mut() = Full::new(body);
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_and_head_on_metrics_are_served() {
        assert_eq!(ask(&Method::GET, "/metrics"), Ask::Metrics);
        assert_eq!(ask(&Method::HEAD, "/metrics"), Ask::Metrics);
        assert_eq!(ask(&Method::POST, "/metrics"), Ask::BadMethod);
        for other in ["/", "/metricsx", "/admin", ""] {
            assert_eq!(ask(&Method::GET, other), Ask::NotFound, "{other}");
        }
    }

    #[test]
    fn gzip_is_used_when_accepted_with_a_nonzero_q() {
        for yes in ["gzip", "gzip, deflate, br", "deflate;q=1.0, GZIP;q=0.5", "x-gzip", "identity, gzip;q=1"] {
            assert!(accepts_gzip(yes), "{yes}");
        }
        for no in ["", "identity", "deflate, br", "gzip;q=0", "gzip; q=0.0", "gzipx", "*"] {
            assert!(!accepts_gzip(no), "{no}");
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
        let mut bodies: Vec<Arc<Render>> = Vec::new();
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
