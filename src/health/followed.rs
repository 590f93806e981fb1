//! The hazard lint's settings re-read on poolwatch's dedicated connection, without a new
//! session: what a new session of the pool's role and database would get.
//!
//! A new session takes, for each setting, the first of: its own startup options (`client`),
//! `ALTER ROLE .. IN DATABASE .. SET`, `ALTER ROLE .. SET`, `ALTER DATABASE .. SET`,
//! `ALTER ROLE ALL SET` (all stored in `pg_db_role_setting`, read live), then the server's
//! level (configuration file, command line, default: a reload reaches existing sessions, so
//! `pg_settings` on the dedicated connection shows it live).
//!
//! One thing only a new session shows: the server level of the two timeouts the dedicated
//! connection switches off for itself (`idle_session_timeout`,
//! `idle_in_transaction_session_timeout`; its own `pg_settings` row reads `client`). It is
//! taken from the fresh session the lint opens at start-up and after each reconnect of the
//! dedicated connection, so a `postgresql.conf` change of those two is seen at the next
//! reconnect; every role or database change, and every other server setting, at the next
//! re-read. When the server level is unknown (the fresh session saw a role setting that is
//! now gone), the re-read says so and the lint opens a fresh session once.

use sqlx::PgConnection;
use sqlx::Row;

use crate::health::hazards::ServerSettings;

/// The settings a role, a database or the pool's startup options can change, with their
/// `pg_settings` unit in µs.
const FOLLOWED: [(&str, u64); 3] = [
    ("idle_session_timeout", 1_000),
    ("idle_in_transaction_session_timeout", 1_000),
    ("tcp_keepalives_idle", 1_000_000),
];

/// `pg_settings.source` values below every role and database setting.
const SERVER_LEVEL: [&str; 5] = ["default", "configuration file", "command line", "environment variable", "override"];

/// The source given to a value read with `current_setting` on the dedicated connection (with
/// its unit, e.g. `2h`): its own live value, which a reload updates.
const SHOWN: &str = "shown";

const SETTINGS: &str = "SELECT name, setting, source FROM pg_settings WHERE name IN ('idle_session_timeout', \
     'idle_in_transaction_session_timeout', 'tcp_keepalives_idle', 'max_connections', \
     'superuser_reserved_connections', 'reserved_connections')";

/// What a fresh session of the pool showed for the [`FOLLOWED`] settings (`pg_settings`
/// units), kept for the re-reads on the dedicated connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Baseline {
    /// Set by the pool's own startup options (`source = client`): wins over everything.
    client: [Option<String>; 3],
    /// The server level, when the fresh session showed it (not hidden by a role setting).
    server: [Option<String>; 3],
    /// The role and database the fresh session really had: behind a pooler the options name
    /// the pooler's alias, not the server's database.
    pub(crate) role: Option<String>,
    pub(crate) database: Option<String>,
}

/// One row: name, value, source (`catalog:<scope>` for a `pg_db_role_setting` entry).
type SettingRow = (String, String, String);

async fn rows(conn: &mut PgConnection, sql: String) -> Result<Vec<SettingRow>, sqlx::Error> {
    crate::sqlx_adapter::fetch_all_text(conn, sql)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?, r.try_get::<String, _>(2)?)))
        .collect()
}

/// Reads the settings on a fresh session of the pool (its own role, database and options).
pub(crate) async fn read_fresh(conn: &mut PgConnection) -> Result<(ServerSettings, Baseline), sqlx::Error> {
    let sql = format!(
        "{SETTINGS} UNION ALL SELECT 'rolsuper', rolsuper::text, '' FROM pg_roles WHERE rolname = current_user \
         UNION ALL SELECT 'rolconnlimit', rolconnlimit::text, '' FROM pg_roles WHERE rolname = current_user \
         UNION ALL SELECT 'current_user', current_user::text, '' \
         UNION ALL SELECT 'current_database', current_database()::text, ''"
    );
    Ok(fresh(&rows(conn, sql).await?))
}

/// Re-reads the settings on the dedicated connection for the pool's `role` and `database`;
/// `None`: a value only a new session can show is needed (see the module docs).
pub(crate) async fn read_followed(
    conn: &mut PgConnection,
    role: &str,
    database: &str,
    baseline: &Baseline,
) -> Result<Option<ServerSettings>, sqlx::Error> {
    let (r, d) = (literal(role), literal(database));
    // `current_setting`, not `pg_settings`: the view formats all ~350 settings (about 1 ms
    // of server CPU per read, against 0.1 ms for this whole query).
    let sql = format!(
        "SELECT 'max_connections', current_setting('max_connections'), '' \
         UNION ALL SELECT 'superuser_reserved_connections', current_setting('superuser_reserved_connections'), '' \
         UNION ALL SELECT 'reserved_connections', coalesce(current_setting('reserved_connections', true), '0'), '' \
         UNION ALL SELECT 'tcp_keepalives_idle', current_setting('tcp_keepalives_idle'), '{SHOWN}' \
         UNION ALL SELECT 'rolsuper', rolsuper::text, '' FROM pg_roles WHERE rolname = {r} \
         UNION ALL SELECT 'rolconnlimit', rolconnlimit::text, '' FROM pg_roles WHERE rolname = {r} \
         UNION ALL SELECT split_part(c, '=', 1), substr(c, strpos(c, '=') + 1), 'catalog:' || CASE \
           WHEN s.setdatabase <> 0 AND s.setrole <> 0 THEN 'database user' WHEN s.setrole <> 0 THEN 'user' \
           WHEN s.setdatabase <> 0 THEN 'database' ELSE 'global' END \
         FROM pg_db_role_setting s, unnest(s.setconfig) AS c \
         WHERE s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = {r})) \
           AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = {d}))"
    );
    Ok(followed(&rows(conn, sql).await?, baseline))
}

/// A text literal that no name can break out of (hex digits only in the SQL text).
fn literal(text: &str) -> String {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    format!("convert_from(decode('{hex}', 'hex'), 'UTF8')")
}

fn followed_index(name: &str) -> Option<usize> {
    FOLLOWED.iter().position(|(n, _)| *n == name)
}

fn fresh(rows: &[SettingRow]) -> (ServerSettings, Baseline) {
    let mut s = ServerSettings::default();
    // A setting the server does not have (idle_session_timeout before 14) is off.
    let mut b = Baseline { server: std::array::from_fn(|_| Some("0".to_owned())), ..Baseline::default() };
    for (name, value, source) in rows {
        match name.as_str() {
            "current_user" => b.role = Some(value.clone()),
            "current_database" => b.database = Some(value.clone()),
            _ => s.apply(name, value),
        }
        if let Some(i) = followed_index(name) {
            b.server[i] = SERVER_LEVEL.contains(&source.as_str()).then(|| value.clone());
            b.client[i] = (source == "client").then(|| value.clone());
        }
    }
    (s, b)
}

fn scope_rank(scope: &str) -> u8 {
    match scope {
        "database user" => 4,
        "user" => 3,
        "database" => 2,
        _ => 1,
    }
}

/// The settings a new session would get, from the dedicated connection's rows; pure.
fn followed(rows: &[SettingRow], baseline: &Baseline) -> Option<ServerSettings> {
    let mut s = ServerSettings::default();
    let mut catalog: [Option<(u8, String)>; 3] = Default::default();
    // The dedicated connection switches both timeouts off for itself: their server level
    // comes from the baseline. Anything else missing on the server is off.
    let mut own: [Option<String>; 3] = std::array::from_fn(|i| (i >= 2).then(|| "0".to_owned()));
    for (name, value, source) in rows {
        match (followed_index(name), source.strip_prefix("catalog:")) {
            (Some(i), Some(scope)) => {
                let rank = scope_rank(scope);
                if catalog[i].as_ref().is_none_or(|(r, _)| rank > *r) {
                    catalog[i] = Some((rank, value.clone()));
                }
            }
            (None, Some(_)) => {}
            (Some(i), None) if source == SHOWN => own[i] = Some(to_units(value, FOLLOWED[i].1)?.to_string()),
            (Some(i), None) => own[i] = SERVER_LEVEL.contains(&source.as_str()).then(|| value.clone()),
            (None, None) => s.apply(name, value),
        }
    }
    for (i, (name, _)) in FOLLOWED.iter().enumerate() {
        // Only the winning catalog value is converted (an outranked one never matters); one
        // the lint cannot convert lets a fresh session read it.
        let value = match (baseline.client[i].clone(), catalog[i].take()) {
            (Some(v), _) => v,
            (None, Some((_, v))) => to_units(&v, FOLLOWED[i].1)?.to_string(),
            (None, None) => own[i].take().or_else(|| baseline.server[i].clone())?,
        };
        s.apply(name, &value);
    }
    Some(s)
}

/// A stored setting (`1s`, `500`, `1.5min`) in `unit_us` units, rounded as the server does.
fn to_units(value: &str, unit_us: u64) -> Option<i64> {
    let v = value.trim().trim_matches('\'').trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+'))).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse().ok()?;
    let us: f64 = match unit.trim() {
        "" => unit_us as f64,
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "min" => 6e7,
        "h" => 3.6e9,
        "d" => 8.64e10,
        _ => return None,
    };
    let units = (number * us / unit_us as f64).round();
    // Saturating: `as` clamps a finite float to the i64 range.
    units.is_finite().then_some(units as i64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn row(name: &str, value: &str, source: &str) -> SettingRow {
        (name.to_owned(), value.to_owned(), source.to_owned())
    }

    /// The dedicated connection switches both timeouts off for itself (`client`).
    fn dedicated(extra: &[SettingRow]) -> Vec<SettingRow> {
        let mut rows = vec![row("max_connections", "100", ""), row("tcp_keepalives_idle", "0", SHOWN)];
        rows.extend_from_slice(extra);
        rows
    }

    #[test]
    fn units_convert_like_the_server() {
        assert_eq!(to_units("1s", 1_000), Some(1_000));
        assert_eq!(to_units("1500", 1_000), Some(1_500));
        assert_eq!(to_units("1.5min", 1_000), Some(90_000));
        assert_eq!(to_units("'2h'", 1_000_000), Some(7_200));
        assert_eq!(to_units("500ms", 1_000_000), Some(1));
        assert_eq!(to_units("1 fortnight", 1_000), None);
        assert_eq!(to_units("1e400", 1_000), None);
    }

    #[test]
    fn role_and_database_settings_take_the_server_precedence() {
        let (_, baseline) = fresh(&[row("idle_session_timeout", "60000", "configuration file")]);
        let ist = |extra: &[SettingRow]| followed(&dedicated(extra), &baseline).map(|s| s.idle_session_timeout);
        assert_eq!(ist(&[]), Some(Some(Duration::from_secs(60))), "the server level from the fresh session");
        let db = row("idle_session_timeout", "5s", "catalog:database");
        let role = row("idle_session_timeout", "3s", "catalog:user");
        let both = row("idle_session_timeout", "2s", "catalog:database user");
        let all = row("idle_session_timeout", "9s", "catalog:global");
        assert_eq!(ist(std::slice::from_ref(&all)), Some(Some(Duration::from_secs(9))));
        assert_eq!(ist(&[all.clone(), db.clone()]), Some(Some(Duration::from_secs(5))));
        assert_eq!(ist(&[role.clone(), db.clone(), all]), Some(Some(Duration::from_secs(3))));
        assert_eq!(ist(&[db, both, role]), Some(Some(Duration::from_secs(2))));
        assert_eq!(ist(&[row("idle_session_timeout", "0", "catalog:user")]), Some(None), "a role can switch it off");
        // An outranked value the lint cannot convert never matters: no fresh session for it.
        let odd = row("idle_session_timeout", "1 parsec", "catalog:database");
        assert_eq!(ist(&[odd, row("idle_session_timeout", "4s", "catalog:user")]), Some(Some(Duration::from_secs(4))));
    }

    #[test]
    fn a_reload_is_read_live_and_the_pool_options_win() {
        let (_, baseline) = fresh(&[row("tcp_keepalives_idle", "0", "default")]);
        let s = followed(&dedicated(&[]), &baseline).unwrap();
        assert_eq!((s.tcp_keepalives_idle, s.max_connections), (None, 100));
        let s = followed(&[row("tcp_keepalives_idle", "30s", SHOWN)], &baseline).unwrap();
        assert_eq!(s.tcp_keepalives_idle, Some(Duration::from_secs(30)), "the dedicated session's own live value");
        let (_, pinned) = fresh(&[row("idle_session_timeout", "7000", "client")]);
        let s = followed(&dedicated(&[row("idle_session_timeout", "1s", "catalog:user")]), &pinned).unwrap();
        assert_eq!(s.idle_session_timeout, Some(Duration::from_secs(7)), "the pool's startup option wins");
    }

    #[test]
    fn an_unknown_server_level_asks_for_a_fresh_session() {
        // The fresh session saw a role setting: the server level under it is hidden.
        let (s, baseline) = fresh(&[row("idle_session_timeout", "1000", "user")]);
        assert_eq!(s.idle_session_timeout, Some(Duration::from_secs(1)));
        let role = row("idle_session_timeout", "1s", "catalog:user");
        assert!(followed(&dedicated(std::slice::from_ref(&role)), &baseline).is_some());
        assert_eq!(followed(&dedicated(&[]), &baseline), None, "the role setting is gone");
        assert_eq!(followed(&dedicated(&[row("idle_session_timeout", "1 parsec", "catalog:user")]), &baseline), None);
    }

    #[test]
    fn literals_carry_no_quote() {
        assert_eq!(literal("a'b"), "convert_from(decode('612762', 'hex'), 'UTF8')");
    }
}
