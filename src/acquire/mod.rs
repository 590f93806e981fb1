//! Acquires through a [`WatchedPool`](crate::acquire::watched_pool::WatchedPool): wait, use and connect times, waiters,
//! timeouts and leak suspects, and their spans.
pub(crate) mod bare;
pub(crate) mod leak;
pub(crate) mod lifecycle;
pub(crate) mod probe;
pub(crate) mod spans;
pub(crate) mod stamps;
pub(crate) mod stranded;
pub(crate) mod watched_pool;
