//! The checks of `poolwatch doctor`: every address, the server, the hazard lint and the
//! pooler, each filling its part of one [`Report`] of plain data (render.rs prints it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolwatch::Deployment;
use poolwatch::hazards::ServerSettings;
use poolwatch::hazards::{self, PoolSettings};
use poolwatch::reach::{AddressFigures, Reachability, probe_host};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};

use crate::args::Args;
use crate::report::{
    Address, HazardFound, LockHolder, PoolFlags, Pooler, Report, Server, SessionGroup, Startup, StuckSession, Target,
};
use crate::startup;
use crate::text::{clean, dur};

/// Runs every check in turn; a step that cannot run says why in the report.
pub(crate) async fn run(args: &Args) -> Report {
    let started = Instant::now();
    let mut report = blank_report(args);
    let live = check_addresses(args, &mut report).await;
    let settings = examine_live(args, live, &mut report).await;
    lint_hazards(args, settings.as_ref(), &mut report);
    if let Some(admin) = &args.pooler_admin {
        check_pooler(admin, args.query_timeout, &mut report).await;
    }
    report.took_seconds = started.elapsed().as_secs_f64();
    report
}

/// The report before any check: what was asked, nothing found yet.
fn blank_report(args: &Args) -> Report {
    let o = &args.target.options;
    Report {
        target: Target {
            hosts: args.target.hosts.iter().map(|(h, p)| clean(&format!("{h}:{p}"))).collect(),
            user: clean(o.get_username()),
            database: clean(o.get_database().unwrap_or(o.get_username())),
            password_given: args.target.password_given,
        },
        addresses: Vec::new(),
        server: None,
        sessions: Vec::new(),
        stuck: Vec::new(),
        stuck_after_seconds: args.stuck_after.as_secs_f64(),
        advisory_locks: Vec::new(),
        pool: PoolFlags {
            max_connections: args.max_connections,
            min_connections: args.min_connections,
            idle_timeout_seconds: secs(args.idle_timeout),
            max_lifetime_seconds: secs(args.max_lifetime),
            acquire_timeout_seconds: args.acquire_timeout.as_secs_f64(),
            replicas: args.replicas,
            refresh_every_seconds: secs(args.refresh_every),
            pooler_idle_timeout_seconds: secs(args.pooler_idle_timeout),
        },
        hazards: Vec::new(),
        not_seen: Vec::new(),
        pooler: None,
        problems: Vec::new(),
        took_seconds: 0.0,
    }
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

// ---- 1. Every address: TCP, then the startup up to authentication ----

/// One host's probe: its addresses, those that took the TCP connection, and the startup on
/// each of those (same order as `up`).
struct HostProbe<'a> {
    host: &'a str,
    reach: Reachability,
    up: Vec<SocketAddr>,
    startups: Vec<Startup>,
}

/// Probes every address of every host and records them; returns the first address whose
/// startup succeeded, where the server is examined.
async fn check_addresses(args: &Args, report: &mut Report) -> Option<(String, SocketAddr)> {
    let probes = probe_hosts(args).await;
    for (host, _) in args.target.hosts.iter().filter(|(h, _)| h.starts_with('/')) {
        report.not_seen.push(format!("{}: a unix socket directory, not probed over TCP", clean(host)));
    }
    let mut live = None;
    for probe in probes {
        let host = probe.host.to_owned();
        if let Some(address) = record_host(probe, report) {
            live.get_or_insert((host, address));
        }
    }
    live
}

/// Every address of every TCP host, all at once: one dead host must not delay the others (a
/// timeout per address, one after another, would add up).
async fn probe_hosts(args: &Args) -> Vec<HostProbe<'_>> {
    // The startup packet carries the names as given; the report shows them cleaned.
    let o = &args.target.options;
    let (user, database) = (o.get_username(), o.get_database().unwrap_or(o.get_username()));
    let mode = o.get_ssl_mode();
    let tls = startup::Tls { mode, config: crate::tls::config(mode, args.target.ssl_root_cert.as_deref()) };
    let tcp_hosts = args.target.hosts.iter().filter(|(h, _)| !h.starts_with('/'));
    futures_join(tcp_hosts.map(|(host, port)| probe_one_host(args, host, *port, (user, database), &tls))).await
}

async fn probe_one_host<'a>(
    args: &Args,
    host: &'a str,
    port: u16,
    login: (&str, &str),
    tls: &startup::Tls,
) -> HostProbe<'a> {
    let reach = probe_host(host, port, args.connect_timeout).await;
    let up: Vec<SocketAddr> = reach.addresses.iter().filter(|a| a.up).map(|a| a.address).collect();
    let startups = futures_join(up.iter().map(|a| startup::probe(*a, host, login, tls, args.startup_timeout))).await;
    HostProbe { host, reach, up, startups }
}

/// Records one host's addresses and their problems; returns its first live address.
fn record_host(probe: HostProbe<'_>, report: &mut Report) -> Option<SocketAddr> {
    let host = &clean(probe.host);
    let reach = &probe.reach;
    if let Some(cause) = reach.resolve_error {
        report.problems.push(format!("{host} did not resolve ({cause})"));
        report.addresses.push(Address {
            host: host.clone(),
            address: None,
            tcp: format!("resolve failed: {cause}"),
            tcp_seconds: 0.0,
            startup: None,
        });
        return None;
    }
    let mut live = None;
    for a in &reach.addresses {
        let startup = probe.up.iter().position(|u| *u == a.address).map(|i| probe.startups[i].clone());
        if record_address(host, a, startup, report) {
            live.get_or_insert(a.address);
        }
    }
    if reach.resolved > reach.addresses.len() {
        report.not_seen.push(format!(
            "{host} resolved to {} addresses; only the first {} were probed",
            reach.resolved,
            reach.addresses.len()
        ));
    }
    live
}

/// Records one address (`startup`: `None` when TCP failed); true when it is live.
fn record_address(host: &str, a: &AddressFigures, startup: Option<Startup>, report: &mut Report) -> bool {
    let tcp = match a.error {
        None => "up".to_owned(),
        Some(cause) => cause.to_string(),
    };
    let live = match &startup {
        None => {
            report.problems.push(format!("{} ({host}) is unreachable: {tcp}", a.address));
            false
        }
        Some(s) if s.outcome != "ok" => {
            report.problems.push(format!("{} ({host}) startup {}: {}", a.address, s.outcome, s.detail));
            false
        }
        Some(_) => true,
    };
    report.addresses.push(Address {
        host: host.to_owned(),
        address: Some(a.address.to_string()),
        tcp,
        tcp_seconds: a.connect_time.as_secs_f64(),
        startup,
    });
    live
}

/// Runs the futures at once, keeping their order.
async fn futures_join<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

// ---- 2. Log in on a live address (or the unix socket) and read the server ----

/// Where the doctor logs in: shown as `label`, reached with `options`.
struct Via {
    label: String,
    options: PgConnectOptions,
}

/// The server's settings (for the hazard lint), when a live address or the URL's unix socket
/// let the doctor in.
async fn examine_live(args: &Args, live: Option<(String, SocketAddr)>, report: &mut Report) -> Option<ServerSettings> {
    let socket = args.target.hosts.iter().find(|(h, _)| h.starts_with('/'));
    let via = match (live, socket) {
        (Some((host, address)), _) => Via { label: address.to_string(), options: tcp_login(args, &host, address) },
        (None, Some((dir, port))) => Via {
            label: clean(&format!("{dir} (unix socket, port {port})")),
            options: named(args, args.target.options.clone().socket(dir).port(*port)),
        },
        (None, None) => {
            report
                .problems
                .push("no address answered the PostgreSQL startup: the server could not be examined".to_owned());
            return None;
        }
    };
    match examine(args, &via, report).await {
        Ok(settings) => Some(settings),
        Err(e) => {
            report.problems.push(format!("logging in on {} failed: {e}", via.label));
            None
        }
    }
}

/// Logs in through `via` and fills the server, sessions, stuck sessions and advisory locks.
async fn examine(args: &Args, via: &Via, report: &mut Report) -> Result<ServerSettings, String> {
    let timeout = args.query_timeout;
    let started = Instant::now();
    let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(&via.options))
        .await
        .map_err(|_| format!("timed out after {} ms", timeout.as_millis()))?
        .map_err(|e| login_error(args, &e))?;
    let login_seconds = started.elapsed().as_secs_f64();
    let result = examine_on(&mut conn, args, &via.label, login_seconds, report).await;
    let _ = tokio::time::timeout(timeout, conn.close()).await;
    result
}

/// A failed login: its cause, sqlx's words, and for a certificate problem what to check.
fn login_error(args: &Args, e: &sqlx::Error) -> String {
    let cause = poolwatch::Cause::of(e);
    let text = clean(&e.to_string());
    let mode = startup::mode_name(args.target.options.get_ssl_mode());
    // rustls's error can come as `Tls` or, during the handshake, inside `Io`: read its words.
    let mut hint = startup::certificate_hint(&text, args.target.options.get_ssl_mode());
    if hint.is_empty() && matches!(e, sqlx::Error::Tls(_)) {
        hint = format!("; TLS failed (sslmode={mode})");
    }
    format!("{cause} ({text}){hint}")
}

/// The URL's options on `address` of `host`. With `sslmode=verify-full` the login goes by the
/// host's name, so that the certificate is checked against the name the user gave.
fn tcp_login(args: &Args, host: &str, address: SocketAddr) -> PgConnectOptions {
    let by_name = matches!(args.target.options.get_ssl_mode(), sqlx::postgres::PgSslMode::VerifyFull)
        && host.parse::<std::net::IpAddr>().is_err();
    let target = if by_name { host.to_owned() } else { address.ip().to_string() };
    named(args, args.target.options.clone().host(&target).port(address.port()))
}

/// `options` named, with the query bound also on the server's side.
fn named(args: &Args, options: PgConnectOptions) -> PgConnectOptions {
    let ms = args.query_timeout.as_millis().max(1).to_string();
    options
        .application_name("poolwatch-doctor")
        .options([("statement_timeout", ms.as_str())])
        .disable_statement_logging()
}

/// Each read fills its part of the report as soon as it succeeds: a later failure keeps the
/// earlier parts.
async fn examine_on(
    conn: &mut PgConnection,
    args: &Args,
    via: &str,
    login_seconds: f64,
    report: &mut Report,
) -> Result<ServerSettings, String> {
    let t = args.query_timeout;
    let settings = read_settings(conn, t).await?;
    let who = read_who(conn, t).await?;
    report.sessions = read_sessions(conn, t).await?;
    let client_sessions: i64 = report.sessions.iter().map(|g| g.count).sum();
    if let Some(note) = hidden_sessions(&report.sessions, settings.superuser || who.read_all_stats, &who.user) {
        report.not_seen.push(note);
    }
    report.stuck = read_stuck(conn, t, args.stuck_after).await?;
    report.advisory_locks = read_advisory_locks(conn, t).await?;
    let server = server_of(&settings, who, via, login_seconds, client_sessions);
    if !report.stuck.is_empty() {
        report.problems.push(format!(
            "{} session(s) idle in transaction or active for more than {}",
            report.stuck.len(),
            dur(args.stuck_after.as_secs_f64())
        ));
    }
    if server.headroom <= 0 {
        report.problems.push("no connection slot left on the server for this role".to_owned());
    }
    report.server = Some(server);
    Ok(settings)
}

async fn query(conn: &mut PgConnection, timeout: Duration, sql: String) -> Result<Vec<PgRow>, String> {
    match tokio::time::timeout(timeout, fetch_all(conn, sql)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(clean(&e.to_string())),
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

/// Runs SQL built at run time (from the doctor's own constants and numbers, never from input)
/// with the simple protocol: sqlx 0.9 wants it marked `AssertSqlSafe`, 0.8 borrows it.
async fn fetch_all(conn: &mut PgConnection, sql: String) -> Result<Vec<PgRow>, sqlx::Error> {
    #[cfg(feature = "sqlx-0_9")]
    return sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_all(conn).await;
    #[cfg(not(feature = "sqlx-0_9"))]
    return sqlx::raw_sql(&sql).fetch_all(conn).await;
}

/// A text column, cleaned of control characters (role names may hold any).
fn text(row: &PgRow, i: usize) -> String {
    clean(&row.try_get::<Option<String>, _>(i).ok().flatten().unwrap_or_default())
}

async fn read_settings(conn: &mut PgConnection, t: Duration) -> Result<ServerSettings, String> {
    tokio::time::timeout(t, ServerSettings::read(conn))
        .await
        .map_err(|_| "reading the server settings timed out".to_owned())?
        .map_err(|e| format!("reading the server settings: {}", clean(&e.to_string())))
}

/// Who the doctor is logged in as; empty when the server returned no row.
#[derive(Default)]
struct Who {
    user: String,
    version: String,
    read_all_stats: bool,
}

async fn read_who(conn: &mut PgConnection, t: Duration) -> Result<Who, String> {
    let rows = query(
        conn,
        t,
        "SELECT current_user::text, current_setting('server_version'), \
         pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')::text"
            .to_owned(),
    )
    .await?;
    Ok(rows
        .first()
        .map(|r| Who { user: text(r, 0), version: text(r, 1), read_all_stats: text(r, 2) == "true" })
        .unwrap_or_default())
}

/// Client sessions, as the role sees them: a session it may not inspect shows with NULL
/// `backend_type` and `state`; those with a database are clients too.
const CLIENTS: &str = "datid IS NOT NULL AND (backend_type = 'client backend' OR backend_type IS NULL)";

async fn read_sessions(conn: &mut PgConnection, t: Duration) -> Result<Vec<SessionGroup>, String> {
    let rows = query(
        conn,
        t,
        format!(
            "SELECT coalesce(application_name, ''), coalesce(state, CASE WHEN backend_type IS NULL \
             THEN 'hidden' ELSE 'unknown' END), count(*)::int8 \
             FROM pg_stat_activity WHERE {CLIENTS} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 200"
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| SessionGroup { application_name: text(r, 0), state: text(r, 1), count: r.try_get(2).unwrap_or(0) })
        .collect())
}

/// What a role without `pg_read_all_stats` cannot see of the other roles' sessions.
fn hidden_sessions(sessions: &[SessionGroup], sees_all: bool, user: &str) -> Option<String> {
    let hidden: i64 = sessions.iter().filter(|g| g.state == "hidden").map(|g| g.count).sum();
    (hidden > 0 || !sees_all).then(|| {
        format!(
            "state, query times and waits of {hidden} session(s) of other roles: role {user} lacks \
             pg_read_all_stats (their count and application_name are exact; stuck sessions among them \
             cannot be found). Fix: GRANT pg_read_all_stats TO {user}"
        )
    })
}

/// Client sessions idle in transaction or active for longer than `after`, the oldest first.
async fn read_stuck(conn: &mut PgConnection, t: Duration, after: Duration) -> Result<Vec<StuckSession>, String> {
    let after = after.as_secs_f64();
    let rows = query(
        conn,
        t,
        format!(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), state, \
             extract(epoch FROM clock_timestamp() - state_change)::float8, \
             extract(epoch FROM clock_timestamp() - xact_start)::float8, \
             CASE WHEN wait_event_type IS NOT NULL THEN wait_event_type || ':' || wait_event END \
             FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' \
               AND (state LIKE 'idle in transaction%' OR state = 'active') \
               AND state_change < clock_timestamp() - make_interval(secs => {after}) \
             ORDER BY state_change LIMIT 50"
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| StuckSession {
            pid: r.try_get(0).unwrap_or(0),
            user: text(r, 1),
            application_name: text(r, 2),
            state: text(r, 3),
            in_state_seconds: r.try_get(4).unwrap_or(0.0),
            transaction_seconds: r.try_get(5).ok().flatten(),
            waiting_on: r.try_get(6).ok().flatten(),
        })
        .collect())
}

/// Sessions holding or waiting for advisory locks, the biggest holders first.
async fn read_advisory_locks(conn: &mut PgConnection, t: Duration) -> Result<Vec<LockHolder>, String> {
    let rows = query(
        conn,
        t,
        "SELECT l.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''), \
         coalesce(a.state, CASE WHEN a.pid IS NULL THEN 'gone' ELSE 'hidden' END), \
         count(*) FILTER (WHERE l.granted)::int8, count(*) FILTER (WHERE NOT l.granted)::int8 \
         FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.pid IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 6 DESC LIMIT 50"
            .to_owned(),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| LockHolder {
            pid: r.try_get(0).unwrap_or(0),
            user: text(r, 1),
            application_name: text(r, 2),
            state: text(r, 3),
            held: r.try_get(4).unwrap_or(0),
            waiting: r.try_get(5).unwrap_or(0),
        })
        .collect())
}

fn server_of(settings: &ServerSettings, who: Who, via: &str, login_seconds: f64, client_sessions: i64) -> Server {
    let usable = settings.usable_connections();
    Server {
        via: via.to_owned(),
        version: who.version,
        user: who.user,
        superuser: settings.superuser,
        read_all_stats: who.read_all_stats,
        login_seconds,
        max_connections: settings.max_connections,
        reserved_connections: settings.superuser_reserved_connections + settings.reserved_connections,
        usable_connections: usable,
        client_sessions: u32::try_from(client_sessions).unwrap_or(u32::MAX),
        headroom: i64::from(usable) - client_sessions,
        idle_session_timeout_seconds: secs(settings.idle_session_timeout),
        idle_in_transaction_session_timeout_seconds: secs(settings.idle_in_transaction_session_timeout),
        tcp_keepalives_idle_seconds: secs(settings.tcp_keepalives_idle),
        role_connection_limit: settings.role_connection_limit,
    }
}

// ---- 3. The hazard lint: the server's settings against the pool's flags ----

fn lint_hazards(args: &Args, settings: Option<&ServerSettings>, report: &mut Report) {
    let Some(server) = settings else {
        report.not_seen.push("the hazard lint: the server's settings could not be read".to_owned());
        return;
    };
    for f in hazards::lint(server, &pool_settings(args), &declared_deployment(args)) {
        report.problems.push(format!("hazard {}", f.hazard));
        report.hazards.push(HazardFound {
            hazard: f.hazard.as_str(),
            detail: f.detail,
            consequence: f.hazard.consequence(),
            fix: f.hazard.fix(),
        });
    }
}

fn pool_settings(args: &Args) -> PoolSettings {
    PoolSettings {
        max_connections: args.max_connections,
        min_connections: args.min_connections,
        idle_timeout: args.idle_timeout,
        max_lifetime: args.max_lifetime,
        acquire_timeout: args.acquire_timeout,
    }
}

/// The deployment declared on the command line, as a [`Deployment`] the library's lint reads.
fn declared_deployment(args: &Args) -> Deployment {
    let mut deployment = Deployment::new().replicas(args.replicas);
    if let Some(d) = args.refresh_every {
        deployment = deployment.expect_refresh_every(d);
    }
    if let Some(d) = args.pooler_idle_timeout {
        deployment = deployment.pooler_idle_timeout(d);
    }
    if let Some(k) = args.listener_keepalive {
        deployment = deployment.listener_keepalive(k);
    }
    deployment
}

// ---- 4. The pooler's own view ----

async fn check_pooler(admin: &PgConnectOptions, timeout: Duration, report: &mut Report) {
    let pooler = show_pools(admin, timeout).await;
    if let Some(e) = &pooler.error {
        report.problems.push(format!("pooler admin console: {e}"));
    }
    report.pooler = Some(pooler);
}

/// PgBouncer's `SHOW POOLS` on its admin console, every column as text.
async fn show_pools(admin: &PgConnectOptions, timeout: Duration) -> Pooler {
    let work = async {
        let mut conn = PgConnection::connect_with(&admin.clone().disable_statement_logging()).await?;
        let rows = sqlx::raw_sql("SHOW POOLS").fetch_all(&mut conn).await;
        let _ = conn.close().await;
        rows
    };
    let error = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(rows)) => return pools_table(&rows),
        Ok(Err(e)) => clean(&e.to_string()),
        Err(_) => format!("timed out after {} ms", timeout.as_millis()),
    };
    Pooler { columns: Vec::new(), rows: Vec::new(), error: Some(error) }
}

/// Every column name and cell of `rows` as cleaned text (NULL: empty).
fn pools_table(rows: &[PgRow]) -> Pooler {
    use sqlx::{Column, ValueRef};
    let columns = rows.first().map(|r| r.columns().iter().map(|c| clean(c.name())).collect()).unwrap_or_default();
    let rows = rows
        .iter()
        .map(|r| {
            (0..r.columns().len())
                .map(|i| match r.try_get_raw(i) {
                    Ok(v) if !v.is_null() => v.as_str().map(clean).unwrap_or_default(),
                    _ => String::new(),
                })
                .collect()
        })
        .collect();
    Pooler { columns, rows, error: None }
}
