//! Health signals beside the ledger: two-path heartbeats, the configuration hazard lint,
//! per-address reachability, the app's progress, and the health report that sums them up.
pub(crate) mod followed;
pub mod hazards;
pub(crate) mod heartbeat;
pub(crate) mod liveness;
pub(crate) mod progress;
pub mod reach;
pub mod report;
