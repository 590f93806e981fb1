//! Acquire, use and connect through the `WatchedPool` on a real server: incident 4
//! (exhaustion), leak suspects with the acquirer's location (incident 3), cancelled acquires,
//! use time, create time, the `Executor` impl, and exact figures under load.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch, WatchedPool, instrument_options, instrument_pool};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool, Row};
use support::exact::ExactRecorder;
use support::{Cluster, POOL, eventually, logs};
use support::{metric, pool_value, recorder};
use tracing::Instrument;

fn setup() {
    recorder();
    logs::capture("poolwatch=debug,acquire=info,sqlx=warn");
}

/// [`support::fast_config`] with the census every minute instead.
fn config(name: &str) -> Config {
    support::fast_config(name).census_interval(Duration::from_secs(60))
}

async fn watched(cluster: &Cluster, options: PgPoolOptions, config: Config) -> (PgPool, PoolWatch, WatchedPool) {
    // A short `acquire_timeout` (the exhaustion test's 200 ms) also bounds the first connect,
    // which a loaded machine can take longer for: try again until it connects.
    let pool = eventually(Duration::from_secs(60), "the pool's first connect", async || {
        options.clone().connect_with(cluster.options()).await.ok()
    })
    .await;
    let watch = instrument_pool(&pool, config).expect("instrument");
    let handle = watch.pool();
    (pool, watch, handle)
}

/// Incident 4: 10 callers want 2 connections for 300 ms each with a 200 ms acquire timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_4_exhaustion_counts_waiters_waits_and_timeouts() {
    setup();
    let cluster = Cluster::shared();
    let options = PgPoolOptions::new().max_connections(2).acquire_timeout(Duration::from_millis(200));
    let (_pool, _watch, pool) = watched(&cluster, options, config("exhaust")).await;

    let start = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, start) = (pool.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                let conn = pool.acquire().await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(conn);
                Ok::<_, sqlx::Error>(())
            })
        })
        .collect();
    let waiting = eventually(Duration::from_secs(2), "waiters show in pending_requests", async || {
        Some(pool_value("db_client_connection_pending_requests", "exhaust")).filter(|n| *n > 0.0)
    })
    .await;
    // Callers opening a new connection are pending too, so up to all 10 at first.
    assert!(waiting <= 10.0, "at most 10 callers can wait, saw {waiting}");

    let mut ok = 0u32;
    let mut timed_out = 0u32;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(sqlx::Error::PoolTimedOut) => timed_out += 1,
            Err(e) => panic!("unexpected acquire error: {e}"),
        }
    }
    assert!(timed_out >= 1, "with 2 connections held 300 ms, 200 ms waiters must time out");
    assert_eq!(ok + timed_out, 10);
    assert_eq!(pool_value("db_client_connection_timeouts_total", "exhaust"), f64::from(timed_out));
    assert_eq!(pool_value("db_client_connection_wait_time_seconds_count", "exhaust"), f64::from(ok));
    assert!(pool_value("db_client_connection_wait_time_seconds_sum", "exhaust") >= 0.0);
    let le = |le: &str| metric("db_client_connection_wait_time_seconds_bucket", &[(POOL, "exhaust"), ("le", le)]);
    assert_eq!(le("60"), Some(f64::from(ok)), "every successful wait is in the 60 s bucket");
    assert!(le("0.0001").is_some(), "the recommended buckets start at 100 µs");
    assert_eq!(pool_value("db_client_connection_pending_requests", "exhaust"), 0.0, "no waiter left");
    assert_eq!(pool_value("db_client_connection_use_time_seconds_count", "exhaust"), f64::from(ok));

    let warns = logs::lines_with("pool=exhaust");
    let timeouts: Vec<_> = warns.iter().filter(|l| l.contains("acquire failed")).collect();
    assert_eq!(timeouts.len(), timed_out as usize, "one WARN per timeout: {warns:#?}");
    let line = timeouts[0];
    assert!(line.contains("WARN") && line.contains("db.pool.acquire{"), "{line}");
    for attr in [
        "db.client.connection.pool.name=exhaust",
        "db.system.name=\"postgresql\"",
        "server.address=127.0.0.1",
        &format!("server.port={}", cluster.port()),
        "poolwatch.outcome=\"timeout\"",
        "error.type=\"pool_timed_out\"",
    ] {
        assert!(line.contains(attr), "{attr} missing in {line}");
    }
}

/// Incident 3: a connection held past `leak_threshold` is reported once, with the place that
/// acquired it and the caller's span; the gauge goes back to 0 when it is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_past_the_threshold_is_a_suspect_with_its_location() {
    setup();
    let cluster = Cluster::shared();
    let config = config("leaky").leak_threshold(Duration::from_millis(300));
    let (_pool, _watch, pool) = watched(&cluster, PgPoolOptions::new().max_connections(4), config).await;

    let job = tracing::info_span!("checkout_job", job = 7);
    let (acquire, line) = (pool.acquire(), line!());
    let mut conn = acquire.instrument(job).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
    // A connection returned before the threshold is no suspect.
    let quick = pool.acquire().await.unwrap();
    drop(quick);

    eventually(Duration::from_secs(3), "the held connection becomes a suspect", async || {
        (pool_value("poolwatch_leak_suspect_connections", "leaky") == 1.0).then_some(())
    })
    .await;
    assert_eq!(pool_value("poolwatch_leak_suspects_total", "leaky"), 1.0);
    let warns = logs::lines_with("leak_threshold");
    let warn = warns.iter().find(|l| l.contains("pool=leaky")).expect("a WARN for the suspect");
    assert!(warn.contains("WARN"), "{warn}");
    assert!(warn.contains(&format!("acquired_at=tests/acquire.rs:{line}")), "{warn}");
    assert!(warn.contains("checkout_job{job=7}"), "the caller's span: {warn}");

    // Reported once, not at every scan: a second held connection becomes a suspect on a later
    // scan, which saw the first one again and did not report it again.
    let second = pool.acquire().await.unwrap();
    eventually(Duration::from_secs(3), "the second held connection becomes a suspect", async || {
        (pool_value("poolwatch_leak_suspects_total", "leaky") == 2.0).then_some(())
    })
    .await;
    let first_at = format!("acquired_at=tests/acquire.rs:{line}");
    let warns = logs::lines_with("leak_threshold");
    assert_eq!(warns.iter().filter(|l| l.contains("pool=leaky")).count(), 2, "{warns:#?}");
    assert_eq!(warns.iter().filter(|l| l.contains("pool=leaky") && l.contains(&first_at)).count(), 1, "{warns:#?}");
    drop(second);
    assert_eq!(
        pool_value("poolwatch_leak_suspect_connections", "leaky"),
        1.0,
        "the second left the gauge when returned"
    );

    drop(conn);
    assert_eq!(pool_value("poolwatch_leak_suspect_connections", "leaky"), 0.0, "the gauge drops when it is returned");
    let info = logs::lines_with("leak suspect returned");
    let info = info.iter().find(|l| l.contains("pool=leaky")).expect("an INFO on return");
    assert!(info.contains("INFO"), "{info}");
    let held: f64 = info.split("held_seconds=").nth(1).and_then(|v| v.split(' ').next()).unwrap().parse().unwrap();
    assert!(held >= 0.3, "held {held} s past the 300 ms threshold: {info}");

    // leak(): the slot is lost for good, so it stays a suspect.
    let conn = pool.acquire().await.unwrap();
    let (raw, leak_line) = (conn.leak(), line!());
    assert_eq!(pool_value("poolwatch_leak_suspect_connections", "leaky"), 1.0);
    assert_eq!(pool_value("poolwatch_leak_suspects_total", "leaky"), 3.0);
    let warns = logs::lines_with("leak()");
    let warn = warns.iter().find(|l| l.contains("pool=leaky")).expect("a WARN for leak()");
    assert!(warn.contains(&format!("taken_out_at=tests/acquire.rs:{leak_line}")), "{warn}");
    drop(raw);
}

/// Acquires dropped while they wait (cancelled) leave `pending_requests` exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquires_leave_pending_requests_exact() {
    setup();
    let cluster = Cluster::shared();
    let options = PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(30));
    let (_pool, _watch, pool) = watched(&cluster, options, config("cancel")).await;
    let held = pool.acquire().await.unwrap();

    let mut waiters = Vec::new();
    let mut cancels = Vec::new();
    for _ in 0..20u64 {
        let pool = pool.clone();
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        cancels.push(cancel);
        // Each waiter gives up (its acquire future is dropped) when the test says so.
        waiters.push(tokio::spawn(async move {
            tokio::select! {
                _ = pool.acquire() => false,
                _ = cancelled => true,
            }
        }));
    }
    eventually(Duration::from_secs(30), "20 waiters", async || {
        (pool_value("db_client_connection_pending_requests", "cancel") == 20.0).then_some(())
    })
    .await;
    // Sample the gauge all along: it must never go below 0.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let mut lowest = f64::MAX;
            while !stop.load(Ordering::Relaxed) {
                lowest = lowest.min(pool_value("db_client_connection_pending_requests", "cancel"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            lowest
        }
    });
    // Cancelled one by one, 20 ms apart, while the sampler watches.
    for cancel in cancels {
        let _ = cancel.send(());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in waiters {
        assert!(w.await.unwrap(), "every waiter was cancelled");
    }
    assert_eq!(pool_value("db_client_connection_pending_requests", "cancel"), 0.0, "no drift after 20 cancels");
    stop.store(true, Ordering::Relaxed);
    let lowest = sampler.await.unwrap();
    assert!(lowest >= 0.0, "pending_requests went negative: {lowest}");
    assert_eq!(pool_value("db_client_connection_timeouts_total", "cancel"), 0.0, "a cancel is not a pool timeout");

    // The pool still works and the gauge still counts.
    let next = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(drop) }
    });
    eventually(Duration::from_secs(2), "one waiter", async || {
        (pool_value("db_client_connection_pending_requests", "cancel") == 1.0).then_some(())
    })
    .await;
    drop(held);
    next.await.unwrap().unwrap();
    assert_eq!(pool_value("db_client_connection_pending_requests", "cancel"), 0.0);
}

/// Use time is acquire to release, for connections and transactions; create time is measured
/// for connections a watched acquire opened; the `Executor` impl runs queries unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_time_create_time_and_executor() {
    setup();
    let test_started = Instant::now();
    let cluster = Cluster::shared();
    let options = instrument_options(PgPoolOptions::new().max_connections(4));
    let pool = options.connect_lazy_with(cluster.options());
    let watch = instrument_pool(&pool, config("usage").heartbeat_interval(Duration::from_secs(3600))).unwrap();
    let wpool = watch.pool();
    // poolwatch's own pool heartbeat opens a connection through the bare pool at start (not
    // timed; the interval keeps it from beating again). Let it finish and that connection come
    // back to the pool (sqlx returns it from a spawned task), then park it, so every other
    // connection below is opened by a watched acquire.
    eventually(Duration::from_secs(30), "the first pool heartbeat, its connection back idle", async || {
        (watch.heartbeat().pool.successes >= 1 && pool.size() == 1 && pool.num_idle() == 1).then_some(())
    })
    .await;
    let parked = pool.acquire().await.unwrap();

    let outer = Instant::now();
    let conn = wpool.acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let held = conn.held();
    drop(conn);
    let outer = outer.elapsed();
    assert_eq!(pool_value("db_client_connection_use_time_seconds_count", "usage"), 1.0);
    let sum = pool_value("db_client_connection_use_time_seconds_sum", "usage");
    // Between the hold the connection reports and the whole acquire-to-drop span, however
    // slow the machine is.
    assert!(sum >= held.as_secs_f64() && sum <= outer.as_secs_f64(), "use time {sum} vs held {held:?}, {outer:?}");
    assert!(sum >= 0.25, "use time {sum} for a 250 ms hold");
    assert_eq!(
        pool_value("db_client_connection_create_time_seconds_count", "usage"),
        1.0,
        "the first acquire connected"
    );

    let outer2 = Instant::now();
    let mut tx = wpool.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE t (x int)").execute(&mut *tx).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.commit().await.unwrap();
    let outer = outer + outer2.elapsed();
    assert_eq!(pool_value("db_client_connection_use_time_seconds_count", "usage"), 2.0);
    let sum = pool_value("db_client_connection_use_time_seconds_sum", "usage");
    assert!(sum >= 0.35 && sum <= outer.as_secs_f64(), "use time {sum} after 250 + 100 ms (within {outer:?})");

    // Executor for &WatchedPool: each query is one acquire.
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&wpool).await.unwrap();
    assert_eq!(one, 1);
    let rows = sqlx::query("SELECT generate_series(1, 5) AS n").fetch_all(&wpool).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<i32, _>("n")).sum::<i32>(), 15);
    (&wpool).execute("SELECT 1").await.unwrap();
    let err = sqlx::query("SELECT * FROM missing_table").fetch_optional(&wpool).await.unwrap_err();
    assert!(err.as_database_error().is_some(), "{err}");
    assert_eq!(pool_value("db_client_connection_wait_time_seconds_count", "usage"), 6.0);
    eventually(Duration::from_secs(2), "Executor connections are released", async || {
        (pool_value("db_client_connection_use_time_seconds_count", "usage") == 6.0).then_some(())
    })
    .await;

    // Three connections held at once: two more were opened, each timed.
    let held: Vec<_> = futures_join3(&wpool).await;
    assert_eq!(pool_value("db_client_connection_create_time_seconds_count", "usage"), 3.0);
    let create = pool_value("db_client_connection_create_time_seconds_sum", "usage");
    assert!(create > 0.0 && create <= test_started.elapsed().as_secs_f64(), "create time sum {create}");
    drop(held);
    drop(parked);

    // Bare-pool acquires are not timed but still show in the sampled gauges.
    let bare = pool.acquire().await.unwrap();
    eventually(Duration::from_secs(2), "bare checkout in db_client_connection_count", async || {
        let used = metric("db_client_connection_count", &[(POOL, "usage"), ("db_client_connection_state", "used")]);
        (used == Some(1.0)).then_some(())
    })
    .await;
    drop(bare);
    assert_eq!(pool_value("db_client_connection_wait_time_seconds_count", "usage"), 9.0);
    // try_acquire: recorded with no wait once an idle connection is back.
    let taken = eventually(Duration::from_secs(2), "an idle connection", async || wpool.try_acquire()).await;
    drop(taken);
    assert_eq!(pool_value("db_client_connection_wait_time_seconds_count", "usage"), 10.0);
    assert_eq!(pool_value("db_client_connection_pending_requests", "usage"), 0.0);
    let connect = logs::lines_with("db.client.connection.pool.name=usage");
    assert!(connect.is_empty(), "successful acquires and connects log nothing at INFO/WARN: {connect:?}");
}

async fn futures_join3(pool: &WatchedPool) -> Vec<poolwatch::WatchedConnection> {
    let (a, b, c) = tokio::join!(pool.acquire(), pool.acquire(), pool.acquire());
    vec![a.unwrap(), b.unwrap(), c.unwrap()]
}

/// 64 tasks, 100,000 acquire/release cycles over 8 connections: every figure exact.
/// The figures go to an exact recorder (see `support::exact`): the other tests of this
/// binary render `/metrics` meanwhile, and the Prometheus exporter's render can drop a
/// histogram sample recorded during its drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_stay_exact_under_64_tasks_and_100k_cycles() {
    setup();
    let cluster = Cluster::shared();
    // No ping per acquire: the figures are poolwatch's, and 100k pings are minutes on a loaded machine.
    let options =
        PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(120)).test_before_acquire(false);
    let config = config("load").leak_threshold(Duration::from_secs(600));
    let bare = options.connect_with(cluster.options()).await.expect("connect");
    let exact = Arc::new(ExactRecorder::default());
    let _watch = metrics::with_local_recorder(&*exact, || instrument_pool(&bare, config)).expect("instrument");
    let pool = _watch.pool();
    let load = [(POOL, "load")];

    const TASKS: usize = 64;
    const CYCLES: usize = 100_000;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (stop, exact) = (Arc::clone(&stop), Arc::clone(&exact));
        async move {
            let (mut lowest, mut highest) = (f64::MAX, f64::MIN);
            while !stop.load(Ordering::Relaxed) {
                let v = exact.gauge("db_client_connection_pending_requests", &load).unwrap_or(0.0);
                (lowest, highest) = (lowest.min(v), highest.max(v));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (lowest, highest)
        }
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let n = CYCLES / TASKS + usize::from(t < CYCLES % TASKS);
                for _ in 0..n {
                    drop(pool.acquire().await.unwrap());
                }
                n
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    assert_eq!(done, CYCLES);
    eprintln!("{CYCLES} cycles in {:?}", started.elapsed());
    stop.store(true, Ordering::Relaxed);
    let (lowest, highest) = sampler.await.unwrap();
    assert!(lowest >= 0.0, "pending_requests went negative: {lowest}");
    assert!(highest <= TASKS as f64, "more waiters than tasks: {highest}");
    let cycles = CYCLES as u64;
    let count = |name| exact.histogram(name, &load).map(|(n, _)| n);
    assert_eq!(count("db_client_connection_wait_time_seconds"), Some(cycles));
    assert_eq!(count("db_client_connection_use_time_seconds"), Some(cycles));
    assert_eq!(exact.gauge("db_client_connection_pending_requests", &load), Some(0.0));
    assert_eq!(exact.counter("db_client_connection_timeouts_total", &load), Some(0));
    // At Detail::Standard the suspects gauge exists once a suspect was seen: absent or 0.
    let suspects = exact.gauge("poolwatch_leak_suspect_connections", &load);
    assert!(matches!(suspects, None | Some(0.0)), "leak suspects: {suspects:?}");
    assert_eq!(exact.counter("poolwatch_leak_suspects_total", &load), Some(0));
}

/// Failed acquires are classified in the span and logged once at WARN: a connect error
/// (`db.pool.connect` with `error.type`), and a closed pool. A detached connection is a
/// suspect reported once; it leaves the gauge since its slot is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_and_detach_is_reported() {
    setup();
    let cluster = Cluster::shared();
    let options = instrument_options(PgPoolOptions::new().max_connections(2));
    let broken = options.connect_lazy_with(cluster.options().database("no_such_database"));
    let watch = instrument_pool(&broken, config("broken")).unwrap();
    let err = watch.pool().acquire().await.expect_err("the database does not exist");
    assert_eq!(err.as_database_error().and_then(|e| e.code()).as_deref(), Some("3D000"), "{err}");
    let connect = logs::lines_with("opening a new connection failed");
    let connect = connect.iter().find(|l| l.contains("db.client.connection.pool.name=broken")).expect("connect WARN");
    assert!(connect.contains("db.pool.connect{") && connect.contains("error.type=\"other\""), "{connect}");
    let failed = logs::lines_with("acquire failed");
    let failed = failed.iter().find(|l| l.contains("pool=broken")).expect("acquire WARN");
    assert!(failed.contains("poolwatch.outcome=\"error\""), "{failed}");
    assert_eq!(pool_value("db_client_connection_timeouts_total", "broken"), 0.0);
    assert_eq!(pool_value("db_client_connection_pending_requests", "broken"), 0.0);

    let config = config("closing").leak_threshold(Duration::from_secs(60));
    let (pool, _watch, wpool) = watched(&cluster, PgPoolOptions::new().max_connections(2), config).await;
    let conn = wpool.acquire().await.unwrap();
    let (raw, line) = (conn.detach(), line!());
    assert_eq!(pool_value("poolwatch_leak_suspects_total", "closing"), 1.0);
    assert_eq!(pool_value("poolwatch_leak_suspect_connections", "closing"), 0.0, "detach() frees the slot");
    let warns = logs::lines_with("detach()");
    let warn = warns.iter().find(|l| l.contains("pool=closing")).expect("a WARN for detach()");
    assert!(warn.contains(&format!("taken_out_at=tests/acquire.rs:{line}")), "{warn}");
    drop(raw);

    pool.close().await;
    let err = wpool.acquire().await.expect_err("the pool is closed");
    assert!(matches!(err, sqlx::Error::PoolClosed), "{err}");
    let failed = logs::lines_with("acquire failed");
    assert!(failed.iter().any(|l| l.contains("pool=closing") && l.contains("outcome=\"closed\"")), "{failed:#?}");
}
