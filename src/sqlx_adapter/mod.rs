//! The sqlx version seam: the one module that knows whether sqlx 0.9 or 0.8 is in use.
//!
//! The crate root names the chosen crate `sqlx` (`extern crate sqlx09 as sqlx`), so every
//! `use sqlx::..` elsewhere compiles against either; what differs between the two lives here.

use futures_core::future::BoxFuture;
use sqlx::Executor;
use sqlx::postgres::PgRow;

mod executor;

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
