//! PostgreSQL before 14 (only 15 runs here): every version gate of this test process is forced
//! to 13 (`pretend_server_version`), so poolwatch takes the paths it takes on an older server.
//! Its own connection must start without `idle_session_timeout` (a setting 12 and 13 reject,
//! FATAL, in the startup packet), and the census and the direct heartbeat must come up. A
//! loopback proxy in front of the server records what poolwatch's own connection sends.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolwatch::attribution::NetworkPath;
use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use support::{Cluster, eventually, recorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards every connection to `upstream` and records what clients send (its tasks end with
/// the test's runtime).
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(upstream: u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&sent);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let index = {
                    let mut l = log.lock().unwrap();
                    l.push(Vec::new());
                    l.len() - 1
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            log.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Recorder { port, sent, accept }
    }

    /// Each connection's startup packet (after an optional SSLRequest) and what followed it.
    fn connections(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let sent = self.sent.lock().unwrap().clone();
        sent.into_iter()
            .map(|bytes| {
                let ssl_request = bytes.len() >= 8 && bytes[..8] == [0, 0, 0, 8, 4, 210, 22, 47];
                let rest = if ssl_request { &bytes[8..] } else { &bytes[..] };
                let len = rest.get(..4).map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
                let len = len.min(rest.len());
                (rest[..len].to_vec(), rest[len..].to_vec())
            })
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The first test sets the gate for the whole binary: no other test runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_and_direct_heartbeat_start_on_the_pre_14_path() {
    recorder();
    let cluster = Cluster::start();
    let proxy = Recorder::start(cluster.port()).await;
    let own = cluster.options().port(proxy.port);
    let watch_with = |pool: &sqlx::PgPool, name: &str| {
        let config = Config::new(name).direct_connect_options(own.clone()).network_path(NetworkPath::Direct);
        instrument_pool(pool, config).unwrap()
    };

    // PostgreSQL 15 as itself: the setting is SET after connecting, never in the startup packet.
    let pool = support::pool(&cluster, 3).await;
    let watch = watch_with(&pool, "pg15");
    assert!(watch.census_now().await.unwrap().census_up);
    let seen = proxy.connections();
    assert_eq!(seen.len(), 1, "poolwatch's own connection only");
    let (startup, after) = &seen[0];
    assert!(contains(startup, "poolwatch-census:pg15"), "{startup:?}");
    assert!(!contains(startup, "idle_session_timeout"), "in the startup packet: {startup:?}");
    assert!(contains(after, "SET idle_session_timeout = 0"), "set after connecting on 14+");
    watch.shutdown().await;

    // As PostgreSQL 13: neither sent nor SET; census and direct heartbeat up.
    poolwatch::internals::pretend_server_version(Some(130_000));
    let watch = watch_with(&pool, "pg13");
    let held = pool.acquire().await.unwrap();
    let s = watch.census_now().await.unwrap();
    assert_eq!((s.census_up, s.phantom), (true, Some(0)), "{s:?}");
    eventually(Duration::from_secs(30), "the direct heartbeat up", async || {
        watch.heartbeat().direct.up.filter(|up| *up)
    })
    .await;
    let seen = proxy.connections();
    let (startup, after) = seen.last().unwrap();
    assert!(contains(startup, "poolwatch-census:pg13"), "{startup:?}");
    assert!(!contains(startup, "idle_session_timeout") && !contains(after, "idle_session_timeout"));
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let own: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poolwatch-census:pg13'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(own, 1);
    drop(held);
    watch.shutdown().await;
    pool.close().await;
}
