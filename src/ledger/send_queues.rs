//! Stuck send queues: the pool's sockets whose send queue never drains (a silent peer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ledger::sockets::SocketCensus;

/// Sockets whose send queue stays non-empty from census to census: the peer stopped
/// acknowledging (a silent peer: no RST, no FIN, e.g. a NAT that dropped the flow). A busy
/// socket drains between censuses; a silent one never does.
#[derive(Debug)]
pub(crate) struct StuckSendQueues {
    bound: Duration,
    since: Mutex<HashMap<u64, Instant>>,
}

impl StuckSendQueues {
    pub(crate) fn new(bound: Duration) -> StuckSendQueues {
        StuckSendQueues { bound, since: Mutex::new(HashMap::new()) }
    }

    /// Takes this census's queues; returns how many sockets have had a
    /// non-empty send queue at every census for at least the bound.
    pub(crate) fn update(&self, census: &SocketCensus) -> u32 {
        let now = Instant::now();
        let Ok(mut since) = self.since.lock() else { return 0 };
        since.retain(|inode, _| census.send_queued.iter().any(|q| q.inode == *inode));
        for q in &census.send_queued {
            since.entry(q.inode).or_insert(now);
        }
        let stuck = since.values().filter(|at| now.saturating_duration_since(**at) >= self.bound).count();
        u32::try_from(stuck).unwrap_or(u32::MAX)
    }

    /// The figure of the last census.
    pub(crate) fn figure(&self) -> u32 {
        let now = Instant::now();
        self.since.lock().map_or(0, |s| {
            u32::try_from(s.values().filter(|at| now.saturating_duration_since(**at) >= self.bound).count())
                .unwrap_or(0)
        })
    }
}
