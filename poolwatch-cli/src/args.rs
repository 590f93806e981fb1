//! The command line, parsed by clap (derive). clap's own messages quote the text they could
//! not take, and that text may be a password typed in the wrong place: [`parse`] rewrites every
//! error so that it names the flag and the fix, never the value.

use std::ffi::OsString;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand};
use sqlx::postgres::PgConnectOptions;

use crate::target::{self, Target};

/// `poolwatch`: see `poolwatch doctor --help`.
#[derive(Parser)]
#[command(
    name = "poolwatch",
    version,
    about = "Checks a PostgreSQL server and its pools the way an on-call engineer would."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every address, the startup, sessions, stuck sessions, advisory locks, headroom, config
    /// hazards and the pooler. Exit status: 0 healthy, 1 a hazard, an unreachable address or a
    /// failed check, 2 bad usage.
    Doctor(Flags),
}

/// The flags of `poolwatch doctor`, as typed. Durations: 250ms, 10s, 5m, 1h (a bare number is
/// seconds); `0`, `0s` or `off` turns an optional one off.
#[derive(clap::Args)]
#[command(
    after_help = "Durations: 250ms, 10s, 5m, 1h (a bare number is seconds); 0 or off turns an optional one off.\n\
Exit status: 0 healthy, 1 a hazard, an unreachable address or a failed check, 2 bad usage."
)]
struct Flags {
    /// postgres://user[:password]@host[:port][,host2[:port2]...]/database[?sslmode=..&sslrootcert=..&host=/socket/dir],
    /// or libpq key=value pairs as one argument. The password is used to log in, never printed.
    #[arg(value_name = "DATABASE_URL", env = "DATABASE_URL", hide_env_values = true, num_args = 0..)]
    url: Vec<String>,
    /// The pool's max_connections (for the hazard lint).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = count, help_heading = "Pool settings (sqlx's defaults)")]
    max_connections: u32,
    /// The pool's min_connections.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = count, help_heading = "Pool settings (sqlx's defaults)")]
    min_connections: u32,
    /// The pool's idle_timeout (0 or off: none).
    #[arg(long, value_name = "D", default_value = "10m", value_parser = optional_duration, help_heading = "Pool settings (sqlx's defaults)")]
    idle_timeout: Off,
    /// The pool's max_lifetime (0 or off: none).
    #[arg(long, value_name = "D", default_value = "30m", value_parser = optional_duration, help_heading = "Pool settings (sqlx's defaults)")]
    max_lifetime: Off,
    /// The pool's acquire_timeout.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = positive_duration, help_heading = "Pool settings (sqlx's defaults)")]
    acquire_timeout: Duration,
    /// Processes running this pool.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = count, help_heading = "Declared deployment")]
    replicas: u32,
    /// A lock refresh / job heartbeat runs on a pool connection this often (0: none).
    #[arg(long, value_name = "D", value_parser = optional_duration, help_heading = "Declared deployment")]
    refresh_every: Option<Off>,
    /// A pooler or proxy in between ends connections idle this long (0: none).
    #[arg(long, value_name = "D", value_parser = optional_duration, help_heading = "Declared deployment")]
    pooler_idle_timeout: Option<Off>,
    /// A LISTEN listener runs, with this keepalive (0 or off: without one).
    #[arg(long, value_name = "D", value_parser = optional_duration, help_heading = "Declared deployment")]
    listener_keepalive: Option<Off>,
    /// Sessions idle in transaction or active longer than this are stuck (0: any).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = duration, help_heading = "Checks")]
    stuck_after: Duration,
    /// Also print PgBouncer's SHOW POOLS (its admin console URL, database pgbouncer).
    #[arg(long, value_name = "URL", help_heading = "Checks")]
    pooler_admin: Option<String>,
    /// TCP connect, per address.
    #[arg(long, value_name = "D", default_value = "3s", value_parser = positive_duration, help_heading = "Timeouts")]
    connect_timeout: Duration,
    /// PostgreSQL startup up to authentication (TLS included), per address.
    #[arg(long, value_name = "D", default_value = "3s", value_parser = positive_duration, help_heading = "Timeouts")]
    startup_timeout: Duration,
    /// Login and each query on the server.
    #[arg(long, value_name = "D", default_value = "5s", value_parser = positive_duration, help_heading = "Timeouts")]
    query_timeout: Duration,
    /// One JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

/// What `poolwatch doctor` was asked to do. No `Debug`: the options hold the password.
pub(crate) struct Args {
    /// DATABASE_URL, parsed; its `secrets` and `warnings` include `--pooler-admin`'s.
    pub(crate) target: Target,
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

/// Why no [`Args`] came out of the command line.
pub(crate) enum Stop {
    /// `--help` or `--version`: clap's text, printed on stdout, exit 0.
    Info(String),
    /// Bad usage (exit 2): a message that quotes no value.
    Usage(String),
}

/// Parses the whole command line (program name first).
pub(crate) fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Args, Stop> {
    let cli = Cli::try_parse_from(argv).map_err(usage_error)?;
    let Command::Doctor(flags) = cli.command;
    resolve(flags).map_err(Stop::Usage)
}

/// The typed flags checked and the URLs read.
fn resolve(f: Flags) -> Result<Args, String> {
    if f.url.len() > 1 {
        return Err("more than one DATABASE_URL argument (not repeated here: it may hold a secret); \
             give one, and quote key=value pairs as one argument: 'host=db user=app'"
            .to_owned());
    }
    if f.replicas == 0 {
        return Err("--replicas is zero; declare how many processes run the pool (at least 1)".to_owned());
    }
    if f.max_connections == 0 {
        return Err("--max-connections is zero; give the pool's max_connections (sqlx default 10)".to_owned());
    }
    let url = f.url.into_iter().next().ok_or(
        "DATABASE_URL missing: poolwatch doctor postgres://user@host:5432/db (or set $DATABASE_URL)".to_owned(),
    )?;
    let admin = match f.pooler_admin {
        Some(admin) => Some(
            target::parse("--pooler-admin", &admin)
                .map_err(|e| format!("{e} (e.g. postgres://admin@127.0.0.1:6432/pgbouncer)"))?,
        ),
        None => None,
    };
    let mut target = target::parse("DATABASE_URL", &url)?;
    let pooler_admin = admin.map(|admin| {
        target.secrets.extend(admin.secrets);
        target.warnings.extend(admin.warnings);
        admin.options
    });
    Ok(Args {
        target,
        max_connections: f.max_connections,
        min_connections: f.min_connections,
        idle_timeout: f.idle_timeout.0,
        max_lifetime: f.max_lifetime.0,
        acquire_timeout: f.acquire_timeout,
        replicas: f.replicas,
        refresh_every: f.refresh_every.and_then(|d| d.0),
        pooler_idle_timeout: f.pooler_idle_timeout.and_then(|d| d.0),
        listener_keepalive: f.listener_keepalive.map(|d| d.0),
        stuck_after: f.stuck_after,
        pooler_admin,
        connect_timeout: f.connect_timeout,
        startup_timeout: f.startup_timeout,
        query_timeout: f.query_timeout,
        json: f.json,
    })
}

/// clap's error as a message that names the flag, never the value given.
fn usage_error(e: clap::Error) -> Stop {
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let message = match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => return Stop::Info(e.render().to_string()),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            "the command is `poolwatch doctor <DATABASE_URL>` (see poolwatch --help)".to_owned()
        }
        // The message our value parser gave (it quotes nothing); clap's own would quote the value.
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let why = std::error::Error::source(&e).map(|s| s.to_string());
            format!("{}: {}", safe_flag(&flag), why.unwrap_or_else(|| "not a valid value".to_owned()))
        }
        ErrorKind::ArgumentConflict => format!("{} is given more than once; give it once", safe_flag(&flag)),
        ErrorKind::UnknownArgument => {
            let shown = if is_flag_name(&flag) { format!(" `{flag}`") } else { String::new() };
            format!("unknown option{shown} (see poolwatch doctor --help)")
        }
        ErrorKind::InvalidSubcommand => "unknown command; the command is `poolwatch doctor <DATABASE_URL>`".to_owned(),
        ErrorKind::InvalidUtf8 => "an argument is not valid UTF-8; URLs and flags must be UTF-8 \
             (percent-encode other bytes of a password, e.g. %FF)"
            .to_owned(),
        ErrorKind::NoEquals | ErrorKind::TooFewValues | ErrorKind::WrongNumberOfValues => {
            format!("{} needs a value (see poolwatch doctor --help)", safe_flag(&flag))
        }
        other => format!("{other} (see poolwatch doctor --help)"),
    };
    Stop::Usage(message)
}

/// clap's name of an argument (`--query-timeout <D>`), or a neutral word if it is not one.
fn safe_flag(s: &str) -> String {
    let name = s.split(' ').next().unwrap_or_default();
    if is_flag_name(name) { s.to_owned() } else { "an argument".to_owned() }
}

/// `--some-name`: safe to quote back (anything else may be a secret typed in the wrong place).
fn is_flag_name(s: &str) -> bool {
    s.strip_prefix("--").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
}

fn count(v: &str) -> Result<u32, String> {
    v.parse().map_err(|_| "needs a whole number, e.g. 10".to_owned())
}

/// A duration that may be off: `None` for any zero (`0`, `0s`, `0ms`) and `off` / `none`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Off(Option<Duration>);

fn optional_duration(v: &str) -> Result<Off, String> {
    if matches!(v, "off" | "none") {
        return Ok(Off(None));
    }
    duration(v).map(|d| Off((!d.is_zero()).then_some(d)))
}

/// A bound that must be above zero (a zero bound would fail every step).
fn positive_duration(v: &str) -> Result<Duration, String> {
    match duration(v)? {
        d if d.is_zero() => Err("needs a duration above zero, e.g. 10s".to_owned()),
        d => Ok(d),
    }
}

/// `250ms`, `10s`, `5m`, `1h`, a bare number of seconds; `0` in any unit is zero.
fn duration(v: &str) -> Result<Duration, String> {
    let bad = || "needs a duration, e.g. 250ms, 10s, 5m, 1h".to_owned();
    let (number, unit) = v.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((v, ""), |i| v.split_at(i));
    let n: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, Stop> {
        parse(std::iter::once("poolwatch").chain(list.iter().copied()).map(OsString::from))
    }

    fn usage(list: &[&str]) -> String {
        match args(list) {
            Err(Stop::Usage(m)) => m,
            Err(Stop::Info(i)) => panic!("help or version for {list:?}: {i}"),
            Ok(_) => panic!("{list:?} parsed"),
        }
    }

    #[test]
    fn host_lists_durations_and_redaction() {
        let Ok(a) = args(&["doctor", "postgres://u:pw@127.0.0.1:5433,[::1]:5434,db/app", "--idle-timeout", "off"])
        else {
            panic!("did not parse")
        };
        assert_eq!(a.target.hosts, [("127.0.0.1".into(), 5433), ("::1".into(), 5434), ("db".into(), 5432)]);
        assert_eq!(a.target.options.get_port(), 5433);
        assert_eq!(a.idle_timeout, None);
        assert!(usage(&["doctor", "x", "--replicas", "0"]).contains("--replicas"));
        assert!(usage(&["doctor", "--bogus"]).contains("--bogus"));
        assert!(!usage(&["doctor", "postgres://db/x", "s3cret"]).contains("s3cret"));
        assert!(!usage(&["doctor", "--max-connections", "s3cret"]).contains("s3cret"));
        assert!(!usage(&["doctor", "--s3cret"]).contains("s3cret"));
    }

    #[test]
    fn durations_read_the_same_everywhere() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        for zero in ["0", "0s", "0ms", "off"] {
            assert_eq!(optional_duration(zero), Ok(Off(None)), "{zero}");
        }
        assert!(duration("5 parsecs").is_err());
        let Ok(a) = args(&["doctor", "postgres://db/x", "--refresh-every", "0s", "--listener-keepalive", "0"]) else {
            panic!("zero durations refused")
        };
        assert_eq!((a.refresh_every, a.listener_keepalive), (None, Some(None)));
        assert!(usage(&["doctor", "postgres://db/x", "--query-timeout", "0s"]).contains("--query-timeout"));
    }

    #[test]
    fn clap_rules_repeats_separator_version_and_utf8() {
        let repeated = usage(&["doctor", "postgres://db/x", "--max-connections", "5", "--max-connections", "6"]);
        assert!(repeated.contains("--max-connections") && repeated.contains("more than once"), "{repeated}");
        assert!(args(&["doctor", "--json", "--", "postgres://db/x"]).is_ok_and(|a| a.json));
        assert!(matches!(args(&["--version"]), Err(Stop::Info(v)) if v.contains(env!("CARGO_PKG_VERSION"))));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let argv = ["poolwatch", "doctor"].map(OsString::from).into_iter().chain([OsString::from_vec(vec![0xff])]);
            assert!(matches!(parse(argv), Err(Stop::Usage(m)) if m.contains("UTF-8")));
        }
    }
}
