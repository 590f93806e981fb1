//! [`PoolWatch::health`](crate::watch::PoolWatch::health): one plain report a readiness endpoint can
//! serve: `ok`, `degraded` or `failing`, the reasons, and the figures behind them. It reads
//! what the background tasks last measured; building it does no I/O.
//!
//! - `failing`: the app cannot get a working connection: the pool heartbeat fails (pool
//!   exhausted or leaking when the direct heartbeat works; database or network when both fail).
//! - `degraded`: it still works, but something needs a look: the phantom gap growing or
//!   standing, stranded slots, a socket whose send queue never drains, acquires waiting long,
//!   a listener down, a configuration hazard, an unreachable resolved address, the census or
//!   the direct heartbeat failing, or a background task's figures gone stale (no sample,
//!   census or heartbeat completed for a few of its intervals: the task stalled or died).
//! - `ok`: none of the above (also before the first heartbeat and census).

use std::fmt;
use std::time::Duration;

use crate::listener::status::ListenerHealth;
use crate::{
    health::heartbeat::Diagnosis, health::heartbeat::HeartbeatFigures, health::heartbeat::PathFigures,
    ledger::snapshot::PoolFigures,
};

/// The verdict, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "lowercase"))]
pub enum HealthStatus {
    /// Nothing wrong seen.
    Ok,
    /// Working, but something needs a look.
    Degraded,
    /// The app cannot get a working connection.
    Failing,
}

impl HealthStatus {
    /// `ok`, `degraded` or `failing`.
    pub const fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "ok",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Failing => "failing",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reason the report is not `ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Reason {
    /// How bad this one is.
    pub status: HealthStatus,
    /// A fixed name, e.g. `pool_heartbeat_failing`, `pool_cannot_grow`, `phantom_gap_growing`.
    pub code: &'static str,
    /// What was seen, with its figures.
    pub message: String,
}

/// The phantom gap (pool-believed minus server-real connections) and its trend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GapHealth {
    /// The gap at the last successful census (`None` before one).
    pub phantom: Option<i64>,
    /// The gap rose over the last censuses without ever falling.
    pub growing: bool,
    /// The gap at the last few censuses, oldest first.
    pub recent: Vec<i64>,
    /// Whether the last census succeeded (the figures are stale when not).
    pub census_up: bool,
}

/// One heartbeat path, in plain units.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PathHealth {
    /// Whether the last heartbeat succeeded (`None` before the first).
    pub up: Option<bool>,
    /// How long the last one took, in seconds.
    pub last_seconds: Option<f64>,
    /// Why the last one failed (a [`Cause`](crate::cause::Cause) name).
    pub last_cause: Option<&'static str>,
    /// Heartbeats that succeeded so far.
    pub successes: u64,
    /// Heartbeats that failed so far.
    pub failures: u64,
}

impl From<PathFigures> for PathHealth {
    fn from(p: PathFigures) -> Self {
        PathHealth {
            up: p.up,
            last_seconds: p.last_duration.map(|d| d.as_secs_f64()),
            last_cause: p.last_cause.map(crate::cause::Cause::as_str),
            successes: p.successes,
            failures: p.failures,
        }
    }
}

/// Both heartbeat paths and what they say together.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HeartbeatHealth {
    /// An acquire through the pool (pinged, or followed by `SELECT 1`).
    pub pool: PathHealth,
    /// A ping on poolwatch's own connection, outside the pool.
    pub direct: PathHealth,
    /// `healthy`, `pool_side`, `database_or_network` or `direct_only`; `None` before both ran.
    pub diagnosis: Option<&'static str>,
}

/// A configuration hazard found by the lint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HazardHealth {
    /// The hazard's name (the `hazard` label).
    pub hazard: &'static str,
    /// The figures that raised it.
    pub detail: String,
    /// How to fix it.
    pub fix: &'static str,
}

/// Acquires through the watched pool waiting now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct WaitHealth {
    /// Callers waiting for a connection now.
    pub waiters: usize,
    /// The oldest one's wait so far, in seconds.
    pub oldest_wait_seconds: f64,
}

/// The report of one watched pool: see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HealthReport {
    /// The pool's name.
    pub pool_name: String,
    /// The worst status among the reasons (`ok` when there are none).
    pub status: HealthStatus,
    /// Why it is not `ok`, worst first.
    pub reasons: Vec<Reason>,
    /// What the pool believes now.
    pub pool: PoolFigures,
    /// The phantom gap.
    pub gap: GapHealth,
    /// Both heartbeat paths.
    pub heartbeat: HeartbeatHealth,
    /// The pool's [`WatchedListener`](crate::listener::watched::WatchedListener)s alive in this process.
    pub listeners: Vec<ListenerHealth>,
    /// Configuration hazards found by the last lint.
    pub hazards: Vec<HazardHealth>,
    /// Slots the pool counts as checked out that the app does not hold through the watched
    /// pool, at each of the last samples (`poolwatch_stranded_slots`). `None` until the app
    /// acquired through the watched pool (a pool only a library drives has no such figure).
    pub stranded_slots: Option<u32>,
    /// Sockets whose send queue has not drained for `send_queue_stuck_after`.
    pub send_queue_stuck_sockets: u32,
    /// Acquires waiting now.
    pub waits: WaitHealth,
    /// Resolved addresses of the database host that did not answer the last probe, of how many.
    pub addresses_down: usize,
    /// How many addresses were probed.
    pub addresses: usize,
    /// Connections opened, closed by reason, and the oldest one's age (`watch.lifecycle()`);
    /// `None` unless the pool was built with
    /// [`instrument_options_named`](crate::acquire::bare::instrument_options_named). Informative only.
    pub lifecycle: Option<crate::ledger::snapshot::LifecycleFigures>,
    /// How old the background tasks' figures are.
    pub freshness: Freshness,
}

/// How long ago the background tasks last completed their work, in seconds (`None`: not
/// yet). Figures older than a few of their task's intervals are stale: the report says so
/// instead of repeating them as current.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Freshness {
    /// Since the last sample of the pool's counters (every `sample_interval`).
    pub sample_age_seconds: Option<f64>,
    /// Since the last successful server census (every `census_interval`, sooner after a
    /// failure or to confirm what it saw).
    pub census_age_seconds: Option<f64>,
    /// Since a sample last saw a new heartbeat (every `heartbeat_interval`).
    pub heartbeat_age_seconds: Option<f64>,
}

/// Acquires waiting longer than this make the report `degraded`.
pub(crate) const LONG_WAIT: Duration = Duration::from_secs(1);

/// What [`PoolWatch::health`](crate::watch::PoolWatch::health) gathers before judging.
#[derive(Debug)]
pub(crate) struct Inputs {
    pub(crate) pool_name: String,
    pub(crate) pool: PoolFigures,
    pub(crate) gap: GapHealth,
    pub(crate) heartbeat: HeartbeatFigures,
    pub(crate) listeners: Vec<ListenerHealth>,
    pub(crate) hazards: Vec<crate::health::hazards::Finding>,
    pub(crate) stranded: Option<u32>,
    pub(crate) lifecycle: Option<crate::ledger::snapshot::LifecycleFigures>,
    pub(crate) send_queue_stuck: u32,
    pub(crate) waits: WaitHealth,
    pub(crate) reach: crate::health::reach::Reachability,
    pub(crate) liveness: Liveness,
}

/// The tasks' ages and the limits past which their figures are stale.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Liveness {
    pub(crate) ages: crate::health::liveness::Ages,
    pub(crate) limits: crate::health::liveness::Limits,
}

/// The reasons the tasks' figures are too old to trust, and the heartbeat figures to judge
/// (unknown, not their last value, when the heartbeat task stopped).
fn staleness(l: &Liveness, heartbeat: HeartbeatFigures) -> (Vec<Reason>, HeartbeatFigures, Freshness) {
    let (a, lim) = (l.ages, l.limits);
    let mut reasons = Vec::new();
    let mut add = |code, what: &str, age: Duration, every: Duration| {
        let message = format!(
            "{what} for {:.1}s (expected every {every:?}): poolwatch's background task stalled or died; these figures are stale",
            age.as_secs_f64()
        );
        reasons.push(Reason { status: HealthStatus::Degraded, code, message });
    };
    let sample = a.sample.unwrap_or(a.watch);
    if sample > lim.sample {
        add("watch_stalled", "no sample completed", sample, lim.sample_every);
    }
    let census = a.census.unwrap_or(a.watch);
    if census > lim.census {
        add("census_stale", "no census succeeded", census, lim.census_every);
    }
    let mut hb = heartbeat;
    let beat = a.heartbeat.unwrap_or(a.watch);
    if beat > lim.heartbeat {
        add("heartbeat_stale", "no heartbeat seen", beat, lim.heartbeat_every);
        for p in [&mut hb.pool, &mut hb.direct] {
            (p.up, p.last_cause) = (None, None);
        }
    }
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let fresh = Freshness {
        sample_age_seconds: secs(a.sample),
        census_age_seconds: secs(a.census),
        heartbeat_age_seconds: secs(a.heartbeat),
    };
    (reasons, hb, fresh)
}

/// Judges the figures; pure, so every rule is unit-tested.
pub(crate) fn judge(i: Inputs) -> HealthReport {
    let (mut reasons, hb, freshness) = staleness(&i.liveness, i.heartbeat);
    let diagnosis = hb.diagnosis();
    heartbeat_reasons(&mut reasons, &hb, diagnosis, &i.pool);
    gap_reasons(&mut reasons, &i.gap);
    slot_reasons(&mut reasons, &i);
    let down = i.reach.addresses.iter().filter(|a| !a.up).count();
    if down > 0 {
        reasons.push(Reason {
            status: HealthStatus::Degraded,
            code: "address_unreachable",
            message: format!(
                "{down} of {} resolved address(es) of the database host do not answer",
                i.reach.addresses.len()
            ),
        });
    }
    reasons.sort_by_key(|r| std::cmp::Reverse(r.status));
    HealthReport {
        pool_name: i.pool_name,
        status: reasons.first().map_or(HealthStatus::Ok, |r| r.status),
        reasons,
        pool: i.pool,
        gap: i.gap,
        heartbeat: HeartbeatHealth {
            pool: hb.pool.into(),
            direct: hb.direct.into(),
            diagnosis: diagnosis.map(|d| match d {
                Diagnosis::Healthy => "healthy",
                Diagnosis::PoolSide => "pool_side",
                Diagnosis::DatabaseOrNetwork => "database_or_network",
                Diagnosis::DirectOnly => "direct_only",
            }),
        },
        listeners: i.listeners,
        hazards: i
            .hazards
            .iter()
            .map(|f| HazardHealth { hazard: f.hazard.as_str(), detail: f.detail.clone(), fix: f.hazard.fix() })
            .collect(),
        stranded_slots: i.stranded,
        send_queue_stuck_sockets: i.send_queue_stuck,
        waits: i.waits,
        addresses_down: down,
        addresses: i.reach.addresses.len(),
        lifecycle: i.lifecycle,
        freshness,
    }
}

/// The heartbeats' reasons: the pool path failing, or poolwatch's own connection.
fn heartbeat_reasons(
    reasons: &mut Vec<Reason>,
    hb: &HeartbeatFigures,
    diagnosis: Option<Diagnosis>,
    pool: &PoolFigures,
) {
    if let Some((code, message)) = pool_path_reason(hb, diagnosis, pool) {
        reasons.push(Reason { status: HealthStatus::Failing, code, message });
    }
    if diagnosis == Some(Diagnosis::DirectOnly) {
        reasons.push(Reason {
            status: HealthStatus::Degraded,
            code: "direct_heartbeat_failing",
            message: format!("poolwatch's own connection fails ({}); the pool works", cause(hb.direct.last_cause)),
        });
    }
}

/// The census's reasons: a failed census, a phantom gap (growing or not).
fn gap_reasons(reasons: &mut Vec<Reason>, gap: &GapHealth) {
    let mut add = |code, message: String| reasons.push(Reason { status: HealthStatus::Degraded, code, message });
    if !gap.census_up && !gap.recent.is_empty() {
        add("census_down", "the last server census failed; the gap figures are stale".into());
    }
    if let Some(p) = gap.phantom.filter(|p| *p > 0) {
        if gap.growing {
            add(
                "phantom_gap_growing",
                format!(
                    "the pool counts {p} connections the server does not have, and the gap grows ({:?})",
                    gap.recent
                ),
            );
        } else {
            add("phantom_gap", format!("the pool counts {p} connections the server does not have"));
        }
    }
}

/// The reasons about slots, sockets, waiters, listeners and the setup.
fn slot_reasons(reasons: &mut Vec<Reason>, i: &Inputs) {
    let mut add = |code, message: String| reasons.push(Reason { status: HealthStatus::Degraded, code, message });
    if let Some(stranded) = i.stranded.filter(|s| *s > 0) {
        add(
            "stranded_slots",
            format!(
                "{stranded} slot(s) counted by the pool are neither idle nor held through the watched pool (stuck in sqlx's return-to-pool cleanup, or bare-pool acquires)"
            ),
        );
    }
    if i.send_queue_stuck > 0 {
        add(
            "send_queue_stuck",
            format!(
                "{} socket(s) to the database have unacknowledged data that never drains: a silent peer",
                i.send_queue_stuck
            ),
        );
    }
    if i.waits.waiters > 0 && i.waits.oldest_wait_seconds >= LONG_WAIT.as_secs_f64() {
        add(
            "acquires_waiting",
            format!("{} acquire(s) waiting, the oldest for {:.1}s", i.waits.waiters, i.waits.oldest_wait_seconds),
        );
    }
    for l in i.listeners.iter().filter(|l| !l.connected) {
        add("listener_down", format!("listener {} is not connected: notifications are lost", l.name));
    }
    for h in &i.hazards {
        add("config_hazard", format!("{}: {}", h.hazard, h.detail));
    }
}

/// Why the pool heartbeat fails, when it does. Three problems with three different fixes: the
/// database is unreachable (both paths fail); the pool cannot open a connection though it is
/// below its maximum (the server or the role is out of connection slots, 53300, or connects
/// hang: a restart would drop the connections it still has); or every slot is checked out by
/// this process (exhausted or leaking: a restart frees them). sqlx counts a connect in flight
/// in `size()`, so with many callers waiting a pool that cannot grow may read `open == max`
/// here; the runbook's slots query decides then.
fn pool_path_reason(
    hb: &HeartbeatFigures,
    diagnosis: Option<Diagnosis>,
    pool: &PoolFigures,
) -> Option<(&'static str, String)> {
    if hb.pool.up != Some(false) {
        return None;
    }
    let failing = cause(hb.pool.last_cause);
    if diagnosis == Some(Diagnosis::DatabaseOrNetwork) {
        let message = format!(
            "both heartbeats fail (pool: {failing}, direct: {}): the database or the network",
            cause(hb.direct.last_cause)
        );
        return Some(("database_unreachable", message));
    }
    if pool.open < pool.max {
        let message = format!(
            "The pool heartbeat fails ({failing}) with {} of {} connections open while the database answers poolwatch's own connection: the pool cannot open a connection (the server or the role is out of connection slots, 53300, or new connects hang); do not restart, it would drop the connections it has",
            pool.open, pool.max
        );
        return Some(("pool_cannot_grow", message));
    }
    let message = format!(
        "The pool heartbeat fails ({failing}) with all {} slots checked out while the database answers poolwatch's own connection: this process holds its slots (exhausted or leaking)",
        pool.max
    );
    Some(("pool_heartbeat_failing", message))
}

fn cause(c: Option<crate::cause::Cause>) -> &'static str {
    c.map_or("unknown", crate::cause::Cause::as_str)
}

/// The gap rose over the readings (at least three) and never fell.
pub(crate) fn growing(recent: &[i64]) -> bool {
    recent.len() >= 3 && recent.windows(2).all(|w| w[1] >= w[0]) && recent.last() > recent.first()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cause::Cause, health::hazards::Finding, health::hazards::Hazard};

    fn inputs() -> Inputs {
        let up = PathFigures { up: Some(true), successes: 1, ..PathFigures::default() };
        Inputs {
            pool_name: "unit".into(),
            pool: PoolFigures::default(),
            gap: GapHealth { phantom: Some(0), growing: false, recent: vec![0], census_up: true },
            heartbeat: HeartbeatFigures { pool: up, direct: up },
            listeners: Vec::new(),
            hazards: Vec::new(),
            stranded: None,
            lifecycle: None,
            send_queue_stuck: 0,
            waits: WaitHealth::default(),
            reach: crate::health::reach::Reachability::default(),
            liveness: Liveness::default(),
        }
    }

    fn codes(r: &HealthReport) -> Vec<&'static str> {
        r.reasons.iter().map(|r| r.code).collect()
    }

    #[test]
    fn each_rule_and_the_worst_wins() {
        let r = judge(inputs());
        assert_eq!((r.status, codes(&r)), (HealthStatus::Ok, vec![]));
        let down = PathFigures { up: Some(false), last_cause: Some(Cause::PoolTimedOut), ..PathFigures::default() };
        let mut i = inputs();
        i.heartbeat.pool = down;
        i.stranded = Some(2);
        let r = judge(i);
        assert_eq!(r.status, HealthStatus::Failing);
        assert_eq!(codes(&r), ["pool_heartbeat_failing", "stranded_slots"], "worst first");
        let mut i = inputs();
        i.heartbeat.pool = down;
        i.heartbeat.direct = PathFigures { up: Some(false), ..PathFigures::default() };
        assert_eq!(codes(&judge(i)), ["database_unreachable"]);
        // Below max and still no connection: the pool cannot open one (server or role full).
        let mut i = inputs();
        i.heartbeat.pool = down;
        i.pool = PoolFigures { open: 3, idle: 0, used: 3, max: 10, min: 0 };
        let r = judge(i);
        assert_eq!((r.status, codes(&r)), (HealthStatus::Failing, vec!["pool_cannot_grow"]));
        assert!(r.reasons[0].message.contains("3 of 10"), "{:?}", r.reasons);
        let mut i = inputs();
        i.heartbeat.pool = down;
        i.pool = PoolFigures { open: 10, idle: 0, used: 10, max: 10, min: 0 };
        assert_eq!(codes(&judge(i)), ["pool_heartbeat_failing"], "every slot held: the process holds them");
        let mut i = inputs();
        i.gap = GapHealth { phantom: Some(3), growing: true, recent: vec![1, 2, 3], census_up: true };
        i.hazards = vec![Finding { hazard: Hazard::MaxLifetimeUnsetOrTooLong, detail: "x".into() }];
        i.listeners = vec![ListenerHealth { name: "jobs".into(), connected: false, reconnects: 1, last_cause: None }];
        i.send_queue_stuck = 1;
        i.waits = WaitHealth { waiters: 2, oldest_wait_seconds: 3.0 };
        let r = judge(i);
        assert_eq!(r.status, HealthStatus::Degraded);
        assert_eq!(
            codes(&r),
            ["phantom_gap_growing", "send_queue_stuck", "acquires_waiting", "listener_down", "config_hazard"]
        );
    }

    #[test]
    fn stale_figures_are_not_reported_as_current() {
        use crate::health::liveness::{Ages, Limits};
        let limits = Limits::of(&crate::config::Config::new("unit"));
        let fresh = Some(Duration::from_secs(1));
        let ages = Ages { watch: Duration::from_secs(3600), sample: fresh, census: fresh, heartbeat: fresh };
        let mut i = inputs();
        i.liveness = Liveness { ages, limits };
        assert_eq!(codes(&judge(i)), Vec::<&str>::new());
        let mut i = inputs();
        let old = Some(Duration::from_secs(3000));
        let census = Some(Duration::from_secs(60_000));
        i.liveness = Liveness { ages: Ages { sample: old, census, heartbeat: old, ..ages }, limits };
        let r = judge(i);
        assert_eq!(r.status, HealthStatus::Degraded);
        assert_eq!(codes(&r), ["watch_stalled", "census_stale", "heartbeat_stale"]);
        assert_eq!((r.heartbeat.pool.up, r.heartbeat.diagnosis), (None, None), "the heartbeat reads unknown");
        assert_eq!(r.freshness.sample_age_seconds, Some(3000.0));
        // Before the first sample: judged from the watch's start.
        let mut i = inputs();
        i.liveness = Liveness { ages: Ages { watch: Duration::from_secs(40), ..Ages::default() }, limits };
        assert_eq!(codes(&judge(i)), ["watch_stalled"]);
    }

    #[test]
    fn growth_needs_three_readings_that_never_fall() {
        assert!(growing(&[1, 2, 3]));
        assert!(growing(&[1, 1, 2]));
        assert!(!growing(&[1, 2]));
        assert!(!growing(&[2, 2, 2]));
        assert!(!growing(&[1, 3, 2, 4]));
    }
}
