//! `&WatchedPool` as a sqlx `Executor`, for both sqlx versions.

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
