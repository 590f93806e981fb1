//! PostgreSQL before 14 (only 15 runs here): every version gate of this test process is forced
//! to 13 (`pretend_server_version`), so poolwatch takes the paths it takes on an older server.
//! Its own connection must start without `idle_session_timeout` (a setting 12 and 13 reject,
//! FATAL, in the startup packet), and the census and the direct heartbeat must come up.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use support::{Cluster, eventually, recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_and_direct_heartbeat_start_on_the_pre_14_path() {
    recorder();
    poolwatch::pretend_server_version(Some(130_000));
    let cluster = Cluster::start();
    let pool = PgPoolOptions::new().max_connections(3).connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("pg13")).unwrap();
    let held = pool.acquire().await.unwrap();
    let s = watch.census_now().await.unwrap();
    assert_eq!((s.census_up, s.phantom), (true, Some(0)), "{s:?}");
    eventually(Duration::from_secs(30), "the direct heartbeat up", async || {
        watch.heartbeat().direct.up.filter(|up| *up)
    })
    .await;
    // The pre-14 path leaves the server's idle_session_timeout alone on poolwatch's session
    // (on 15 it is the server's default, 0): it was neither sent nor SET.
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let own: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poolwatch-census:pg13'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(own, 1);
    drop(held);
    watch.shutdown().await;
    pool.close().await;
}
