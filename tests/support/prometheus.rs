//! A real Prometheus and Alertmanager on free loopback ports with temp storage, and an HTTP
//! `GET` to read their APIs and `/metrics`. Both daemons are killed (and their directories
//! removed) on drop, also when a test panics.

#![allow(dead_code)]

use super::cluster::temp_dir;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET http://addr/path`; the body of a 200 response, else `None`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// A child process killed on drop.
#[derive(Debug)]
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn spawn(program: &str, args: &[String], dir: PathBuf) -> Daemon {
        Daemon::spawn_env(program, args, &[], dir)
    }

    fn spawn_env(program: &str, args: &[String], env: &[(&str, &str)], dir: PathBuf) -> Daemon {
        let log = std::fs::File::create(dir.join("log")).expect("daemon log");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} ({e}); scripts/prereqs installs it"));
        Daemon { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port claimed for this process (`cluster::free_port`): no other test binary takes it
/// before the daemon binds it.
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::cluster::free_port()))
}

/// A real Alertmanager (`/usr/bin/prometheus-alertmanager`), clustering off.
#[derive(Debug)]
pub struct Alertmanager {
    /// Its web/API address.
    pub addr: SocketAddr,
    daemon: Daemon,
}

impl Alertmanager {
    /// Starts Alertmanager with the config file at `config`.
    pub fn start(config: &Path) -> Alertmanager {
        let dir = temp_dir("alertmanager");
        let addr = free_addr();
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--cluster.listen-address=".to_owned(),
            "--log.level=warn".to_owned(),
        ];
        Alertmanager { addr, daemon: Daemon::spawn("prometheus-alertmanager", &args, dir) }
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// A real Prometheus (`/usr/bin/prometheus`) scraping one target every second, evaluating
/// `rules` every second and sending alerts to one Alertmanager.
#[derive(Debug)]
pub struct Prometheus {
    /// Its web/API address.
    pub addr: SocketAddr,
    daemon: Daemon,
}

impl Prometheus {
    /// Starts Prometheus; `rules` is copied into its directory.
    pub fn start(target: SocketAddr, rules: &str, alertmanager: SocketAddr) -> Prometheus {
        let dir = temp_dir("prometheus");
        let addr = free_addr();
        std::fs::write(dir.join("rules.yml"), rules).expect("write rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
             scrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['{target}']\n"
        );
        Prometheus::spawn(dir, addr, &config)
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

impl Prometheus {
    /// Writes `config` as prometheus.yml in `dir` and runs Prometheus on it at `addr`.
    fn spawn(dir: std::path::PathBuf, addr: SocketAddr, config: &str) -> Prometheus {
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let args = [
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".to_owned(),
        ];
        Prometheus { addr, daemon: Daemon::spawn("prometheus", &args, dir) }
    }

    /// Starts Prometheus scraping several jobs every second and evaluating `rules` every
    /// second, with no Alertmanager (alerts are read from its API).
    pub fn start_jobs(jobs: &[(&str, Vec<SocketAddr>)], rules: &str) -> Prometheus {
        Prometheus::start_jobs_every(jobs, rules, std::time::Duration::from_secs(1))
    }

    /// [`Prometheus::start_jobs`] with scrapes (and their timeout) every `every`.
    pub fn start_jobs_every(jobs: &[(&str, Vec<SocketAddr>)], rules: &str, every: std::time::Duration) -> Prometheus {
        let dir = temp_dir("prometheus");
        let addr = free_addr();
        std::fs::write(dir.join("rules.yml"), rules).expect("write rules");
        let every = format!("{}ms", every.as_millis());
        let mut config = format!(
            "global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\nscrape_configs:\n",
        );
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        Prometheus::spawn(dir, addr, &config)
    }
}

/// `s` percent-encoded for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real postgres_exporter (Debian `prometheus-postgres-exporter`) for one database, with
/// extra queries from a file (`--extend.query-path`).
#[derive(Debug)]
pub struct PostgresExporter {
    /// Its `/metrics` address.
    pub addr: SocketAddr,
    daemon: Daemon,
}

impl PostgresExporter {
    /// Starts the exporter on `dsn` (a `postgresql://` URL) with the queries in `queries`.
    pub fn start(dsn: &str, queries: &Path) -> PostgresExporter {
        let dir = temp_dir("postgres-exporter");
        let addr = free_addr();
        let args = [
            format!("--web.listen-address={addr}"),
            format!("--extend.query-path={}", queries.display()),
            "--disable-settings-metrics".to_owned(),
            "--log.level=warn".to_owned(),
        ];
        let dsn = format!("{dsn}?sslmode=disable");
        PostgresExporter {
            addr,
            daemon: Daemon::spawn_env("prometheus-postgres-exporter", &args, &[("DATA_SOURCE_NAME", &dsn)], dir),
        }
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// `promtool check metrics` on an exposition: no parse error, and no lint finding but the
/// documented exception (`catalog::LINT_EXCEPTIONS`).
pub fn promtool_check_metrics(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus) on PATH");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The one documented exception (poolwatch::catalog::LINT_EXCEPTIONS) is the only finding allowed.
    let findings: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            !(poolwatch::catalog::LINT_EXCEPTIONS.contains(&name) && l.contains("\"_count\" suffix"))
        })
        .collect();
    assert!(findings.is_empty(), "promtool check metrics: {findings:?}\n---\n{text}");
    assert!(out.status.success() || said.lines().count() > 0, "promtool failed without a finding: {said}");
}

/// `text` (Prometheus text 0.0.4, as metrics-exporter-prometheus serves it) as an OpenMetrics
/// consumer reads the same families: a counter's family is its name without `_total` (its
/// sample keeps the suffix), no blank lines, `# EOF` at the end. metrics-exporter-prometheus
/// has no OpenMetrics output of its own; this is the view of prometheus-client, the OTel
/// collector's receiver, and any scraper that maps families by OpenMetrics rules.
pub fn as_openmetrics(text: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(4, ' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("#"), Some(kind), Some(name), Some(rest)) if counters.contains(name) => {
                let family = name.strip_suffix("_total").unwrap_or(name);
                out.push_str(&format!("# {kind} {family} {rest}\n"));
            }
            _ => out.push_str(&format!("{line}\n")),
        }
    }
    out.push_str("# EOF\n");
    out
}

/// The OpenMetrics parser of the Python client (`prometheus_client.openmetrics.parser`, Debian
/// `python3-prometheus-client` for the system `/usr/bin/python3`) reads `text` entirely;
/// panics with its error (a clashing family name, a bad histogram) otherwise. Returns the
/// family names it read.
pub fn openmetrics_families(text: &str) -> Vec<String> {
    const READ: &str = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
        try:\n    print('\\n'.join(f.name + ' ' + f.type for f in parse(sys.stdin.read())))\n\
        except ValueError as e:\n    sys.exit('OpenMetrics parser: %s' % e)\n";
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", READ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (apt-get install python3-prometheus-client)");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write to python3");
    let out = child.wait_with_output().expect("python3 ran");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("No module named"), "python3-prometheus-client missing (scripts/prereqs): {said}");
    assert!(out.status.success(), "{said}\n---\n{text}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}
