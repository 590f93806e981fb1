//! A real PgBouncer in front of a [`Cluster`](super::Cluster): an ini + userlist written
//! into a temp dir, listening on a free loopback port, `pool_mode = transaction` by default, the
//! admin console open to `postgres`.
//! As root it runs as the `postgres` user (pgbouncer refuses root) via `setpriv`, which
//! execs, so the child *is* pgbouncer and [`Drop`] stops it for sure.

#![allow(dead_code)]

use super::cluster::{free_port, is_root, temp_dir};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use poolwatch::sqlx;
use sqlx::postgres::PgConnectOptions;

/// The pgbouncer binary (Debian package `pgbouncer`).
pub const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A running PgBouncer; stopped and its temp dir removed on drop.
#[derive(Debug)]
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl PgBouncer {
    /// PgBouncer in transaction mode in front of the server on `server_port` (database
    /// `postgres`, trust auth), with extra `[pgbouncer]` settings, e.g. `("server_idle_timeout", "5")`.
    pub fn start(server_port: u16, settings: &[(&str, &str)]) -> PgBouncer {
        assert!(
            std::path::Path::new(PGBOUNCER).is_file(),
            "{PGBOUNCER} not found: `apt-get install pgbouncer` (scripts/prereqs does)"
        );
        let dir = temp_dir("pgbouncer");
        let port = free_port();
        let auth = dir.join("userlist.txt").display().to_string();
        let log = dir.join("pgbouncer.log").display().to_string();
        let listen_port = port.to_string();
        // Defaults; a setting given by the caller replaces the default of the same name.
        let mut all: Vec<(&str, &str)> = vec![
            ("listen_addr", "127.0.0.1"),
            ("listen_port", &listen_port),
            ("unix_socket_dir", ""),
            ("auth_type", "trust"),
            ("auth_file", &auth),
            ("pool_mode", "transaction"),
            ("ignore_startup_parameters", "extra_float_digits"),
            ("max_client_conn", "200"),
            ("default_pool_size", "10"),
            ("logfile", &log),
            // The admin console (database `pgbouncer`) for the `postgres` user.
            ("admin_users", "postgres"),
            ("stats_users", "postgres"),
        ];
        for (k, v) in settings {
            match all.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v,
                None => all.push((k, v)),
            }
        }
        let mut ini =
            format!("[databases]\npostgres = host=127.0.0.1 port={server_port} dbname=postgres\n\n[pgbouncer]\n");
        for (k, v) in &all {
            ini.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("write userlist.txt");
        let root = is_root();
        if root {
            let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to postgres failed", dir.display());
        }
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", PGBOUNCER]);
            c
        } else {
            Command::new(PGBOUNCER)
        };
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run pgbouncer: {e}"));
        let mut bouncer = PgBouncer { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                panic!("pgbouncer exited ({status}):\n{}", bouncer.log());
            }
            assert!(Instant::now() < deadline, "pgbouncer did not listen on {port}:\n{}", bouncer.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// Connect options for the `postgres` user through this PgBouncer.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
    }

    /// Connect options for PgBouncer's admin console (database `pgbouncer`; `postgres` is in
    /// `admin_users` and `stats_users`).
    pub fn admin_options(&self) -> PgConnectOptions {
        self.options().database("pgbouncer")
    }

    /// The admin console's URL, as a user passes it to `Config::pooler_admin`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port)
    }

    /// `config` as the README declares a pool behind this PgBouncer: poolwatch's own
    /// connection straight to the server (`cluster`), the admin console declared.
    pub fn declared(&self, config: poolwatch::Config, cluster: &super::cluster::Cluster) -> poolwatch::Config {
        config.direct_connect_options(cluster.options()).pooler_admin(self.admin_url())
    }

    /// The port PgBouncer listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
