//! [`instrument_pool`] and the [`PoolWatch`] handle that owns the background task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::acquire::probe::Probe;
use crate::acquire::stranded::Stranded;
use crate::direct::DirectConnection;
use crate::gauges::{Gauges, PoolerGauges};
use crate::health::heartbeat::Heartbeat;
use crate::health::liveness::Liveness;
use crate::health::reach::Reach;
use crate::health::report::{self, GapHealth, WaitHealth};
use crate::ledger::attribution::Tag;
use crate::ledger::client::ClientLedger;
use crate::ledger::ended::{Counters, Evidence, Ledger, Seen, Vanished};
use crate::ledger::pooler::{self, PoolerConnection};
use crate::ledger::retag::{self, Untagged};
use crate::ledger::{census, sockets};
use crate::listener::loss::ServerFacts;
use crate::schedule::{self, Fault};
use crate::{Cause, Config, ConfigError, NetworkPath, PoolFigures, Snapshot, WatchedPool, catalog};

/// The `application_name` tags of the pools watched by a live [`PoolWatch`] in this process,
/// with their pool names: a pool is watched by at most one, and a tag names one pool.
static LIVE: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// How many censuses' gaps the health report looks at for a trend.
const GAP_READINGS: usize = 5;

/// Pause before a census or a sample re-reads an unsettled or gapped reading.
const CENSUS_RECHECK: Duration = Duration::from_millis(50);

/// How many times a census re-reads the server's session-end counters that lag the sessions
/// that vanished (50 ms apart, 0.5 s at most). Kept short: the census holds the dedicated
/// connection meanwhile, and the direct heartbeat waits for it.
const CENSUS_END_READS: u32 = 10;
/// After `pool.close()`, how long the watch keeps counting connections as they close. sqlx 0.8
/// can leave one open for good (docs/lifecycle.md), so the count must not go on forever.
const CLOSE_DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// Starts watching `pool`: samples its counters, takes the server and socket census, and
/// publishes both through the `metrics` facade (to whatever recorder the app installed).
///
/// Must be called inside a Tokio runtime. Keep the returned handle: dropping it (or
/// [`PoolWatch::shutdown`]) stops the background task, and so does closing the pool.
/// Call it before the app checks connections out: see [`attribution`](crate::ledger::attribution).
pub fn instrument_pool(pool: &PgPool, config: Config) -> Result<PoolWatch, ConfigError> {
    config.validate()?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        ConfigError::new("runtime", "no Tokio runtime is running", "call instrument_pool inside a Tokio runtime")
    })?;
    catalog::describe();
    // Known to `sqlx_acquire_layer`, which gives a lone pool sqlx's acquire events.
    crate::acquire::bare::figures(&config.pool_name);
    let (tag, path, nonce) = {
        // Checked and tagged under one lock, so two racing calls cannot both succeed.
        let mut live = LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let options = pool.connect_options();
        let current = options.get_application_name();
        if current.is_some_and(|name| live.contains_key(name)) {
            return Err(ConfigError::new(
                "pool",
                format!(
                    "is already instrumented by a live PoolWatch (its connections are tagged {:?}); a second \
                     watch would re-tag them and the first would count none of its sessions (a false leak)",
                    current.unwrap_or_default()
                ),
                "keep one PoolWatch per pool and share it (or its pool() handle); to re-instrument, drop or \
                 shut down the first PoolWatch before calling instrument_pool again",
            ));
        }
        let path = network_path(&options, &config);
        let unix = options.get_socket().is_some() || options.get_host().starts_with('/');
        // Ports cannot be matched through a NAT, over a unix socket, or without the socket list.
        let nonce = path == NetworkPath::Nat || (path == NetworkPath::Direct && (unix || !cfg!(target_os = "linux")));
        let tag = Tag::new(current.map(crate::ledger::attribution::without_tag), &config.pool_name, nonce);
        if let Some(other) = live.get(&tag.pool_app_name) {
            return Err(shared_tag(&config.pool_name, other, &tag.pool_app_name));
        }
        pool.set_connect_options((*options).clone().application_name(&tag.pool_app_name));
        live.insert(tag.pool_app_name.clone(), config.pool_name.clone());
        (tag, path, nonce)
    };
    let pooler = match &config.pooler_admin {
        Some(admin) => Some(tokio::sync::Mutex::new(PoolerConnection::new(
            admin.options()?,
            &tag.admin_app_name,
            config.census_timeout,
        ))),
        None => None,
    };
    // Take the idle, untagged connections now (no waiting, no ping) so the app cannot check
    // them out before the task re-tags them.
    let untagged = Untagged::take(pool);
    // The pool's options at every connect (rotated credentials reach it), or the declared ones.
    let source = match &config.direct_connect_options {
        Some(d) => crate::direct::Source::Declared(Box::new(d.0.clone())),
        None => crate::direct::Source::Pool(pool.clone()),
    };
    let mut direct = DirectConnection::new(source, &tag.census_app_name, config.census_timeout);
    direct.verify_tag = Some(tag.pool_app_name.clone());
    let client = ClientLedger::new(Arc::clone(&direct.port_cell));
    let gauges = Gauges::new(&config.pool_name, config.detail);
    gauges.info(&tag.stable);
    let shared = Arc::new(Shared {
        direct: tokio::sync::Mutex::new(direct),
        client,
        census_wanted: tokio::sync::Notify::new(),
        disagreement: Mutex::new((0, 0)),
        reach_seen: AtomicU64::new(u64::MAX),
        reach_last: Mutex::new(None),
        heartbeat: Heartbeat::new(&config.pool_name, config.detail),
        gauges,
        pooler_gauges: pooler.as_ref().map(|_| PoolerGauges::new(&config.pool_name)),
        pooler,
        path,
        by_port: !nonce,
        ended: Mutex::new(Ledger::default()),
        reach: Reach::new(&config.pool_name, config.detail),
        stranded: Stranded::new(&config.pool_name, config.detail),
        send_queues: sockets::StuckSendQueues::new(&config.pool_name, config.send_queue_stuck_after, config.detail),
        gaps: Mutex::new(std::collections::VecDeque::new()),
        probe: Arc::new(Probe::new(pool, &config)),
        lifecycle: crate::acquire::lifecycle::Published::new(pool, &config.pool_name, config.detail),
        latest: Mutex::new(Snapshot { pool: PoolFigures::of(pool), ..Snapshot::default() }),
        untagged: Mutex::new(untagged),
        retagged: tokio::sync::OnceCell::new(),
        census_failing: AtomicBool::new(false),
        liveness: Liveness::new(&config.pool_name),
        faults: [schedule::Faults::default(), schedule::Faults::default()],
        degraded_warned: AtomicBool::new(false),
        hidden_warned: AtomicBool::new(false),
        pool: pool.clone(),
        tag,
        config,
    });
    let (stop, stopped) = oneshot::channel();
    let task = runtime.spawn(run(Arc::clone(&shared), stopped));
    let (stop_heartbeat, heartbeat_stopped) = oneshot::channel();
    let heartbeat = runtime.spawn(supervise_heartbeat(Arc::clone(&shared), heartbeat_stopped));
    Ok(PoolWatch {
        shared,
        stop: Some(stop),
        task: Some(task),
        stop_heartbeat: Some(stop_heartbeat),
        heartbeat: Some(heartbeat),
    })
}

/// The error for a pool whose tag another live watch of this process already uses.
fn shared_tag(pool_name: &str, other: &str, tag: &str) -> ConfigError {
    if pool_name == other {
        // The stable tag is per pool name: two pools of one process under one name would
        // count each other's sessions.
        return ConfigError::new(
            "pool_name",
            format!("{pool_name:?} is already used by another live PoolWatch in this process"),
            "give each pool its own name, e.g. Config::new(\"main\") and Config::new(\"jobs\")",
        );
    }
    ConfigError::new(
        "pool_name",
        format!(
            "{pool_name:?} and the live pool {other:?} would share the application_name {tag:?} (pool names are \
             cut to 16 bytes with a 6-digit hash of the whole name): each would count the other's sessions"
        ),
        "give the two pools names that differ within their first 9 characters",
    )
}

/// The handle of one watched pool. Dropping it stops the background task.
#[derive(Debug)]
pub struct PoolWatch {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    stop_heartbeat: Option<oneshot::Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

impl PoolWatch {
    /// The latest heartbeat figures of both paths (`pool` and `direct`).
    pub fn heartbeat(&self) -> crate::HeartbeatFigures {
        self.shared.heartbeat.figures()
    }

    /// The configuration hazards found by the last lint (start-up, a periodic re-check, or the last reconnect of
    /// the dedicated connection). Empty before the first lint and on a clean setup.
    pub fn hazards(&self) -> Vec<crate::Finding> {
        self.shared.heartbeat.hazards()
    }

    /// The server settings the last lint read (`None` before it could read them).
    pub fn server_settings(&self) -> Option<crate::ServerSettings> {
        self.shared.heartbeat.server_settings()
    }

    /// Every address the database host resolved to at the last census tick and whether a TCP
    /// connect to each succeeded: see [`reach`](crate::health::reach).
    pub fn reachability(&self) -> crate::Reachability {
        self.shared.reach.figures()
    }

    /// A plain health report for a readiness endpoint: `ok` / `degraded` / `failing`, the
    /// reasons and the figures behind them (see [`report`](crate::report)). No I/O: it reads
    /// what the background tasks last measured. With the `serde` feature it is `Serialize`.
    pub fn health(&self) -> crate::HealthReport {
        let s = &self.shared;
        let latest = s.latest();
        let recent: Vec<i64> = s.gaps.lock().map(|g| g.iter().copied().collect()).unwrap_or_default();
        let (waiters, oldest) = s.probe.sample_waiters();
        report::judge(report::Inputs {
            pool_name: s.config.pool_name.clone(),
            pool: PoolFigures::of(&s.pool),
            gap: GapHealth {
                phantom: latest.phantom,
                growing: report::growing(&recent),
                recent,
                census_up: latest.census_up,
            },
            heartbeat: s.heartbeat.figures(),
            listeners: crate::listener::status::of_pool(&s.config.pool_name),
            hazards: s.heartbeat.hazards(),
            stranded: s.stranded.figure(),
            lifecycle: self.lifecycle(),
            send_queue_stuck: s.send_queues.figure(),
            waits: WaitHealth { waiters, oldest_wait_seconds: oldest.as_secs_f64() },
            reach: s.reach.figures(),
            liveness: report::Liveness {
                ages: s.liveness.ages(s.heartbeat_count()),
                limits: crate::health::liveness::Limits::of(&s.config),
            },
        })
    }

    /// Connections opened, closed by reason, and the oldest one's age, counted up to now;
    /// `None` unless the pool was built with
    /// [`instrument_options_named`](crate::instrument_options_named) under this pool's name.
    pub fn lifecycle(&self) -> Option<crate::LifecycleFigures> {
        self.shared.lifecycle.as_ref().map(crate::acquire::lifecycle::Published::update)
    }

    /// The latest figures (from the last sample and census).
    pub fn snapshot(&self) -> Snapshot {
        self.shared.latest()
    }

    /// Takes a server census and a sample (the client-side ledger) now, publishes both, and
    /// returns the figures.
    pub async fn census_now(&self) -> Result<Snapshot, Cause> {
        self.shared.census().await?;
        self.shared.sample().await;
        Ok(self.shared.latest())
    }

    /// The watched pool handle: use it instead of the bare pool so acquires are timed and
    /// watched for leaks. Leak suspects are scanned for while this `PoolWatch` lives.
    pub fn pool(&self) -> WatchedPool {
        WatchedPool::new(Arc::clone(&self.shared.probe))
    }

    /// The `application_name` that marks this pool's connections on the server: the stable
    /// [`stable_tag`](crate::attribution::stable_tag) (a per-process nonce only where ports
    /// cannot be matched: see [`attribution`](crate::ledger::attribution)).
    pub fn application_name(&self) -> &str {
        &self.shared.tag.pool_app_name
    }

    /// How this watch attributes sessions: the declared or inferred [`NetworkPath`].
    pub fn network_path(&self) -> NetworkPath {
        self.shared.path
    }

    /// The part of [`application_name`](Self::application_name) every replica shares (the
    /// `application_name` label of `poolwatch_pool_info`): see
    /// [`fleet_tag`](crate::attribution::fleet_tag).
    pub fn fleet_tag(&self) -> &str {
        &self.shared.tag.stable
    }

    /// Samples now: the pool's counters and its client-side ledger (its sockets; no server
    /// cost), published like a background sample. The socket read runs on Tokio's blocking
    /// pool.
    pub async fn sample_now(&self) -> Snapshot {
        self.shared.sample().await;
        self.shared.latest()
    }

    /// Test-only: injects a fault (a panic, a stall) into a background task, to prove the
    /// supervision and the liveness figures. Not part of the API.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        let [watch, heartbeat] = &self.shared.faults;
        match fault {
            Fault::PanicWatch => watch.panic(),
            Fault::PanicHeartbeat => heartbeat.panic(),
            Fault::StallWatch => watch.stall(true),
            Fault::StallHeartbeat => heartbeat.stall(true),
            Fault::Resume => {
                watch.stall(false);
                heartbeat.stall(false);
            }
        }
    }

    /// A handle the app ticks per unit of work done with this pool: see [`Progress`](crate::Progress).
    pub fn progress(&self) -> crate::Progress {
        crate::Progress::new(&self.shared.config.pool_name)
    }

    /// Stops the background task and waits until it has closed its connection.
    pub async fn shutdown(mut self) {
        self.stop.take();
        self.stop_heartbeat.take();
        if let Some(task) = self.heartbeat.take() {
            let _ = task.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PoolWatch {
    fn drop(&mut self) {
        // The pool may be instrumented again from now on.
        if let Ok(mut live) = LIVE.lock() {
            live.remove(&self.shared.tag.pool_app_name);
        }
        // Dropping the senders wakes the tasks; the census task closes its connection and ends.
        self.stop_heartbeat.take();
        self.stop.take();
    }
}

#[derive(Debug)]
struct Shared {
    /// The lifecycle figures, when the pool's options carry `instrument_options_named`'s hooks.
    lifecycle: Option<crate::acquire::lifecycle::Published>,
    pool: PgPool,
    config: Config,
    tag: Tag,
    gauges: Gauges,
    reach: Reach,
    stranded: Stranded,
    send_queues: sockets::StuckSendQueues,
    /// The phantom gap at the last censuses, oldest first (at most [`GAP_READINGS`]).
    gaps: Mutex<std::collections::VecDeque<i64>>,
    heartbeat: Heartbeat,
    probe: Arc<Probe>,
    direct: tokio::sync::Mutex<DirectConnection>,
    client: ClientLedger,
    /// Woken when the client-side ledger disagrees with the pool: a census runs at once.
    census_wanted: tokio::sync::Notify,
    /// The (client gap, unattributed sockets) that last woke a census.
    disagreement: Mutex<(i64, u32)>,
    /// The connect-trouble count when the reachability probe last ran.
    reach_seen: AtomicU64,
    /// When the reachability probe last ran: an address found down is probed again every 10
    /// samples until it answers (else it would read down until the next scheduled probe).
    reach_last: Mutex<Option<Instant>>,
    latest: Mutex<Snapshot>,
    untagged: Mutex<Untagged>,
    retagged: tokio::sync::OnceCell<()>,
    census_failing: AtomicBool,
    /// When the tasks last completed a sample, census and heartbeat.
    liveness: Liveness,
    /// Test-only faults of the watch task (`[0]`) and the heartbeat task (`[1]`).
    faults: [schedule::Faults; 2],
    degraded_warned: AtomicBool,
    hidden_warned: AtomicBool,
    path: NetworkPath,
    /// Sessions are matched to this process by client address and port (no nonce).
    by_port: bool,
    pooler: Option<tokio::sync::Mutex<PoolerConnection>>,
    pooler_gauges: Option<PoolerGauges>,
    ended: Mutex<Ledger>,
}

/// The declared network path, or the one inferred from the config (see `Config::network_path`).
fn network_path(options: &sqlx::postgres::PgConnectOptions, config: &Config) -> NetworkPath {
    if let Some(path) = config.network_path {
        return path;
    }
    if config.pooler_admin.is_some() {
        return NetworkPath::Pooler;
    }
    let elsewhere = config
        .direct_connect_options
        .as_ref()
        .is_some_and(|d| d.0.get_host() != options.get_host() || d.0.get_port() != options.get_port());
    if elsewhere { NetworkPath::Pooler } else { NetworkPath::Direct }
}

impl Shared {
    fn latest(&self) -> Snapshot {
        self.latest.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.latest.lock() {
            f(&mut s);
        }
    }

    /// The pool's counters and its client-side ledger. A gap is read again 50 ms later (a
    /// connection being opened or closed disagrees for a moment); a gap still there that
    /// differs from the last one wakes a census.
    async fn sample(&self) {
        if let Some(l) = &self.lifecycle {
            l.update();
        }
        let mut figures = PoolFigures::of(&self.pool);
        self.gauges.pool(&figures);
        let linting = || self.heartbeat.linting.load(Ordering::Relaxed);
        if linting() {
            // The lint's short-lived connection would read as a socket the pool does not count.
            self.update(|s| s.pool = figures);
            return;
        }
        self.probe.sample_waiters();
        let released = self.lifecycle.as_ref().map(crate::acquire::lifecycle::Published::released_not_idle);
        self.stranded.sample(&self.pool, self.probe.leaks.checked_out_if_used(), released);
        let mut sockets = self.client.read(figures.open).await;
        let gap = |f: &PoolFigures, s: &Option<crate::SocketCensus>| {
            s.as_ref().map(|s| i64::from(f.open) - i64::from(s.get("established")))
        };
        if gap(&figures, &sockets).is_some_and(|g| g != 0) {
            tokio::time::sleep(CENSUS_RECHECK).await;
            figures = PoolFigures::of(&self.pool);
            self.gauges.pool(&figures);
            sockets = self.client.read(figures.open).await;
        }
        if linting() {
            self.update(|s| s.pool = figures);
            return;
        }
        let client_gap = gap(&figures, &sockets);
        if let Some(s) = &sockets {
            // Send queues are watched at every sample (a census is rare).
            self.send_queues.update(s);
        }
        if let Some(s) = &sockets {
            self.follow_ended(s, figures.open).await;
        }
        if let (Some(s), Some(g)) = (&sockets, client_gap) {
            self.gauges.sockets(s, g);
            let now = (g, s.unattributed);
            let wake = self.disagreement.lock().is_ok_and(|mut last| {
                let changed = *last != now;
                *last = now;
                changed && now != (0, 0)
            });
            if wake {
                tracing::debug!(pool = %self.config.pool_name, client_gap = g, unattributed = s.unattributed, "client-side ledger disagrees with the pool; census now");
                self.census_wanted.notify_one();
            }
        }
        let ended = self.gauges.ended_total();
        self.update(|s| {
            s.pool = figures;
            s.sockets = sockets;
            s.client_gap = client_gap;
            s.sessions_ended = ended;
        });
    }

    /// Follows the pool's sockets from sample to sample (see `ledger::ended`): a session the
    /// server or a pooler ended is counted within two samples, whatever the census cadence.
    /// Costs nothing while no socket ends; then one read of the kernel's sockets and, on a
    /// direct path, one small query for the server's session-end counters.
    async fn follow_ended(&self, census: &sockets::SocketCensus, pool_open: u32) {
        let at = Instant::now();
        let open: Vec<(u64, u16, usize)> = census
            .sockets
            .iter()
            .filter(|s| self.client.owns_port(s.local.port()))
            .filter_map(|s| Some((s.inode, s.local.port(), sockets::TCP_STATES.iter().position(|n| *n == s.state)?)))
            .collect();
        let Some(gone) = self.ended.lock().ok().map(|mut l| l.follow(&open, at, pool_open)) else { return };
        // Behind a pooler a gone socket cannot be confirmed (see `ledger::ended`): not read.
        if !gone.is_empty() && self.path != NetworkPath::Pooler {
            // What the kernel still holds of them tells who closed first.
            let list = sockets::list_blocking(Some(&self.client.peers()), None).await;
            if let (Some(list), Ok(mut ledger)) = (list, self.ended.lock()) {
                ledger.suspect_gone(gone, &list);
            }
        }
        if !self.ended.lock().is_ok_and(|l| l.pending()) {
            return;
        }
        let counters = if self.path == NetworkPath::Pooler {
            Counters::NotServer
        } else {
            // Bounded like the census: a heartbeat stuck on the connection must not stall samples.
            match tokio::time::timeout(schedule::bounded(self.config.census_timeout), self.direct.lock()).await {
                Ok(mut direct) => match direct.run(async |c| ServerFacts::read(c).await).await {
                    Ok(facts) => Counters::Read(facts.ends),
                    Err(_) => Counters::Unread,
                },
                Err(_) => Counters::Unread,
            }
        };
        let client_idle_timeout = match &self.pooler {
            Some(p) => p.try_lock().ok().and_then(|c| c.client_idle_timeout),
            None => None,
        };
        let evidence = Evidence {
            ends: None,
            idle_session_timeout: self.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
            client_idle_timeout,
        };
        let causes = self.ended.lock().map(|mut l| l.settle(counters, evidence)).unwrap_or_default();
        if !causes.is_empty() {
            tracing::debug!(pool = %self.config.pool_name, ?causes, "sessions of the pool ended without the pool closing them");
            self.gauges.sessions_ended(&causes);
        }
    }

    /// Connect trouble seen since the last reachability probe (census or heartbeat connect
    /// failures, acquire errors, slow creates).
    fn connect_trouble(&self) -> u64 {
        let hb = self.heartbeat.figures();
        let census = u64::from(self.census_failing.load(Ordering::Relaxed));
        [hb.pool.failures, hb.direct.failures, census]
            .into_iter()
            .fold(self.probe.trouble.load(Ordering::Relaxed), u64::saturating_add)
    }

    /// Whether the last probe found an address down (or the host unresolved) and 10 samples
    /// have passed since: a recovered address must not read down for hours. Costs the server
    /// a probe per 10 samples only while something is down.
    fn recheck_down(&self) -> bool {
        let down = self.reach.any_down();
        let last = self.reach_last.lock().ok().and_then(|l| *l);
        down && last.is_none_or(|at| at.elapsed() >= self.config.sample_interval.saturating_mul(10))
    }

    /// Whether a reachability probe is due beside the schedule: connects failed or slowed
    /// down since the last probe, or an address is down (every 10 samples).
    fn reach_wanted(&self) -> bool {
        self.reach_seen.load(Ordering::Relaxed) != self.connect_trouble() || self.recheck_down()
    }

    /// Probes reachability now (on its schedule, or soon after [`Shared::reach_wanted`]).
    async fn reach_if_due(&self) -> bool {
        self.reach_seen.store(self.connect_trouble(), Ordering::Relaxed);
        if let Ok(mut last) = self.reach_last.lock() {
            *last = Some(Instant::now());
        }
        // The probes' sockets are left out of any socket census by port (`OwnPort`).
        self.reach.run(&self.pool.connect_options(), self.config.census_timeout).await;
        true
    }

    async fn census(&self) -> Result<Snapshot, Cause> {
        // After `pool.close()` poolwatch opens nothing new and publishes nothing.
        if self.pool.is_closed() {
            return Err(Cause::PoolClosed);
        }
        let span = tracing::debug_span!(
            "poolwatch.census",
            "db.client.connection.pool.name" = %self.config.pool_name,
            "db.system.name" = "postgresql",
            "error.type" = tracing::field::Empty,
            "otel.status_code" = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = self.take_census().instrument(span.clone()).await;
        if let Err(cause) = &result {
            span.record("error.type", cause.as_str()).record("otel.status_code", "ERROR");
        }
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(snapshot) => {
                if self.census_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(pool = %self.config.pool_name, "poolwatch census recovered");
                }
                self.liveness.census_done();
                self.gauges.census(&snapshot, seconds);
                self.probe.census_seen(&snapshot);
                if let (Some(p), Ok(mut gaps)) = (snapshot.phantom, self.gaps.lock()) {
                    if gaps.len() == GAP_READINGS {
                        gaps.pop_front();
                    }
                    gaps.push_back(p);
                }
                self.update(|s| {
                    // The sample's sockets (the client-side ledger) stay; the census's own
                    // listing stands in until a sample has read them.
                    let (sockets, client_gap) = (s.sockets.take(), s.client_gap);
                    *s = snapshot.clone();
                    if sockets.is_some() {
                        s.sockets = sockets;
                    }
                    s.client_gap = client_gap;
                });
                Ok(self.latest())
            }
            Err(cause) => {
                if !self.census_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pool = %self.config.pool_name, %cause, "poolwatch census failed; figures are stale until it recovers");
                }
                self.gauges.census_failed(cause, seconds);
                self.update(|s| s.census_up = false);
                Err(cause)
            }
        }
    }

    async fn take_census(&self) -> Result<Snapshot, Cause> {
        self.retagged.get_or_init(|| self.retag_idle()).await;
        let result = self.read_census().await;
        if result.is_err()
            && let Ok(mut ended) = self.ended.lock()
        {
            ended.forget();
        }
        result
    }

    async fn read_census(&self) -> Result<Snapshot, Cause> {
        // Bounded: a heartbeat stuck on the dedicated connection must not stall the samples.
        let Ok(mut direct) =
            tokio::time::timeout(schedule::bounded(self.config.census_timeout), self.direct.lock()).await
        else {
            return Err(Cause::TimedOut);
        };
        if self.pool.is_closed() {
            // Closed while waiting for the lock: the task has closed (or will close) the connection.
            return Err(Cause::PoolClosed);
        }
        let app_name = self.tag.pool_app_name.as_str();
        let peers = self.peers().await;
        let options = self.pool.connect_options();
        let database = options.get_database().unwrap_or(options.get_username()).to_owned();
        let user = options.get_username().to_owned();
        // Both sides must describe one moment. A connection being opened counts in the pool
        // before its session shows on the server; a closed one leaves its session for a few
        // ms. So a reading is taken again when the pool's count moved during the query, or
        // when it shows a gap: a real leak is still there 50 ms later, a transient is not.
        let mut attempt = 0;
        loop {
            let before = self.pool.size();
            // This process's sockets toward the pool's address, listed before the queries: a
            // connection opened after the listing moves the pool's count and forces a re-read.
            let list = sockets::list_blocking(peers.as_deref(), direct.local_port).await;
            let owned: Vec<SocketAddr> = list.iter().flatten().filter(|s| s.owned).map(|s| s.local).collect();
            let keys = match (self.by_port && self.path == NetworkPath::Direct, &list) {
                (true, Some(_)) => Some(census::port_keys(owned.iter().copied())),
                // Ports cannot be read (not Linux): the tag alone, as with a nonce.
                _ => None,
            };
            let read_at = Instant::now();
            let (sessions, facts) = direct
                .run(async |c| {
                    // The session-end counters first: a session this census sees alive has not
                    // been counted yet, even if it ends between the two queries (read the other
                    // way round, a kill at that moment was counted before its session was seen
                    // alive, and the next census found no new end to explain it).
                    let facts = ServerFacts::read(c).await?;
                    let sessions = census::take(c, app_name, keys.as_deref()).await?;
                    Ok((sessions, facts))
                })
                .await?;
            // A census role without pg_read_all_stats sees other roles' sessions without their
            // address: they cannot be matched by port. With one declared replica the tag alone
            // is exact; with more, the count is unknown.
            let hidden = keys.is_some() && sessions.iter().any(|s| s.port.is_none());
            let exact = !hidden || self.config.replicas == 1;
            if hidden && !self.hidden_warned.swap(true, Ordering::Relaxed) {
                // One warning for the missing privilege: it also hides the states.
                self.degraded_warned.store(true, Ordering::Relaxed);
                tracing::warn!(
                    pool = %self.config.pool_name,
                    replicas = self.config.replicas,
                    "the census role cannot read the pool's sessions' client_addr/client_port in pg_stat_activity, \
                     so they cannot be matched to this process by port ({}), and their states show as `unknown`. \
                     Grant it pg_read_all_stats.",
                    if exact { "with one declared replica the tag alone counts them" } else { "the phantom gap is not exported" }
                );
            }
            let server = census::aggregate(sessions.iter());
            let mut pooler_view = None;
            let mut admin_ports = Vec::new();
            if let Some(conn) = &self.pooler {
                let mut conn = conn.lock().await;
                let admin_name = &self.tag.admin_app_name;
                let (figures, clients, admin) = conn.take(app_name, admin_name, &database, &user, &owned).await?;
                admin_ports = admin;
                pooler_view = Some((figures, clients, conn.client_idle_timeout));
            }
            let pool = PoolFigures::of(&self.pool);
            attempt += 1;
            let real = match (&pooler_view, self.path) {
                (Some((figures, _, _)), _) => Some(figures.clients),
                (None, NetworkPath::Pooler) => None,
                (None, _) if !exact => None,
                (None, _) => Some(server.total()),
            };
            let settled = pool.open == before && real.is_none_or(|r| r == pool.open);
            if !settled && attempt < 3 {
                tokio::time::sleep(CENSUS_RECHECK).await;
                continue;
            }
            if server.get("unknown") > 0 && !self.degraded_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    pool = %self.config.pool_name,
                    "the census role cannot read these sessions' state in pg_stat_activity; states show as \
                     `unknown` (counts stay exact). Grant it pg_read_all_stats for per-state figures."
                );
            }
            // poolwatch's own connections: the admin console's, and the dedicated one if it
            // (re)connected after the listing.
            let own_port = direct.local_port;
            let list = list.map(|l| {
                l.into_iter()
                    .filter(|s| !admin_ports.contains(&s.local.port()) && Some(s.local.port()) != own_port)
                    .collect::<Vec<_>>()
            });
            // Sessions the pool did not close: by port, on the server or at the pooler.
            let seen: Option<std::collections::HashMap<u16, Seen>> = match (&pooler_view, self.path) {
                (Some((_, clients, _)), _) => {
                    Some(clients.iter().map(|c| (c.port, Seen::PoolerClient(c.linked))).collect())
                }
                (None, NetworkPath::Direct) if keys.is_some() && !hidden => {
                    Some(sessions.iter().filter_map(|s| s.port.map(|p| (p, Seen::Server(s.idle_for())))).collect())
                }
                _ => None,
            };
            let mut vanished = Vanished::default();
            if let (Some(seen), Some(list)) = (seen, &list)
                && let Ok(mut ended) = self.ended.lock()
            {
                vanished = ended.update_read_at(seen, list, facts.ends, read_at);
            }
            let mut ended_now = Vec::new();
            if !vanished.is_empty() {
                // A backend leaves pg_stat_activity a moment before its session-end counters
                // are flushed: read them again until they count every vanished session, a
                // few times at most (one small query each, only when sessions vanished).
                let mut ends = facts.ends;
                if self.path == NetworkPath::Direct {
                    for _ in 0..CENSUS_END_READS {
                        if vanished.counted_by(ends) {
                            break;
                        }
                        tokio::time::sleep(CENSUS_RECHECK).await;
                        if let Ok(later) = direct.run(async |c| ServerFacts::read(c).await).await {
                            ends = later.ends;
                        }
                    }
                }
                let evidence = Evidence {
                    ends,
                    idle_session_timeout: self.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
                    client_idle_timeout: pooler_view.as_ref().and_then(|(_, _, t)| *t),
                };
                ended_now = self.ended.lock().map(|mut l| l.judge_census(&vanished, evidence)).unwrap_or_default();
            }
            let ended_total = self.gauges.sessions_ended(&ended_now);
            if let (Some(g), Some((figures, _, _))) = (&self.pooler_gauges, &pooler_view) {
                g.set(figures);
            }
            let peer = peers.as_ref().and_then(|p| p.first().copied());
            drop(direct);
            // Peers are resolved here, rarely; every sample reuses them.
            self.client.set_peers(peers.as_deref().unwrap_or_default());
            // The process's sockets right after: established ones that are none of the pool's
            // sessions belong to other clients of the app (only while the pool's count stood still).
            let then = self.client.read_all().await.filter(|_| self.pool.size() == pool.open);
            self.client.learn(&pool_ports(pooler_view.as_ref().map(|(_, c, _)| c.as_slice()), &server), then.as_ref());
            return Ok(Snapshot {
                phantom: real.map(|r| i64::from(pool.open) - i64::from(r)),
                pool,
                server: Some(server),
                sockets: list.zip(peer).map(|(l, peer)| sockets::SocketCensus::of_list(&l, peer)),
                census_up: true,
                pooler: pooler_view.map(|(f, _, _)| f),
                sessions_ended: ended_total,
                client_gap: None,
            });
        }
    }

    /// The addresses the database host resolves to; `None` for a unix socket.
    async fn peers(&self) -> Option<Vec<SocketAddr>> {
        let options = self.pool.connect_options();
        let host = options.get_host();
        if options.get_socket().is_some() || host.starts_with('/') {
            return None;
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Some(vec![SocketAddr::new(ip, options.get_port())]);
        }
        let lookup = tokio::net::lookup_host((host, options.get_port()));
        match tokio::time::timeout(self.config.census_timeout, lookup).await {
            Ok(Ok(addrs)) => Some(addrs.collect()),
            _ => None,
        }
    }

    /// Tags the connections the pool opened before it was instrumented (see
    /// [`retag`](crate::ledger::retag)), then returns them to the pool.
    async fn retag_idle(&self) {
        let untagged = self.untagged.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let method = match self.path {
            NetworkPath::Pooler => retag::Method::Reconnect,
            _ => retag::Method::SetConfig,
        };
        let outcome =
            retag::retag(&self.pool, untagged, &self.tag.pool_app_name, method, self.config.census_timeout).await;
        if outcome.failed > 0 {
            tracing::debug!(pool = %self.config.pool_name, failed = outcome.failed, "could not re-tag some idle connections");
        }
        if outcome.unreached > 0 {
            tracing::warn!(
                pool = %self.config.pool_name,
                checked_out = outcome.unreached,
                "connections were checked out when the pool was instrumented and stayed out; the census cannot \
                 see them until they close, so poolwatch_phantom_connections reads that much high. \
                 Call instrument_pool right after creating the pool."
            );
        }
    }
}

/// The sample and census task, restarted after a panic (with backoff); then it closes the
/// watch's connections.
async fn run(shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut panics = 0u32;
    let stopped = loop {
        let watch = schedule::Supervised::new(watch_until_stopped(&shared, &mut stop), &shared.faults[0]);
        match watch.await {
            Ok(stopped) => break stopped,
            Err(message) => {
                panics = panics.saturating_add(1);
                shared.liveness.watch_lost();
                shared.update(|s| s.census_up = false);
                if let Some(stopped) = shared.after_panic("watch", &message, panics, &mut stop).await {
                    break stopped;
                }
            }
        }
    };
    // Stopped before the re-tag ran: give the idle connections back, or `pool.close()` waits.
    drop(shared.untagged.lock().map(|mut held| std::mem::take(&mut *held)));
    shared.direct.lock().await.close().await;
    if let Some(pooler) = &shared.pooler {
        pooler.lock().await.close().await;
    }
    if let (false, Some(l)) = (stopped, &shared.lifecycle) {
        // The pool closed: count its connections as they close (checked-out ones close when
        // given back), until none is left, the watch is dropped, or CLOSE_DRAIN_LIMIT passed.
        let until = schedule::after(tokio::time::Instant::now(), CLOSE_DRAIN_LIMIT);
        loop {
            l.update();
            if shared.pool.size() == 0 {
                break;
            }
            if tokio::time::Instant::now() >= until {
                tracing::debug!(
                    pool = %shared.config.pool_name,
                    open = shared.pool.size(),
                    "pool closed; stopped counting its last connections"
                );
                break;
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(schedule::bounded(shared.config.sample_interval)) => {}
            }
        }
    }
    // The watch is over: its series leave poolwatch's exporter once nothing holds them.
    crate::export::pool_ended(&shared.config.pool_name);
}

/// The heartbeat task, restarted after a panic (with backoff).
async fn supervise_heartbeat(s: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let lint_app_name = s.tag.census_app_name.replacen("poolwatch-census:", "poolwatch-lint:", 1);
    let mut panics = 0u32;
    loop {
        let beat = async {
            // Not before the idle connections are re-tagged and back in the pool.
            s.retagged.get_or_init(|| s.retag_idle()).await;
            s.heartbeat.run(&s.pool, &s.direct, &s.config, &lint_app_name, &mut stop).await
        };
        match schedule::Supervised::new(beat, &s.faults[1]).await {
            Ok(()) => return,
            Err(message) => {
                panics = panics.saturating_add(1);
                s.liveness.heartbeat_lost();
                s.heartbeat.forget();
                if s.after_panic("heartbeat", &message, panics, &mut stop).await.is_some() {
                    return;
                }
            }
        }
    }
}

impl Shared {
    /// After a task panicked: logs it once, counts it, clears the locks it poisoned and waits
    /// before the restart (1 s, 2 s … 60 s, ±20 %). `Some`: stopped meanwhile (`true` by the
    /// handle, `false` by the pool closing).
    async fn after_panic(
        &self,
        task: &'static str,
        message: &str,
        panics: u32,
        stop: &mut oneshot::Receiver<()>,
    ) -> Option<bool> {
        let wait = schedule::backoff(Duration::from_secs(1), Duration::from_secs(60), panics);
        tracing::error!(
            pool = %self.config.pool_name,
            task,
            panics,
            panic = message,
            "poolwatch background task panicked (a bug in poolwatch: please report it); its figures read unknown \
             until it restarts in {wait:?}"
        );
        metrics::counter!(catalog::TASK_RESTARTS.name, catalog::POOL_NAME => self.config.pool_name.clone(), catalog::TASK => task)
            .increment(1);
        self.latest.clear_poison();
        self.gaps.clear_poison();
        self.disagreement.clear_poison();
        self.reach_last.clear_poison();
        self.untagged.clear_poison();
        self.ended.clear_poison();
        if let Ok(mut ended) = self.ended.lock() {
            ended.forget();
        }
        tokio::select! {
            _ = &mut *stop => Some(true),
            _ = self.pool.close_event() => Some(false),
            _ = tokio::time::sleep(wait) => None,
        }
    }

    /// One sample, its liveness stamp, and whether a reachability probe is wanted.
    async fn sample_tick(&self) -> bool {
        self.sample().await;
        self.liveness.sampled(self.heartbeat_count());
        self.reach_wanted()
    }

    /// Heartbeats run so far, both paths, successes and failures.
    fn heartbeat_count(&self) -> u64 {
        let hb = self.heartbeat.figures();
        [hb.pool.failures, hb.direct.successes, hb.direct.failures]
            .into_iter()
            .fold(hb.pool.successes, u64::saturating_add)
    }
}

/// How soon a reachability probe follows the connect trouble that wants it (±20 %, so a
/// fleet that saw one outage does not probe the recovering server at one instant).
const REACH_SOON: Duration = Duration::from_secs(5);

/// Returns `true` when stopped by the handle, `false` when the pool closed.
async fn watch_until_stopped(shared: &Shared, stop: &mut oneshot::Receiver<()>) -> bool {
    let closed = shared.pool.close_event();
    tokio::pin!(closed);
    tokio::select! {
        _ = &mut *stop => return true,
        _ = &mut closed => return false,
        _ = shared.retagged.get_or_init(|| shared.retag_idle()) => {}
    }
    let config = &shared.config;
    let mut sample = schedule::interval(config.sample_interval);
    let scan_every = shared.probe.leaks.scan_every();
    let mut leak_scan = schedule::interval(scan_every.unwrap_or(Duration::from_secs(3600)));
    // The first census and probe at once (they learn the peers and the ports), then each
    // on its own jittered schedule.
    let census_at = tokio::time::sleep(Duration::ZERO);
    let reach_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(census_at, reach_at);
    let mut plan = CensusPlan { first: true, ..CensusPlan::default() };
    let floor = config.sample_interval.saturating_mul(10);
    loop {
        tokio::select! {
            _ = &mut *stop => return true,
            _ = &mut closed => return false,
            _ = sample.tick() => {
                let wanted = tokio::select! {
                    _ = &mut *stop => return true,
                    _ = &mut closed => return false,
                    wanted = shared.sample_tick() => wanted,
                };
                let soon = schedule::after(tokio::time::Instant::now(), schedule::jitter(config.sample_interval.min(REACH_SOON)));
                if wanted && !plan.first && reach_at.deadline() > soon {
                    reach_at.as_mut().reset(soon);
                }
            }
            _ = leak_scan.tick(), if scan_every.is_some() => { shared.probe.leaks.scan(); }
            _ = &mut reach_at, if !plan.first => tokio::select! {
                _ = &mut *stop => return true,
                _ = &mut closed => return false,
                _ = shared.reach_if_due() => {
                    let next = schedule::jitter(config.reach_interval);
                    reach_at.as_mut().reset(schedule::after(tokio::time::Instant::now(), next));
                }
            },
            wanted = async {
                tokio::select! {
                    _ = &mut census_at => false,
                    _ = shared.census_wanted.notified() => true,
                }
            } => {
                if let Some(due) = plan.held_back(wanted, floor) {
                    // Censuses run by disagreements: at most one per 10 samples; later ones
                    // wait for that (a flapping gap cannot turn into a census per sample).
                    if census_at.deadline() > due {
                        census_at.as_mut().reset(due);
                    }
                    continue;
                }
                let result = tokio::select! {
                    _ = &mut *stop => return true,
                    _ = &mut closed => return false,
                    result = shared.census() => result,
                };
                if wanted {
                    tracing::debug!(pool = %config.pool_name, "census run by the client-side ledger");
                }
                let next = plan.next(&result, config.census_interval);
                census_at.as_mut().reset(schedule::after(tokio::time::Instant::now(), next));
                if std::mem::take(&mut plan.first) {
                    // The first census resolved the peers: the ledger can read sockets now.
                    shared.sample().await;
                }
            }
        }
    }
}

/// A census that saw a session in one of these states this long, or lock waiters, or a
/// phantom gap, is confirmed by a follow-up soon (see [`CensusPlan::next`]).
const CONFIRM_AFTER: Duration = Duration::from_secs(60);

/// When the next census runs: every `census_interval` (±20 %); sooner after a failure
/// (5 s, 10 s … ±20 %, see [`schedule::census_retry`]); and a follow-up 45 s (±20 %) after a
/// census that saw something to confirm, then 90 s, 180 s … back to the interval while it
/// stays. So one failure or one glimpse of a lock wait does not hold its figure for 15 min.
#[derive(Debug, Default)]
struct CensusPlan {
    first: bool,
    last: Option<tokio::time::Instant>,
    failures: u32,
    follow_ups: u32,
}

impl CensusPlan {
    /// The time a census woken by the client-side ledger waits for (`floor` after the last),
    /// `None` when it may run now.
    fn held_back(&self, wanted: bool, floor: Duration) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.last.map(|at| schedule::after(at, floor)).filter(|due| wanted && now < *due)
    }

    /// Records a census's outcome; returns the wait before the next.
    fn next(&mut self, result: &Result<Snapshot, Cause>, interval: Duration) -> Duration {
        self.last = Some(tokio::time::Instant::now());
        match result {
            Err(_) => {
                self.failures = self.failures.saturating_add(1);
                schedule::census_retry(interval, self.failures)
            }
            Ok(snapshot) if needs_confirming(snapshot) => {
                self.failures = 0;
                self.follow_ups = self.follow_ups.saturating_add(1);
                let first = Duration::from_secs(45).min(interval / 2);
                schedule::backoff(first, schedule::bounded(interval), self.follow_ups)
            }
            Ok(_) => {
                (self.failures, self.follow_ups) = (0, 0);
                schedule::jitter(interval)
            }
        }
    }
}

/// Whether a census saw something its figures would otherwise hold for a whole interval:
/// lock waiters, a transaction or statement open [`CONFIRM_AFTER`], a phantom gap.
fn needs_confirming(s: &Snapshot) -> bool {
    let long = ["idle_in_transaction", "idle_in_transaction_aborted", "active"];
    s.phantom.is_some_and(|p| p != 0)
        || s.server
            .as_ref()
            .is_some_and(|c| c.lock_waiters > 0 || long.iter().any(|state| c.longest_in(state) >= CONFIRM_AFTER))
}

/// This process's local ports of the pool's connections, as the last census saw them: behind
/// a pooler the ports of its `SHOW CLIENTS` rows (the server's sessions are the pooler's own).
fn pool_ports(pooler_clients: Option<&[pooler::Client]>, server: &census::ServerCensus) -> Vec<u16> {
    match pooler_clients {
        Some(clients) => clients.iter().map(|c| c.port).collect(),
        None => server.client_ports.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(lock_waiters: u32, active_for: u64, phantom: i64) -> Result<Snapshot, Cause> {
        let mut longest = [Duration::ZERO; 7];
        longest[0] = Duration::from_secs(active_for);
        let server = crate::ServerCensus { lock_waiters, longest, ..crate::ServerCensus::default() };
        Ok(Snapshot { server: Some(server), phantom: Some(phantom), census_up: true, ..Snapshot::default() })
    }

    #[test]
    fn a_failed_census_is_retried_within_seconds_not_at_the_next_tick() {
        let mut plan = CensusPlan::default();
        let interval = Duration::from_secs(900);
        let waits: Vec<u64> = (0..8).map(|_| plan.next(&Err(Cause::TimedOut), interval).as_secs()).collect();
        assert!((4..=6).contains(&waits[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 144), "capped well below the interval: {waits:?}");
        assert!(waits[3] > waits[0], "backs off: {waits:?}");
        let normal = plan.next(&census(0, 0, 0), interval).as_secs();
        assert!((720..=1080).contains(&normal), "{normal}");
    }

    #[test]
    fn what_needs_confirming_is_confirmed_soon_then_less_often() {
        let interval = Duration::from_secs(900);
        for seen in [census(1, 0, 0), census(0, 61, 0), census(0, 0, 2)] {
            let mut plan = CensusPlan::default();
            let waits: Vec<u64> = (0..6).map(|_| plan.next(&seen, interval).as_secs()).collect();
            assert!((36..=54).contains(&waits[0]), "{waits:?}");
            assert!((72..=108).contains(&waits[1]), "{waits:?}");
            assert!(waits[5] >= 720 && waits.iter().all(|w| *w <= 1080), "{waits:?}");
            let clear = plan.next(&census(0, 0, 0), interval).as_secs();
            assert!((720..=1080).contains(&clear), "{clear}");
        }
        let state = crate::ledger::census::SESSION_STATES.iter().position(|s| *s == "active");
        assert_eq!(state, Some(0), "the test's `longest[0]` is `active`");
    }
}
