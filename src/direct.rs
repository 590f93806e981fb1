//! poolwatch's own dedicated connection, outside the pool: it still works when every pool
//! slot is taken. Connect and statement timeouts bound every use; the server's
//! `idle_session_timeout` is switched off for this session only (after connecting, and only
//! on a server that has it: PostgreSQL 14+; an older one rejects it in the startup packet).
//!
//! Its options are derived at every connect from the pool's current ones (or the declared
//! `direct_connect_options`): credentials the app rotates with `Pool::set_connect_options`
//! reach it at its next connect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::cause::Cause;

/// Where the dedicated connection's options come from.
#[derive(Clone)]
pub(crate) enum Source {
    /// The pool's current connect options, read at every connect.
    Pool(PgPool),
    /// Declared options (`Config::direct_connect_options`).
    Declared(Box<PgConnectOptions>),
}

impl Source {
    fn base(&self) -> PgConnectOptions {
        match self {
            Source::Pool(pool) => (*pool.connect_options()).clone(),
            Source::Declared(options) => (**options).clone(),
        }
    }
}

/// A lazily (re)connected connection that never takes a pool slot.
pub(crate) struct DirectConnection {
    source: Source,
    /// The options of the last connect (for `Debug`).
    options: PgConnectOptions,
    app_name: String,
    timeout: Duration,
    conn: Option<PgConnection>,
    /// The local TCP port of the live connection (to leave it out of the socket census).
    pub(crate) local_port: Option<u16>,
    /// How many times it has connected (a change means it reconnected).
    pub(crate) connects: u64,
    /// `local_port` for readers that must not wait for this connection's lock (0: none).
    pub(crate) port_cell: Arc<AtomicU32>,
    /// The pool's tag, to read back once how the server stores it (after the first connect).
    pub(crate) verify_tag: Option<String>,
}

/// Written by hand: `PgConnectOptions`'s own `Debug` prints the password.
impl std::fmt::Debug for DirectConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectConnection")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("username", &self.options.get_username())
            .field("timeout", &self.timeout)
            .field("connected", &self.conn.is_some())
            .field("local_port", &self.local_port)
            .finish()
    }
}

/// The options of poolwatch's own connection from `base`: same server and role, its own
/// `application_name`, a statement timeout, and only settings every supported server has.
pub(crate) fn derive(base: PgConnectOptions, app_name: &str, timeout: Duration) -> PgConnectOptions {
    let ms = timeout.as_millis().max(1).to_string();
    base.application_name(app_name)
        .options([("statement_timeout", ms.as_str()), ("idle_in_transaction_session_timeout", "0")])
        // poolwatch's own queries stay out of the app's sqlx statement log.
        .disable_statement_logging()
}

impl DirectConnection {
    /// Options from `source` at every connect, with `app_name` as its own `application_name`.
    pub(crate) fn new(source: Source, app_name: &str, timeout: Duration) -> Self {
        DirectConnection {
            options: derive(source.base(), app_name, timeout),
            source,
            app_name: app_name.to_owned(),
            timeout,
            conn: None,
            local_port: None,
            connects: 0,
            port_cell: Arc::default(),
            verify_tag: None,
        }
    }

    /// The connection, connecting first if there is none.
    pub(crate) async fn get(&mut self) -> Result<&mut PgConnection, Cause> {
        if self.conn.is_none() {
            self.options = derive(self.source.base(), &self.app_name, self.timeout);
            let mut conn = tokio::time::timeout(self.timeout, PgConnection::connect_with(&self.options))
                .await
                .map_err(|_| Cause::TimedOut)?
                .map_err(|e| Cause::of(&e))?;
            tokio::time::timeout(self.timeout, session_settings(&mut conn))
                .await
                .map_err(|_| Cause::TimedOut)?
                .map_err(|e| Cause::of(&e))?;
            let port: Option<i32> = tokio::time::timeout(
                self.timeout,
                sqlx::query_scalar("SELECT inet_client_port()").fetch_one(&mut conn),
            )
            .await
            .map_err(|_| Cause::TimedOut)?
            .map_err(|e| Cause::of(&e))?;
            if let Some(tag) = self.verify_tag.take() {
                let own = self.options.get_application_name().unwrap_or_default().to_owned();
                let verify = crate::ledger::attribution::verify_stored(&mut conn, &own, &tag);
                let _ = tokio::time::timeout(self.timeout, verify).await;
            }
            self.local_port = port.and_then(|p| u16::try_from(p).ok());
            self.port_cell.store(self.local_port.map_or(0, u32::from), Ordering::Relaxed);
            self.conn = Some(conn);
            self.connects += 1;
        }
        self.conn.as_mut().ok_or(Cause::Other)
    }

    /// Runs `f` on the connection with the timeout; on any failure the connection is dropped
    /// so the next call reconnects.
    pub(crate) async fn run<T, F>(&mut self, f: F) -> Result<T, Cause>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    {
        let timeout = self.timeout;
        let conn = self.get().await?;
        let result = match tokio::time::timeout(timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Cause::of(&e)),
            Err(_) => Err(Cause::TimedOut),
        };
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Drops the connection without a goodbye (after a cancelled use); the next call reconnects.
    pub(crate) fn discard(&mut self) {
        self.conn = None;
        self.local_port = None;
        self.port_cell.store(0, Ordering::Relaxed);
    }

    /// Closes the connection politely (bounded by the timeout).
    pub(crate) async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(self.timeout, conn.close()).await;
        }
        self.local_port = None;
        self.port_cell.store(0, Ordering::Relaxed);
    }
}

/// Switches the server's `idle_session_timeout` off for this session, where the server has it.
/// A server that does not report its version gets the `SET` too, and may refuse it.
async fn session_settings(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let version = crate::server_version::of(conn);
    if !crate::server_version::has_idle_session_timeout(version) {
        return Ok(());
    }
    let set = crate::sqlx_adapter::fetch_all_simple(conn, "SET idle_session_timeout = 0").await;
    match (set, version) {
        (Ok(_), _) => Ok(()),
        (Err(e), Some(_)) => Err(e),
        (Err(e), None) => {
            tracing::debug!(error = %e, "the server has no idle_session_timeout");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_startup_packet_carries_only_settings_every_supported_server_has() {
        let options = derive(PgConnectOptions::new_without_pgpass(), "poolwatch-census:main", Duration::from_secs(5));
        let startup = options.get_options().unwrap_or_default();
        assert!(startup.contains("statement_timeout=5000"), "{startup}");
        // idle_session_timeout exists from PostgreSQL 14 on: set after connecting, where it exists.
        assert!(!startup.contains("idle_session_timeout"), "{startup}");
        assert_eq!(options.get_application_name(), Some("poolwatch-census:main"));
    }
}
