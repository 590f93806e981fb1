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

/// The calls of the statements like `$1` that are not the [`Clock`]'s (its own role).
const NOT_THE_CLOCKS: &str = "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
     WHERE query LIKE $1 AND userid IS DISTINCT FROM (SELECT oid FROM pg_roles WHERE rolname = 'fp_clock')";

/// How many times the server ran the census's statement so far.
async fn censuses(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar(NOT_THE_CLOCKS).bind(CENSUS).fetch_one(admin).await.unwrap()
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

/// Waits until the watch's heartbeats have stretched: `health()` says nothing of it, so
/// wait for the first beats (the stretch takes 4 quiet beats to reach its cap).
async fn beats_stretched(watch: &PoolWatch) {
    heartbeats(watch, 5).await;
}

/// The tests' clock: the heartbeats (every 100 ms) of a second pool the app keeps busy, so
/// they never stretch; its census and re-read run once, at start-up.
struct Clock {
    watch: PoolWatch,
    work: tokio::task::JoinHandle<()>,
}

impl Clock {
    /// `name`: the clock's pool name, one per test (a name is watched once per process).
    async fn start(cluster: &Cluster, admin: &mut PgConnection, name: &str) -> Clock {
        admin.execute("CREATE ROLE fp_clock LOGIN SUPERUSER").await.unwrap();
        let options = cluster.options().username("fp_clock");
        let pool = PgPoolOptions::new().max_connections(2).connect_with(options).await.unwrap();
        let config = Config::new(name)
            .heartbeat_interval(Duration::from_millis(100))
            .heartbeat_timeout(Duration::from_secs(2))
            .census_interval(Duration::from_secs(3600))
            .hazard_recheck_interval(Duration::from_secs(3600));
        let watch = instrument_pool(&pool, config).unwrap();
        let work = busy(&watch);
        heartbeats(&watch, 2).await;
        Clock { watch, work }
    }

    /// Waits for `n` ticks (≥ n × 100 ms).
    async fn ticks(&self, n: u64) {
        heartbeats(&self.watch, n).await;
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        self.work.abort();
    }
}

/// At a fast base cadence (census every 300 ms, heartbeats every 100 ms), a pool with no
/// traffic, whose sockets match its count at every sample, stretches its census to 24 ×
/// 300 ms: over 40 ticks (≥ 4 s) the server runs the census at most twice (about 13 times at
/// the base cadence) and starts no backend. A backend killed under the pool makes
/// the client-side ledger disagree: a census counts it and the cadence is back at its base
/// (at least 3 censuses over the next 60 ticks).
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
    let clock = Clock::start(&cluster, &mut admin, "fp_stretch_clock").await;
    // Five quiet censuses (300 ms, 600 ms … 4.8 s): the next waits are at the cap.
    let started = censuses(&mut admin).await;
    eventually(Duration::from_secs(120), "the census stretched (six censuses)", async || {
        (censuses(&mut admin).await >= started + 6).then_some(())
    })
    .await;

    let (ran, opened) = (censuses(&mut admin).await, sessions(&mut admin).await);
    clock.ticks(40).await;
    let quiet = censuses(&mut admin).await - ran;
    let new_backends = sessions(&mut admin).await - opened;
    println!("quiet window (40 ticks): {quiet} censuses, {new_backends} new backends");
    assert!(quiet <= 2, "{quiet} censuses over 40 ticks of a quiet pool (want ≤ 2: stretched to 7.2 s)");
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
    clock.ticks(60).await;
    let after = censuses(&mut admin).await - ran;
    println!("after the kill (60 ticks): {after} censuses");
    assert!(after >= 3, "{after} censuses over 60 ticks after a disagreement (want ≥ 3: back at 300 ms)");
}

/// How many times the server ran the hazard re-read's statement so far.
async fn re_reads(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar(NOT_THE_CLOCKS).bind("SELECT $1, current_setting($2)%").fetch_one(admin).await.unwrap()
}

/// Unchanged settings are re-read less and less often, up to 30 × `hazard_recheck_interval`:
/// at 200 ms, over 40 ticks (≥ 4 s) the server runs the re-read at most twice (4 at 5 × the
/// interval, 20 at the base interval), and starts no backend for it.
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
    let _watch = instrument_pool(&pool, config).unwrap();
    let clock = Clock::start(&cluster, &mut admin, "fp_reread_clock").await;
    // Four re-reads of the same settings (200, 400, 800 ms, 1 s): the next waits are at the cap.
    eventually(Duration::from_secs(60), "four re-reads", async || (re_reads(&mut admin).await >= 4).then_some(()))
        .await;
    let (ran, opened) = (re_reads(&mut admin).await, sessions(&mut admin).await);
    clock.ticks(40).await;
    let quiet = re_reads(&mut admin).await - ran;
    let new_backends = sessions(&mut admin).await - opened;
    println!("40 ticks: {quiet} re-reads, {new_backends} new backends");
    assert!(quiet <= 2, "{quiet} re-reads of unchanged settings over 40 ticks (want ≤ 2: stretched to 6 s)");
    assert_eq!(new_backends, 0);
}

/// Direct heartbeats of `watch` so far.
fn beats(watch: &PoolWatch) -> u64 {
    watch.heartbeat().direct.successes
}

/// Waits until `watch` did `n` more direct heartbeats; returns how many `clock` did meanwhile.
async fn beats_of(watch: &PoolWatch, n: u64, clock: &PoolWatch) -> u64 {
    let (from, clock_from) = (beats(watch), beats(clock));
    eventually(Duration::from_secs(120), "heartbeats", async || (beats(watch) >= from + n).then_some(())).await;
    beats(clock) - clock_from
}

/// Acquires through `watch`'s pool every 10 ms until dropped: an app at work.
fn busy(watch: &PoolWatch) -> tokio::task::JoinHandle<()> {
    let pool = watch.pool();
    tokio::spawn(async move {
        loop {
            drop(pool.acquire().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Two pools beat every 100 ms; the app works on one of them (an acquire every 10 ms), whose
/// heartbeats are the clock. Over 40 of its beats (≥ 4 s) the quiet one beats at most 20
/// times (its wait doubles to 1.2 s; 40 at the base interval). Once the app works on the
/// quiet one too, its beats come back to the base interval: 20 of them take at most 40 of
/// the busy one's (240 at the stretched wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_pool_beats_less_often_until_the_app_acquires() {
    recorder();
    let cluster = Cluster::start();
    let connect = async || PgPoolOptions::new().max_connections(2).connect_with(cluster.options()).await.unwrap();
    let config = |name: &str| {
        Config::new(name).heartbeat_interval(Duration::from_millis(100)).heartbeat_timeout(Duration::from_secs(2))
    };
    let (quiet_pool, busy_pool) = (connect().await, connect().await);
    let quiet = instrument_pool(&quiet_pool, config("fp_beat_quiet")).unwrap();
    let clock = instrument_pool(&busy_pool, config("fp_beat_busy")).unwrap();
    let work = busy(&clock);
    beats_stretched(&quiet).await;
    let (from, ticks) = (beats(&quiet), beats_of(&clock, 40, &clock).await);
    let quiet_beats = beats(&quiet) - from;
    println!("over {ticks} beats of the busy pool, the quiet one beat {quiet_beats} times");
    assert!(quiet_beats <= 20, "{quiet_beats} beats of a quiet pool over 40 of a busy one (want ≤ 20: stretched)");

    let more = busy(&quiet);
    let ticks = beats_of(&quiet, 20, &clock).await;
    println!("20 beats of the pool once busy took {ticks} beats of the other");
    assert!(ticks <= 40, "20 beats of a pool at work took {ticks} of a busy one (want ≤ 40: back at the base)");
    more.abort();
    work.abort();
    drop((quiet, clock));
}

/// A pool without a minimum whose `idle_timeout` is shorter than the stretch: the beats stay
/// within half of it, so the pool heartbeat's idle connection is never reaped between beats
/// and no beat opens a new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_pool_with_a_short_idle_timeout_opens_no_backend_per_beat() {
    recorder();
    let cluster = Cluster::start();
    let mut admin = support::lasting_admin(&cluster).await;
    let config = |name: &str| {
        Config::new(name).heartbeat_interval(Duration::from_millis(100)).heartbeat_timeout(Duration::from_secs(2))
    };
    let short = PgPoolOptions::new().max_connections(2).idle_timeout(Duration::from_millis(600));
    let quiet_pool = short.connect_with(cluster.options()).await.unwrap();
    let busy_pool = PgPoolOptions::new().max_connections(2).connect_with(cluster.options()).await.unwrap();
    let quiet = instrument_pool(&quiet_pool, config("fp_idle_quiet")).unwrap();
    let clock = instrument_pool(&busy_pool, config("fp_idle_busy")).unwrap();
    let work = busy(&clock);
    beats_of(&quiet, 10, &clock).await;
    let before = sessions(&mut admin).await;
    let ticks = beats_of(&clock, 60, &clock).await;
    let opened = sessions(&mut admin).await - before;
    println!("over {ticks} beats of the busy pool, {opened} backends started");
    assert!(opened <= 2, "{opened} backends over {ticks} beats: the quiet pool's beats outlast its idle_timeout");
    work.abort();
    drop((quiet, clock));
}

/// How many times the server ran `SELECT 1` so far.
async fn select_ones(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query = 'SELECT $1'")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// The direct heartbeat pings (no statement), and the pool heartbeat's acquire is pinged by
/// the pool (`test_before_acquire`, sqlx's default): 10 beats run no `SELECT 1`. A pool
/// without `test_before_acquire` still gets one per pool beat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_ping_instead_of_select_1_when_they_can() {
    recorder();
    let cluster = Cluster::start_with(&[("shared_preload_libraries", "pg_stat_statements")]);
    let mut admin = support::lasting_admin(&cluster).await;
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.unwrap();
    let config = |name: &str| {
        Config::new(name).heartbeat_interval(Duration::from_millis(100)).heartbeat_timeout(Duration::from_secs(2))
    };
    let pinged = PgPoolOptions::new().max_connections(1).connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pinged, config("fp_ping")).unwrap();
    heartbeats(&watch, 2).await;
    let ran = select_ones(&mut admin).await;
    heartbeats(&watch, 10).await;
    let selects = select_ones(&mut admin).await - ran;
    println!("10 beats, test_before_acquire on: {selects} SELECT 1");
    assert_eq!(selects, 0, "heartbeats of a pool that pings on acquire run no SELECT 1");
    drop(watch);

    let unpinged = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(cluster.options())
        .await
        .unwrap();
    let watch = instrument_pool(&unpinged, config("fp_noping")).unwrap();
    heartbeats(&watch, 2).await;
    let (ran, from) = (select_ones(&mut admin).await, watch.heartbeat().pool.successes);
    heartbeats(&watch, 10).await;
    let selects = select_ones(&mut admin).await - ran;
    let pool_beats = watch.heartbeat().pool.successes - from;
    println!("{pool_beats} pool beats, test_before_acquire off: {selects} SELECT 1");
    assert!(
        selects >= 10 && selects <= i64::try_from(pool_beats).unwrap() + 1,
        "{selects} SELECT 1 for {pool_beats} pool beats"
    );
}
