//! The health parts' handles: heartbeats and the lint's hazards, reachability, the tasks'
//! liveness, and the app's progress counter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::LazyGauge;
use crate::catalog::{self, CAUSE, HAZARD, PATH, POOL_NAME, SERVER_ADDRESS};
use crate::cause::Cause;
use crate::config::Detail;

/// The heartbeats' and the lint's handles.
#[derive(Debug)]
pub(crate) struct HeartbeatMetrics {
    pool_name: String,
    paths: [&'static str; 2],
    duration: [Histogram; 2],
    up: [Gauge; 2],
    hazard: Vec<LazyGauge>,
    hazards_found: Gauge,
}

impl HeartbeatMetrics {
    /// `paths` are the heartbeat's two paths' label values (`pool`, `direct`), `hazards` the
    /// lint's hazard names.
    pub(crate) fn new(
        pool_name: &str,
        detail: Detail,
        paths: [&'static str; 2],
        hazards: &[&'static str],
    ) -> HeartbeatMetrics {
        let p = || pool_name.to_owned();
        // The failure an alert reads with `increase()` (PoolwatchSessionsEndedByPooler: a
        // pooler's query_wait_timeout on the pool path) exists at 0 from the start, so the
        // first one is seen; every other cause's series appears at its first count.
        counter!(
            catalog::HEARTBEAT_FAILURES.name,
            POOL_NAME => p(),
            PATH => paths[0],
            CAUSE => Cause::PoolerWaitTimeout.as_str()
        )
        .absolute(0);
        HeartbeatMetrics {
            duration: paths.map(|path| histogram!(catalog::HEARTBEAT_DURATION.name, POOL_NAME => p(), PATH => path)),
            up: paths.map(|path| gauge!(catalog::HEARTBEAT_UP.name, POOL_NAME => p(), PATH => path)),
            // Standard detail: a hazard's series exists once it was found (then 1, or 0 once
            // fixed); the count is always there.
            hazard: hazards
                .iter()
                .map(|h| {
                    let labels = vec![(POOL_NAME, p()), (HAZARD, (*h).to_owned())];
                    LazyGauge::new(catalog::CONFIG_HAZARD.name, labels, detail == Detail::Full)
                })
                .collect(),
            hazards_found: gauge!(catalog::CONFIG_HAZARDS.name, POOL_NAME => p()),
            pool_name: p(),
            paths,
        }
    }

    /// One beat of path `i` (an index of the paths).
    pub(crate) fn beat(&self, i: usize, result: Result<(), Cause>, seconds: f64) {
        self.duration[i].record(seconds);
        self.up[i].set(if result.is_ok() { 1.0 } else { 0.0 });
        if let Err(cause) = result {
            counter!(catalog::HEARTBEAT_FAILURES.name, POOL_NAME => self.pool_name.clone(), PATH => self.paths[i], CAUSE => cause.as_str())
                .increment(1);
        }
    }

    /// The hazards the last lint found: `found(i)` tells whether the `i`-th of the names
    /// given to [`new`](Self::new) was, `count` how many were.
    pub(crate) fn hazards(&self, found: impl Fn(usize) -> bool, count: usize) {
        for (i, gauge) in self.hazard.iter().enumerate() {
            gauge.set(if found(i) { 1.0 } else { 0.0 });
        }
        self.hazards_found.set(count as f64);
    }
}

/// The reachability probe's handles.
#[derive(Debug)]
pub(crate) struct ReachMetrics {
    pool_name: String,
    /// Addresses that get series at most, over the process's life.
    cap: usize,
    /// Per-address series only at [`Detail::Full`].
    per_address: bool,
    series: Mutex<HashMap<SocketAddr, AddressGauges>>,
    over_cap_warned: AtomicBool,
}

#[derive(Debug)]
struct AddressGauges {
    up: Gauge,
    connect: Gauge,
}

impl ReachMetrics {
    /// At most `cap` addresses get series (at `Detail::Full` only).
    pub(crate) fn new(pool_name: &str, detail: Detail, cap: usize) -> ReachMetrics {
        ReachMetrics {
            pool_name: pool_name.to_owned(),
            cap,
            per_address: detail == Detail::Full,
            series: Mutex::new(HashMap::new()),
            over_cap_warned: AtomicBool::new(false),
        }
    }

    /// Publishes one probe: how many addresses the host resolved to, and each address probed
    /// (whether it is up, its connect time).
    pub(crate) fn publish(&self, resolved: usize, probed: &[Probed]) {
        // Registered at the first probe: a unix-socket pool never exports it.
        gauge!(catalog::SERVER_ADDRESSES.name, POOL_NAME => self.pool_name.clone()).set(resolved as f64);
        let down = probed.iter().filter(|a| !a.up).count();
        gauge!(catalog::SERVER_ADDRESSES_DOWN.name, POOL_NAME => self.pool_name.clone()).set(down as f64);
        if !self.per_address {
            return;
        }
        let Ok(mut series) = self.series.lock() else { return };
        for (address, g) in series.iter() {
            if !probed.iter().any(|a| a.address == *address) {
                // Not probed this time (left the DNS answer): no value until it comes back.
                g.up.set(f64::NAN);
                g.connect.set(f64::NAN);
            }
        }
        for a in probed {
            if !series.contains_key(&a.address) && series.len() >= self.cap {
                if !self.over_cap_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        pool = %self.pool_name,
                        max = self.cap,
                        "the database host has resolved to more distinct addresses than poolwatch exports \
                         series for; newer addresses show only in PoolWatch::reachability()"
                    );
                }
                continue;
            }
            let g = series.entry(a.address).or_insert_with(|| {
                let p = self.pool_name.clone();
                let address = a.address.to_string();
                AddressGauges {
                    up: gauge!(catalog::SERVER_ADDRESS_UP.name, POOL_NAME => p.clone(), SERVER_ADDRESS => address.clone()),
                    connect: gauge!(catalog::SERVER_ADDRESS_CONNECT_TIME.name, POOL_NAME => p, SERVER_ADDRESS => address),
                }
            });
            g.up.set(if a.up { 1.0 } else { 0.0 });
            g.connect.set(a.connect_time.as_secs_f64());
        }
    }

    /// Clears what a panicked task left poisoned.
    pub(crate) fn clear_poison(&self) {
        self.series.clear_poison();
    }
}

/// One address as a reachability probe found it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probed {
    pub(crate) address: SocketAddr,
    pub(crate) up: bool,
    pub(crate) connect_time: std::time::Duration,
}

/// The tasks' liveness: when each last completed, and the census's age.
#[derive(Debug)]
pub(crate) struct LivenessMetrics {
    pool_name: String,
    paths: [&'static str; 2],
    pub(crate) last_sample: Gauge,
    pub(crate) last_census: Gauge,
    pub(crate) last_heartbeat: Gauge,
    pub(crate) census_age: Gauge,
}

impl LivenessMetrics {
    /// `paths` as for [`HeartbeatMetrics::new`].
    pub(crate) fn new(pool_name: &str, paths: [&'static str; 2]) -> LivenessMetrics {
        let g = |m: &catalog::Metric| gauge!(m.name, POOL_NAME => pool_name.to_owned());
        for task in ["watch", "heartbeat"] {
            let labels = [(POOL_NAME, pool_name.to_owned()), (catalog::TASK, task.to_owned())];
            counter!(catalog::TASK_RESTARTS.name, &labels).absolute(0);
        }
        LivenessMetrics {
            pool_name: pool_name.to_owned(),
            paths,
            last_sample: g(&catalog::LAST_SAMPLE),
            last_census: g(&catalog::LAST_CENSUS),
            last_heartbeat: g(&catalog::LAST_HEARTBEAT),
            census_age: g(&catalog::CENSUS_AGE),
        }
    }

    /// The sample and census task died: its figures are unknown until it runs again
    /// (NaN: "no value" to Prometheus, so no alert reads a stale 1 as healthy).
    pub(crate) fn watch_lost(&self) {
        gauge!(catalog::CENSUS_UP.name, POOL_NAME => self.pool_name.clone()).set(f64::NAN);
    }

    /// The heartbeat task died: both paths' figures are unknown until it runs again.
    pub(crate) fn heartbeat_lost(&self) {
        for path in self.paths {
            gauge!(catalog::HEARTBEAT_UP.name, POOL_NAME => self.pool_name.clone(), PATH => path).set(f64::NAN);
        }
    }
}

/// The app's progress counter for `pool_name`, at 0 from its creation.
pub(crate) fn progress(pool_name: &str) -> Counter {
    let counter = counter!(catalog::PROGRESS.name, POOL_NAME => pool_name.to_owned());
    counter.increment(0);
    counter
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn series_stop_at_the_cap() {
        let reach = ReachMetrics::new("cap", Detail::Full, 16);
        for round in 0..5u8 {
            let probed: Vec<Probed> = (0..8u8)
                .map(|i| Probed {
                    address: SocketAddr::from(([10, 0, round, i], 5432)),
                    up: true,
                    connect_time: Duration::from_millis(1),
                })
                .collect();
            reach.publish(8, &probed);
        }
        assert_eq!(reach.series.lock().unwrap().len(), 16);
        assert!(reach.over_cap_warned.load(Ordering::Relaxed));
    }
}
