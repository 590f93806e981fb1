//! The watch's parts, shared by its handle and its background tasks, and the census as the
//! watch runs and publishes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::PgPool;
use tracing::Instrument;

use crate::acquire::probe::Probe;
use crate::acquire::stranded::Stranded;
use crate::cause::Cause;
use crate::config::{Config, ConfigError};
use crate::direct::DirectConnection;
use crate::gauges::{Gauges, PoolerGauges};
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
use crate::schedule;
use crate::watch::registration::Registered;

/// How many censuses' gaps the health report looks at for a trend.
pub(super) const GAP_READINGS: usize = 5;

#[derive(Debug)]
pub(super) struct Shared {
    /// The lifecycle figures, when the pool's options carry `instrument_options_named`'s hooks.
    pub(super) lifecycle: Option<crate::acquire::lifecycle::Published>,
    pub(super) pool: PgPool,
    pub(super) config: Config,
    pub(super) tag: Tag,
    pub(super) gauges: Gauges,
    pub(super) reach: Reach,
    pub(super) stranded: Stranded,
    pub(super) send_queues: StuckSendQueues,
    /// The phantom gap at the last censuses, oldest first (at most [`GAP_READINGS`]).
    pub(super) gaps: Mutex<std::collections::VecDeque<i64>>,
    pub(super) heartbeat: Heartbeat,
    pub(super) probe: Arc<Probe>,
    pub(super) direct: tokio::sync::Mutex<DirectConnection>,
    pub(super) client: ClientLedger,
    /// Woken when the client-side ledger disagrees with the pool: a census runs at once.
    pub(super) census_wanted: tokio::sync::Notify,
    /// The (client gap, unattributed sockets) that last woke a census.
    pub(super) disagreement: Mutex<(i64, u32)>,
    pub(super) latest: Mutex<Snapshot>,
    pub(super) untagged: Mutex<Untagged>,
    pub(super) retagged: tokio::sync::OnceCell<()>,
    pub(super) census_failing: AtomicBool,
    /// When the tasks last completed a sample, census and heartbeat.
    pub(super) liveness: Liveness,
    /// Test-only faults of the watch task (`[0]`) and the heartbeat task (`[1]`).
    pub(super) faults: [schedule::Faults; 2],
    pub(super) warned: Warned,
    pub(super) path: NetworkPath,
    /// Sessions are matched to this process by client address and port (no nonce).
    pub(super) by_port: bool,
    pub(super) pooler: Option<tokio::sync::Mutex<PoolerConnection>>,
    pub(super) pooler_gauges: Option<PoolerGauges>,
    /// The pooler's `client_idle_timeout` the last census read: a sample needs it without
    /// waiting for the admin connection a census may hold.
    pub(super) client_idle_timeout: Mutex<Option<std::time::Duration>>,
    pub(super) ended: Mutex<Ledger>,
}

impl Shared {
    /// The watch's parts for `pool`, registered as `registered`.
    pub(super) fn new(pool: &PgPool, config: Config, registered: Registered) -> Result<Shared, ConfigError> {
        let Registered { tag, path, nonce } = registered;
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
        let client = ClientLedger::new(Arc::clone(&direct.port_cell));
        let gauges = Gauges::new(&config.pool_name, config.detail);
        gauges.info(&tag.stable);
        Ok(Shared {
            direct: tokio::sync::Mutex::new(direct),
            client,
            census_wanted: tokio::sync::Notify::new(),
            disagreement: Mutex::new((0, 0)),
            heartbeat: Heartbeat::new(&config.pool_name, config.detail),
            gauges,
            pooler_gauges: pooler.as_ref().map(|_| PoolerGauges::new(&config.pool_name)),
            client_idle_timeout: Mutex::new(None),
            pooler,
            path,
            by_port: !nonce,
            ended: Mutex::new(Ledger::default()),
            reach: Reach::new(&config.pool_name, config.detail),
            stranded: Stranded::new(&config.pool_name, config.detail),
            send_queues: StuckSendQueues::new(&config.pool_name, config.send_queue_stuck_after, config.detail),
            gaps: Mutex::new(std::collections::VecDeque::new()),
            probe: Arc::new(Probe::new(pool, &config)),
            lifecycle: crate::acquire::bare::lifecycle_of(&config.pool_name).map(|ledger| {
                crate::acquire::lifecycle::Published::new(pool, &config.pool_name, config.detail, ledger)
            }),
            latest: Mutex::new(Snapshot { pool: PoolFigures::of(pool), ..Snapshot::default() }),
            untagged: Mutex::new(untagged),
            retagged: tokio::sync::OnceCell::new(),
            census_failing: AtomicBool::new(false),
            liveness: Liveness::new(&config.pool_name),
            faults: [schedule::Faults::default(), schedule::Faults::default()],
            warned: Warned::default(),
            pool: pool.clone(),
            tag,
            config,
        })
    }

    pub(super) fn latest(&self) -> Snapshot {
        self.latest.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.latest.lock() {
            f(&mut s);
        }
    }

    /// Connect trouble seen since the last reachability probe (census or heartbeat connect
    /// failures, acquire errors, slow creates).
    pub(super) fn connect_trouble(&self) -> u64 {
        let hb = self.heartbeat.figures();
        let census = u64::from(self.census_failing.load(Ordering::Relaxed));
        [hb.pool.failures, hb.direct.failures, census]
            .into_iter()
            .fold(self.probe.trouble.load(Ordering::Relaxed), u64::saturating_add)
    }

    /// Probes the reachability of the pool's host now.
    pub(super) async fn probe_reach(&self) {
        let options = self.pool.connect_options();
        self.reach.run_now(self.connect_trouble(), &options, self.config.census_timeout).await;
    }

    /// Heartbeats run so far, both paths, successes and failures.
    pub(super) fn heartbeat_count(&self) -> u64 {
        let hb = self.heartbeat.figures();
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
                // Computed by the census, published here.
                let sessions_ended = self.gauges.sessions_ended(&reading.ended);
                if let (Some(g), Some(figures)) = (&self.pooler_gauges, &reading.snapshot.pooler) {
                    g.set(figures);
                }
                if let (Some(t), Ok(mut known)) = (reading.client_idle_timeout, self.client_idle_timeout.lock()) {
                    *known = Some(t);
                }
                let snapshot = Snapshot { sessions_ended, ..reading.snapshot };
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

    async fn take_census(&self) -> Result<Reading, Cause> {
        self.retagged.get_or_init(|| self.retag_idle()).await;
        let result = self.census_parts().take().await;
        if result.is_err()
            && let Ok(mut ended) = self.ended.lock()
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
            direct: &self.direct,
            pooler: self.pooler.as_ref(),
            client: &self.client,
            ended: &self.ended,
            warned: &self.warned,
            idle_session_timeout: self.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
        }
    }

    /// Tags the connections the pool opened before it was instrumented (see
    /// [`retag`](crate::ledger::retag)), then returns them to the pool.
    pub(super) async fn retag_idle(&self) {
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
