//! Plain structs of figures: what the pool believes, what really exists, and the gap.

use std::time::Duration;

use sqlx::PgPool;

use crate::ledger::census::ServerCensus;
use crate::ledger::sockets::SocketCensus;

/// What the pool believes, read from its own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PoolFigures {
    /// Connections the pool counts as open (idle + checked out, leaked ones included).
    pub open: u32,
    /// Idle connections.
    pub idle: u32,
    /// Checked-out connections (`open - idle`).
    pub used: u32,
    /// `max_connections`.
    pub max: u32,
    /// `min_connections`.
    pub min: u32,
}

impl PoolFigures {
    /// Reads the pool's counters now.
    pub fn of(pool: &PgPool) -> PoolFigures {
        let open = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(open);
        PoolFigures {
            open,
            idle,
            used: open - idle,
            max: pool.options().get_max_connections(),
            min: pool.options().get_min_connections(),
        }
    }
}

/// The latest figures of one watched pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The pool's own counters at the last sample or census.
    pub pool: PoolFigures,
    /// The server sessions of this pool at the last successful census (`None` before one).
    pub server: Option<ServerCensus>,
    /// The pool's sockets to the database at the last sample, each of them listed (`None`:
    /// unix socket, not Linux, or no sample yet).
    pub sockets: Option<SocketCensus>,
    /// The client-side gap at the last sample: `pool.open` minus the pool's established
    /// sockets. Positive: slots whose connection is gone (closed by the server or a pooler,
    /// or half-closed: `close_wait`). Costs the server nothing; `None` when `sockets` is.
    pub client_gap: Option<i64>,
    /// `pool.open - server.total()` at the last successful census (behind a pooler:
    /// `pool.open - pooler.clients`; `None` behind a pooler without its admin console):
    /// connections the pool counts that do not exist on the server. Negative: sessions the pool no longer counts
    /// (e.g. `detach()`ed) are still open.
    pub phantom: Option<i64>,
    /// Whether the last census succeeded.
    pub census_up: bool,
    /// The pooler's view at the last census (`None`: no pooler admin console declared).
    pub pooler: Option<crate::ledger::pooler::PoolerFigures>,
    /// Sessions of this pool that ended without the pool closing them, since instrumented.
    pub sessions_ended: u64,
}

/// Why a connection closed, as far as sqlx lets it be told (see `docs/lifecycle.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Idle past the pool's `idle_timeout` (closed by sqlx's reaper).
    IdleTimeout,
    /// Older than the pool's `max_lifetime`.
    MaxLifetime,
    /// Any other close: a failed ping, an error, or closed or detached by the app.
    Broken,
    /// The pool was closed.
    PoolClosed,
}

impl CloseReason {
    /// Every reason, in the order of [`LifecycleFigures::closed`].
    pub const ALL: [CloseReason; 4] =
        [CloseReason::IdleTimeout, CloseReason::MaxLifetime, CloseReason::Broken, CloseReason::PoolClosed];

    /// The label value (`reason` of `poolwatch_connections_closed_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::Broken => "broken",
            CloseReason::PoolClosed => "pool_closed",
        }
    }
}

/// The lifecycle figures of one pool (needs the hooks of
/// [`instrument_options_named`](crate::acquire::bare::instrument_options_named)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LifecycleFigures {
    /// Connections opened since the hooks were installed.
    pub opened: u64,
    /// Connections closed, by reason, indexed like [`CloseReason::ALL`].
    pub closed: [u64; 4],
    /// Connections opened and not yet counted closed.
    pub open: u32,
    /// How old the oldest of them is (`None`: none open).
    pub oldest_age: Option<Duration>,
}

impl LifecycleFigures {
    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL.iter().position(|r| *r == reason).map_or(0, |i| self.closed[i])
    }
}
