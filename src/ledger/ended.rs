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
//!
//! The census runs rarely (900 s by default) and a busy pool replaces a killed connection
//! within milliseconds, so the same rule also runs on every sample ([`Ledger::follow`]): each
//! of the pool's sockets is followed by inode. One seen in `close_wait` (or reset), or one gone
//! since the last sample with nothing of it left in the kernel but a `last_ack` (samples are
//! far closer than a `time_wait` lasts), is a suspect. One that left only a `time_wait` may
//! be a kill too (sqlx read the FATAL of a query in flight and closed before the FIN came):
//! it takes only the counters' growth the others leave. Suspects are counted when the server's
//! session-end counters, read then (one small query, only when something ended), have grown
//! by as many; otherwise one sample later, the sure ones (`close_wait`) and as many gone ones
//! as the counters grew. Behind a pooler nothing confirms a gone socket (a pool's own close
//! often races the pooler's at once), so only sure ones count there. The cause comes from the
//! same rule as the census's; a session counted by one is not counted again by the other (by
//! port, since the session was first seen).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cause::Cause;
use crate::ledger::loss::{SessionEnds, explain_silent_loss};
use crate::ledger::sockets::{CLOSE, CLOSE_WAIT, LAST_ACK, Socket, TIME_WAIT};

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

/// The previous census's sessions of the pool, by local port, and the pool's sockets followed
/// from sample to sample.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    last: Option<(Instant, HashMap<u16, Seen>, Option<SessionEnds>)>,
    follower: Follower,
    /// Ports whose session was counted (by the census or the follower), and when: neither
    /// counts a session the other counted.
    counted: HashMap<u16, Instant>,
    /// The newest session-end counters read (by a census or the follower).
    ends_known: Option<SessionEnds>,
    /// The counters' growth already explained by sessions counted (by either): both judge
    /// the growth left over, so one kill cannot confirm two sessions.
    consumed: SessionEnds,
}

/// The pool's open sockets at the last sample and the sessions found ended, not yet counted.
#[derive(Debug, Default)]
struct Follower {
    sockets: HashMap<u64, Followed>,
    /// Sockets missing from a later sample, kept by inode (never reused): one left out of a
    /// read for a while (told another client's, then not) comes back as it was.
    missing: HashMap<u64, Followed>,
    /// When the last sample read the sockets, and the session-end counters known then.
    last_read: Option<Instant>,
    ends_at_read: Option<SessionEnds>,
    pending: Vec<Suspect>,
    /// The counters known before the pending sessions ended.
    pending_base: Option<SessionEnds>,
    /// The pending sessions already waited one sample for the counters.
    waited: bool,
    /// Samples in a row whose counters could not be read while gone sockets waited for them.
    unread: u32,
}

/// One followed socket (by inode).
#[derive(Debug, Clone, Copy)]
struct Followed {
    port: u16,
    /// Opened after this (the sample before the first that saw it); `None`: before the first sample.
    born_after: Option<Instant>,
    /// Found closed by the peer already (a `close_wait` socket stays until the pool notices).
    reported: bool,
    /// Taken as the pool's: seen when the sockets were no more than the pool counts.
    admitted: bool,
}

/// A session of the pool found ended by its peer at a sample, not counted yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Suspect {
    port: u16,
    /// Its socket was seen closed by the peer while the pool held it (`close_wait`, a reset):
    /// no close of the pool's own can look like that.
    sure: bool,
    /// Gone leaving only a `time_wait`: the pool closed first, by itself or an instant before
    /// the server's goodbye reached the socket (a kill that lands on a query in flight: sqlx
    /// reads the FATAL and closes before the FIN arrives). Counted only from the counters'
    /// growth that the other suspects leave unexplained.
    raced: bool,
    born_after: Option<Instant>,
    /// The sample that found it ended.
    ended_by: Instant,
    /// The session-end counters known before it ended.
    base: Option<SessionEnds>,
}

/// The server's session-end counters as read when the follower settles its suspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counters {
    /// Read; `None`: the server has none (before PostgreSQL 14).
    Read(Option<SessionEnds>),
    /// The read failed: only sure suspects are counted; gone ones wait (up to
    /// [`UNREAD_WAITS`] samples) for counters that can confirm them.
    Unread,
    /// The sessions end at a pooler: the server's counters do not count them; only sure
    /// suspects are counted.
    NotServer,
}

/// Samples that gone sockets wait for readable counters (the dedicated connection busy with a
/// census, or reconnecting) before they are dropped unconfirmed: a minute at the defaults.
const UNREAD_WAITS: u32 = 12;

/// How long a counted port is remembered at least.
const COUNTED_KEPT: Duration = Duration::from_secs(600);
/// Bound on the ports remembered as counted (they are pruned long before in practice).
const COUNTED_MAX: usize = 4096;

/// Sessions that ended without the pool closing them since the last census.
#[derive(Debug, Default)]
pub(crate) struct Vanished {
    /// Each session, and whether this process still holds its socket closed by the peer
    /// (sure) or the socket is gone (the pool dropped it: a close of its own may have raced
    /// the server's, so a server session then needs the server's counters to agree).
    seen: Vec<(u16, Seen, bool)>,
    gap: Duration,
    ends_before: Option<SessionEnds>,
    /// `consumed` when `ends_before` was taken off it.
    consumed: SessionEnds,
}

impl Vanished {
    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether the server's session-end counters in `ends` have caught up with the server
    /// sessions that vanished (or cannot tell: no counters). A backend leaves
    /// `pg_stat_activity` a moment before it flushes them, longer on a loaded server.
    pub(crate) fn counted_by(&self, ends: Option<SessionEnds>) -> bool {
        let ends = ends.map(|e| minus(e, self.consumed));
        let servers = self.seen.iter().filter(|(_, s, _)| matches!(s, Seen::Server(_))).count() as i64;
        match (self.ends_before, ends) {
            (Some(b), Some(a)) => a.killed + a.fatal - b.killed - b.fatal >= servers,
            _ => true,
        }
    }

    /// Their causes, from what the server or pooler says now.
    #[cfg(test)]
    pub(crate) fn causes(&self, evidence: Evidence) -> Vec<Cause> {
        self.judge(evidence).0
    }

    /// The causes of those counted, from what the server or pooler says now, and the ports
    /// of those not counted (gone, with the server's counters flat): for
    /// [`Ledger::unclaim`], so a later sample can still count one whose counters lagged.
    pub(crate) fn judge(&self, evidence: Evidence) -> (Vec<Cause>, Vec<u16>) {
        let evidence = Evidence { ends: evidence.ends.map(|e| minus(e, self.consumed)), ..evidence };
        let ended_on_server = match (self.ends_before, evidence.ends) {
            (Some(b), Some(a)) if a.killed >= b.killed && a.fatal >= b.fatal => {
                Some(a.killed + a.fatal > b.killed + b.fatal)
            }
            _ => None,
        };
        let (mut causes, mut dropped) = (Vec::new(), Vec::new());
        for (port, seen, sure) in &self.seen {
            if *sure || !matches!(seen, Seen::Server(_)) || ended_on_server != Some(false) {
                causes.push(cause(*seen, self.gap, self.ends_before, evidence));
            } else {
                dropped.push(*port);
            }
        }
        (causes, dropped)
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
        let mut vanished = Vanished { consumed: self.consumed, ..Vanished::default() };
        if ends.is_some() {
            self.ends_known = ends;
        }
        let ends = ends.map(|e| minus(e, self.consumed));
        if let Some((then, before, ends_before)) = self.last.take() {
            let gap = at.duration_since(then);
            vanished.gap = gap;
            vanished.ends_before = ends_before;
            for (port, seen) in before.iter().filter(|(p, _)| !now.contains_key(p)) {
                if self.counted.get(port).is_some_and(|t| *t >= then) {
                    // The follower counted it (or dropped it as the pool's own close) already.
                    continue;
                }
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
                    vanished.seen.push((*port, *seen, sure));
                    self.counted.insert(*port, Instant::now());
                }
            }
        }
        self.last = Some((at, now, ends));
        self.prune();
        vanished
    }

    /// One sample's view of the pool's open sockets, `(inode, local port, TCP state index)`,
    /// read at `at`. Sockets seen closed by the peer become suspects at once; the sockets gone
    /// since the last sample are returned, for [`Ledger::suspect_gone`] to judge by what the
    /// kernel still holds of them. `pool_open`: the pool's count; sockets beyond it are
    /// another client's of the app (a connection not yet told apart by a census), so new
    /// sockets are taken as the pool's only up to it, the newest first (another client's
    /// socket is usually older: it was left out when it appeared).
    pub(crate) fn follow(&mut self, open: &[(u64, u16, usize)], at: Instant, pool_open: u32) -> Vec<Suspect> {
        let prev = self.follower.last_read;
        // A `time_wait` outlives a gap this short: a socket gone without one was closed by the peer.
        let judged = prev.is_some_and(|t| at.saturating_duration_since(t) <= MAX_GAP);
        // Counters known before the sockets were last seen open: read before any end found now.
        let base = self.follower.ends_at_read;
        let mut next: HashMap<u64, Followed> = open
            .iter()
            .map(|&(inode, port, _)| {
                let new = Followed { port, born_after: prev, reported: false, admitted: false };
                let known = self.follower.sockets.get(&inode).or_else(|| self.follower.missing.get(&inode));
                (inode, known.copied().unwrap_or(new))
            })
            .collect();
        let admitted = next.values().filter(|f| f.admitted).count();
        let mut free = usize::try_from(pool_open).unwrap_or(usize::MAX).saturating_sub(admitted);
        let mut waiting: Vec<(u64, Option<Instant>)> =
            next.iter().filter(|(_, f)| !f.admitted).map(|(i, f)| (*i, f.born_after)).collect();
        waiting.sort_unstable_by_key(|w| std::cmp::Reverse((w.1, w.0)));
        for (inode, _) in waiting {
            if free == 0 {
                break;
            }
            if let Some(f) = next.get_mut(&inode) {
                f.admitted = true;
                free -= 1;
            }
        }
        let mut found = Vec::new();
        for &(inode, port, state) in open {
            let Some(f) = next.get_mut(&inode) else { continue };
            if f.reported || ![CLOSE_WAIT, CLOSE, LAST_ACK].contains(&state) {
                continue;
            }
            if counted_since(&self.counted, port, f.born_after) {
                // A census counted it: marked now, even if not taken as the pool's yet (the
                // census's record is forgotten once both have looked).
                f.reported = true;
            } else if f.admitted {
                f.reported = true;
                found.push(Suspect { port, sure: true, raced: false, born_after: f.born_after, ended_by: at, base });
            }
        }
        let gone = self
            .follower
            .sockets
            .iter()
            .filter(|(inode, f)| judged && f.admitted && !f.reported && !next.contains_key(inode))
            .filter(|(_, f)| !self.counted_since(f.port, f.born_after))
            .map(|(_, f)| Suspect {
                port: f.port,
                sure: false,
                raced: false,
                born_after: f.born_after,
                ended_by: at,
                base,
            })
            .collect();
        let old = std::mem::replace(&mut self.follower.sockets, next);
        if self.follower.missing.len() > COUNTED_MAX {
            self.follower.missing.clear();
        }
        for (inode, f) in old {
            if !self.follower.sockets.contains_key(&inode) {
                self.follower.missing.insert(inode, f);
            }
        }
        for inode in open.iter().map(|o| o.0) {
            self.follower.missing.remove(&inode);
        }
        self.follower.last_read = Some(at);
        self.follower.ends_at_read = self.ends_known.map(|e| minus(e, self.consumed));
        self.suspect(found);
        self.prune();
        gone
    }

    /// Keeps the sockets gone since the last sample that the pool did not close first:
    /// nothing of them left in `list` (the kernel's sockets to the peers, orphans included)
    /// but a `last_ack`. One that left only a `time_wait` is kept as `raced` (the pool closed
    /// first: by itself, or on reading a kill's FATAL before its FIN), counted only when the
    /// counters show a kill nothing else explains. `fin_wait*` or `closing` is the pool's own
    /// close; an open socket on the port (still alive but no longer the pool's, or the port
    /// reused) tells nothing, so it is not counted.
    pub(crate) fn suspect_gone(&mut self, gone: Vec<Suspect>, list: &[Socket]) {
        let remains = |g: &Suspect, state: usize| {
            let mut on_port = list.iter().filter(|s| s.local.port() == g.port).peekable();
            let any = on_port.peek().is_some();
            (any || state == LAST_ACK) && on_port.all(|s| s.state == state && !s.owned)
        };
        let kept = gone
            .into_iter()
            .filter_map(|g| {
                if remains(&g, LAST_ACK) {
                    Some(g)
                } else {
                    remains(&g, TIME_WAIT).then_some(Suspect { raced: true, ..g })
                }
            })
            .collect();
        self.suspect(kept);
    }

    fn suspect(&mut self, found: Vec<Suspect>) {
        if let Some(first) = found.first()
            && self.follower.pending.is_empty()
        {
            self.follower.pending_base = first.base;
        }
        self.follower.pending.extend(found);
    }

    /// Whether sessions found ended wait to be counted.
    pub(crate) fn pending(&self) -> bool {
        !self.follower.pending.is_empty()
    }

    /// Counts the pending sessions once the server's `counters` have grown by as many (or
    /// one sample later: the sure ones, and as many gone ones as the counters grew), and
    /// returns their causes. `evidence.ends` is not used (`counters` are).
    pub(crate) fn settle(&mut self, counters: Counters, evidence: Evidence) -> Vec<Cause> {
        let pending = std::mem::take(&mut self.follower.pending);
        let pending: Vec<Suspect> = pending.into_iter().filter(|s| !self.counted_since(s.port, s.born_after)).collect();
        // Unreadable counters cannot confirm a gone socket: it waits for a reading rather than
        // being dropped (a busy dedicated connection must not lose a killed session).
        let unread = counters == Counters::Unread && pending.iter().any(|s| !s.sure);
        let (pending, kept): (Vec<Suspect>, Vec<Suspect>) = if unread && self.follower.unread < UNREAD_WAITS {
            self.follower.unread += 1;
            pending.into_iter().partition(|s| s.sure)
        } else {
            (pending, Vec::new())
        };
        if !unread {
            self.follower.unread = 0;
        }
        let causes = self.settle_now(pending, counters, evidence);
        if !kept.is_empty() {
            if self.follower.pending.is_empty() {
                self.follower.pending_base = self.follower.pending_base.or(kept[0].base);
            }
            self.follower.pending.extend(kept);
        }
        causes
    }

    /// Counts `pending` against `counters` (see [`settle`](Self::settle)).
    fn settle_now(&mut self, pending: Vec<Suspect>, counters: Counters, evidence: Evidence) -> Vec<Cause> {
        let base = self.follower.pending_base;
        let ends = match counters {
            Counters::Read(ends) => ends,
            Counters::Unread | Counters::NotServer => None,
        };
        if ends.is_some() {
            self.ends_known = ends;
        }
        // What no counted session explains yet (the base was taken the same way).
        let ends = ends.map(|e| minus(e, self.consumed));
        // How many sessions the server ended meanwhile; `None`: cannot tell (every suspect
        // counts). Nothing can confirm a gone socket behind a pooler: a pool's own close races
        // the pooler's answer to its goodbye often (PgBouncer closes at once), so only sure
        // ones count there.
        let grew = match (counters, base, ends) {
            (Counters::Unread | Counters::NotServer, _, _) => Some(0),
            (_, Some(b), Some(a)) if a.killed >= b.killed && a.fatal >= b.fatal => {
                Some(a.killed.saturating_add(a.fatal).saturating_sub(b.killed.saturating_add(b.fatal)))
            }
            _ => None,
        };
        // Raced ones neither make the others wait nor count without counters: most are the
        // pool's own closes.
        let waiting = i64::try_from(pending.iter().filter(|s| !s.raced).count()).unwrap_or(i64::MAX);
        let may_catch_up = counters != Counters::NotServer;
        if may_catch_up && grew.is_some_and(|g| g < waiting) && !self.follower.waited && waiting > 0 {
            // A backend leaves a moment before it flushes its counters: look again next sample.
            self.follower.pending = pending;
            self.follower.waited = true;
            return Vec::new();
        }
        self.follower.waited = false;
        self.follower.pending_base = None;
        let sure = i64::try_from(pending.iter().filter(|s| s.sure).count()).unwrap_or(i64::MAX);
        let mut unsure_left = grew.map_or(i64::MAX, |g| g.saturating_sub(sure).max(0));
        let now = Instant::now();
        let mut causes = Vec::new();
        let mut pending = pending;
        // Raced ones take only the growth the others leave.
        pending.sort_by_key(|s| s.raced);
        for s in pending {
            self.counted.insert(s.port, now);
            if s.raced && grew.is_none() {
                continue;
            }
            if !s.sure {
                if unsure_left <= 0 {
                    continue;
                }
                unsure_left -= 1;
            }
            let server = counters != Counters::NotServer;
            causes.push(self.cause_of(&s, server, base, ends, evidence));
        }
        self.consume(&causes);
        causes
    }

    /// A suspect's cause: the census's rule, with the idle time bounded by what the last
    /// census saw of the session and by the socket's age.
    fn cause_of(
        &self,
        s: &Suspect,
        server: bool,
        base: Option<SessionEnds>,
        ends: Option<SessionEnds>,
        evidence: Evidence,
    ) -> Cause {
        let age = s.born_after.map_or(Duration::MAX, |b| s.ended_by.saturating_duration_since(b));
        let census = self.last.as_ref().and_then(|(t, seen, _)| {
            let after = s.born_after.is_none_or(|b| *t >= b);
            seen.get(&s.port).filter(|_| after).map(|x| (s.ended_by.saturating_duration_since(*t), *x))
        });
        if server {
            let idle = match census {
                Some((since, Seen::Server(Some(d)))) => d.saturating_add(since).saturating_add(IDLE_SLACK).min(age),
                Some((since, _)) => since.min(age),
                None => age,
            };
            return explain_silent_loss(idle, evidence.idle_session_timeout, base, ends).0;
        }
        match evidence.client_idle_timeout {
            // PgBouncer applies client_idle_timeout only to clients not linked to a server;
            // one linked at a census at least the timeout before it ended may have idled since
            // (a census taken while a beat or a query ran on it).
            Some(t) if age >= t && !matches!(census, Some((since, Seen::PoolerClient(true))) if since < t) => {
                Cause::PoolerIdleTimeout
            }
            _ => Cause::ConnectionEnded,
        }
    }

    /// Whether the session at `port` opened after `born_after` was counted already.
    fn counted_since(&self, port: u16, born_after: Option<Instant>) -> bool {
        counted_since(&self.counted, port, born_after)
    }

    /// Forgets counted ports neither the census nor the follower can meet again: counted
    /// well before both last looked.
    fn prune(&mut self) {
        let horizon = match (self.last.as_ref().map(|l| l.0), self.follower.last_read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // And kept 10 minutes at least: a socket left out of the reads meanwhile (told
        // another client's for a while) may come back.
        if let Some(h) = horizon.and_then(|h| h.checked_sub(COUNTED_KEPT)) {
            self.counted.retain(|_, t| *t >= h);
        }
        if self.counted.len() > COUNTED_MAX {
            self.counted.clear();
        }
    }

    /// The census's verdict on `vanished`: the causes of those counted. Those it did not
    /// count (gone, counters flat) are left to the follower, whose counters may show more.
    pub(crate) fn judge_census(&mut self, vanished: &Vanished, evidence: Evidence) -> Vec<Cause> {
        let (causes, dropped) = vanished.judge(evidence);
        for port in dropped {
            self.counted.remove(&port);
        }
        self.consume(&causes);
        causes
    }

    /// Records the counters' growth that `causes` explain.
    fn consume(&mut self, causes: &[Cause]) {
        for cause in causes {
            match cause {
                Cause::AdminShutdown => self.consumed.killed = self.consumed.killed.saturating_add(1),
                Cause::IdleSessionTimeout => self.consumed.fatal = self.consumed.fatal.saturating_add(1),
                _ => {}
            }
        }
    }

    /// Forgets the last census (it failed: the next one starts afresh).
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }
}

/// `a - b`, field by field.
fn minus(a: SessionEnds, b: SessionEnds) -> SessionEnds {
    SessionEnds { killed: a.killed.saturating_sub(b.killed), fatal: a.fatal.saturating_sub(b.fatal) }
}

fn counted_since(counted: &HashMap<u16, Instant>, port: u16, born_after: Option<Instant>) -> bool {
    counted.get(&port).is_some_and(|t| born_after.is_none_or(|b| *t >= b))
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
            // PgBouncer applies client_idle_timeout only to clients not linked to a server;
            // one linked at a census at least the timeout before may have idled since.
            Some(t) if !linked || gap >= t => Cause::PoolerIdleTimeout,
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

    /// Follows `ports` (inode = port) in `states` at `at`.
    fn sample(ledger: &mut Ledger, sockets: &[(u16, usize)], at: Instant) -> Vec<Suspect> {
        let open: Vec<(u64, u16, usize)> = sockets.iter().map(|(p, s)| (u64::from(*p), *p, *s)).collect();
        ledger.follow(&open, at, u32::MAX)
    }

    #[test]
    fn followed_sockets_the_peer_closed_are_counted_once_the_counters_agree() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut ledger = Ledger::default();
        ledger.update_read_at([(1, Seen::Server(None))].into(), &[], ends(0, 0), t0);
        assert!(sample(&mut ledger, &[(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)], at(5)).is_empty());
        // 1 in close_wait (sure), 2 gone without a trace, 3 gone leaving a time_wait (the pool
        // closed it), 4 gone and its port taken by a new socket, 5 still open.
        let gone = sample(&mut ledger, &[(1, CLOSE_WAIT), (5, 0), (6, 0)], at(10));
        assert_eq!(gone.iter().map(|g| g.port).collect::<Vec<_>>().len(), 3, "{gone:?}");
        ledger.suspect_gone(gone, &[socket(3, 5, false), socket(4, 0, true)]);
        assert!(ledger.pending());
        // The counters lag: wait one sample.
        let evidence = Evidence::default();
        assert!(ledger.settle(Counters::Read(ends(1, 0)), evidence).is_empty());
        assert_eq!(ledger.settle(Counters::Read(ends(2, 0)), evidence), vec![Cause::AdminShutdown; 2]);
        // Counted once: the close_wait socket seen again, and a census finding both vanished.
        assert!(sample(&mut ledger, &[(1, CLOSE_WAIT), (5, 0), (6, 0)], at(15)).is_empty());
        assert!(!ledger.pending());
        let census =
            ledger.update_read_at([(5, Seen::Server(None))].into(), &[socket(1, CLOSE_WAIT, true)], ends(2, 0), at(16));
        assert!(census.is_empty(), "{census:?}");
    }

    #[test]
    fn a_gone_socket_the_counters_do_not_confirm_is_the_pools_own_close() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut ledger = Ledger::default();
        ledger.update_read_at(HashMap::new(), &[], ends(3, 3), t0);
        sample(&mut ledger, &[(1, 0), (2, 0)], at(5));
        let gone = sample(&mut ledger, &[(3, 0)], at(10));
        ledger.suspect_gone(gone, &[]);
        assert!(ledger.settle(Counters::Read(ends(3, 3)), Evidence::default()).is_empty(), "waits a sample");
        assert!(ledger.settle(Counters::Read(ends(3, 3)), Evidence::default()).is_empty(), "never counted");
        assert!(!ledger.pending());
        // A census does not count them either.
        let census = ledger.update_read_at(HashMap::new(), &[], ends(3, 3), at(11));
        assert!(census.is_empty());
        // Gone after a gap a time_wait may not outlive: not judged.
        sample(&mut ledger, &[(4, 0)], at(12));
        assert!(sample(&mut ledger, &[], at(12) + MAX_GAP + Duration::from_secs(1)).is_empty());
        // More sockets than the pool counts: the one that appeared first beyond the count is
        // another client's, not followed; the pool's new ones are.
        ledger.follow(&[(7, 7, 0)], at(90), 0);
        ledger.follow(&[(7, 7, 0), (8, 8, 0), (9, 9, 0)], at(91), 2);
        assert!(ledger.follow(&[(8, 8, CLOSE_WAIT), (9, 9, 0)], at(92), 2).is_empty(), "7 was nobody's");
        assert!(ledger.settle(Counters::Read(None), Evidence::default()).len() == 1, "8 was the pool's");
        // Behind a pooler only a socket seen in close_wait counts.
        sample(&mut ledger, &[(5, 0), (6, 0)], at(100));
        let gone = sample(&mut ledger, &[(5, CLOSE_WAIT)], at(105));
        ledger.suspect_gone(gone, &[]);
        let timeout = Evidence { client_idle_timeout: Some(Duration::from_secs(1)), ..Evidence::default() };
        assert_eq!(ledger.settle(Counters::NotServer, timeout), vec![Cause::PoolerIdleTimeout], "nothing to wait for");
        // A socket left out of one read comes back as it was: found closed once only.
        ledger.follow(&[(20, 20, 0)], at(200), 1);
        ledger.follow(&[(20, 20, CLOSE_WAIT)], at(201), 1);
        assert_eq!(ledger.settle(Counters::NotServer, Evidence::default()).len(), 1);
        ledger.follow(&[], at(202), 1);
        ledger.follow(&[(20, 20, CLOSE_WAIT)], at(203), 1);
        assert!(!ledger.pending(), "not found again");
    }

    #[test]
    fn a_census_that_cannot_confirm_a_gone_session_leaves_it_to_the_samples() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut ledger = Ledger::default();
        ledger.update_read_at([(1, Seen::Server(None))].into(), &[], ends(0, 0), t0);
        sample(&mut ledger, &[(1, 0)], at(10));
        // Killed; a census finds it gone before its backend flushed the counters.
        let vanished = ledger.update_read_at(HashMap::new(), &[], ends(0, 0), at(20));
        assert!(ledger.judge_census(&vanished, Evidence { ends: ends(0, 0), ..Evidence::default() }).is_empty());
        let gone = sample(&mut ledger, &[], at(30));
        ledger.suspect_gone(gone, &[]);
        assert_eq!(ledger.settle(Counters::Read(ends(1, 0)), Evidence::default()), vec![Cause::AdminShutdown]);
    }

    /// The dedicated connection busy (a census holds it) or down: the counters cannot be read
    /// for a while. A killed session whose socket went unseen in `close_wait` waits for them;
    /// it is not dropped after one sample.
    #[test]
    fn a_gone_session_waits_while_the_counters_cannot_be_read() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut ledger = Ledger::default();
        ledger.update_read_at(HashMap::new(), &[], ends(0, 0), t0);
        sample(&mut ledger, &[(1, 0), (2, 0)], at(10));
        // 1 killed and seen in close_wait (sure); 2 killed and gone before a sample saw it.
        let gone = sample(&mut ledger, &[(1, CLOSE_WAIT)], at(20));
        ledger.suspect_gone(gone, &[]);
        for _ in 0..3 {
            let counted = ledger.settle(Counters::Unread, Evidence::default());
            assert!(counted.len() <= 1, "{counted:?}");
            assert!(ledger.pending(), "the gone one still waits");
        }
        let confirmed = ledger.settle(Counters::Read(ends(2, 0)), Evidence::default());
        assert_eq!(confirmed, vec![Cause::AdminShutdown], "the kill the counters show is the gone one's");
        assert!(!ledger.pending());
    }

    /// A kill that lands on a query in flight: sqlx reads the FATAL and closes before the
    /// server's FIN arrives, so its socket leaves a `time_wait` as the pool's own close does.
    /// Counted when the counters show a kill the other suspects leave unexplained; never
    /// otherwise, nor without counters.
    #[test]
    fn a_kill_the_pool_closed_on_first_is_counted_from_the_counters_left_over() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut ledger = Ledger::default();
        ledger.update_read_at(HashMap::new(), &[], ends(0, 0), t0);
        sample(&mut ledger, &[(1, 0), (2, 0), (3, 0)], at(10));
        // All three killed: 1 and 2 gone without a trace, 3 gone leaving a time_wait.
        let gone = sample(&mut ledger, &[], at(20));
        ledger.suspect_gone(gone, &[socket(3, TIME_WAIT, false)]);
        let counted = ledger.settle(Counters::Read(ends(3, 0)), Evidence::default());
        assert_eq!(counted, vec![Cause::AdminShutdown; 3]);
        // The pool closes one itself (a time_wait), the counters flat: not counted, no wait.
        sample(&mut ledger, &[(4, 0)], at(30));
        let gone = sample(&mut ledger, &[], at(40));
        ledger.suspect_gone(gone, &[socket(4, TIME_WAIT, false)]);
        assert!(ledger.settle(Counters::Read(ends(3, 0)), Evidence::default()).is_empty());
        assert!(!ledger.pending(), "a raced one alone does not wait");
        // A server without counters (before PostgreSQL 14): a time_wait is the pool's close.
        sample(&mut ledger, &[(5, 0)], at(50));
        let gone = sample(&mut ledger, &[], at(60));
        ledger.suspect_gone(gone, &[socket(5, TIME_WAIT, false)]);
        assert!(ledger.settle(Counters::Read(None), Evidence::default()).is_empty());
        // A fin_wait (the pool's close under way) is never counted.
        sample(&mut ledger, &[(6, 0)], at(70));
        let gone = sample(&mut ledger, &[], at(80));
        ledger.suspect_gone(gone, &[socket(6, 3, false)]);
        assert!(!ledger.pending());
    }

    /// A census that caught a pooler client linked (a beat or a query on it) says nothing of
    /// it once the pooler's idle timeout has passed since: it may have idled and been ended.
    #[test]
    fn a_client_linked_at_an_old_census_may_have_idled_since() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let timeout = Evidence { client_idle_timeout: Some(Duration::from_secs(2)), ..Evidence::default() };
        let mut ledger = Ledger::default();
        ledger.update_read_at([(1, Seen::PoolerClient(true)), (2, Seen::PoolerClient(true))].into(), &[], None, t0);
        ledger.follow(&[(1, 1, 0), (2, 2, 0)], at(10), 5);
        ledger.follow(&[(1, 1, CLOSE_WAIT), (2, 2, 0)], at(1_000), 5);
        assert_eq!(ledger.settle(Counters::NotServer, timeout), vec![Cause::ConnectionEnded], "linked 1 s before");
        ledger.follow(&[(2, 2, CLOSE_WAIT)], at(3_000), 5);
        assert_eq!(ledger.settle(Counters::NotServer, timeout), vec![Cause::PoolerIdleTimeout], "linked 3 s before");
        // The census's own rule: linked at a census longer than the timeout before.
        let later = ledger.update_read_at([(3, Seen::PoolerClient(true))].into(), &[], None, at(4_000));
        assert!(later.is_empty());
        let gone = ledger.update_read_at(HashMap::new(), &[socket(3, CLOSE_WAIT, true)], None, at(7_000));
        assert_eq!(gone.causes(timeout), vec![Cause::PoolerIdleTimeout]);
    }

    #[test]
    fn one_kill_confirms_one_session_whoever_counts_it() {
        let ends = |killed, fatal| Some(SessionEnds { killed, fatal });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut ledger = Ledger::default();
        let idle = Seen::Server(Some(Duration::ZERO));
        ledger.update_read_at([(1, idle), (2, idle)].into(), &[], ends(0, 0), t0);
        sample(&mut ledger, &[(1, 0), (2, 0), (3, 0)], at(10));
        // The pool closes 3 itself (racing the server's answer: no time_wait); counters flat.
        let gone = sample(&mut ledger, &[(1, 0), (2, 0)], at(20));
        ledger.suspect_gone(gone, &[]);
        assert!(ledger.settle(Counters::Read(ends(0, 0)), Evidence::default()).is_empty(), "waits");
        // 1 and 2 killed; a census counts them (their sockets in close_wait) before the sample.
        let closed = [socket(1, CLOSE_WAIT, true), socket(2, CLOSE_WAIT, true)];
        let vanished = ledger.update_read_at(HashMap::new(), &closed, ends(2, 0), at(30));
        let census = ledger.judge_census(&vanished, Evidence { ends: ends(2, 0), ..Evidence::default() });
        assert_eq!(census, vec![Cause::AdminShutdown; 2]);
        // The two kills explain the growth: 3 stays the pool's own close.
        assert!(ledger.settle(Counters::Read(ends(2, 0)), Evidence::default()).is_empty());
        assert!(!ledger.pending());
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
