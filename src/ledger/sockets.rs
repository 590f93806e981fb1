//! The socket census: this process's own TCP sockets to the database, by TCP state, read
//! from `/proc/self/net/tcp{,6}` and matched to `/proc/self/fd` (Linux only; elsewhere the
//! census is absent and `poolwatch_client_sockets` is not exported). The per-socket list
//! ([`list`]) also feeds attribution by port and the ledger of sessions the peer ended.

use std::net::SocketAddr;

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

/// Counts of the process's sockets to the database address, indexed like [`TCP_STATES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketCensus {
    /// `counts[i]` sockets are in state `TCP_STATES[i]`.
    pub counts: [u32; 11],
    /// The sockets with bytes in their send queue (sent, not yet acknowledged by the peer)
    /// at this census; a queue that never drains is a silent peer.
    pub send_queued: Vec<SocketQueue>,
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

impl SocketCensus {
    /// Sockets in `state` (a name from [`TCP_STATES`]); 0 for an unknown name.
    pub fn get(&self, state: &str) -> u32 {
        TCP_STATES.iter().position(|s| *s == state).map_or(0, |i| self.counts[i])
    }
}

/// Sockets whose send queue stays non-empty from census to census: the peer stopped
/// acknowledging (a silent peer: no RST, no FIN, e.g. a NAT that dropped the flow). A busy
/// socket drains between censuses; a silent one never does.
#[derive(Debug)]
pub(crate) struct StuckSendQueues {
    bound: std::time::Duration,
    since: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
    gauge: crate::gauges::LazyGauge,
}

impl StuckSendQueues {
    /// At `Detail::Standard` the series appears at the first stuck queue (the series budget).
    pub(crate) fn new(pool_name: &str, bound: std::time::Duration, detail: crate::Detail) -> StuckSendQueues {
        let gauge = crate::gauges::LazyGauge::new(
            crate::catalog::SEND_QUEUE_STUCK.name,
            vec![(crate::catalog::POOL_NAME, pool_name.to_owned())],
            detail == crate::Detail::Full,
        );
        StuckSendQueues { bound, since: std::sync::Mutex::new(std::collections::HashMap::new()), gauge }
    }

    /// Takes this census's queues; returns and publishes how many sockets have had a
    /// non-empty send queue at every census for at least the bound.
    pub(crate) fn update(&self, census: &SocketCensus) -> u32 {
        let now = std::time::Instant::now();
        let Ok(mut since) = self.since.lock() else { return 0 };
        since.retain(|inode, _| census.send_queued.iter().any(|q| q.inode == *inode));
        for q in &census.send_queued {
            since.entry(q.inode).or_insert(now);
        }
        let stuck = since.values().filter(|at| now.saturating_duration_since(**at) >= self.bound).count();
        let stuck = u32::try_from(stuck).unwrap_or(u32::MAX);
        self.gauge.set(f64::from(stuck));
        stuck
    }

    /// The figure of the last census.
    pub(crate) fn figure(&self) -> u32 {
        let now = std::time::Instant::now();
        self.since.lock().map_or(0, |s| {
            u32::try_from(s.values().filter(|at| now.saturating_duration_since(**at) >= self.bound).count())
                .unwrap_or(0)
        })
    }
}

/// Local ports of poolwatch's own short-lived sockets open now (reachability probes): the
/// socket census leaves them out.
static OWN_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Marks a local port as poolwatch's own while it lives.
#[derive(Debug)]
pub(crate) struct OwnPort(u16);

impl OwnPort {
    pub(crate) fn new(port: u16) -> OwnPort {
        if let Ok(mut ports) = OWN_PORTS.lock() {
            ports.push(port);
        }
        OwnPort(port)
    }
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        if let Ok(mut ports) = OWN_PORTS.lock()
            && let Some(i) = ports.iter().position(|p| *p == self.0)
        {
            ports.swap_remove(i);
        }
    }
}

fn is_own(port: u16) -> bool {
    OWN_PORTS.lock().is_ok_and(|ports| ports.contains(&port))
}

/// One TCP socket toward the database: what attribution (local address and port matched to
/// the server's `client_addr`/`client_port`, or a pooler's `SHOW CLIENTS`) and the ledger of
/// ended sessions need. How the list is read is this module's business (`/proc` today).
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

impl SocketCensus {
    /// Counts the owned sockets of `sockets` by state.
    pub(crate) fn of(sockets: &[Socket]) -> SocketCensus {
        let mut census = SocketCensus::default();
        for s in sockets.iter().filter(|s| s.owned) {
            census.counts[s.state] += 1;
            if s.send > 0 {
                census.send_queued.push(SocketQueue {
                    inode: s.inode,
                    local_port: s.local.port(),
                    send: s.send,
                    recv: s.recv,
                });
            }
        }
        census
    }
}

/// Takes the census of sockets whose peer is one of `peers`, leaving out the socket whose
/// local port is `exclude_local_port` (poolwatch's own connection) and poolwatch's probes.
#[cfg(test)]
pub(crate) fn take(peers: &[SocketAddr], exclude_local_port: Option<u16>) -> std::io::Result<SocketCensus> {
    list(peers, exclude_local_port).map(|sockets| SocketCensus::of(&sockets))
}

/// This process's sockets whose peer is one of `peers` (leaving out `exclude_local_port` and
/// poolwatch's probes), plus the sockets to those peers no process holds any more (inode 0:
/// closed, still in the kernel): one closed here first lingers in `fin_wait*` / `time_wait`
/// (~60 s), one the peer closed first only in `last_ack`, briefly.
#[cfg(target_os = "linux")]
pub(crate) fn list(peers: &[SocketAddr], exclude_local_port: Option<u16>) -> std::io::Result<Vec<Socket>> {
    let own = own_socket_inodes()?;
    let mut sockets = Vec::new();
    // Each read makes the kernel walk its whole TCP hash table (~1.5 ms here): read only the
    // table of the peers' address family (an IPv4 peer is reached over an AF_INET socket).
    let files = [
        ("/proc/self/net/tcp", peers.iter().any(SocketAddr::is_ipv4)),
        ("/proc/self/net/tcp6", peers.iter().any(SocketAddr::is_ipv6)),
    ];
    for (file, _) in files.iter().filter(|(_, wanted)| *wanted) {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for row in text.lines().skip(1).filter_map(parse_row) {
            let owned = own.contains(&row.inode);
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
                    send: row.send,
                    recv: row.recv,
                });
            }
        }
    }
    Ok(sockets)
}

/// Not Linux: no socket list.
#[cfg(not(target_os = "linux"))]
pub(crate) fn list(_: &[SocketAddr], _: Option<u16>) -> std::io::Result<Vec<Socket>> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the socket list needs Linux /proc"))
}

/// Index of `time_wait` in [`TCP_STATES`].
#[cfg(test)]
pub(crate) const TIME_WAIT: usize = 5;
/// Index of `close` in [`TCP_STATES`] (an owned socket the peer reset).
pub(crate) const CLOSE: usize = 6;
/// Index of `close_wait` in [`TCP_STATES`].
pub(crate) const CLOSE_WAIT: usize = 7;
/// Index of `last_ack` in [`TCP_STATES`].
pub(crate) const LAST_ACK: usize = 8;

#[cfg(target_os = "linux")]
fn own_socket_inodes() -> std::io::Result<std::collections::HashSet<u64>> {
    let mut inodes = std::collections::HashSet::new();
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

fn same_peer(peer: &SocketAddr, remote: &SocketAddr) -> bool {
    peer.port() == remote.port() && peer.ip().to_canonical() == remote.ip().to_canonical()
}

struct Row {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    send: u32,
    recv: u32,
    inode: u64,
}

/// Parses one row of `/proc/net/tcp{,6}`: `sl local rem st queues tr retr uid timeout inode`.
fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (local_ip, local_port) = parse_addr(f.get(1)?)?;
    let (ip, port) = parse_addr(f.get(2)?)?;
    let (send, recv) = f.get(4)?.split_once(':')?;
    Some(Row {
        local: SocketAddr::new(local_ip, local_port),
        remote: SocketAddr::new(ip, port),
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        send: u32::from_str_radix(send, 16).ok()?,
        recv: u32::from_str_radix(recv, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1538` (IPv4) or 32 hex digits `:port` (IPv6); each 32-bit word is in host order.
fn parse_addr(s: &str) -> Option<(std::net::IpAddr, u16)> {
    let (hex, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match hex.len() {
        8 => std::net::IpAddr::from(word(0)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            std::net::IpAddr::from(b)
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn own_probe_sockets_are_left_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(peer).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        assert_eq!(take(&[peer], None).unwrap().get("established"), 1, "a real socket to the peer is counted");
        let own = OwnPort::new(client.local_addr().unwrap().port());
        assert_eq!(take(&[peer], None).unwrap().get("established"), 0, "poolwatch's own probe is not");
        drop(own);
        assert_eq!(take(&[peer], None).unwrap().get("established"), 1);
    }

    #[test]
    fn parses_kernel_rows() {
        let v4 = "   1: 0100007F:D431 0100007F:1538 01 002AC800:00000010 04:00000003 00000000   101        0 424242 1";
        let r = parse_row(v4).expect("v4 row");
        assert_eq!(
            (r.local.port(), r.remote, r.state, r.inode),
            (0xD431, "127.0.0.1:5432".parse().unwrap(), 1, 424242)
        );
        assert_eq!((r.send, r.recv), (0x2AC800, 16), "tx_queue:rx_queue");
        let v6 = "   0: 00000000000000000000000001000000:9C40 0000000000000000FFFF00000100007F:1538 08 00000000:00000000 00:00000000 00000000 0 0 7 1";
        let r = parse_row(v6).expect("v6 row");
        assert_eq!(r.state, 8);
        assert!(same_peer(&"127.0.0.1:5432".parse().unwrap(), &r.remote), "v4-mapped peer {}", r.remote);
    }
}
