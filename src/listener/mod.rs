//! `WatchedListener`: LISTEN on a connection whose every loss is counted, with its cause.
pub(crate) mod status;
pub(crate) mod watched;
