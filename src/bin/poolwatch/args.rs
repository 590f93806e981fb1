//! Hand-rolled argument parsing (no parser crate: the CLI stays light).

use std::time::Duration;

use poolwatch::sqlx;
use sqlx::postgres::PgConnectOptions;

use crate::target;

pub(crate) const USAGE: &str = "\
poolwatch doctor: checks a PostgreSQL server the way an on-call engineer would, at the moment of need.

USAGE:
    poolwatch doctor [OPTIONS] <DATABASE_URL>

    DATABASE_URL  postgres://user[:password]@host[:port][,host2[:port2]...]/database[?...]
                  (libpq-style host lists are accepted; falls back to $DATABASE_URL).
                  The password is used to log in and never printed.

POOL SETTINGS (for the hazard lint; defaults are sqlx's):
    --max-connections N        default 10
    --min-connections N        default 0
    --idle-timeout D|off       default 10m
    --max-lifetime D|off       default 30m
    --acquire-timeout D        default 30s
DECLARED DEPLOYMENT:
    --replicas N               processes running this pool (default 1)
    --refresh-every D          a lock refresh / job heartbeat runs on a pool connection this often
    --pooler-idle-timeout D    a pooler or proxy in between ends connections idle this long
    --listener-keepalive D|off a LISTEN listener runs, with this keepalive (off: without one)
CHECKS:
    --stuck-after D            sessions idle in transaction or active longer than this (default 60s)
    --pooler-admin URL         also print PgBouncer's SHOW POOLS (admin console URL, database pgbouncer)
TIMEOUTS (each step has its own bound):
    --connect-timeout D        TCP connect, per address (default 3s)
    --startup-timeout D        PostgreSQL startup up to authentication, per address (default 3s)
    --query-timeout D          login and each query on the server (default 5s)
OUTPUT:
    --json                     one JSON document instead of tables
    -h, --help

Durations: 250ms, 10s, 5m, 1h (a bare number is seconds).
Exit status: 0 healthy, 1 a hazard, an unreachable address or a failed check, 2 bad usage.
";

/// What `poolwatch doctor` was asked to do. No `Debug`: the options hold the password.
pub(crate) struct Args {
    /// Every `host:port` of the URL's host list, in order.
    pub(crate) hosts: Vec<(String, u16)>,
    /// The URL's options (first host), password included: used to log in only.
    pub(crate) options: PgConnectOptions,
    /// Whether the URL carries a password (shown as a yes/no, never the value).
    pub(crate) password_given: bool,
    /// Every form of the passwords given (DATABASE_URL, --pooler-admin): scrubbed from output.
    pub(crate) secrets: Vec<String>,
    /// Advice about the URLs, for stderr.
    pub(crate) warnings: Vec<String>,
    pub(crate) max_connections: u32,
    pub(crate) min_connections: u32,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) acquire_timeout: Duration,
    pub(crate) replicas: u32,
    pub(crate) refresh_every: Option<Duration>,
    pub(crate) pooler_idle_timeout: Option<Duration>,
    pub(crate) listener_keepalive: Option<Option<Duration>>,
    pub(crate) stuck_after: Duration,
    pub(crate) pooler_admin: Option<PgConnectOptions>,
    pub(crate) connect_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) json: bool,
}

/// `Err(message)`: bad usage (exit 2). `Ok(None)`: help was asked for.
pub(crate) fn parse(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    match argv.next().as_deref() {
        Some("doctor") => {}
        Some("-h" | "--help") | None => return Ok(None),
        Some(other) => {
            return Err(format!("unknown command `{other}`; the command is `poolwatch doctor <DATABASE_URL>`"));
        }
    }
    let mut a = defaults();
    let mut url = None;
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if matches!(flag.as_str(), "-h" | "--help") {
            return Ok(None);
        }
        let value = || inline.clone().or_else(|| argv.next()).ok_or_else(|| format!("{flag} needs a value"));
        if option(&mut a, &flag, value)? {
            continue;
        }
        if url.is_some() {
            return Err("more than one DATABASE_URL argument (not repeated here: it may hold a secret); \
                 give one, and quote key=value pairs as one argument: 'host=db user=app'"
                .to_owned());
        }
        url = Some(arg);
    }
    let url = url.or_else(|| std::env::var("DATABASE_URL").ok()).ok_or(
        "DATABASE_URL missing: poolwatch doctor postgres://user@host:5432/db (or set $DATABASE_URL)".to_owned(),
    )?;
    check_counts(&a)?;
    apply_target(&mut a, &url)?;
    Ok(Some(a))
}

/// sqlx's pool defaults, no declared deployment, no URL yet.
fn defaults() -> Args {
    Args {
        hosts: Vec::new(),
        options: PgConnectOptions::new_without_pgpass(),
        password_given: false,
        secrets: Vec::new(),
        warnings: Vec::new(),
        max_connections: 10,
        min_connections: 0,
        idle_timeout: Some(Duration::from_secs(600)),
        max_lifetime: Some(Duration::from_secs(1800)),
        acquire_timeout: Duration::from_secs(30),
        replicas: 1,
        refresh_every: None,
        pooler_idle_timeout: None,
        listener_keepalive: None,
        stuck_after: Duration::from_secs(60),
        pooler_admin: None,
        connect_timeout: Duration::from_secs(3),
        startup_timeout: Duration::from_secs(3),
        query_timeout: Duration::from_secs(5),
        json: false,
    }
}

/// Applies the option `flag`, taking its value from `value` when it has one. `Ok(false)`:
/// `flag` is no option but an argument (the URL).
fn option(a: &mut Args, flag: &str, mut value: impl FnMut() -> Result<String, String>) -> Result<bool, String> {
    match flag {
        "--json" => a.json = true,
        "--max-connections" => a.max_connections = count(flag, &value()?)?,
        "--min-connections" => a.min_connections = count(flag, &value()?)?,
        "--idle-timeout" => a.idle_timeout = optional_duration(flag, &value()?)?,
        "--max-lifetime" => a.max_lifetime = optional_duration(flag, &value()?)?,
        "--acquire-timeout" => a.acquire_timeout = duration(flag, &value()?)?,
        "--replicas" => a.replicas = count(flag, &value()?)?,
        "--refresh-every" => a.refresh_every = Some(duration(flag, &value()?)?),
        "--pooler-idle-timeout" => a.pooler_idle_timeout = Some(duration(flag, &value()?)?),
        "--listener-keepalive" => a.listener_keepalive = Some(optional_duration(flag, &value()?)?),
        "--stuck-after" => a.stuck_after = duration(flag, &value()?)?,
        "--pooler-admin" => {
            let admin = target::parse("--pooler-admin", &value()?)
                .map_err(|e| format!("{e} (e.g. postgres://admin@127.0.0.1:6432/pgbouncer)"))?;
            a.secrets.extend(admin.secrets);
            a.warnings.extend(admin.warnings);
            a.pooler_admin = Some(admin.options);
        }
        "--connect-timeout" => a.connect_timeout = duration(flag, &value()?)?,
        "--startup-timeout" => a.startup_timeout = duration(flag, &value()?)?,
        "--query-timeout" => a.query_timeout = duration(flag, &value()?)?,
        // Only a `--name` is quoted back: anything else may be a secret typed in the wrong place.
        f if f.starts_with("--") && f[2..].bytes().all(|b| b.is_ascii_lowercase() || b == b'-') => {
            return Err(format!("unknown option `{f}` (see poolwatch doctor --help)"));
        }
        f if f.starts_with('-') => return Err("unknown option (see poolwatch doctor --help)".to_owned()),
        _ => return Ok(false),
    }
    Ok(true)
}

/// A deployment runs at least one process with at least one connection.
fn check_counts(a: &Args) -> Result<(), String> {
    if a.replicas == 0 {
        return Err("--replicas is zero; declare how many processes run the pool (at least 1)".to_owned());
    }
    if a.max_connections == 0 {
        return Err("--max-connections is zero; give the pool's max_connections (sqlx default 10)".to_owned());
    }
    Ok(())
}

/// Where to go and how to log in, from DATABASE_URL; its secrets and warnings join the
/// --pooler-admin ones.
fn apply_target(a: &mut Args, url: &str) -> Result<(), String> {
    let target = target::parse("DATABASE_URL", url)?;
    a.options = target.options;
    a.hosts = target.hosts;
    a.password_given = target.password_given;
    a.secrets.extend(target.secrets);
    a.warnings.extend(target.warnings);
    Ok(())
}

fn count(flag: &str, v: &str) -> Result<u32, String> {
    // The value is not quoted back: a misplaced DATABASE_URL would be printed whole.
    v.parse().map_err(|_| format!("{flag} needs a whole number, e.g. {flag} 10"))
}

fn optional_duration(flag: &str, v: &str) -> Result<Option<Duration>, String> {
    if matches!(v, "off" | "none" | "0") { Ok(None) } else { duration(flag, v).map(Some) }
}

fn duration(flag: &str, v: &str) -> Result<Duration, String> {
    let bad = || format!("{flag} needs a duration, e.g. 250ms, 10s, 5m, 1h");
    let (number, unit) = v.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((v, ""), |i| v.split_at(i));
    let n: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{flag} needs a positive duration, e.g. 10s")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Option<Args>, String> {
        parse(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn host_lists_durations_and_redaction() {
        let a = args(&["doctor", "postgres://u:pw@127.0.0.1:5433,[::1]:5434,db/app", "--idle-timeout", "off"])
            .unwrap()
            .unwrap();
        assert_eq!(a.hosts, [("127.0.0.1".into(), 5433), ("::1".into(), 5434), ("db".into(), 5432)]);
        assert_eq!(a.options.get_port(), 5433);
        assert_eq!(a.idle_timeout, None);
        assert_eq!(duration("--x", "250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("--x", "5m"), Ok(Duration::from_secs(300)));
        assert!(duration("--x", "5 parsecs").unwrap_err().contains("--x"));
        assert!(args(&["doctor", "x", "--replicas", "0"]).err().unwrap_or_default().contains("--replicas"));
        assert!(args(&["doctor", "--bogus"]).err().unwrap_or_default().contains("--bogus"));
        assert!(!args(&["doctor", "postgres://db/x", "s3cret"]).err().unwrap_or_default().contains("s3cret"));
    }
}
