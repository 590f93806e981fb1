//! How a server session is attributed to one pool of one process.
//!
//! Every connection the pool opens carries a **stable** `application_name`:
//! `<your application_name> pw:<pool>` ([`stable_tag`]), the same on every replica and every
//! restart. Being stable, it never multiplies postgres_exporter's per-`application_name`
//! series, and behind PgBouncer in transaction mode every client of the pool carries the name
//! the server connection already has, so PgBouncer sends no `SET application_name` when it
//! hands a server connection over. The tag tells the pools of one process apart; the process
//! is told apart from its replicas by matching `pg_stat_activity`'s (`client_addr`,
//! `client_port`) to the local address and port of this process's own sockets toward the
//! database (the socket census's per-socket list), or, behind a pooler, the
//! pooler's `SHOW CLIENTS` rows ([`Config::pooler_admin`](crate::Config::pooler_admin)).
//!
//! Where ports cannot be matched (a NAT or proxy that rewrites them, a unix socket, a system
//! without the socket list), the tag ends in a per-process nonce instead,
//! `<app> pw:<pool>:<nonce>`: exact again, at the old costs. A NAT is declared
//! ([`NetworkPath::Nat`](crate::NetworkPath)); unix sockets and non-Linux systems fall back by
//! themselves.
//!
//! The tag rides in the startup packet (no extra round trip). Connections that were already
//! idle in the pool when it was instrumented are re-tagged once with `set_config`; those
//! checked out at that moment are not, and a WARN says how many.

use std::hash::{BuildHasher, Hasher};

/// Declared: what lies between the pool and the database server
/// ([`Config::network_path`](crate::Config::network_path)). It decides how a server session is
/// attributed to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NetworkPath {
    /// The pool connects to PostgreSQL itself (TCP), without address translation: the server's
    /// `client_addr`/`client_port` are this process's local address and port. Stable tag,
    /// matched by port.
    Direct,
    /// A NAT or TCP proxy between the pool and the server rewrites client addresses or ports:
    /// the tag carries a per-process nonce (a new `application_name` per process start).
    Nat,
    /// The pool goes through a connection pooler (PgBouncer, Supavisor, ...): the server sees
    /// the pooler's connections, never the pool's. Stable tag; the phantom gap comes from the
    /// pooler's admin console ([`Config::pooler_admin`](crate::Config::pooler_admin)), and
    /// without it is not exported.
    Pooler,
}

/// PostgreSQL truncates `application_name` to 63 bytes.
const MAX_APP_NAME: usize = 63;

/// The application names poolwatch uses for one instrumented pool.
#[derive(Debug, Clone)]
pub(crate) struct Tag {
    /// The full `application_name` of the pool's connections.
    pub(crate) pool_app_name: String,
    /// The stable part of it ([`stable_tag`]): `pool_app_name` itself unless it carries a nonce.
    pub(crate) stable: String,
    /// The `application_name` of poolwatch's own dedicated connection (never counted).
    pub(crate) census_app_name: String,
}

impl Tag {
    /// The tag for `pool_name`: stable, or with a fresh per-process nonce when ports cannot
    /// be matched. poolwatch's own connection gets a stable name in both cases.
    pub(crate) fn new(user_app_name: Option<&str>, pool_name: &str, nonce: bool) -> Tag {
        let pool: String = pool_name.chars().take(16).collect();
        let stable = with_user_name(user_app_name, &format!("pw:{pool}"));
        let pool_app_name = match nonce {
            true => with_user_name(user_app_name, &format!("pw:{pool}:{}", random_nonce())),
            false => stable.clone(),
        };
        Tag { pool_app_name, stable, census_app_name: format!("poolwatch-census:{pool}") }
    }
}

/// The stable `application_name` poolwatch gives the connections of `pool_name` when the app
/// set `user_app_name`: `"<user_app_name> pw:<pool_name>"` (pool name cut to 16 characters,
/// your name shortened to fit PostgreSQL's 63 bytes). The same on every replica and restart:
/// join fleet metrics (postgres_exporter's `pg_stat_activity` by `application_name`) on it.
/// `PoolWatch::application_name` gives the name a running watch uses.
pub fn stable_tag(user_app_name: Option<&str>, pool_name: &str) -> String {
    Tag::new(user_app_name, pool_name, false).pool_app_name
}

fn with_user_name(user_app_name: Option<&str>, suffix: &str) -> String {
    // A pool instrumented again keeps the user's name, not a tag on a tag.
    match user_app_name.map(without_tag).map(str::trim).filter(|s| !s.is_empty()) {
        Some(user) => format!("{} {suffix}", truncate(user, MAX_APP_NAME - suffix.len() - 1)),
        None => suffix.to_owned(),
    }
}

/// The part of a pool's `application_name` that is the same in every replica and across
/// restarts: `<your application_name> pw:<pool>`, without a per-process suffix. The fleet
/// join (`alerts/fleet.rules.yml`) matches it with the `application_name` label of the
/// postgres_exporter query in `alerts/postgres_exporter/queries.yaml`, which strips the same
/// suffix; `poolwatch_pool_info` carries it. A name without poolwatch's tag is returned whole.
///
/// ```
/// use poolwatch::attribution::fleet_tag;
/// assert_eq!(fleet_tag("api pw:main:0123456789"), "api pw:main");
/// assert_eq!(fleet_tag("api pw:main"), "api pw:main");
/// assert_eq!(fleet_tag("psql"), "psql");
/// ```
pub fn fleet_tag(application_name: &str) -> &str {
    let Some(at) = application_name.rfind("pw:") else { return application_name };
    match application_name.rsplit_once(':') {
        Some((head, nonce))
            if head.len() > at + 3
                && nonce.len() == NONCE_LEN
                && nonce.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            head
        }
        _ => application_name,
    }
}

/// Hex digits of the per-process suffix (40 random bits).
const NONCE_LEN: usize = 10;

/// `app_name` without a poolwatch tag at its end (a pool instrumented again after its first
/// watch was dropped keeps one tag, not two).
pub(crate) fn without_tag(app_name: &str) -> &str {
    let (head, last) = app_name.rsplit_once(' ').unwrap_or(("", app_name));
    let mut parts = last.split(':');
    // `pw:<pool>` (stable) or `pw:<pool>:<nonce>` (10 hex digits).
    let tagged = parts.next() == Some("pw")
        && parts.next().is_some_and(|pool| !pool.is_empty())
        && parts.next().is_none_or(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts.next().is_none();
    if tagged { head } else { app_name }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn random_nonce() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_tags_are_stable_nonces_are_unique_all_fit_postgres_limit() {
        assert_eq!(stable_tag(Some("api"), "main"), "api pw:main");
        assert_eq!(stable_tag(None, "main"), "pw:main");
        assert_eq!(Tag::new(Some("api"), "main", false).pool_app_name, stable_tag(Some("api"), "main"));
        assert_ne!(stable_tag(Some("api"), "main"), stable_tag(Some("api"), "other"));
        assert_eq!(stable_tag(Some("api pw:main"), "main"), "api pw:main", "no tag on a tag");
        assert_eq!(stable_tag(Some("pw:main"), "main"), "pw:main");
        let a = Tag::new(Some("api"), "main", true);
        let b = Tag::new(Some("api"), "main", true);
        assert_ne!(a.pool_app_name, b.pool_app_name);
        assert!(a.pool_app_name.starts_with("api pw:main:"));
        assert!(stable_tag(Some(&"é".repeat(60)), &"p".repeat(64)).len() <= MAX_APP_NAME);
        let long = Tag::new(Some(&"é".repeat(60)), &"p".repeat(64), true);
        assert!(long.pool_app_name.len() <= MAX_APP_NAME, "{}", long.pool_app_name.len());
        assert!(long.census_app_name.len() <= MAX_APP_NAME);
        assert_ne!(long.pool_app_name, long.census_app_name);
        assert_eq!(without_tag(&a.pool_app_name), "api");
        assert_eq!(without_tag(&Tag::new(None, "main", true).pool_app_name), "");
        assert_eq!(without_tag("api pw:main"), "api");
        assert_eq!(without_tag("api pw:main:nothex"), "api pw:main:nothex");
        assert_eq!(without_tag("api"), "api");
    }

    #[test]
    fn the_fleet_tag_drops_only_the_per_process_suffix() {
        let a = Tag::new(Some("api"), "main", true);
        let b = Tag::new(Some("api"), "main", true);
        assert_eq!(fleet_tag(&a.pool_app_name), "api pw:main");
        assert_eq!(fleet_tag(&a.pool_app_name), fleet_tag(&b.pool_app_name));
        assert_eq!(fleet_tag(&a.pool_app_name), stable_tag(Some("api"), "main"), "the stable tag");
        assert_eq!(a.stable, stable_tag(Some("api"), "main"));
        assert_eq!(fleet_tag(&Tag::new(None, "a:b", false).pool_app_name), "pw:a:b");
        assert_eq!(fleet_tag("pw:a:b"), "pw:a:b", "a pool name with a colon is not a suffix");
        assert_eq!(fleet_tag("x pw:0123456789"), "x pw:0123456789", "no pool part before it");
        assert_eq!(fleet_tag("poolwatch-census:main:0123456789"), "poolwatch-census:main:0123456789");
    }
}
