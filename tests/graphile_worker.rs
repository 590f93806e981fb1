//! A real job queue on an instrumented pool: graphile_worker (sqlx 0.9) runs its own workload
//! through the bare `PgPool`, set up as the README says: `instrument_options_named` on the
//! pool options, `instrument_pool`, `sqlx_acquire_layer`, and graphile's own sqlx driver with
//! its LISTEN swapped for a `WatchedListener` (examples/graphile_worker/driver.rs).
//!
//! Every job completes, the phantom gap stays 0 at every census, ending the LISTEN session is a
//! counted reconnect after which notifications still wake the workers (polling is off), the
//! bare-pool figures count graphile's acquires, and `poolwatch_stranded_slots` stays 0 (no series)
//! with a connection held on the bare pool.
//!
//! graphile_worker needs sqlx 0.9: with `sqlx-0_8` this file only says it is skipped.

#[cfg(feature = "sqlx-0_8")]
#[test]
fn graphile_worker_needs_sqlx_0_9() {
    eprintln!("skipped: graphile_worker 0.14 is built on sqlx 0.9; run with the default feature sqlx-0_9");
}

#[cfg(feature = "sqlx-0_9")]
#[path = "../examples/graphile_worker/driver.rs"]
mod driver;
#[cfg(feature = "sqlx-0_9")]
mod support;

#[cfg(feature = "sqlx-0_9")]
mod on_sqlx_0_9 {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use graphile_worker::{IntoTaskHandlerResult, JobSpec, TaskHandler, WorkerContext, WorkerOptions};
    use poolwatch::sqlx;
    use poolwatch::{Config, ListenerConfig, instrument_options_named, instrument_pool, sqlx_acquire_layer};
    use serde::{Deserialize, Serialize};
    use sqlx::postgres::{PgConnection, PgPoolOptions};
    use sqlx::{Connection, Executor};
    use tracing_subscriber::layer::SubscriberExt;

    use crate::driver::WatchedDriver;
    use crate::support::{Cluster, POOL, eventually, metric, metric_sum, recorder};

    /// Jobs before, and again after, the LISTEN session is ended.
    const JOBS: u32 = 150;

    /// The ids of the jobs that ran.
    static DONE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

    #[derive(Serialize, Deserialize)]
    struct Record {
        id: u32,
    }

    impl TaskHandler for Record {
        const IDENTIFIER: &'static str = "record";

        /// A query of its own on the worker's pool, as a real job would.
        async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
            sqlx::query("SELECT pg_sleep(0.002)").execute(ctx.pg_pool()).await.map_err(|e| e.to_string())?;
            DONE.lock().unwrap().insert(self.id);
            Ok::<(), String>(())
        }
    }

    fn done() -> usize {
        DONE.lock().unwrap().len()
    }

    fn figure(name: &str) -> f64 {
        metric(name, &[(POOL, "graphile")]).unwrap_or(0.0)
    }

    fn listener(name: &str) -> f64 {
        metric_sum(name, &[(POOL, "graphile"), ("listener", "graphile_worker")])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graphile_worker_on_an_instrumented_pool() {
        recorder();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(sqlx_acquire_layer()))
            .expect("install the subscriber");
        let cluster = Cluster::shared();

        // The README's setup for a pool driven by a library. Fewer connections than job slots:
        // each NOTIFY wakes every slot at once and they wait for the pool.
        let options = instrument_options_named(PgPoolOptions::new().max_connections(4), "graphile");
        let pool = options.connect_with(cluster.options()).await.expect("connect");
        let config = Config::new("graphile")
            .sample_interval(Duration::from_millis(100))
            .census_interval(Duration::from_millis(200));
        let watch = Arc::new(instrument_pool(&pool, config).expect("instrument"));

        let listen = ListenerConfig::new("graphile", "graphile_worker");
        let worker = WorkerOptions::default()
            .database(WatchedDriver::new(pool.clone(), listen))
            .concurrency(8)
            // Notifications alone wake the workers: a lost LISTEN would leave the jobs waiting.
            .poll_interval(Duration::from_secs(3600))
            .listen_os_shutdown_signals(false)
            .define_job::<Record>()
            .init()
            .await
            .expect("graphile_worker starts (its migrations run on the instrumented pool)");
        let worker = Arc::new(worker);
        let running = tokio::spawn({
            let worker = Arc::clone(&worker);
            async move { worker.run().await }
        });
        eventually(Duration::from_secs(30), "graphile's LISTEN is up, watched", async || {
            (listener("poolwatch_listener_connected") == 1.0).then_some(())
        })
        .await;

        // The phantom gap at every census while the jobs run: the worst one seen.
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(AtomicI64::new(0));
        let censuses = Arc::new(AtomicI64::new(0));
        let sampler = tokio::spawn({
            let (watch, stop, worst, censuses) =
                (Arc::clone(&watch), Arc::clone(&stop), Arc::clone(&worst), Arc::clone(&censuses));
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(p) = watch.snapshot().phantom {
                        censuses.fetch_add(1, Ordering::Relaxed);
                        worst.fetch_max(p.abs(), Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });

        let utils = worker.create_utils();
        for id in 0..JOBS {
            utils.add_job(Record { id }, JobSpec::default()).await.expect("add a job");
        }
        eventually(Duration::from_secs(120), "every job of the first batch ran", async || {
            (done() == JOBS as usize).then_some(())
        })
        .await;
        let notified = listener("poolwatch_listener_notifications_total");
        assert!(notified >= 1.0, "the jobs were announced through the watched LISTEN: {notified}");

        // End graphile's LISTEN session on the server, as a restart or an admin would.
        let mut admin = PgConnection::connect_with(&cluster.options()).await.expect("admin");
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(WatchedDriver::APPLICATION_NAME)
        .fetch_all(&mut admin)
        .await
        .expect("terminate");
        assert_eq!(killed, [true], "one LISTEN session, outside the pool");
        let reconnects =
            eventually(Duration::from_secs(30), "the kill is a counted reconnect, LISTEN back", async || {
                let n = listener("poolwatch_listener_reconnects_total");
                (n >= 1.0 && listener("poolwatch_listener_connected") == 1.0).then_some(n)
            })
            .await;
        assert_eq!(reconnects, 1.0);
        let by_kill = metric_sum(
            "poolwatch_listener_reconnects_total",
            &[(POOL, "graphile"), ("listener", "graphile_worker"), ("cause", "admin_shutdown")],
        );
        assert_eq!(by_kill, 1.0, "the cause is the server's kill (57P01):\n{}", recorder().render());

        // Notifications after the reconnect still wake the workers (polling is off).
        for id in JOBS..2 * JOBS {
            utils.add_job(Record { id }, JobSpec::default()).await.expect("add a job");
        }
        eventually(
            Duration::from_secs(120),
            "every job ran, the second batch woken by the re-established LISTEN",
            async || (done() == 2 * JOBS as usize).then_some(()),
        )
        .await;
        assert_eq!(*DONE.lock().unwrap(), (0..2 * JOBS).collect::<BTreeSet<_>>());
        let renotified = listener("poolwatch_listener_notifications_total");
        assert!(renotified > notified, "the second batch came through the re-established LISTEN");

        // A census after the last job, then the gap seen throughout.
        let after = watch.census_now().await.expect("a census");
        stop.store(true, Ordering::Relaxed);
        sampler.await.unwrap();
        assert!(censuses.load(Ordering::Relaxed) > 0, "censuses ran during the jobs");
        assert_eq!(worst.load(Ordering::Relaxed), 0, "the phantom gap stayed 0 at every census");
        assert_eq!(after.phantom, Some(0), "{after:?}");

        // The bare-pool figures: graphile's acquires, counted by the pool's hooks and sqlx's events.
        let acquires = figure("poolwatch_pool_connects_total") + figure("poolwatch_pool_idle_acquires_total");
        let releases = figure("poolwatch_pool_releases_total");
        let waits = figure("db_client_connection_wait_time_seconds_count");
        let quick = metric("db_client_connection_wait_time_seconds_bucket", &[(POOL, "graphile"), ("le", "0.01")]);
        let downtime = listener("poolwatch_listener_downtime_seconds_sum");
        println!(
            "graphile's pool: {acquires} acquires, {releases} releases, {waits} waits timed ({} over 10 ms); \
             LISTEN down {downtime:.3} s",
            waits - quick.unwrap_or(waits)
        );
        let jobs = f64::from(2 * JOBS);
        // Adding a job, fetching it and the job's own query are three acquires.
        assert!(acquires >= 3.0 * jobs, "adding and running a job are acquires: {acquires}");
        assert!(releases >= 3.0 * jobs, "releases counted: {releases}");
        // Read last: every acquire counted before has its wait timed (but those mid-acquire).
        assert!(waits + 4.0 >= acquires, "each acquire's wait from sqlx's event: {waits} of {acquires}");
        let slow = metric("poolwatch_pool_slow_acquires_total", &[(POOL, "graphile")]);
        assert!(slow.is_some(), "the slow-acquire counter is exported (at 0 unless an acquire waited 2 s)");

        // Stranded slots: with the named hooks the figure counts only slots given back that
        // never went idle, so a connection held on the bare pool across many samples (as
        // graphile's own driver holds one for LISTEN) is work, not a stranded slot, also
        // after an acquire through WatchedPool.
        let held = pool.acquire().await.expect("a bare-pool checkout");
        for _ in 0..5 {
            watch.sample_now().await;
        }
        assert_eq!(
            metric("poolwatch_stranded_slots", &[(POOL, "graphile")]),
            None,
            "no series at 0 (Detail::Standard)"
        );
        let h = watch.health();
        assert_eq!(h.stranded_slots, Some(0), "{h:?}");
        assert!(h.reasons.iter().all(|r| r.code != "stranded_slots"), "{h:?}");
        sqlx::query("SELECT 1").execute(&watch.pool()).await.expect("an acquire through WatchedPool");
        for _ in 0..5 {
            watch.sample_now().await;
        }
        assert_eq!(watch.health().stranded_slots, Some(0), "a held bare-pool checkout is not stranded");
        drop(held);

        worker.request_shutdown();
        running.await.unwrap().expect("the worker stops cleanly");
        admin.execute("SELECT 1").await.expect("the server is fine");
        Arc::into_inner(watch).expect("one owner").shutdown().await;
    }
}
