//! The watch's parts, shared by its handle and its background tasks, and the census as the
//! watch runs and publishes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::PgPool;
use tracing::Instrument;

use crate::acquire::lifecycle::Published;
use crate::acquire::probe::Probe;
use crate::acquire::stranded::Stranded;
use crate::cause::Cause;
use crate::config::{Config, ConfigError};
use crate::direct::DirectConnection;
use crate::health::heartbeat::Heartbeat;
use crate::health::liveness::Liveness;
use crate::health::reach::Reach;
use crate::ledger::attribution::{NetworkPath, Tag};
use crate::ledger::census::settle::{Census, Reading, Warned};
use crate::ledger::client::ClientLedger;
use crate::ledger::ended::Ledger;
use crate::ledger::pooler::PoolerConnection;
use crate::ledger::retag::{self, Untagged};
use crate::ledger::send_queues::StuckSendQueues;
use crate::ledger::snapshot::{PoolFigures, Snapshot};
use crate::publish::health::Probed;
use crate::publish::pool::{CensusFigures, PoolMetrics};
use crate::schedule;
use crate::watch::registration::Registered;

/// How many censuses' gaps the health report looks at for a trend.
pub(super) const GAP_READINGS: usize = 5;

/// A watched pool's parts, grouped by the layer that owns them.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) pool: PgPool,
    pub(super) config: Config,
    pub(super) tag: Tag,
    pub(super) path: NetworkPath,
    /// Sessions are matched to this process by client address and port (no nonce).
    pub(super) by_port: bool,
    /// Every metric of the pool's watch (the publishing layer).
    pub(super) metrics: PoolMetrics,
    pub(super) acquire: AcquireParts,
    pub(super) health: HealthParts,
    pub(super) ledger: LedgerParts,
    pub(super) state: WatchState,
}

/// The acquire path's parts (`acquire/`): what the app's acquires feed.
#[derive(Debug)]
pub(super) struct AcquireParts {
    pub(super) probe: Arc<Probe>,
    pub(super) stranded: Stranded,
    /// The lifecycle ledger, when the pool's options carry `instrument_options_named`'s hooks.
    pub(super) lifecycle: Option<Published>,
}

/// The health parts (`health/`): heartbeats and lint, reachability, the tasks' liveness.
#[derive(Debug)]
pub(super) struct HealthParts {
    pub(super) heartbeat: Heartbeat,
    pub(super) reach: Reach,
    /// When the tasks last completed a sample, census and heartbeat.
    pub(super) liveness: Liveness,
}

/// The ledger's parts (`ledger/`): what a census and a sample read with.
#[derive(Debug)]
pub(super) struct LedgerParts {
    pub(super) direct: tokio::sync::Mutex<DirectConnection>,
    pub(super) client: ClientLedger,
    pub(super) pooler: Option<tokio::sync::Mutex<PoolerConnection>>,
    /// The pooler's `client_idle_timeout` the last census read: a sample needs it without
    /// waiting for the admin connection a census may hold.
    pub(super) client_idle_timeout: Mutex<Option<std::time::Duration>>,
    pub(super) ended: Mutex<Ledger>,
    pub(super) send_queues: StuckSendQueues,
    pub(super) untagged: Mutex<Untagged>,
    pub(super) retagged: tokio::sync::OnceCell<()>,
    pub(super) warned: Warned,
}

/// The watch's own state (`watch/`): the latest figures and what the loop decides on.
#[derive(Debug)]
pub(super) struct WatchState {
    pub(super) latest: Mutex<Snapshot>,
    /// The phantom gap at the last censuses, oldest first (at most [`GAP_READINGS`]).
    pub(super) gaps: Mutex<std::collections::VecDeque<i64>>,
    /// Woken when the client-side ledger disagrees with the pool: a census runs at once.
    pub(super) census_wanted: tokio::sync::Notify,
    /// The (client gap, unattributed sockets) that last woke a census.
    pub(super) disagreement: Mutex<(i64, u32)>,
    pub(super) census_failing: AtomicBool,
    /// A sample since the last census found the client-side ledger missing or not agreeing
    /// with the pool (see [`Shared::ledger_confirmed_since_census`]).
    pub(super) ledger_doubt: AtomicBool,
    /// A sample since the last census found the client-side ledger agreeing with the pool.
    pub(super) ledger_agreed: AtomicBool,
    /// The app held a connection at the last sample.
    pub(super) held: AtomicBool,
    /// Sessions that ended without the pool closing them, counted by censuses and samples.
    pub(super) sessions_ended: AtomicU64,
    /// Test-only faults of the watch task (`[0]`) and the heartbeat task (`[1]`).
    pub(super) faults: [schedule::Faults; 2],
}

impl Shared {
    /// The watch's parts for `pool`, registered as `registered`.
    pub(super) fn new(pool: &PgPool, config: Config, registered: Registered) -> Result<Shared, ConfigError> {
        let Registered { tag, path, nonce } = registered;
        let lifecycle = crate::acquire::bare::lifecycle_of(&config.pool_name).map(|l| Published::new(pool, l));
        let ledger = LedgerParts::new(pool, &config, &tag)?;
        let metrics = PoolMetrics::new(
            &config.pool_name,
            config.detail,
            &tag.stable,
            (lifecycle.is_some(), ledger.pooler.is_some()),
            crate::health::reach::MAX_SERIES,
        );
        Ok(Shared {
            metrics,
            ledger,
            acquire: AcquireParts { probe: Arc::new(Probe::new(pool, &config)), stranded: Stranded::new(), lifecycle },
            health: HealthParts {
                heartbeat: Heartbeat::new(&config.pool_name, config.detail),
                reach: Reach::new(&config.pool_name),
                liveness: Liveness::new(&config.pool_name),
            },
            state: WatchState {
                latest: Mutex::new(Snapshot { pool: PoolFigures::of(pool), ..Snapshot::default() }),
                gaps: Mutex::new(std::collections::VecDeque::new()),
                census_wanted: tokio::sync::Notify::new(),
                disagreement: Mutex::new((0, 0)),
                census_failing: AtomicBool::new(false),
                ledger_doubt: AtomicBool::new(false),
                ledger_agreed: AtomicBool::new(false),
                held: AtomicBool::new(false),
                sessions_ended: AtomicU64::new(0),
                faults: [schedule::Faults::default(), schedule::Faults::default()],
            },
            path,
            by_port: !nonce,
            pool: pool.clone(),
            tag,
            config,
        })
    }

    /// Counts `n` more sessions ended without the pool closing them; returns the total.
    pub(super) fn count_ended(&self, n: usize) -> u64 {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.state.sessions_ended.fetch_add(n, Ordering::Relaxed).saturating_add(n)
    }

    pub(super) fn latest(&self) -> Snapshot {
        self.state.latest.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.state.latest.lock() {
            f(&mut s);
        }
    }

    /// Connect trouble seen since the last reachability probe (census or heartbeat connect
    /// failures, acquire errors, slow creates).
    pub(super) fn connect_trouble(&self) -> u64 {
        let hb = self.health.heartbeat.figures();
        let census = u64::from(self.state.census_failing.load(Ordering::Relaxed));
        [hb.pool.failures, hb.direct.failures, census]
            .into_iter()
            .fold(self.acquire.probe.trouble.load(Ordering::Relaxed), u64::saturating_add)
    }

    /// What one sample tells the census schedule: whether the client-side ledger confirmed
    /// the pool (a socket per connection, none unattributed, no session ended, no connection
    /// held by the app over two samples). Behind a pooler the sockets end at the pooler,
    /// so they confirm nothing about the server's sessions.
    pub(super) fn ledger_sampled(&self, confirmed: bool) {
        let confirmed = confirmed && self.path != NetworkPath::Pooler;
        let flag = if confirmed { &self.state.ledger_agreed } else { &self.state.ledger_doubt };
        flag.store(true, Ordering::Relaxed);
    }

    /// Whether at least one sample ran since the last call and every one confirmed the pool
    /// (see [`Shared::ledger_sampled`]); starts over. Off Linux and on a unix socket there is
    /// no client-side ledger: never.
    pub(super) fn ledger_confirmed_since_census(&self) -> bool {
        let doubt = self.state.ledger_doubt.swap(false, Ordering::Relaxed);
        let agreed = self.state.ledger_agreed.swap(false, Ordering::Relaxed);
        agreed && !doubt
    }

    /// Probes the reachability of the pool's host now; returns whether the probe was clean:
    /// no connect trouble since the last probe and every address up (a unix socket, which is
    /// never probed, counts as clean).
    pub(super) async fn probe_reach(&self) -> bool {
        let options = self.pool.connect_options();
        let trouble = self.connect_trouble();
        let calm = !self.health.reach.wanted(trouble, std::time::Duration::MAX);
        let reach = self.health.reach.run_now(trouble, &options, self.config.census_timeout).await;
        let clean = calm && !self.health.reach.any_down();
        if let Some(reach) = reach {
            let probed: Vec<Probed> = reach
                .addresses
                .iter()
                .map(|a| Probed { address: a.address, up: a.up, connect_time: a.connect_time })
                .collect();
            self.metrics.reach.publish(reach.resolved, &probed);
        }
        clean
    }

    /// Heartbeats run so far, both paths, successes and failures.
    pub(super) fn heartbeat_count(&self) -> u64 {
        let hb = self.health.heartbeat.figures();
        [hb.pool.failures, hb.direct.successes, hb.direct.failures]
            .into_iter()
            .fold(hb.pool.successes, u64::saturating_add)
    }

    pub(super) async fn census(&self) -> Result<Snapshot, Cause> {
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
            Ok(reading) => {
                // Computed by the census, published here in one call.
                let sessions_ended = self.count_ended(reading.ended.len());
                if let (Some(t), Ok(mut known)) = (reading.client_idle_timeout, self.ledger.client_idle_timeout.lock())
                {
                    *known = Some(t);
                }
                let snapshot = Snapshot { sessions_ended, ..reading.snapshot };
                if self.state.census_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(pool = %self.config.pool_name, "poolwatch census recovered");
                }
                self.health.liveness.census_done();
                self.metrics.census(&CensusFigures {
                    snapshot: &snapshot,
                    ended: &reading.ended,
                    pooler: snapshot.pooler.as_ref(),
                    seconds,
                });
                self.acquire.probe.census_seen(&snapshot);
                if let (Some(p), Ok(mut gaps)) = (snapshot.phantom, self.state.gaps.lock()) {
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
                if !self.state.census_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pool = %self.config.pool_name, %cause, "poolwatch census failed; figures are stale until it recovers");
                }
                self.metrics.census_failed(cause, seconds);
                self.update(|s| s.census_up = false);
                Err(cause)
            }
        }
    }

    async fn take_census(&self) -> Result<Reading, Cause> {
        self.ledger.retagged.get_or_init(|| self.retag_idle()).await;
        let result = self.census_parts().take().await;
        if result.is_err()
            && let Ok(mut ended) = self.ledger.ended.lock()
        {
            ended.forget();
        }
        result
    }

    /// What a census reads with.
    fn census_parts(&self) -> Census<'_> {
        Census {
            pool: &self.pool,
            pool_name: &self.config.pool_name,
            tag: &self.tag,
            path: self.path,
            by_port: self.by_port,
            replicas: self.config.deployment.replicas,
            timeout: self.config.census_timeout,
            direct: &self.ledger.direct,
            pooler: self.ledger.pooler.as_ref(),
            client: &self.ledger.client,
            ended: &self.ledger.ended,
            warned: &self.ledger.warned,
            idle_session_timeout: self.health.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
        }
    }

    /// Tags the connections the pool opened before it was instrumented (see
    /// [`retag`](crate::ledger::retag)), then returns them to the pool.
    pub(super) async fn retag_idle(&self) {
        let untagged = self.ledger.untagged.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
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

impl LedgerParts {
    fn new(pool: &PgPool, config: &Config, tag: &Tag) -> Result<LedgerParts, ConfigError> {
        let pooler = match &config.deployment.pooler_admin {
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
        let source = match &config.deployment.direct_connect_options {
            Some(d) => crate::direct::Source::Declared(Box::new(d.0.clone())),
            None => crate::direct::Source::Pool(pool.clone()),
        };
        let mut direct = DirectConnection::new(source, &tag.census_app_name, config.census_timeout);
        direct.verify_tag = Some(tag.pool_app_name.clone());
        Ok(LedgerParts {
            client: ClientLedger::new(Arc::clone(&direct.port_cell)),
            direct: tokio::sync::Mutex::new(direct),
            pooler,
            client_idle_timeout: Mutex::new(None),
            ended: Mutex::new(Ledger::default()),
            send_queues: StuckSendQueues::new(config.send_queue_stuck_after),
            untagged: Mutex::new(untagged),
            retagged: tokio::sync::OnceCell::new(),
            warned: Warned::default(),
        })
    }
}
