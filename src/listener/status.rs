//! The live state of every [`WatchedListener`](crate::listener::watched::WatchedListener) in the process, by
//! pool name, so a pool's [health report](crate::watch::PoolWatch::health) can include its
//! listeners. Each listener registers when it connects and leaves when dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cause::Cause;
use crate::registry;

/// A live listener's state (a [`registry`](crate::registry) table of `Arc<Status>`).
#[derive(Debug)]
pub(crate) struct Status {
    pool_name: String,
    listener: String,
    /// Its keepalive period (`None`: none), for the hazard lint.
    keepalive: Option<Duration>,
    connected: AtomicBool,
    reconnects: AtomicU64,
    last_cause: Mutex<Option<Cause>>,
}

/// A listener's entry; leaves the registry when dropped.
#[derive(Debug)]
pub(crate) struct Registered(Arc<Status>);

impl Registered {
    pub(crate) fn new(pool_name: &str, listener: &str, keepalive: Option<Duration>) -> Registered {
        let status = Arc::new(Status {
            pool_name: pool_name.to_owned(),
            listener: listener.to_owned(),
            keepalive,
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            last_cause: Mutex::new(None),
        });
        registry::lock::<Arc<Status>>().push(Arc::clone(&status));
        Registered(status)
    }

    pub(crate) fn connected(&self, up: bool) {
        self.0.connected.store(up, Ordering::Relaxed);
    }

    pub(crate) fn reconnected(&self, cause: Cause) {
        self.0.reconnects.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.0.last_cause.lock() {
            *c = Some(cause);
        }
        self.connected(true);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        registry::lock::<Arc<Status>>().retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

/// One listener's figures, as the health report shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ListenerHealth {
    /// The listener's name (the `listener` label).
    pub name: String,
    /// Whether it is connected and LISTENing now.
    pub connected: bool,
    /// Reconnects so far.
    pub reconnects: u64,
    /// The cause of the last reconnect (a [`Cause`] name).
    pub last_cause: Option<&'static str>,
}

/// The live listeners of the pool named `pool_name`.
pub(crate) fn of_pool(pool_name: &str) -> Vec<ListenerHealth> {
    registry::lock::<Arc<Status>>()
        .iter()
        .filter(|s| s.pool_name == pool_name)
        .map(|s| ListenerHealth {
            name: s.listener.clone(),
            connected: s.connected.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            last_cause: s.last_cause.lock().ok().and_then(|c| c.map(Cause::as_str)),
        })
        .collect()
}

/// The keepalive the hazard lint must judge for the live listeners of `pool_name`: the
/// worst of them (one without keepalive, else the slowest). `None`: no live listener.
pub(crate) fn keepalive_of(pool_name: &str) -> Option<Option<Duration>> {
    let all = registry::lock::<Arc<Status>>();
    let mine = all.iter().filter(|s| s.pool_name == pool_name);
    mine.map(|s| s.keepalive).reduce(worst_keepalive)
}

/// The worse of two listeners' keepalives for the lint: none at all, else the slower.
pub(crate) fn worst_keepalive(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    a.zip(b).map(|(a, b)| a.max(b))
}
