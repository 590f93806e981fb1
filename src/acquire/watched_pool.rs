//! [`WatchedPool`]: the pool handle apps use instead of the bare `PgPool`, so every acquire
//! is timed, counted and watched for leaks.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Postgres, Transaction};

use crate::acquire::leak::Origin;
use crate::acquire::probe::{Probe, Ticket};

/// A watched `PgPool`: get it with [`PoolWatch::pool`](crate::watch::PoolWatch::pool). Cheap to
/// clone (one `Arc`). Use it where you used the pool: `acquire()`, `begin()`,
/// `try_acquire()`, and `sqlx::query(..).fetch_one(&pool)` (it is an [`Executor`](sqlx::Executor)).
///
/// Acquires through it record `db_client_connection_wait_time_seconds`,
/// `_pending_requests`, `_timeouts_total`, `_use_time_seconds`, `_create_time_seconds`
/// (with [`instrument_options`](crate::acquire::probe::instrument_options)), the `db.pool.acquire` span, and
/// leak suspects when [`Config::leak_threshold`](crate::config::Config::leak_threshold) is set.
/// Acquires made with the bare pool still show in the sampled `db_client_connection_count`.
///
/// ```no_run
/// # use poolwatch::sqlx;
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let watch = poolwatch::instrument_pool(&pool, poolwatch::Config::new("main"))?;
/// let db = watch.pool();
/// let mut conn = db.acquire().await?;
/// sqlx::query("SELECT 1").execute(&mut *conn).await?;
/// drop(conn); // use time recorded
/// let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&db).await?;
/// # let _ = one; Ok(()) }
/// ```
#[derive(Clone)]
pub struct WatchedPool {
    probe: Arc<Probe>,
}

impl fmt::Debug for WatchedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchedPool").field("pool_name", &self.probe.pool_name).finish_non_exhaustive()
    }
}

impl WatchedPool {
    pub(crate) fn new(probe: Arc<Probe>) -> Self {
        WatchedPool { probe }
    }

    /// The bare pool (its acquires are not timed).
    pub fn inner(&self) -> &PgPool {
        &self.probe.pool
    }

    /// Waits for a connection, like `PgPool::acquire`. The caller's source location is kept
    /// for leak reports.
    #[track_caller]
    pub fn acquire(&self) -> impl Future<Output = Result<WatchedConnection, sqlx::Error>> + Send + 'static {
        self.acquire_from(Origin::Caller(Location::caller()))
    }

    pub(crate) fn acquire_from(
        &self,
        origin: Origin,
    ) -> impl Future<Output = Result<WatchedConnection, sqlx::Error>> + 'static {
        Arc::clone(&self.probe).acquire(origin, |inner, ticket| Watched { inner, ticket })
    }

    /// Takes an idle connection if one is available now, like `PgPool::try_acquire`.
    #[track_caller]
    pub fn try_acquire(&self) -> Option<WatchedConnection> {
        let origin = Origin::Caller(Location::caller());
        let inner = self.probe.pool.try_acquire()?;
        Some(Watched { inner, ticket: Arc::clone(&self.probe).took(origin) })
    }

    /// Acquires a connection and begins a transaction, like `PgPool::begin`. The connection
    /// counts as in use until the transaction is committed, rolled back or dropped.
    #[track_caller]
    pub fn begin(&self) -> impl Future<Output = Result<WatchedTransaction, sqlx::Error>> + Send + 'static {
        let acquire = self.acquire_from(Origin::Caller(Location::caller()));
        async move {
            let Watched { inner, ticket } = acquire.await?;
            let inner = Transaction::begin(inner, None).await?;
            Ok(Watched { inner, ticket })
        }
    }
}

/// A checked-out connection or transaction of a [`WatchedPool`]. It derefs to the
/// `PgConnection` (so `&mut *conn` is an `Executor`, as with sqlx's own guards), and records
/// the use time when dropped.
pub struct Watched<T> {
    inner: T,
    ticket: Ticket,
}

/// A connection checked out of a [`WatchedPool`].
pub type WatchedConnection = Watched<PoolConnection<Postgres>>;
/// A transaction on a connection checked out of a [`WatchedPool`].
pub type WatchedTransaction = Watched<Transaction<'static, Postgres>>;

impl<T> Watched<T> {
    /// How long this connection has been checked out.
    pub fn held(&self) -> Duration {
        self.ticket.held()
    }
}

impl<T: fmt::Debug> fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched").field("inner", &self.inner).field("held", &self.held()).finish()
    }
}

impl<T: Deref<Target = PgConnection>> Deref for Watched<T> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.inner
    }
}

impl<T: DerefMut<Target = PgConnection>> DerefMut for Watched<T> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.inner
    }
}

impl<T: Deref<Target = PgConnection>> AsRef<PgConnection> for Watched<T> {
    fn as_ref(&self) -> &PgConnection {
        &self.inner
    }
}

impl<T: DerefMut<Target = PgConnection>> AsMut<PgConnection> for Watched<T> {
    fn as_mut(&mut self) -> &mut PgConnection {
        &mut self.inner
    }
}

impl WatchedConnection {
    /// The sqlx pool connection inside.
    pub fn pool_connection(&mut self) -> &mut PoolConnection<Postgres> {
        &mut self.inner
    }

    /// Like `PoolConnection::leak`: the connection leaves the pool but its slot stays taken
    /// forever. With a leak threshold set, it is reported as a leak suspect (WARN with both
    /// places) and stays in `poolwatch_leak_suspect_connections`.
    #[track_caller]
    pub fn leak(self) -> PgConnection {
        let Watched { inner, ticket } = self;
        ticket.escape(true);
        inner.leak()
    }

    /// Like `PoolConnection::detach`: the connection leaves the pool and its slot is freed.
    /// With a leak threshold set, it is reported once as a leak suspect (WARN, counter).
    #[track_caller]
    pub fn detach(self) -> PgConnection {
        let Watched { inner, ticket } = self;
        ticket.escape(false);
        inner.detach()
    }

    /// Like `PoolConnection::close`: closes the connection and frees its slot.
    pub async fn close(self) -> Result<(), sqlx::Error> {
        let Watched { inner, ticket } = self;
        let result = inner.close().await;
        drop(ticket);
        result
    }

    /// Like `PoolConnection::close_on_drop`.
    pub fn close_on_drop(&mut self) {
        self.inner.close_on_drop();
    }
}

impl WatchedTransaction {
    /// Commits the transaction and returns the connection to the pool.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        let Watched { inner, ticket } = self;
        let result = inner.commit().await;
        drop(ticket);
        result
    }

    /// Rolls the transaction back and returns the connection to the pool.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        let Watched { inner, ticket } = self;
        let result = inner.rollback().await;
        drop(ticket);
        result
    }
}
