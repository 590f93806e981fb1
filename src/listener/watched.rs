//! [`WatchedListener`]: sqlx's `PgListener` with its reconnects made visible, and an opt-in
//! keepalive that stops a server or pooler from ending an idle listener session.
//!
//! sqlx reconnects a lost listener invisibly (`recv`), or reports it as a bare `Ok(None)`
//! (`try_recv`) after dropping the server's `FATAL`. A `WatchedListener` drives the reconnect
//! itself: it sees the loss, marks the listener down, re-establishes LISTEN, then counts the
//! reconnect by [`Cause`], records the downtime (the window in which notifications were lost)
//! and closes one WARN span `db.listener.reconnect`. How a cause is found when sqlx hides it:
//! see docs/listener.md.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_core::Stream;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use sqlx::{Acquire, PgPool};
use tokio::time::Instant;

use crate::cause::connection_lost;
use crate::config::check_name;
use crate::ledger::loss::{Basis, ServerFacts, explain_silent_loss};
use crate::listener::status::Registered;
use crate::publish::listener::ListenerMetrics;
use crate::{cause::Cause, config::ConfigError};

/// How a [`WatchedListener`] is named and kept alive.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListenerConfig {
    /// The `db_client_connection_pool_name` label value (the pool the listener belongs to,
    /// as in [`Config::new`](crate::config::Config::new)). Same rules as the pool name.
    pub pool_name: String,
    /// The `listener` label value. 1-64 characters from `A-Z a-z 0-9 _ - . :`.
    pub listener: String,
    /// Run `SELECT 1` on the listener's connection after this much silence from the client.
    /// Default `None` (off). Set it below the server's or pooler's idle timeout.
    pub keepalive: Option<Duration>,
}

impl ListenerConfig {
    /// A config for the listener `listener` of the pool `pool_name`, keepalive off.
    pub fn new(pool_name: impl Into<String>, listener: impl Into<String>) -> Self {
        ListenerConfig { pool_name: pool_name.into(), listener: listener.into(), keepalive: None }
    }

    /// Sets [`ListenerConfig::keepalive`].
    pub fn keepalive(mut self, every: Duration) -> Self {
        self.keepalive = Some(every);
        self
    }

    /// Checks every field; the error names the first bad one and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("pool_name", &self.pool_name, "name the pool, e.g. ListenerConfig::new(\"main\", \"jobs\")")?;
        check_name("listener", &self.listener, "name the listener, e.g. ListenerConfig::new(\"main\", \"jobs\")")?;
        if self.keepalive.is_some_and(|k| k.is_zero()) {
            return Err(ConfigError::new(
                "keepalive",
                "is zero",
                "use a positive interval below the server's idle_session_timeout",
            ));
        }
        Ok(())
    }
}

/// A LISTEN/NOTIFY listener whose reconnects are counted, timed and explained.
///
/// `listen`, `listen_all`, `recv`, `try_recv` and `into_stream` behave as in sqlx's
/// `PgListener` (eager reconnect), with one difference: a connection reset is handled like
/// any other lost connection (sqlx returns it once as `Err(Io(ConnectionReset))`).
///
/// ```no_run
/// # use poolwatch::sqlx;
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
/// use std::time::Duration;
/// use poolwatch::{ListenerConfig, WatchedListener};
/// let config = ListenerConfig::new("main", "jobs").keepalive(Duration::from_secs(30));
/// let mut listener = WatchedListener::connect_with(&pool, config).await?; // takes one pool slot
/// listener.listen("jobs").await?;
/// loop {
///     let notification = listener.recv().await?;
///     println!("{}", notification.payload());
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct WatchedListener {
    inner: PgListener,
    /// Where a reconnect takes its connection from (the app pool, or the private pool of one).
    pool: PgPool,
    /// The private pool of [`WatchedListener::connect`]: it is never closed by the app.
    private_pool: bool,
    /// The channels listened to, in order (as sqlx's own list): re-LISTENed on reconnect.
    channels: Vec<String>,
    /// The oid of the listener's database (PostgreSQL 14+), for the reconnect's facts query.
    database: Option<i64>,
    config: ListenerConfig,
    metrics: Handles,
    /// Read at the last (re)connect: the lost session's settings and the counters before the loss.
    facts: ServerFacts,
    /// When the listener last sent a command (LISTEN, keepalive, the facts query), taken just
    /// before sending: the server's idle clock starts after it, so the silence is never underestimated.
    last_command: Instant,
    lost: Option<Box<Loss>>,
    /// Notifications read from a dead connection before it was dropped, not yet returned.
    pending: VecDeque<PgNotification>,
}

#[derive(Debug)]
struct Loss {
    since: Instant,
    idle_for: Duration,
    observed: Option<Cause>,
    /// The inner listener still holds the dead connection: its next `try_recv` drops it.
    dead_held: bool,
    attempts: u32,
    span: tracing::Span,
}

impl WatchedListener {
    /// Connects through `pool`: the listener holds one of its connections (one slot) for as
    /// long as it lives, and returns it on drop.
    pub async fn connect_with(pool: &PgPool, config: ListenerConfig) -> Result<Self, sqlx::Error> {
        config.validate().map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
        let metrics = Handles::new(&config);
        match PgListener::connect_with(pool).await {
            Ok(inner) => Self::start(inner, pool.clone(), false, config, metrics).await,
            Err(e) => Err(metrics.down(e)),
        }
    }

    /// Connects with a dedicated connection outside any app pool (a private pool of one, as
    /// sqlx's `PgListener::connect`): no app pool slot is ever taken.
    pub async fn connect(options: PgConnectOptions, config: ListenerConfig) -> Result<Self, sqlx::Error> {
        config.validate().map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
        let metrics = Handles::new(&config);
        let pool = PgPoolOptions::new().max_connections(1).max_lifetime(None).idle_timeout(None);
        let pool = match pool.connect_with(options).await {
            Ok(pool) => pool,
            Err(e) => return Err(metrics.down(e)),
        };
        match PgListener::connect_with(&pool).await {
            Ok(mut inner) => {
                inner.ignore_pool_close_event(true);
                Self::start(inner, pool, true, config, metrics).await
            }
            Err(e) => Err(metrics.down(e)),
        }
    }

    async fn start(
        mut inner: PgListener,
        pool: PgPool,
        private_pool: bool,
        config: ListenerConfig,
        metrics: Handles,
    ) -> Result<Self, sqlx::Error> {
        crate::catalog::describe();
        // The loss is seen by `try_recv`; the reconnect is ours, so it can be timed.
        inner.eager_reconnect(false);
        let conn = inner.acquire().await.map_err(|e| metrics.down(e))?;
        let sent = Instant::now();
        let facts = ServerFacts::read(conn).await.map_err(|e| metrics.down(e))?;
        let database = match ServerFacts::readable(conn) {
            true => Some(ServerFacts::database_oid(conn).await.map_err(|e| metrics.down(e))?),
            false => None,
        };
        if let Some(timeout) = facts.idle_session_timeout
            && config.keepalive.is_none_or(|k| k >= timeout)
        {
            tracing::warn!(
                pool = %config.pool_name,
                listener = %config.listener,
                idle_session_timeout = ?timeout,
                "the server ends sessions idle for idle_session_timeout, and a listener that only receives \
                 notifications is idle: it will be disconnected and notifications lost while it reconnects. \
                 Set ListenerConfig::keepalive below it."
            );
        }
        metrics.set_connected(true);
        Ok(WatchedListener {
            inner,
            pool,
            private_pool,
            channels: Vec::new(),
            database,
            config,
            metrics,
            facts,
            last_command: sent,
            lost: None,
            pending: VecDeque::new(),
        })
    }

    /// The listener's name (the `listener` label).
    pub fn name(&self) -> &str {
        &self.config.listener
    }

    /// `false` from a lost connection until LISTEN is re-established.
    pub fn is_connected(&self) -> bool {
        self.lost.is_none()
    }

    /// Starts listening on `channel` (as `PgListener::listen`).
    pub async fn listen(&mut self, channel: &str) -> Result<(), sqlx::Error> {
        self.reconnect_if_lost().await?;
        let sent = Instant::now();
        let result = self.inner.listen(channel).await;
        if result.is_ok() {
            self.channels.push(channel.to_owned());
        }
        self.after_command(sent, result)
    }

    /// Starts listening on every channel in `channels` (as `PgListener::listen_all`).
    pub async fn listen_all(&mut self, channels: impl IntoIterator<Item = &str>) -> Result<(), sqlx::Error> {
        self.reconnect_if_lost().await?;
        let channels: Vec<&str> = channels.into_iter().collect();
        let sent = Instant::now();
        let result = self.inner.listen_all(channels.iter().copied()).await;
        // sqlx keeps the channels even when LISTEN failed (it re-LISTENs them on reconnect): so do we.
        self.channels.extend(channels.iter().map(|c| (*c).to_owned()));
        self.after_command(sent, result)
    }

    /// Stops listening on `channel` (as `PgListener::unlisten`: no reconnect for it).
    pub async fn unlisten(&mut self, channel: &str) -> Result<(), sqlx::Error> {
        let sent = Instant::now();
        let result = self.inner.unlisten(channel).await;
        if result.is_ok()
            && let Some(at) = self.channels.iter().position(|c| c == channel)
        {
            self.channels.remove(at);
        }
        self.after_command(sent, result)
    }

    /// Stops listening on every channel (as `PgListener::unlisten_all`).
    pub async fn unlisten_all(&mut self) -> Result<(), sqlx::Error> {
        let sent = Instant::now();
        let result = self.inner.unlisten_all().await;
        if result.is_ok() {
            self.channels.clear();
        }
        self.after_command(sent, result)
    }

    /// The next notification; reconnects (visibly, in the metrics) as often as needed.
    /// Errors as `PgListener::recv`: a failed reconnect, a closed pool.
    pub async fn recv(&mut self) -> Result<PgNotification, sqlx::Error> {
        loop {
            if let Some(n) = self.try_recv().await? {
                return Ok(n);
            }
        }
    }

    /// The next notification, or `Ok(None)` once after a lost connection has been
    /// re-established (as `PgListener::try_recv` with eager reconnect). A failed reconnect
    /// attempt returns its error; the next call tries again.
    pub async fn try_recv(&mut self) -> Result<Option<PgNotification>, sqlx::Error> {
        loop {
            if let Some(n) = self.pending.pop_front() {
                return Ok(Some(self.delivered(n)));
            }
            if self.lost.is_some() {
                self.drop_dead().await?;
                if !self.pending.is_empty() {
                    continue;
                }
                self.reconnect().await?;
                return Ok(None);
            }
            let due = self.keepalive_due();
            if due.is_some_and(|at| at <= Instant::now()) {
                // Due: run it before reading, so a steady flow of notifications cannot starve it.
                self.keepalive().await;
                continue;
            }
            let received = match due {
                // Cancelling `try_recv` here is safe: with a live connection and eager reconnect
                // off, it only awaits sqlx's low-level read, which keeps partial messages buffered.
                Some(at) => tokio::select! {
                    biased;
                    r = self.inner.try_recv() => Some(r),
                    _ = tokio::time::sleep_until(at) => None,
                },
                None => Some(self.inner.try_recv().await),
            };
            match received {
                None => self.keepalive().await,
                Some(Ok(Some(n))) => return Ok(Some(self.delivered(n))),
                Some(Ok(None)) => self.lose(None, false),
                Some(Err(e)) if connection_lost(&e) => self.lose(Some(Cause::of(&e)), true),
                Some(Err(e)) => {
                    if matches!(e, sqlx::Error::PoolClosed) {
                        self.metrics.set_connected(false);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A stream of notifications (as `PgListener::into_stream`): it ends after the first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<PgNotification, sqlx::Error>> + Unpin + Send {
        Box::pin(futures_util::stream::unfold(Some(self), |listener| async move {
            let mut listener = listener?;
            match listener.recv().await {
                Ok(n) => Some((Ok(n), Some(listener))),
                Err(e) => Some((Err(e), None)),
            }
        }))
    }

    fn keepalive_due(&self) -> Option<Instant> {
        // Bounded: a keepalive of `Duration::MAX` ("never") must not overflow the clock.
        self.config.keepalive.map(|every| crate::schedule::after(self.last_command, every))
    }

    /// `SELECT 1` on the listener's connection. Notifications that arrive meanwhile are
    /// buffered by sqlx and returned by the next `try_recv`.
    async fn keepalive(&mut self) {
        let sent = Instant::now();
        let result = sqlx::query("SELECT 1").execute(&mut self.inner).await.map(|_| ());
        if let Err(e) = self.after_command(sent, result) {
            tracing::debug!(listener = %self.config.listener, cause = %Cause::of(&e), "listener keepalive failed");
            // Not a lost connection: try again one interval later, not at once.
            self.last_command = sent;
        }
    }

    fn after_command(&mut self, sent: Instant, result: Result<(), sqlx::Error>) -> Result<(), sqlx::Error> {
        match &result {
            Ok(()) => self.last_command = sent,
            Err(e) if connection_lost(e) => self.lose(Some(Cause::of(e)), true),
            Err(_) => {}
        }
        result
    }

    fn delivered(&self, n: PgNotification) -> PgNotification {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.metrics.metrics.notified(now.as_secs_f64());
        n
    }

    /// Marks the connection lost (once per loss; a later, more precise cause is kept).
    fn lose(&mut self, observed: Option<Cause>, dead_held: bool) {
        if let Some(loss) = self.lost.as_mut() {
            loss.observed = loss.observed.or(observed);
            loss.dead_held |= dead_held;
            return;
        }
        self.metrics.set_connected(false);
        let now = Instant::now();
        let span = tracing::warn_span!(
            "db.listener.reconnect",
            "db.client.connection.pool.name" = %self.config.pool_name,
            "db.system.name" = "postgresql",
            "poolwatch.listener.name" = %self.config.listener,
            "error.type" = tracing::field::Empty,
            "poolwatch.listener.cause_basis" = tracing::field::Empty,
            "poolwatch.listener.downtime_seconds" = tracing::field::Empty,
            "poolwatch.listener.reconnect_attempts" = tracing::field::Empty,
        );
        let idle_for = now.saturating_duration_since(self.last_command);
        self.lost = Some(Box::new(Loss { since: now, idle_for, observed, dead_held, attempts: 0, span }));
    }

    async fn reconnect_if_lost(&mut self) -> Result<(), sqlx::Error> {
        if self.lost.is_some() {
            self.drop_dead().await?;
            self.reconnect().await?;
        }
        Ok(())
    }

    /// After an error on a connection sqlx still holds: its `try_recv` reads what is left
    /// (kept in `pending`), sees the end and drops the connection, keeping its notification
    /// buffer for the next one.
    /// A reset socket reports `ConnectionReset` once before end of file, which sqlx returns as
    /// an error without dropping the connection: a few such errors are read past.
    async fn drop_dead(&mut self) -> Result<(), sqlx::Error> {
        let mut errors = 0;
        while self.lost.as_ref().is_some_and(|l| l.dead_held) {
            match self.inner.try_recv().await {
                Ok(Some(n)) => self.pending.push_back(n),
                Ok(None) => {
                    if let Some(l) = self.lost.as_mut() {
                        l.dead_held = false;
                    }
                }
                Err(e) if connection_lost(&e) && errors < 3 => errors += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One reconnect attempt: a fresh connection, then every channel re-LISTENed and the server
    /// facts read in one round trip (sqlx's own reconnect spends one on LISTEN alone: a second
    /// one for the facts made each reconnect about 20 % slower than sqlx's under a loaded machine).
    async fn reconnect(&mut self) -> Result<(), sqlx::Error> {
        let Some(loss) = self.lost.as_mut() else { return Ok(()) };
        loss.attempts += 1;
        let (sent, read) = match self.relisten().await {
            Ok(done) => done,
            Err(e) => {
                if let Some(loss) = self.lost.as_ref() {
                    tracing::debug!(
                        parent: &loss.span,
                        listener = %self.config.listener,
                        attempt = loss.attempts,
                        cause = %Cause::of(&e),
                        "listener reconnect attempt failed"
                    );
                }
                return Err(e);
            }
        };
        let Some(loss) = self.lost.take() else { return Ok(()) };
        // LISTEN is re-established: the data-loss window ends here.
        let downtime = loss.since.elapsed();
        self.last_command = sent;
        // A failed read keeps the last good facts (the settings rarely change between two
        // connects; the counters then span two losses), and this loss is judged without fresh
        // counters. A read that failed because the new session was lost too starts the next loss
        // at once, with the error's exact cause.
        let (after, lost_again) = match read {
            Ok(facts) => (Some(facts), None),
            Err(e) => {
                tracing::debug!(listener = %self.config.listener, cause = %Cause::of(&e), "reading the server facts after a reconnect failed; keeping the last ones");
                (None, connection_lost(&e).then(|| Cause::of(&e)))
            }
        };
        // A bare end of file says no more than sqlx's silent `Ok(None)`: explain both the same way.
        let (cause, basis) = match loss.observed {
            Some(cause) if cause != Cause::ConnectionEnded => (cause, Basis::Observed),
            _ => explain_silent_loss(
                loss.idle_for,
                self.facts.idle_session_timeout,
                self.facts.ends,
                after.and_then(|f| f.ends),
            ),
        };
        if let Some(facts) = after {
            self.facts = facts;
        }
        self.metrics.reconnected(cause, basis, downtime);
        let seconds = downtime.as_secs_f64();
        loss.span
            .record("error.type", cause.as_str())
            .record("poolwatch.listener.cause_basis", basis.as_str())
            .record("poolwatch.listener.downtime_seconds", seconds)
            .record("poolwatch.listener.reconnect_attempts", loss.attempts);
        tracing::warn!(
            parent: &loss.span,
            pool = %self.config.pool_name,
            listener = %self.config.listener,
            %cause,
            cause_basis = basis.as_str(),
            downtime_seconds = seconds,
            attempts = loss.attempts,
            "listener reconnected; notifications sent while it was down were lost"
        );
        if let Some(cause) = lost_again {
            self.lose(Some(cause), true);
        }
        Ok(())
    }

    /// Takes a fresh connection and re-LISTENs every channel with the facts query in the same
    /// batch. Returns when the batch was sent and the facts (or why they could not be read).
    /// `Err` when LISTEN could not be re-established: the attempt failed, the loss goes on.
    async fn relisten(&mut self) -> Result<(Instant, Result<ServerFacts, sqlx::Error>), sqlx::Error> {
        // A new sqlx listener only acquires a connection (no query): the LISTEN batch is ours.
        let mut fresh = PgListener::connect_with(&self.pool).await?;
        fresh.eager_reconnect(false);
        fresh.ignore_pool_close_event(self.private_pool);
        let mut old = std::mem::replace(&mut self.inner, fresh);
        while let Some(n) = old.next_buffered() {
            self.pending.push_back(n);
        }
        drop(old);
        let conn = self.inner.acquire().await?;
        let with_facts = self.database.filter(|_| ServerFacts::readable(conn));
        let listen = listen_all_query(&self.channels);
        let batch = match with_facts {
            Some(database) => format!("{listen}{}", ServerFacts::reconnect_query(database)),
            None => listen.clone(),
        };
        let sent = Instant::now();
        if batch.is_empty() {
            return Ok((sent, Ok(ServerFacts::default())));
        }
        let facts = match crate::sqlx_adapter::fetch_all_text(&mut *conn, batch).await {
            Ok(_) if with_facts.is_none() => Ok(ServerFacts::default()),
            Ok(rows) => ServerFacts::from_reconnect_rows(&rows),
            Err(e) if connection_lost(&e) => {
                // The fresh connection is lost already: the next `try_recv` drops it, then tries again.
                if let Some(loss) = self.lost.as_mut() {
                    loss.dead_held = true;
                }
                return Err(e);
            }
            // The batch is one implicit transaction: a failed facts query undid the LISTENs too.
            // LISTEN alone then; this loss is judged without fresh facts.
            Err(e) => {
                if !listen.is_empty()
                    && let Err(again) = crate::sqlx_adapter::fetch_all_text(&mut *conn, listen).await
                {
                    if connection_lost(&again)
                        && let Some(loss) = self.lost.as_mut()
                    {
                        loss.dead_held = true;
                    }
                    return Err(again);
                }
                Err(e)
            }
        };
        Ok((sent, facts))
    }
}

/// `LISTEN` every channel in one batch, quoted as sqlx quotes them (case kept, `"` doubled,
/// cut at a NUL).
fn listen_all_query(channels: &[String]) -> String {
    channels.iter().fold(String::new(), |mut query, channel| {
        let channel = channel.split('\0').next().unwrap_or_default();
        query.push_str("LISTEN \"");
        query.push_str(&channel.replace('"', "\"\""));
        query.push_str("\";");
        query
    })
}

impl Drop for WatchedListener {
    fn drop(&mut self) {
        self.metrics.set_connected(false);
    }
}

/// The ways an idle-session kill can be known (see `loss::explain_silent_loss`).
const ZERO_BASES: [Basis; 3] = [Basis::Observed, Basis::ServerCounters, Basis::IdleTime];

#[derive(Debug)]
struct Handles {
    metrics: ListenerMetrics,
    status: Registered,
}

impl Handles {
    fn new(config: &ListenerConfig) -> Handles {
        Handles {
            metrics: ListenerMetrics::new(&config.pool_name, &config.listener, &ZERO_BASES.map(Basis::as_str)),
            status: Registered::new(&config.pool_name, &config.listener, config.keepalive),
        }
    }

    /// Marks the listener down and hands `e` back (for a failed first connect).
    fn down(&self, e: sqlx::Error) -> sqlx::Error {
        self.set_connected(false);
        e
    }

    fn set_connected(&self, up: bool) {
        self.metrics.connected(up);
        self.status.connected(up);
    }

    fn reconnected(&self, cause: Cause, basis: Basis, downtime: Duration) {
        self.metrics.reconnected(cause, basis.as_str(), downtime.as_secs_f64());
        self.status.reconnected(cause);
    }
}
