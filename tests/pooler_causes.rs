//! PgBouncer's kills, each triggered through a real PgBouncer 1.x, get their named cause: in
//! the app's error (`Cause::of`), and where poolwatch's pool-path heartbeat meets them, in
//! `poolwatch_heartbeat_failures_total{cause}` and the `poolwatch.heartbeat` span's `error.type`.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Cause, Config, PoolWatch, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};
use support::pgbouncer::PgBouncer;
use support::proxy::{Cut, Proxy};
use support::spans::spans_named;
use support::{Cluster, POOL, eventually, metric, recorder};

/// A watch whose only pool use is the pool-path heartbeat, every `every`; the dedicated
/// connection goes straight to the server.
fn watch(pool: &sqlx::PgPool, name: &str, cluster: &Cluster, every: Duration) -> PoolWatch {
    let config = Config::new(name)
        .heartbeat_interval(every)
        .heartbeat_timeout(Duration::from_secs(5))
        .census_interval(Duration::from_secs(3600))
        .direct_connect_options(cluster.options());
    instrument_pool(pool, config).unwrap()
}

/// The pool-path heartbeat failed with `cause`: counted under that cause and a WARN span says so.
async fn heartbeat_named(name: &str, cause: Cause) {
    eventually(Duration::from_secs(30), &format!("a pool heartbeat failure counted as {cause}"), async || {
        let n =
            metric("poolwatch_heartbeat_failures_total", &[(POOL, name), ("path", "pool"), ("cause", cause.as_str())]);
        n.filter(|n| *n >= 1.0)
    })
    .await;
    let named = spans_named("poolwatch.heartbeat").into_iter().any(|s| {
        s.fields.get("db.client.connection.pool.name").map(String::as_str) == Some(name)
            && s.fields.get("error.type").map(String::as_str) == Some(cause.as_str())
            && s.level == tracing::Level::WARN
    });
    assert!(named, "a WARN poolwatch.heartbeat span with error.type={cause} for {name}");
    let others = metric("poolwatch_heartbeat_failures_total", &[(POOL, name), ("path", "pool"), ("cause", "other")]);
    assert!(others.is_none_or(|n| n == 0.0), "{name}: no pooler kill is classified `other`");
}

async fn wait_log(bouncer: &PgBouncer, text: &str) {
    eventually(Duration::from_secs(30), &format!("pgbouncer logs {text:?}"), async || {
        bouncer.log().contains(text).then_some(())
    })
    .await;
}

/// `client_idle_timeout`: the pooler ends a client connection idle in the pool (or held idle
/// by the app). Named `pooler_idle_timeout`. Transaction mode only: PgBouncer never applies it
/// to a client linked to a server, which a session-mode client is after its first query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_is_pooler_idle_timeout() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("client_idle_timeout", "1")]);

    // The app holds a connection idle past the pooler's limit, then uses it.
    let mut held = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    held.execute("SELECT 1").await.unwrap();
    wait_log(&bouncer, "client_idle_timeout").await;
    let err = held.execute("SELECT 1").await.expect_err("the pooler closed it");
    assert_eq!(Cause::of(&err), Cause::PoolerIdleTimeout, "{err}");

    // The pool heartbeat meets an idle pool connection the pooler closed (no ping on acquire).
    let pool = PgPoolOptions::new().max_connections(1).test_before_acquire(false).connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_idle", &cluster, Duration::from_secs(2));
    heartbeat_named("pgb_idle", Cause::PoolerIdleTimeout).await;
    w.shutdown().await;
}

/// In session mode the server's own kill of an idle session reaches the client through the
/// pooler: PgBouncer forwards the server's FATAL 57P05 before its own `server conn crashed?`,
/// so the cause stays `idle_session_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_forwards_the_servers_idle_session_timeout() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("pool_mode", "session")]);
    let mut held = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    held.execute("SET idle_session_timeout = '1s'").await.unwrap();
    wait_log(&bouncer, "server conn crashed?").await;
    let err = held.execute("SELECT 1").await.expect_err("the server ended the idle session");
    assert_eq!(Cause::of(&err), Cause::IdleSessionTimeout, "{err}");

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .after_connect(|c, _| Box::pin(async move { c.execute("SET idle_session_timeout = '1s'").await.map(|_| ()) }))
        .connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_session_idle", &cluster, Duration::from_secs(2));
    heartbeat_named("pgb_session_idle", Cause::IdleSessionTimeout).await;
    w.shutdown().await;
}

/// `query_wait_timeout`: the pooler's own server pool is exhausted and a query waited too
/// long for a server connection. Named `pooler_wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_is_pooler_wait_timeout() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("default_pool_size", "1"), ("query_wait_timeout", "1")]);
    // Another client holds PgBouncer's only server connection in a transaction.
    let mut holder = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    holder.execute("BEGIN; SELECT 1").await.unwrap();

    let mut app = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    let err = app.execute("SELECT 1").await.expect_err("no server connection for it");
    assert_eq!(Cause::of(&err), Cause::PoolerWaitTimeout, "{err}");

    let pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_wait", &cluster, Duration::from_millis(500));
    heartbeat_named("pgb_wait", Cause::PoolerWaitTimeout).await;
    w.shutdown().await;
    holder.execute("COMMIT").await.unwrap();
}

/// `max_client_conn`: the pooler refuses a new client. Named `too_many_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_is_too_many_connections() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("max_client_conn", "2")]);
    // Fill PgBouncer's client slots until it refuses one.
    let mut held = Vec::new();
    let err = loop {
        match PgConnection::connect_with(&bouncer.options()).await {
            Ok(c) if held.len() < 5 => held.push(c),
            Ok(_) => panic!("pgbouncer took 6 clients with max_client_conn = 2"),
            Err(e) => break e,
        }
    };
    assert_eq!(Cause::of(&err), Cause::TooManyConnections, "{err}");

    let pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_maxconn", &cluster, Duration::from_millis(300));
    heartbeat_named("pgb_maxconn", Cause::TooManyConnections).await;
    w.shutdown().await;
}

/// The pooler's `idle_transaction_timeout` and `query_timeout`, and an admin's `KILL` on the
/// console: `idle_in_transaction_timeout`, `timed_out`, `admin_shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooler_timeouts_and_kill_get_server_like_causes() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();

    let bouncer = PgBouncer::start(cluster.port(), &[("idle_transaction_timeout", "1")]);
    let mut app = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    app.execute("BEGIN; SELECT 1").await.unwrap();
    wait_log(&bouncer, "idle transaction timeout").await;
    let err = app.execute("SELECT 1").await.expect_err("the pooler ended the transaction");
    assert_eq!(Cause::of(&err), Cause::IdleInTransactionTimeout, "{err}");
    drop(bouncer);

    let bouncer = PgBouncer::start(cluster.port(), &[("query_timeout", "1")]);
    let mut app = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    let err = app.execute("SELECT pg_sleep(30)").await.expect_err("the pooler's query_timeout");
    assert_eq!(Cause::of(&err), Cause::TimedOut, "{err}");
    drop(bouncer);

    // KILL on the admin console ends every client of the database: the idle pool connection
    // the heartbeat takes next.
    let bouncer = PgBouncer::start(cluster.port(), &[]);
    let pool = PgPoolOptions::new().max_connections(1).test_before_acquire(false).connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_kill", &cluster, Duration::from_millis(500));
    eventually(Duration::from_secs(20), "a pool heartbeat through pgbouncer", async || {
        (w.heartbeat().pool.successes >= 1).then_some(())
    })
    .await;
    let mut app = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    app.execute("SELECT 1").await.unwrap();
    let mut admin = PgConnection::connect_with(&bouncer.admin_options()).await.unwrap();
    admin.execute(sqlx::raw_sql("KILL postgres")).await.unwrap();
    let err = app.execute("SELECT 1").await.expect_err("killed on the console");
    assert_eq!(Cause::of(&err), Cause::AdminShutdown, "{err}");
    heartbeat_named("pgb_kill", Cause::AdminShutdown).await;
    admin.execute(sqlx::raw_sql("RESUME postgres")).await.unwrap();
    w.shutdown().await;
}

/// The server behind the pooler goes away: mid-query (`server conn crashed?`,
/// `connection_ended`), or before the pooler could log in (`cannot_connect_now`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gone_behind_the_pooler() {
    recorder();
    support::spans::install();
    let cluster = Cluster::start();
    // A loopback proxy between PgBouncer and the server, cut during a query.
    let proxy = Proxy::start(cluster.port()).await;
    let bouncer = PgBouncer::start(proxy.port(), &[]);
    let mut app = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    let query = tokio::spawn(async move { app.execute("SELECT pg_sleep(30)").await.map(|_| ()) });
    eventually(Duration::from_secs(20), "the query reached the server", async || {
        let mut c = PgConnection::connect_with(&cluster.options()).await.ok()?;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'")
                .fetch_one(&mut c)
                .await
                .ok()?;
        (n >= 1).then_some(())
    })
    .await;
    proxy.cut_all(Cut::Reset);
    let err = query.await.unwrap().expect_err("the server connection died under the query");
    assert_eq!(Cause::of(&err), Cause::ConnectionEnded, "{err}");
    drop(bouncer);

    // Nothing listens behind the pooler: PgBouncer cannot log in to the server.
    let dead = support::cluster::free_port();
    let bouncer = PgBouncer::start(dead, &[("client_login_timeout", "1")]);
    let err = PgConnection::connect_with(&bouncer.options()).await.expect_err("no server behind the pooler");
    assert_eq!(Cause::of(&err), Cause::CannotConnectNow, "{err}");
    let pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(bouncer.options());
    let w = watch(&pool, "pgb_down", &cluster, Duration::from_millis(300));
    heartbeat_named("pgb_down", Cause::CannotConnectNow).await;
    w.shutdown().await;
}
