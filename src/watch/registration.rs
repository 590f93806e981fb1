//! The live-pool registry and tagging: a pool is watched by at most one live [`PoolWatch`]
//! in this process, and its connections carry a tag that names it on the server.
//!
//! [`PoolWatch`]: crate::watch::PoolWatch

use sqlx::PgPool;

use crate::config::{Config, ConfigError};
use crate::ledger::attribution::{self, NetworkPath, Tag};
use crate::registry;

/// The `application_name` tag of a pool watched by a live [`PoolWatch`] in this process, with
/// its pool name (a [`registry`](crate::registry) table): a pool is watched by at most one,
/// and a tag names one pool.
#[derive(Debug)]
struct Live {
    tag: String,
    pool_name: String,
}

/// A pool as registered: its tag and how its sessions are attributed.
#[derive(Debug)]
pub(super) struct Registered {
    pub(super) tag: Tag,
    pub(super) path: NetworkPath,
    /// Ports cannot be matched: the tag carries a per-process nonce.
    pub(super) nonce: bool,
}

/// Registers `pool` under `config`'s name and tags its connections. Checked and tagged under
/// one lock, so two racing calls cannot both succeed.
pub(super) fn register(pool: &PgPool, config: &Config) -> Result<Registered, ConfigError> {
    let mut live = registry::lock::<Live>();
    let options = pool.connect_options();
    let current = options.get_application_name();
    if current.is_some_and(|name| live.iter().any(|l| l.tag == name)) {
        return Err(ConfigError::new(
            "pool",
            format!(
                "is already instrumented by a live PoolWatch (its connections are tagged {:?}); a second \
                 watch would re-tag them and the first would count none of its sessions (a false leak)",
                current.unwrap_or_default()
            ),
            "keep one PoolWatch per pool and share it (or its pool() handle); to re-instrument, drop or \
             shut down the first PoolWatch before calling instrument_pool again",
        ));
    }
    let path = network_path(&options, config);
    let unix = options.get_socket().is_some() || options.get_host().starts_with('/');
    // Ports cannot be matched through a NAT, over a unix socket, or without the socket list.
    let nonce = path == NetworkPath::Nat || (path == NetworkPath::Direct && (unix || !cfg!(target_os = "linux")));
    let tag = Tag::new(current.map(attribution::without_tag), &config.pool_name, nonce);
    if let Some(other) = live.iter().find(|l| l.tag == tag.pool_app_name) {
        return Err(shared_tag(&config.pool_name, &other.pool_name, &tag.pool_app_name));
    }
    pool.set_connect_options((*options).clone().application_name(&tag.pool_app_name));
    live.push(Live { tag: tag.pool_app_name.clone(), pool_name: config.pool_name.clone() });
    Ok(Registered { tag, path, nonce })
}

/// The pool tagged `app_name` may be instrumented again from now on.
pub(super) fn unregister(app_name: &str) {
    registry::lock::<Live>().retain(|l| l.tag != app_name);
}

/// The error for a pool whose tag another live watch of this process already uses.
fn shared_tag(pool_name: &str, other: &str, tag: &str) -> ConfigError {
    if pool_name == other {
        // The stable tag is per pool name: two pools of one process under one name would
        // count each other's sessions.
        return ConfigError::new(
            "pool_name",
            format!("{pool_name:?} is already used by another live PoolWatch in this process"),
            "give each pool its own name, e.g. Config::new(\"main\") and Config::new(\"jobs\")",
        );
    }
    ConfigError::new(
        "pool_name",
        format!(
            "{pool_name:?} and the live pool {other:?} would share the application_name {tag:?} (pool names are \
             cut to 16 bytes with a 6-digit hash of the whole name): each would count the other's sessions"
        ),
        "give the two pools names that differ within their first 9 characters",
    )
}

/// The declared network path, or the one inferred from the config (see `Config::network_path`).
fn network_path(options: &sqlx::postgres::PgConnectOptions, config: &Config) -> NetworkPath {
    if let Some(path) = config.deployment.network_path {
        return path;
    }
    if config.deployment.pooler_admin.is_some() {
        return NetworkPath::Pooler;
    }
    let elsewhere = config
        .deployment
        .direct_connect_options
        .as_ref()
        .is_some_and(|d| d.0.get_host() != options.get_host() || d.0.get_port() != options.get_port());
    if elsewhere { NetworkPath::Pooler } else { NetworkPath::Direct }
}
