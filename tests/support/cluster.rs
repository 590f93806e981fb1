//! A throwaway PostgreSQL cluster: `initdb` + `pg_ctl` into a temp dir, listening on a free
//! loopback port. Stopped and removed on drop, also when a test panics. As root, the server
//! binaries run as the `postgres` user (they refuse to run as root). With `DATABASE_URL` set,
//! [`Cluster::start`] uses that server instead (settings need superuser; no restart).
//! [`Cluster::start_tls`] makes one that accepts TLS connections only, with a certificate
//! signed by a CA the test made (the `openssl` command).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use poolwatch::sqlx;
use sqlx::postgres::PgConnectOptions;

/// A running PostgreSQL server for one test (or the demo).
#[derive(Debug)]
pub struct Cluster {
    dir: Option<PathBuf>,
    bin: PathBuf,
    port: u16,
    external: Option<PgConnectOptions>,
    /// On the binary's shared server ([`Cluster::shared`]): this test's own database.
    database: Option<String>,
    /// The shared server's directory (its log), never removed by this handle.
    shared_dir: Option<PathBuf>,
    /// With [`Cluster::start_tls`]: the directory of the CA and server certificates.
    tls: Option<PathBuf>,
}

impl Cluster {
    /// For the examples: the server of `DATABASE_URL`, or else a throwaway cluster, said on
    /// stdout. Keep it alive as long as the pool (dropping it removes a throwaway cluster).
    pub fn for_example() -> Cluster {
        if std::env::var_os("DATABASE_URL").is_none() {
            println!("DATABASE_URL is unset: starting a throwaway PostgreSQL cluster ...");
        }
        Cluster::start()
    }

    /// A fresh cluster with default settings.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// A fresh cluster with extra `postgresql.conf` settings, e.g. `("idle_session_timeout", "1s")`.
    pub fn start_with(settings: &[(&str, &str)]) -> Cluster {
        Cluster::start_as(settings, false)
    }

    /// A fresh cluster that accepts TLS connections only (`ssl = on`; `pg_hba.conf` has
    /// `hostssl` lines and rejects the rest), its certificate for `localhost` and 127.0.0.1
    /// signed by [`Cluster::ca_cert`]. Always a throwaway cluster (never `DATABASE_URL`).
    pub fn start_tls() -> Cluster {
        Cluster::start_as(&[], true)
    }

    /// The CA that signed a [`Cluster::start_tls`] server's certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.tls.as_ref().expect("a TLS cluster (Cluster::start_tls)").join("ca.crt")
    }

    /// A CA that signed nothing of this server (PEM): verifying against it must fail.
    pub fn wrong_ca_cert(&self) -> PathBuf {
        self.tls.as_ref().expect("a TLS cluster (Cluster::start_tls)").join("wrong-ca.crt")
    }

    fn start_as(settings: &[(&str, &str)], tls: bool) -> Cluster {
        if !tls && let Ok(url) = std::env::var("DATABASE_URL") {
            let options: PgConnectOptions = url.parse().expect("DATABASE_URL is not a postgres:// URL");
            let cluster = Cluster {
                dir: None,
                bin: PathBuf::new(),
                port: options.get_port(),
                external: Some(options),
                database: None,
                shared_dir: None,
                tls: None,
            };
            cluster.apply_external(settings);
            return cluster;
        }
        let bin = server_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, pg_ctl) not found in PATH or /usr/lib/postgresql/*/bin. \
                 Install them: `apt-get install postgresql` (Debian/Ubuntu), or set DATABASE_URL to a server."
            )
        });
        let dir = temp_dir("pg");
        let mut cluster = Cluster {
            dir: Some(dir.clone()),
            bin,
            port: free_port(),
            external: None,
            database: None,
            shared_dir: None,
            tls: tls.then(|| make_certificates(&dir)),
        };
        if is_root() {
            let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to postgres failed", dir.display());
        }
        let data = dir.join("data");
        cluster.run("initdb", &["-D", s(&data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 16MB\n\
             log_min_messages = warning\n",
            cluster.port,
            dir.display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        if let Some(tls) = &cluster.tls {
            conf.push_str(&tls_only(tls, &data));
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        // `free_port` lets the port go before the server binds it: another process (test
        // binaries run side by side) can take it meanwhile. Then take another one.
        for _ in 0..5 {
            match cluster.try_run("pg_ctl", &cluster.start_args()) {
                Ok(()) => return cluster,
                Err(_) if cluster.log().contains("Address already in use") => {
                    cluster.port = free_port();
                    let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
                    text.push_str(&format!("port = {}\n", cluster.port));
                    std::fs::write(&conf_path, text).expect("write postgresql.conf");
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free loopback port for the server after 5 tries:\n{}", cluster.log());
    }

    /// One server for the whole test binary, started on first use; each call gets a fresh
    /// database on it, so the test's sessions, objects and per-database counters
    /// (`pg_stat_database`) are its own, and tests stay independent of each other. Saves an
    /// `initdb` + start per test. A test that stops the server, changes server settings, creates
    /// roles others use, or counts server-wide figures takes its own [`Cluster::start`].
    /// The shared server is stopped and removed when the test process exits.
    pub fn shared() -> Cluster {
        if std::env::var("DATABASE_URL").is_ok() {
            return Cluster::start();
        }
        static SERVER: OnceLock<Cluster> = OnceLock::new();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let server = SERVER.get_or_init(|| {
            let mut server = Cluster::start();
            let dir = server.dir.take().expect("a throwaway cluster");
            reap_on_exit(&server.bin, &dir);
            server.shared_dir = Some(dir);
            server
        });
        let database = format!("t{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let out = Command::new("psql")
            .arg(server.url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE {database}")])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "CREATE DATABASE {database}: {}", String::from_utf8_lossy(&out.stderr));
        Cluster {
            dir: None,
            bin: server.bin.clone(),
            port: server.port,
            external: None,
            database: Some(database),
            shared_dir: server.shared_dir.clone(),
            tls: None,
        }
    }

    /// Connect options for the `postgres` superuser on this server (and this test's database
    /// on the shared server).
    pub fn options(&self) -> PgConnectOptions {
        match &self.external {
            Some(o) => o.clone(),
            None => PgConnectOptions::new_without_pgpass()
                .host("127.0.0.1")
                .port(self.port)
                .username("postgres")
                .database(self.database.as_deref().unwrap_or("postgres")),
        }
    }

    /// The server's URL (no password: the throwaway cluster trusts loopback).
    pub fn url(&self) -> String {
        match &self.external {
            Some(_) => std::env::var("DATABASE_URL").unwrap_or_default(),
            None => format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                self.port,
                self.database.as_deref().unwrap_or("postgres")
            ),
        }
    }

    /// The directory of the server's unix socket (a throwaway cluster's own directory).
    pub fn socket_dir(&self) -> Option<&Path> {
        self.dir.as_deref().or(self.shared_dir.as_deref())
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: sessions are terminated).
    pub fn stop(&self) {
        assert!(self.external.is_none(), "stopping the server needs the throwaway cluster: unset DATABASE_URL");
        assert!(self.shared_dir.is_none(), "the shared server cannot be stopped: use Cluster::start()");
        let data = self.data_dir();
        // Generous waits: on a loaded machine (CI, scripts/flake-check) 60 s is not always enough.
        self.run("pg_ctl", &["-D", s(&data), "-m", "fast", "-w", "-t", "300", "stop"]);
    }

    /// Starts the server again after [`Cluster::stop`], on the same port.
    pub fn start_server(&self) {
        assert!(self.external.is_none(), "starting the server needs the throwaway cluster: unset DATABASE_URL");
        assert!(self.shared_dir.is_none(), "the shared server cannot be restarted: use Cluster::start()");
        self.run("pg_ctl", &self.start_args());
    }

    fn start_args(&self) -> Vec<String> {
        let data = self.data_dir();
        let log = self.dir.as_ref().expect("dir").join("server.log");
        ["-D", s(&data), "-l", s(&log), "-w", "-t", "300", "start"].map(String::from).to_vec()
    }

    /// The server log so far (for failing tests' messages).
    pub fn log(&self) -> String {
        let dir = self.dir.as_ref().or(self.shared_dir.as_ref());
        dir.and_then(|d| std::fs::read_to_string(d.join("server.log")).ok()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.as_ref().expect("throwaway cluster").join("data")
    }

    fn run<A: AsRef<std::ffi::OsStr>>(&self, tool: &str, args: &[A]) {
        if let Err(e) = self.try_run(tool, args) {
            panic!("{e}");
        }
    }

    fn try_run<A: AsRef<std::ffi::OsStr>>(&self, tool: &str, args: &[A]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).current_dir(std::env::temp_dir()).output().map_err(|e| format!("run {tool}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        Err(format!("{tool} {args:?} failed: {}\n{}\n{}", out.status, String::from_utf8_lossy(&out.stderr), self.log()))
    }

    fn apply_external(&self, settings: &[(&str, &str)]) {
        if settings.is_empty() {
            return;
        }
        let mut sql = String::new();
        for (k, v) in settings {
            sql.push_str(&format!("ALTER SYSTEM SET {k} = '{v}'; "));
        }
        sql.push_str("SELECT pg_reload_conf();");
        let status = Command::new("psql").arg(self.url()).args(["-v", "ON_ERROR_STOP=1", "-c", &sql]).status();
        assert!(status.is_ok_and(|s| s.success()), "applying {settings:?} to DATABASE_URL failed (needs superuser)");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let data = dir.join("data");
            let mut cmd = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(self.bin.join("pg_ctl"));
                c
            } else {
                Command::new(self.bin.join("pg_ctl"))
            };
            let _ = cmd.args(["-D", s(&data), "-m", "immediate", "-w", "stop"]).output();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A watchdog that outlives this process: once it exits (pass or fail), the server in `dir`
/// is stopped and the directory removed (statics are never dropped).
fn reap_on_exit(bin: &Path, dir: &Path) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if is_root() {
        format!("runuser -u postgres -- '{}' -D '{}/data' -m immediate -w stop", pg_ctl.display(), dir.display())
    } else {
        format!("'{}' -D '{}/data' -m immediate -w stop", pg_ctl.display(), dir.display())
    };
    // Started in the background by a shell that exits at once: the watchdog is nobody's child.
    let script = format!(
        "(while kill -0 {} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{}') \
         </dev/null >/dev/null 2>&1 &",
        std::process::id(),
        dir.display()
    );
    let status = Command::new("sh").args(["-c", &script]).status();
    assert!(status.is_ok_and(|s| s.success()), "start the shared server's watchdog");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh, empty directory `poolwatch-<what>-<random>` under the system temp dir (mode 0700),
/// made by `tempfile` (a name never taken before, also after a killed test process left its
/// directories behind). Kept: its owner removes it (a cluster on drop, a watchdog at exit).
pub fn temp_dir(what: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("poolwatch-{what}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("create a temp dir for {what}: {e}"))
        .keep()
}

/// A test CA, a server certificate it signed (for `localhost` and 127.0.0.1) and another CA,
/// in `<dir>/tls`, made with the `openssl` command. Returns that directory.
fn make_certificates(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).expect("create the tls dir");
    let ext = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
               extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
    std::fs::write(tls.join("server.ext"), ext).expect("write server.ext");
    let ca = |name: &str| {
        format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=poolwatch-{name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
             -keyout {name}.key -out {name}.crt"
        )
    };
    for args in [
        ca("ca"),
        ca("wrong-ca"),
        "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
         -keyout server.key -out server.csr"
            .to_owned(),
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext \
         -out server.crt"
            .to_owned(),
    ] {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&tls)
            .output()
            .unwrap_or_else(|e| panic!("run openssl (apt-get install openssl; scripts/prereqs does): {e}"));
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    }
    tls
}

/// The `postgresql.conf` lines for TLS with the certificates in `tls`, and a `pg_hba.conf` in
/// `data` that lets loopback in over TLS only (a plain connection gets "no encryption").
fn tls_only(tls: &Path, data: &Path) -> String {
    let hba = "local all all trust\n\
               hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n\
               hostssl all all ::1/128 trust\nhostnossl all all ::1/128 reject\n";
    std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
        tls.join("server.crt").display(),
        tls.join("server.key").display()
    )
}

/// Whether this process runs as root (server binaries then run as `postgres`).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A free loopback TCP port for a server a test starts, claimed for this process.
///
/// `bind(0)` hands out ports from the kernel's ephemeral range, where any outgoing connection
/// or other test binary's `bind(0)` can take the port between our check and the server's own
/// bind ("Address already in use" under load). So the port comes from below that range
/// (20000-32767), and a claim file (`$TMPDIR/poolwatch-ports/<port>`, holding our pid) keeps
/// every other test process off it until we exit; a dead process's claims are taken over.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_768;
    let dir = std::env::temp_dir().join("poolwatch-ports");
    let _ = std::fs::create_dir_all(&dir);
    let me = std::process::id();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = me.wrapping_mul(7_919).wrapping_add(nanos);
    for i in 0..COUNT {
        let port = (FIRST + start.wrapping_add(i) % COUNT) as u16;
        let claim = dir.join(port.to_string());
        let created = std::fs::OpenOptions::new().write(true).create_new(true).open(&claim);
        match created {
            Ok(mut f) => {
                use std::io::Write as _;
                let _ = write!(f, "{me}");
                // Claimed; usable only if nothing else (another service) listens there.
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    return port;
                }
            }
            Err(_) => {
                // Taken over when its process is gone (the claim is read, then removed).
                let owner = std::fs::read_to_string(&claim).ok().and_then(|p| p.trim().parse::<u32>().ok());
                if owner.is_some_and(|pid| pid != me && !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_file(&claim);
                }
            }
        }
    }
    // Every port claimed: fall back to the kernel's choice.
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The directory holding `initdb` and `pg_ctl`.
fn server_bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file()).map(|d| {
        // Follow a symlinked initdb (e.g. /usr/local/bin) to the real bin dir, where `postgres` lives.
        std::fs::canonicalize(d.join("initdb")).ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or(d)
    })
}
