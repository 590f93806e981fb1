//! Sessions the server kills are counted at the default `Config`: the pool's sockets are
//! followed from sample to sample, so a busy pool that replaced its killed connections before
//! any census still has each kill counted, by cause; and connections the pool closes itself
//! (`idle_timeout`, `max_lifetime`) are never counted.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use support::pgbouncer::PgBouncer;
use support::{Cluster, POOL, eventually, metric, recorder};

/// What an ORM does: a query every 50 ms through the pool, until dropped. Owned by the test.
struct Workload {
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Workload {
    fn start(pool: &PgPool) -> Workload {
        let (stop, queries) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (pool, s, q) = (pool.clone(), Arc::clone(&stop), Arc::clone(&queries));
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                // Errors are what the app would see: sqlx replaces dead connections silently.
                if sqlx::query("SELECT 1").execute(&pool).await.is_ok() {
                    q.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Workload { stop, queries, task: Some(task) }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn pids(admin: &mut PgConnection, app_name: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(app_name)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// The inodes of the pool's established sockets at the watch's last sample.
fn followed(watch: &PoolWatch) -> HashSet<u64> {
    let s = watch.snapshot();
    let sockets = s.sockets.map(|c| c.sockets).unwrap_or_default();
    sockets.iter().filter(|s| s.state == "established").map(|s| s.inode).collect()
}

/// The default `Config` (sample every 5 s, census every 900 s): a busy pool of 4 whose every
/// backend is terminated, three rounds. sqlx replaces them before any census; each kill is
/// counted within a couple of samples, as `admin_shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kill_of_a_busy_pool_is_counted_at_the_default_config() {
    recorder();
    let cluster = Cluster::start();
    let mut admin = support::admin(&cluster).await;
    let pool = support::pool(&cluster, 4).await;
    let watch = instrument_pool(&pool, Config::new("ended_default")).unwrap();
    let ended = |cause: &str| metric("poolwatch_sessions_ended_total", &[(POOL, "ended_default"), ("cause", cause)]);
    // Four connections open, then a query every 50 ms rotates through them.
    drop(support::hold(&pool, 4).await);
    let work = Workload::start(&pool);
    let mut killed = 0u64;
    let mut before = HashSet::new();
    for round in 1..=3 {
        // A sample has seen this round's connections (all new since the last round).
        // The admin connection reads as one more until a census tells it apart: the first
        // one may not (the pool's count moved meanwhile), the one the client-side ledger then
        // asks for runs up to 10 samples after it.
        let mut last = String::new();
        let seen = eventually(Duration::from_secs(120), "a sample saw the pool's 4 new connections", async || {
            // A kill that lands on the workload's query in flight makes sqlx close that
            // connection without a replacement (one query at a time needs one): a busy app
            // opens it again, as this does.
            if pool.size() < 4 {
                drop(support::hold(&pool, 4).await);
            }
            let now = followed(&watch);
            let s = watch.snapshot();
            let state = format!(
                "round {round}: followed {now:?} (before {before:?}), pool size {}, client gap {:?}, sockets {:?}",
                pool.size(),
                s.client_gap,
                s.sockets.as_ref().map(|c| (
                    c.unattributed,
                    c.sockets.iter().map(|s| (s.inode, s.local.port(), s.state)).collect::<Vec<_>>()
                ))
            );
            if state != last {
                eprintln!("{state}");
                last = state;
            }
            (now.len() == 4 && now.is_disjoint(&before) && pool.size() == 4).then_some(now)
        })
        .await;
        let victims = pids(&mut admin, watch.application_name()).await;
        assert_eq!(victims.len(), 4, "round {round}: {victims:?}");
        for pid in &victims {
            let _: bool =
                sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut admin).await.unwrap();
        }
        killed += 4;
        let at = Instant::now();
        let mut last = killed - 4;
        let s = eventually(Duration::from_secs(60), "every killed session counted", async || {
            let s = watch.snapshot();
            if s.sessions_ended != last {
                last = s.sessions_ended;
                eprintln!("round {round}: {last} of {killed} counted {:?} after the kill", at.elapsed());
            }
            (s.sessions_ended >= killed).then_some(s)
        })
        .await;
        eprintln!("round {round}: {killed} counted {:?} after the kill", at.elapsed());
        assert_eq!(s.sessions_ended, killed, "round {round}: {s:?}");
        assert_eq!(ended("admin_shutdown"), Some(killed as f64), "round {round}");
        assert!(matches!(ended("connection_ended"), None | Some(0.0)), "{:?}", ended("connection_ended"));
        before = seen;
    }
    let queries = work.queries.load(Ordering::Relaxed);
    work.stop().await;
    assert!(queries > 0);
    assert_eq!(watch.snapshot().sessions_ended, killed);
}

/// The default `Config`: a pool whose connections close by `idle_timeout`, and one whose
/// connections close by `max_lifetime` while busy (sqlx's own closes), count none of them as
/// ended, though every sample saw their sockets come and go. Each pool alone on its server's
/// address, so every socket is followed (two pools to one address are told apart by a census).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_pool_closes_itself_are_not_counted_at_the_default_config() {
    recorder();
    let cluster = Cluster::start();
    let idle = PgPoolOptions::new().max_connections(4).idle_timeout(Duration::from_secs(1));
    churn_alone(&cluster, "closes_idle", idle, false).await;
    let aging = PgPoolOptions::new().max_connections(4).max_lifetime(Duration::from_millis(700));
    churn_alone(&cluster, "closes_aging", aging, true).await;
}

/// Opens and lets `options` close connections (4 at a time, or under a query every 50 ms
/// when `busy`) until samples have seen 8 of them come and go; then checks nothing was counted.
async fn churn_alone(cluster: &Cluster, name: &str, options: PgPoolOptions, busy: bool) {
    let pool = options.connect_lazy_with(cluster.options());
    let watch = instrument_pool(&pool, Config::new(name)).unwrap();
    let work = busy.then(|| Workload::start(&pool));
    let mut seen = HashSet::new();
    eventually(Duration::from_secs(120), "samples saw 8 connections of the pool come and go", async || {
        if !busy && pool.size() == 0 {
            drop(support::hold(&pool, 4).await);
        }
        let now = followed(&watch);
        let gone = seen.difference(&now).count();
        seen.extend(now);
        (gone >= 8).then_some(())
    })
    .await;
    if let Some(work) = work {
        work.stop().await;
    }
    // Two more samples after the last closes (an end is settled within two), each seen as a
    // connection opened and then closed by the pool.
    for _ in 0..2 {
        let held = pool.acquire().await.unwrap();
        eventually(Duration::from_secs(30), "a sample saw the connection", async || {
            (!followed(&watch).is_empty()).then_some(())
        })
        .await;
        drop(held);
        eventually(Duration::from_secs(30), "the pool closed it and a sample saw that", async || {
            (pool.size() == 0 && followed(&watch).is_empty()).then_some(())
        })
        .await;
    }
    let s = watch.snapshot();
    assert_eq!(s.sessions_ended, 0, "{name}: {s:?}");
    let counted = metric("poolwatch_sessions_ended_total", &[(POOL, name), ("cause", "admin_shutdown")]);
    assert_eq!(counted, Some(0.0), "{name}");
    watch.shutdown().await;
    pool.close().await;
}

/// Behind PgBouncer, README's setup and nothing else (the admin console declared, poolwatch's
/// own connection to the server): the pooler's `client_idle_timeout` ends the connections the
/// app holds without using (and the idle ones); each held one is counted within two samples
/// as `pooler_idle_timeout`, two rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooler_kills_are_counted_at_the_default_config() {
    recorder();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("client_idle_timeout", "2")]);
    let pool = PgPoolOptions::new().max_connections(5).connect_lazy_with(bouncer.options());
    let watch = instrument_pool(&pool, bouncer.declared(Config::new("ended_pooler"), &cluster)).unwrap();
    let ended = |cause: &str| metric("poolwatch_sessions_ended_total", &[(POOL, "ended_pooler"), ("cause", cause)]);
    for round in 1..=2 {
        let base = watch.snapshot().sessions_ended;
        let held = support::hold(&pool, 3).await;
        let at = Instant::now();
        let s = eventually(Duration::from_secs(60), "the held connections killed and counted", async || {
            let s = watch.snapshot();
            (s.sessions_ended >= base + 3).then_some(s)
        })
        .await;
        eprintln!(
            "round {round}: {} counted {:?} after the connections were taken",
            s.sessions_ended - base,
            at.elapsed()
        );
        // The idle ones (the heartbeat's) may be counted too: all as the pooler's idle timeout.
        assert_eq!(ended("pooler_idle_timeout"), Some(s.sessions_ended as f64), "round {round}: {s:?}");
        drop(held);
        // sqlx pings them on return and closes them: not counted again.
        eventually(Duration::from_secs(30), "the dead connections closed", async || (pool.size() <= 2).then_some(()))
            .await;
    }
    assert!(matches!(ended("connection_ended"), None | Some(0.0)), "{:?}", ended("connection_ended"));
}
