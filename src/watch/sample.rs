//! One sample: the pool's counters and its client-side ledger (the process's own sockets), at
//! every `sample_interval`. No server cost, except to count sessions that ended. It reads
//! the ledger, computes one [`SampleFigures`] and hands it to the publishing layer once.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::acquire::lifecycle::Published;
use crate::cause::Cause;
use crate::ledger::attribution::NetworkPath;
use crate::ledger::census::settle::RECHECK;
use crate::ledger::ended::{Counters, Evidence};
use crate::ledger::loss::ServerFacts;
use crate::ledger::snapshot::PoolFigures;
use crate::ledger::sockets::{self, SocketCensus};
use crate::publish::pool::SampleFigures;
use crate::schedule;
use crate::watch::shared::Shared;

impl Shared {
    /// The pool's counters and its client-side ledger, computed into one [`SampleFigures`]
    /// and published once. A gap is read again 50 ms later (a connection being opened or
    /// closed disagrees for a moment); a gap still there that differs from the last one wakes
    /// a census.
    pub(super) async fn sample(&self) {
        let lifecycle = self.acquire.lifecycle.as_ref().map(Published::read);
        let mut figures = PoolFigures::of(&self.pool);
        let linting = || self.health.heartbeat.linting.load(Ordering::Relaxed);
        if linting() {
            // The lint's short-lived connection would read as a socket the pool does not count.
            self.metrics.sample(&SampleFigures { pool: figures, lifecycle, ..SampleFigures::default() });
            self.update(|s| s.pool = figures);
            return;
        }
        let (_, oldest_wait) = self.acquire.probe.waiters();
        let released = self.acquire.lifecycle.as_ref().map(Published::released_not_idle);
        // The pool heartbeat's own checkout is not the app's.
        let watched = self.acquire.probe.leaks.checked_out_if_used().map(|n| n + self.health.heartbeat.holding());
        let stranded = self.acquire.stranded.read(&self.pool, watched, released);
        let mut sockets = self.ledger.client.read(figures.open).await;
        let gap = |f: &PoolFigures, s: &Option<SocketCensus>| {
            s.as_ref().map(|s| i64::from(f.open) - i64::from(s.get("established")))
        };
        if gap(&figures, &sockets).is_some_and(|g| g != 0) {
            tokio::time::sleep(RECHECK).await;
            figures = PoolFigures::of(&self.pool);
            sockets = self.ledger.client.read(figures.open).await;
        }
        let base = SampleFigures {
            pool: figures,
            lifecycle,
            oldest_wait: Some(oldest_wait),
            stranded,
            ..SampleFigures::default()
        };
        if linting() {
            self.metrics.sample(&base);
            self.update(|s| s.pool = figures);
            return;
        }
        let client_gap = gap(&figures, &sockets);
        // Send queues are watched at every sample (a census is rare).
        let stuck_send_queues = sockets.as_ref().map(|s| self.ledger.send_queues.update(s));
        let ended = match &sockets {
            Some(s) => self.follow_ended(s, figures.open).await,
            None => Vec::new(),
        };
        if let (Some(s), Some(g)) = (&sockets, client_gap) {
            self.wake_census_on_disagreement(g, s.unattributed);
        }
        let unattributed = sockets.as_ref().map(|s| s.unattributed);
        let held = self.held_over_samples(figures.used);
        self.ledger_sampled(client_gap == Some(0) && unattributed == Some(0) && ended.is_empty() && !held);
        self.metrics.sample(&SampleFigures {
            sockets: sockets.as_ref().zip(client_gap),
            stuck_send_queues,
            ended: &ended,
            ..base
        });
        let ended = self.count_ended(ended.len());
        self.update(|s| {
            s.pool = figures;
            s.sockets = sockets;
            s.client_gap = client_gap;
            s.sessions_ended = ended;
        });
    }

    /// Whether the app held a connection at this sample and the last one (a transaction or
    /// lock wait the census would look for). One sample is not enough: the pool heartbeat's
    /// connection reads checked out for a moment after it is given back.
    fn held_over_samples(&self, used: u32) -> bool {
        let mine = u32::try_from(self.health.heartbeat.holding()).unwrap_or(u32::MAX);
        let held = used > mine;
        self.state.held.swap(held, Ordering::Relaxed) && held
    }

    /// A client-side gap (or unattributed sockets) that differs from the last one wakes a census.
    fn wake_census_on_disagreement(&self, gap: i64, unattributed: u32) {
        let now = (gap, unattributed);
        let wake = self.state.disagreement.lock().is_ok_and(|mut last| {
            let changed = *last != now;
            *last = now;
            changed && now != (0, 0)
        });
        if wake {
            tracing::debug!(pool = %self.config.pool_name, client_gap = gap, unattributed, "client-side ledger disagrees with the pool; census now");
            self.state.census_wanted.notify_one();
        }
    }

    /// Follows the pool's sockets from sample to sample (see `ledger::ended`): a session the
    /// server or a pooler ended is counted within two samples, whatever the census cadence.
    /// Costs nothing while no socket ends; then one read of the kernel's sockets and, on a
    /// direct path, one small query for the server's session-end counters. Returns the
    /// causes of the sessions found ended.
    async fn follow_ended(&self, census: &SocketCensus, pool_open: u32) -> Vec<Cause> {
        let at = Instant::now();
        let open: Vec<(u64, u16, usize)> = census
            .sockets
            .iter()
            .filter(|s| self.ledger.client.owns_port(s.local.port()))
            .filter_map(|s| Some((s.inode, s.local.port(), sockets::TCP_STATES.iter().position(|n| *n == s.state)?)))
            .collect();
        let Some(gone) = self.ledger.ended.lock().ok().map(|mut l| l.follow(&open, at, pool_open)) else {
            return Vec::new();
        };
        // Behind a pooler a gone socket cannot be confirmed (see `ledger::ended`): not read.
        if !gone.is_empty() && self.path != NetworkPath::Pooler {
            // What the kernel still holds of them tells who closed first.
            let list = sockets::list_blocking(Some(&self.ledger.client.peers()), None).await;
            if let (Some(list), Ok(mut ledger)) = (list, self.ledger.ended.lock()) {
                ledger.suspect_gone(gone, &list);
            }
        }
        if !self.ledger.ended.lock().is_ok_and(|l| l.pending()) {
            return Vec::new();
        }
        let counters = if self.path == NetworkPath::Pooler {
            Counters::NotServer
        } else {
            // Bounded like the census: a heartbeat stuck on the connection must not stall samples.
            match tokio::time::timeout(schedule::bounded(self.config.census_timeout), self.ledger.direct.lock()).await {
                Ok(mut direct) => match direct.run(async |c| ServerFacts::read(c).await).await {
                    Ok(facts) => Counters::Read(facts.ends),
                    Err(_) => Counters::Unread,
                },
                Err(_) => Counters::Unread,
            }
        };
        let client_idle_timeout = match &self.ledger.pooler {
            Some(p) => p.try_lock().ok().and_then(|c| c.client_idle_timeout).or_else(|| {
                // A census holds the admin connection: what the last one read.
                self.ledger.client_idle_timeout.lock().ok().and_then(|t| *t)
            }),
            None => None,
        };
        let evidence = Evidence {
            ends: None,
            idle_session_timeout: self.health.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
            client_idle_timeout,
        };
        let causes = self.ledger.ended.lock().map(|mut l| l.settle(counters, evidence)).unwrap_or_default();
        if !causes.is_empty() {
            tracing::debug!(pool = %self.config.pool_name, ?causes, "sessions of the pool ended without the pool closing them");
        }
        causes
    }
}
