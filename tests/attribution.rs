//! Attribution that stays cheap: a stable per-pool tag matched by port, exact against another
//! process (a replica) carrying the same tag; a nonce only where declared; and the sessions the
//! server ended without the pool closing them, counted by cause.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use poolwatch::attribution::NetworkPath;
use poolwatch::sqlx;
use poolwatch::{Cause, attribution, instrument_pool};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use support::{Cluster, POOL, eventually, metric, quiet_config, recorder};

/// Another process (a replica) with sessions under the same `application_name`.
struct Replica(Child);

impl Replica {
    fn start(cluster: &Cluster, app_name: &str) -> Replica {
        let child = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &cluster.port().to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-q", "-c", "SELECT pg_sleep(300)"])
            .env("PGAPPNAME", app_name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql (apt-get install postgresql-client)");
        Replica(child)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tag is the same on every start (no new postgres_exporter series per deploy), keeps
/// the user's name, and a replica's sessions under the same tag are not counted: they are
/// told apart by client address and port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_tag_is_exact_against_a_replica_with_the_same_tag() {
    recorder();
    let cluster = Cluster::start();
    let options = cluster.options().application_name("api");
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options.clone()).await.unwrap();
    let watch = instrument_pool(&pool, quiet_config("main")).unwrap();
    assert_eq!(watch.application_name(), "api pw:main");
    assert_eq!(watch.application_name(), attribution::stable_tag(Some("api"), "main"));
    assert_eq!(watch.network_path(), NetworkPath::Direct);

    let _replica = Replica::start(&cluster, watch.application_name());
    let held = support::hold(&pool, 3).await;
    eventually(Duration::from_secs(20), "the replica's session is up", async || {
        (support::sessions_named(&cluster, watch.application_name()).await > i64::from(pool.size())).then_some(())
    })
    .await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.as_ref().unwrap().total(), pool.size(), "only this process's sessions: {s:?}");
    assert_eq!(s.phantom, Some(0), "{s:?}");
    drop(held);
    watch.shutdown().await;
    pool.close().await;

    // A restart: the same name again.
    let pool = PgPoolOptions::new().max_connections(5).connect_lazy_with(options);
    let watch = instrument_pool(&pool, quiet_config("main")).unwrap();
    assert_eq!(watch.application_name(), "api pw:main", "the same on every start");
    watch.shutdown().await;
}

/// Declared NAT: the ports the server sees are not ours, so the tag carries a per-process
/// nonce and the census counts by tag alone, still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_nat_falls_back_to_a_nonce() {
    recorder();
    let cluster = Cluster::start();
    let options = cluster.options().application_name("api");
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options.clone()).await.unwrap();
    let watch = instrument_pool(&pool, quiet_config("natted").network_path(NetworkPath::Nat)).unwrap();
    let other = PgPoolOptions::new().max_connections(1).connect_lazy_with(options);
    let other_watch = instrument_pool(&other, quiet_config("natted").network_path(NetworkPath::Nat)).unwrap();
    assert!(watch.application_name().starts_with("api pw:natted:"), "{}", watch.application_name());
    assert_ne!(watch.application_name(), other_watch.application_name(), "a nonce per process start");
    let held = support::hold(&pool, 2).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!((s.server.as_ref().unwrap().total(), s.phantom), (pool.size(), Some(0)), "{s:?}");
    drop(held);
}

/// Item 4: `pg_terminate_backend` on every pool backend. sqlx would replace them silently; the
/// census counts each one, by cause, and not the one the pool closed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pool_sessions_are_counted_by_cause() {
    recorder();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 5).await;
    let watch = instrument_pool(&pool, quiet_config("ended_kill")).unwrap();
    let ended = |cause: &str| metric("poolwatch_sessions_ended_total", &[(POOL, "ended_kill"), ("cause", cause)]);
    assert_eq!(ended("admin_shutdown"), Some(0.0), "the counter exists at 0 from the start");
    eventually(Duration::from_secs(20), "the start-up heartbeat ran", async || {
        (watch.heartbeat().pool.successes >= 1).then_some(())
    })
    .await;
    drop(support::hold(&pool, 4).await);
    watch.census_now().await.unwrap();

    // The pool closes one itself: not counted.
    pool.acquire().await.unwrap().close().await.unwrap();
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.sessions_ended, 0, "{s:?}");
    let n = pool.size();
    assert!(n >= 3, "{n}");

    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
            .bind(watch.application_name())
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert_eq!(killed.len(), n as usize);
    let s = eventually(Duration::from_secs(20), "every killed session counted", async || {
        let s = watch.census_now().await.ok()?;
        (s.sessions_ended >= u64::from(n)).then_some(s)
    })
    .await;
    assert_eq!(s.sessions_ended, u64::from(n), "{s:?}");
    assert_eq!(ended("admin_shutdown"), Some(f64::from(n)));
    // Not counted as anything else (its series exists only once counted: the series budget).
    assert!(matches!(ended("connection_ended"), None | Some(0.0)), "{:?}", ended("connection_ended"));
}

/// Item 4: the server's `idle_session_timeout` ends idle pool connections: counted as
/// `idle_session_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_kills_of_idle_pool_connections_are_counted() {
    recorder();
    // Long enough that the census below sees the held sessions alive on a loaded machine.
    let cluster = Cluster::start_with(&[("idle_session_timeout", "5s")]);
    let pool = PgPoolOptions::new().max_connections(5).connect_lazy_with(cluster.options());
    let watch = instrument_pool(&pool, quiet_config("ended_idle")).unwrap();
    eventually(Duration::from_secs(20), "the lint read the server's idle_session_timeout", async || {
        watch.server_settings().filter(|s| s.idle_session_timeout.is_some())
    })
    .await;
    drop(support::hold(&pool, 3).await);
    let n = pool.size();
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.as_ref().unwrap().total(), n, "seen alive first: {s:?}");
    // The start-up heartbeat's connection may have idled out before `hold` took it (a slow
    // machine): counted already, so counted from here.
    let base = s.sessions_ended;
    let s = eventually(Duration::from_secs(30), "the idle sessions ended and were counted", async || {
        let s = watch.census_now().await.ok()?;
        (s.sessions_ended >= base + u64::from(n)).then_some(s)
    })
    .await;
    assert_eq!(s.sessions_ended, base + u64::from(n), "{s:?}");
    let by = |cause: &str| metric("poolwatch_sessions_ended_total", &[(POOL, "ended_idle"), ("cause", cause)]);
    let all: Vec<_> = Cause::ALL.iter().map(|c| (c.as_str(), by(c.as_str()))).filter(|(_, v)| v.is_some()).collect();
    assert_eq!(by("idle_session_timeout"), Some((base + u64::from(n)) as f64), "by cause: {all:?}");
    assert_eq!(by("admin_shutdown"), Some(0.0));
}
