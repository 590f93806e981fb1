//! The metric handles of one watched pool, registered once with the pool label.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge};

use crate::catalog::{self, APPLICATION_NAME, CAUSE, CONNECTION_STATE, POOL_NAME, STATE};
use crate::ledger::census::SESSION_STATES;
use crate::ledger::sockets::{SocketCensus, TCP_STATES};
use crate::{cause::Cause, config::Detail, ledger::snapshot::PoolFigures, ledger::snapshot::Snapshot};

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

/// A gauge registered at the first non-zero value (or at once when `eager`): keeps a family
/// with a fixed set of label values down to the values that ever happen.
#[derive(Debug)]
pub(crate) struct LazyGauge {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    cell: OnceLock<Gauge>,
    /// Never registered: a breakdown value outside [`Detail::Standard`]'s set.
    off: bool,
}

impl LazyGauge {
    pub(crate) fn new(name: &'static str, labels: Vec<(&'static str, String)>, eager: bool) -> LazyGauge {
        let lazy = LazyGauge { name, labels, cell: OnceLock::new(), off: false };
        if eager {
            lazy.handle();
        }
        lazy
    }

    fn handle(&self) -> &Gauge {
        self.cell.get_or_init(|| {
            let labels: Vec<metrics::Label> =
                self.labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
            gauge!(self.name, labels)
        })
    }

    /// A gauge that is never registered (its `set` does nothing).
    fn off(name: &'static str) -> LazyGauge {
        LazyGauge { name, labels: Vec::new(), cell: OnceLock::new(), off: true }
    }

    pub(crate) fn set(&self, value: f64) {
        if !self.off && (value != 0.0 || self.cell.get().is_some()) {
            self.handle().set(value);
        }
    }

    /// Sets the value, registering the series whatever it is (0 included).
    pub(crate) fn set_registered(&self, value: f64) {
        if !self.off {
            self.handle().set(value);
        }
    }
}

/// One gauge per state of `states`, labelled `key`; eager where `detail` is full or the state
/// is in `eager`. At [`Detail::Standard`] a state outside `standard` (when given) never
/// exists: the series budget.
fn by_state(
    name: &'static str,
    pool: &str,
    key: &'static str,
    states: &[&'static str],
    (eager, standard): (&[&str], Option<&[&str]>),
    detail: Detail,
) -> Vec<LazyGauge> {
    states
        .iter()
        .map(|s| {
            if detail == Detail::Standard && standard.is_some_and(|kept| !kept.contains(s)) {
                return LazyGauge::off(name);
            }
            let labels = vec![(POOL_NAME, pool.to_owned()), (key, (*s).to_owned())];
            LazyGauge::new(name, labels, detail == Detail::Full || eager.contains(s))
        })
        .collect()
}

#[derive(Debug)]
pub(crate) struct Gauges {
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
    /// Sessions counted in `poolwatch_sessions_ended_total` (every cause): the snapshot's
    /// figure, counted by the census and by every sample alike.
    ended_total: std::sync::atomic::AtomicU64,
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
pub(crate) const ENDED_AT_ZERO: [Cause; 2] = [Cause::AdminShutdown, Cause::PoolerIdleTimeout];

/// The pooler's view of the pool: four series, only when a pooler admin console is declared.
#[derive(Debug)]
pub(crate) struct PoolerGauges {
    waiting: Gauge,
    max_wait: Gauge,
    active: Gauge,
    idle: Gauge,
}

impl PoolerGauges {
    pub(crate) fn new(pool_name: &str) -> PoolerGauges {
        let p = || pool_name.to_owned();
        PoolerGauges {
            waiting: gauge!(catalog::POOLER_WAITING_CLIENTS.name, POOL_NAME => p()),
            max_wait: gauge!(catalog::POOLER_MAX_WAIT.name, POOL_NAME => p()),
            active: gauge!(catalog::POOLER_SERVER_CONNECTIONS.name, POOL_NAME => p(), STATE => "active"),
            idle: gauge!(catalog::POOLER_SERVER_CONNECTIONS.name, POOL_NAME => p(), STATE => "idle"),
        }
    }

    pub(crate) fn set(&self, f: &crate::ledger::pooler::PoolerFigures) {
        self.waiting.set(f.waiting_clients);
        self.max_wait.set(f.max_wait.as_secs_f64());
        self.active.set(f.servers_active);
        self.idle.set(f.servers_idle);
    }
}

impl Gauges {
    pub(crate) fn new(pool_name: &str, detail: Detail) -> Gauges {
        let p = pool_name.to_owned();
        let state = |name: &'static str, key: &'static str, value: &'static str| gauge!(name, POOL_NAME => p.clone(), key => value);
        let plain = |name: &'static str| gauge!(name, POOL_NAME => p.clone());
        let gauges = Gauges {
            used: state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "used"),
            idle: state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "idle"),
            max: plain(catalog::CONNECTION_MAX.name),
            min: plain(catalog::CONNECTION_IDLE_MIN.name),
            census_up: plain(catalog::CENSUS_UP.name),
            census_duration: OnceLock::new(),
            measured: OnceLock::new(),
            client: OnceLock::new(),
            ended_total: std::sync::atomic::AtomicU64::new(0),
            pool_name: p,
            detail,
        };
        for cause in ENDED_AT_ZERO {
            gauges.ended(cause).absolute(0);
        }
        gauges
    }

    /// Counts sessions of the pool that ended without the pool closing them; returns how
    /// many were counted so far.
    pub(crate) fn sessions_ended(&self, causes: &[Cause]) -> u64 {
        for cause in causes {
            self.ended(*cause).increment(1);
        }
        let n = u64::try_from(causes.len()).unwrap_or(u64::MAX);
        let ordering = std::sync::atomic::Ordering::Relaxed;
        self.ended_total.fetch_add(n, ordering).saturating_add(n)
    }

    /// Sessions counted as ended so far.
    pub(crate) fn ended_total(&self) -> u64 {
        self.ended_total.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn ended(&self, cause: Cause) -> Counter {
        counter!(catalog::SESSIONS_ENDED.name, POOL_NAME => self.pool_name.clone(), CAUSE => cause.as_str())
    }

    fn census_duration(&self) -> &Gauge {
        self.census_duration.get_or_init(|| gauge!(catalog::CENSUS_DURATION.name, POOL_NAME => self.pool_name.clone()))
    }

    pub(crate) fn pool(&self, f: &PoolFigures) {
        self.used.set(f.used);
        self.idle.set(f.idle);
        self.max.set(f.max);
        self.min.set(f.min);
    }

    /// Publishes the pool's stable tag (one series per pool).
    pub(crate) fn info(&self, fleet_tag: &str) {
        gauge!(catalog::POOL_INFO.name, POOL_NAME => self.pool_name.clone(), APPLICATION_NAME => fleet_tag.to_owned())
            .set(1);
    }

    /// Publishes the client-side ledger of one sample.
    pub(crate) fn sockets(&self, sockets: &SocketCensus, gap: i64) {
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
    pub(crate) fn census(&self, s: &Snapshot, seconds: f64) {
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
        self.census_duration().set(seconds);
    }

    /// Publishes a failed census.
    pub(crate) fn census_failed(&self, cause: Cause, seconds: f64) {
        self.census_up.set(0);
        self.census_duration().set(seconds);
        self.census_error(cause).increment(1);
    }

    fn census_error(&self, cause: Cause) -> Counter {
        counter!(catalog::CENSUS_ERRORS.name, POOL_NAME => self.pool_name.clone(), CAUSE => cause.as_str())
    }
}
