//! What one census costs the process while the pool is steady, and that its query reads the
//! same sessions as `pg_stat_activity`. One binary of its own: the first test counts the
//! socket reads of every census in the process.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{CENSUS_SQL, instrument_pool};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use support::{Cluster, eventually, quiet_config};

/// How many netlink dumps and `/proc/self/fd` walks the process's censuses and samples ran.
fn reads() -> (usize, usize) {
    let phases = support::spans::spans_named("poolwatch.census.phase");
    let count = |name: &str| phases.iter().filter(|s| s.fields.get("phase").is_some_and(|p| p == name)).count();
    (count("dump"), count("fd_walk"))
}

/// A steady pool's census looks its sockets up (no dump of the kernel's socket table, no walk
/// of `/proc/self/fd`, however many descriptors the process holds), and still counts exactly;
/// once a session is killed on the server, the census lists in full again and sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_census_dumps_no_socket_table_and_walks_no_descriptors() {
    support::spans::install();
    let cluster = Cluster::start();
    let pool = support::pool(&cluster, 3).await;
    drop(support::hold(&pool, 3).await);
    let watch = instrument_pool(&pool, quiet_config("steady")).unwrap();
    support::startup_heartbeat(&watch).await;
    // Other descriptors of the app: 200 loopback sockets, both ends.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let others: Vec<_> = (0..100)
        .map(|_| (std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap(), listener.accept().unwrap()))
        .collect();
    // The first censuses list in full and settle the client-side ledger.
    eventually(Duration::from_secs(10), "a steady census (no dump)", async || {
        let before = reads();
        let s = watch.census_now().await.ok()?;
        (reads() == before && s.phantom == Some(0)).then_some(())
    })
    .await;
    let before = reads();
    for _ in 0..5 {
        let s = watch.census_now().await.unwrap();
        assert_eq!((s.phantom, s.server.map(|c| c.total())), (Some(0), Some(3)), "still exact");
    }
    assert_eq!(reads(), before, "steady censuses (dumps, fd walks): the sockets are looked up");

    // A session killed on the server; sqlx finds its connection dead at the next acquire and
    // opens another: the pool's size is 3 again, one socket is new. The census must not take
    // the old looked-up list (it would miss the new socket's session).
    let mut admin = support::admin(&cluster).await;
    let killed: i32 = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid)::int FROM pg_stat_activity WHERE application_name = $1 LIMIT 1",
    )
    .bind(watch.application_name())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    eventually(Duration::from_secs(10), "the pool replaces the killed connection", async || {
        let held = support::hold(&pool, 3).await;
        (held.len() == 3 && pool.size() == 3).then_some(())
    })
    .await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(
        (s.server.as_ref().map(|c| c.total()), s.phantom),
        (Some(3), Some(0)),
        "the new socket's session: {s:?}"
    );
    assert!(reads().0 > before.0, "a pool that changed is listed in full");
    drop(others);
}

/// A session as `(client port, state, advisory locks held)`.
type Seen = BTreeSet<(i32, Option<String>, i64)>;

/// One row of `CENSUS_SQL`.
type CensusRow = (Option<String>, Option<i32>, Option<f64>, bool, i64);

async fn census_rows(conn: &mut PgConnection, tag: &str, keys: Option<&[String]>) -> Seen {
    let rows: Vec<CensusRow> = sqlx::query_as(CENSUS_SQL).bind(tag).bind(keys).fetch_all(conn).await.unwrap();
    rows.into_iter().map(|(state, port, _, _, locks)| (port.unwrap(), state, locks)).collect()
}

async fn tagged(cluster: &Cluster, tag: &str) -> (PgConnection, i32) {
    let mut c = PgConnection::connect_with(&cluster.options().application_name(tag)).await.unwrap();
    let port: i32 = sqlx::query_scalar("SELECT inet_client_port()").fetch_one(&mut c).await.unwrap();
    (c, port)
}

/// `CENSUS_SQL` reads, by port, exactly the sessions the whole view shows for those keys:
/// states and advisory locks included, an address that differs or another tag left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_census_query_matches_the_whole_view() {
    let cluster = Cluster::start();
    let tag = "census-sql pw:test";
    let (mut idle, p1) = tagged(&cluster, tag).await;
    let (mut in_tx, p2) = tagged(&cluster, tag).await;
    let (mut locks, p3) = tagged(&cluster, tag).await;
    let (_unlisted, p4) = tagged(&cluster, tag).await;
    let (_other_tag, p5) = tagged(&cluster, "someone else").await;
    in_tx.execute("BEGIN").await.unwrap();
    locks.execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2)").await.unwrap();
    idle.execute("SELECT 1").await.unwrap();
    let mut admin = support::admin(&cluster).await;
    let key = |ip: &str, port: i32| format!("{ip} {port}");

    // No keys: every session with the tag.
    let all = census_rows(&mut admin, tag, None).await;
    let ports: BTreeSet<i32> = all.iter().map(|r| r.0).collect();
    assert_eq!(ports, [p1, p2, p3, p4].into(), "{all:?}");

    // Keys: only those sessions; p4 named with another address, p5 with another tag.
    let keys =
        [key("127.0.0.1", p1), key("127.0.0.1", p2), key("127.0.0.1", p3), key("127.0.0.2", p4), key("127.0.0.1", p5)];
    let some = census_rows(&mut admin, tag, Some(&keys)).await;
    let expected: Seen = [
        (p1, Some("idle".to_owned()), 0),
        (p2, Some("idle in transaction".to_owned()), 0),
        (p3, Some("idle".to_owned()), 2),
    ]
    .into();
    assert_eq!(some, expected);
    // Against the view itself, for the same ports.
    let view: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT client_port, state FROM pg_stat_activity WHERE application_name = $1 AND client_port = ANY($2) ORDER BY 1",
    )
    .bind(tag)
    .bind([p1, p2, p3])
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(view, some.iter().map(|(p, s, _)| (*p, s.clone())).collect::<Vec<_>>());
    // Many keys (a process with many other connections to the server): the same answer.
    let mut many: Vec<String> = (1..2000).map(|i| key("127.0.0.3", i)).collect();
    many.extend(keys.iter().cloned());
    assert_eq!(census_rows(&mut admin, tag, Some(&many)).await, expected);
    assert!(census_rows(&mut admin, tag, Some(&[] as &[String])).await.is_empty(), "no socket, no session");
    in_tx.close().await.unwrap();
}
