//! The `/metrics` listener: HTTP/1.1, one response per connection, any path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::PrometheusHandle;

/// A slow or silent client is dropped after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads longer than this are refused (scrapers send a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;

pub(super) async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, handle.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::debug!(error = %e, "poolwatch /metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, handle: PrometheusHandle) {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut buf = [0u8; 2048];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            if head.len() > MAX_HEAD {
                return false;
            }
        }
    })
    .await;
    if !matches!(complete, Ok(true)) {
        return;
    }
    let method = head.split(|b| *b == b' ').next().unwrap_or_default();
    let (status, body) = match method {
        b"GET" | b"HEAD" => ("200 OK", handle.render()),
        _ => ("405 Method Not Allowed", String::new()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        if method != b"HEAD" {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.shutdown().await
    })
    .await;
}
