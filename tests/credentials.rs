//! Credentials that change: the app rotates the role's password (IAM tokens, Vault) and hands
//! the pool the new one with `set_connect_options`; poolwatch's own connection follows.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};
use support::password::password_role;
use support::{Cluster, eventually, recorder};

/// scram-sha-256 on the real server, the default `Config`: the password changes, every
/// session of the role is killed, the pool reconnects with the new password, and so must the
/// census (and the direct heartbeat, on the same connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_census_follows_a_rotated_password() {
    recorder();
    let cluster = Cluster::start();
    let url = password_role(&cluster, "rotating", "first-Zx9/kQ2").await;
    let options: PgConnectOptions = url.replace("/kQ2", "%2FkQ2").parse().unwrap();
    let pool = PgPoolOptions::new().max_connections(3).connect_with(options.clone()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("rotating")).unwrap();
    let s = watch.census_now().await.unwrap();
    assert_eq!((s.census_up, s.phantom), (true, Some(0)), "{s:?}");

    // Rotation: the new password on the server and in the pool; the old sessions killed.
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    admin.execute("ALTER ROLE rotating PASSWORD 'second-Pw7+q'").await.unwrap();
    pool.set_connect_options((*pool.connect_options()).clone().password("second-Pw7+q"));
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotating'")
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert!(killed.len() >= 2, "the pool's and poolwatch's sessions: {killed:?}");
    // The old password no longer gets in.
    assert!(PgConnection::connect_with(&options).await.is_err());
    sqlx::raw_sql("SELECT 1").execute(&pool).await.unwrap();

    let s = eventually(Duration::from_secs(30), "the census back up with the new password", async || {
        watch.census_now().await.ok().filter(|s| s.census_up && s.phantom == Some(0))
    })
    .await;
    println!("after rotation: {s:?}");
    let who: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'rotating' AND application_name LIKE 'poolwatch-census:%'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(who, 1, "poolwatch's own connection, as the rotated role");
    watch.shutdown().await;
    pool.close().await;
}
