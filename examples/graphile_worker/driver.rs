// graphile_worker's own sqlx driver with one change: its LISTEN connection is a poolwatch
// `WatchedListener`, so a lost LISTEN session is counted, timed and re-established where
// poolwatch sees it (graphile's driver uses sqlx's `PgListener`, which reconnects silently).
// Every query still goes through graphile's driver on the bare pool. Copy this file.
// (Plain comments: the README's doctest `include!`s it.)

use std::any::Any;

use futures_util::StreamExt;
use graphile_worker::sqlx::SqlxDatabase;
use graphile_worker::{
    BoxFuture, Database, DatabaseDriver, DbError, DbExecutor, DbParams, DbRow, DbTransaction, Notification,
    NotificationStream,
};
use poolwatch::sqlx;
use poolwatch::{ListenerConfig, WatchedListener};

/// `WorkerOptions::default().database(WatchedDriver::new(pool, listener_config))`.
#[derive(Debug)]
pub struct WatchedDriver {
    inner: SqlxDatabase,
    listener: ListenerConfig,
}

impl WatchedDriver {
    /// The `application_name` of the LISTEN session (not the pool's tag: the census counts
    /// only the pool's sessions, and this one is not the pool's).
    pub const APPLICATION_NAME: &'static str = "graphile_worker LISTEN";

    /// `listener` names the `poolwatch_listener_*` series (pool name, listener name).
    pub fn new(pool: sqlx::PgPool, listener: ListenerConfig) -> Self {
        WatchedDriver { inner: SqlxDatabase::new(pool), listener }
    }
}

/// For `WorkerOptions::database`.
impl From<WatchedDriver> for Database {
    fn from(driver: WatchedDriver) -> Self {
        Database::new(driver)
    }
}

impl DbExecutor for WatchedDriver {
    fn execute<'a>(&'a self, sql: &'a str, params: DbParams) -> BoxFuture<'a, Result<u64, DbError>> {
        self.inner.execute(sql, params)
    }

    fn fetch_all<'a>(&'a self, sql: &'a str, params: DbParams) -> BoxFuture<'a, Result<Vec<DbRow>, DbError>> {
        self.inner.fetch_all(sql, params)
    }
}

impl DatabaseDriver for WatchedDriver {
    /// graphile's own driver, so `Worker::pg_pool()` and `WorkerContext::pg_pool()` still work.
    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }

    fn begin<'a>(&'a self) -> BoxFuture<'a, Result<DbTransaction, DbError>> {
        self.inner.begin()
    }

    /// graphile's driver holds a pool connection for LISTEN as long as the worker runs; this
    /// one opens its own (like `PgListener::connect`), so LISTEN never takes a slot from the jobs.
    fn listen<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<NotificationStream>, DbError>> {
        Box::pin(async move {
            let options = (*self.inner.pool().connect_options()).clone().application_name(Self::APPLICATION_NAME);
            let mut listener = WatchedListener::connect(options, self.listener.clone()).await?;
            listener.listen(channel).await?;
            let stream = listener.into_stream().map(|n| {
                n.map(|n| Notification { channel: n.channel().to_owned(), payload: n.payload().to_owned() })
                    .map_err(DbError::from)
            });
            Ok(Some(Box::pin(stream) as NotificationStream))
        })
    }
}
