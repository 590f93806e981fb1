//! A [`WatchedListener`](crate::listener::watched::WatchedListener)'s handles.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::catalog::{self, CAUSE, EVIDENCE, LISTENER, POOL_NAME};
use crate::cause::Cause;

#[derive(Debug)]
pub(crate) struct ListenerMetrics {
    pool_name: String,
    listener: String,
    connected: Gauge,
    notifications: Counter,
    last_notification: Gauge,
    downtime: Histogram,
}

impl ListenerMetrics {
    /// `zero_bases`: the evidence values whose idle-session-kill reconnect counter exists at 0
    /// from the start, so `increase()` sees the first one (PoolwatchListenerIdleSessionTimeout).
    pub(crate) fn new(pool_name: &str, listener: &str, zero_bases: &[&'static str]) -> ListenerMetrics {
        let (p, l) = (pool_name.to_owned(), listener.to_owned());
        for basis in zero_bases {
            counter!(
                catalog::LISTENER_RECONNECTS.name,
                POOL_NAME => p.clone(),
                LISTENER => l.clone(),
                CAUSE => Cause::IdleSessionTimeout.as_str(),
                EVIDENCE => *basis
            )
            .increment(0);
        }
        ListenerMetrics {
            connected: gauge!(catalog::LISTENER_CONNECTED.name, POOL_NAME => p.clone(), LISTENER => l.clone()),
            notifications: counter!(catalog::LISTENER_NOTIFICATIONS.name, POOL_NAME => p.clone(), LISTENER => l.clone()),
            last_notification: gauge!(catalog::LISTENER_LAST_NOTIFICATION.name, POOL_NAME => p.clone(), LISTENER => l.clone()),
            downtime: histogram!(catalog::LISTENER_DOWNTIME.name, POOL_NAME => p.clone(), LISTENER => l.clone()),
            pool_name: p,
            listener: l,
        }
    }

    pub(crate) fn connected(&self, up: bool) {
        self.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// A notification arrived at `unix_seconds`.
    pub(crate) fn notified(&self, unix_seconds: f64) {
        self.notifications.increment(1);
        self.last_notification.set(unix_seconds);
    }

    /// The listener reconnected after `downtime_seconds`, its loss known by `basis`.
    pub(crate) fn reconnected(&self, cause: Cause, basis: &'static str, downtime_seconds: f64) {
        counter!(
            catalog::LISTENER_RECONNECTS.name,
            POOL_NAME => self.pool_name.clone(),
            LISTENER => self.listener.clone(),
            CAUSE => cause.as_str(),
            EVIDENCE => basis
        )
        .increment(1);
        self.downtime.record(downtime_seconds);
        self.connected.set(1);
    }
}
