//! What a quiet replica costs the server: the census stretches while the client-side ledger
//! confirms the pool, and comes back to its interval when a session dies under the pool;
//! unchanged settings are re-read less often. Counted on the server (`pg_stat_statements`,
//! `pg_stat_database.sessions`), in windows measured in heartbeats, never in seconds. The
//! schedules themselves, at the defaults over simulated days, are unit-tested in
//! `src/watch/cadence.rs` and `src/health/heartbeat.rs`.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch, instrument_pool};
use sqlx::Executor;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use support::{Cluster, eventually, recorder};

/// The census's statement, as `pg_stat_statements` normalises it.
const CENSUS: &str = "%pg_stat_get_backend_idset()%pg_locks%";

/// How many times the server ran the census's statement so far.
async fn censuses(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE $1")
        .bind(CENSUS)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Sessions the server started so far (a backend each).
async fn sessions(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT sum(sessions)::bigint FROM pg_stat_database").fetch_one(admin).await.unwrap()
}

/// Waits for `n` more direct heartbeats: the window the test counts in.
async fn heartbeats(watch: &PoolWatch, n: u64) {
    let from = watch.heartbeat().direct.successes;
    eventually(Duration::from_secs(60), "direct heartbeats", async || {
        (watch.heartbeat().direct.successes >= from + n).then_some(())
    })
    .await;
}

/// At a fast base cadence (census every 300 ms, heartbeats every 100 ms), a pool with no
/// traffic, whose sockets match its count at every sample, stretches its census to 24 ×
/// 300 ms: over 40 heartbeats (≥ 4 s) the server runs the census at most twice (about 13
/// times at the base cadence) and starts no backend. A backend killed under the pool makes
/// the client-side ledger disagree: a census counts it and the cadence is back at its base
/// (at least 3 censuses over the next 60 heartbeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_pool_stretches_its_census_until_a_backend_dies_under_it() {
    recorder();
    let cluster = Cluster::start_with(&[("shared_preload_libraries", "pg_stat_statements")]);
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.unwrap();
    let pool =
        PgPoolOptions::new().max_connections(2).min_connections(2).connect_with(cluster.options()).await.unwrap();
    let config = Config::new("fp_stretch")
        .sample_interval(Duration::from_millis(50))
        .census_interval(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_secs(2));
    let watch = instrument_pool(&pool, config).unwrap();
    // Five quiet censuses (300 ms, 600 ms … 4.8 s): the next waits are at the cap.
    let started = censuses(&mut admin).await;
    eventually(Duration::from_secs(120), "the census stretched (six censuses)", async || {
        (censuses(&mut admin).await >= started + 6).then_some(())
    })
    .await;

    let (ran, opened) = (censuses(&mut admin).await, sessions(&mut admin).await);
    heartbeats(&watch, 40).await;
    let quiet = censuses(&mut admin).await - ran;
    let new_backends = sessions(&mut admin).await - opened;
    println!("quiet window (40 heartbeats): {quiet} censuses, {new_backends} new backends");
    assert!(quiet <= 2, "{quiet} censuses over 40 heartbeats of a quiet pool (want ≤ 2: stretched to 7.2 s)");
    assert_eq!(new_backends, 0, "a quiet pool starts no backend");

    // A session of the pool dies on the server: its socket closes, the ledger disagrees.
    let ran = censuses(&mut admin).await;
    let killed: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle' LIMIT 1",
    )
    .bind(watch.application_name())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed);
    eventually(Duration::from_secs(60), "a census after the kill, and the session counted as ended", async || {
        let counted = watch.snapshot().sessions_ended >= 1;
        (counted && censuses(&mut admin).await > ran).then_some(())
    })
    .await;
    // Back at 300 ms, doubling: 300 ms, 600 ms, 1.2 s, 2.4 s: four censuses in 4.5 s. Still
    // stretched, it would be the one or two that the pool's reconnect may wake.
    let ran = censuses(&mut admin).await;
    heartbeats(&watch, 60).await;
    let after = censuses(&mut admin).await - ran;
    println!("after the kill (60 heartbeats): {after} censuses");
    assert!(after >= 3, "{after} censuses over 60 heartbeats after a disagreement (want ≥ 3: back at 300 ms)");
}

/// How many times the server ran the hazard re-read's statement so far.
async fn re_reads(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE $1")
        .bind("SELECT $1, current_setting($2)%")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Unchanged settings are re-read less and less often, up to 5 × `hazard_recheck_interval`:
/// at 200 ms, over 40 heartbeats (≥ 4 s) the server runs the re-read at most 7 times (13-20
/// at the base interval), and starts no backend for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_settings_are_re_read_less_often() {
    recorder();
    let cluster = Cluster::start_with(&[("shared_preload_libraries", "pg_stat_statements")]);
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.unwrap();
    let pool = PgPoolOptions::new().max_connections(1).connect_with(cluster.options()).await.unwrap();
    let config = Config::new("fp_reread")
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_secs(2))
        .hazard_recheck_interval(Duration::from_millis(200));
    let watch = instrument_pool(&pool, config).unwrap();
    // Four re-reads of the same settings (200, 400, 800 ms, 1 s): the next waits are at the cap.
    eventually(Duration::from_secs(60), "four re-reads", async || (re_reads(&mut admin).await >= 4).then_some(()))
        .await;
    let (ran, opened) = (re_reads(&mut admin).await, sessions(&mut admin).await);
    heartbeats(&watch, 40).await;
    let quiet = re_reads(&mut admin).await - ran;
    let new_backends = sessions(&mut admin).await - opened;
    println!("40 heartbeats: {quiet} re-reads, {new_backends} new backends");
    assert!(quiet <= 7, "{quiet} re-reads of unchanged settings over 40 heartbeats (want ≤ 7: one a second at most)");
    assert_eq!(new_backends, 0);
}
