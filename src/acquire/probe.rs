//! The figures of acquires made through a [`WatchedPool`](crate::WatchedPool): wait,
//! waiters, timeouts, use time and create time, recorded on the hot path with pre-registered
//! metric handles (a few atomic operations and clock reads per acquire).

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tracing::Span;

use crate::acquire::leak::{Leaks, Origin};
use crate::acquire::spans as acquire_spans;
use crate::catalog::{self, POOL_NAME};
use crate::{Cause, Config};

thread_local! {
    /// Set by the `after_connect` hook when a connection was just opened on this thread.
    static CONNECTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Installs the `after_connect` hook that lets a [`WatchedPool`](crate::WatchedPool) measure
/// `db_client_connection_create_time_seconds` and emit `db.pool.connect` spans.
///
/// It replaces any `after_connect` hook set before. If you need your own hook, call
/// [`mark_connected`] first thing in it instead.
///
/// [`instrument_options_named`](crate::instrument_options_named) does this too, and counts
/// every acquire and release for apps whose pool is driven by a library.
pub fn instrument_options(options: PgPoolOptions) -> PgPoolOptions {
    options.after_connect(|_conn: &mut PgConnection, _meta| -> BoxFuture<'_, Result<(), sqlx::Error>> {
        mark_connected();
        Box::pin(std::future::ready(Ok(())))
    })
}

/// Tells poolwatch that a new connection was just opened. Call it at the start of your own
/// `after_connect` hook if you do not use [`instrument_options`].
pub fn mark_connected() {
    CONNECTED.with(|c| c.set(Some(Instant::now())));
}

/// The metric handles and settings of one watched pool.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) pool: PgPool,
    pub(crate) pool_name: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    wait: Histogram,
    pending: Gauge,
    timeouts: Counter,
    use_time: Histogram,
    create: Histogram,
    pub(crate) leaks: Leaks,
}

impl Probe {
    pub(crate) fn new(pool: &PgPool, config: &Config) -> Probe {
        let p = config.pool_name.clone();
        let options = pool.connect_options();
        Probe {
            wait: histogram!(catalog::WAIT_TIME.name, POOL_NAME => p.clone()),
            pending: gauge!(catalog::PENDING_REQUESTS.name, POOL_NAME => p.clone()),
            timeouts: counter!(catalog::TIMEOUTS.name, POOL_NAME => p.clone()),
            use_time: histogram!(catalog::USE_TIME.name, POOL_NAME => p.clone()),
            create: histogram!(catalog::CREATE_TIME.name, POOL_NAME => p.clone()),
            leaks: Leaks::new(&p, config.leak_threshold),
            host: options.get_host().to_owned(),
            port: options.get_port(),
            pool: pool.clone(),
            pool_name: p,
        }
    }

    /// A watched acquire on the pool: while it waits it counts as a waiter; when it ends it
    /// records the wait, a timeout, a new connection's create time and the `db.pool.acquire`
    /// span, and `finish` turns the connection and its [`Ticket`] into `T`.
    pub(crate) fn acquire<T>(
        self: Arc<Self>,
        origin: Origin,
        finish: fn(PoolConnection<Postgres>, Ticket) -> T,
    ) -> Acquiring<T> {
        Acquiring {
            inner: None,
            waiting: false,
            probe: self,
            origin,
            finish,
            span: Span::none(),
            started: Instant::now(),
            connected: None,
        }
    }

    fn acquired(
        self: &Arc<Self>,
        span: &Span,
        started: Instant,
        connected: Option<Instant>,
        result: Result<PoolConnection<Postgres>, sqlx::Error>,
        origin: Origin,
    ) -> Result<(PoolConnection<Postgres>, Ticket), sqlx::Error> {
        let now = Instant::now();
        let waited = now - started;
        if let Some(at) = connected {
            let took = at.saturating_duration_since(started);
            self.create.record(took.as_secs_f64());
            acquire_spans::connected(self, span, took, None);
        }
        match result {
            Ok(conn) => {
                self.wait.record(waited.as_secs_f64());
                acquire_spans::acquired(span, waited);
                Ok((conn, Arc::clone(self).checkout(now, origin)))
            }
            Err(err) => {
                let cause = Cause::of(&err);
                match cause {
                    Cause::PoolTimedOut => self.timeouts.increment(1),
                    Cause::PoolClosed => {}
                    // Any other acquire error comes from opening a new connection.
                    _ => acquire_spans::connected(self, span, waited, Some(cause)),
                }
                acquire_spans::failed(self, span, waited, cause);
                Err(err)
            }
        }
    }

    /// Records a connection taken without waiting (`try_acquire`).
    pub(crate) fn took(self: Arc<Self>, origin: Origin) -> Ticket {
        self.wait.record(0.0);
        self.checkout(Instant::now(), origin)
    }

    fn checkout(self: Arc<Self>, acquired: Instant, origin: Origin) -> Ticket {
        let slot = self.leaks.checkout(acquired, origin);
        Ticket { probe: self, acquired, slot, origin, escaped: false }
    }
}

type PoolAcquire = Pin<Box<dyn Future<Output = Result<PoolConnection<Postgres>, sqlx::Error>> + Send>>;

/// The future of a watched acquire. sqlx's acquire future (8.6 KB) is boxed at the first
/// poll, so this future stays small: moving it, and the caller's future that holds it, copies
/// about a hundred bytes instead of kilobytes.
pub(crate) struct Acquiring<T> {
    /// sqlx's acquire, from the first poll until it finishes.
    inner: Option<PoolAcquire>,
    /// The first poll found no connection ready: the caller waits and counts in
    /// `pending_requests` until it gets one, fails, or drops this future. (An acquire that
    /// completes at its first poll never waited and skips the gauge.)
    waiting: bool,
    probe: Arc<Probe>,
    origin: Origin,
    finish: fn(PoolConnection<Postgres>, Ticket) -> T,
    span: Span,
    started: Instant,
    connected: Option<Instant>,
}

impl<T> Future for Acquiring<T> {
    type Output = Result<T, sqlx::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let inner = match &mut this.inner {
            Some(inner) => inner,
            None => {
                // The caller's span is current here: it is polling us.
                this.span = acquire_spans::acquire(&this.probe);
                this.started = Instant::now();
                this.inner.insert(Box::pin(this.probe.pool.acquire()))
            }
        };
        let entered = this.span.enter();
        // The pool's `after_connect` hook runs inside this poll, on this thread, when the
        // acquire opens a connection: it stamps CONNECTED.
        CONNECTED.with(|c| c.set(None));
        let poll = crate::acquire::bare::in_watched_poll(|| inner.as_mut().poll(cx));
        if let Some(at) = CONNECTED.with(Cell::take) {
            this.connected = Some(at);
        }
        drop(entered);
        let Poll::Ready(result) = poll else {
            if !this.waiting {
                this.waiting = true;
                this.probe.pending.increment(1.0);
            }
            return Poll::Pending;
        };
        this.inner = None;
        if std::mem::take(&mut this.waiting) {
            this.probe.pending.decrement(1.0);
        }
        let finish = this.finish;
        Poll::Ready(
            this.probe
                .acquired(&this.span, this.started, this.connected.take(), result, this.origin)
                .map(|(conn, ticket)| finish(conn, ticket)),
        )
    }
}

impl<T> Drop for Acquiring<T> {
    fn drop(&mut self) {
        // Dropped while waiting (cancelled): the waiter leaves the gauge.
        if self.waiting {
            self.probe.pending.decrement(1.0);
        }
    }
}

/// One checked-out connection: records its use time and ends its leak watch when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    probe: Arc<Probe>,
    acquired: Instant,
    slot: Option<usize>,
    origin: Origin,
    escaped: bool,
}

impl Ticket {
    /// The connection left the pool for good (`leak()` or `detach()`).
    #[track_caller]
    pub(crate) fn escape(mut self, leaked: bool) {
        self.escaped = true;
        let at = std::panic::Location::caller();
        self.probe.leaks.escaped(self.slot.take(), self.origin, at, leaked, self.acquired.elapsed());
    }

    /// How long the connection has been checked out.
    pub(crate) fn held(&self) -> Duration {
        self.acquired.elapsed()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.escaped {
            return;
        }
        let held = self.acquired.elapsed();
        self.probe.use_time.record(held.as_secs_f64());
        if let Some(slot) = self.slot {
            self.probe.leaks.returned(slot, held);
        }
    }
}
