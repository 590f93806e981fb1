//! Reachability of every address the database host resolves to (incident 4).
//!
//! sqlx connects by trying each resolved address in turn, with no per-address timeout: one
//! address that drops SYNs makes some connects hang for minutes while others take 3 ms. So,
//! after each census, poolwatch resolves the pool's host and opens a bare TCP connection to
//! each address (the handshake only: no startup packet, closed at once), all at once, each
//! bounded by `census_timeout`. It never uses a pool slot and never delays the census (the
//! probes run after it). Unix-socket hosts are skipped.
//!
//! Exported per pool: `poolwatch_server_addresses` (how many addresses the host resolved to)
//! and, per probed address, `poolwatch_server_address_up` and
//! `poolwatch_server_address_connect_seconds`, labelled `server_address` = `IP:port`.
//!
//! `server_address` is the one label whose values come from outside poolwatch (the DNS
//! answer). It stays bounded: at most [`MAX_ADDRESSES`] addresses are probed per census, and
//! at most [`MAX_SERIES`] distinct addresses ever get series per pool (further new addresses
//! are probed and show in [`Reachability`], but get no series; one WARN says so). The
//! `metrics` facade cannot delete a series: an address that left the DNS answer keeps its
//! series with the value NaN ("not probed any more"), which `== 0` / `== 1` never match, so
//! alerts resolve once a dead address is removed from DNS.
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! let reach = poolwatch::reach::probe_host("db.internal", 5432, Duration::from_secs(2)).await;
//! for a in &reach.addresses {
//!     println!("{} up={} in {:?}", a.address, a.up, a.connect_time);
//! }
//! # }
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use tokio::task::JoinSet;

use crate::cause::Cause;

/// At most this many resolved addresses are probed per census (the first ones, in DNS order).
pub const MAX_ADDRESSES: usize = 16;
/// At most this many distinct addresses get metric series per pool over the process's life.
pub const MAX_SERIES: usize = 4 * MAX_ADDRESSES;

/// The outcome of one TCP connect to one resolved address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressFigures {
    /// The address probed.
    pub address: SocketAddr,
    /// Whether the TCP handshake completed within the timeout.
    pub up: bool,
    /// How long the attempt took: the handshake when up, else until it failed or timed out.
    pub connect_time: Duration,
    /// Why it failed (`Refused`, `TimedOut`, ...); `None` when up.
    pub error: Option<Cause>,
}

/// Every address the database host resolved to at the last probe, and how each answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reachability {
    /// How many addresses the host resolved to (all of them, beyond [`MAX_ADDRESSES`] too);
    /// 0 before the first probe, for a unix socket, or when resolution failed.
    pub resolved: usize,
    /// The probed addresses, in DNS order (at most [`MAX_ADDRESSES`]).
    pub addresses: Vec<AddressFigures>,
    /// Why resolving the host failed, if it did.
    pub resolve_error: Option<Cause>,
}

impl Reachability {
    /// The probed addresses that answered.
    pub fn up(&self) -> usize {
        self.addresses.iter().filter(|a| a.up).count()
    }

    /// The figures of `address`, if it was probed.
    pub fn get(&self, address: SocketAddr) -> Option<&AddressFigures> {
        self.addresses.iter().find(|a| a.address == address)
    }
}

/// Opens a TCP connection to each address at once (closed as soon as it is up), each bounded
/// by `timeout`; returns when all have answered or timed out, in the order given. Call it
/// inside a Tokio runtime (each probe is a task, aborted if this future is dropped).
pub async fn probe_addresses(addresses: &[SocketAddr], timeout: Duration) -> Vec<AddressFigures> {
    let mut probes = JoinSet::new();
    for (i, &address) in addresses.iter().enumerate() {
        probes.spawn(async move { (i, probe_one(address, timeout).await) });
    }
    let mut found: Vec<Option<AddressFigures>> = vec![None; addresses.len()];
    while let Some(joined) = probes.join_next().await {
        if let Ok((i, figures)) = joined {
            found[i] = Some(figures);
        }
    }
    // A probe task cannot panic; should one be lost anyway, its address reads down.
    found
        .into_iter()
        .zip(addresses)
        .map(|(f, &address)| {
            f.unwrap_or(AddressFigures { address, up: false, connect_time: timeout, error: Some(Cause::Other) })
        })
        .collect()
}

/// A TCP handshake with `address`, then close: FIN, no startup packet, so PostgreSQL logs
/// nothing. The socket is bound first so its local port is known, and marked as poolwatch's
/// own until it is closed: the socket census never counts it.
async fn connect_and_close(address: SocketAddr) -> std::io::Result<()> {
    let (socket, any) = match address {
        SocketAddr::V4(_) => (tokio::net::TcpSocket::new_v4()?, SocketAddr::from(([0, 0, 0, 0], 0))),
        SocketAddr::V6(_) => (tokio::net::TcpSocket::new_v6()?, SocketAddr::from(([0u16; 8], 0))),
    };
    socket.bind(any)?;
    let _own = crate::ledger::sockets::OwnPort::new(socket.local_addr()?.port());
    drop(socket.connect(address).await?);
    Ok(())
}

async fn probe_one(address: SocketAddr, timeout: Duration) -> AddressFigures {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, connect_and_close(address)).await;
    let connect_time = started.elapsed();
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(Cause::of_io(e.kind())),
        Err(_) => Some(Cause::TimedOut),
    };
    AddressFigures { address, up: error.is_none(), connect_time, error }
}

/// Resolves `host` (bounded by `timeout`) and probes the first [`MAX_ADDRESSES`] addresses
/// with [`probe_addresses`]. An IP literal is probed without a lookup.
pub async fn probe_host(host: &str, port: u16, timeout: Duration) -> Reachability {
    let resolved = match resolve(host, port, timeout).await {
        Ok(addresses) => addresses,
        Err(cause) => return Reachability { resolve_error: Some(cause), ..Reachability::default() },
    };
    let probed = &resolved[..resolved.len().min(MAX_ADDRESSES)];
    Reachability { resolved: resolved.len(), addresses: probe_addresses(probed, timeout).await, resolve_error: None }
}

async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, Cause> {
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let found = match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err(Cause::of_io(e.kind())),
        Err(_) => return Err(Cause::TimedOut),
    };
    let mut unique: Vec<SocketAddr> = Vec::new();
    for address in found {
        if !unique.contains(&address) {
            unique.push(address);
        }
    }
    Ok(unique)
}

/// The reachability probe of one watched pool: its gauges and latest figures.
#[derive(Debug)]
pub(crate) struct Reach {
    pool_name: String,
    latest: Mutex<Reachability>,
    resolve_failing: AtomicBool,
    /// The connect-trouble count when the probe last ran.
    trouble_seen: AtomicU64,
    /// When the probe last ran: an address found down is probed again every `recheck` until
    /// it answers (else it would read down until the next scheduled probe).
    last_run: Mutex<Option<Instant>>,
}

impl Reach {
    pub(crate) fn new(pool_name: &str) -> Reach {
        Reach {
            pool_name: pool_name.to_owned(),
            latest: Mutex::new(Reachability::default()),
            resolve_failing: AtomicBool::new(false),
            trouble_seen: AtomicU64::new(u64::MAX),
            last_run: Mutex::new(None),
        }
    }

    /// Whether a probe is due beside the schedule: connects failed or slowed down since the
    /// last probe (`trouble` counts them), or an address is down and `recheck` passed since
    /// (a recovered address must not read down for hours; costs the server a probe per
    /// `recheck` only while something is down).
    pub(crate) fn wanted(&self, trouble: u64, recheck: Duration) -> bool {
        let last = self.last_run.lock().ok().and_then(|l| *l);
        let recheck_down = self.any_down() && last.is_none_or(|at| at.elapsed() >= recheck);
        self.trouble_seen.load(Ordering::Relaxed) != trouble || recheck_down
    }

    /// Probes now (on its schedule, or soon after [`wanted`](Self::wanted)); `trouble` is the
    /// connect-trouble count now.
    pub(crate) async fn run_now(
        &self,
        trouble: u64,
        options: &PgConnectOptions,
        timeout: Duration,
    ) -> Option<Reachability> {
        self.trouble_seen.store(trouble, Ordering::Relaxed);
        if let Ok(mut last) = self.last_run.lock() {
            *last = Some(Instant::now());
        }
        // The probes' sockets are left out of any socket census by port (`OwnPort`).
        self.run(options, timeout).await
    }

    /// Clears what a panicked task left poisoned.
    pub(crate) fn clear_poison(&self) {
        self.last_run.clear_poison();
    }

    pub(crate) fn figures(&self) -> Reachability {
        self.latest.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Whether the last probe found the host unresolvable or an address down (read in place:
    /// asked every sample).
    pub(crate) fn any_down(&self) -> bool {
        self.latest.lock().is_ok_and(|r| r.resolve_error.is_some() || r.up() < r.addresses.len())
    }

    /// Probes the addresses of the host in `options` and keeps the figures; returns them
    /// (to publish). Does nothing for a unix socket.
    pub(crate) async fn run(&self, options: &PgConnectOptions, timeout: Duration) -> Option<Reachability> {
        let host = options.get_host();
        if options.get_socket().is_some() || host.starts_with('/') {
            return None;
        }
        let reach = probe_host(host, options.get_port(), timeout).await;
        match reach.resolve_error {
            Some(cause) if !self.resolve_failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(pool = %self.pool_name, %cause, "poolwatch could not resolve the database host");
            }
            None if self.resolve_failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(pool = %self.pool_name, "poolwatch resolves the database host again");
            }
            _ => {}
        }
        if let Ok(mut latest) = self.latest.lock() {
            *latest = reach.clone();
        }
        Some(reach)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_skip_the_lookup_and_duplicates_are_dropped() {
        let v4 = resolve("127.0.0.1", 5432, Duration::from_secs(1)).await;
        assert_eq!(v4, Ok(vec!["127.0.0.1:5432".parse().unwrap()]));
        let v6 = resolve("[::1]", 5432, Duration::from_secs(1)).await;
        assert_eq!(v6, Ok(vec!["[::1]:5432".parse().unwrap()]));
        let localhost = resolve("localhost", 5432, Duration::from_secs(5)).await.unwrap();
        let unique: std::collections::HashSet<_> = localhost.iter().collect();
        assert!(!localhost.is_empty() && unique.len() == localhost.len(), "{localhost:?}");
    }

    #[tokio::test]
    async fn an_unknown_host_is_a_resolve_error() {
        let reach = probe_host("no-such-host.invalid", 5432, Duration::from_secs(5)).await;
        assert!(reach.resolve_error.is_some(), "{reach:?}");
        assert_eq!((reach.resolved, reach.addresses.len()), (0, 0));
    }
}
