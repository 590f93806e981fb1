//! Sessions of the pool that ended without the pool closing them: a server kill
//! (`pg_terminate_backend`, `idle_session_timeout`), a pooler kill (`client_idle_timeout`), a
//! proxy. sqlx replaces such a connection on the next acquire without a word; the census sees it.
//!
//! Between two censuses a session of the pool (matched by port) vanishes from the server (or
//! from the pooler's `SHOW CLIENTS`). Who closed it first is in the kernel: the side that
//! closes first keeps a `time_wait` socket (~60 s on Linux); the side that is closed on sits
//! in `close_wait` until it closes too. So a vanished session is counted when this process's
//! socket of it is in `close_wait` (nobody noticed yet), or is gone without leaving a
//! `time_wait` behind (the pool noticed, after the peer), or lingers in `last_ack`. One the
//! pool closed itself (`idle_timeout`, `max_lifetime`, `close()`) lingers in `fin_wait1`,
//! `fin_wait2`, `closing` or `time_wait` and is not counted.
//! Censuses further apart than [`MAX_GAP`] count only the `close_wait` case (a `time_wait`
//! may have expired). A server session whose socket is already gone is counted only if the
//! database's session-end counters (killed, FATAL) grew meanwhile, where they can be read: a
//! pool's own close can race the server's reply to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Cause;
use crate::ledger::sockets::{CLOSE, CLOSE_WAIT, LAST_ACK, Socket};
use crate::listener::loss::{SessionEnds, explain_silent_loss};

/// Censuses further apart than this cannot trust a missing `time_wait` (Linux keeps one 60 s).
pub(crate) const MAX_GAP: Duration = Duration::from_secs(50);

/// What the last census saw of one session: how long it had been idle (server), or whether
/// it was linked to a server connection (pooler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A server session; `Some(d)`: idle for `d` at the census.
    Server(Option<Duration>),
    /// A pooler client; `true`: linked to a server connection.
    PoolerClient(bool),
}

/// What the server or pooler says about why sessions end (read at each census).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Evidence {
    /// The database's session-end counters (PostgreSQL 14+).
    pub(crate) ends: Option<SessionEnds>,
    /// The server's `idle_session_timeout` for the pool's sessions.
    pub(crate) idle_session_timeout: Option<Duration>,
    /// The pooler's `client_idle_timeout`.
    pub(crate) client_idle_timeout: Option<Duration>,
}

/// The previous census's sessions of the pool, by local port.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    last: Option<(Instant, HashMap<u16, Seen>, Option<SessionEnds>)>,
}

/// Sessions that ended without the pool closing them since the last census.
#[derive(Debug, Default)]
pub(crate) struct Vanished {
    /// Each session, and whether this process still holds its socket closed by the peer
    /// (sure) or the socket is gone (the pool dropped it: a close of its own may have raced
    /// the server's, so a server session then needs the server's counters to agree).
    seen: Vec<(Seen, bool)>,
    gap: Duration,
    ends_before: Option<SessionEnds>,
}

impl Vanished {
    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether the server's session-end counters in `ends` have caught up with the server
    /// sessions that vanished (or cannot tell: no counters). A backend leaves
    /// `pg_stat_activity` a moment before it flushes them, longer on a loaded server.
    pub(crate) fn counted_by(&self, ends: Option<SessionEnds>) -> bool {
        let servers = self.seen.iter().filter(|(s, _)| matches!(s, Seen::Server(_))).count() as i64;
        match (self.ends_before, ends) {
            (Some(b), Some(a)) => a.killed + a.fatal - b.killed - b.fatal >= servers,
            _ => true,
        }
    }

    /// Their causes, from what the server or pooler says now.
    pub(crate) fn causes(&self, evidence: Evidence) -> Vec<Cause> {
        let ended_on_server = match (self.ends_before, evidence.ends) {
            (Some(b), Some(a)) if a.killed >= b.killed && a.fatal >= b.fatal => {
                Some(a.killed + a.fatal > b.killed + b.fatal)
            }
            _ => None,
        };
        self.seen
            .iter()
            .filter(|(seen, sure)| *sure || !matches!(seen, Seen::Server(_)) || ended_on_server != Some(false))
            .map(|(seen, _)| cause(*seen, self.gap, self.ends_before, evidence))
            .collect()
    }
}

impl Ledger {
    /// Records this census's sessions (and the server's session-end counters) and returns those
    /// that ended without the pool closing them since the last one.
    #[cfg(test)]
    pub(crate) fn update(
        &mut self,
        now: HashMap<u16, Seen>,
        sockets: &[Socket],
        ends: Option<SessionEnds>,
    ) -> Vanished {
        self.update_read_at(now, sockets, ends, Instant::now())
    }

    /// As `update`, for sessions read from the server at `at`: taken just before the query,
    /// so the gap between two censuses is the gap between their readings of the server's idle
    /// times (a census slowed after its query by a loaded machine does not shrink the next
    /// gap, and an idle time is not underestimated).
    pub(crate) fn update_read_at(
        &mut self,
        now: HashMap<u16, Seen>,
        sockets: &[Socket],
        ends: Option<SessionEnds>,
        at: Instant,
    ) -> Vanished {
        let mut vanished = Vanished::default();
        if let Some((then, before, ends_before)) = self.last.take() {
            let gap = at.duration_since(then);
            vanished.gap = gap;
            vanished.ends_before = ends_before;
            for (port, seen) in before.iter().filter(|(p, _)| !now.contains_key(p)) {
                let (by_peer, sure) = match sockets.iter().find(|s| s.local.port() == *port) {
                    // Closed on by the peer: close_wait / close (reset) still open here, or
                    // last_ack (closed here after).
                    Some(s) => {
                        let by_peer = [CLOSE_WAIT, CLOSE, LAST_ACK].contains(&s.state);
                        (by_peer, by_peer && s.owned)
                    }
                    // Gone without a time_wait: the pool closed it after the peer did.
                    None => (gap <= MAX_GAP, false),
                };
                if by_peer {
                    vanished.seen.push((*seen, sure));
                }
            }
        }
        self.last = Some((at, now, ends));
        vanished
    }

    /// Forgets the last census (it failed: the next one starts afresh).
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }
}

/// Slack on the idle time of a vanished session: the server's clock against ours, and the
/// census's own duration, so a session killed right at `idle_session_timeout` is named so.
const IDLE_SLACK: Duration = Duration::from_millis(250);

fn cause(seen: Seen, gap: Duration, ends_before: Option<SessionEnds>, evidence: Evidence) -> Cause {
    match seen {
        Seen::Server(idle_for) => {
            // Idle at the last census: idle for up to the gap more when it ended.
            let idle_for = idle_for.map_or(Duration::ZERO, |d| d + gap + IDLE_SLACK);
            explain_silent_loss(idle_for, evidence.idle_session_timeout, ends_before, evidence.ends).0
        }
        Seen::PoolerClient(linked) => match evidence.client_idle_timeout {
            // PgBouncer applies client_idle_timeout only to clients not linked to a server.
            Some(_) if !linked => Cause::PoolerIdleTimeout,
            _ => Cause::ConnectionEnded,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(port: u16, state: usize, owned: bool) -> Socket {
        Socket { local: std::net::SocketAddr::from(([127, 0, 0, 1], port)), state, owned, inode: 0, send: 0, recv: 0 }
    }

    #[test]
    fn vanished_sessions_count_only_when_the_peer_closed_first() {
        let idle = Seen::Server(Some(Duration::from_secs(5)));
        let mut ledger = Ledger::default();
        let first: HashMap<u16, Seen> = [(1, idle), (2, idle), (3, idle), (4, idle)].into();
        assert!(ledger.update(first, &[], None).is_empty(), "nothing before the first census");
        let sockets = [
            socket(1, CLOSE_WAIT, true), // the server closed it, the pool has not noticed
            socket(2, crate::ledger::sockets::TIME_WAIT, false), // the pool closed it first
            socket(4, 0, true),          // still established: not counted
        ];
        let evidence = Evidence { idle_session_timeout: Some(Duration::from_secs(1)), ..Evidence::default() };
        let ended = ledger.update(HashMap::new(), &sockets, None).causes(evidence);
        // 1 (close_wait) and 3 (gone, no time_wait: the pool dropped it after the peer closed).
        assert_eq!(ended, vec![Cause::IdleSessionTimeout; 2]);
        // Gone socket, counters readable and flat: the pool's own close raced the server's.
        let ends = Some(SessionEnds { killed: 3, fatal: 4 });
        ledger.update([(5, idle), (6, idle)].into(), &[], ends);
        let flat = Evidence { ends, ..Evidence::default() };
        assert!(ledger.update(HashMap::new(), &[], ends).causes(flat).is_empty());
        ledger.update([(5, idle)].into(), &[], ends);
        let grew = Evidence { ends: Some(SessionEnds { killed: 4, fatal: 4 }), ..Evidence::default() };
        assert_eq!(ledger.update(HashMap::new(), &[], ends).causes(grew), vec![Cause::AdminShutdown]);
        let clients: HashMap<u16, Seen> = [(7, Seen::PoolerClient(false)), (8, Seen::PoolerClient(true))].into();
        ledger.update(clients, &[], None);
        let evidence = Evidence { client_idle_timeout: Some(Duration::from_secs(1)), ..Evidence::default() };
        let mut ended = ledger.update(HashMap::new(), &[], None).causes(evidence);
        ended.sort_by_key(|c| c.as_str());
        assert_eq!(ended, vec![Cause::ConnectionEnded, Cause::PoolerIdleTimeout]);
    }

    #[test]
    fn the_counters_are_read_again_until_they_count_the_vanished_sessions() {
        let idle = Seen::Server(Some(Duration::from_secs(5)));
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let mut ledger = Ledger::default();
        ledger.update([(1, idle), (2, idle)].into(), &[], ends(0, 10));
        let closed = [socket(1, CLOSE_WAIT, true), socket(2, CLOSE_WAIT, true)];
        let vanished = ledger.update(HashMap::new(), &closed, ends(0, 10));
        assert!(!vanished.counted_by(ends(0, 10)), "not flushed yet");
        assert!(!vanished.counted_by(ends(0, 11)), "one of two");
        assert!(vanished.counted_by(ends(1, 11)));
        assert!(vanished.counted_by(None), "no counters: nothing to wait for");
        // Pooler clients are not in the server's counters.
        ledger.update([(3, Seen::PoolerClient(false))].into(), &[], ends(0, 0));
        assert!(ledger.update(HashMap::new(), &[], ends(0, 0)).counted_by(ends(0, 0)));
    }
}
