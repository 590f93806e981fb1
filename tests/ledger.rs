//! The acquired-vs-real ledger on a real server: incident 1 (leaked listener slots), two
//! pools in one process, a healthy pool, a server restart, and the handle's lifecycle.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Cause, Config, instrument_pool};
use sqlx::Executor;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use support::{Cluster, POOL, eventually, fast_config, metric, recorder};

/// Waits until the server ended session `pid` (its `idle_session_timeout`).
async fn killed_by_server(admin: &mut PgConnection, pid: i32) {
    eventually(Duration::from_secs(10), "the server kills the idle listener session", async || {
        let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&mut *admin)
            .await
            .ok()?;
        (alive == 0).then_some(())
    })
    .await;
}

/// Incident 1: a listener's connect step takes a pool connection and `leak()`s it; the
/// server's `idle_session_timeout` kills it; every reconnect leaks one more slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_1_leaked_listener_slots_grow_the_phantom_gap() {
    recorder();
    let cluster = Cluster::start_with(&[("idle_session_timeout", "1s")]);
    let pool = support::pool(&cluster, 20).await;
    let census_interval = Duration::from_millis(300);
    let watch = instrument_pool(&pool, fast_config("incident1")).unwrap();
    let mut admin = support::admin(&cluster).await;
    // The admin session must outlive the 1 s idle timeout too.
    admin.execute("SET idle_session_timeout = 0").await.unwrap();
    let before = watch.census_now().await.unwrap();
    let used_before = before.pool.used;

    let cycles = 4;
    for cycle in 1..=cycles {
        // The listener's connect step: take a pool connection, LISTEN, keep the raw connection.
        let mut conn = pool.acquire().await.unwrap();
        conn.execute("LISTEN jobs").await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
        let mut listener = conn.leak();
        killed_by_server(&mut admin, pid).await;
        let err = listener.execute("SELECT 1").await.expect_err("the session was killed");
        assert_eq!(Cause::of(&err), Cause::IdleSessionTimeout, "{err}");
        drop(listener);

        let s = watch.census_now().await.unwrap();
        assert_eq!(s.pool.used, used_before + cycle, "the pool counts every leaked slot as used");
        // Only idle connections (e.g. the pool heartbeat's) may still have a live session.
        let real = s.server.as_ref().unwrap().total();
        assert!(real <= s.pool.idle, "no real session exists for the used slots: {s:?}");
        assert!(s.phantom >= Some(i64::from(cycle)), "every leaked slot is a phantom: {s:?}");
    }

    // The background census publishes the gap within one census interval of the last kill.
    let labels = [(POOL, "incident1")];
    let phantom = eventually(census_interval * 2, "phantom gauge reaches the leaked count", async || {
        metric("poolwatch_phantom_connections", &labels).filter(|v| *v >= f64::from(cycles))
    })
    .await;
    assert!(phantom >= f64::from(cycles));
    let state = |st| [(POOL, "incident1"), ("db_client_connection_state", st)];
    let count = poolwatch::catalog::CONNECTION_COUNT.name;
    let want = f64::from(used_before + cycles);
    eventually(Duration::from_secs(2), "the used gauge counts every leaked slot", async || {
        metric(count, &state("used")).filter(|v| *v == want)
    })
    .await;
    let real: f64 = poolwatch::SESSION_STATES
        .iter()
        .filter_map(|s| metric("poolwatch_server_connections", &[(POOL, "incident1"), ("state", s)]))
        .sum();
    let idle = metric(count, &state("idle")).unwrap_or(0.0);
    assert!(real <= idle, "server-real stays flat (only idle sessions) while used grows: real {real}, idle {idle}");
}

/// Incident 1 with the server census nearly off (once an hour): the client-side ledger sees
/// each killed slot on the next sample (its socket is no longer established), and its
/// disagreement runs a server census at once, so the phantom gauge follows too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_1_client_ledger_sees_each_killed_slot_without_a_scheduled_census() {
    recorder();
    // Its own server: the socket census counts every socket of this process to the server's port.
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 20).await;
    let sample_interval = Duration::from_millis(200);
    let config =
        Config::new("incident1_client").sample_interval(sample_interval).census_interval(Duration::from_secs(3600));
    let watch = instrument_pool(&pool, config).unwrap();
    let mut admin = support::admin(&cluster).await;
    let labels = [(POOL, "incident1_client")];
    eventually(Duration::from_secs(10), "the first sample reads the sockets", async || {
        watch.snapshot().sockets.map(|_| ())
    })
    .await;
    for cycle in 1..=3u32 {
        // The listener's connect step, as in the incident: the server ends the idle LISTEN session.
        let mut conn = pool.acquire().await.unwrap();
        conn.execute("SET idle_session_timeout = '1s'; LISTEN jobs").await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
        let port: i32 = sqlx::query_scalar("SELECT client_port FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        let listener = conn.leak();
        killed_by_server(&mut admin, pid).await;
        let killed = std::time::Instant::now();
        let gap = eventually(Duration::from_secs(10), "the client gap counts the killed slot", async || {
            metric("poolwatch_client_gap", &labels).filter(|v| *v >= f64::from(cycle))
        })
        .await;
        println!(
            "cycle {cycle}: client gap {gap} {:?} after the kill (sample interval {sample_interval:?})",
            killed.elapsed()
        );
        let s = watch.snapshot();
        let sockets = s.sockets.as_ref().expect("sockets read");
        let leaked =
            sockets.sockets.iter().find(|k| i32::from(k.local.port()) == port).expect("the leaked socket is listed");
        assert_eq!(leaked.state, "close_wait", "the server ended it, the app did not notice: {leaked:?}");
        drop(listener);
        // The disagreement ran a server census although the next scheduled one is an hour away.
        eventually(Duration::from_secs(10), "the phantom gauge follows", async || {
            metric("poolwatch_phantom_connections", &labels).filter(|v| *v >= f64::from(cycle))
        })
        .await;
    }
    let s = watch.sample_now().await;
    assert_eq!(s.client_gap, Some(3), "three slots without a socket: {s:?}");
    assert_eq!(s.sockets.as_ref().map(|c| c.get("close_wait")), Some(0), "the listener dropped them: {s:?}");
}

/// Two pools in one process, same database, same application_name: each census counts only
/// its own pool's sessions, and killing one pool's sessions moves only that pool's gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_sharing_an_application_name_are_attributed_exactly() {
    recorder();
    let cluster = Cluster::shared();
    let options = cluster.options().application_name("api");
    let a = PgPoolOptions::new().max_connections(5).connect_with(options.clone()).await.unwrap();
    let b = PgPoolOptions::new().max_connections(5).connect_with(options).await.unwrap();
    let wa = instrument_pool(&a, fast_config("two_a")).unwrap();
    let wb = instrument_pool(&b, fast_config("two_b")).unwrap();
    assert_ne!(wa.application_name(), wb.application_name());
    assert!(wa.application_name().starts_with("api "), "{}", wa.application_name());

    let held_a: Vec<_> = support::hold(&a, 3).await;
    let held_b: Vec<_> = support::hold(&b, 1).await;
    let (sa, sb) = (wa.census_now().await.unwrap(), wb.census_now().await.unwrap());
    assert_eq!(sa.server.as_ref().unwrap().total(), a.size(), "{sa:?}");
    assert_eq!(sb.server.as_ref().unwrap().total(), b.size(), "{sb:?}");
    assert_eq!((sa.phantom, sb.phantom), (Some(0), Some(0)));
    assert!(sa.pool.used >= 3 && sb.pool.used >= 1);

    let mut admin = support::admin(&cluster).await;
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
            .bind(wa.application_name())
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert_eq!(killed.len(), a.size() as usize);
    let sa = eventually(Duration::from_secs(5), "pool a's sessions are gone", async || {
        wa.census_now().await.ok().filter(|s| s.server.as_ref().is_some_and(|c| c.total() == 0))
    })
    .await;
    let sb = wb.census_now().await.unwrap();
    assert_eq!(sa.phantom, Some(i64::from(a.size())), "pool a still counts its dead connections");
    assert_eq!(sb.phantom, Some(0), "pool b is untouched");
    assert_eq!(sb.server.unwrap().total(), b.size());
    drop((held_a, held_b));
}

/// A healthy pool: the gap stays zero through 1,000 acquire/release cycles, growth to max
/// and shrinking back to min, while a fast background census runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_pool_has_no_phantoms_through_churn_and_resizing() {
    recorder();
    let cluster = Cluster::shared();
    let pool = PgPoolOptions::new()
        .min_connections(2)
        .max_connections(10)
        .idle_timeout(Duration::from_secs(1))
        .connect_with(cluster.options())
        .await
        .unwrap();
    let watch = instrument_pool(
        &pool,
        Config::new("healthy").sample_interval(Duration::from_millis(20)).census_interval(Duration::from_millis(50)),
    )
    .unwrap();

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..125 {
                    let mut conn = pool.acquire().await.unwrap();
                    conn.execute("SELECT 1").await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.phantom, Some(0), "after 1,000 cycles: {s:?}");
    assert_eq!(s.server.as_ref().unwrap().total(), pool.size());

    let held = support::hold(&pool, 10).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!((s.pool.used, s.phantom), (10, Some(0)), "grown to max: {s:?}");
    assert_eq!(s.server.as_ref().unwrap().get("idle"), 10, "checked out but idle on the server");
    drop(held);

    eventually(Duration::from_secs(10), "the pool shrinks back to min_connections", async || {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (pool.size() == 2).then_some(())
    })
    .await;
    // The reaper's closes end their server sessions a few ms later: the gap must settle to 0.
    let s = eventually(Duration::from_secs(3), "the gap settles to 0 at min_connections", async || {
        watch.census_now().await.ok().filter(|s| s.phantom == Some(0))
    })
    .await;
    assert_eq!((s.pool.open, s.server.unwrap().total()), (2, 2), "shrunk to min");
    let published = eventually(Duration::from_secs(2), "the background census publishes 0", async || {
        metric("poolwatch_phantom_connections", &[(POOL, "healthy")]).filter(|v| *v == 0.0)
    })
    .await;
    assert_eq!(published, 0.0);
}

/// The server stops: the census reports down with a cause, nothing panics; it comes back up
/// on its own when the server restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_survives_a_server_restart() {
    recorder();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 3).await;
    let watch = instrument_pool(&pool, fast_config("restart").census_timeout(Duration::from_secs(20))).unwrap();
    let up = [(POOL, "restart")];
    eventually(Duration::from_secs(120), "census up", async || {
        metric("poolwatch_census_up", &up).filter(|v| *v == 1.0)
    })
    .await;

    tokio::task::block_in_place(|| cluster.stop());
    eventually(Duration::from_secs(120), "census down", async || {
        metric("poolwatch_census_up", &up).filter(|v| *v == 0.0)
    })
    .await;
    assert!(!watch.snapshot().census_up);
    let refused = [(POOL, "restart"), ("cause", "refused")];
    eventually(Duration::from_secs(120), "census errors counted as refused", async || {
        metric("poolwatch_census_errors_total", &refused).filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(watch.census_now().await.err(), Some(Cause::Refused));

    tokio::task::block_in_place(|| cluster.start_server());
    // A restarted server on a loaded machine: cold caches, a census backoff. Generous on purpose.
    eventually(Duration::from_secs(180), "census up again", async || {
        metric("poolwatch_census_up", &up).filter(|v| *v == 1.0)
    })
    .await;
    assert!(watch.census_now().await.is_ok());
}

/// Dropping the handle, `shutdown()`, and closing the pool each end the background task and
/// its dedicated connection; the pool closes normally while watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handle_and_pool_close_stop_the_background_task() {
    recorder();
    let cluster = Cluster::shared();
    let mut admin = support::admin(&cluster).await;
    let pool = support::pool(&cluster, 3).await;
    let census_sessions = "poolwatch-census:%";

    let watch = instrument_pool(&pool, fast_config("lifecycle")).unwrap();
    watch.census_now().await.unwrap();
    assert_eq!(support::sessions_like(&mut admin, census_sessions).await, 1);
    drop(watch);
    eventually(Duration::from_secs(5), "drop closes the census connection", async || {
        (support::sessions_like(&mut admin, census_sessions).await == 0).then_some(())
    })
    .await;

    let watch = instrument_pool(&pool, fast_config("lifecycle")).unwrap();
    watch.census_now().await.unwrap();
    watch.shutdown().await;
    eventually(Duration::from_secs(5), "shutdown closes the census connection", async || {
        (support::sessions_like(&mut admin, census_sessions).await == 0).then_some(())
    })
    .await;

    let watch = instrument_pool(&pool, fast_config("lifecycle")).unwrap();
    watch.census_now().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), pool.close()).await.expect("pool.close() finishes while watched");
    eventually(Duration::from_secs(5), "pool close ends the task", async || {
        (support::sessions_like(&mut admin, census_sessions).await == 0).then_some(())
    })
    .await;
    drop(watch);

    // Closed right after being instrumented, while poolwatch may still hold the idle
    // connections it re-tags: the close still completes.
    for _ in 0..5 {
        let pool =
            PgPoolOptions::new().min_connections(2).max_connections(3).connect_with(cluster.options()).await.unwrap();
        let watch = instrument_pool(&pool, fast_config("lifecycle")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), pool.close()).await.expect("close right after instrumenting");
        drop(watch);
    }
}

/// The server ends idle sessions the app has not touched: the app's sockets sit in
/// CLOSE_WAIT, and the socket census shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_census_sees_close_wait_after_the_server_hangs_up() {
    recorder();
    // Its own server: the socket census counts every socket of this process to the server's port.
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 3).await;
    let watch = instrument_pool(&pool, fast_config("sockets")).unwrap();
    drop(support::hold(&pool, 3).await);
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.sockets.as_ref().map(|c| c.get("established")), Some(3), "{s:?}");

    let mut admin = support::admin(&cluster).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
        .bind(watch.application_name())
        .execute(&mut admin)
        .await
        .unwrap();
    let s = eventually(Duration::from_secs(5), "three sockets in close_wait", async || {
        let s = watch.census_now().await.ok()?;
        (s.sockets.as_ref()?.get("close_wait") == 3).then_some(s)
    })
    .await;
    assert_eq!(s.phantom, Some(3), "dead idle connections still count in the pool");
    let published = eventually(Duration::from_secs(2), "close_wait gauge", async || {
        metric("poolwatch_client_sockets", &[(POOL, "sockets"), ("state", "close_wait")]).filter(|v| *v == 3.0)
    })
    .await;
    assert_eq!(published, 3.0);
}

/// Bad configuration is an error naming the field, never a panic.
#[tokio::test]
async fn bad_config_is_an_error_naming_the_field() {
    let pool = PgPoolOptions::new().connect_lazy("postgres://u@127.0.0.1:1/db").unwrap();
    let err = instrument_pool(&pool, Config::new("bad name")).unwrap_err();
    assert_eq!(err.field, "pool_name");
    let err = instrument_pool(&pool, Config::new("ok").census_interval(Duration::ZERO)).unwrap_err();
    assert_eq!(err.field, "census_interval");
    assert!(err.to_string().contains("fix:"));
}

/// The census runs as a monitoring role without `pg_read_all_stats`: counts stay exact, the
/// states read `unknown`, one WARN says how to fix it; granting the role fixes the states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_role_without_stats_privilege_degrades_to_unknown_states() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let mut admin = support::admin(&cluster).await;
    admin.execute("CREATE ROLE app LOGIN; CREATE ROLE monitor LOGIN").await.unwrap();
    let pool = PgPoolOptions::new().max_connections(3).connect_with(cluster.options().username("app")).await.unwrap();
    let census_role = cluster.options().username("monitor");
    let watch = instrument_pool(&pool, fast_config("degraded").direct_connect_options(census_role)).unwrap();
    let held = support::hold(&pool, 2).await;

    for _ in 0..2 {
        let s = watch.census_now().await.expect("a degraded census still succeeds");
        let server = s.server.clone().unwrap();
        assert_eq!(server.total(), pool.size(), "counts stay exact: {s:?}");
        assert_eq!(server.get("unknown"), pool.size(), "states are hidden from the monitor role");
        assert_eq!(s.phantom, Some(0));
    }
    let warnings: Vec<_> = support::spans::events_at(tracing::Level::WARN)
        .into_iter()
        .filter(|e| e.name.contains("pg_read_all_stats") && e.fields.get("pool").is_some_and(|p| p == "degraded"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning, naming the fix: {warnings:?}");

    admin.execute("GRANT pg_read_all_stats TO monitor").await.unwrap();
    let s = watch.census_now().await.unwrap();
    let server = s.server.unwrap();
    assert_eq!((server.get("unknown"), server.get("idle")), (0, pool.size()), "states visible after the grant");
    drop(held);
}

/// poolwatch's own queries (census, heartbeats, lint) never reach the app's sqlx statement
/// log, while the app's own statements still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poolwatch_queries_stay_out_of_the_sqlx_statement_log() {
    recorder();
    support::spans::install();
    let cluster = Cluster::shared();
    let pool = support::pool(&cluster, 2).await;
    let watch = instrument_pool(&pool, fast_config("quiet").heartbeat_interval(Duration::from_millis(100))).unwrap();
    for _ in 0..3 {
        watch.census_now().await.unwrap();
    }
    eventually(Duration::from_secs(5), "heartbeats on both paths and the lint ran", async || {
        let hb = watch.heartbeat();
        (hb.pool.successes >= 2 && hb.direct.successes >= 2 && watch.server_settings().is_some()).then_some(())
    })
    .await;
    // Control: the app's statements are logged, so the capture works.
    sqlx::query("SELECT 'statement-log-control'").execute(&pool).await.unwrap();
    let logged = support::spans::sqlx_events();
    assert!(logged.iter().any(|e| e.contains("statement-log-control")), "sqlx statement log not captured");
    for ours in ["pg_locks", "pg_settings", "inet_client_port"] {
        let hits: Vec<_> = logged.iter().filter(|e| e.contains(ours)).collect();
        assert!(hits.is_empty(), "poolwatch's query ({ours}) is in the app's sqlx log: {hits:?}");
    }
}
