//! The watch on its worst day: every duration `Config` accepts (up to `Duration::MAX`, a
//! common way to say "never") runs without a panic; a task that panics is logged once with
//! the pool's name and restarted, its figures reading unknown meanwhile; a stalled task turns
//! `health()` degraded and its timestamp stops; a failed census is retried within seconds at
//! the default cadence, and a lock wait one census saw is confirmed (or cleared) soon.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use poolwatch::attribution::NetworkPath;
use poolwatch::internals::Fault;
use poolwatch::report::HealthStatus;
use poolwatch::sqlx;
use poolwatch::{Config, Deployment, PoolWatch, instrument_pool};
use sqlx::{Connection, Executor};
use support::{Cluster, POOL, eventually, metric, recorder};

/// Every panic of this test binary, with its thread: a background task's panic is otherwise
/// only a line on stderr.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("?").to_owned();
            PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{thread}: {info}"));
            default(info);
        }));
    });
}

fn panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Durations from the smallest a test can run briefly to `Duration::MAX`.
fn sweep() -> Vec<Duration> {
    vec![
        Duration::from_millis(1),
        Duration::from_secs(1),
        Duration::from_secs(86_400 * 365 * 30),
        Duration::from_secs(86_400 * 365 * 30) + Duration::from_nanos(1),
        Duration::from_secs(u64::MAX / 1000),
        Duration::from_secs(u64::MAX),
        Duration::MAX - Duration::from_nanos(1),
        Duration::MAX,
    ]
}

type Set = fn(Config, Duration) -> Config;

/// Each duration field of `Config`, by name.
fn fields() -> Vec<(&'static str, Set)> {
    vec![
        ("sample_interval", |c, d| c.sample_interval(d)),
        ("census_interval", |c, d| c.census_interval(d)),
        ("reach_interval", |c, d| c.reach_interval(d)),
        ("census_timeout", |c, d| c.census_timeout(d)),
        ("heartbeat_interval", |c, d| c.heartbeat_interval(d)),
        ("heartbeat_timeout", |c, d| c.heartbeat_timeout(d)),
        ("heartbeat_max_backoff", |c, d| c.heartbeat_max_backoff(d)),
        ("hazard_recheck_interval", |c, d| c.hazard_recheck_interval(d)),
        ("send_queue_stuck_after", |c, d| c.send_queue_stuck_after(d)),
        ("expect_refresh_every", |c, d| c.expect_refresh_every(d)),
        ("pooler_idle_timeout", |c, d| c.pooler_idle_timeout(d)),
        ("leak_threshold", |c, d| c.leak_threshold(d)),
        ("listener_keepalive", |c, d| c.deployment(Deployment::default().listener_keepalive(Some(d)))),
    ]
}

fn fast(name: &str) -> Config {
    Config::new(name)
        .sample_interval(Duration::from_millis(50))
        .census_interval(Duration::from_millis(200))
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_max_backoff(Duration::from_millis(200))
}

/// Waits until the watch took its first sample, census (or failed one), heartbeat and
/// reachability probe: every schedule has computed its next deadline at least once.
async fn first_round(watch: &PoolWatch, name: &str, what: &str) {
    eventually(Duration::from_secs(60), what, async || {
        let sampled = metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, name)]).is_some();
        let census =
            watch.snapshot().census_up || support::metric_sum("poolwatch_census_errors_total", &[(POOL, name)]) > 0.0;
        let beat = watch.heartbeat().pool.up.is_some();
        let probed = !watch.reachability().addresses.is_empty();
        (sampled && census && beat && probed).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duration_config_accepts_runs_without_a_panic() {
    recorder();
    record_panics();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    // Zero is refused by name, never a panic.
    for (field, set) in fields() {
        let err = instrument_pool(&pool, set(Config::new("zero"), Duration::ZERO)).expect_err(field);
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains("fix:"), "{err}");
    }
    let mut runs = 0;
    for (i, (field, set)) in fields().into_iter().enumerate() {
        for (j, d) in sweep().into_iter().enumerate() {
            let name = format!("dur{i}x{j}");
            let watch = match instrument_pool(&pool, set(fast(&name), d)) {
                Ok(w) => w,
                Err(e) => {
                    // A value PostgreSQL cannot take (census_timeout): refused by name.
                    assert_eq!((e.field, field), ("census_timeout", "census_timeout"), "{field} = {d:?}: {e}");
                    continue;
                }
            };
            first_round(&watch, &name, &format!("{field} = {d:?}: first sample, census, heartbeat, probe")).await;
            watch.shutdown().await;
            runs += 1;
            let seen = panics();
            assert!(seen.is_empty(), "{field} = {d:?} panicked a background task: {seen:#?}");
        }
    }
    assert!(runs >= 90, "{runs} runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_task_is_logged_once_restarted_and_reads_unknown_meanwhile() {
    recorder();
    support::logs::capture("poolwatch=info");
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    let name = "supervised";
    let watch = instrument_pool(&pool, fast(name)).unwrap();
    let healthy = async |what: &str| {
        eventually(Duration::from_secs(60), what, async || {
            let h = watch.health();
            (h.status == HealthStatus::Ok && h.gap.census_up && h.heartbeat.diagnosis == Some("healthy")).then_some(())
        })
        .await
    };
    healthy("healthy at start").await;
    let restarts = |task: &str| metric("poolwatch_task_restarts_total", &[(POOL, name), ("task", task)]);
    assert_eq!((restarts("watch"), restarts("heartbeat")), (Some(0.0), Some(0.0)), "registered at 0");

    // The heartbeat task panics: its figures read unknown (not its last "up") until it runs again.
    watch.inject_fault(Fault::PanicHeartbeat);
    eventually(Duration::from_secs(30), "heartbeat figures unknown after its panic", async || {
        let up = metric("poolwatch_heartbeat_up", &[(POOL, name), ("path", "pool")]);
        (watch.heartbeat().pool.up.is_none() || up.is_some_and(f64::is_nan)).then_some(())
    })
    .await;
    healthy("the heartbeat task restarted").await;
    assert_eq!(restarts("heartbeat"), Some(1.0));

    // The sample and census task panics: census_up is unknown meanwhile, then it comes back.
    let before = metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, name)]).unwrap();
    watch.inject_fault(Fault::PanicWatch);
    eventually(Duration::from_secs(30), "the watch task restarted", async || {
        (restarts("watch") == Some(1.0)).then_some(())
    })
    .await;
    healthy("the watch task restarted").await;
    eventually(Duration::from_secs(30), "samples resume", async || {
        let now = metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, name)])?;
        (now > before).then_some(())
    })
    .await;
    for task in ["heartbeat", "watch"] {
        let logged = support::logs::lines_with("panicked");
        let logged: Vec<_> =
            logged.iter().filter(|l| l.contains(name) && l.contains(&format!("task=\"{task}\""))).collect();
        assert_eq!(logged.len(), 1, "one log line per panic, naming the pool and the task: {logged:#?}");
    }
    watch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_turns_health_degraded_and_its_timestamp_stops() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    let name = "stalled";
    let config = fast(name).census_timeout(Duration::from_secs(1));
    let watch = instrument_pool(&pool, config).unwrap();
    eventually(Duration::from_secs(60), "ok at start", async || {
        let h = watch.health();
        (h.status == HealthStatus::Ok && h.gap.census_up && h.freshness.sample_age_seconds.is_some()).then_some(())
    })
    .await;
    watch.inject_fault(Fault::StallWatch);
    let h = eventually(Duration::from_secs(60), "degraded: watch stalled", async || {
        Some(watch.health()).filter(|h| h.reasons.iter().any(|r| r.code == "watch_stalled"))
    })
    .await;
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert!(h.freshness.sample_age_seconds.is_some_and(|a| a > 2.0), "{:?}", h.freshness);
    // The heartbeat task still runs: its figures stay current.
    assert_eq!(h.heartbeat.diagnosis, Some("healthy"), "{h:?}");
    assert!(!h.reasons.iter().any(|r| r.code == "heartbeat_stale"), "{h:?}");
    let frozen = metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, name)]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric("poolwatch_last_sample_timestamp_seconds", &[(POOL, name)]), Some(frozen));
    watch.inject_fault(Fault::Resume);
    eventually(Duration::from_secs(60), "ok once the task runs again", async || {
        (watch.health().status == HealthStatus::Ok).then_some(())
    })
    .await;
    watch.shutdown().await;
}

/// Forwards `listen` to `upstream` on loopback from now on.
async fn forward(listen: u16, upstream: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await.expect("bind the forwarder");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// At the default cadence (census every 900 s ±20 %): the first census fails (poolwatch's
/// own connection is refused), is retried within seconds once the server answers, sees a
/// lock waiter, and a follow-up census within a minute or so clears it once the wait ended,
/// instead of the figure standing for 15 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_default_cadence_a_failed_census_is_retried_and_a_lock_wait_confirmed_soon() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 3).await;
    let name = "cadence";
    let port = support::cluster::free_port();
    let config =
        Config::new(name).direct_connect_options(cluster.options().port(port)).network_path(NetworkPath::Direct);
    let watch = instrument_pool(&pool, config).unwrap();
    eventually(Duration::from_secs(60), "the first census failed", async || {
        (support::metric_sum("poolwatch_census_errors_total", &[(POOL, name)]) > 0.0).then_some(())
    })
    .await;
    // A session of the pool waits for a lock another connection holds.
    let mut holder = sqlx::postgres::PgConnection::connect_with(&cluster.options()).await.unwrap();
    holder.execute("SELECT pg_advisory_lock(42)").await.unwrap();
    let db = watch.pool();
    let waiter = tokio::spawn(async move {
        let mut c = db.acquire().await.unwrap();
        c.execute("SELECT pg_advisory_lock(42); SELECT pg_advisory_unlock(42)").await.unwrap();
    });
    let fwd = forward(port, cluster.port()).await;
    let reachable = std::time::Instant::now();
    eventually(Duration::from_secs(60), "a census retried within seconds sees the lock waiter", async || {
        (metric("poolwatch_server_lock_waiters", &[(POOL, name)]) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(metric("poolwatch_census_up", &[(POOL, name)]), Some(1.0));
    let retried = reachable.elapsed();
    let age = metric("poolwatch_census_age_seconds", &[(POOL, name)]);
    assert!(age.is_some_and(|a| a < 60.0), "census age {age:?}");
    // The wait ends: a follow-up census (45 s ±20 % after the one that saw it) clears it.
    holder.execute("SELECT pg_advisory_unlock(42)").await.unwrap();
    waiter.await.unwrap();
    let released = std::time::Instant::now();
    eventually(Duration::from_secs(90), "a follow-up census within ~a minute clears the lock waiter", async || {
        (metric("poolwatch_server_lock_waiters", &[(POOL, name)]) == Some(0.0)).then_some(())
    })
    .await;
    eprintln!(
        "default cadence: census up {:.1}s after the server answered; lock waiter cleared {:.1}s after the wait ended",
        retried.as_secs_f64(),
        released.elapsed().as_secs_f64()
    );
    watch.shutdown().await;
    fwd.abort();
}

/// A listener whose keepalive is `Duration::MAX` ("never") receives notifications: its
/// keepalive deadline (`last command + keepalive`) used to overflow the clock (a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_a_keepalive_of_duration_max_receives() {
    recorder();
    let cluster = Cluster::shared();
    for every in [Duration::from_secs(u64::MAX), Duration::MAX] {
        let config = poolwatch::ListenerConfig::new("main", "forever").keepalive(every);
        let mut listener = poolwatch::WatchedListener::connect(cluster.options(), config).await.unwrap();
        listener.listen("jobs").await.unwrap();
        let mut admin = sqlx::postgres::PgConnection::connect_with(&cluster.options()).await.unwrap();
        admin.execute("SELECT pg_notify('jobs', 'one')").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), listener.recv()).await;
        assert_eq!(got.expect("a notification within 30 s").unwrap().payload(), "one");
    }
}

/// The heartbeat task stalls: `health()` stops repeating its last "healthy" (the paths read
/// unknown, `heartbeat_stale`), while the samples go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_heartbeat_reads_unknown_not_its_last_value() {
    recorder();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    let name = "deaf";
    let config = fast(name).census_timeout(Duration::from_secs(1)).heartbeat_timeout(Duration::from_secs(1));
    let watch = instrument_pool(&pool, config).unwrap();
    eventually(Duration::from_secs(60), "healthy at start", async || {
        (watch.health().heartbeat.diagnosis == Some("healthy")).then_some(())
    })
    .await;
    watch.inject_fault(Fault::StallHeartbeat);
    let h = eventually(Duration::from_secs(60), "heartbeat_stale", async || {
        Some(watch.health()).filter(|h| h.reasons.iter().any(|r| r.code == "heartbeat_stale"))
    })
    .await;
    assert_eq!((h.status, h.heartbeat.diagnosis, h.heartbeat.pool.up), (HealthStatus::Degraded, None, None), "{h:?}");
    assert!(!h.reasons.iter().any(|r| r.code == "watch_stalled"), "the samples go on: {h:?}");
    watch.inject_fault(Fault::Resume);
    eventually(Duration::from_secs(60), "healthy once the heartbeat runs again", async || {
        (watch.health().status == HealthStatus::Ok).then_some(())
    })
    .await;
    watch.shutdown().await;
}
