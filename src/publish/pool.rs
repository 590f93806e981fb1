//! What one watched pool publishes: its handles, registered once with the pool label, and
//! the figures of one sample ([`SampleFigures`]) and one census ([`CensusFigures`]), each
//! published in one call.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};

use super::health::ReachMetrics;
use super::{LazyGauge, by_state};
use crate::catalog::{self, APPLICATION_NAME, CAUSE, CONNECTION_STATE, POOL_NAME, STATE};
use crate::cause::Cause;
use crate::config::Detail;
use crate::ledger::census::SESSION_STATES;
use crate::ledger::pooler::PoolerFigures;
use crate::ledger::snapshot::{CloseReason, LifecycleFigures, PoolFigures, Snapshot};
use crate::ledger::sockets::{SocketCensus, TCP_STATES};

/// Session states whose count is exported from the start at [`Detail::Standard`] (the others
/// once seen non-zero): the dashboard's ledger.
const EAGER_SESSION_STATES: &[&str] = &["idle", "active"];
/// Session states whose longest time is exported from the start at [`Detail::Standard`]:
/// what `PoolwatchTransactionStuck` and `PoolwatchWorkStalled` read.
const EAGER_LONGEST_STATES: &[&str] = &["idle_in_transaction", "active"];
/// The only session states whose longest time exists at [`Detail::Standard`] (the alerts'
/// states; an idle session's age is a lifecycle figure, not a hazard).
const STANDARD_LONGEST_STATES: &[&str] = &["idle_in_transaction", "idle_in_transaction_aborted", "active"];
/// TCP states exported from the start at [`Detail::Standard`]: the dashboard's socket count.
const EAGER_TCP_STATES: &[&str] = &["established"];
/// The only TCP states at [`Detail::Standard`]: `close_wait` (what
/// `PoolwatchClientSocketsCloseWait` reads, `> 0`) appears once seen; the rest are Full's.
const STANDARD_TCP_STATES: &[&str] = &["established", "close_wait"];

/// What one sample measured, computed by the watch's sampler with no side effect.
#[derive(Debug, Default)]
pub(crate) struct SampleFigures<'a> {
    pub(crate) pool: PoolFigures,
    /// The lifecycle ledger's figures (with the hooks only).
    pub(crate) lifecycle: Option<LifecycleFigures>,
    /// The oldest waiting acquire's wait (`None`: not read, while a lint runs).
    pub(crate) oldest_wait: Option<Duration>,
    /// Stranded slots, once judged (see [`stranded`](crate::acquire::stranded)).
    pub(crate) stranded: Option<u32>,
    /// The pool's sockets and the client-side gap (absent for a unix socket or off Linux).
    pub(crate) sockets: Option<(&'a SocketCensus, i64)>,
    /// Sockets whose send queue never drained (read with the sockets).
    pub(crate) stuck_send_queues: Option<u32>,
    /// Sessions that ended without the pool closing them, seen by this sample.
    pub(crate) ended: &'a [Cause],
}

/// What one census measured, computed by `ledger::census` with no side effect.
#[derive(Debug)]
pub(crate) struct CensusFigures<'a> {
    pub(crate) snapshot: &'a Snapshot,
    /// Sessions that ended without the pool closing them, attributed by this census.
    pub(crate) ended: &'a [Cause],
    pub(crate) pooler: Option<&'a PoolerFigures>,
    pub(crate) seconds: f64,
}

/// The handles of one watched pool.
#[derive(Debug)]
pub(crate) struct PoolMetrics {
    pool_name: String,
    detail: Detail,
    used: Gauge,
    idle: Gauge,
    max: Gauge,
    min: Gauge,
    census_up: Gauge,
    /// Registered at the first census attempt: no duration before one ran.
    census_duration: OnceLock<Gauge>,
    /// Registered at the first successful census: a figure nobody has measured yet is absent
    /// from `/metrics`, not 0 (a 0 phantom count would read "healthy").
    measured: OnceLock<Measured>,
    /// Registered at the first sample that read the pool's sockets (absent for a unix socket
    /// or off Linux): `poolwatch_client_sockets` by state and `poolwatch_client_gap`.
    client: OnceLock<(Vec<LazyGauge>, Gauge)>,
    /// At `Detail::Standard`: from the first acquire that waits (the series budget).
    oldest_wait: LazyGauge,
    /// At `Detail::Standard`: from the first stranded slot.
    stranded: LazyGauge,
    /// At `Detail::Standard`: from the first stuck send queue.
    send_queue_stuck: LazyGauge,
    lifecycle: Option<LifecycleMetrics>,
    pooler: Option<PoolerGauges>,
    pub(crate) reach: ReachMetrics,
}

/// The lifecycle figures' handles: the oldest age always, the closes by reason (at 0 from the
/// start) at [`Detail::Full`] (the series budget of `Detail::Standard`). The opens are
/// `poolwatch_pool_connects_total`, counted by the hook itself.
#[derive(Debug)]
struct LifecycleMetrics {
    oldest: Gauge,
    closed: Option<[Counter; 4]>,
}

impl PoolMetrics {
    /// The handles of `pool_name`, tagged `fleet_tag` on the server; `lifecycle` when its
    /// options carry the hooks, `pooler` when a pooler admin console is declared; at most
    /// `reach_cap` addresses get reachability series.
    pub(crate) fn new(
        pool_name: &str,
        detail: Detail,
        fleet_tag: &str,
        (lifecycle, pooler): (bool, bool),
        reach_cap: usize,
    ) -> PoolMetrics {
        let p = pool_name.to_owned();
        let full = detail == Detail::Full;
        let state = |name: &'static str, key: &'static str, value: &'static str| gauge!(name, POOL_NAME => p.clone(), key => value);
        let plain = |name: &'static str| gauge!(name, POOL_NAME => p.clone());
        let lazy = |name: &'static str| LazyGauge::new(name, vec![(POOL_NAME, p.clone())], full);
        let lifecycle = lifecycle.then(|| LifecycleMetrics {
            oldest: plain(catalog::CONNECTION_OLDEST_AGE.name),
            closed: full.then(|| {
                CloseReason::ALL.map(|r| {
                    let c = counter!(catalog::CONNECTIONS_CLOSED.name, POOL_NAME => p.clone(), catalog::REASON => r.as_str());
                    c.absolute(0);
                    c
                })
            }),
        });
        if let Some(l) = &lifecycle {
            l.oldest.set(0.0);
        }
        let metrics = PoolMetrics {
            used: state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "used"),
            idle: state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "idle"),
            max: plain(catalog::CONNECTION_MAX.name),
            min: plain(catalog::CONNECTION_IDLE_MIN.name),
            census_up: plain(catalog::CENSUS_UP.name),
            census_duration: OnceLock::new(),
            measured: OnceLock::new(),
            client: OnceLock::new(),
            oldest_wait: lazy(catalog::OLDEST_WAIT.name),
            stranded: LazyGauge::new(catalog::STRANDED_SLOTS.name, vec![(POOL_NAME, p.clone())], false),
            send_queue_stuck: lazy(catalog::SEND_QUEUE_STUCK.name),
            lifecycle,
            pooler: pooler.then(|| PoolerGauges::new(pool_name)),
            reach: ReachMetrics::new(pool_name, detail, reach_cap),
            pool_name: p,
            detail,
        };
        for cause in ENDED_AT_ZERO {
            metrics.ended(cause).absolute(0);
        }
        gauge!(catalog::POOL_INFO.name, POOL_NAME => metrics.pool_name.clone(), APPLICATION_NAME => fleet_tag.to_owned())
            .set(1);
        metrics
    }

    /// Publishes one sample.
    pub(crate) fn sample(&self, f: &SampleFigures<'_>) {
        self.pool(&f.pool);
        if let Some(l) = &f.lifecycle {
            self.lifecycle(l);
        }
        if let Some(wait) = f.oldest_wait {
            self.oldest_wait.set(wait.as_secs_f64());
        }
        if let Some(n) = f.stranded {
            // `Detail::Full`: the series exists (at 0) from the first judged figure on.
            if self.detail == Detail::Full {
                self.stranded.set_registered(f64::from(n));
            } else {
                self.stranded.set(f64::from(n));
            }
        }
        if let Some(n) = f.stuck_send_queues {
            self.send_queue_stuck.set(f64::from(n));
        }
        if let Some((sockets, gap)) = f.sockets {
            self.sockets(sockets, gap);
        }
        self.sessions_ended(f.ended);
    }

    /// Publishes the lifecycle figures (also while a closed pool drains).
    pub(crate) fn lifecycle(&self, f: &LifecycleFigures) {
        let Some(l) = &self.lifecycle else { return };
        l.oldest.set(f.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        if let Some(closed) = &l.closed {
            for (c, n) in closed.iter().zip(f.closed) {
                c.absolute(n);
            }
        }
    }

    /// Counts sessions of the pool that ended without the pool closing them.
    fn sessions_ended(&self, causes: &[Cause]) {
        for cause in causes {
            self.ended(*cause).increment(1);
        }
    }

    fn ended(&self, cause: Cause) -> Counter {
        counter!(catalog::SESSIONS_ENDED.name, POOL_NAME => self.pool_name.clone(), CAUSE => cause.as_str())
    }

    fn census_duration(&self) -> &Gauge {
        self.census_duration.get_or_init(|| gauge!(catalog::CENSUS_DURATION.name, POOL_NAME => self.pool_name.clone()))
    }

    fn pool(&self, f: &PoolFigures) {
        self.used.set(f.used);
        self.idle.set(f.idle);
        self.max.set(f.max);
        self.min.set(f.min);
    }

    /// Publishes the client-side ledger of one sample.
    fn sockets(&self, sockets: &SocketCensus, gap: i64) {
        let (by_state, client_gap) = self.client.get_or_init(|| {
            let p = &self.pool_name;
            let by_state = by_state(
                catalog::CLIENT_SOCKETS.name,
                p,
                STATE,
                &TCP_STATES,
                (EAGER_TCP_STATES, Some(STANDARD_TCP_STATES)),
                self.detail,
            );
            (by_state, gauge!(catalog::CLIENT_GAP.name, POOL_NAME => p.clone()))
        });
        for (g, n) in by_state.iter().zip(sockets.counts) {
            g.set(f64::from(n));
        }
        client_gap.set(gap as f64);
    }

    /// Publishes a successful census.
    pub(crate) fn census(&self, f: &CensusFigures<'_>) {
        self.sessions_ended(f.ended);
        if let (Some(g), Some(figures)) = (&self.pooler, f.pooler) {
            g.set(figures);
        }
        let s = f.snapshot;
        self.pool(&s.pool);
        let m = self.measured.get_or_init(|| Measured::new(&self.pool_name, self.detail));
        if let Some(server) = &s.server {
            for (g, n) in m.server.iter().zip(server.counts) {
                g.set(f64::from(n));
            }
            for (g, d) in m.longest.iter().zip(server.longest) {
                g.set(d.as_secs_f64());
            }
            m.lock_waiters.set(f64::from(server.lock_waiters));
            m.advisory_locks.set(f64::from(server.advisory_locks));
            m.advisory_locks_max.set(f64::from(server.advisory_locks_max_per_session));
        }
        if let Some(phantom) = s.phantom {
            let p = &self.pool_name;
            m.phantom
                .get_or_init(|| gauge!(catalog::PHANTOM_CONNECTIONS.name, POOL_NAME => p.clone()))
                .set(phantom as f64);
        }
        self.census_up.set(1);
        self.census_duration().set(f.seconds);
    }

    /// Publishes a failed census.
    pub(crate) fn census_failed(&self, cause: Cause, seconds: f64) {
        self.census_up.set(0);
        self.census_duration().set(seconds);
        counter!(catalog::CENSUS_ERRORS.name, POOL_NAME => self.pool_name.clone(), CAUSE => cause.as_str())
            .increment(1);
    }

    /// Counts a restart of the watch's `task` after a panic.
    pub(crate) fn task_restarted(&self, task: &'static str) {
        counter!(catalog::TASK_RESTARTS.name, POOL_NAME => self.pool_name.clone(), catalog::TASK => task).increment(1);
    }
}

/// The census-derived gauges; at [`Detail::Standard`] the state families register their
/// always-needed values at the first census and the others once seen non-zero.
#[derive(Debug)]
struct Measured {
    server: Vec<LazyGauge>,
    longest: Vec<LazyGauge>,
    /// At `Detail::Standard` registered at the first waiter (the alerts read `> 0`).
    lock_waiters: LazyGauge,
    advisory_locks: LazyGauge,
    advisory_locks_max: LazyGauge,
    /// Only once a census gives a gap (behind a pooler without its console it never does).
    phantom: std::sync::OnceLock<Gauge>,
}

impl Measured {
    fn new(p: &str, detail: Detail) -> Measured {
        let sessions = |name, eager| by_state(name, p, STATE, &SESSION_STATES, eager, detail);
        Measured {
            server: sessions(catalog::SERVER_CONNECTIONS.name, (EAGER_SESSION_STATES, None)),
            longest: sessions(
                catalog::SERVER_LONGEST_IN_STATE.name,
                (EAGER_LONGEST_STATES, Some(STANDARD_LONGEST_STATES)),
            ),
            lock_waiters: LazyGauge::new(
                catalog::SERVER_LOCK_WAITERS.name,
                vec![(POOL_NAME, p.to_owned())],
                detail == Detail::Full,
            ),
            // Standard detail: once a session held an advisory lock.
            advisory_locks: LazyGauge::new(
                catalog::SERVER_ADVISORY_LOCKS.name,
                vec![(POOL_NAME, p.to_owned())],
                detail == Detail::Full,
            ),
            // Standard detail: once a session held an advisory lock.
            advisory_locks_max: LazyGauge::new(
                catalog::SERVER_ADVISORY_LOCKS_MAX.name,
                vec![(POOL_NAME, p.to_owned())],
                detail == Detail::Full,
            ),
            phantom: std::sync::OnceLock::new(),
        }
    }
}

/// The causes whose `poolwatch_sessions_ended_total` series exist at 0 from the start: the one
/// the alert reads with `increase()` (pooler kills) and the commonest server kill; any other
/// cause's series appears at its first count (the series budget).
const ENDED_AT_ZERO: [Cause; 2] = [Cause::AdminShutdown, Cause::PoolerIdleTimeout];

/// The pooler's view of the pool: four series, only when a pooler admin console is declared.
#[derive(Debug)]
struct PoolerGauges {
    waiting: Gauge,
    max_wait: Gauge,
    active: Gauge,
    idle: Gauge,
}

impl PoolerGauges {
    fn new(pool_name: &str) -> PoolerGauges {
        let p = || pool_name.to_owned();
        PoolerGauges {
            waiting: gauge!(catalog::POOLER_WAITING_CLIENTS.name, POOL_NAME => p()),
            max_wait: gauge!(catalog::POOLER_MAX_WAIT.name, POOL_NAME => p()),
            active: gauge!(catalog::POOLER_SERVER_CONNECTIONS.name, POOL_NAME => p(), STATE => "active"),
            idle: gauge!(catalog::POOLER_SERVER_CONNECTIONS.name, POOL_NAME => p(), STATE => "idle"),
        }
    }

    fn set(&self, f: &PoolerFigures) {
        self.waiting.set(f.waiting_clients);
        self.max_wait.set(f.max_wait.as_secs_f64());
        self.active.set(f.servers_active);
        self.idle.set(f.servers_idle);
    }
}
