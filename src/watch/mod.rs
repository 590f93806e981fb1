//! [`instrument_pool`] and the [`PoolWatch`] handle that owns the background tasks.
//!
//! One sample travels one way: [`registration`] tags the pool, [`shared`] holds the parts,
//! [`cadence`] runs the loop, [`sample`] reads the pool and its sockets into one plain
//! figure, and `publish::pool` maps it to metrics in one call. A census goes the same way
//! through `ledger::census::settle`.

mod cadence;
mod registration;
mod sample;
mod shared;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::acquire::lifecycle::Published;
use crate::acquire::watched_pool::WatchedPool;
use crate::catalog;
use crate::cause::Cause;
use crate::config::{Config, ConfigError};
use crate::health::hazards::{Finding, ServerSettings};
use crate::health::heartbeat::HeartbeatFigures;
use crate::health::progress::Progress;
use crate::health::reach::Reachability;
use crate::health::report::{self, GapHealth, HealthReport, WaitHealth};
use crate::ledger::attribution::NetworkPath;
use crate::ledger::snapshot::LifecycleFigures;
use crate::ledger::snapshot::{PoolFigures, Snapshot};
use crate::schedule::Fault;
use cadence::{run, supervise_heartbeat};
use shared::Shared;

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
    let registered = registration::register(pool, &config)?;
    let shared = Arc::new(Shared::new(pool, config, registered)?);
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
    pub fn heartbeat(&self) -> HeartbeatFigures {
        self.shared.health.heartbeat.figures()
    }

    /// The configuration hazards found by the last lint (start-up, a periodic re-check, or the last reconnect of
    /// the dedicated connection). Empty before the first lint and on a clean setup.
    pub fn hazards(&self) -> Vec<Finding> {
        self.shared.health.heartbeat.hazards()
    }

    /// The server settings the last lint read (`None` before it could read them).
    pub fn server_settings(&self) -> Option<ServerSettings> {
        self.shared.health.heartbeat.server_settings()
    }

    /// Every address the database host resolved to at the last census tick and whether a TCP
    /// connect to each succeeded: see [`reach`](crate::health::reach).
    pub fn reachability(&self) -> Reachability {
        self.shared.health.reach.figures()
    }

    /// A plain health report for a readiness endpoint: `ok` / `degraded` / `failing`, the
    /// reasons and the figures behind them (see [`report`](crate::health::report)). No I/O: it reads
    /// what the background tasks last measured. With the `serde` feature it is `Serialize`.
    pub fn health(&self) -> HealthReport {
        let s = &self.shared;
        let latest = s.latest();
        let recent: Vec<i64> = s.state.gaps.lock().map(|g| g.iter().copied().collect()).unwrap_or_default();
        let (waiters, oldest) = s.acquire.probe.waiters();
        report::judge(report::Inputs {
            pool_name: s.config.pool_name.clone(),
            pool: PoolFigures::of(&s.pool),
            gap: GapHealth {
                phantom: latest.phantom,
                growing: report::growing(&recent),
                recent,
                census_up: latest.census_up,
            },
            heartbeat: s.health.heartbeat.figures(),
            listeners: crate::listener::status::of_pool(&s.config.pool_name),
            hazards: s.health.heartbeat.hazards(),
            stranded: s.acquire.stranded.figure(),
            lifecycle: self.lifecycle(),
            send_queue_stuck: s.ledger.send_queues.figure(),
            waits: WaitHealth { waiters, oldest_wait_seconds: oldest.as_secs_f64() },
            reach: s.health.reach.figures(),
            liveness: report::Liveness {
                ages: s.health.liveness.ages(s.heartbeat_count()),
                limits: crate::health::liveness::Limits::of(&s.config),
            },
        })
    }

    /// Connections opened, closed by reason, and the oldest one's age, counted up to now;
    /// `None` unless the pool was built with
    /// [`instrument_options_named`](crate::acquire::bare::instrument_options_named) under this pool's name.
    pub fn lifecycle(&self) -> Option<LifecycleFigures> {
        self.shared.acquire.lifecycle.as_ref().map(Published::read)
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
        WatchedPool::new(Arc::clone(&self.shared.acquire.probe))
    }

    /// The `application_name` that marks this pool's connections on the server: the stable
    /// [`stable_tag`](crate::ledger::attribution::stable_tag) (a per-process nonce only where ports
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
    /// [`fleet_tag`](crate::ledger::attribution::fleet_tag).
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
        let [watch, heartbeat] = &self.shared.state.faults;
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

    /// A handle the app ticks per unit of work done with this pool: see [`Progress`](crate::health::progress::Progress).
    pub fn progress(&self) -> Progress {
        Progress::new(&self.shared.config.pool_name)
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
        registration::unregister(&self.shared.tag.pool_app_name);
        // Dropping the senders wakes the tasks; the census task closes its connection and ends.
        self.stop_heartbeat.take();
        self.stop.take();
    }
}
