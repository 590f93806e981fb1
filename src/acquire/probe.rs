//! The figures of acquires made through a [`WatchedPool`](crate::acquire::watched_pool::WatchedPool): wait,
//! waiters, timeouts, use time and create time, recorded on the hot path with pre-registered
//! metric handles (a few atomic operations and clock reads per acquire).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tracing::Span;

use crate::acquire::leak::{Leaks, Origin};
use crate::acquire::spans as acquire_spans;
use crate::acquire::stamps::{self, mark_connected};
use crate::publish::acquire::AcquireMetrics;
use crate::{cause::Cause, config::Config, ledger::snapshot::Snapshot};

/// At most one exhaustion WARN per pool per this period (the others are DEBUG span events).
const EXHAUSTION_WARN_EVERY: Duration = Duration::from_secs(10);

/// Installs the `after_connect` hook that lets a [`WatchedPool`](crate::acquire::watched_pool::WatchedPool) measure
/// `db_client_connection_create_time_seconds` and emit `db.pool.connect` spans.
///
/// It replaces any `after_connect` hook set before. If you need your own hook, call
/// [`mark_connected`] first thing in it instead.
///
/// [`instrument_options_named`](crate::acquire::bare::instrument_options_named) does this too, and counts
/// every acquire and release for apps whose pool is driven by a library.
pub fn instrument_options(options: PgPoolOptions) -> PgPoolOptions {
    options.after_connect(|_conn: &mut PgConnection, _meta| -> BoxFuture<'_, Result<(), sqlx::Error>> {
        mark_connected();
        Box::pin(crate::acquire::bare::Done)
    })
}

/// The metric handles and settings of one watched pool.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) pool: PgPool,
    pub(crate) pool_name: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    metrics: AcquireMetrics,
    pub(crate) leaks: Leaks,
    waiters: Waiters,
    /// The last census the watch took, and when: for the exhaustion snapshot.
    census: Mutex<Option<(Instant, Snapshot)>>,
    last_warn: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
    /// Connect trouble seen by acquires (errors, timeouts, creates over [`SLOW_CREATE`]):
    /// a change makes the reachability probe run.
    pub(crate) trouble: std::sync::atomic::AtomicU64,
    /// App acquires, for the heartbeat's stretch on a quiet replica.
    pub(crate) activity: crate::quiet::Activity,
}

/// Acquires waiting now and since when: entered only when an acquire has to wait, so an
/// acquire served at once never touches it.
#[derive(Debug, Default)]
struct Waiters {
    slab: Mutex<(Vec<Option<Instant>>, Vec<usize>)>,
}

impl Waiters {
    fn enter(&self, since: Instant) -> Option<usize> {
        let mut s = self.slab.lock().ok()?;
        Some(match s.1.pop() {
            Some(i) => {
                s.0[i] = Some(since);
                i
            }
            None => {
                s.0.push(Some(since));
                s.0.len() - 1
            }
        })
    }

    fn leave(&self, i: usize) {
        if let Ok(mut s) = self.slab.lock()
            && s.0.get_mut(i).and_then(Option::take).is_some()
        {
            s.1.push(i);
        }
    }

    /// How many wait now, and the oldest one's wait.
    fn figures(&self) -> (usize, Duration) {
        let Ok(s) = self.slab.lock() else { return (0, Duration::ZERO) };
        let oldest = s.0.iter().flatten().min().map_or(Duration::ZERO, |t| t.elapsed());
        (s.0.len() - s.1.len(), oldest)
    }
}

/// What the pool looked like when an acquire timed out: who holds its connections, who
/// waits, and what the last census saw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exhaustion {
    pub(crate) holders: Vec<crate::acquire::leak::Holders>,
    /// Checked-out slots the watched pool did not hand out (bare-pool acquires, or stranded).
    pub(crate) unaccounted: u32,
    pub(crate) waiters: usize,
    pub(crate) oldest_wait: Duration,
    pub(crate) census: String,
}

/// A new connection slower than this is connect trouble worth a reachability probe.
const SLOW_CREATE: std::time::Duration = std::time::Duration::from_secs(1);

impl Probe {
    /// What the acquire and connect spans name.
    pub(crate) fn target(&self) -> acquire_spans::Target<'_> {
        acquire_spans::Target { pool_name: &self.pool_name, host: &self.host, port: self.port }
    }

    pub(crate) fn new(pool: &PgPool, config: &Config) -> Probe {
        let p = config.pool_name.clone();
        let options = pool.connect_options();
        Probe {
            metrics: AcquireMetrics::new(&p),
            leaks: Leaks::new(&p, config.leak_threshold, config.detail == crate::config::Detail::Full),
            waiters: Waiters::default(),
            census: Mutex::new(None),
            last_warn: Mutex::new(None),
            suppressed: AtomicU64::new(0),
            trouble: std::sync::atomic::AtomicU64::new(0),
            activity: crate::quiet::Activity::default(),
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
            waiting: None,
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
        self.activity.touch();
        if let Some(at) = connected {
            let took = at.saturating_duration_since(started);
            self.metrics.create.record(took.as_secs_f64());
            if took > SLOW_CREATE {
                self.trouble.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            acquire_spans::connected(self.target(), span, took, None);
        }
        match result {
            Ok(conn) => {
                self.metrics.wait.record(waited.as_secs_f64());
                acquire_spans::acquired(span, waited);
                Ok((conn, Arc::clone(self).checkout(now, origin)))
            }
            Err(err) => {
                let cause = Cause::of(&err);
                if cause != Cause::PoolClosed {
                    self.trouble.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                match cause {
                    Cause::PoolTimedOut => {
                        self.metrics.timeouts.increment(1);
                        self.exhausted(span, waited);
                    }
                    Cause::PoolClosed => {}
                    // Any other acquire error comes from opening a new connection.
                    _ => acquire_spans::connected(self.target(), span, waited, Some(cause)),
                }
                acquire_spans::failed(self.target(), span, waited, cause);
                Err(err)
            }
        }
    }

    /// The acquires waiting now and the oldest one's wait.
    pub(crate) fn waiters(&self) -> (usize, Duration) {
        self.waiters.figures()
    }

    /// Keeps the latest census for the exhaustion snapshot.
    pub(crate) fn census_seen(&self, s: &Snapshot) {
        if let Ok(mut c) = self.census.lock() {
            *c = Some((Instant::now(), s.clone()));
        }
    }

    /// The exhaustion snapshot now.
    pub(crate) fn exhaustion(&self) -> Exhaustion {
        let holders = self.leaks.holders();
        let (waiters, oldest_wait) = self.waiters();
        let figures = crate::ledger::snapshot::PoolFigures::of(&self.pool);
        let watched: usize = holders.iter().map(|h| h.count).sum();
        let census = match self.census.lock().ok().and_then(|c| c.clone()) {
            None => "no census yet".to_owned(),
            Some((at, s)) => describe_census(at.elapsed(), &s),
        };
        Exhaustion {
            unaccounted: figures.used.saturating_sub(u32::try_from(watched).unwrap_or(u32::MAX)),
            holders,
            waiters,
            oldest_wait,
            census,
        }
    }

    /// An acquire timed out: one WARN per [`EXHAUSTION_WARN_EVERY`] and a span event each time,
    /// saying who holds the pool, who waits and what the census last saw.
    fn exhausted(&self, span: &Span, waited: Duration) {
        let x = self.exhaustion();
        let holders = if x.holders.is_empty() {
            "none through the watched pool".to_owned()
        } else {
            x.holders
                .iter()
                .map(|h| format!("{} x{} (oldest {:.1}s)", h.origin, h.count, h.oldest.as_secs_f64()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let now = Instant::now();
        let warn = self.last_warn.lock().is_ok_and(|mut last| {
            let due = last.is_none_or(|at| now.saturating_duration_since(at) >= EXHAUSTION_WARN_EVERY);
            if due {
                *last = Some(now);
            }
            due
        });
        let held: usize = x.holders.iter().map(|h| h.count).sum();
        macro_rules! snapshot {
            ($level:expr, $suppressed:expr) => {
                tracing::event!(
                    parent: span,
                    $level,
                    pool = %self.pool_name,
                    wait_seconds = waited.as_secs_f64(),
                    holders = %holders,
                    held_through_watched_pool = held,
                    held_elsewhere = x.unaccounted,
                    waiters = x.waiters,
                    oldest_wait_seconds = x.oldest_wait.as_secs_f64(),
                    census = %x.census,
                    timeouts_not_logged = $suppressed,
                    "pool exhausted: acquire timed out; connections held by {holders}; {} waiting (oldest {:.1}s); census: {}",
                    x.waiters,
                    x.oldest_wait.as_secs_f64(),
                    x.census
                )
            };
        }
        if warn {
            snapshot!(tracing::Level::WARN, self.suppressed.swap(0, Ordering::Relaxed));
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            snapshot!(tracing::Level::DEBUG, 0u64);
        }
    }

    /// Records a connection taken without waiting (`try_acquire`).
    pub(crate) fn took(self: Arc<Self>, origin: Origin) -> Ticket {
        self.metrics.wait.record(0.0);
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
    /// `pending_requests` (and the waiters' registry, at this index) until it gets one, fails,
    /// or drops this future. (An acquire that completes at its first poll never waited and
    /// skips both.)
    waiting: Option<usize>,
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
                this.span = acquire_spans::acquire(this.probe.target());
                this.started = Instant::now();
                this.inner.insert(Box::pin(this.probe.pool.acquire()))
            }
        };
        let entered = this.span.enter();
        // The pool's `after_connect` hook runs inside this poll, on this thread, when the
        // acquire opens a connection: it stamps CONNECTED.
        stamps::clear_connected();
        let poll = stamps::in_watched_poll(|| inner.as_mut().poll(cx));
        crate::acquire::bare::forget_stamp();
        if let Some(at) = stamps::take_connected() {
            this.connected = Some(at);
        }
        drop(entered);
        let Poll::Ready(result) = poll else {
            if this.waiting.is_none() {
                this.waiting = Some(this.probe.waiters.enter(this.started).unwrap_or(usize::MAX));
                this.probe.metrics.pending.increment(1.0);
            }
            return Poll::Pending;
        };
        this.inner = None;
        if let Some(i) = this.waiting.take() {
            this.probe.waiters.leave(i);
            this.probe.metrics.pending.decrement(1.0);
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
        if let Some(i) = self.waiting.take() {
            self.probe.waiters.leave(i);
            self.probe.metrics.pending.decrement(1.0);
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
        self.probe.metrics.use_time.record(held.as_secs_f64());
        if let Some(slot) = self.slot {
            self.probe.leaks.returned(slot, held);
        }
    }
}

/// `3.2s ago: pool 10 open / 0 idle; server 10 sessions (active 2, idle_in_transaction 8); phantom 0`.
fn describe_census(ago: Duration, s: &Snapshot) -> String {
    let server = match &s.server {
        None => "server not read".to_owned(),
        Some(c) => {
            let states: Vec<String> = crate::ledger::census::SESSION_STATES
                .iter()
                .zip(c.counts)
                .filter(|(_, n)| *n > 0)
                .map(|(st, n)| format!("{st} {n}"))
                .collect();
            format!("server {} sessions ({})", c.total(), states.join(", "))
        }
    };
    let phantom = s.phantom.map_or("unknown".to_owned(), |p| p.to_string());
    format!(
        "{:.1}s ago: pool {} open / {} idle; {server}; phantom {phantom}{}",
        ago.as_secs_f64(),
        s.pool.open,
        s.pool.idle,
        if s.census_up { "" } else { " (the last census failed)" }
    )
}
