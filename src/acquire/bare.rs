//! Figures of acquires that bypass [`WatchedPool`](crate::acquire::watched_pool::WatchedPool): an ORM, a job queue or
//! a session store that takes the bare `PgPool`. Two sources, both from sqlx itself:
//!
//! - the pool's hooks, installed by [`instrument_options_named`]: connections opened
//!   (`after_connect`), acquires that got an idle connection (`before_acquire`), connections
//!   given back (`after_release`);
//! - sqlx's own acquire events (target `sqlx::pool::acquire`, field `acquired_after_secs`), read
//!   by [`sqlx_acquire_layer`]: the wait of every acquire (with `acquire_time_level` on, which
//!   [`instrument_options_named`] sets) and the slow ones (sqlx logs those by default).
//!
//! sqlx's events carry no pool identity. The `before_acquire` / `after_connect` hook of a pool
//! runs inside the same poll of the acquire, on the same thread, right before the event: it
//! stamps its pool in a thread-local that the layer takes. Without the hooks, an event is
//! given to the only pool poolwatch knows, and dropped when there are several.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context as TaskContext, Poll};

use futures_core::future::BoxFuture;
use metrics::{Counter, Histogram};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::acquire::lifecycle::Lifecycle;
use crate::acquire::stamps::{self, mark_connected};
use crate::publish::{self, acquire::HookCounters};
use crate::registry;
use crate::sqlx_adapter;

/// sqlx's target for its acquire events.
const ACQUIRE_TARGET: &str = "sqlx::pool::acquire";

/// The pool whose acquire hook ran last on this thread, for the acquire event that follows.
#[derive(Debug)]
struct Stamp {
    /// Set by the hook, taken by the event: an event with no hook before it is not this pool's.
    armed: Cell<bool>,
    /// Kept while the thread's acquires stay on one pool, so that a hook costs no reference
    /// count change (a shared cache line under many tasks). Weak: a closed pool's figures
    /// must not stay.
    pool: RefCell<Weak<BareFigures>>,
}

thread_local! {
    static STAMP: Stamp = const { Stamp { armed: Cell::new(false), pool: RefCell::new(Weak::new()) } };
}

/// [`sqlx_acquire_layer`] was created: from then on every known pool exports its slow-acquire
/// counter, at 0 until one happens. Without the layer (or the hooks) nothing can count slow
/// acquires, so the series stays out of the pool's series budget.
static LAYER: AtomicBool = AtomicBool::new(false);

/// The bare-pool figures of one pool name: a [`registry`](crate::registry) table of
/// `Arc<BareFigures>` holds those of every pool poolwatch knows (instrumented or given hooks).
#[derive(Debug)]
pub(crate) struct BareFigures {
    name: String,
    wait: Histogram,
    /// Created (at 0) once the layer or the hooks are in use.
    slow: OnceLock<Counter>,
    /// sqlx reports every acquire of this pool, not only the slow ones (`acquire_time_level`
    /// is on): only then do slow acquires' waits go in the histogram, which would otherwise
    /// hold nothing but the slow tail.
    timed: AtomicBool,
    /// The hook counters (only with [`instrument_options_named`]).
    hooks: OnceLock<HookCounters>,
    /// Set by [`instrument_options_named`]: the connection lifecycle ledger its hooks feed.
    lifecycle: OnceLock<Arc<Lifecycle>>,
}

/// Forgets the pool stamped on this thread: a `WatchedPool` acquire's poll is over, and
/// sqlx's event inside it was left to the `WatchedPool`, which records the wait itself.
pub(crate) fn forget_stamp() {
    let _ = STAMP.try_with(|s| s.armed.set(false));
}

/// The figures of `pool_name`, created (counters at 0) on first use.
pub(crate) fn figures(pool_name: &str) -> Arc<BareFigures> {
    let mut pools = registry::lock::<Arc<BareFigures>>();
    if let Some(f) = pools.iter().find(|f| f.name == pool_name) {
        return Arc::clone(f);
    }
    let p = pool_name.to_owned();
    let f = Arc::new(BareFigures {
        wait: publish::acquire::bare_wait(&p),
        slow: OnceLock::new(),
        timed: AtomicBool::new(false),
        hooks: OnceLock::new(),
        lifecycle: OnceLock::new(),
        name: p,
    });
    if LAYER.load(Ordering::Relaxed) {
        f.slow();
    }
    pools.push(Arc::clone(&f));
    f
}

/// Forgets the figures of the pools `ended` names (their watch has ended) once nothing else
/// holds them: their pool and its hooks are gone. Otherwise a process that opens and closes a
/// pool per tenant keeps every tenant's figures, and their series, forever.
#[cfg(feature = "prometheus")]
pub(crate) fn forget_unheld(ended: impl Fn(&str) -> bool) {
    let mut pools = registry::lock::<Arc<BareFigures>>();
    pools.retain(|f| !(ended(&f.name) && Arc::strong_count(f) == 1));
}

/// The lifecycle ledger of `pool_name`, if its options carry the hooks.
pub(crate) fn lifecycle_of(pool_name: &str) -> Option<Arc<Lifecycle>> {
    let pools = registry::lock::<Arc<BareFigures>>();
    pools.iter().find(|f| f.name == pool_name).and_then(|f| f.lifecycle.get().cloned())
}

impl BareFigures {
    fn slow(&self) -> &Counter {
        self.slow.get_or_init(|| publish::acquire::slow_acquires(&self.name))
    }

    fn hooks(&self) -> &HookCounters {
        self.hooks.get_or_init(|| {
            self.slow();
            HookCounters::new(&self.name)
        })
    }
}

/// [`instrument_options`](crate::acquire::probe::instrument_options), plus hooks that count every acquire and
/// release of the pool whoever makes it (a library on the bare `PgPool` included), the
/// connection lifecycle figures ([`PoolWatch::lifecycle`](crate::watch::PoolWatch::lifecycle):
/// opened, closed by reason, the oldest one's age; `docs/lifecycle.md`), and sqlx's
/// per-acquire event turned on (at TRACE) for [`sqlx_acquire_layer`] to read the wait.
/// `pool_name` must be the name given to [`Config::new`](crate::config::Config::new).
///
/// It replaces the `after_connect`, `before_acquire` and `after_release` hooks set before, and
/// sets `acquire_time_level`. If you need your own hooks, keep yours and do without these
/// counters (the wait from sqlx's events still works for a single pool).
///
/// ```no_run
/// # use poolwatch::sqlx;
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sqlx::postgres::PgPoolOptions;
/// let options = poolwatch::instrument_options_named(PgPoolOptions::new().max_connections(10), "main");
/// let pool = options.connect("postgres://app@db/app").await?;
/// let watch = poolwatch::instrument_pool(&pool, poolwatch::Config::new("main"))?;
/// # drop(watch); Ok(()) }
/// ```
pub fn instrument_options_named(options: PgPoolOptions, pool_name: &str) -> PgPoolOptions {
    let f = figures(pool_name);
    f.hooks();
    f.timed.store(true, Ordering::Relaxed);
    let l = Arc::clone(f.lifecycle.get_or_init(Default::default));
    let (on_connect, on_acquire, on_release) = (Arc::clone(&f), Arc::clone(&f), f);
    let (l_connect, l_acquire, l_release) = (Arc::clone(&l), Arc::clone(&l), l);
    options
        .acquire_time_level(log::LevelFilter::Trace)
        .after_connect(move |_conn: &mut PgConnection, _meta| -> BoxFuture<'_, Result<(), sqlx::Error>> {
            mark_connected();
            on_connect.hooks().connects.increment(1);
            l_connect.on_connect();
            stamp(&on_connect);
            Box::pin(Done)
        })
        .before_acquire(move |_conn: &mut PgConnection, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            on_acquire.hooks().idle_acquires.increment(1);
            l_acquire.seen(meta.age, false);
            stamp(&on_acquire);
            Box::pin(Keep)
        })
        .after_release(move |_conn: &mut PgConnection, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            on_release.hooks().releases.increment(1);
            l_release.seen(meta.age, true);
            Box::pin(Keep)
        })
}

/// A hook's `Ok(())`, ready at once. Zero-sized, so sqlx's box of it allocates nothing (a
/// `std::future::ready` is boxed on the heap on every call).
#[derive(Debug)]
pub(crate) struct Done;

impl Future for Done {
    type Output = Result<(), sqlx::Error>;
    fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

/// A hook's `Ok(true)` (keep the connection), ready at once; zero-sized like [`Done`].
#[derive(Debug)]
struct Keep;

impl Future for Keep {
    type Output = Result<bool, sqlx::Error>;
    fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(true))
    }
}

fn stamp(f: &Arc<BareFigures>) {
    let _ = STAMP.try_with(|s| {
        s.armed.set(true);
        if let Ok(mut pool) = s.pool.try_borrow_mut()
            && !std::ptr::eq(pool.as_ptr(), Arc::as_ptr(f))
        {
            *pool = Arc::downgrade(f);
        }
    });
}

/// The pool stamped on this thread by the hook of the acquire whose event this is, if any.
fn take_stamp() -> Option<Arc<BareFigures>> {
    STAMP.try_with(|s| if s.armed.replace(false) { s.pool.try_borrow().ok()?.upgrade() } else { None }).ok().flatten()
}

/// A `tracing` layer that reads sqlx's own acquire events (target `sqlx::pool::acquire`) into
/// `db_client_connection_wait_time_seconds` and `poolwatch_pool_slow_acquires_total`, for
/// acquires that bypass [`WatchedPool`](crate::acquire::watched_pool::WatchedPool). It has its own filter: add it to
/// a `tracing_subscriber::Registry` next to your other layers. A global filter in front of it
/// (e.g. `registry().with(EnvFilter)`) hides the TRACE events from it; give that filter to
/// your `fmt` layer instead (`fmt::layer().with_filter(EnvFilter..)`).
/// [`telemetry::init`](crate::telemetry) installs it.
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
/// let subscriber = tracing_subscriber::registry().with(poolwatch::sqlx_acquire_layer());
/// # drop(subscriber);
/// ```
pub fn sqlx_acquire_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    LAYER.store(true, Ordering::Relaxed);
    for pool in registry::lock::<Arc<BareFigures>>().iter() {
        pool.slow();
    }
    AcquireEvents.with_filter(Targets::new().with_target(ACQUIRE_TARGET, tracing::Level::TRACE))
}

/// The layer behind [`sqlx_acquire_layer`].
#[derive(Debug)]
struct AcquireEvents;

impl<S: Subscriber> Layer<S> for AcquireEvents {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACQUIRE_TARGET {
            return;
        }
        let stamped = take_stamp();
        if stamps::in_watched() {
            return;
        }
        let mut fields = AcquireFields::default();
        event.record(&mut fields);
        let Some(waited) = fields.acquired_after else { return };
        let Some(pool) = stamped.or_else(sole_pool) else { return };
        if fields.slow {
            pool.slow().increment(1);
        } else {
            pool.timed.store(true, Ordering::Relaxed);
        }
        if !fields.slow || pool.timed.load(Ordering::Relaxed) {
            pool.wait.record(waited);
        }
    }
}

/// The only pool poolwatch knows, if there is exactly one.
fn sole_pool() -> Option<Arc<BareFigures>> {
    let pools = registry::lock::<Arc<BareFigures>>();
    match pools.as_slice() {
        [only] => Some(Arc::clone(only)),
        _ => None,
    }
}

#[derive(Default)]
struct AcquireFields {
    acquired_after: Option<f64>,
    slow: bool,
}

impl Visit for AcquireFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            n if n == sqlx_adapter::ACQUIRED_AFTER_FIELD => self.acquired_after = Some(value),
            "slow_acquire_threshold_secs" => self.slow = true,
            _ => {}
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}
