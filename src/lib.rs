//! # poolwatch
//!
//! Makes sqlx Postgres connection-pool failures visible before they take a service down.
//! poolwatch compares what the pool *believes* (connections open, checked out, idle) with
//! what *really exists* (the server's `pg_stat_activity`, the process's own sockets) and
//! publishes both, and the gap, through the [`metrics`] facade.
//!
//! ```no_run
//! # use poolwatch::sqlx;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sqlx::postgres::PgPoolOptions;
//! let pool = PgPoolOptions::new().max_connections(20).connect("postgres://app@db/app").await?;
//! let watch = poolwatch::instrument_pool(&pool, poolwatch::Config::new("main"))?; // keep `watch` alive
//! # drop(watch); Ok(()) }
//! ```
//!
//! poolwatch only emits: install a recorder in the app (`export::Exporter` with feature
//! `prometheus`, or any `metrics` recorder given poolwatch's buckets; see [`export`]).
//! Every metric is listed once in [`catalog`].
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
// docs.rs (nightly, `--cfg docsrs`): a badge naming the feature on each feature-gated item.
#![cfg_attr(docsrs, feature(doc_cfg))]

// The sqlx version seam: every `use sqlx::..` in the crate names the sqlx chosen by the
// `sqlx-0_9` / `sqlx-0_8` feature; `sqlx_adapter` hides what differs between them.
/// The sqlx this build uses (0.9 or 0.8, by feature); tests and examples `use poolwatch::sqlx;`.
#[cfg(all(feature = "sqlx-0_8", not(feature = "sqlx-0_9")))]
pub extern crate sqlx08 as sqlx;
/// The sqlx this build uses (0.9 or 0.8, by feature); tests and examples `use poolwatch::sqlx;`.
#[cfg(feature = "sqlx-0_9")]
pub extern crate sqlx09 as sqlx;
mod sqlx_adapter;

mod acquire;
pub mod catalog;
mod cause;
mod config;
mod direct;
pub mod export;
mod health;
mod ledger;
mod listener;
mod publish;
mod quiet;
mod registry;
mod schedule;
mod server_version;
#[cfg(feature = "telemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "telemetry")))]
pub mod telemetry;
mod watch;

pub use health::{hazards, reach, report};
pub use ledger::attribution;

pub use acquire::bare::{instrument_options_named, sqlx_acquire_layer};
pub use acquire::probe::instrument_options;
pub use acquire::stamps::mark_connected;
pub use acquire::watched_pool::{Watched, WatchedConnection, WatchedPool, WatchedTransaction};
pub use cause::Cause;
pub use config::{Config, ConfigError, Deployment, Detail, DirectOptions, PoolerAdmin};
pub use health::heartbeat::{Diagnosis, HeartbeatFigures, PATHS, PathFigures};
pub use health::progress::Progress;
pub use ledger::census::{CENSUS_SQL, SESSION_STATES, ServerCensus};
pub use ledger::pooler::PoolerFigures;
pub use ledger::snapshot::{CloseReason, LifecycleFigures};
pub use ledger::snapshot::{PoolFigures, Snapshot};
pub use ledger::sockets::{
    ClientSocket, SocketCensus, SocketQueue, SocketReader, SocketSource, TCP_STATES, process_sockets,
};
pub use listener::status::ListenerHealth;
pub use listener::watched::{ListenerConfig, WatchedListener};
pub use watch::{PoolWatch, instrument_pool};

/// Hooks for poolwatch's own tests (other crates): not part of the API, and may change in any
/// release.
#[doc(hidden)]
pub mod internals {
    pub use crate::schedule::Fault;
    pub use crate::server_version::pretend_server_version;
    pub use crate::sqlx_adapter::fetch_all_text;

    /// An `Exporter`'s `/metrics` listener on `addr` with its own recorder, not installed
    /// (tests that hold its connections must not starve the installed one). Call it inside a
    /// Tokio runtime; the listener stops when the returned task is aborted.
    #[cfg(feature = "prometheus")]
    pub fn metrics_listener(
        addr: std::net::SocketAddr,
    ) -> Result<(crate::export::PrometheusRecorder, tokio::task::JoinHandle<()>), crate::ConfigError> {
        let field = crate::export::ListenField { name: "metrics_listener", fix: "choose a free port" };
        crate::export::Exporter::new().serve_on(addr, field)
    }

    /// `Exporter`'s `/metrics` listener serving `handle` on `listener`, until dropped (the
    /// scrape bench measures it against other listeners on the same recorder).
    #[cfg(feature = "prometheus")]
    pub async fn serve_metrics(listener: tokio::net::TcpListener, handle: crate::export::PrometheusHandle) {
        crate::export::serve(listener, handle).await;
    }
}

/// The README's and docs' Rust examples, compiled as doctests.
#[cfg(doctest)]
mod doc_examples {
    // The README's setup uses the `prometheus` feature (CI runs doctests with every feature).
    #[cfg(feature = "prometheus")]
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/listener.md")]
    struct Listener;
    #[doc = include_str!("../docs/heartbeat.md")]
    struct Heartbeat;
    #[doc = include_str!("../docs/progress.md")]
    struct Progress;
    #[doc = include_str!("../docs/acquire.md")]
    struct Acquire;
    #[doc = include_str!("../docs/lifecycle.md")]
    struct Lifecycle;
    #[cfg(feature = "telemetry")]
    #[doc = include_str!("../docs/telemetry.md")]
    struct Telemetry;
    #[doc = include_str!("../docs/ledger.md")]
    struct Ledger;
    #[doc = include_str!("../docs/library-pools.md")]
    struct LibraryPools;
    #[doc = include_str!("../docs/oncall.md")]
    struct Oncall;
}
