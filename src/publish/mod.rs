//! The one publishing layer: every metric handle is created here, named from
//! [`catalog`](crate::catalog), and figures computed elsewhere (plain structs, no side
//! effect) are mapped to metrics here. The rest of the crate computes; this layer emits
//! through the `metrics` facade, like any library on `metrics`.
//!
//! - [`pool`]: what one sample and one census of a watched pool publish;
//! - [`acquire`]: the acquire path's timings, the leak watch, the bare pool's hooks;
//! - [`health`]: heartbeats and hazards, reachability, liveness, progress;
//! - [`listener`]: a watched listener's connection and notifications.

pub(crate) mod acquire;
pub(crate) mod health;
pub(crate) mod listener;
pub(crate) mod pool;

use std::sync::OnceLock;

use metrics::{Gauge, gauge};

use crate::catalog::POOL_NAME;
use crate::config::Detail;

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
