//! A loopback TCP proxy in front of the test server that can cut its live connections the
//! way networks and poolers do: a reset (RST, `SO_LINGER` 0) or a half-close (FIN).

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// How to cut the proxied connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Close the client side with `SO_LINGER` 0: the client reads `ECONNRESET`.
    Reset,
    /// Shut down the client side's write half: the client reads end-of-file (FIN).
    HalfClose,
}

/// A running proxy; it stops accepting when dropped.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    cut: broadcast::Sender<Cut>,
    live: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `127.0.0.1:upstream_port`.
    pub async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, _) = broadcast::channel(16);
        let live = Arc::new(AtomicUsize::new(0));
        let (cut_tx, live_count) = (cut.clone(), Arc::clone(&live));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else { continue };
                tokio::spawn(pipe(client, upstream, cut_tx.subscribe(), Arc::clone(&live_count)));
            }
        });
        Proxy { port, cut, live, accept }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections currently proxied.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Cuts every live connection; new ones are still accepted.
    pub fn cut_all(&self, how: Cut) {
        let _ = self.cut.send(how);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(
    mut client: TcpStream,
    mut upstream: TcpStream,
    mut cut: broadcast::Receiver<Cut>,
    live: Arc<AtomicUsize>,
) {
    live.fetch_add(1, Ordering::SeqCst);
    let how = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => None,
        how = cut.recv() => how.ok(),
    };
    live.fetch_sub(1, Ordering::SeqCst);
    drop(upstream);
    match how {
        Some(Cut::Reset) => {
            let _ = client.set_zero_linger();
            drop(client);
        }
        Some(Cut::HalfClose) => {
            let _ = client.shutdown().await;
            // Keep our side open until the client closes it (or a while), so the close
            // reaches it as a FIN and not as a reset of unread data.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                use tokio::io::AsyncReadExt;
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        None => {}
    }
}
