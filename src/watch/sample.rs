//! One sample: the pool's counters and its client-side ledger (the process's own sockets), at
//! every `sample_interval`. No server cost, except to count sessions that ended.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::ledger::attribution::NetworkPath;
use crate::ledger::census::settle::RECHECK;
use crate::ledger::ended::{Counters, Evidence};
use crate::ledger::loss::ServerFacts;
use crate::ledger::snapshot::PoolFigures;
use crate::ledger::sockets::{self, SocketCensus};
use crate::schedule;
use crate::watch::shared::Shared;

impl Shared {
    /// The pool's counters and its client-side ledger. A gap is read again 50 ms later (a
    /// connection being opened or closed disagrees for a moment); a gap still there that
    /// differs from the last one wakes a census.
    pub(super) async fn sample(&self) {
        if let Some(l) = &self.lifecycle {
            l.update();
        }
        let mut figures = PoolFigures::of(&self.pool);
        self.gauges.pool(&figures);
        let linting = || self.heartbeat.linting.load(Ordering::Relaxed);
        if linting() {
            // The lint's short-lived connection would read as a socket the pool does not count.
            self.update(|s| s.pool = figures);
            return;
        }
        self.probe.sample_waiters();
        let released = self.lifecycle.as_ref().map(crate::acquire::lifecycle::Published::released_not_idle);
        // The pool heartbeat's own checkout is not the app's.
        let watched = self.probe.leaks.checked_out_if_used().map(|n| n + self.heartbeat.holding());
        self.stranded.sample(&self.pool, watched, released);
        let mut sockets = self.client.read(figures.open).await;
        let gap = |f: &PoolFigures, s: &Option<SocketCensus>| {
            s.as_ref().map(|s| i64::from(f.open) - i64::from(s.get("established")))
        };
        if gap(&figures, &sockets).is_some_and(|g| g != 0) {
            tokio::time::sleep(RECHECK).await;
            figures = PoolFigures::of(&self.pool);
            self.gauges.pool(&figures);
            sockets = self.client.read(figures.open).await;
        }
        if linting() {
            self.update(|s| s.pool = figures);
            return;
        }
        let client_gap = gap(&figures, &sockets);
        if let Some(s) = &sockets {
            // Send queues are watched at every sample (a census is rare).
            self.send_queues.update(s);
        }
        if let Some(s) = &sockets {
            self.follow_ended(s, figures.open).await;
        }
        if let (Some(s), Some(g)) = (&sockets, client_gap) {
            self.gauges.sockets(s, g);
            let now = (g, s.unattributed);
            let wake = self.disagreement.lock().is_ok_and(|mut last| {
                let changed = *last != now;
                *last = now;
                changed && now != (0, 0)
            });
            if wake {
                tracing::debug!(pool = %self.config.pool_name, client_gap = g, unattributed = s.unattributed, "client-side ledger disagrees with the pool; census now");
                self.census_wanted.notify_one();
            }
        }
        let ended = self.gauges.ended_total();
        self.update(|s| {
            s.pool = figures;
            s.sockets = sockets;
            s.client_gap = client_gap;
            s.sessions_ended = ended;
        });
    }

    /// Follows the pool's sockets from sample to sample (see `ledger::ended`): a session the
    /// server or a pooler ended is counted within two samples, whatever the census cadence.
    /// Costs nothing while no socket ends; then one read of the kernel's sockets and, on a
    /// direct path, one small query for the server's session-end counters.
    async fn follow_ended(&self, census: &SocketCensus, pool_open: u32) {
        let at = Instant::now();
        let open: Vec<(u64, u16, usize)> = census
            .sockets
            .iter()
            .filter(|s| self.client.owns_port(s.local.port()))
            .filter_map(|s| Some((s.inode, s.local.port(), sockets::TCP_STATES.iter().position(|n| *n == s.state)?)))
            .collect();
        let Some(gone) = self.ended.lock().ok().map(|mut l| l.follow(&open, at, pool_open)) else { return };
        // Behind a pooler a gone socket cannot be confirmed (see `ledger::ended`): not read.
        if !gone.is_empty() && self.path != NetworkPath::Pooler {
            // What the kernel still holds of them tells who closed first.
            let list = sockets::list_blocking(Some(&self.client.peers()), None).await;
            if let (Some(list), Ok(mut ledger)) = (list, self.ended.lock()) {
                ledger.suspect_gone(gone, &list);
            }
        }
        if !self.ended.lock().is_ok_and(|l| l.pending()) {
            return;
        }
        let counters = if self.path == NetworkPath::Pooler {
            Counters::NotServer
        } else {
            // Bounded like the census: a heartbeat stuck on the connection must not stall samples.
            match tokio::time::timeout(schedule::bounded(self.config.census_timeout), self.direct.lock()).await {
                Ok(mut direct) => match direct.run(async |c| ServerFacts::read(c).await).await {
                    Ok(facts) => Counters::Read(facts.ends),
                    Err(_) => Counters::Unread,
                },
                Err(_) => Counters::Unread,
            }
        };
        let client_idle_timeout = match &self.pooler {
            Some(p) => p.try_lock().ok().and_then(|c| c.client_idle_timeout).or_else(|| {
                // A census holds the admin connection: what the last one read.
                self.client_idle_timeout.lock().ok().and_then(|t| *t)
            }),
            None => None,
        };
        let evidence = Evidence {
            ends: None,
            idle_session_timeout: self.heartbeat.server_settings().and_then(|s| s.idle_session_timeout),
            client_idle_timeout,
        };
        let causes = self.ended.lock().map(|mut l| l.settle(counters, evidence)).unwrap_or_default();
        if !causes.is_empty() {
            tracing::debug!(pool = %self.config.pool_name, ?causes, "sessions of the pool ended without the pool closing them");
            self.gauges.sessions_ended(&causes);
        }
    }
}
