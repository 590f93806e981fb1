//! Heartbeats on two paths, side by side, and the hazard lint they trigger.
//!
//! Every `heartbeat_interval`, both at once, each bounded by `heartbeat_timeout`; while the
//! replica is quiet the wait doubles up to 12 intervals (at most 120 s, [`quiet`]):
//! - `path="pool"`: `pool.acquire()`, the connection released at once; the acquire pings the
//!   idle connection it hands out when the pool's `test_before_acquire` is on (sqlx's
//!   default); otherwise, or on a connection opened for the beat, a `SELECT 1` follows. This is poolwatch's one use of a pool slot: it measures what the app
//!   experiences.
//! - `path="direct"`: a protocol-level ping on poolwatch's dedicated connection outside the
//!   pool (the census's, shared behind its lock; the time waiting for the lock is not measured).
//!
//! Pool failing while direct succeeds: the pool is exhausted or leaked. Both failing: the
//! database or the network. After a direct failure the next attempts wait
//! `heartbeat_interval` × 2ⁿ, capped at `heartbeat_max_backoff`.
//!
//! The [hazard lint](crate::health::hazards) runs at start-up, again after each reconnect of the
//! dedicated connection, and every [`Config::hazard_recheck_interval`], doubling while the
//! settings stay the same up to 30 × that interval (so a live settings change is flagged within
//! 30 intervals plus one heartbeat; one change found brings the interval back). At
//! start-up and after a reconnect it reads on a short-lived connection with the pool's own connect options (same role,
//! database and pooler, so per-role settings apply; `application_name`
//! `poolwatch-lint:<pool>`), never on a pool slot. The periodic re-read opens nothing: it runs
//! on the dedicated connection and works out what a new session of the pool would get
//! ([`followed`](crate::health::followed)), so a quiet replica makes the server fork no backend.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{ConnectOptions, Connection, Executor, PgPool};
use tokio::sync::oneshot;

use crate::direct::DirectConnection;
use crate::health::followed::{self, Baseline};
use crate::health::hazards::{self, Finding, Hazard, PoolSettings, ServerSettings};
use crate::listener::status;
use crate::publish::health::HeartbeatMetrics;
use crate::quiet::{self, Activity};
use crate::{cause::Cause, config::Config, config::Deployment};

/// The two heartbeat paths (the `path` label values).
pub const PATHS: [&str; 2] = ["pool", "direct"];

/// The heartbeat figures of one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathFigures {
    /// Whether the last heartbeat succeeded (`None` before the first).
    pub up: Option<bool>,
    /// How long the last heartbeat took (failures included).
    pub last_duration: Option<Duration>,
    /// The cause of the last failure, if the last heartbeat failed.
    pub last_cause: Option<Cause>,
    /// Heartbeats that succeeded so far.
    pub successes: u64,
    /// Heartbeats that failed so far.
    pub failures: u64,
}

/// The heartbeat figures of both paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatFigures {
    /// `path="pool"`: an acquire (with its ping, or `SELECT 1` without one).
    pub pool: PathFigures,
    /// `path="direct"`: a protocol-level ping on the dedicated connection.
    pub direct: PathFigures,
}

impl HeartbeatFigures {
    /// What the two paths together say, once both have run.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match (self.pool.up, self.direct.up) {
            (Some(false), Some(true)) => Some(Diagnosis::PoolSide),
            (Some(false), Some(false)) => Some(Diagnosis::DatabaseOrNetwork),
            (Some(true), Some(false)) => Some(Diagnosis::DirectOnly),
            (Some(true), Some(true)) => Some(Diagnosis::Healthy),
            _ => None,
        }
    }
}

/// The verdict of the two heartbeat paths side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Diagnosis {
    /// Both paths succeed.
    Healthy,
    /// The pool path fails while the database answers the direct path: the pool is exhausted
    /// or leaking slots (or, behind a pooler, the pooler in between is failing).
    PoolSide,
    /// Both paths fail: the database or the network.
    DatabaseOrNetwork,
    /// Only poolwatch's dedicated connection fails (e.g. its role, its route, or a pooler
    /// refusing its startup options): the app is not affected.
    DirectOnly,
}

#[derive(Debug, Default)]
struct State {
    figures: HeartbeatFigures,
    hazards: Vec<Finding>,
    settings: Option<ServerSettings>,
    warned: HashSet<Hazard>,
    /// What the last fresh session showed, for the re-reads on the dedicated connection.
    baseline: Option<Baseline>,
    /// Reads in a row that found the settings as the one before: the re-read's stretch.
    unchanged: u32,
}

/// The longest wait between two re-reads of unchanged settings, in
/// `hazard_recheck_interval`s (30 min at the default 60 s): a spaced re-read costs the server
/// ≈ 1.3 ms of CPU, 0.7 µs/s at this stretch (docs/performance.md).
pub(crate) const RECHECK_STRETCH: u32 = 30;

/// The wait before the next re-read: `every` × 2^`unchanged`, at most [`RECHECK_STRETCH`] ×
/// `every` (60 s, 120 s, 240 s … 1,920 s capped at 1,800 s). Settings seldom change; a re-read costs the server
/// about 1 ms of CPU (docs/performance.md), and one that finds a change brings `every` back.
fn recheck_after(every: Duration, unchanged: u32) -> Duration {
    let factor = 1u32.checked_shl(unchanged.min(31)).unwrap_or(u32::MAX).min(RECHECK_STRETCH);
    every.saturating_mul(factor)
}

/// The heartbeats' state and metric handles for one watched pool.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    pool_name: String,
    /// While the lint's short-lived connection is open (the client-side ledger would count it).
    pub(crate) linting: std::sync::atomic::AtomicBool,
    /// Pool connections the pool heartbeat holds now: poolwatch's own checkouts, which the
    /// stranded-slot figure must not count as the app's.
    holding: std::sync::atomic::AtomicUsize,
    state: Mutex<State>,
    metrics: HeartbeatMetrics,
}

#[derive(Debug, Clone, Copy)]
enum Path {
    Pool = 0,
    Direct = 1,
}

impl Heartbeat {
    pub(crate) fn new(pool_name: &str, detail: crate::config::Detail) -> Heartbeat {
        let p = || pool_name.to_owned();
        Heartbeat {
            linting: std::sync::atomic::AtomicBool::new(false),
            metrics: HeartbeatMetrics::new(pool_name, detail, PATHS, &Hazard::ALL.map(Hazard::as_str)),
            pool_name: p(),
            holding: std::sync::atomic::AtomicUsize::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// Pool connections the pool heartbeat holds now.
    pub(crate) fn holding(&self) -> usize {
        self.holding.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The latest figures of both paths.
    pub(crate) fn figures(&self) -> HeartbeatFigures {
        self.state.lock().map(|s| s.figures).unwrap_or_default()
    }

    /// The hazards found by the last successful lint.
    pub(crate) fn hazards(&self) -> Vec<Finding> {
        self.state.lock().map(|s| s.hazards.clone()).unwrap_or_default()
    }

    /// Reads in a row that found the settings unchanged.
    fn unchanged_reads(&self) -> u32 {
        self.state.lock().map(|s| s.unchanged).unwrap_or(0)
    }

    /// The server settings read by the last successful lint.
    pub(crate) fn server_settings(&self) -> Option<ServerSettings> {
        self.state.lock().ok().and_then(|s| s.settings.clone())
    }

    /// Runs until `stop` fires or the pool closes. Never panics; every wait is bounded.
    /// While the replica is quiet the wait between beats stretches ([`quiet`]); `activity`
    /// wakes a stretched wait, `trouble` is the acquires' connect-trouble count.
    pub(crate) async fn run(&self, parts: Parts<'_>, config: &Config, stop: &mut oneshot::Receiver<()>) {
        let Parts { pool, direct, lint_app_name, activity, trouble } = parts;
        let closed = pool.close_event();
        tokio::pin!(closed);
        let base = config.heartbeat_interval;
        let mut cycle = Cycle {
            backoff: Backoff::new(base, config.heartbeat_max_backoff),
            seen_connects: 0,
            lint_due: true,
            fresh_due: true,
            first: true,
            last_lint: None,
        };
        let mut calm = Calm { quiet: 0, trouble: trouble.load(std::sync::atomic::Ordering::Relaxed) };
        let options = pool.options();
        let idle_bound = quiet::idle_bound(options.get_idle_timeout(), options.get_min_connections());
        loop {
            let started = tokio::time::Instant::now();
            tokio::select! {
                biased;
                _ = &mut *stop => break,
                _ = &mut closed => break,
                _ = self.beat(&mut cycle, pool, direct, config, lint_app_name) => {}
            }
            let wait = if self.figures().pool.up == Some(false) {
                // Failing: the next try after the interval ±20 %, so a fleet that saw one
                // outage does not retry against the recovering server at one instant.
                calm.quiet = 0;
                crate::schedule::jitter(base)
            } else {
                let quiet = self.was_quiet(&cycle, config, activity);
                let wait = calm.next(quiet, trouble.load(std::sync::atomic::Ordering::Relaxed), base);
                idle_bound.map_or(wait, |b| wait.min(b)).max(base)
            };
            let mut due = crate::schedule::after(started, wait);
            if let Some(at) = cycle.last_lint.filter(|_| !cycle.lint_due) {
                // A stretched beat does not hold back the re-read: it runs at its own time. (A
                // pending one, e.g. after a failed read, is retried at the beats' cadence.)
                let recheck = recheck_after(config.hazard_recheck_interval, self.unchanged_reads());
                due = due.min(crate::schedule::after(at.into(), recheck));
            }
            activity.set_stretched(wait > base);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut *stop => return,
                    _ = &mut closed => return,
                    _ = tokio::time::sleep_until(due) => break,
                    _ = activity.woken(), if wait > base => {
                        // The app is back: the next beat at the base interval from now.
                        due = due.min(crate::schedule::after(tokio::time::Instant::now(), base));
                        calm.quiet = 0;
                    }
                }
            }
            activity.set_stretched(false);
        }
    }

    /// Whether the beat just made found the replica quiet: no app activity since the last
    /// beat, both paths up and fast, no connect trouble, the lint not pending.
    fn was_quiet(&self, cycle: &Cycle, config: &Config, activity: &Activity) -> bool {
        let active = activity.take();
        let f = self.figures();
        let slow = config.heartbeat_timeout / 4;
        let fast = |p: &PathFigures| p.last_duration.is_some_and(|d| d < slow);
        !active
            && f.diagnosis() == Some(Diagnosis::Healthy)
            && fast(&f.pool)
            && fast(&f.direct)
            && cycle.backoff.failures == 0
            && !cycle.lint_due
    }

    /// One tick: both heartbeats at once, then the lint if it is due.
    async fn beat(
        &self,
        cycle: &mut Cycle,
        pool: &PgPool,
        direct: &tokio::sync::Mutex<DirectConnection>,
        config: &Config,
        lint_app_name: &str,
    ) {
        if pool.is_closed() {
            // Nothing new is opened for a closed pool.
            return;
        }
        let backoff = &mut cycle.backoff;
        let direct_beat = async {
            if !backoff.ready() {
                return None;
            }
            let (result, connects) = self.direct_once(direct, config.heartbeat_timeout).await;
            backoff.record(result.0.is_ok());
            Some((result, connects))
        };
        let ((pool_result, pool_took), direct_outcome) =
            tokio::join!(self.pool_once(pool, config.heartbeat_timeout), direct_beat);
        self.record(Path::Pool, pool_result, pool_took);
        let mut direct_ok = false;
        if let Some(((result, took), connects)) = direct_outcome {
            direct_ok = result.is_ok();
            if let Some(connects) = connects.filter(|c| *c != cycle.seen_connects) {
                // The dedicated connection (re)connected: the server may have changed.
                cycle.seen_connects = connects;
                cycle.lint_due = true;
                cycle.fresh_due = true;
            }
            self.record(Path::Direct, result, took);
        }
        let recheck = recheck_after(config.hazard_recheck_interval, self.unchanged_reads());
        if cycle.last_lint.is_some_and(|at| at.elapsed() >= recheck) {
            // Settings can change while the dedicated connection stays up (ALTER ROLE, reload).
            cycle.lint_due = true;
        }
        if cycle.lint_due && (direct_ok || cycle.first) {
            // A re-read answers `None` when only a new session can show a value it needs.
            let reread = if cycle.fresh_due { None } else { self.relint(pool, direct, config).await };
            let read = match reread {
                Some(read) => read,
                None => self.lint(pool, direct, config, lint_app_name).await,
            };
            cycle.fresh_due &= !read;
            cycle.lint_due = !read;
            if read {
                cycle.last_lint = Some(Instant::now());
            }
        }
        cycle.first = false;
    }

    /// One pool heartbeat within `timeout`: an acquire, plus `SELECT 1` unless the pool's
    /// `test_before_acquire` (sqlx's default) already pinged the idle connection it handed
    /// out. A connection opened for the beat runs `SELECT 1`: behind a pooler, a new client
    /// connection proves nothing about the servers behind it.
    async fn pool_once(&self, pool: &PgPool, timeout: Duration) -> (Result<(), Cause>, Duration) {
        let (idle_before, size_before) = (pool.num_idle(), pool.size());
        let started = Instant::now();
        let result = async {
            // A wait that outlasts our bound is what the app sees as a full pool.
            let mut conn = match tokio::time::timeout(timeout, pool.acquire()).await {
                Err(_) => return Err(Cause::PoolTimedOut),
                Ok(Err(e)) => return Err(Cause::of(&e)),
                Ok(Ok(conn)) => conn,
            };
            let _held = Holding::new(&self.holding);
            // Reused: no connection opened meanwhile (when unsure, the beat queries).
            let reused = idle_before > 0 && pool.size() <= size_before;
            if reused && pool.options().get_test_before_acquire() {
                // The acquire pinged the idle connection: the server answered on this slot.
                return Ok(());
            }
            let left = timeout.saturating_sub(started.elapsed());
            let query = tokio::time::timeout(left, conn.execute(sqlx::raw_sql("SELECT 1"))).await;
            let result = match query {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Cause::of(&e)),
                Err(_) => Err(Cause::TimedOut),
            };
            if result.is_err() {
                // Never hand a connection in an unknown state back to the app.
                conn.close_on_drop();
            }
            result
        }
        .await;
        (result, started.elapsed())
    }

    /// One direct heartbeat; also returns the connection's connect count (`None` when the
    /// connection could not be reached: the census held it past the timeout).
    async fn direct_once(
        &self,
        direct: &tokio::sync::Mutex<DirectConnection>,
        timeout: Duration,
    ) -> ((Result<(), Cause>, Duration), Option<u64>) {
        // The census may hold the connection for up to its own timeout.
        let Ok(mut conn) = tokio::time::timeout(timeout, direct.lock()).await else {
            return ((Err(Cause::TimedOut), timeout), None);
        };
        let started = Instant::now();
        // A protocol-level ping (`Sync`, answered by the backend): no statement to parse
        // or plan, a third of a `SELECT 1`'s server CPU, and it still needs the network and
        // the backend process to answer (PgBouncer forwards it to a server, and waits for one
        // like for a statement when the server is gone).
        let run = conn.run(async |c: &mut PgConnection| c.ping().await);
        let result = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                conn.discard();
                Err(Cause::TimedOut)
            }
        };
        ((result, started.elapsed()), Some(conn.connects))
    }

    fn record(&self, path: Path, result: Result<(), Cause>, took: Duration) {
        let i = path as usize;
        let name = PATHS[i];
        self.metrics.beat(i, result, took.as_secs_f64());
        let was_up = match self.state.lock() {
            Ok(mut s) => {
                let f = match path {
                    Path::Pool => &mut s.figures.pool,
                    Path::Direct => &mut s.figures.direct,
                };
                let was_up = f.up;
                f.up = Some(result.is_ok());
                f.last_duration = Some(took);
                f.last_cause = result.err();
                match result {
                    Ok(()) => f.successes += 1,
                    Err(_) => f.failures += 1,
                }
                was_up
            }
            Err(_) => None,
        };
        let pool = self.pool_name.as_str();
        let seconds = took.as_secs_f64();
        match result {
            Ok(()) => {
                let span = tracing::debug_span!(
                    "poolwatch.heartbeat",
                    "db.client.connection.pool.name" = pool,
                    "db.system.name" = "postgresql",
                    path = name,
                    duration_s = seconds,
                );
                span.in_scope(|| {
                    if was_up == Some(false) {
                        tracing::info!(pool, path = name, "poolwatch heartbeat is up again");
                    }
                });
            }
            Err(cause) => {
                let span = tracing::warn_span!(
                    "poolwatch.heartbeat",
                    "db.client.connection.pool.name" = pool,
                    "db.system.name" = "postgresql",
                    "error.type" = cause.as_str(),
                    "otel.status_code" = "ERROR",
                    path = name,
                    duration_s = seconds,
                );
                span.in_scope(|| {
                    if was_up != Some(false) {
                        tracing::warn!(pool, path = name, %cause, "{}", failure_hint(path));
                    } else {
                        tracing::debug!(pool, path = name, %cause, "poolwatch heartbeat still failing");
                    }
                });
            }
        }
    }

    /// Reads the server settings on a short-lived connection and publishes the hazards.
    /// Returns whether the settings could be read.
    async fn lint(
        &self,
        pool: &PgPool,
        direct: &tokio::sync::Mutex<DirectConnection>,
        config: &Config,
        app_name: &str,
    ) -> bool {
        let options = pool.connect_options().as_ref().clone().application_name(app_name).disable_statement_logging();
        let timeout = config.heartbeat_timeout;
        // Holding the census's lock keeps the census from counting this short-lived socket.
        let Ok(_census) = tokio::time::timeout(timeout, direct.lock()).await else { return false };
        let read = async {
            let mut conn = PgConnection::connect_with(&options).await?;
            let settings = followed::read_fresh(&mut conn).await;
            let _ = conn.close().await;
            settings
        };
        self.linting.store(true, std::sync::atomic::Ordering::Relaxed);
        let outcome = tokio::time::timeout(timeout, read).await;
        self.linting.store(false, std::sync::atomic::Ordering::Relaxed);
        let (settings, baseline) = match outcome {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(pool = %self.pool_name, cause = %Cause::of(&e), "poolwatch could not read the server settings; the hazard lint will retry");
                return false;
            }
            Err(_) => {
                tracing::debug!(pool = %self.pool_name, "reading the server settings timed out; the hazard lint will retry");
                return false;
            }
        };
        if let Ok(mut state) = self.state.lock() {
            state.baseline = Some(baseline);
        }
        let found = hazards::lint(&settings, &PoolSettings::of(pool.options()), &with_listeners(config));
        self.publish(found, settings);
        true
    }

    /// The periodic re-read, on the dedicated connection (no new session). Returns whether
    /// the settings could be read, or `None` when only a fresh session can tell.
    async fn relint(
        &self,
        pool: &PgPool,
        direct: &tokio::sync::Mutex<DirectConnection>,
        config: &Config,
    ) -> Option<bool> {
        let baseline = self.state.lock().ok().and_then(|s| s.baseline.clone())?;
        // The role and database the fresh session had; else the options' (a database left
        // out of them is the role's name, as libpq does).
        let options = pool.connect_options();
        let role = baseline.role.clone().unwrap_or_else(|| options.get_username().to_owned());
        let database = baseline.database.clone().unwrap_or_else(|| options.get_database().unwrap_or(&role).to_owned());
        let Ok(mut conn) = tokio::time::timeout(config.heartbeat_timeout, direct.lock()).await else {
            return Some(false);
        };
        let read = conn.run(async |c: &mut PgConnection| followed::read_followed(c, &role, &database, &baseline).await);
        let settings = match read.await {
            Ok(Some(settings)) => settings,
            Ok(None) => return None,
            Err(cause) => {
                tracing::debug!(pool = %self.pool_name, %cause, "poolwatch could not re-read the server settings; the hazard lint will retry");
                return Some(false);
            }
        };
        drop(conn);
        let found = hazards::lint(&settings, &PoolSettings::of(pool.options()), &with_listeners(config));
        self.publish(found, settings);
        Some(true)
    }

    fn publish(&self, found: Vec<Finding>, settings: ServerSettings) {
        self.metrics.hazards(|i| found.iter().any(|f| f.hazard == Hazard::ALL[i]), found.len());
        let Ok(mut state) = self.state.lock() else { return };
        let pool = self.pool_name.as_str();
        for f in &found {
            if state.warned.insert(f.hazard) {
                tracing::warn!(
                    pool,
                    hazard = f.hazard.as_str(),
                    detail = %f.detail,
                    "poolwatch config hazard {}: {}; {}. Fix: {}.",
                    f.hazard,
                    f.detail,
                    f.hazard.consequence(),
                    f.hazard.fix()
                );
            }
        }
        let cleared: Vec<Hazard> =
            state.warned.iter().copied().filter(|h| !found.iter().any(|f| f.hazard == *h)).collect();
        for h in cleared {
            state.warned.remove(&h);
            tracing::info!(pool, hazard = h.as_str(), "poolwatch config hazard {h} is gone");
        }
        // One line per lint (rare: start-up, reconnects, the periodic re-read), so a reader
        // can tell "linted, nothing new" from "not linted yet".
        tracing::debug!(pool, hazards = found.len(), "poolwatch linted the server settings");
        state.unchanged =
            if state.settings.as_ref() == Some(&settings) { state.unchanged.saturating_add(1) } else { 0 };
        state.hazards = found;
        state.settings = Some(settings);
    }
}

/// The deployment as declared, plus what the pool's live
/// [`WatchedListener`](crate::listener::watched::WatchedListener)s tell of themselves (their
/// keepalive): a listener needs no declaring.
fn with_listeners(config: &Config) -> Deployment {
    let mut deployment = config.deployment.clone();
    if let Some(live) = status::keepalive_of(&config.pool_name) {
        deployment.listener_keepalive =
            Some(deployment.listener_keepalive.map_or(live, |declared| status::worst_keepalive(declared, live)));
    }
    deployment
}

fn failure_hint(path: Path) -> &'static str {
    match path {
        Path::Pool => {
            "poolwatch pool heartbeat failed; if the direct heartbeat still succeeds, the pool is exhausted or leaking slots"
        }
        Path::Direct => {
            "poolwatch direct heartbeat failed: the database or the network is failing (poolwatch's own connection, outside the pool)"
        }
    }
}

impl Heartbeat {
    /// The heartbeat task died: both paths read unknown (not their last value) until it
    /// runs again.
    pub(crate) fn forget(&self) {
        self.state.clear_poison();
        if let Ok(mut s) = self.state.lock() {
            let figures = &mut s.figures;
            for f in [&mut figures.pool, &mut figures.direct] {
                (f.up, f.last_cause) = (None, None);
            }
        }
    }
}

/// What the heartbeat task works with besides its `Config`.
pub(crate) struct Parts<'a> {
    pub(crate) pool: &'a PgPool,
    pub(crate) direct: &'a tokio::sync::Mutex<DirectConnection>,
    /// The `application_name` of the lint's short-lived connection.
    pub(crate) lint_app_name: &'a str,
    pub(crate) activity: &'a Activity,
    /// Connect trouble seen by acquires so far: a change ends a stretch.
    pub(crate) trouble: &'a AtomicU64,
}

/// The heartbeat's stretch: quiet beats in a row, and the trouble count at the last beat.
#[derive(Debug)]
struct Calm {
    quiet: u32,
    trouble: u64,
}

impl Calm {
    /// Records whether the last beat was quiet and the trouble count now; returns the wait
    /// before the next beat.
    fn next(&mut self, quiet: bool, trouble: u64, base: Duration) -> Duration {
        let calm = quiet && std::mem::replace(&mut self.trouble, trouble) == trouble;
        self.quiet = if calm { self.quiet.saturating_add(1) } else { 0 };
        quiet::beat_wait(base, self.quiet)
    }
}

/// What one heartbeat tick carries over to the next.
#[derive(Debug)]
struct Cycle {
    backoff: Backoff,
    /// The dedicated connection's connect count at the last direct heartbeat.
    seen_connects: u64,
    /// The lint has to run (start-up, the dedicated connection reconnected, or the interval).
    lint_due: bool,
    /// The lint has to read on a fresh session (start-up, or the dedicated connection
    /// reconnected); otherwise it re-reads on the dedicated connection.
    fresh_due: bool,
    first: bool,
    /// When the lint last read the settings.
    last_lint: Option<Instant>,
}

/// Capped exponential backoff between attempts after failures.
#[derive(Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max: max.max(base), failures: 0, next: None }
    }

    fn ready(&self) -> bool {
        // A tenth of a tick of slack, so tick jitter does not skip a whole tick.
        self.next.is_none_or(|at| crate::schedule::after_std(Instant::now(), self.base / 10) >= at)
    }

    fn record(&mut self, ok: bool) {
        if ok {
            self.failures = 0;
            self.next = None;
        } else {
            // 1st failure: retry at the next tick; then wait base × 2, × 4 … up to max, ±20 %
            // (replicas that failed together retry apart).
            self.failures = self.failures.saturating_add(1);
            let wait = crate::schedule::jitter(self.delay());
            self.next = Some(crate::schedule::after_std(Instant::now(), wait));
        }
    }

    fn delay(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        self.base.saturating_mul(1 << exp).min(self.max).saturating_sub(self.base)
    }
}

/// Counts a connection the pool heartbeat holds, until it is dropped (a cancelled beat too).
struct Holding<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Holding<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Holding<'a> {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Holding(count)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(60));
        let waits: Vec<u64> = (0..6)
            .map(|_| {
                b.record(false);
                b.delay().as_secs() + 10
            })
            .collect();
        assert_eq!(waits, [10, 20, 40, 60, 60, 60], "extra wait on top of the 10 s tick");
        b.record(true);
        assert!(b.ready());
    }

    #[test]
    fn backoff_waits_are_jittered_and_never_overflow() {
        let base = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..100)
            .map(|_| {
                let mut b = Backoff::new(base, Duration::from_secs(60));
                b.record(false);
                b.record(false);
                b.next.map(|at| at.saturating_duration_since(Instant::now())).unwrap_or_default()
            })
            .collect();
        // The 2nd failure waits 10 s on top of the tick, ±20 %: replicas retry apart.
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(12) && *w >= Duration::from_secs(7)), "{waits:?}");
        let distinct: std::collections::HashSet<_> = waits.iter().map(|w| w.as_millis()).collect();
        assert!(distinct.len() > 20, "{distinct:?}");
        // `Duration::MAX` as the tick ("never") used to overflow `Instant + base / 10`.
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for ok in [false, false, true, false] {
            b.record(ok);
            let _ = b.ready();
        }
    }

    #[test]
    fn re_reads_of_unchanged_settings_stretch_to_thirty_intervals() {
        let every = Duration::from_secs(60);
        let waits: Vec<u64> = (0..7).map(|n| recheck_after(every, n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1800, 1800]);
        assert_eq!(recheck_after(Duration::MAX, u32::MAX), Duration::MAX);
        // Over an hour of unchanged settings: 6 re-reads instead of 60.
        let (mut at, mut reads) = (0u64, 0u32);
        while at < 3600 {
            at += recheck_after(every, reads).as_secs();
            reads += 1;
        }
        assert!(reads <= 6, "{reads} re-reads in an hour");
    }

    #[test]
    fn a_changed_setting_brings_the_re_read_interval_back() {
        let hb = Heartbeat::new("unit", crate::config::Detail::Standard);
        let calm = ServerSettings { max_connections: 100, ..ServerSettings::default() };
        let reads: Vec<u32> = (0..3)
            .map(|_| {
                hb.publish(Vec::new(), calm.clone());
                hb.unchanged_reads()
            })
            .collect();
        assert_eq!(reads, [0, 1, 2], "the first read, then two that found the same");
        let changed = ServerSettings { idle_session_timeout: Some(Duration::from_secs(60)), ..calm };
        hb.publish(Vec::new(), changed);
        assert_eq!(hb.unchanged_reads(), 0);
        assert_eq!(recheck_after(Duration::from_secs(60), hb.unchanged_reads()), Duration::from_secs(60));
    }
}
