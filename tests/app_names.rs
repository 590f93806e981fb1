//! Every `application_name` PostgreSQL accepts: a non-ASCII name and pool names that share
//! their first 16 characters, on the real server, at the default `Config`.

mod support;

use std::time::Duration;

use poolwatch::sqlx;
use poolwatch::{Config, PoolWatch, instrument_pool};
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;
use support::{Cluster, eventually, logs, recorder};

async fn phantom(watch: &PoolWatch) -> Option<i64> {
    watch.census_now().await.ok().and_then(|s| s.phantom)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_and_colliding_names_read_zero_and_exact_with_a_leak() {
    recorder();
    logs::capture("poolwatch=debug");
    let cluster = Cluster::shared();
    let options = cluster.options().application_name("café-api ☕");
    let open = async || PgPoolOptions::new().max_connections(3).connect_with(options.clone()).await.unwrap();
    let (rw, ro) = (open().await, open().await);
    let wrw = instrument_pool(&rw, Config::new("orders-primary-rw")).unwrap();
    let wro = instrument_pool(&ro, Config::new("orders-primary-ro")).expect("a name cut to 16 bytes is hashed");
    assert_ne!(wrw.application_name(), wro.application_name());
    for w in [&wrw, &wro] {
        let name = w.application_name();
        assert!(name.len() <= 63 && name.bytes().all(|b| (32..=126).contains(&b)), "{name:?}");
        assert!(name.starts_with(r"caf\xc3\xa9-api \xe2\x98\x95 pw:orders-pr~"), "{name:?}");
    }
    let (mut held_rw, held_ro) = (support::hold(&rw, 3).await, support::hold(&ro, 2).await);
    for (w, pool) in [(&wrw, &rw), (&wro, &ro)] {
        // The server stores the name exactly as poolwatch sent it (the pool's first
        // connection, re-tagged, included).
        let n = i64::from(pool.size());
        assert_eq!(support::sessions_named(&cluster, w.application_name()).await, n, "{}", w.application_name());
        assert_eq!(phantom(w).await, Some(0), "{}", w.application_name());
    }
    // One leaked slot on rw: its connection closed, the pool still counts it.
    let raw = held_rw.pop().unwrap().leak();
    raw.close().await.unwrap();
    eventually(Duration::from_secs(30), "rw reads its one leaked slot", async || {
        (phantom(&wrw).await == Some(1)).then_some(())
    })
    .await;
    assert_eq!(phantom(&wro).await, Some(0));
    assert!(logs::lines_with("stores this application_name differently").is_empty());

    // A third pool whose tag would be the same: a clear error naming both pools.
    let same = PgPoolOptions::new().max_connections(1).connect_lazy_with(options.clone());
    let err = instrument_pool(&same, Config::new("orders-primary-rw")).unwrap_err().to_string();
    assert!(err.contains("orders-primary-rw") && err.contains("already used"), "{err}");
    drop((held_rw, held_ro));
    wrw.shutdown().await;
    wro.shutdown().await;
    ro.close().await;
}
