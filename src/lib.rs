//! # poolwatch
//!
//! Makes sqlx Postgres connection-pool failures visible before they take a service down.
//! poolwatch compares what the pool *believes* (connections open, checked out, idle) with
//! what *really exists* (the server's `pg_stat_activity`, the process's own sockets) and
//! publishes both, and the gap, through the [`metrics`] facade.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sqlx::postgres::PgPoolOptions;
//! let pool = PgPoolOptions::new().max_connections(20).connect("postgres://app@db/app").await?;
//! let watch = poolwatch::instrument_pool(&pool, poolwatch::Config::new("main"))?; // keep `watch` alive
//! # drop(watch); Ok(()) }
//! ```
//!
//! poolwatch only emits: install a recorder (e.g. `metrics-exporter-prometheus`) in the app.
//! Every metric is listed once in [`catalog`].
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod acquire_spans;
pub mod attribution;
pub mod catalog;
mod cause;
mod census;
mod config;
mod direct;
mod gauges;
pub mod hazards;
mod heartbeat;
mod leak;
mod listener;
mod loss;
mod probe;
mod progress;
pub mod reach;
mod snapshot;
mod sockets;
#[cfg(feature = "telemetry")]
pub mod telemetry;
mod watch;
mod watched_pool;

pub use cause::Cause;
pub use census::{CENSUS_SQL, SESSION_STATES, ServerCensus};
pub use config::{Config, ConfigError};
pub use hazards::{Finding, Hazard, ServerSettings};
pub use heartbeat::{Diagnosis, DirectOptions, HeartbeatFigures, PATHS, PathFigures};
pub use listener::{ListenerConfig, WatchedListener};
pub use probe::{instrument_options, mark_connected};
pub use progress::Progress;
pub use reach::{AddressFigures, Reachability, probe_addresses, probe_host};
pub use snapshot::{PoolFigures, Snapshot};
pub use sockets::{SocketCensus, TCP_STATES};
pub use watch::{PoolWatch, instrument_pool};
pub use watched_pool::{Watched, WatchedConnection, WatchedPool, WatchedTransaction};

/// The README's and docs' Rust examples, compiled as doctests.
#[cfg(doctest)]
mod doc_examples {
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
    #[cfg(feature = "telemetry")]
    #[doc = include_str!("../docs/telemetry.md")]
    struct Telemetry;
}
