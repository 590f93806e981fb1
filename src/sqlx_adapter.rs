//! The sqlx version seam: the one module that knows whether sqlx 0.9 or 0.8 is in use.
//!
//! The crate root names the chosen crate `sqlx` (`extern crate sqlx09 as sqlx`), so every
//! `use sqlx::..` elsewhere compiles against either; what differs between the two lives here.

use futures_core::Stream;
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, Postgres};

#[cfg(all(feature = "sqlx-0_8", not(feature = "sqlx-0_9")))]
use sqlx_core08::ext::async_stream::TryAsyncStream;
#[cfg(feature = "sqlx-0_9")]
use sqlx_core09::ext::async_stream::TryAsyncStream;

use crate::acquire::leak::Origin;
use crate::acquire::watched_pool::WatchedPool;

#[cfg(all(feature = "sqlx-0_9", feature = "sqlx-0_8"))]
compile_error!(
    "poolwatch: the features `sqlx-0_9` and `sqlx-0_8` are both on; choose one. For sqlx 0.8: \
     `poolwatch = { version = \"..\", default-features = false, features = [\"sqlx-0_8\"] }`. \
     (`cargo --all-features` turns both on: name the features instead.)"
);
#[cfg(not(any(feature = "sqlx-0_9", feature = "sqlx-0_8")))]
compile_error!("poolwatch: no sqlx version chosen; turn on the feature `sqlx-0_9` (the default) or `sqlx-0_8`.");

/// The field of sqlx's `sqlx::pool::acquire` events that holds the wait in seconds: 0.8 spells
/// it `aquired_after_secs`.
#[cfg(feature = "sqlx-0_9")]
pub(crate) const ACQUIRED_AFTER_FIELD: &str = "acquired_after_secs";
#[cfg(not(feature = "sqlx-0_9"))]
pub(crate) const ACQUIRED_AFTER_FIELD: &str = "aquired_after_secs";

async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
}

/// Every query run through `&WatchedPool` is a watched acquire. 0.9 passes statement text as
/// `SqlStr`, 0.8 as `&str` tied to the statement's lifetime: only `prepare_with` and
/// `describe` differ.
impl<'p> Executor<'p> for &'_ WatchedPool {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(TryAsyncStream::new(move |yielder| async move {
            let mut conn = acquire.await?;
            let mut rows = (&mut *conn).fetch_many(query);
            while let Some(row) = next(&mut rows).await {
                yielder.r#yield(row?).await;
            }
            Ok(())
        }))
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(async move { (&mut *acquire.await?).fetch_optional(query).await })
    }

    #[cfg(feature = "sqlx-0_9")]
    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(async move { (&mut *acquire.await?).prepare_with(sql, parameters).await })
    }

    #[cfg(feature = "sqlx-0_9")]
    #[doc(hidden)]
    fn describe<'e>(self, sql: sqlx::SqlStr) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(async move { (&mut *acquire.await?).describe(sql).await })
    }

    #[cfg(not(feature = "sqlx-0_9"))]
    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'p: 'e,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(async move { (&mut *acquire.await?).prepare_with(sql, parameters).await })
    }

    #[cfg(not(feature = "sqlx-0_9"))]
    #[doc(hidden)]
    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        let acquire = self.acquire_from(Origin::Executor);
        Box::pin(async move { (&mut *acquire.await?).describe(sql).await })
    }
}

/// Runs `sql` with the simple protocol and returns every row. Through `Executor::fetch_all`
/// (a boxed `Send` future), not `RawSql::fetch_all`: sqlx 0.8's is an `async fn` over
/// `RawSql<'q>` whose future is `Send` for one lifetime only, so a spawned task awaiting it
/// does not compile.
pub(crate) fn fetch_all_simple<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: &'static str,
) -> BoxFuture<'c, Result<Vec<PgRow>, sqlx::Error>> {
    conn.fetch_all(sqlx::raw_sql(sql))
}

/// Like [`fetch_all_simple`], for exactly one row.
pub(crate) fn fetch_one_simple<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: &'static str,
) -> BoxFuture<'c, Result<PgRow, sqlx::Error>> {
    conn.fetch_one(sqlx::raw_sql(sql))
}

/// Runs SQL text built at run time with the simple protocol and returns every row: 0.9 wants
/// it marked `AssertSqlSafe`, 0.8 borrows it. For the `poolwatch` binary and the tests, which
/// are other crates; not part of the API.
#[doc(hidden)]
pub fn fetch_all_text<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: String,
) -> BoxFuture<'c, Result<Vec<PgRow>, sqlx::Error>> {
    #[cfg(feature = "sqlx-0_9")]
    return conn.fetch_all(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)));
    #[cfg(not(feature = "sqlx-0_9"))]
    return Box::pin(async move { conn.fetch_all(sqlx::raw_sql(&sql)).await });
}
