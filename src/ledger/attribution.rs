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
//! pooler's `SHOW CLIENTS` rows ([`Config::pooler_admin`](crate::config::Config::pooler_admin)).
//!
//! Where ports cannot be matched (a NAT or proxy that rewrites them, a unix socket, a system
//! without the socket list), the tag ends in a per-process nonce instead,
//! `<app> pw:<pool>:<nonce>`: exact again, at the old costs. A NAT is declared
//! ([`NetworkPath::Nat`](crate::ledger::attribution::NetworkPath)); unix sockets and non-Linux systems fall back by
//! themselves.
//!
//! The tag rides in the startup packet (no extra round trip). Connections the pool opened
//! before it was instrumented are re-tagged once it settles (closed and reopened behind a pooler);
//! those the app holds all along are not, and a WARN says how many. Every name is printable
//! ASCII, so the server stores exactly what is sent ([`stable_tag`]).
//!
//! # How the census attributes sessions to a pool
//!
//! The census must count exactly the sessions of *this* pool in *this* process, even when two
//! pools in one process use the same database, or when many replicas share one
//! `application_name`, and it must stay cheap for the database, for PgBouncer and for
//! postgres_exporter.
//!
//! 1. **A stable tag per pool.** `instrument_pool` sets the pool's connect options to the
//!    `application_name` `"<your application_name> pw:<pool>"` (at most 63 bytes: PostgreSQL's
//!    limit; your own name stays first and is shortened to fit). It is printable ASCII, so the
//!    server stores exactly what is sent on every version: other characters become `\xNN`
//!    escapes of their UTF-8 bytes (`café` → `caf\xc3\xa9`), and a name cut to fit (a pool name
//!    past 16 bytes, a long app name) ends in `~` and a 6-digit hash of the whole name, so
//!    `orders-primary-rw` and `orders-primary-ro` get two tags. poolwatch reads the stored name
//!    back once and warns if it differs. It is the same on every replica
//!    and every restart: `poolwatch::attribution::stable_tag(Some("api"), "main")` gives
//!    `"api pw:main"` (join fleet metrics on it), `watch.application_name()` the name a watch
//!    uses. It rides in the startup packet (no round trip). Connections the pool opened before
//!    (idle, or still being opened or returned by sqlx's own tasks, as right after `connect_with`)
//!    are re-tagged once the pool settles, all at once under `census_timeout`: with `set_config`
//!    straight to the server; behind a pooler they are closed and reopened instead (PgBouncer
//!    learns a client's name only from a server report, sent only when the value changes).
//!    Connections the app holds all that time cannot be (a WARN gives their count: call
//!    `instrument_pool` right after creating the pool). To rotate credentials, derive the new
//!    options from `pool.connect_options()` (they carry the tag), e.g.
//!    `pool.set_connect_options((*pool.connect_options()).clone().password(new))`; poolwatch's
//!    own connection takes the pool's current options at each connect.
//! 2. **This process, by port.** The census reads this process's own sockets toward the database
//!    (local address and port; Linux) and keeps only the tagged `pg_stat_activity` rows whose
//!    (`client_addr`, `client_port`) is one of them. The tag separates the pools of one process;
//!    the ports separate the process from its replicas (another process's sessions with the same
//!    tag are never counted: `tests/attribution.rs` checks it against a real second process).
//! 3. **A nonce only where ports cannot be matched.** A NAT or TCP proxy that rewrites the client's
//!    address or port must be declared (`Config::network_path(NetworkPath::Nat)`): the tag then
//!    ends in a per-process nonce, `"<app> pw:<pool>:<nonce>"`, and the census counts by tag alone
//!    (exact, at the old costs: `docs/performance.md`). A unix-socket pool, or a system without the socket list,
//!    falls back to the nonce by itself.
//! 4. **Behind a pooler** the server sees the pooler's connections, never the pool's: see
//!    the "Behind a pooler" section of `docs/ledger.md`.
//! 5. The census runs on poolwatch's own dedicated connection (never a pool slot, so it works when
//!    the pool is wedged; connect and `statement_timeout` bounded by `census_timeout`;
//!    `idle_session_timeout` off for that session only) the one query `poolwatch::CENSUS_SQL`. It
//!    reads the pool's `size()` before and after and retries (up to 3 times) when a connection
//!    opened or closed meanwhile, so both sides describe one moment.
//! 6. `poolwatch_phantom_connections = pool.size() - real sessions`. Positive: slots the pool counts
//!    that do not exist (leaked after a server kill, or dead idle connections not yet pinged).
//!    Negative: sessions that exist but the pool no longer counts (e.g. `detach()`ed).
//!
//! `application_name` is visible in `pg_stat_activity` to every role, but `client_addr` and
//! `client_port` of another role's sessions are not without `pg_read_all_stats`. A census role
//! without it cannot match by port: with `replicas` = 1 (the default declaration) the tag alone
//! still counts exactly; with more replicas the phantom gap is not exported. One WARN says so
//! (grant `pg_read_all_stats`); the states then read `unknown`. If the app changes
//! `application_name` on a session, that session leaves the census: don't, or expect the gap to
//! show it.
//!
//! What the stable tag saves behind PgBouncer, against a nonce per process, is measured in
//! `docs/performance.md`.
//!
//! # The client-side ledger's sockets
//!
//! The **client-side ledger** (Linux) runs on every sample, on Tokio's blocking pool (never on a
//! runtime worker). It reads the process's TCP sockets whose peer is the database's address with one
//! netlink `sock_diag` dump whose bytecode filter keeps only that peer (the kernel copies out a
//! handful of sockets, not its whole table), keeps those whose inode is one of `/proc/self/fd`'s
//! (that directory is read only when a socket not seen before shows up), and leaves out poolwatch's
//! own (every watched pool's dedicated connection, the reachability probes, the lint's short-lived
//! connection). Where netlink is refused it falls back to `/proc/self/net/tcp{,6}`
//! (`SocketCensus::source` says which). The server census lists the sockets the same way, also on
//! the blocking pool, and remembers which inodes are the process's, so a census beside thousands
//! of open descriptors does not walk `/proc/self/fd` again. The netlink socket has a 1 s receive
//! timeout; a failed dump is retried on a fresh socket before one read falls back to `/proc`.
//! Sockets are looked up one by one (instead of dumped) only after a read that found exactly the
//! pool's count. `poolwatch_client_gap = pool.size() - established sockets`;
//! a gap is read again 50 ms later (a connection opening or closing disagrees for a moment), and a
//! gap that is still there and differs from the last one runs a server census at once. Each
//! socket is listed with its local and peer address, state and send/receive queue
//! (`snapshot().sockets`, `poolwatch::process_sockets`): match its local port with
//! `pg_stat_activity.client_port`.
//!
//! **Sockets of two pools to the same address** look alike to the kernel. Each server census reads
//! the `client_port` of the pool's own sessions: a socket whose local port a census gave to this
//! pool is this pool's; one a census gave to another pool is not. A socket no census has seen yet
//! (opened since the last one) is *unattributed* (`SocketCensus::unattributed`): it counts for
//! every pool sharing the address, so the client gap can read low there, never high, and it runs a
//! census at once to attribute it. A socket whose session is already gone (`close_wait`) cannot be
//! attributed by any census: it counts in each sharing pool's `close_wait`. Other connections of
//! the app to the same address (a `PgListener`, a raw `PgConnection`) are told apart the same way:
//! each census marks the established sockets that are none of the pool's sessions, and the ledger
//! leaves them out from then on (one opened since reads as a negative gap until the census it runs
//! has seen it). When the sessions' client ports are not the process's own (a pooler or NAT in
//! between), ports tell nothing and every socket to the address counts as the pool's. For
//! unix-socket connections, and off Linux, the client-side ledger is absent.
//!
//! Each server census also lists the process's sockets to the database once (one netlink dump of
//! every TCP state but `listen`, `/proc` where netlink is refused), including those no process
//! holds any more (`time_wait`, `fin_wait*`, `last_ack`: inode 0): the census matches sessions by
//! their local port and tells sessions the peer ended from those the pool closed by them.

use std::hash::{BuildHasher, Hasher};

/// Declared: what lies between the pool and the database server
/// ([`Config::network_path`](crate::config::Config::network_path)). It decides how a server session is
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
    /// pooler's admin console ([`Config::pooler_admin`](crate::config::Config::pooler_admin)), and
    /// without it is not exported.
    Pooler,
}

/// PostgreSQL truncates `application_name` to 63 bytes.
const MAX_APP_NAME: usize = 63;

/// The most bytes of the pool's name a tag carries (a longer name is cut and hashed).
const MAX_POOL_PART: usize = 16;

/// Hex digits of the hash that marks a cut (24 bits: distinct for any handful of names).
const CUT_HASH_LEN: usize = 6;

/// The application names poolwatch uses for one instrumented pool. Every one is printable
/// ASCII of at most 63 bytes: what PostgreSQL stores is then exactly what poolwatch sends, on
/// every version (it replaces other bytes with `?` before 16, with `\xNN` from 16 on).
#[derive(Debug, Clone)]
pub(crate) struct Tag {
    /// The full `application_name` of the pool's connections.
    pub(crate) pool_app_name: String,
    /// The stable part of it ([`stable_tag`]): `pool_app_name` itself unless it carries a nonce.
    pub(crate) stable: String,
    /// The `application_name` of poolwatch's own dedicated connection (never counted).
    pub(crate) census_app_name: String,
    /// The `application_name` of poolwatch's pooler admin-console connection.
    pub(crate) admin_app_name: String,
}

impl Tag {
    /// The tag for `pool_name`: stable, or with a fresh per-process nonce when ports cannot
    /// be matched. poolwatch's own connection gets a stable name in both cases.
    pub(crate) fn new(user_app_name: Option<&str>, pool_name: &str, nonce: bool) -> Tag {
        let pool = pool_part(pool_name);
        // Room for the nonce either way, so the stable tag is the nonce tag without its suffix.
        let user = user_part(user_app_name, format!("pw:{pool}:").len() + NONCE_LEN);
        let stable = format!("{user}pw:{pool}");
        let pool_app_name = match nonce {
            true => format!("{stable}:{}", random_nonce()),
            false => stable.clone(),
        };
        Tag {
            pool_app_name,
            stable,
            census_app_name: format!("poolwatch-census:{pool}"),
            admin_app_name: format!("poolwatch-pooler:{pool}"),
        }
    }
}

/// The stable `application_name` poolwatch gives the connections of `pool_name` when the app
/// set `user_app_name`: `"<user_app_name> pw:<pool_name>"`, as PostgreSQL stores it. Characters
/// outside printable ASCII become `\xNN` escapes of their UTF-8 bytes (in the pool name also
/// spaces and backslashes); a pool name longer than 16 bytes is cut to 9 and ends in `~` and a
/// 6-digit hash of the whole name, and your name is cut the same way to fit PostgreSQL's 63
/// bytes, so two names never share a tag by being cut. The same on every replica and restart:
/// join fleet metrics (postgres_exporter's `pg_stat_activity` by `application_name`) on it.
/// `PoolWatch::application_name` gives the name a running watch uses.
///
/// ```
/// use poolwatch::attribution::stable_tag;
/// assert_eq!(stable_tag(Some("api"), "main"), "api pw:main");
/// assert_eq!(stable_tag(Some("café-api ☕"), "main"), r"caf\xc3\xa9-api \xe2\x98\x95 pw:main");
/// assert_ne!(stable_tag(None, "orders-primary-rw"), stable_tag(None, "orders-primary-ro"));
/// ```
pub fn stable_tag(user_app_name: Option<&str>, pool_name: &str) -> String {
    Tag::new(user_app_name, pool_name, false).pool_app_name
}

/// The user's part of a tag, followed by a space (empty without a name), leaving `suffix`
/// bytes of the 63 for poolwatch's part.
fn user_part(user_app_name: Option<&str>, suffix: usize) -> String {
    // A pool instrumented again keeps the user's name, not a tag on a tag.
    match user_app_name.map(without_tag).map(str::trim).filter(|s| !s.is_empty()) {
        Some(user) => {
            let room = MAX_APP_NAME.saturating_sub(suffix + 1);
            format!("{} ", cut_with_hash(&escape(user, false), user, room))
        }
        None => String::new(),
    }
}

/// The pool's name as a tag carries it: escaped, and cut with a hash past 16 bytes.
fn pool_part(pool_name: &str) -> String {
    cut_with_hash(&escape(pool_name, true), pool_name, MAX_POOL_PART)
}

/// `s` in printable ASCII: every other byte as `\xNN` (PostgreSQL 16's own escape), and with
/// `strict` also spaces and backslashes (a tag's pool part is one word, read back unambiguously).
pub(crate) fn escape(s: &str, strict: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        let plain = if strict { b.is_ascii_graphic() && b != b'\\' } else { b == b' ' || b.is_ascii_graphic() };
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `escaped` itself when it fits in `max` bytes; else its head, `~` and a hash of `original`.
fn cut_with_hash(escaped: &str, original: &str, max: usize) -> String {
    if escaped.len() <= max {
        return escaped.to_owned();
    }
    let head = max.saturating_sub(CUT_HASH_LEN + 1);
    // All ASCII: any byte offset is a char boundary.
    let head = escaped.get(..head).unwrap_or_default().trim_end();
    format!("{head}~{:0width$x}", fnv1a(original) & 0xff_ffff, width = CUT_HASH_LEN)
}

/// FNV-1a: a hash that is the same in every process, build and Rust version (the tag must be).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The part of a pool's `application_name` that is the same in every replica and across
/// restarts: `<your application_name> pw:<pool>`, without a per-process suffix. The fleet
/// join (`alerts/fleet-gap.rules.yml`) matches it with the `application_name` label of the
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

/// Reads back, on poolwatch's own connection, how the server stores its name and `pool_tag`
/// (set for one statement only), and warns once for each that differs from what poolwatch
/// sends: the census would then match no session of the pool.
pub(crate) async fn verify_stored(conn: &mut sqlx::PgConnection, own: &str, pool_tag: &str) {
    let read = sqlx::query_as::<_, (String, String)>(
        "SELECT current_setting('application_name'), set_config('application_name', $1, true)",
    )
    .bind(pool_tag)
    .fetch_one(conn)
    .await;
    match read {
        Ok((stored_own, stored_tag)) => {
            for (sent, stored) in [(own, stored_own), (pool_tag, stored_tag)] {
                if sent != stored {
                    tracing::warn!(
                        sent,
                        stored,
                        "the server stores this application_name differently from what poolwatch sends; \
                         the census cannot match the pool's sessions by it. Report it to poolwatch with the \
                         server's version."
                    );
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not read back the stored application_name"),
    }
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
        assert_eq!(Tag::new(None, "main", false).admin_app_name, "poolwatch-pooler:main");
        assert_eq!(without_tag(&a.pool_app_name), "api");
        assert_eq!(without_tag(&Tag::new(None, "main", true).pool_app_name), "");
        assert_eq!(without_tag("api pw:main"), "api");
        assert_eq!(without_tag("api pw:main:nothex"), "api pw:main:nothex");
        assert_eq!(without_tag("api"), "api");
    }

    /// What PostgreSQL 15 stores (`pg_clean_ascii`: `?` for every byte outside 32..=126),
    /// 16+ (`\xNN` escapes), both cut to 63 bytes.
    fn stored_15(s: &str) -> String {
        let clean: String = s.bytes().map(|b| if (32..=126).contains(&b) { char::from(b) } else { '?' }).collect();
        clean.chars().take(MAX_APP_NAME).collect()
    }
    fn stored_16(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            if (32..=126).contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out.chars().take(MAX_APP_NAME).collect()
    }

    #[test]
    fn every_name_is_stored_as_sent_on_every_version() {
        let users = [None, Some("api"), Some("café-api ☕"), Some(&*"é".repeat(60)), Some("a\tb\u{7f}"), Some("x\\y")];
        let pools = ["main", "orders-primary-rw", "заказы", "a b", "p\\x20", &"p".repeat(64), "日本語のプール名"];
        for user in users {
            for pool in pools {
                for nonce in [false, true] {
                    let t = Tag::new(user, pool, nonce);
                    for name in [&t.pool_app_name, &t.stable, &t.census_app_name, &t.admin_app_name] {
                        assert!(name.len() <= MAX_APP_NAME, "{name:?}");
                        assert_eq!(stored_15(name), *name, "{user:?} {pool:?}");
                        assert_eq!(stored_16(name), *name, "{user:?} {pool:?}");
                    }
                    assert_eq!(fleet_tag(&t.pool_app_name), t.stable);
                    if !nonce {
                        // Instrumented again: the same tag, not a tag on a tag.
                        assert_eq!(Tag::new(Some(&t.pool_app_name), pool, false).stable, t.stable, "{user:?} {pool:?}");
                    }
                }
            }
        }
        assert_eq!(stable_tag(Some("café-api ☕"), "main"), r"caf\xc3\xa9-api \xe2\x98\x95 pw:main");
        assert_eq!(stable_tag(None, "a b"), r"pw:a\x20b");
        assert_ne!(stable_tag(None, "a b"), stable_tag(None, r"a\x20b"), "the escape is not ambiguous");
    }

    #[test]
    fn cut_names_never_share_a_tag() {
        let (rw, ro) = (stable_tag(None, "orders-primary-rw"), stable_tag(None, "orders-primary-ro"));
        assert_ne!(rw, ro);
        assert!(rw.starts_with("pw:orders-pr~") && rw.len() == "pw:".len() + MAX_POOL_PART, "{rw}");
        assert_eq!(rw, stable_tag(None, "orders-primary-rw"), "stable");
        assert_eq!(stable_tag(None, "exactly-16-bytes"), "pw:exactly-16-bytes", "no cut at 16");
        let long_user = |tail: &str| stable_tag(Some(&format!("{}{tail}", "u".repeat(70))), "main");
        assert_ne!(long_user("a"), long_user("b"), "a cut user name is hashed too");
        assert_eq!(long_user("a").len(), MAX_APP_NAME - 1 - NONCE_LEN, "room left for a nonce");
        // The hash is fixed (FNV-1a), whatever the process or Rust version.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
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
