//! The census through a pooler's admin console (PgBouncer): which of the pooler's client
//! connections are this pool's, in this process, and what the pooler's own pool looks like.
//!
//! Behind a pooler the server only sees the pooler's connections, so the server census
//! cannot tell this process's sessions apart. The pooler can: `SHOW CLIENTS` lists each
//! client connection with its address and port (this process's local ends) and its
//! `application_name` (the pool's tag). A pool slot whose client connection the pooler
//! closed (`client_idle_timeout`, `KILL`, a restart) has no row: it is phantom.
//!
//! Two statements per census on the admin console (simple protocol, which is all the
//! console speaks): `SHOW CLIENTS` and `SHOW POOLS`; `SHOW CONFIG` once per connect.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{ConnectOptions, Connection, Row};

use crate::cause::Cause;
use crate::ledger::sockets::OwnPort;

/// The pooler's view of this app's pool at the last census (PgBouncer's `SHOW POOLS` row of
/// the pool's database and user, shared by every client of that pool, all replicas included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolerFigures {
    /// This pool's client connections (this process, this pool's tag) the pooler lists.
    pub clients: u32,
    /// Clients waiting for a server connection now (`cl_waiting`).
    pub waiting_clients: u32,
    /// How long the oldest waiting client has waited (`maxwait`, `maxwait_us`).
    pub max_wait: Duration,
    /// Server connections linked to a client now (`sv_active`).
    pub servers_active: u32,
    /// Server connections open and not linked (`sv_idle + sv_used + sv_tested`).
    pub servers_idle: u32,
}

/// One client connection of this pool the pooler listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    /// This process's local port of it.
    pub(crate) port: u16,
    /// Linked to a server connection (in a transaction, or any session-mode client).
    pub(crate) linked: bool,
}

/// The admin-console connection (lazily (re)connected, bounded by the census timeout).
pub(crate) struct PoolerConnection {
    options: PgConnectOptions,
    timeout: Duration,
    conn: Option<PgConnection>,
    /// PgBouncer's `client_idle_timeout` (`SHOW CONFIG`), read at connect; `None`: 0 or unknown.
    pub(crate) client_idle_timeout: Option<Duration>,
    /// The local port of this connection, as the pooler lists it: it goes to the same
    /// listener as the pool, and the client-side ledger must not count it as a pool socket.
    own_ports: Vec<OwnPort>,
}

/// Written by hand: `PgConnectOptions`'s own `Debug` prints the password.
impl std::fmt::Debug for PoolerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolerConnection")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl PoolerConnection {
    pub(crate) fn new(options: PgConnectOptions, app_name: &str, timeout: Duration) -> Self {
        let options = options.application_name(app_name).disable_statement_logging();
        PoolerConnection { options, timeout, conn: None, client_idle_timeout: None, own_ports: Vec::new() }
    }

    async fn get(&mut self) -> Result<&mut PgConnection, Cause> {
        if self.conn.is_none() {
            let mut conn = tokio::time::timeout(self.timeout, PgConnection::connect_with(&self.options))
                .await
                .map_err(|_| Cause::TimedOut)?
                .map_err(|e| Cause::of(&e))?;
            let config = tokio::time::timeout(self.timeout, show(&mut conn, "SHOW CONFIG"))
                .await
                .map_err(|_| Cause::TimedOut)?
                .map_err(|e| Cause::of(&e))?;
            self.client_idle_timeout = config
                .iter()
                .find(|r| text(r, "key").as_deref() == Some("client_idle_timeout"))
                .and_then(|r| text(r, "value"))
                .and_then(|v| seconds(&v))
                .filter(|d| !d.is_zero());
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(Cause::Other)
    }

    /// Takes the pooler census: this pool's clients among `own` (this process's local ends
    /// toward the pooler), and the `SHOW POOLS` row of `database`/`user`. Also returns the
    /// local ports of poolwatch's own admin connection (to leave out of the socket census).
    pub(crate) async fn take(
        &mut self,
        tag: &str,
        admin_app_name: &str,
        database: &str,
        user: &str,
        own: &[SocketAddr],
    ) -> Result<(PoolerFigures, Vec<Client>, Vec<u16>), Cause> {
        let timeout = self.timeout;
        let conn = self.get().await?;
        let result = tokio::time::timeout(timeout, async {
            let clients = show(conn, "SHOW CLIENTS").await?;
            let pools = show(conn, "SHOW POOLS").await?;
            Ok::<_, sqlx::Error>((clients, pools))
        })
        .await;
        let (clients, pools) = match result {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.discard();
                return Err(Cause::of(&e));
            }
            Err(_) => {
                self.discard();
                return Err(Cause::TimedOut);
            }
        };
        let own: HashSet<(IpAddr, u16)> = own.iter().map(|a| (a.ip().to_canonical(), a.port())).collect();
        let mut mine = Vec::new();
        let mut admin_ports = Vec::new();
        for row in &clients {
            let Some(end) = client_end(row) else { continue };
            if !own.contains(&end) {
                continue;
            }
            let app = text(row, "application_name");
            if app.as_deref() == Some(tag) {
                let linked = text(row, "link").is_some_and(|l| !l.is_empty());
                mine.push(Client { port: end.1, linked });
            } else if app.as_deref() == Some(admin_app_name) {
                admin_ports.push(end.1);
            }
        }
        let mut figures =
            PoolerFigures { clients: u32::try_from(mine.len()).unwrap_or(u32::MAX), ..Default::default() };
        let n = |r: &PgRow, c: &str| text(r, c).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let count = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(row) = pools
            .iter()
            .find(|r| text(r, "database").as_deref() == Some(database) && text(r, "user").as_deref() == Some(user))
        {
            figures.waiting_clients = count(n(row, "cl_waiting"));
            figures.max_wait = max_wait(n(row, "maxwait"), n(row, "maxwait_us"));
            figures.servers_active = count(n(row, "sv_active"));
            let idle =
                [n(row, "sv_used"), n(row, "sv_tested")].into_iter().fold(n(row, "sv_idle"), u64::saturating_add);
            figures.servers_idle = count(idle);
        }
        // The new marks first, then the old ones go: the port is never unmarked meanwhile.
        let marks = admin_ports.iter().map(|p| OwnPort::new(*p)).collect();
        self.own_ports = marks;
        Ok((figures, mine, admin_ports))
    }

    fn discard(&mut self) {
        self.conn = None;
        self.own_ports.clear();
    }

    pub(crate) async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(self.timeout, conn.close()).await;
        }
        self.own_ports.clear();
    }
}

/// Runs an admin-console `SHOW` (simple protocol: the console speaks nothing else).
async fn show(conn: &mut PgConnection, sql: &'static str) -> Result<Vec<PgRow>, sqlx::Error> {
    crate::sqlx_adapter::fetch_all_simple(conn, sql).await
}

/// A column as text. The console answers in text format, whatever type it announces.
fn text(row: &PgRow, column: &str) -> Option<String> {
    row.try_get_unchecked::<Option<String>, _>(column).ok().flatten()
}

/// A `SHOW CLIENTS` row's client address and port (`None` for a unix-socket client).
fn client_end(row: &PgRow) -> Option<(IpAddr, u16)> {
    let addr: IpAddr = text(row, "addr")?.parse().ok()?;
    Some((addr.to_canonical(), text(row, "port")?.parse().ok()?))
}

/// `SHOW POOLS`' `maxwait` (seconds) plus `maxwait_us`, saturating: the console's numbers
/// are not trusted to be small.
fn max_wait(seconds: u64, micros: u64) -> Duration {
    Duration::from_secs(seconds).saturating_add(Duration::from_micros(micros))
}

/// A PgBouncer duration setting as `SHOW CONFIG` prints it: seconds, possibly fractional.
fn seconds(v: &str) -> Option<Duration> {
    Duration::try_from_secs_f64(v.trim().trim_end_matches('s').parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_durations_parse() {
        assert_eq!(seconds("1"), Some(Duration::from_secs(1)));
        assert_eq!(max_wait(2, 500_000), Duration::from_millis(2500));
        // A console answering u64::MAX seconds used to overflow the addition (a panic).
        assert_eq!(max_wait(u64::MAX, u64::MAX), Duration::MAX);
        assert_eq!(max_wait(u64::MAX, 0), Duration::from_secs(u64::MAX));
        assert_eq!(seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(seconds("x"), None);
    }
}
