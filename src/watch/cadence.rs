//! The watch's cadence: the sample, census, reachability and leak-scan schedules in one loop,
//! the heartbeat task, and their supervision (a panicked task restarts, with backoff).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::cause::Cause;
use crate::ledger::snapshot::Snapshot;
use crate::schedule;
use crate::watch::shared::Shared;

/// After `pool.close()`, how long the watch keeps counting connections as they close. sqlx 0.8
/// can leave one open for good (docs/lifecycle.md), so the count must not go on forever.
const CLOSE_DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// The sample and census task, restarted after a panic (with backoff); then it closes the
/// watch's connections.
pub(super) async fn run(shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut panics = 0u32;
    let stopped = loop {
        let watch = schedule::Supervised::new(watch_until_stopped(&shared, &mut stop), &shared.state.faults[0]);
        match watch.await {
            Ok(stopped) => break stopped,
            Err(message) => {
                panics = panics.saturating_add(1);
                shared.health.liveness.watch_lost();
                shared.update(|s| s.census_up = false);
                if let Some(stopped) = shared.after_panic("watch", &message, panics, &mut stop).await {
                    break stopped;
                }
            }
        }
    };
    // Stopped before the re-tag ran: give the idle connections back, or `pool.close()` waits.
    drop(shared.ledger.untagged.lock().map(|mut held| std::mem::take(&mut *held)));
    shared.ledger.direct.lock().await.close().await;
    if let Some(pooler) = &shared.ledger.pooler {
        pooler.lock().await.close().await;
    }
    if let (false, Some(l)) = (stopped, &shared.acquire.lifecycle) {
        // The pool closed: count its connections as they close (checked-out ones close when
        // given back), until none is left, the watch is dropped, or CLOSE_DRAIN_LIMIT passed.
        let until = schedule::after(tokio::time::Instant::now(), CLOSE_DRAIN_LIMIT);
        loop {
            shared.metrics.lifecycle(&l.read());
            if shared.pool.size() == 0 {
                break;
            }
            if tokio::time::Instant::now() >= until {
                tracing::debug!(
                    pool = %shared.config.pool_name,
                    open = shared.pool.size(),
                    "pool closed; stopped counting its last connections"
                );
                break;
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(schedule::bounded(shared.config.sample_interval)) => {}
            }
        }
    }
    // The watch is over: its series leave poolwatch's exporter once nothing holds them.
    crate::export::pool_ended(&shared.config.pool_name);
}

/// The heartbeat task, restarted after a panic (with backoff).
pub(super) async fn supervise_heartbeat(s: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let lint_app_name = s.tag.census_app_name.replacen("poolwatch-census:", "poolwatch-lint:", 1);
    let mut panics = 0u32;
    loop {
        let beat = async {
            // Not before the idle connections are re-tagged and back in the pool.
            s.ledger.retagged.get_or_init(|| s.retag_idle()).await;
            let parts = crate::health::heartbeat::Parts {
                pool: &s.pool,
                direct: &s.ledger.direct,
                lint_app_name: &lint_app_name,
                activity: &s.acquire.probe.activity,
                trouble: &s.acquire.probe.trouble,
            };
            s.health.heartbeat.run(parts, &s.config, &mut stop).await
        };
        match schedule::Supervised::new(beat, &s.state.faults[1]).await {
            Ok(()) => return,
            Err(message) => {
                panics = panics.saturating_add(1);
                s.health.liveness.heartbeat_lost();
                s.health.heartbeat.forget();
                if s.after_panic("heartbeat", &message, panics, &mut stop).await.is_some() {
                    return;
                }
            }
        }
    }
}

impl Shared {
    /// After a task panicked: logs it once, counts it, clears the locks it poisoned and waits
    /// before the restart (1 s, 2 s … 60 s, ±20 %). `Some`: stopped meanwhile (`true` by the
    /// handle, `false` by the pool closing).
    async fn after_panic(
        &self,
        task: &'static str,
        message: &str,
        panics: u32,
        stop: &mut oneshot::Receiver<()>,
    ) -> Option<bool> {
        let wait = schedule::backoff(Duration::from_secs(1), Duration::from_secs(60), panics);
        tracing::error!(
            pool = %self.config.pool_name,
            task,
            panics,
            panic = message,
            "poolwatch background task panicked (a bug in poolwatch: please report it); its figures read unknown \
             until it restarts in {wait:?}"
        );
        self.metrics.task_restarted(task);
        self.state.latest.clear_poison();
        self.state.gaps.clear_poison();
        self.state.disagreement.clear_poison();
        self.health.reach.clear_poison();
        self.metrics.reach.clear_poison();
        self.ledger.untagged.clear_poison();
        self.ledger.ended.clear_poison();
        self.ledger.client_idle_timeout.clear_poison();
        if let Ok(mut ended) = self.ledger.ended.lock() {
            ended.forget();
        }
        tokio::select! {
            _ = &mut *stop => Some(true),
            _ = self.pool.close_event() => Some(false),
            _ = tokio::time::sleep(wait) => None,
        }
    }

    /// One sample, its liveness stamp, and whether a reachability probe is wanted.
    async fn sample_tick(&self) -> bool {
        self.sample().await;
        let mine = u32::try_from(self.health.heartbeat.holding()).unwrap_or(u32::MAX);
        let pool = crate::ledger::snapshot::PoolFigures::of(&self.pool);
        self.acquire.probe.activity.look(pool.open, pool.used > mine);
        self.health.liveness.sampled(self.heartbeat_count());
        self.health.reach.wanted(self.connect_trouble(), self.config.sample_interval.saturating_mul(10))
    }
}

/// How soon a reachability probe follows the connect trouble that wants it (±20 %, so a
/// fleet that saw one outage does not probe the recovering server at one instant).
const REACH_SOON: Duration = Duration::from_secs(5);

/// Returns `true` when stopped by the handle, `false` when the pool closed.
async fn watch_until_stopped(shared: &Shared, stop: &mut oneshot::Receiver<()>) -> bool {
    let closed = shared.pool.close_event();
    tokio::pin!(closed);
    tokio::select! {
        _ = &mut *stop => return true,
        _ = &mut closed => return false,
        _ = shared.ledger.retagged.get_or_init(|| shared.retag_idle()) => {}
    }
    let config = &shared.config;
    let mut sample = schedule::interval(config.sample_interval);
    let scan_every = shared.acquire.probe.leaks.scan_every();
    let mut leak_scan = schedule::interval(scan_every.unwrap_or(Duration::from_secs(3600)));
    // The first census and probe at once (they learn the peers and the ports), then each
    // on its own jittered schedule.
    let census_at = tokio::time::sleep(Duration::ZERO);
    let reach_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(census_at, reach_at);
    let mut plan = CensusPlan { first: true, ..CensusPlan::default() };
    let mut reach_plan = ReachPlan::default();
    let floor = config.sample_interval.saturating_mul(10);
    loop {
        tokio::select! {
            _ = &mut *stop => return true,
            _ = &mut closed => return false,
            _ = sample.tick() => {
                let wanted = tokio::select! {
                    _ = &mut *stop => return true,
                    _ = &mut closed => return false,
                    wanted = shared.sample_tick() => wanted,
                };
                let soon = schedule::after(tokio::time::Instant::now(), schedule::jitter(config.sample_interval.min(REACH_SOON)));
                if wanted && !plan.first && reach_at.deadline() > soon {
                    reach_at.as_mut().reset(soon);
                }
            }
            _ = leak_scan.tick(), if scan_every.is_some() => { shared.acquire.probe.leaks.scan(); }
            _ = &mut reach_at, if !plan.first => tokio::select! {
                _ = &mut *stop => return true,
                _ = &mut closed => return false,
                clean = shared.probe_reach() => {
                    let next = reach_plan.next(clean, config.reach_interval);
                    reach_at.as_mut().reset(schedule::after(tokio::time::Instant::now(), next));
                }
            },
            wanted = async {
                tokio::select! {
                    _ = &mut census_at => false,
                    _ = shared.state.census_wanted.notified() => true,
                }
            } => {
                if let Some(due) = plan.held_back(wanted, floor) {
                    // Censuses run by disagreements: at most one per 10 samples; later ones
                    // wait for that (a flapping gap cannot turn into a census per sample).
                    if census_at.deadline() > due {
                        census_at.as_mut().reset(due);
                    }
                    continue;
                }
                let result = tokio::select! {
                    _ = &mut *stop => return true,
                    _ = &mut closed => return false,
                    result = shared.census() => result,
                };
                if wanted {
                    tracing::debug!(pool = %config.pool_name, "census run by the client-side ledger");
                }
                let confirmed = shared.ledger_confirmed_since_census();
                let quiet = !wanted && confirmed;
                let next = plan.next(&result, config.census_interval, quiet);
                census_at.as_mut().reset(schedule::after(tokio::time::Instant::now(), next));
                if std::mem::take(&mut plan.first) {
                    // The first census resolved the peers: the ledger can read sockets now.
                    shared.sample().await;
                }
            }
        }
    }
}

/// A census that saw a session in one of these states this long, or lock waiters, or a
/// phantom gap, is confirmed by a follow-up soon (see [`CensusPlan::next`]).
const CONFIRM_AFTER: Duration = Duration::from_secs(60);

/// When the next census runs: every `census_interval` (±20 %); sooner after a failure
/// (5 s, 10 s … ±20 %, see [`schedule::census_retry`]); and a follow-up 45 s (±20 %) after a
/// census that saw something to confirm, then 90 s, 180 s … back to the interval while it
/// stays. So one failure or one glimpse of a lock wait does not hold its figure for 15 min.
///
/// While the client-side ledger confirms the pool (see
/// [`Shared::ledger_confirmed_since_census`]) the census has nothing to add but a silent peer,
/// so its wait doubles after each quiet census, up to [`schedule::CENSUS_STRETCH`] × the
/// interval (900 s → 1,800 s … 6 h); the first census that is not quiet (a disagreement, a
/// failure, something to confirm) brings the interval back.
#[derive(Debug, Default)]
struct CensusPlan {
    first: bool,
    last: Option<tokio::time::Instant>,
    failures: u32,
    follow_ups: u32,
    /// Quiet censuses in a row: the stretch.
    quiet: u32,
}

/// When the next scheduled reachability probe runs: `reach_interval` (±20 %) after a probe
/// that found an address down or followed connect trouble; after clean ones, doubling up to
/// [`schedule::REACH_STRETCH`] × the interval. Trouble and down addresses bring probes sooner
/// anyway (`Reach::wanted`): the scheduled probe only finds a dead address no connect has hit
/// yet.
#[derive(Debug, Default)]
struct ReachPlan {
    clean: u32,
}

impl ReachPlan {
    /// Records whether the probe was clean; returns the wait before the next.
    fn next(&mut self, clean: bool, interval: Duration) -> Duration {
        self.clean = if clean { self.clean.saturating_add(1) } else { 0 };
        schedule::stretched(interval, self.clean.saturating_sub(1), schedule::REACH_STRETCH)
    }
}

impl CensusPlan {
    /// The time a census woken by the client-side ledger waits for (`floor` after the last),
    /// `None` when it may run now.
    fn held_back(&self, wanted: bool, floor: Duration) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.last.map(|at| schedule::after(at, floor)).filter(|due| wanted && now < *due)
    }

    /// Records a census's outcome; `quiet`: the client-side ledger confirmed the pool at every
    /// sample since the last census. Returns the wait before the next.
    fn next(&mut self, result: &Result<Snapshot, Cause>, interval: Duration, quiet: bool) -> Duration {
        self.last = Some(tokio::time::Instant::now());
        match result {
            Err(_) => {
                (self.quiet, self.failures) = (0, self.failures.saturating_add(1));
                schedule::census_retry(interval, self.failures)
            }
            Ok(snapshot) if needs_confirming(snapshot) => {
                (self.quiet, self.failures) = (0, 0);
                self.follow_ups = self.follow_ups.saturating_add(1);
                let first = Duration::from_secs(45).min(interval / 2);
                schedule::backoff(first, schedule::bounded(interval), self.follow_ups)
            }
            Ok(_) => {
                // A quiet census after a follow-up or a failure is not yet a quiet streak.
                let calm = quiet && self.failures == 0 && self.follow_ups == 0;
                self.quiet = if calm { self.quiet.saturating_add(1) } else { 0 };
                (self.failures, self.follow_ups) = (0, 0);
                schedule::stretched(interval, self.quiet, schedule::CENSUS_STRETCH)
            }
        }
    }
}

/// Whether a census saw something its figures would otherwise hold for a whole interval:
/// lock waiters, a transaction or statement open [`CONFIRM_AFTER`], a phantom gap.
fn needs_confirming(s: &Snapshot) -> bool {
    let long = ["idle_in_transaction", "idle_in_transaction_aborted", "active"];
    s.phantom.is_some_and(|p| p != 0)
        || s.server
            .as_ref()
            .is_some_and(|c| c.lock_waiters > 0 || long.iter().any(|state| c.longest_in(state) >= CONFIRM_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(lock_waiters: u32, active_for: u64, phantom: i64) -> Result<Snapshot, Cause> {
        let mut longest = [Duration::ZERO; 7];
        longest[0] = Duration::from_secs(active_for);
        let server = crate::ledger::census::ServerCensus {
            lock_waiters,
            longest,
            ..crate::ledger::census::ServerCensus::default()
        };
        Ok(Snapshot { server: Some(server), phantom: Some(phantom), census_up: true, ..Snapshot::default() })
    }

    #[test]
    fn a_failed_census_is_retried_within_seconds_not_at_the_next_tick() {
        let mut plan = CensusPlan::default();
        let interval = Duration::from_secs(900);
        let waits: Vec<u64> = (0..8).map(|_| plan.next(&Err(Cause::TimedOut), interval, true).as_secs()).collect();
        assert!((4..=6).contains(&waits[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 144), "capped well below the interval: {waits:?}");
        assert!(waits[3] > waits[0], "backs off: {waits:?}");
        let normal = plan.next(&census(0, 0, 0), interval, true).as_secs();
        assert!((720..=1080).contains(&normal), "{normal}");
    }

    #[test]
    fn what_needs_confirming_is_confirmed_soon_then_less_often() {
        let interval = Duration::from_secs(900);
        for seen in [census(1, 0, 0), census(0, 61, 0), census(0, 0, 2)] {
            let mut plan = CensusPlan::default();
            let waits: Vec<u64> = (0..6).map(|_| plan.next(&seen, interval, true).as_secs()).collect();
            assert!((36..=54).contains(&waits[0]), "{waits:?}");
            assert!((72..=108).contains(&waits[1]), "{waits:?}");
            assert!(waits[5] >= 720 && waits.iter().all(|w| *w <= 1080), "{waits:?}");
            let clear = plan.next(&census(0, 0, 0), interval, true).as_secs();
            assert!((720..=1080).contains(&clear), "{clear}");
        }
        let state = crate::ledger::census::SESSION_STATES.iter().position(|s| *s == "active");
        assert_eq!(state, Some(0), "the test's `longest[0]` is `active`");
    }

    /// Censuses over a simulated day: `quiet(n)` says whether the ledger confirmed the pool
    /// before the n-th census. Returns the waits.
    fn day(plan: &mut CensusPlan, interval: Duration, quiet: impl Fn(usize) -> bool) -> Vec<u64> {
        let (mut at, mut waits) = (Duration::ZERO, Vec::new());
        while at < Duration::from_secs(86_400) {
            let wait = plan.next(&census(0, 0, 0), interval, quiet(waits.len()));
            at += wait;
            waits.push(wait.as_secs());
        }
        waits
    }

    #[test]
    fn while_the_ledger_confirms_the_pool_the_census_stretches_to_six_hours() {
        let interval = Duration::from_secs(900);
        let waits = day(&mut CensusPlan::default(), interval, |_| true);
        for (i, base) in [1800u64, 3600, 7200, 14_400, 21_600, 21_600].iter().enumerate() {
            assert!(waits[i] * 10 >= base * 8 && waits[i] * 10 <= base * 12, "wait {i}: {waits:?}");
        }
        assert!(waits.iter().all(|w| *w <= 25_920), "at most 6 h + 20 %: {waits:?}");
        // The base cadence is 96 censuses a day (± jitter); a quiet day is a tenth of that.
        assert!(waits.len() <= 10, "{} censuses in a quiet day: {waits:?}", waits.len());
        let base = day(&mut CensusPlan::default(), interval, |_| false);
        assert!(base.len() >= 80 && base.iter().all(|w| (720..=1080).contains(w)), "no ledger: {base:?}");
    }

    #[test]
    fn a_disagreement_a_failure_or_something_to_confirm_brings_the_interval_back() {
        let interval = Duration::from_secs(900);
        let base = |w: Duration| (720..=1080).contains(&w.as_secs());
        let stretched = || {
            let mut plan = CensusPlan::default();
            day(&mut plan, interval, |_| true);
            plan
        };
        let mut plan = stretched();
        assert!(base(plan.next(&census(0, 0, 0), interval, false)), "a sample disagreed");
        assert!(plan.next(&census(0, 0, 0), interval, true) <= Duration::from_secs(2160), "then it stretches anew");
        let mut plan = stretched();
        plan.next(&Err(Cause::TimedOut), interval, true);
        assert!(base(plan.next(&census(0, 0, 0), interval, true)), "after a failure");
        let mut plan = stretched();
        plan.next(&census(1, 0, 0), interval, true);
        assert!(base(plan.next(&census(0, 0, 0), interval, true)), "after a follow-up");
        // A tiny interval and `Duration::MAX` stay bounded.
        let mut plan = CensusPlan::default();
        let tiny: Vec<Duration> = (0..40).map(|_| plan.next(&census(0, 0, 0), Duration::from_nanos(1), true)).collect();
        assert!(tiny.iter().all(|w| *w <= Duration::from_nanos(29)), "{tiny:?}");
        let mut plan = CensusPlan::default();
        (0..40)
            .for_each(|_| assert!(plan.next(&census(0, 0, 0), Duration::MAX, true) <= schedule::HORIZON.mul_f64(1.2)));
    }

    #[test]
    fn clean_reachability_probes_stretch_to_a_day_and_any_trouble_brings_3_hours_back() {
        let interval = Duration::from_secs(10_800);
        let mut plan = ReachPlan::default();
        let clean: Vec<u64> = (0..6).map(|_| plan.next(true, interval).as_secs()).collect();
        for (i, base) in [10_800u64, 21_600, 43_200, 86_400, 86_400, 86_400].iter().enumerate() {
            assert!(clean[i] * 10 >= base * 8 && clean[i] * 10 <= base * 12, "wait {i}: {clean:?}");
        }
        let after_trouble = plan.next(false, interval).as_secs();
        assert!((8640..=12_960).contains(&after_trouble), "{after_trouble}");
        let again = plan.next(true, interval).as_secs();
        assert!((8640..=12_960).contains(&again), "the first clean probe after trouble: {again}");
    }
}
