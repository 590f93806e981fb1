//! Password authentication on the throwaway cluster (which trusts loopback by default): a
//! login role whose password the server checks (scram-sha-256) on 127.0.0.1.

#![allow(dead_code)]

use poolwatch::sqlx;
use sqlx::{Connection, Executor, PgConnection};

use super::Cluster;

/// Creates `role` with `password`, makes the server demand it on 127.0.0.1 (a first
/// `pg_hba.conf` line, reloaded), and returns the role's URL with the password in it.
/// Panics if a connection without the password still gets in.
pub async fn password_role(cluster: &Cluster, role: &str, password: &str) -> String {
    let mut admin = PgConnection::connect_with(&cluster.options()).await.expect("admin connection");
    let create = format!("CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE pg_read_all_stats");
    // Dynamic SQL the same way on sqlx 0.8 and 0.9 (0.9 alone has `AssertSqlSafe`).
    sqlx::QueryBuilder::<sqlx::Postgres>::new(create)
        .build()
        .execute(&mut admin)
        .await
        .expect("create the password role");
    let hba: String = sqlx::query_scalar("SHOW hba_file").fetch_one(&mut admin).await.expect("hba_file");
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}")).expect("write pg_hba.conf");
    admin.execute("SELECT pg_reload_conf()").await.expect("reload pg_hba.conf");
    admin.close().await.ok();
    let without = cluster.options().username(role);
    let mut refused = false;
    for _ in 0..250 {
        if PgConnection::connect_with(&without).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "the server still lets {role} in without a password");
    format!("postgres://{role}:{password}@127.0.0.1:{}/postgres", cluster.port())
}
