//! The human form of the report: plain aligned tables.

use std::fmt::Write;

use crate::report::Report;
use crate::text::dur;

fn opt(seconds: Option<f64>) -> String {
    seconds.map_or("off".to_owned(), dur)
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

pub(crate) fn human(r: &Report) -> String {
    let mut o = String::new();
    let t = &r.target;
    let _ = writeln!(
        o,
        "poolwatch doctor: {} as {} on database {} (password {})",
        t.hosts.join(","),
        t.user,
        t.database,
        if t.password_given { "given, not shown" } else { "none" }
    );

    let _ = writeln!(o, "\nADDRESSES (TCP connect, then PostgreSQL startup up to authentication)");
    let rows: Vec<Vec<String>> = r
        .addresses
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
    table(&mut o, &["host", "address", "tcp", "startup"], &rows);

    if let Some(s) = &r.server {
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

        let _ = writeln!(o, "\nSESSIONS by application_name and state");
        let rows: Vec<Vec<String>> = r
            .sessions
            .iter()
            .map(|g| vec![show_name(&g.application_name), g.state.clone(), g.count.to_string()])
            .collect();
        table(&mut o, &["application_name", "state", "count"], &rows);

        let _ = writeln!(o, "\nSTUCK: idle in transaction or active for more than {}", dur(r.stuck_after_seconds));
        if r.stuck.is_empty() {
            let _ = writeln!(o, "  none");
        } else {
            let rows: Vec<Vec<String>> = r
                .stuck
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
            table(&mut o, &["pid", "user", "application_name", "state", "for", "transaction age", "waiting on"], &rows);
        }

        let _ = writeln!(o, "\nADVISORY LOCKS by session");
        if r.advisory_locks.is_empty() {
            let _ = writeln!(o, "  none");
        } else {
            let rows: Vec<Vec<String>> = r
                .advisory_locks
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
            table(&mut o, &["pid", "user", "application_name", "state", "held", "waiting"], &rows);
        }
    }

    let p = &r.pool;
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
    if r.hazards.is_empty() && r.server.is_some() {
        let _ = writeln!(o, "  none");
    }
    for h in &r.hazards {
        let _ = writeln!(o, "  {}: {}\n    what happens: {}\n    fix: {}", h.hazard, h.detail, h.consequence, h.fix);
    }

    if let Some(p) = &r.pooler {
        let _ = writeln!(o, "\nPOOLER: SHOW POOLS");
        match &p.error {
            Some(e) => {
                let _ = writeln!(o, "  failed: {e}");
            }
            None => {
                let header: Vec<&str> = p.columns.iter().map(String::as_str).collect();
                table(&mut o, &header, &p.rows);
            }
        }
    }

    if !r.not_seen.is_empty() {
        let _ = writeln!(o, "\nCOULD NOT SEE");
        for n in &r.not_seen {
            let _ = writeln!(o, "  - {n}");
        }
    }

    if r.problems.is_empty() {
        let _ = writeln!(o, "\nRESULT: healthy ({})", dur(r.took_seconds));
    } else {
        let _ = writeln!(o, "\nRESULT: {} problem(s) ({})", r.problems.len(), dur(r.took_seconds));
        for p in &r.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn show_name(n: &str) -> String {
    if n.is_empty() { "(none)".to_owned() } else { n.to_owned() }
}
