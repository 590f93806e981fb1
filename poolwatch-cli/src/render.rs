//! The report as output: plain aligned tables for people, or one JSON document (`--json`).
//! Nothing here reads a server: every section prints what doctor.rs put in the [`Report`].

use std::fmt::Write;

use crate::report::{
    Address, HazardFound, LockHolder, PoolFlags, Pooler, Report, Server, SessionGroup, StuckSession, Target,
};
use crate::text::dur;

/// The `--json` form: the report's fields as they are, with every secret scrubbed from each
/// string value of the tree (never from the JSON text: a one-letter password would eat its
/// keys and quotes).
pub(crate) fn json(r: &Report, secrets: &[String]) -> serde_json::Result<String> {
    let mut tree = serde_json::to_value(r)?;
    scrub_strings(&mut tree, secrets);
    serde_json::to_string_pretty(&tree)
}

/// Scrubs every string of `v` (keys are the report's own field names, never server text).
fn scrub_strings(v: &mut serde_json::Value, secrets: &[String]) {
    use serde_json::Value;
    match v {
        Value::String(s) => *s = crate::target::scrub(s, secrets),
        Value::Array(items) => items.iter_mut().for_each(|i| scrub_strings(i, secrets)),
        Value::Object(fields) => fields.values_mut().for_each(|f| scrub_strings(f, secrets)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The human form: one section after another; what was not read is left out.
pub(crate) fn human(r: &Report) -> String {
    let mut o = String::new();
    target(&mut o, &r.target);
    addresses(&mut o, &r.addresses);
    if let Some(s) = &r.server {
        server(&mut o, s);
        sessions(&mut o, &r.sessions);
        stuck(&mut o, &r.stuck, r.stuck_after_seconds);
        advisory_locks(&mut o, &r.advisory_locks);
    }
    hazards(&mut o, &r.pool, &r.hazards, r.server.is_some());
    if let Some(p) = &r.pooler {
        pooler(&mut o, p);
    }
    not_seen(&mut o, &r.not_seen);
    result(&mut o, &r.problems, r.took_seconds);
    o
}

fn target(o: &mut String, t: &Target) {
    let _ = writeln!(
        o,
        "poolwatch doctor: {} as {} on database {} (password {})",
        t.hosts.join(","),
        t.user,
        t.database,
        if t.password_given { "given, not shown" } else { "none" }
    );
}

fn addresses(o: &mut String, addresses: &[Address]) {
    let _ = writeln!(o, "\nADDRESSES (TCP connect, then PostgreSQL startup up to authentication)");
    let rows: Vec<Vec<String>> = addresses
        .iter()
        .map(|a| {
            vec![
                a.host.clone(),
                a.address.clone().unwrap_or("-".into()),
                format!("{} {}", a.tcp, dur(a.tcp_seconds)),
                a.startup.as_ref().map_or("-".into(), |s| format!("{}: {} {}", s.outcome, s.detail, dur(s.seconds))),
            ]
        })
        .collect();
    table(o, &["host", "address", "tcp", "startup"], &rows);
}

fn server(o: &mut String, s: &Server) {
    let _ = writeln!(
        o,
        "\nSERVER via {}: PostgreSQL {}, logged in as {} in {} (superuser: {}, pg_read_all_stats: {})",
        s.via,
        s.version,
        s.user,
        dur(s.login_seconds),
        yes(s.superuser),
        yes(s.read_all_stats)
    );
    let _ = writeln!(
        o,
        "  max_connections {} ({} reserved) · client sessions {} · headroom {}{}",
        s.max_connections,
        s.reserved_connections,
        s.client_sessions,
        s.headroom,
        s.role_connection_limit.map_or(String::new(), |l| format!(" · role CONNECTION LIMIT {l}"))
    );
    let _ = writeln!(
        o,
        "  idle_session_timeout {} · idle_in_transaction_session_timeout {} · tcp_keepalives_idle {}",
        opt(s.idle_session_timeout_seconds),
        opt(s.idle_in_transaction_session_timeout_seconds),
        s.tcp_keepalives_idle_seconds.map_or("OS default".to_owned(), dur)
    );
}

fn sessions(o: &mut String, groups: &[SessionGroup]) {
    let _ = writeln!(o, "\nSESSIONS by application_name and state");
    let rows: Vec<Vec<String>> =
        groups.iter().map(|g| vec![show_name(&g.application_name), g.state.clone(), g.count.to_string()]).collect();
    table(o, &["application_name", "state", "count"], &rows);
}

fn stuck(o: &mut String, stuck: &[StuckSession], after_seconds: f64) {
    let _ = writeln!(o, "\nSTUCK: idle in transaction or active for more than {}", dur(after_seconds));
    if stuck.is_empty() {
        let _ = writeln!(o, "  none");
        return;
    }
    let rows: Vec<Vec<String>> = stuck
        .iter()
        .map(|s| {
            vec![
                s.pid.to_string(),
                s.user.clone(),
                show_name(&s.application_name),
                s.state.clone(),
                dur(s.in_state_seconds),
                s.transaction_seconds.map_or("-".into(), dur),
                s.waiting_on.clone().unwrap_or("-".into()),
            ]
        })
        .collect();
    table(o, &["pid", "user", "application_name", "state", "for", "transaction age", "waiting on"], &rows);
}

fn advisory_locks(o: &mut String, holders: &[LockHolder]) {
    let _ = writeln!(o, "\nADVISORY LOCKS by session");
    if holders.is_empty() {
        let _ = writeln!(o, "  none");
        return;
    }
    let rows: Vec<Vec<String>> = holders
        .iter()
        .map(|l| {
            vec![
                l.pid.to_string(),
                l.user.clone(),
                show_name(&l.application_name),
                l.state.clone(),
                l.held.to_string(),
                l.waiting.to_string(),
            ]
        })
        .collect();
    table(o, &["pid", "user", "application_name", "state", "held", "waiting"], &rows);
}

/// The pool's flags, then each hazard found; `none` only when the server's settings were read
/// (without them the lint did not run).
fn hazards(o: &mut String, p: &PoolFlags, found: &[HazardFound], linted: bool) {
    let _ = writeln!(
        o,
        "\nHAZARDS for max_connections={} min_connections={} idle_timeout={} max_lifetime={} acquire_timeout={} replicas={}{}{}",
        p.max_connections,
        p.min_connections,
        opt(p.idle_timeout_seconds),
        opt(p.max_lifetime_seconds),
        dur(p.acquire_timeout_seconds),
        p.replicas,
        p.refresh_every_seconds.map_or(String::new(), |d| format!(" refresh_every={}", dur(d))),
        p.pooler_idle_timeout_seconds.map_or(String::new(), |d| format!(" pooler_idle_timeout={}", dur(d))),
    );
    if found.is_empty() && linted {
        let _ = writeln!(o, "  none");
    }
    for h in found {
        let _ = writeln!(o, "  {}: {}\n    what happens: {}\n    fix: {}", h.hazard, h.detail, h.consequence, h.fix);
    }
}

fn pooler(o: &mut String, p: &Pooler) {
    let _ = writeln!(o, "\nPOOLER: SHOW POOLS");
    match &p.error {
        Some(e) => {
            let _ = writeln!(o, "  failed: {e}");
        }
        None => {
            let header: Vec<&str> = p.columns.iter().map(String::as_str).collect();
            table(o, &header, &p.rows);
        }
    }
}

fn not_seen(o: &mut String, not_seen: &[String]) {
    if !not_seen.is_empty() {
        let _ = writeln!(o, "\nCOULD NOT SEE");
        for n in not_seen {
            let _ = writeln!(o, "  - {n}");
        }
    }
}

fn result(o: &mut String, problems: &[String], took_seconds: f64) {
    if problems.is_empty() {
        let _ = writeln!(o, "\nRESULT: healthy ({})", dur(took_seconds));
    } else {
        let _ = writeln!(o, "\nRESULT: {} problem(s) ({})", problems.len(), dur(took_seconds));
        for p in problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(l, " {c:<w$} ");
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(out, header.to_vec());
    for r in rows {
        line(out, r.iter().map(String::as_str).collect());
    }
}

fn opt(seconds: Option<f64>) -> String {
    seconds.map_or("off".to_owned(), dur)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn show_name(n: &str) -> String {
    if n.is_empty() { "(none)".to_owned() } else { n.to_owned() }
}
