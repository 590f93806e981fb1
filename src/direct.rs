//! poolwatch's own dedicated connection, outside the pool: it still works when every pool
//! slot is taken. Connect and statement timeouts bound every use; the server's
//! `idle_session_timeout` is switched off for this session only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::Cause;

/// A lazily (re)connected connection that never takes a pool slot.
pub(crate) struct DirectConnection {
    options: PgConnectOptions,
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

impl DirectConnection {
    /// Derives the options from the pool's: same server and role, its own `application_name`.
    pub(crate) fn new(pool_options: &PgConnectOptions, app_name: &str, timeout: Duration) -> Self {
        let ms = timeout.as_millis().max(1).to_string();
        let options = pool_options.clone().application_name(app_name).options([
            ("statement_timeout", ms.as_str()),
            ("idle_session_timeout", "0"),
            ("idle_in_transaction_session_timeout", "0"),
        ]);
        // poolwatch's own queries stay out of the app's sqlx statement log.
        let options = options.disable_statement_logging();
        DirectConnection {
            options,
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
            let mut conn = tokio::time::timeout(self.timeout, PgConnection::connect_with(&self.options))
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
