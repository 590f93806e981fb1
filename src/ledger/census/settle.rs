//! One census: the pool, the server (or the pooler) and the process's sockets read at one
//! moment, and the sessions that vanished since the last census attributed to a cause.
//!
//! Both sides must describe one moment. A connection being opened counts in the pool before
//! its session shows on the server; a closed one leaves its session for a few ms. So a reading
//! is taken again when the pool's count moved during the query, or when it shows a gap: a real
//! leak is still there 50 ms later, a transient is not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::Instrument;

use crate::cause::Cause;
use crate::direct::DirectConnection;
use crate::ledger::attribution::{NetworkPath, Tag};
use crate::ledger::census::query::{self, ServerCensus, Session};
use crate::ledger::client::ClientLedger;
use crate::ledger::ended::{Evidence, Ledger, Seen, Vanished};
use crate::ledger::loss::ServerFacts;
use crate::ledger::pooler::{self, PoolerConnection, PoolerFigures};
use crate::ledger::snapshot::{PoolFigures, Snapshot};
use crate::ledger::sockets::{self, Socket, SocketCensus};
use crate::schedule;

/// Pause before a census re-reads an unsettled or gapped reading.
pub(crate) const RECHECK: Duration = Duration::from_millis(50);

/// How many times a census re-reads the server's session-end counters that lag the sessions
/// that vanished (50 ms apart, 0.5 s at most). Kept short: the census holds the dedicated
/// connection meanwhile, and the direct heartbeat waits for it.
const END_READS: u32 = 10;

/// How many readings a census takes at most to find one moment both sides agree on.
const ATTEMPTS: u32 = 3;

/// What the census reads with: the watch's parts it borrows.
#[derive(Debug)]
pub(crate) struct Census<'a> {
    pub(crate) pool: &'a PgPool,
    pub(crate) pool_name: &'a str,
    pub(crate) tag: &'a Tag,
    pub(crate) path: NetworkPath,
    /// Sessions are matched to this process by client address and port (no nonce).
    pub(crate) by_port: bool,
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
    pub(crate) direct: &'a tokio::sync::Mutex<DirectConnection>,
    pub(crate) pooler: Option<&'a tokio::sync::Mutex<PoolerConnection>>,
    pub(crate) client: &'a ClientLedger,
    pub(crate) ended: &'a Mutex<Ledger>,
    pub(crate) warned: &'a Warned,
    /// The server's `idle_session_timeout` for the pool's sessions, as the last lint read it.
    pub(crate) idle_session_timeout: Option<Duration>,
}

/// The warnings a census gives once per watch (a missing privilege does not go away).
#[derive(Debug, Default)]
pub(crate) struct Warned {
    degraded: AtomicBool,
    hidden: AtomicBool,
}

/// A census's figures, before they are published.
#[derive(Debug)]
pub(crate) struct Reading {
    /// The snapshot (its `sessions_ended` is the publisher's running total).
    pub(crate) snapshot: Snapshot,
    /// The sessions the pool did not close that vanished since the last census, by cause.
    pub(crate) ended: Vec<Cause>,
    /// The pooler's `client_idle_timeout`, as its admin console showed it.
    pub(crate) client_idle_timeout: Option<Duration>,
}

/// What the pooler's admin console showed: its figures, the pool's clients, and its
/// `client_idle_timeout`.
type PoolerView = (PoolerFigures, Vec<pooler::Client>, Option<Duration>);

/// One reading of both sides.
#[derive(Debug)]
struct Moment {
    /// This process's sockets toward the pool's address, listed before the queries.
    list: Option<Vec<Socket>>,
    /// The list holds only the pool's sockets, looked up (the pool was steady): the other
    /// clients' sockets are not in it.
    looked_up: bool,
    keys: Option<Vec<String>>,
    read_at: Instant,
    sessions: Vec<Session>,
    facts: ServerFacts,
    /// Sessions whose address the census role may not read.
    hidden: bool,
    server: ServerCensus,
    pooler: Option<PoolerView>,
    admin_ports: Vec<u16>,
    /// The pool's count of open connections before the reading, and after it.
    before: u32,
    pool: PoolFigures,
    /// The sessions that really exist: on the server, or the pooler's clients.
    real: Option<u32>,
}

impl Census<'_> {
    /// Takes the census. Holds the dedicated connection (waiting for it at most the census
    /// timeout: a heartbeat stuck on it must not stall the samples).
    pub(crate) async fn take(&self) -> Result<Reading, Cause> {
        let Ok(mut direct) = tokio::time::timeout(schedule::bounded(self.timeout), self.direct.lock()).await else {
            return Err(Cause::TimedOut);
        };
        if self.pool.is_closed() {
            // Closed while waiting for the lock: the task has closed (or will close) the connection.
            return Err(Cause::PoolClosed);
        }
        let peers = peers(self.pool, self.timeout).await;
        let mut attempt = 0;
        let mut moment = loop {
            let m = self.read(&mut direct, peers.as_deref()).await?;
            attempt += 1;
            let settled = m.pool.open == m.before && m.real.is_none_or(|r| r == m.pool.open);
            if settled || attempt >= ATTEMPTS {
                break m;
            }
            tokio::time::sleep(RECHECK).await;
        };
        self.warn_unknown_states(&moment.server);
        let list = own_excluded(moment.list.take(), &moment.admin_ports, direct.local_port);
        let ended = self.vanished(&mut direct, &moment, list.as_deref()).instrument(phase("settle")).await;
        drop(direct);
        let peer = peers.as_ref().and_then(|p| p.first().copied());
        // Peers are resolved here, rarely; every sample reuses them.
        self.client.set_peers(peers.as_deref().unwrap_or_default());
        // The process's sockets right after: established ones that are none of the pool's
        // sessions belong to other clients of the app (only while the pool's count stood
        // still). A steady pool's census looked its own sockets up and learns only its ports:
        // what is known of the others stands, and no second full read is needed.
        let attribution = phase("attribution");
        let then = match moment.looked_up {
            true => None,
            false => self.client.read_all().instrument(attribution.clone()).await,
        };
        let then = then.filter(|_| self.pool.size() == moment.pool.open);
        let clients = moment.pooler.as_ref().map(|(_, c, _)| c.as_slice());
        attribution.in_scope(|| self.client.learn(&pool_ports(clients, &moment.server), then.as_ref()));
        drop(attribution);
        let client_idle_timeout = moment.pooler.as_ref().and_then(|(_, _, t)| *t);
        let snapshot = Snapshot {
            phantom: moment.real.map(|r| i64::from(moment.pool.open) - i64::from(r)),
            pool: moment.pool,
            server: Some(moment.server),
            sockets: list.zip(peer).map(|(l, peer)| SocketCensus::of_list(&l, peer)),
            census_up: true,
            pooler: moment.pooler.map(|(f, _, _)| f),
            sessions_ended: 0,
            client_gap: None,
        };
        Ok(Reading { snapshot, ended, client_idle_timeout })
    }

    /// One reading: the sockets, the server's sessions and end counters, the pooler's view
    /// and the pool's count.
    async fn read(&self, direct: &mut DirectConnection, peers: Option<&[SocketAddr]>) -> Result<Moment, Cause> {
        let before = self.pool.size();
        // Listed before the queries: a connection opened after the listing moves the pool's
        // count and forces a re-read. A steady pool's sockets are looked up (no dump).
        let steady = match peers {
            Some(_) => self.client.steady_list(before).instrument(phase("list")).await,
            None => None,
        };
        let looked_up = steady.is_some();
        let list = match steady {
            Some(list) => Some(list),
            None => sockets::list_blocking(peers, direct.local_port).instrument(phase("list")).await,
        };
        let owned: Vec<SocketAddr> = list.iter().flatten().filter(|s| s.owned).map(|s| s.local).collect();
        let keys = match (self.by_port && self.path == NetworkPath::Direct, &list) {
            (true, Some(_)) => Some(query::port_keys(owned.iter().copied())),
            // Ports cannot be read (not Linux): the tag alone, as with a nonce.
            _ => None,
        };
        let read_at = Instant::now();
        let app_name = self.tag.pool_app_name.as_str();
        let (sessions, facts) = direct
            .run(async |c| {
                // The session-end counters first: a session this census sees alive has not
                // been counted yet, even if it ends between the two queries (read the other
                // way round, a kill at that moment was counted before its session was seen
                // alive, and the next census found no new end to explain it).
                let facts = ServerFacts::read(c).await?;
                let sessions = query::take(c, app_name, keys.as_deref()).await?;
                Ok((sessions, facts))
            })
            .instrument(phase("sql"))
            .await?;
        let hidden = keys.is_some() && sessions.iter().any(|s| s.port.is_none());
        let exact = self.exact(hidden);
        let server = query::aggregate(sessions.iter());
        let (pooler, admin_ports) = self.pooler_view(&owned).await?;
        let pool = PoolFigures::of(self.pool);
        let real = match (&pooler, self.path) {
            (Some((figures, _, _)), _) => Some(figures.clients),
            (None, NetworkPath::Pooler) => None,
            (None, _) if !exact => None,
            (None, _) => Some(server.total()),
        };
        Ok(Moment {
            list,
            looked_up,
            keys,
            read_at,
            sessions,
            facts,
            hidden,
            server,
            pooler,
            admin_ports,
            before,
            pool,
            real,
        })
    }

    /// Whether the pool's sessions can be counted exactly. A census role without
    /// pg_read_all_stats sees other roles' sessions without their address: they cannot be
    /// matched by port. With one declared replica the tag alone is exact; with more, the
    /// count is unknown.
    fn exact(&self, hidden: bool) -> bool {
        let exact = !hidden || self.replicas == 1;
        if hidden && !self.warned.hidden.swap(true, Ordering::Relaxed) {
            // One warning for the missing privilege: it also hides the states.
            self.warned.degraded.store(true, Ordering::Relaxed);
            tracing::warn!(
                pool = %self.pool_name,
                replicas = self.replicas,
                "the census role cannot read the pool's sessions' client_addr/client_port in pg_stat_activity, \
                 so they cannot be matched to this process by port ({}), and their states show as `unknown`. \
                 Grant it pg_read_all_stats.",
                if exact { "with one declared replica the tag alone counts them" } else { "the phantom gap is not exported" }
            );
        }
        exact
    }

    fn warn_unknown_states(&self, server: &ServerCensus) {
        if server.get("unknown") > 0 && !self.warned.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pool = %self.pool_name,
                "the census role cannot read these sessions' state in pg_stat_activity; states show as \
                 `unknown` (counts stay exact). Grant it pg_read_all_stats for per-state figures."
            );
        }
    }

    /// The pooler's admin console, when declared: its figures and clients, and the ports of
    /// poolwatch's own admin connection.
    async fn pooler_view(&self, owned: &[SocketAddr]) -> Result<(Option<PoolerView>, Vec<u16>), Cause> {
        let Some(conn) = self.pooler else { return Ok((None, Vec::new())) };
        let mut conn = conn.lock().await;
        let options = self.pool.connect_options();
        let database = options.get_database().unwrap_or(options.get_username()).to_owned();
        let user = options.get_username().to_owned();
        let (figures, clients, admin) =
            conn.take(&self.tag.pool_app_name, &self.tag.admin_app_name, &database, &user, owned).await?;
        Ok((Some((figures, clients, conn.client_idle_timeout)), admin))
    }

    /// The sessions the pool did not close that vanished since the last census: by port, on
    /// the server or at the pooler, with their causes.
    async fn vanished(&self, direct: &mut DirectConnection, m: &Moment, list: Option<&[Socket]>) -> Vec<Cause> {
        let seen: Option<HashMap<u16, Seen>> = match (&m.pooler, self.path) {
            (Some((_, clients, _)), _) => {
                Some(clients.iter().map(|c| (c.port, Seen::PoolerClient(c.linked))).collect())
            }
            (None, NetworkPath::Direct) if m.keys.is_some() && !m.hidden => {
                Some(m.sessions.iter().filter_map(|s| s.port.map(|p| (p, Seen::Server(s.idle_for())))).collect())
            }
            _ => None,
        };
        let mut vanished = Vanished::default();
        if let (Some(seen), Some(list)) = (seen, list)
            && let Ok(mut ended) = self.ended.lock()
        {
            vanished = ended.update_read_at(seen, list, m.facts.ends, m.read_at);
        }
        if vanished.is_empty() {
            return Vec::new();
        }
        // A backend leaves pg_stat_activity a moment before its session-end counters are
        // flushed: read them again until they count every vanished session, a few times at
        // most (one small query each, only when sessions vanished).
        let mut ends = m.facts.ends;
        if self.path == NetworkPath::Direct {
            for _ in 0..END_READS {
                if vanished.counted_by(ends) {
                    break;
                }
                tokio::time::sleep(RECHECK).await;
                if let Ok(later) = direct.run(async |c| ServerFacts::read(c).await).await {
                    ends = later.ends;
                }
            }
        }
        let evidence = Evidence {
            ends,
            idle_session_timeout: self.idle_session_timeout,
            client_idle_timeout: m.pooler.as_ref().and_then(|(_, _, t)| *t),
        };
        self.ended.lock().map(|mut l| l.judge_census(&vanished, evidence)).unwrap_or_default()
    }
}

/// A trace span around one phase of a census (`census_cost` sums their wall times to explain
/// a census's).
fn phase(name: &'static str) -> tracing::Span {
    tracing::trace_span!("poolwatch.census.phase", phase = name)
}

/// The sockets listed, without poolwatch's own: the admin console's, and the dedicated
/// connection's if it (re)connected after the listing.
fn own_excluded(list: Option<Vec<Socket>>, admin_ports: &[u16], own_port: Option<u16>) -> Option<Vec<Socket>> {
    list.map(|l| {
        l.into_iter().filter(|s| !admin_ports.contains(&s.local.port()) && Some(s.local.port()) != own_port).collect()
    })
}

/// The addresses the database host resolves to; `None` for a unix socket.
async fn peers(pool: &PgPool, timeout: Duration) -> Option<Vec<SocketAddr>> {
    let options = pool.connect_options();
    let host = options.get_host();
    if options.get_socket().is_some() || host.starts_with('/') {
        return None;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(vec![SocketAddr::new(ip, options.get_port())]);
    }
    let lookup = tokio::net::lookup_host((host, options.get_port()));
    match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(addrs)) => Some(addrs.collect()),
        _ => None,
    }
}

/// This process's local ports of the pool's connections, as the census saw them: behind a
/// pooler the ports of its `SHOW CLIENTS` rows (the server's sessions are the pooler's own).
fn pool_ports(pooler_clients: Option<&[pooler::Client]>, server: &ServerCensus) -> Vec<u16> {
    match pooler_clients {
        Some(clients) => clients.iter().map(|c| c.port).collect(),
        None => server.client_ports.clone(),
    }
}
