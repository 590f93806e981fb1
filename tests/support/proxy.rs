//! A loopback TCP proxy in front of the test server that can cut its live connections the
//! way networks and poolers do: a reset (RST, `SO_LINGER` 0) or a half-close (FIN), or make
//! one go silent: it stops forwarding and stops reading while keeping both sockets open (no
//! RST, no FIN), like a NAT that dropped the flow, or black-hole it: keep reading and
//! dropping what the client sends, answer nothing (a peer that went silent after startup
//! while its socket still takes bytes).

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::broadcast;

/// How to cut the proxied connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Close the client side with `SO_LINGER` 0: the client reads `ECONNRESET`.
    Reset,
    /// Shut down the client side's write half: the client reads end-of-file (FIN).
    HalfClose,
    /// Go silent: stop forwarding and reading, keep both sockets open until the proxy drops.
    /// Only the connection whose upstream local port is given (the server's
    /// `inet_client_port()` for that session).
    Freeze(u16),
    /// Black-hole: keep reading what the client sends and drop it, forward and answer nothing,
    /// keep both sockets open. Only the connection whose upstream local port is given.
    BlackHole(u16),
}

/// A running proxy; it stops accepting when dropped.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    cut: broadcast::Sender<Cut>,
    live: Arc<AtomicUsize>,
    /// Frozen connections, kept open while the proxy lives.
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    /// Connections black-holed so far.
    holes: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `127.0.0.1:upstream_port`.
    pub async fn start(upstream_port: u16) -> Proxy {
        Proxy::start_with_window(upstream_port, None).await
    }

    /// Like [`Proxy::start`], with the receive buffer of the client-facing sockets set to
    /// `window` bytes: a frozen connection then stops acknowledging after that much, and the
    /// client's further bytes stay in its send queue (a silent peer).
    pub async fn start_with_window(upstream_port: u16, window: Option<u32>) -> Proxy {
        let socket = TcpSocket::new_v4().expect("proxy socket");
        if let Some(bytes) = window {
            socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind the proxy");
        let listener = socket.listen(128).expect("listen");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, _) = broadcast::channel(16);
        let live = Arc::new(AtomicUsize::new(0));
        let frozen = Arc::new(Mutex::new(Vec::new()));
        let holes = Arc::new(AtomicUsize::new(0));
        let (cut_tx, live_count, frozen_list) = (cut.clone(), Arc::clone(&live), Arc::clone(&frozen));
        let hole_count = Arc::clone(&holes);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else { continue };
                let args = (cut_tx.subscribe(), Arc::clone(&live_count), Arc::clone(&frozen_list));
                tokio::spawn(pipe(client, upstream, args.0, args.1, args.2, Arc::clone(&hole_count)));
            }
        });
        Proxy { port, cut, live, frozen, holes, accept }
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

    /// Connections black-holed so far.
    pub fn black_holed(&self) -> usize {
        self.holes.load(Ordering::SeqCst)
    }

    /// Connections frozen so far.
    pub fn frozen(&self) -> usize {
        self.frozen.lock().unwrap().len()
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
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    holes: Arc<AtomicUsize>,
) {
    live.fetch_add(1, Ordering::SeqCst);
    let upstream_port = upstream.local_addr().map(|a| a.port()).unwrap_or(0);
    let how = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                _ = &mut copy => break None,
                how = cut.recv() => match how {
                    Ok(Cut::Freeze(port) | Cut::BlackHole(port)) if port != upstream_port => continue,
                    how => break how.ok(),
                },
            }
        }
    };
    live.fetch_sub(1, Ordering::SeqCst);
    if matches!(how, Some(Cut::BlackHole(_))) {
        holes.fetch_add(1, Ordering::SeqCst);
        // Read and drop until the client closes; the server's side stays open meanwhile.
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(tokio::io::AsyncReadExt::read(&mut client, &mut sink).await, Ok(n) if n > 0) {}
        drop(upstream);
        return;
    }
    if matches!(how, Some(Cut::Freeze(_))) {
        frozen.lock().unwrap().push((client, upstream));
        return;
    }
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
        Some(Cut::Freeze(_) | Cut::BlackHole(_)) | None => {}
    }
}
