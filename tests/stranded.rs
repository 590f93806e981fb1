//! A silent peer on loopback: a proxy stops forwarding one connection and stops reading it,
//! keeping both sockets open (no RST, no FIN; the server is fine). The app times out a query
//! on that connection and drops it; sqlx's return-to-pool ping never completes, so the pool
//! keeps counting the slot while nobody holds it and it is never idle. poolwatch shows the
//! slot as stranded and the socket whose send queue never drains, and the health report says
//! why, while the app's other queries keep working. The census cannot see this leak: the
//! server session still exists.

mod support;

use std::time::Duration;

use poolwatch::attribution::NetworkPath;
use poolwatch::report::HealthStatus;
use poolwatch::sqlx;
use poolwatch::{Config, instrument_options_named, instrument_pool};
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;
use support::proxy::{Cut, Proxy};
use support::{Cluster, POOL, eventually, metric, recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_strands_a_slot_and_its_send_queue_never_drains() {
    recorder();
    let cluster = Cluster::start();
    let proxy = Proxy::start_with_window(cluster.port(), Some(4096)).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(cluster.options().port(proxy.port()))
        .await
        .unwrap();
    // A TCP proxy rewrites the client ports the server sees: declared, as README says.
    let config = Config::new("silent")
        .network_path(NetworkPath::Nat)
        .sample_interval(Duration::from_millis(50))
        .census_interval(Duration::from_millis(100))
        .send_queue_stuck_after(Duration::from_millis(500))
        .heartbeat_interval(Duration::from_millis(200));
    let watch = instrument_pool(&pool, config).unwrap();
    let db = watch.pool();
    let gauge = |name: &str| metric(name, &[(POOL, "silent")]);
    eventually(Duration::from_secs(10), "a healthy start", async || {
        let h = watch.health();
        (h.status == HealthStatus::Ok && h.heartbeat.diagnosis == Some("healthy")).then_some(())
    })
    .await;
    // Standard detail: the series appears at the first stranded slot.
    assert_eq!(gauge("poolwatch_stranded_slots"), None);

    // The peer of one connection goes silent mid-request.
    let mut conn = db.acquire().await.unwrap();
    let port: i32 = sqlx::query_scalar("SELECT inet_client_port()").fetch_one(&mut *conn).await.unwrap();
    proxy.cut_all(Cut::Freeze(u16::try_from(port).unwrap()));
    eventually(Duration::from_secs(5), "the proxy froze the connection", async || (proxy.frozen() == 1).then_some(()))
        .await;
    // A request bigger than the peer's window: most of it stays in our send queue.
    let big = format!("SELECT length('{}')", "x".repeat(256 * 1024));
    let query = poolwatch::internals::fetch_all_text(&mut conn, big);
    assert!(tokio::time::timeout(Duration::from_millis(500), query).await.is_err(), "the silent peer never answers");
    // The app gives up on it and drops the connection: sqlx pings it before taking it back.
    drop(conn);

    let stranded = eventually(Duration::from_secs(10), "the slot shows as stranded", async || {
        (gauge("poolwatch_stranded_slots") == Some(1.0)).then_some(())
    });
    stranded.await;
    eventually(Duration::from_secs(10), "the socket's send queue is flagged", async || {
        (gauge("poolwatch_client_sockets_send_queue_stuck") == Some(1.0)).then_some(())
    })
    .await;
    // The app's other queries work, on other connections.
    for _ in 0..20 {
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&db).await.unwrap();
        assert_eq!(one, 1);
    }
    let mut tx = db.begin().await.unwrap();
    tx.execute("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();
    // The census sees nothing wrong: the session is alive on the server.
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.phantom, Some(0), "no census shows this leak: {s:?}");
    let queued = s.sockets.as_ref().map(|c| c.send_queued.clone()).unwrap_or_default();
    // (A busy socket can show a few bytes in flight at any one census: the bound filters it.)
    let stuck: Vec<_> = queued.iter().filter(|q| q.send > 4096).collect();
    assert_eq!(stuck.len(), 1, "most of the request waits in our send queue: {queued:?}");

    let h = watch.health();
    println!("{h:#?}");
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert_eq!((h.stranded_slots, h.send_queue_stuck_sockets), (Some(1), 1));
    let codes: Vec<&str> = h.reasons.iter().map(|r| r.code).collect();
    assert!(codes.contains(&"stranded_slots") && codes.contains(&"send_queue_stuck"), "{codes:?}");
    // The stranded slot is counted as in use (the pool heartbeat may hold one more for a moment).
    assert!((1..=2).contains(&h.pool.used), "the pool counts the stranded slot as in use: {:?}", h.pool);
    drop(proxy);
}

/// sqlx #4349 on a pool that only a library drives (no `WatchedPool`): with
/// `instrument_options_named`'s hooks, a connection the app gave back whose peer then
/// black-holes it (takes the bytes, answers nothing) stays counted as checked out by the pool
/// forever (sqlx's return-to-pool ping never completes): one stranded slot, in the metric and
/// the health report. A connection the library holds across samples is not stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_slot_behind_a_black_hole_is_stranded_on_a_bare_pool() {
    recorder();
    let cluster = Cluster::start();
    let proxy = Proxy::start(cluster.port()).await;
    let options = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5));
    let pool = instrument_options_named(options, "bare_strand")
        .connect_with(cluster.options().port(proxy.port()))
        .await
        .unwrap();
    let config = Config::new("bare_strand")
        .network_path(NetworkPath::Nat)
        .sample_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_secs(3600));
    let watch = instrument_pool(&pool, config).unwrap();
    support::startup_heartbeat(&watch).await;
    // The library holds a connection across samples: that is work, not a stranded slot.
    let held = pool.acquire().await.unwrap();
    let before = watch.lifecycle().unwrap().opened;
    eventually(Duration::from_secs(10), "the figure is judged while a connection is held", async || {
        (watch.health().stranded_slots == Some(0)).then_some(())
    })
    .await;

    let mut conn = pool.acquire().await.unwrap();
    let port: i32 = sqlx::query_scalar("SELECT inet_client_port()").fetch_one(&mut *conn).await.unwrap();
    proxy.cut_all(Cut::BlackHole(u16::try_from(port).unwrap()));
    eventually(Duration::from_secs(5), "the proxy black-holes the connection", async || {
        (proxy.black_holed() == 1).then_some(())
    })
    .await;
    // The library gives it back; sqlx pings it before it goes idle, into the black hole.
    drop(conn);
    drop(held);
    eventually(Duration::from_secs(10), "the slot shows as stranded", async || {
        (metric("poolwatch_stranded_slots", &[(POOL, "bare_strand")]) == Some(1.0)).then_some(())
    })
    .await;
    let h = watch.health();
    assert_eq!(h.stranded_slots, Some(1), "{h:?}");
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert!(h.reasons.iter().any(|r| r.code == "stranded_slots"), "{:?}", h.reasons);
    assert_eq!(pool.size() as usize - pool.num_idle(), 1, "the pool still counts the slot checked out");
    // The pool's other connections work, busy through several samples (their recent releases
    // sit in the idle queue); the count does not move with them.
    let sampled = || metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, "bare_strand")]);
    let mut samples = vec![sampled()];
    let busy = tokio::time::Instant::now();
    while samples.len() <= 4 && busy.elapsed() < Duration::from_secs(60) {
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
        assert_eq!(one, 1);
        if samples.last() != Some(&sampled()) {
            samples.push(sampled());
        }
    }
    assert!(samples.len() > 4, "the watch kept sampling: {samples:?}");
    assert_eq!(watch.health().stranded_slots, Some(1));
    assert!(watch.lifecycle().unwrap().opened >= before);
}
