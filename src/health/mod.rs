//! Health signals beside the ledger: two-path heartbeats, the configuration hazard lint,
//! per-address reachability and the app's progress.
pub mod hazards;
pub(crate) mod heartbeat;
pub(crate) mod progress;
pub mod reach;
