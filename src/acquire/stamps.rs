//! The acquire path's thread-local stamps: an acquire, its hooks and sqlx's events run in one
//! poll on one thread, and sqlx tells none of them which pool or acquire they belong to.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    /// Set by the `after_connect` hook when a connection was just opened on this thread.
    static CONNECTED: Cell<Option<Instant>> = const { Cell::new(None) };
    /// A `WatchedPool` acquire is being polled here: it records its own wait.
    static IN_WATCHED: Cell<bool> = const { Cell::new(false) };
}

/// Tells poolwatch that a new connection was just opened. Call it at the start of your own
/// `after_connect` hook if you do not use [`instrument_options`](crate::acquire::probe::instrument_options).
pub fn mark_connected() {
    CONNECTED.with(|c| c.set(Some(Instant::now())));
}

/// Forgets a connect stamped before this acquire's poll.
pub(crate) fn clear_connected() {
    CONNECTED.with(|c| c.set(None));
}

/// When the connection this poll opened was opened, if it opened one.
pub(crate) fn take_connected() -> Option<Instant> {
    CONNECTED.with(Cell::take)
}

/// Runs one poll of a `WatchedPool` acquire: sqlx's acquire events it raises are its own.
pub(crate) fn in_watched_poll<T>(poll: impl FnOnce() -> T) -> T {
    IN_WATCHED.with(|w| w.set(true));
    let out = poll();
    IN_WATCHED.with(|w| w.set(false));
    out
}

/// Whether a `WatchedPool` acquire is being polled on this thread.
pub(crate) fn in_watched() -> bool {
    IN_WATCHED.with(Cell::get)
}
