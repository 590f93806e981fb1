//! How a server session is attributed to one pool of one process.
//!
//! poolwatch gives every connection the pool opens an `application_name` that ends in a tag
//! unique to this pool in this process: `<your application_name> pw:<pool>:<nonce>`, where
//! the nonce is 40 random bits drawn at [`instrument_pool`](crate::instrument_pool). The
//! census counts `pg_stat_activity` rows with exactly that name, so two pools in one process,
//! or many replicas that share one `application_name`, never count each other's sessions.
//! The tag rides in the startup packet (no extra round trip). Connections that were already
//! idle in the pool when it was instrumented are re-tagged once with `set_config`; those
//! checked out at that moment are not, and a WARN says how many.

use std::hash::{BuildHasher, Hasher};

/// PostgreSQL truncates `application_name` to 63 bytes.
const MAX_APP_NAME: usize = 63;

/// The application names poolwatch uses for one instrumented pool.
#[derive(Debug, Clone)]
pub(crate) struct Tag {
    /// The full `application_name` of the pool's connections.
    pub(crate) pool_app_name: String,
    /// The `application_name` of poolwatch's own dedicated connection (never counted).
    pub(crate) census_app_name: String,
}

impl Tag {
    /// A fresh tag for `pool_name`, keeping as much of the user's `application_name` as fits.
    pub(crate) fn new(user_app_name: Option<&str>, pool_name: &str) -> Tag {
        let nonce = random_nonce();
        let pool: String = pool_name.chars().take(16).collect();
        let suffix = format!("pw:{pool}:{nonce}");
        let pool_app_name = match user_app_name.map(str::trim).filter(|s| !s.is_empty()) {
            Some(user) => format!("{} {suffix}", truncate(user, MAX_APP_NAME - suffix.len() - 1)),
            None => suffix,
        };
        Tag { pool_app_name, census_app_name: format!("poolwatch-census:{pool}:{nonce}") }
    }
}

/// `app_name` without a poolwatch tag at its end (a pool instrumented again after its first
/// watch was dropped keeps one tag, not two).
pub(crate) fn without_tag(app_name: &str) -> &str {
    let (head, last) = app_name.rsplit_once(' ').unwrap_or(("", app_name));
    let mut parts = last.split(':');
    let tagged = parts.next() == Some("pw")
        && parts.next().is_some()
        && parts.next().is_some_and(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_hexdigit()))
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
    fn tags_are_unique_and_fit_postgres_limit() {
        let a = Tag::new(Some("api"), "main");
        let b = Tag::new(Some("api"), "main");
        assert_ne!(a.pool_app_name, b.pool_app_name);
        assert!(a.pool_app_name.starts_with("api pw:main:"));
        let long = Tag::new(Some(&"é".repeat(60)), &"p".repeat(64));
        assert!(long.pool_app_name.len() <= MAX_APP_NAME, "{}", long.pool_app_name.len());
        assert!(long.census_app_name.len() <= MAX_APP_NAME);
        assert_ne!(long.pool_app_name, long.census_app_name);
        assert_eq!(without_tag(&a.pool_app_name), "api");
        assert_eq!(without_tag(&Tag::new(None, "main").pool_app_name), "");
        assert_eq!(without_tag("api pw:main"), "api pw:main");
    }
}
