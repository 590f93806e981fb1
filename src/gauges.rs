//! The metric handles of one watched pool, registered once with the pool label.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge};

use crate::catalog::{self, CAUSE, CONNECTION_STATE, POOL_NAME, STATE};
use crate::ledger::census::SESSION_STATES;
use crate::ledger::sockets::TCP_STATES;
use crate::{Cause, PoolFigures, Snapshot};

#[derive(Debug)]
pub(crate) struct Gauges {
    pool_name: String,
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
}

/// The census-derived gauges.
#[derive(Debug)]
struct Measured {
    server: Vec<Gauge>,
    longest: Vec<Gauge>,
    lock_waiters: Gauge,
    advisory_locks: Gauge,
    advisory_locks_max: Gauge,
    sockets: OnceLock<Vec<Gauge>>,
    phantom: Gauge,
}

impl Measured {
    fn new(p: &str) -> Measured {
        let by_state = |name: &'static str, key: &'static str, value: &'static str| gauge!(name, POOL_NAME => p.to_owned(), key => value);
        let plain = |name: &'static str| gauge!(name, POOL_NAME => p.to_owned());
        Measured {
            server: SESSION_STATES.iter().map(|s| by_state(catalog::SERVER_CONNECTIONS.name, STATE, s)).collect(),
            longest: SESSION_STATES.iter().map(|s| by_state(catalog::SERVER_LONGEST_IN_STATE.name, STATE, s)).collect(),
            lock_waiters: plain(catalog::SERVER_LOCK_WAITERS.name),
            advisory_locks: plain(catalog::SERVER_ADVISORY_LOCKS.name),
            advisory_locks_max: plain(catalog::SERVER_ADVISORY_LOCKS_MAX.name),
            sockets: OnceLock::new(),
            phantom: plain(catalog::PHANTOM_CONNECTIONS.name),
        }
    }
}

impl Gauges {
    pub(crate) fn new(pool_name: &str) -> Gauges {
        let p = pool_name.to_owned();
        let by_state = |name: &'static str, key: &'static str, value: &'static str| gauge!(name, POOL_NAME => p.clone(), key => value);
        let plain = |name: &'static str| gauge!(name, POOL_NAME => p.clone());
        Gauges {
            used: by_state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "used"),
            idle: by_state(catalog::CONNECTION_COUNT.name, CONNECTION_STATE, "idle"),
            max: plain(catalog::CONNECTION_MAX.name),
            min: plain(catalog::CONNECTION_IDLE_MIN.name),
            census_up: plain(catalog::CENSUS_UP.name),
            census_duration: OnceLock::new(),
            measured: OnceLock::new(),
            pool_name: p,
        }
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

    /// Publishes a successful census.
    pub(crate) fn census(&self, s: &Snapshot, seconds: f64) {
        self.pool(&s.pool);
        let m = self.measured.get_or_init(|| Measured::new(&self.pool_name));
        if let Some(server) = &s.server {
            for (g, n) in m.server.iter().zip(server.counts) {
                g.set(n);
            }
            for (g, d) in m.longest.iter().zip(server.longest) {
                g.set(d.as_secs_f64());
            }
            m.lock_waiters.set(server.lock_waiters);
            m.advisory_locks.set(server.advisory_locks);
            m.advisory_locks_max.set(server.advisory_locks_max_per_session);
        }
        if let Some(sockets) = &s.sockets {
            let gauges = m.sockets.get_or_init(|| {
                let p = &self.pool_name;
                TCP_STATES
                    .iter()
                    .map(|st| gauge!(catalog::CLIENT_SOCKETS.name, POOL_NAME => p.clone(), STATE => *st))
                    .collect()
            });
            for (g, n) in gauges.iter().zip(sockets.counts) {
                g.set(n);
            }
        }
        if let Some(phantom) = s.phantom {
            m.phantom.set(phantom as f64);
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
