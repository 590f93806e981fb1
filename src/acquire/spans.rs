//! The `db.pool.acquire` and `db.pool.connect` spans, with OpenTelemetry attribute names.
//!
//! Quiet by default: spans are DEBUG (a disabled span costs one cached level check), a
//! failure also emits a WARN event. Nothing sensitive is recorded: the pool name, host and
//! port only (never the password, never SQL text).

use std::time::Duration;

use tracing::Span;
use tracing::field::Empty;

use crate::cause::Cause;

/// What the spans name: the pool and the server it connects to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) pool_name: &'a str,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
}

/// The span of one acquire, entered while it waits.
pub(crate) fn acquire(p: Target<'_>) -> Span {
    tracing::debug_span!(
        "db.pool.acquire",
        "db.client.connection.pool.name" = %p.pool_name,
        "db.system.name" = "postgresql",
        "server.address" = %p.host,
        "server.port" = p.port,
        "db.client.connection.wait_time" = Empty,
        "poolwatch.outcome" = Empty,
        "error.type" = Empty,
        "otel.status_code" = Empty,
    )
}

/// The acquire got a connection after `waited`.
pub(crate) fn acquired(span: &Span, waited: Duration) {
    if !span.is_disabled() {
        span.record("db.client.connection.wait_time", waited.as_secs_f64()).record("poolwatch.outcome", "ok");
    }
}

/// The acquire failed after `waited`: records the outcome and emits one WARN event.
pub(crate) fn failed(p: Target<'_>, span: &Span, waited: Duration, cause: Cause) {
    let outcome = match cause {
        Cause::PoolTimedOut => "timeout",
        Cause::PoolClosed => "closed",
        _ => "error",
    };
    span.record("db.client.connection.wait_time", waited.as_secs_f64())
        .record("poolwatch.outcome", outcome)
        .record("error.type", cause.as_str())
        .record("otel.status_code", "ERROR");
    tracing::warn!(
        parent: span,
        pool = %p.pool_name,
        cause = cause.as_str(),
        outcome = outcome,
        wait_seconds = waited.as_secs_f64(),
        "acquire failed"
    );
}

/// A new connection was opened (`cause` is `None`) or failed to open, taking `took`.
/// The span is created when the outcome is known; `db.client.connection.create_time`
/// carries the duration.
pub(crate) fn connected(p: Target<'_>, parent: &Span, took: Duration, cause: Option<Cause>) {
    let seconds = took.as_secs_f64();
    match cause {
        None => {
            tracing::debug_span!(
                parent: parent,
                "db.pool.connect",
                "db.client.connection.pool.name" = %p.pool_name,
                "db.system.name" = "postgresql",
                "server.address" = %p.host,
                "server.port" = p.port,
                "db.client.connection.create_time" = seconds,
                "poolwatch.outcome" = "ok",
            )
            .in_scope(|| {});
        }
        Some(cause) => {
            let span = tracing::warn_span!(
                parent: parent,
                "db.pool.connect",
                "db.client.connection.pool.name" = %p.pool_name,
                "db.system.name" = "postgresql",
                "server.address" = %p.host,
                "server.port" = p.port,
                "db.client.connection.create_time" = seconds,
                "poolwatch.outcome" = "error",
                "error.type" = cause.as_str(),
                "otel.status_code" = "ERROR",
            );
            tracing::warn!(parent: &span, cause = cause.as_str(), "opening a new connection failed");
        }
    }
}
