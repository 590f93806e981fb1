//! The socket census: this process's own TCP sockets to the database, one by one.
//!
//! Read with one netlink `sock_diag` dump (`NETLINK_SOCK_DIAG`, `inet_diag_req_v2`) whose
//! bytecode filter keeps only sockets whose peer is the database's address and port, so the
//! kernel copies out a handful of sockets, not the namespace's whole table. A socket is this
//! process's when its inode is one of `/proc/self/fd`'s; that directory is read only when a
//! socket with an inode not seen before shows up (inode numbers are never reused). A steady
//! pool costs no dump at all: its sockets, once found, are looked up one by one by their
//! address pair (a hash lookup in the kernel), by the samples and by the census alike
//! ([`SocketReader::read_with_hint`]). Where netlink is refused (some sandboxes), the
//! census falls back to `/proc/self/net/tcp{,6}`, which makes the kernel walk its whole TCP
//! hash table (~5 ms): the figures are the same, the cost is not ([`SocketCensus::source`]).
//!
//! Every read blocks (syscalls): poolwatch runs it on Tokio's blocking pool, never on a
//! runtime worker. Linux only; elsewhere the census is absent.
//!
//! [`list`] is one cold read that also keeps the sockets no process holds any more (inode 0:
//! `time_wait`, `last_ack`, `fin_wait*`), for attribution by port and the ledger of sessions
//! the peer ended.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use crate::registry;

/// TCP states as the kernel numbers them (1-11).
pub const TCP_STATES: [&str; 11] = [
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "listen",
    "closing",
];

/// One TCP socket of this process to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSocket {
    /// The local address and port (match it with `pg_stat_activity.client_port`).
    pub local: SocketAddr,
    /// The database's address and port.
    pub peer: SocketAddr,
    /// The TCP state, a name from [`TCP_STATES`].
    pub state: &'static str,
    /// Bytes sent and not yet acknowledged by the peer. Staying above zero: the peer or the
    /// path stopped reading (a dead server behind a silent network drops nothing, acks nothing).
    pub send_queue: u32,
    /// Bytes received and not yet read by the app.
    pub recv_queue: u32,
    /// The socket's inode (as in `/proc/self/fd/N -> socket:[inode]`).
    pub inode: u64,
}

/// Where the socket figures were read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SocketSource {
    /// One filtered netlink `sock_diag` dump (the cheap path).
    #[default]
    Netlink,
    /// `/proc/self/net/tcp{,6}` (netlink refused; each read walks the whole TCP table).
    Proc,
}

/// This pool's sockets to the database, by TCP state, and each of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketCensus {
    /// `counts[i]` sockets are in state `TCP_STATES[i]`.
    pub counts: [u32; 11],
    /// Each socket counted, in no particular order.
    pub sockets: Vec<ClientSocket>,
    /// Sockets counted here that may belong to another watched pool of this process with the
    /// same database address, not yet told apart by a server census (see [`attribution`](crate::ledger::attribution),
    /// "Sockets of two pools to the same address").
    pub unattributed: u32,
    /// The sockets with bytes in their send queue (sent, not yet acknowledged by the peer);
    /// a queue that never drains is a silent peer.
    pub send_queued: Vec<SocketQueue>,
    /// How the sockets were read.
    pub source: SocketSource,
}

impl SocketCensus {
    /// Sockets in `state` (a name from [`TCP_STATES`]); 0 for an unknown name.
    pub fn get(&self, state: &str) -> u32 {
        TCP_STATES.iter().position(|s| *s == state).map_or(0, |i| self.counts[i])
    }

    /// Builds the counts from a list of sockets.
    pub(crate) fn of(sockets: Vec<ClientSocket>, source: SocketSource) -> SocketCensus {
        let mut counts = [0; 11];
        for s in &sockets {
            if let Some(i) = TCP_STATES.iter().position(|n| *n == s.state) {
                counts[i] += 1;
            }
        }
        let send_queued = sockets
            .iter()
            .filter(|s| s.send_queue > 0)
            .map(|s| SocketQueue { inode: s.inode, local_port: s.local.port(), send: s.send_queue, recv: s.recv_queue })
            .collect();
        SocketCensus { counts, sockets, unattributed: 0, send_queued, source }
    }
}

/// One socket's queues, from the kernel's socket table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketQueue {
    /// The socket's inode (stable while it lives).
    pub inode: u64,
    /// Its local port.
    pub local_port: u16,
    /// Bytes sent and not yet acknowledged.
    pub send: u32,
    /// Bytes received and not yet read by the app.
    pub recv: u32,
}

/// A local port of one of poolwatch's own short-lived sockets open now (reachability probes),
/// in a [`registry`](crate::registry) table: the socket census leaves them out.
#[derive(Debug)]
struct Own(u16);

/// Marks a local port as poolwatch's own while it lives.
#[derive(Debug)]
pub(crate) struct OwnPort(u16);

impl OwnPort {
    pub(crate) fn new(port: u16) -> OwnPort {
        registry::lock::<Own>().push(Own(port));
        OwnPort(port)
    }
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        let mut ports = registry::lock::<Own>();
        if let Some(i) = ports.iter().position(|p| p.0 == self.0) {
            ports.swap_remove(i);
        }
    }
}

pub(crate) fn is_own(port: u16) -> bool {
    registry::lock::<Own>().iter().any(|p| p.0 == port)
}

/// Emits the trace event of a blocking socket read, on the thread that reads (a test checks
/// that no read runs on a runtime thread). One call site for every read.
fn note_read() {
    tracing::trace!(target: "poolwatch::sockets", "reading the process's sockets");
}

/// Every TCP socket of this process whose peer is one of `peers` (poolwatch's own sockets
/// included; `time_wait` and `listen` ones have no file descriptor and are never listed), read
/// with one filtered netlink dump per address family, or from `/proc` where netlink is
/// refused. Blocking: call it from a blocking thread (`spawn_blocking`).
///
/// ```no_run
/// let peers = ["127.0.0.1:5432".parse().unwrap()];
/// for s in poolwatch::process_sockets(&peers).unwrap().sockets {
///     println!("{} -> {} {} sendq {}", s.local, s.peer, s.state, s.send_queue);
/// }
/// ```
pub fn process_sockets(peers: &[SocketAddr]) -> std::io::Result<SocketCensus> {
    SocketReader::new().read(peers)
}

/// Reads this process's sockets to some peers again and again: keeps its netlink socket and
/// remembers which inodes are the process's, so a steady set of sockets costs one dump per
/// read ([`process_sockets`] is one cold read). Blocking: use it from a blocking thread.
#[derive(Debug, Default)]
pub struct SocketReader {
    #[cfg(target_os = "linux")]
    netlink: Option<netlink::Dumper>,
    /// Netlink was refused once: use `/proc` from now on.
    netlink_refused: bool,
    /// Inodes of sockets to the peers known to be this process's.
    ours: HashSet<u64>,
    /// Inodes of sockets to the peers known to be another process's.
    foreign: HashSet<u64>,
    /// The process's sockets found by the last full read, and the hint it was taken with.
    known: Vec<Row>,
    known_hint: Option<(u32, Vec<SocketAddr>)>,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    send_queue: u32,
    recv_queue: u32,
    inode: u64,
    /// `inet_diag_sockid.idiag_cookie`: names the socket in an exact lookup.
    cookie: [u8; 8],
}

impl SocketReader {
    /// A reader with no netlink socket yet (opened at the first read).
    pub fn new() -> SocketReader {
        SocketReader::default()
    }

    /// Like [`read`](Self::read), but cheaper while nothing changed: when `hint` (e.g. the
    /// pool's `size()`) and `peers` are those of the last full read, each socket that read
    /// found is looked up by its exact address pair (a hash lookup in the kernel) instead of
    /// a dump (which walks the kernel's whole TCP hash table). Any socket gone, or another
    /// hint, means a full read. Blocking.
    #[cfg(target_os = "linux")]
    pub fn read_with_hint(&mut self, peers: &[SocketAddr], hint: u32) -> std::io::Result<SocketCensus> {
        if let Some(census) = self.lookup_known(peers, hint) {
            return Ok(census);
        }
        let census = self.read(peers)?;
        self.known_hint = Some((hint, peers.to_vec()));
        Ok(census)
    }

    /// The sockets of the last full read looked up again by their exact address pairs (no
    /// dump, no `/proc`): `None` unless `hint` and `peers` are those of that read and every
    /// one of them is still there. Blocking.
    #[cfg(target_os = "linux")]
    pub(crate) fn lookup_known(&mut self, peers: &[SocketAddr], hint: u32) -> Option<SocketCensus> {
        let same = self.known_hint.as_ref().is_some_and(|(h, p)| *h == hint && p == peers);
        if !same || self.known.is_empty() {
            return None;
        }
        let rows = self.netlink.as_mut()?.lookup(&self.known).ok()?;
        (rows.len() == self.known.len())
            .then(|| SocketCensus::of(rows.iter().filter_map(client_socket).collect(), SocketSource::Netlink))
    }

    /// Not Linux: nothing is known.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn lookup_known(&mut self, _: &[SocketAddr], _: u32) -> Option<SocketCensus> {
        None
    }

    /// Keeps only the sockets `keep` names (by inode) for the next lookups: the caller's own
    /// among the process's (each lookup is a round trip to the kernel; a big app holds many
    /// other sockets to the same database that no figure counts).
    pub(crate) fn retain_known(&mut self, keep: impl Fn(u64) -> bool) {
        self.known.retain(|r| keep(r.inode));
    }

    /// Not Linux: no socket census.
    #[cfg(not(target_os = "linux"))]
    pub fn read_with_hint(&mut self, peers: &[SocketAddr], _: u32) -> std::io::Result<SocketCensus> {
        self.read(peers)
    }

    /// This process's sockets to `peers` (poolwatch's own included). Blocking.
    #[cfg(target_os = "linux")]
    pub fn read(&mut self, peers: &[SocketAddr]) -> std::io::Result<SocketCensus> {
        note_read();
        self.known_hint = None;
        let peers: Vec<SocketAddr> = peers.iter().map(|p| SocketAddr::new(p.ip().to_canonical(), p.port())).collect();
        let (rows, source) = match self.dump(&peers) {
            Ok(rows) => (rows, SocketSource::Netlink),
            Err(e) => {
                tracing::debug!(error = %e, refused = self.netlink_refused, "netlink sock_diag read failed; poolwatch reads /proc/self/net/tcp instead");
                (proc_rows(&peers)?, SocketSource::Proc)
            }
        };
        // Sockets closed by the app (inode 0) and other processes' sockets are left out.
        let candidates: Vec<&Row> =
            rows.iter().filter(|r| r.inode != 0 && peers.iter().any(|p| same_peer(p, &r.remote))).collect();
        if candidates.iter().any(|r| !self.ours.contains(&r.inode) && !self.foreign.contains(&r.inode)) {
            let fds = own_socket_inodes()?;
            for r in &candidates {
                if fds.contains(&r.inode) {
                    self.ours.insert(r.inode);
                } else {
                    self.foreign.insert(r.inode);
                }
            }
        }
        let alive: HashSet<u64> = candidates.iter().map(|r| r.inode).collect();
        self.ours.retain(|i| alive.contains(i));
        self.foreign.retain(|i| alive.contains(i));
        let ours: Vec<Row> = candidates.iter().filter(|r| self.ours.contains(&r.inode)).map(|r| **r).collect();
        let sockets = ours.iter().filter_map(client_socket).collect();
        self.known = if source == SocketSource::Netlink { ours } else { Vec::new() };
        Ok(SocketCensus::of(sockets, source))
    }

    /// Not Linux: no socket census.
    #[cfg(not(target_os = "linux"))]
    pub fn read(&mut self, _: &[SocketAddr]) -> std::io::Result<SocketCensus> {
        let _ = (&self.ours, &self.foreign, self.netlink_refused);
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "socket census needs Linux"))
    }

    /// One dump per address family. A failed dump drops the netlink socket (an answer left
    /// in it must not be read as the next one's) and is tried again on a new one; only a
    /// socket the system refuses to open sends every later read to `/proc`.
    #[cfg(target_os = "linux")]
    fn dump(&mut self, peers: &[SocketAddr]) -> std::io::Result<Vec<Row>> {
        let mut last = std::io::Error::other("netlink refused earlier");
        for _ in 0..DUMP_ATTEMPTS {
            if self.netlink_refused {
                break;
            }
            if self.netlink.is_none() {
                match netlink::Dumper::new() {
                    Ok(d) => self.netlink = Some(d),
                    Err(e) => {
                        self.netlink_refused = refused(&e);
                        last = e;
                        continue;
                    }
                }
            }
            let Some(dumper) = self.netlink.as_mut() else { continue };
            match dump_all(dumper, peers, None) {
                Ok(rows) => return Ok(rows),
                Err(e) => {
                    self.netlink = None;
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Dumps, each one on a fresh socket after a failure, before the read falls back to `/proc`.
#[cfg(target_os = "linux")]
const DUMP_ATTEMPTS: u32 = 3;

/// Whether opening a netlink socket failed for good (not permitted, not supported), rather
/// than for a moment (out of descriptors or memory).
#[cfg(target_os = "linux")]
fn refused(e: &std::io::Error) -> bool {
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    const EPROTONOSUPPORT: i32 = 93;
    const EAFNOSUPPORT: i32 = 97;
    matches!(e.raw_os_error(), Some(EPERM | EACCES | EPROTONOSUPPORT | EAFNOSUPPORT))
}

/// One dump per address family of `peers` (`states`: a bit mask; `None`: every state a
/// socket of this process can be in).
#[cfg(target_os = "linux")]
fn dump_all(dumper: &mut netlink::Dumper, peers: &[SocketAddr], states: Option<u32>) -> std::io::Result<Vec<Row>> {
    let _dump = tracing::trace_span!("poolwatch.census.phase", phase = "dump").entered();
    let mut rows = Vec::new();
    for v4 in [true, false] {
        let wanted: Vec<SocketAddr> = peers.iter().copied().filter(|p| p.is_ipv4() == v4).collect();
        if !wanted.is_empty() {
            match states {
                Some(states) => dumper.dump_states(&wanted, states, &mut rows)?,
                None => dumper.dump(&wanted, &mut rows)?,
            }
        }
    }
    Ok(rows)
}

fn client_socket(r: &Row) -> Option<ClientSocket> {
    (1..=11).contains(&r.state).then(|| ClientSocket {
        local: r.local,
        peer: r.remote,
        state: TCP_STATES[usize::from(r.state) - 1],
        send_queue: r.send_queue,
        recv_queue: r.recv_queue,
        inode: r.inode,
    })
}

fn same_peer(peer: &SocketAddr, remote: &SocketAddr) -> bool {
    peer.port() == remote.port() && peer.ip().to_canonical() == remote.ip().to_canonical()
}

/// One TCP socket toward the database: what attribution (local address and port matched to
/// the server's `client_addr`/`client_port`, or a pooler's `SHOW CLIENTS`) and the ledger of
/// ended sessions need, including sockets no process holds any more (inode 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Socket {
    /// The local end: what the server (or pooler) sees as the client's address and port.
    pub(crate) local: SocketAddr,
    /// The TCP state, an index into [`TCP_STATES`].
    pub(crate) state: usize,
    /// Whether this process holds it (an open fd). A `time_wait` socket belongs to no one.
    pub(crate) owned: bool,
    /// The socket's inode: its identity while it lives.
    pub(crate) inode: u64,
    /// Bytes queued to send (not yet acknowledged by the peer) and received but unread.
    pub(crate) send: u32,
    pub(crate) recv: u32,
}

impl Socket {
    /// A socket this process holds, as a read of the client-side ledger found it.
    pub(crate) fn of_client(s: &ClientSocket) -> Option<Socket> {
        Some(Socket {
            local: s.local,
            state: TCP_STATES.iter().position(|n| *n == s.state)?,
            owned: true,
            inode: s.inode,
            send: s.send_queue,
            recv: s.recv_queue,
        })
    }
}

impl SocketCensus {
    /// Counts the owned sockets of `sockets` by state.
    pub(crate) fn of_list(sockets: &[Socket], peer: SocketAddr) -> SocketCensus {
        let owned = sockets
            .iter()
            .filter(|s| s.owned)
            .map(|s| ClientSocket {
                local: s.local,
                peer,
                state: TCP_STATES[s.state],
                send_queue: s.send,
                recv_queue: s.recv,
                inode: s.inode,
            })
            .collect();
        SocketCensus::of(owned, SocketSource::Netlink)
    }
}

/// This process's sockets whose peer is one of `peers` (leaving out `exclude_local_port` and
/// poolwatch's probes), plus the sockets to those peers no process holds any more (inode 0:
/// closed, still in the kernel): one closed here first lingers in `fin_wait*` / `time_wait`
/// (~60 s), one the peer closed first only in `last_ack`, briefly. One netlink dump per
/// address family (every state but `listen`), or `/proc` where netlink is refused. Blocking.
#[cfg(target_os = "linux")]
pub(crate) fn list(peers: &[SocketAddr], exclude_local_port: Option<u16>) -> std::io::Result<Vec<Socket>> {
    note_read();
    let peers: Vec<SocketAddr> = peers.iter().map(|p| SocketAddr::new(p.ip().to_canonical(), p.port())).collect();
    let rows = match list_rows(&peers) {
        Ok(rows) => rows,
        Err(_) => proc_rows(&peers)?,
    };
    let own = owned_inodes(&peers, &rows)?;
    let mut sockets = Vec::new();
    for row in rows {
        let owned = row.inode != 0 && own.contains(&row.inode);
        let wanted = (owned || row.inode == 0)
            && peers.iter().any(|p| same_peer(p, &row.remote))
            && Some(row.local.port()) != exclude_local_port
            && !is_own(row.local.port());
        if wanted && (1..=11).contains(&row.state) {
            sockets.push(Socket {
                local: row.local,
                state: usize::from(row.state) - 1,
                owned,
                inode: row.inode,
                send: row.send_queue,
                recv: row.recv_queue,
            });
        }
    }
    Ok(sockets)
}

/// The census's netlink socket, kept between censuses (one is opened for a census that
/// finds it in use by another pool's).
#[cfg(target_os = "linux")]
static LIST_DUMPER: std::sync::Mutex<Option<netlink::Dumper>> = std::sync::Mutex::new(None);

/// Every socket to `peers` but listening ones, in one dump per address family, tried again
/// on a fresh netlink socket after a failure.
#[cfg(target_os = "linux")]
fn list_rows(peers: &[SocketAddr]) -> std::io::Result<Vec<Row>> {
    let mut last = std::io::Error::other("no dump attempted");
    for _ in 0..DUMP_ATTEMPTS {
        let kept = LIST_DUMPER.lock().ok().and_then(|mut d| d.take());
        let mut dumper = match kept {
            Some(d) => d,
            None => netlink::Dumper::new()?,
        };
        match dump_all(&mut dumper, peers, Some(netlink::ALL_BUT_LISTEN)) {
            Ok(rows) => {
                if let Ok(mut slot) = LIST_DUMPER.lock() {
                    *slot = Some(dumper);
                }
                return Ok(rows);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Whether each socket inode to a watched peer is this process's, remembered: an inode names
/// one socket while it lives, so `/proc/self/fd` (thousands of entries in a big app: the
/// costly part of a census) is walked only when a socket not seen before shows up.
#[cfg(target_os = "linux")]
static OWNERSHIP: std::sync::Mutex<Option<std::collections::HashMap<u64, (SocketAddr, bool)>>> =
    std::sync::Mutex::new(None);

/// Inodes remembered at most (sockets of every watched peer); past it the memory restarts.
#[cfg(target_os = "linux")]
const OWNERSHIP_MAX: usize = 65_536;

/// The inodes among `rows` (sockets to `peers`) that this process holds.
#[cfg(target_os = "linux")]
fn owned_inodes(peers: &[SocketAddr], rows: &[Row]) -> std::io::Result<HashSet<u64>> {
    let live: Vec<&Row> =
        rows.iter().filter(|r| r.inode != 0 && peers.iter().any(|p| same_peer(p, &r.remote))).collect();
    let mut guard = OWNERSHIP.lock().map_err(|_| std::io::Error::other("socket ownership lock poisoned"))?;
    let known = guard.get_or_insert_with(Default::default);
    if known.len() > OWNERSHIP_MAX {
        known.clear();
    }
    if live.iter().any(|r| !known.contains_key(&r.inode)) {
        let fds = own_socket_inodes()?;
        for r in &live {
            known.insert(r.inode, (r.remote, fds.contains(&r.inode)));
        }
    }
    // Forget the sockets to these peers that are gone.
    let alive: HashSet<u64> = live.iter().map(|r| r.inode).collect();
    known.retain(|inode, (remote, _)| alive.contains(inode) || !peers.iter().any(|p| same_peer(p, remote)));
    Ok(live.iter().filter(|r| known.get(&r.inode).is_some_and(|(_, ours)| *ours)).map(|r| r.inode).collect())
}

/// [`list`] on Tokio's blocking pool: its netlink receive and `/proc` reads are system calls
/// that must never stall a runtime worker (on a current-thread runtime, the whole app).
/// `None`: no peers (a unix socket), or the read failed.
pub(crate) async fn list_blocking(
    peers: Option<&[SocketAddr]>,
    exclude_local_port: Option<u16>,
) -> Option<Vec<Socket>> {
    let peers = peers?.to_vec();
    tokio::task::spawn_blocking(move || list(&peers, exclude_local_port).ok()).await.ok().flatten()
}

/// Not Linux: no socket list.
#[cfg(not(target_os = "linux"))]
pub(crate) fn list(_: &[SocketAddr], _: Option<u16>) -> std::io::Result<Vec<Socket>> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the socket list needs Linux"))
}

/// Index of `time_wait` in [`TCP_STATES`].
pub(crate) const TIME_WAIT: usize = 5;
/// Index of `close` in [`TCP_STATES`] (an owned socket the peer reset).
pub(crate) const CLOSE: usize = 6;
/// Index of `close_wait` in [`TCP_STATES`].
pub(crate) const CLOSE_WAIT: usize = 7;
/// Index of `last_ack` in [`TCP_STATES`].
pub(crate) const LAST_ACK: usize = 8;

#[cfg(target_os = "linux")]
fn own_socket_inodes() -> std::io::Result<HashSet<u64>> {
    let _walk = tracing::trace_span!("poolwatch.census.phase", phase = "fd_walk").entered();
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.extend(n.parse::<u64>().ok());
            }
        }
    }
    Ok(inodes)
}

/// The fallback: `/proc/self/net/tcp{,6}`, only the table of the peers' address family.
#[cfg(target_os = "linux")]
fn proc_rows(peers: &[SocketAddr]) -> std::io::Result<Vec<Row>> {
    let files = [
        ("/proc/self/net/tcp", peers.iter().any(SocketAddr::is_ipv4)),
        ("/proc/self/net/tcp6", peers.iter().any(SocketAddr::is_ipv6)),
    ];
    let mut rows = Vec::new();
    for (file, _) in files.iter().filter(|(_, wanted)| *wanted) {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        rows.extend(text.lines().skip(1).filter_map(parse_row));
    }
    Ok(rows)
}

/// Parses one row of `/proc/net/tcp{,6}`: `sl local rem st tx:rx tr retr uid timeout inode`.
fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (lip, lport) = parse_addr(f.get(1)?)?;
    let (ip, port) = parse_addr(f.get(2)?)?;
    let (tx, rx) = f.get(4)?.split_once(':')?;
    Some(Row {
        local: SocketAddr::new(lip.to_canonical(), lport),
        remote: SocketAddr::new(ip.to_canonical(), port),
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        send_queue: u32::from_str_radix(tx, 16).ok()?,
        recv_queue: u32::from_str_radix(rx, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
        cookie: [0xff; 8],
    })
}

/// `0100007F:1538` (IPv4) or 32 hex digits `:port` (IPv6); each 32-bit word is in host order.
fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (hex, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match hex.len() {
        8 => IpAddr::from(word(0)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The netlink `sock_diag` dump, built and parsed by hand (the wire format is fixed and
/// small); the socket itself comes from the safe `netlink-sys` crate.
#[cfg(target_os = "linux")]
mod netlink {
    use std::net::{IpAddr, SocketAddr};

    use netlink_sys::Socket;
    use netlink_sys::protocols::NETLINK_SOCK_DIAG;

    use super::Row;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const IPPROTO_TCP: u8 = 6;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    const INET_DIAG_REQ_BYTECODE: u16 = 1;
    const INET_DIAG_BC_JMP: u8 = 1;
    const INET_DIAG_BC_D_COND: u8 = 8;
    /// Every TCP state but `time_wait` (6) and `listen` (10): neither has an inode of ours.
    const STATES: u32 = ((1 << 12) - 2) & !(1 << 6) & !(1 << 10);
    /// Every TCP state but `listen`: the sockets closed here (`time_wait`, inode 0) too.
    pub(super) const ALL_BUT_LISTEN: u32 = ((1 << 12) - 2) & !(1 << 10);
    /// `struct inet_diag_msg`.
    const MSG_LEN: usize = 72;

    const NLM_F_DUMP_INTR: u16 = 0x10;
    const MSG_TRUNC: i32 = 0x20;
    /// The kernel answers while handling the request; a wait this long means something is
    /// wrong, and the read fails (and falls back) instead of holding a thread forever.
    pub(super) const RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
    /// A signal interrupts a receive with a timeout (it is not restarted): retried, bounded.
    const EINTR_RETRIES: u32 = 100;

    #[derive(Debug)]
    pub(super) struct Dumper {
        socket: Socket,
        buf: Vec<u8>,
        seq: u32,
    }

    /// One netlink message header, read from the front of `b` (at least 16 bytes).
    struct Header {
        len: usize,
        kind: u16,
        flags: u16,
        seq: u32,
    }

    fn header(b: &[u8]) -> Option<Header> {
        let h = b.get(..16)?;
        Some(Header {
            len: u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize,
            kind: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
        })
    }

    impl Dumper {
        pub(super) fn new() -> std::io::Result<Dumper> {
            let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
            socket2::SockRef::from(&socket).set_read_timeout(Some(RECV_TIMEOUT))?;
            Ok(Dumper { socket, buf: vec![0; 32 * 1024], seq: 0 })
        }

        /// One datagram into `buf`: a signal is retried, a truncated datagram (messages lost
        /// off its end) and a timeout are errors.
        fn recv(&mut self) -> std::io::Result<usize> {
            for _ in 0..EINTR_RETRIES {
                match self.socket.recv(&mut &mut self.buf[..], MSG_TRUNC) {
                    Ok(n) if n > self.buf.len() => {
                        return Err(std::io::Error::other("netlink answer larger than the receive buffer"));
                    }
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "netlink sock_diag did not answer within its receive timeout",
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "netlink receive interrupted by signals"))
        }

        /// Appends the sockets whose peer is one of `peers` (all of one address family).
        pub(super) fn dump(&mut self, peers: &[SocketAddr], rows: &mut Vec<Row>) -> std::io::Result<()> {
            self.dump_states(peers, STATES, rows)
        }

        /// Like `dump`, for the TCP states of the bit mask `states` (bit n: state n). Every
        /// part of the multi-part answer is read up to `NLMSG_DONE`; answers to an earlier
        /// request (another sequence number) are skipped; a dump the kernel flags as
        /// inconsistent is an error (`Interrupted`: read again).
        pub(super) fn dump_states(
            &mut self,
            peers: &[SocketAddr],
            states: u32,
            rows: &mut Vec<Row>,
        ) -> std::io::Result<()> {
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            self.socket.send(&request(peers, seq, states), 0)?;
            let mut found = Vec::new();
            let mut inconsistent = false;
            loop {
                let n = self.recv()?;
                let mut at = 0;
                while let Some(h) = self.buf.get(at..n).and_then(header) {
                    let b = &self.buf[at..n];
                    if h.len < 16 || h.len > b.len() {
                        return Err(std::io::Error::other("truncated netlink message"));
                    }
                    at += (h.len + 3) & !3;
                    if h.seq != seq {
                        continue;
                    }
                    inconsistent |= h.flags & NLM_F_DUMP_INTR != 0;
                    match h.kind {
                        NLMSG_DONE if inconsistent => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::Interrupted,
                                "the kernel flagged the socket dump inconsistent",
                            ));
                        }
                        NLMSG_DONE => {
                            rows.append(&mut found);
                            return Ok(());
                        }
                        NLMSG_ERROR => {
                            let code = b.get(16..20).map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                            return Err(std::io::Error::from_raw_os_error(code.saturating_neg()));
                        }
                        SOCK_DIAG_BY_FAMILY => found.extend(parse(&b[16..h.len])),
                        _ => {}
                    }
                }
            }
        }
    }

    #[cfg(test)]
    impl Dumper {
        /// Sends a dump request and leaves its answer unread.
        pub(super) fn abandon(&mut self, peers: &[SocketAddr]) {
            self.seq = self.seq.wrapping_add(1);
            let _ = self.socket.send(&request(peers, self.seq, STATES), 0);
        }
    }

    impl Dumper {
        /// Each of `known` looked up by its exact address pair and cookie (no dump); a socket
        /// that is gone, or another socket on the same pair, is left out.
        pub(super) fn lookup(&mut self, known: &[Row]) -> std::io::Result<Vec<Row>> {
            let _lookup = tracing::trace_span!("poolwatch.census.phase", phase = "lookup").entered();
            let mut found = Vec::with_capacity(known.len());
            for k in known {
                self.seq = self.seq.wrapping_add(1);
                let seq = self.seq;
                self.socket.send(&exact(k, seq), 0)?;
                // The kernel answered while handling the request: the answer is queued (the
                // receive timeout bounds the wait if it is not). Earlier answers are skipped.
                loop {
                    let n = self.recv()?;
                    let Some(h) = self.buf.get(..n).and_then(header) else { continue };
                    if h.seq != seq {
                        continue;
                    }
                    let end = h.len.min(n);
                    if h.kind == SOCK_DIAG_BY_FAMILY
                        && let Some(row) = self.buf.get(16..end).and_then(parse).filter(|r| r.inode == k.inode)
                    {
                        found.push(row);
                    }
                    break;
                }
            }
            Ok(found)
        }
    }

    /// `nlmsghdr` + `inet_diag_req_v2` naming one socket by its addresses, ports and cookie.
    fn exact(k: &Row, seq: u32) -> Vec<u8> {
        let family = if k.remote.is_ipv6() { AF_INET6 } else { AF_INET };
        let addr = |a: &SocketAddr| -> [u8; 16] {
            let mut b = [0u8; 16];
            match a.ip() {
                IpAddr::V4(ip) => b[..4].copy_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b.copy_from_slice(&ip.octets()),
            }
            b
        };
        let mut m = Vec::with_capacity(72);
        m.extend_from_slice(&72u32.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        m.extend_from_slice(&u32::MAX.to_ne_bytes());
        m.extend_from_slice(&k.local.port().to_be_bytes());
        m.extend_from_slice(&k.remote.port().to_be_bytes());
        m.extend_from_slice(&addr(&k.local));
        m.extend_from_slice(&addr(&k.remote));
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&k.cookie);
        m
    }

    /// `nlmsghdr` + `inet_diag_req_v2` + an `INET_DIAG_REQ_BYTECODE` attribute that keeps
    /// sockets whose destination is one of `peers`.
    fn request(peers: &[SocketAddr], seq: u32, states: u32) -> Vec<u8> {
        let family = if peers.first().is_some_and(SocketAddr::is_ipv6) { AF_INET6 } else { AF_INET };
        let code = bytecode(peers);
        let mut m = Vec::with_capacity(16 + 56 + 4 + code.len());
        let total = (16 + 56 + 4 + code.len()) as u32;
        m.extend_from_slice(&total.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        m.extend_from_slice(&states.to_ne_bytes());
        m.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: unused by a dump
        m.extend_from_slice(&((4 + code.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(&code);
        m
    }

    /// `D_COND(peer1) JMP(accept) D_COND(peer2) JMP(accept) ... D_COND(peerN)`: a match
    /// falls through to the next op (a `JMP` to the end: accept); a miss skips to the next
    /// condition; the last miss jumps past the end (reject).
    pub(super) fn bytecode(peers: &[SocketAddr]) -> Vec<u8> {
        let conds: Vec<Vec<u8>> = peers.iter().map(cond).collect();
        let total: usize = conds.iter().map(Vec::len).sum::<usize>() + 4 * conds.len().saturating_sub(1);
        let mut code = Vec::with_capacity(total);
        for mut c in conds {
            let len = c.len();
            let last = code.len() + len == total;
            c[1] = len as u8; // yes: the next op
            // no: skip the JMP to the next condition; after the last one, past the end.
            c[2..4].copy_from_slice(&((len + 4) as u16).to_ne_bytes());
            code.extend_from_slice(&c);
            if !last {
                let to_end = total - code.len();
                code.extend_from_slice(&[INET_DIAG_BC_JMP, 4]);
                code.extend_from_slice(&(to_end as u16).to_ne_bytes());
            }
        }
        code
    }

    /// One `inet_diag_bc_op` + `inet_diag_hostcond` matching the destination `peer`.
    fn cond(peer: &SocketAddr) -> Vec<u8> {
        let (family, prefix, addr): (u8, u8, Vec<u8>) = match peer.ip() {
            IpAddr::V4(ip) => (AF_INET, 32, ip.octets().to_vec()),
            IpAddr::V6(ip) => (AF_INET6, 128, ip.octets().to_vec()),
        };
        let mut op = vec![INET_DIAG_BC_D_COND, 0, 0, 0, family, prefix, 0, 0];
        op.extend_from_slice(&i32::from(peer.port()).to_ne_bytes());
        op.extend_from_slice(&addr);
        op
    }

    /// One `inet_diag_msg`: ports are big-endian, addresses in network order.
    fn parse(m: &[u8]) -> Option<Row> {
        if m.len() < MSG_LEN {
            return None;
        }
        let family = m[0];
        let ip = |at: usize| -> IpAddr {
            if family == AF_INET {
                IpAddr::from([m[at], m[at + 1], m[at + 2], m[at + 3]])
            } else {
                let mut b = [0u8; 16];
                b.copy_from_slice(&m[at..at + 16]);
                IpAddr::from(b).to_canonical()
            }
        };
        let u32_at = |at: usize| u32::from_ne_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
        Some(Row {
            local: SocketAddr::new(ip(8), u16::from_be_bytes([m[4], m[5]])),
            remote: SocketAddr::new(ip(24), u16::from_be_bytes([m[6], m[7]])),
            state: m[1],
            recv_queue: u32_at(56),
            send_queue: u32_at(60),
            inode: u64::from(u32_at(68)),
            cookie: [m[44], m[45], m[46], m[47], m[48], m[49], m[50], m[51]],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_list_keeps_sockets_closed_here_for_the_ended_ledger() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let kept = std::net::TcpStream::connect(peer).unwrap();
        let (_kept_server, _) = listener.accept().unwrap();
        let closed = std::net::TcpStream::connect(peer).unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        let (closed_server, _) = listener.accept().unwrap();
        // Closed here first: the kernel keeps it (no fd, inode 0) in fin_wait / time_wait.
        drop(closed);
        drop(closed_server);
        let all = list(&[peer], None).unwrap();
        let live = all.iter().find(|s| s.local == kept.local_addr().unwrap()).expect("the open socket");
        assert!(live.owned && TCP_STATES[live.state] == "established", "{all:?}");
        let gone = all.iter().find(|s| s.local.port() == closed_port).expect("the closed socket is still listed");
        assert!(!gone.owned && gone.inode == 0, "{all:?}");
        assert!(["fin_wait1", "fin_wait2", "time_wait", "closing"].contains(&TCP_STATES[gone.state]), "{all:?}");
        let census = SocketCensus::of_list(&all, peer);
        assert_eq!((census.get("established"), census.sockets.len()), (1, 1), "only owned sockets are counted");
        let without = list(&[peer], Some(kept.local_addr().unwrap().port())).unwrap();
        assert!(without.iter().all(|s| s.local != kept.local_addr().unwrap()), "the excluded port: {without:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_probe_sockets_are_counted_but_marked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(peer).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        let census = process_sockets(&[peer]).unwrap();
        assert_eq!(census.get("established"), 1, "a real socket to the peer is counted: {census:?}");
        assert_eq!(census.source, SocketSource::Netlink, "netlink works here");
        let s = census.sockets[0];
        assert_eq!((s.local, s.peer, s.state), (client.local_addr().unwrap(), peer, "established"));
        let own = OwnPort::new(client.local_addr().unwrap().port());
        assert!(is_own(s.local.port()));
        drop(own);
        assert!(!is_own(s.local.port()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn netlink_and_proc_agree_and_queues_are_read() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = [listener.local_addr().unwrap(), other.local_addr().unwrap()];
        let mut a = std::net::TcpStream::connect(peers[0]).unwrap();
        let _b = std::net::TcpStream::connect(peers[1]).unwrap();
        let unrelated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(unrelated.local_addr().unwrap()).unwrap();
        let (server_a, _) = listener.accept().unwrap();
        a.write_all(b"hello").unwrap();
        let mut reader = SocketReader::default();
        let netlink = reader.read(&peers).unwrap();
        assert_eq!(netlink.get("established"), 2, "both peers, not the unrelated socket: {netlink:?}");
        let proc: Vec<Row> = proc_rows(&peers).unwrap();
        for s in &netlink.sockets {
            let r = proc.iter().find(|r| r.inode == s.inode).expect("same socket in /proc");
            assert_eq!((r.local, r.remote), (s.local, s.peer));
        }
        // The server side has 5 unread bytes; its own sockets are not ours to count, so read
        // them by their peer: the client socket `a`.
        let back = SocketReader::default().read(&[a.local_addr().unwrap()]).unwrap();
        assert_eq!(back.sockets.len(), 1, "{back:?}");
        assert_eq!(back.sockets[0].recv_queue, 5, "unread bytes on the server side: {back:?}");
        // Read them (closing with unread data would reset), then hang up: close_wait.
        let mut server_a = server_a;
        std::io::Read::read_exact(&mut server_a, &mut [0u8; 5]).unwrap();
        drop(server_a);
        let closed = eventually_state(&mut reader, &peers, "close_wait");
        assert_eq!(closed, 1, "the peer hung up: close_wait");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn exact_lookups_follow_known_sockets_and_fall_back_to_a_dump() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let a = std::net::TcpStream::connect(peer).unwrap();
        let (_sa, _) = listener.accept().unwrap();
        let mut reader = SocketReader::new();
        let first = reader.read_with_hint(&[peer], 1).unwrap();
        assert_eq!(first.get("established"), 1, "{first:?}");
        assert!(reader.known_hint.is_some() && reader.known.len() == 1);
        let steady = reader.read_with_hint(&[peer], 1).unwrap();
        assert_eq!(steady, first, "looked up, same figures");
        // A new socket with the same hint is not seen by lookups (that is what the hint
        // promises); a socket gone is, and forces a dump.
        let b = std::net::TcpStream::connect(peer).unwrap();
        let (_sb, _) = listener.accept().unwrap();
        assert_eq!(reader.read_with_hint(&[peer], 1).unwrap().get("established"), 1);
        assert_eq!(reader.read_with_hint(&[peer], 2).unwrap().get("established"), 2, "a new hint dumps");
        drop(a);
        // Another test of this binary may be spawning a process: until its exec, the child
        // holds a copy of every descriptor and `a` stays established. Wait for the close.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let after = loop {
            let after = reader.read_with_hint(&[peer], 2).unwrap();
            if after.get("established") == 1 || std::time::Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(after.get("established"), 1, "a's socket left: {after:?}");
        assert_eq!(after.sockets[0].local, b.local_addr().unwrap());
    }

    /// A netlink socket left with an unread dump (the kernel then refuses the next one with
    /// EBUSY) is replaced by a fresh one: the read stays on netlink and correct, where it used
    /// to switch to `/proc` for good.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_dump_left_unread_does_not_send_the_reader_to_proc() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let _ca = std::net::TcpStream::connect(pa).unwrap();
        let cb = std::net::TcpStream::connect(pb).unwrap();
        let mut dumper = netlink::Dumper::new().unwrap();
        dumper.abandon(&[pa]);
        let mut reader = SocketReader { netlink: Some(dumper), ..SocketReader::default() };
        for _ in 0..2 {
            let census = reader.read(&[pb]).unwrap();
            assert_eq!(census.source, SocketSource::Netlink, "{census:?}");
            let locals: Vec<SocketAddr> = census.sockets.iter().map(|s| s.local).collect();
            assert_eq!(locals, [cb.local_addr().unwrap()], "{census:?}");
        }
    }

    /// Loads both cores (stress-ng, when installed) for as long as it lives.
    #[cfg(target_os = "linux")]
    struct Stress(Option<std::process::Child>);

    #[cfg(target_os = "linux")]
    impl Drop for Stress {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Connects and drops sockets to `peers` until `stop`: each lives a few rounds and most
    /// end with a reset (no `time_wait` left behind to use up the ephemeral ports).
    #[cfg(target_os = "linux")]
    fn churn(peers: Vec<SocketAddr>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
        let mut ring = std::collections::VecDeque::new();
        let mut opened = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for peer in &peers {
                if let Ok(s) = std::net::TcpStream::connect(peer) {
                    if !opened.is_multiple_of(4) {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
                    }
                    ring.push_back(s);
                    opened += 1;
                }
            }
            while ring.len() > 24 {
                ring.pop_front();
            }
            std::thread::sleep(std::time::Duration::from_micros(300));
        }
        opened
    }

    /// Accepts connections and soon drops them (some churned sockets see the hang-up first).
    #[cfg(target_os = "linux")]
    fn accept_and_drop(l: std::net::TcpListener, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
        let _ = l.set_nonblocking(true);
        let mut kept = std::collections::VecDeque::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => kept.push_back(s),
                Err(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
            while kept.len() > 32 {
                kept.pop_front();
            }
        }
        0
    }

    /// Every socket that stays established while other threads open and close sockets to the
    /// same peer (and others), on a loaded machine, is listed by every kind of read: the
    /// reader kept between reads, a cold read, and the census's list.
    #[cfg(target_os = "linux")]
    #[test]
    fn every_socket_established_throughout_is_listed_in_every_read() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};
        let stress = Stress(
            std::process::Command::new("stress-ng")
                .args(["--cpu", "2", "--timeout", "60"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let other_peer = other.local_addr().unwrap();
        let stable: Vec<_> = (0..50)
            .map(|_| {
                let client = std::net::TcpStream::connect(peer).unwrap();
                (client, listener.accept().unwrap().0)
            })
            .collect();
        let wanted: HashSet<SocketAddr> = stable.iter().map(|(c, _)| c.local_addr().unwrap()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for l in [listener, other] {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || accept_and_drop(l, stop)));
        }
        for _ in 0..3 {
            let stop = Arc::clone(&stop);
            let peers = vec![other_peer, peer];
            threads.push(std::thread::spawn(move || churn(peers, stop)));
        }
        let mut reader = SocketReader::new();
        let (mut reads, mut misses) = (0u32, Vec::new());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(8) {
            let kept: Vec<(SocketAddr, &str)> =
                reader.read(&[peer]).unwrap().sockets.iter().map(|s| (s.local, s.state)).collect();
            let cold: Vec<(SocketAddr, &str)> =
                process_sockets(&[peer]).unwrap().sockets.iter().map(|s| (s.local, s.state)).collect();
            let listed: Vec<(SocketAddr, &str)> = list(&[peer], None)
                .unwrap()
                .iter()
                .filter(|s| s.owned)
                .map(|s| (s.local, TCP_STATES[s.state]))
                .collect();
            for (kind, found) in [("kept reader", kept), ("cold read", cold), ("census list", listed)] {
                let seen: HashSet<SocketAddr> =
                    found.iter().filter(|(_, state)| *state == "established").map(|(a, _)| *a).collect();
                let missed = wanted.difference(&seen).count();
                if missed > 0 {
                    misses.push(format!("read {reads} ({kind}): {missed} of {} missed", wanted.len()));
                }
            }
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let opened: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "{reads} rounds of 3 reads, {opened} sockets opened and closed meanwhile, stress-ng: {}, load {}",
            stress.0.is_some(),
            load.split_whitespace().next().unwrap_or("?")
        );
        assert!(reads > 10, "too few reads to tell: {reads}");
        assert!(misses.is_empty(), "{} read(s) missed a socket:\n{}", misses.len(), misses.join("\n"));
        drop(stable);
    }

    #[cfg(target_os = "linux")]
    fn eventually_state(reader: &mut SocketReader, peers: &[SocketAddr], state: &str) -> u32 {
        for _ in 0..500 {
            let n = reader.read(peers).unwrap().get(state);
            if n > 0 {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        0
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn bytecode_jumps_land_on_ops_and_the_end() {
        let peers: Vec<SocketAddr> = vec![
            "127.0.0.1:5432".parse().unwrap(),
            "127.0.0.2:5432".parse().unwrap(),
            "127.0.0.3:6432".parse().unwrap(),
        ];
        let code = netlink::bytecode(&peers);
        assert_eq!(code.len(), 3 * 16 + 2 * 4);
        // First cond: yes -> its JMP (16), no -> the second cond (20); JMP to the end.
        assert_eq!((code[1], u16::from_ne_bytes([code[2], code[3]])), (16, 20));
        // The JMP jumps from its own start to the end.
        assert_eq!((code[16], code[17], u16::from_ne_bytes([code[18], code[19]])), (1, 4, (code.len() - 16) as u16));
        let last = code.len() - 16;
        assert_eq!(u16::from_ne_bytes([code[last + 2], code[last + 3]]), 20, "last miss: past the end");
    }

    #[test]
    fn parses_kernel_rows() {
        let v4 = "   1: 0100007F:D431 0100007F:1538 01 00000010:00000002 00:00000000 00000000   101        0 424242 1";
        let r = parse_row(v4).expect("v4 row");
        assert_eq!(
            (r.local.port(), r.remote, r.state, r.inode),
            (0xD431, "127.0.0.1:5432".parse().unwrap(), 1, 424242)
        );
        assert_eq!((r.send_queue, r.recv_queue), (16, 2));
        let v6 = "   0: 00000000000000000000000001000000:9C40 0000000000000000FFFF00000100007F:1538 08 00000000:00000000 00:00000000 00000000 0 0 7 1";
        let r = parse_row(v6).expect("v6 row");
        assert_eq!(r.state, 8);
        assert!(same_peer(&"127.0.0.1:5432".parse().unwrap(), &r.remote), "v4-mapped peer {}", r.remote);
    }
}
