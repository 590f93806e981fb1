//! [`instrument_pool`] and the [`PoolWatch`] handle that owns the background task.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use crate::acquire::probe::Probe;
use crate::direct::DirectConnection;
use crate::gauges::Gauges;
use crate::health::heartbeat::Heartbeat;
use crate::health::reach::Reach;
use crate::ledger::attribution::Tag;
use crate::ledger::{census, sockets};
use crate::{Cause, Config, ConfigError, PoolFigures, Snapshot, WatchedPool, catalog};

/// The `application_name` tags of the pools watched by a live [`PoolWatch`] in this process:
/// a pool is watched by at most one.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Pause before a census re-reads an unsettled or gapped reading.
const CENSUS_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

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
    let (options, tag) = {
        // Checked and tagged under one lock, so two racing calls cannot both succeed.
        let mut live = LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let options = pool.connect_options();
        let current = options.get_application_name();
        if current.is_some_and(|name| live.contains(name)) {
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
        let tag = Tag::new(current.map(crate::ledger::attribution::without_tag), &config.pool_name);
        pool.set_connect_options((*options).clone().application_name(&tag.pool_app_name));
        live.insert(tag.pool_app_name.clone());
        (options, tag)
    };
    // Take the idle, untagged connections now (no waiting, no ping) so the app cannot check
    // them out before the task re-tags them.
    let untagged: Vec<_> = std::iter::from_fn(|| pool.try_acquire()).take(pool.num_idle()).collect();
    let checked_out = pool.size().saturating_sub(u32::try_from(untagged.len()).unwrap_or(u32::MAX));
    if checked_out > 0 {
        tracing::warn!(
            pool = %config.pool_name,
            checked_out,
            "connections were checked out when the pool was instrumented; the census cannot see them \
             until they close, so poolwatch_phantom_connections reads that much high. \
             Call instrument_pool right after creating the pool."
        );
    }
    let shared = Arc::new(Shared {
        direct: tokio::sync::Mutex::new(DirectConnection::new(
            config.direct_connect_options.as_ref().map_or(&*options, |d| &d.0),
            &tag.census_app_name,
            config.census_timeout,
        )),
        heartbeat: Heartbeat::new(&config.pool_name),
        gauges: Gauges::new(&config.pool_name),
        reach: Reach::new(&config.pool_name),
        probe: Arc::new(Probe::new(pool, &config)),
        latest: Mutex::new(Snapshot { pool: PoolFigures::of(pool), ..Snapshot::default() }),
        untagged: Mutex::new(untagged),
        retagged: tokio::sync::OnceCell::new(),
        census_failing: AtomicBool::new(false),
        degraded_warned: AtomicBool::new(false),
        pool: pool.clone(),
        tag,
        config,
    });
    let (stop, stopped) = oneshot::channel();
    let task = runtime.spawn(run(Arc::clone(&shared), stopped));
    let (stop_heartbeat, heartbeat_stopped) = oneshot::channel();
    let s = Arc::clone(&shared);
    let heartbeat = runtime.spawn(async move {
        // Not before the idle connections are re-tagged and back in the pool.
        s.retagged.get_or_init(|| s.retag_idle()).await;
        let lint_app_name = s.tag.census_app_name.replacen("poolwatch-census:", "poolwatch-lint:", 1);
        s.heartbeat.run(&s.pool, &s.direct, &s.config, &lint_app_name, heartbeat_stopped).await
    });
    Ok(PoolWatch {
        shared,
        stop: Some(stop),
        task: Some(task),
        stop_heartbeat: Some(stop_heartbeat),
        heartbeat: Some(heartbeat),
    })
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

    /// The latest figures (from the last sample and census).
    pub fn snapshot(&self) -> Snapshot {
        self.shared.latest()
    }

    /// Takes a census now, publishes it, and returns the figures.
    pub async fn census_now(&self) -> Result<Snapshot, Cause> {
        self.shared.census().await
    }

    /// The watched pool handle: use it instead of the bare pool so acquires are timed and
    /// watched for leaks. Leak suspects are scanned for while this `PoolWatch` lives.
    pub fn pool(&self) -> WatchedPool {
        WatchedPool::new(Arc::clone(&self.shared.probe))
    }

    /// The `application_name` that marks this pool's connections on the server.
    pub fn application_name(&self) -> &str {
        &self.shared.tag.pool_app_name
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
    pool: PgPool,
    config: Config,
    tag: Tag,
    gauges: Gauges,
    reach: Reach,
    heartbeat: Heartbeat,
    probe: Arc<Probe>,
    direct: tokio::sync::Mutex<DirectConnection>,
    latest: Mutex<Snapshot>,
    untagged: Mutex<Vec<PoolConnection<Postgres>>>,
    retagged: tokio::sync::OnceCell<()>,
    census_failing: AtomicBool,
    degraded_warned: AtomicBool,
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

    fn sample(&self) {
        let figures = PoolFigures::of(&self.pool);
        self.gauges.pool(&figures);
        self.update(|s| s.pool = figures);
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
                self.gauges.census(&snapshot, seconds);
                self.update(|s| *s = snapshot.clone());
                Ok(snapshot)
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
        let mut direct = self.direct.lock().await;
        if self.pool.is_closed() {
            // Closed while waiting for the lock: the task has closed (or will close) the connection.
            return Err(Cause::PoolClosed);
        }
        let app_name = self.tag.pool_app_name.as_str();
        // Both sides must describe one moment. A connection being opened counts in the pool
        // before its session shows on the server; a closed one leaves its session for a few
        // ms. So a reading is taken again when the pool's count moved during the query, or
        // when it shows a gap: a real leak is still there 50 ms later, a transient is not.
        let mut attempt = 0;
        let (pool, server) = loop {
            let before = self.pool.size();
            let server = direct.run(async |c| census::take(c, app_name).await).await?;
            let pool = PoolFigures::of(&self.pool);
            attempt += 1;
            let settled = pool.open == before && pool.open == server.total();
            if settled || attempt == 3 {
                break (pool, server);
            }
            tokio::time::sleep(CENSUS_RECHECK).await;
        };
        if server.get("unknown") > 0 && !self.degraded_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pool = %self.config.pool_name,
                "the census role cannot read these sessions' state in pg_stat_activity; states show as \
                 `unknown` (counts stay exact). Grant it pg_read_all_stats for per-state figures."
            );
        }
        let sockets = match self.peers().await {
            Some(peers) => sockets::take(&peers, direct.local_port).ok(),
            None => None,
        };
        Ok(Snapshot {
            phantom: Some(i64::from(pool.open) - i64::from(server.total())),
            pool,
            server: Some(server),
            sockets,
            census_up: true,
        })
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

    /// Tags the connections that sat idle in the pool when it was instrumented, then returns
    /// them to the pool.
    async fn retag_idle(&self) {
        let mut held = self.untagged.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        for conn in &mut held {
            let set = sqlx::query("SELECT set_config('application_name', $1, false)")
                .bind(&self.tag.pool_app_name)
                .execute(&mut **conn);
            if !matches!(tokio::time::timeout(self.config.census_timeout, set).await, Ok(Ok(_))) {
                tracing::debug!(pool = %self.config.pool_name, "could not re-tag an idle connection");
            }
        }
        drop(held);
    }
}

async fn run(shared: Arc<Shared>, stop: oneshot::Receiver<()>) {
    watch_until_stopped(&shared, stop).await;
    // Stopped before the re-tag ran: give the idle connections back, or `pool.close()` waits.
    drop(shared.untagged.lock().map(|mut held| std::mem::take(&mut *held)));
    shared.direct.lock().await.close().await;
}

async fn watch_until_stopped(shared: &Shared, mut stop: oneshot::Receiver<()>) {
    let closed = shared.pool.close_event();
    tokio::pin!(closed);
    tokio::select! {
        _ = &mut stop => return,
        _ = &mut closed => return,
        _ = shared.retagged.get_or_init(|| shared.retag_idle()) => {}
    }
    let mut sample = tokio::time::interval(shared.config.sample_interval);
    let mut census = tokio::time::interval(shared.config.census_interval);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    census.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let scan_every = shared.probe.leaks.scan_every();
    let mut leak_scan = tokio::time::interval(scan_every.unwrap_or(std::time::Duration::from_secs(3600)));
    leak_scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = &mut closed => break,
            _ = sample.tick() => shared.sample(),
            _ = leak_scan.tick(), if scan_every.is_some() => { shared.probe.leaks.scan(); }
            _ = census.tick() => tokio::select! {
                _ = &mut stop => break,
                _ = &mut closed => break,
                _ = async {
                    let _ = shared.census().await;
                    // After the census; the probes' sockets are left out of any census by port (`OwnPort`).
                    shared.reach.run(&shared.pool.connect_options(), shared.config.census_timeout).await;
                } => {}
            },
        }
    }
}
