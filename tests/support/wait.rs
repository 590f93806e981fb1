//! Waiting for a condition instead of sleeping: shared by every test binary (the CLI's too).

use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within` with `what`.
/// `within` is a floor of 30 s whatever the caller asks: a loaded machine (CI, other builds,
/// `scripts/flake-check`) may take that long, and a passing test never waits it out.
pub async fn eventually<T>(within: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let within = within.max(Duration::from_secs(30));
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
