//! Lifecycle figures: connections opened, closed by reason, and the oldest connection's age
//! (what pgx, bb8 and Go's `database/sql` report and sqlx does not).
//!
//! sqlx 0.9 has hooks for a connection opened (`after_connect`), handed out from the idle
//! queue (`before_acquire`) and given back (`after_release`), each with the connection's age,
//! but none for a close, and its pool counts only what is open now (`size()`). So:
//!
//! - **opened** is counted by the `after_connect` hook;
//! - **closed** = opened minus what the pool counts open, read at each sample;
//! - **the reason** of each close is inferred from sqlx's rules and what the hooks last saw of
//!   each connection: the pool is closed (`pool_closed`); a connection idle past `idle_timeout`
//!   (`idle_timeout`: only sqlx's reaper closes idle ones); one older than `max_lifetime`
//!   (`max_lifetime`: the reaper, or on release, where sqlx checks the age before
//!   `after_release`); anything else is `broken` (a failed ping on release or on acquire, a
//!   failed connection dropped by the app, or a `close()` / `detach()` by the app).
//! - **the oldest age** is the oldest connection the hooks saw opened and not yet counted closed.
//!
//! What sqlx hides: which connection closed. When several could have closed, the one sqlx's
//! queue order makes likeliest is taken (the longest idle). A connection opened for an acquire
//! goes to the app without `before_acquire`: until its first release it reads as idle since
//! its connect, so a broken close next to it can read as `idle_timeout` when it is held longer
//! than `idle_timeout`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::ledger::snapshot::{CloseReason, LifecycleFigures};

/// One connection as the hooks last saw it (a copy, for [`pick`]).
#[derive(Debug, Clone, Copy)]
struct Conn {
    /// When `after_connect` ran (at most a few µs before sqlx's own `created_at`).
    created: Instant,
    /// Since when it has been idle, by the last hook (connect or release); `None`: handed out.
    idle_since: Option<Instant>,
}

/// One open connection in the index; only its own hooks write it.
#[derive(Debug)]
struct Slot {
    created: Instant,
    /// Nanoseconds from [`Lifecycle::base`] to the start of its idle time, plus 1; 0: handed
    /// out. [`RELEASED`] is set when the idle time began with a release by the app.
    idle_since: AtomicU64,
    /// At its last acquire from the idle queue after a release: when that release was
    /// (stamped like `idle_since`) and when it was taken again; 0: never.
    popped_release: AtomicU64,
    popped_at: AtomicU64,
}

/// The open connections by creation time, replaced whole (never changed) when one opens or
/// closes: the hooks read it without a lock.
#[derive(Debug, Default)]
struct Index {
    generation: u64,
    /// The slots by creation time (ns from [`Lifecycle::base`]), sorted, each beside its
    /// slot: the search compares plain integers, and its last step reads the line that holds
    /// the slot's address (a pool of hundreds cycles through them, so each line is cold).
    entries: Vec<(u64, Arc<Slot>)>,
}

impl Index {
    fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.entries.iter().map(|(_, s)| s)
    }
}

/// How many pools' indexes a thread keeps copies of (the least recently added goes first).
const CACHED_POOLS: usize = 16;

thread_local! {
    /// Each thread's copy of the index of each ledger (by id), refreshed when its generation
    /// moved: the acquire and release hooks read this, not the ledger's lock.
    static CACHED: RefCell<Vec<(u64, Arc<Index>)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A release older than this that has not reached the idle queue is stuck, not in flight.
const STUCK_AFTER: Duration = Duration::from_secs(1);

/// The bit of [`Slot::idle_since`] set by `after_release` (not by a connect).
const RELEASED: u64 = 1 << 63;

/// The lifecycle ledger of one pool name, kept with its other bare-pool figures
/// (`bare::BareFigures`, the one registry of pools by name).
///
/// Per acquire or release the hooks do one atomic load, a binary search of the index in the
/// thread's own copy and one atomic store into that connection's slot: no lock, no scan. A
/// connect or a counted close (rare, and each costs the server a fork) copies the index.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    id: u64,
    base: Instant,
    opened: AtomicU64,
    closed: [AtomicU64; 4],
    /// The index's generation, read by the hooks to tell whether their copy is current.
    generation: AtomicU64,
    /// Taken to replace the index (connect, reconcile) and by a hook whose copy is stale.
    index: Mutex<Arc<Index>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            base: Instant::now(),
            opened: AtomicU64::new(0),
            closed: Default::default(),
            generation: AtomicU64::new(0),
            index: Mutex::new(Arc::default()),
        }
    }
}

impl Lifecycle {
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn stamp(&self, at: Instant) -> u64 {
        stamp_of(self.nanos(at))
    }

    fn idle_since(&self, slot: &Slot) -> Option<Instant> {
        let stamp = slot.idle_since.load(Ordering::Relaxed) & !RELEASED;
        stamp.checked_sub(1).and_then(|ns| self.base.checked_add(Duration::from_nanos(ns)))
    }

    /// What the hooks know of the slots not handed out, for the stranded-slot reading.
    pub(crate) fn releases(&self, now: Instant) -> Releases {
        let Ok(index) = self.index.lock() else { return Releases::default() };
        let stuck_after = u64::try_from(STUCK_AFTER.as_nanos()).unwrap_or(u64::MAX);
        let old = self.stamp(now).saturating_sub(stuck_after);
        let mut r = Releases::default();
        // The idle queue is first in, first out: a connection taken again more than
        // `STUCK_AFTER` after an earlier release proves that earlier one was not in the queue.
        // Sorted by release, with the latest take of any release at or after each one.
        let mut proof: Vec<(u64, u64)> = index
            .slots()
            .map(|s| (s.popped_release.load(Ordering::Relaxed), s.popped_at.load(Ordering::Relaxed)))
            .filter(|(release, _)| *release != 0)
            .collect();
        proof.sort_unstable();
        for i in (1..proof.len()).rev() {
            proof[i - 1].1 = proof[i - 1].1.max(proof[i].1);
        }
        let passed_over = |at: u64| {
            let i = proof.partition_point(|(release, _)| *release <= at);
            proof.get(i).is_some_and(|(_, popped)| popped.saturating_sub(at) > stuck_after)
        };
        for s in index.slots() {
            let v = s.idle_since.load(Ordering::Relaxed);
            if v == 0 {
                r.handed_out += 1;
            } else if v & RELEASED != 0 {
                let at = v & !RELEASED;
                if at <= old {
                    r.old += 1;
                }
                if passed_over(at) {
                    r.passed_over += 1;
                }
            }
        }
        r
    }

    /// Replaces the index with `slots` (sorted by creation time).
    fn replace(&self, index: &mut Arc<Index>, slots: Vec<Arc<Slot>>) {
        let generation = index.generation.wrapping_add(1);
        let entries = slots.into_iter().map(|s| (self.nanos(s.created), s)).collect();
        *index = Arc::new(Index { generation, entries });
        self.generation.store(generation, Ordering::Release);
    }

    /// `after_connect`: one more connection, idle as far as the hooks know.
    pub(crate) fn on_connect(&self) {
        let now = Instant::now();
        self.opened.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            created: now,
            idle_since: AtomicU64::new(self.stamp(now)),
            popped_release: AtomicU64::new(0),
            popped_at: AtomicU64::new(0),
        });
        if let Ok(mut index) = self.index.lock() {
            let mut slots: Vec<Arc<Slot>> = index.slots().cloned().collect();
            let at = slots.partition_point(|s| s.created <= now);
            slots.insert(at, slot);
            self.replace(&mut index, slots);
        }
    }

    /// The index as this thread last copied it, refreshed if a connect or close replaced it.
    fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> Option<T> {
        let generation = self.generation.load(Ordering::Acquire);
        CACHED
            .try_with(|cached| {
                let mut cached = cached.try_borrow_mut().ok()?;
                let at = match cached.iter().position(|(id, _)| *id == self.id) {
                    Some(at) => at,
                    None => {
                        // Bounded: a process that opens a pool per tenant must not keep every
                        // closed pool's index alive on every thread.
                        if cached.len() >= CACHED_POOLS {
                            cached.remove(0);
                        }
                        cached.push((self.id, Arc::default()));
                        cached.len() - 1
                    }
                };
                let entry = cached.get_mut(at)?;
                if entry.1.generation != generation || entry.1.entries.is_empty() {
                    entry.1 = self.index.lock().ok()?.clone();
                }
                Some(f(&entry.1))
            })
            .ok()
            .flatten()
    }

    /// `before_acquire` (`idle` = false) or `after_release` (true): the connection of age
    /// `age` (the one opened nearest `now - age`) changed hands.
    pub(crate) fn seen(&self, age: Duration, idle: bool) {
        let now = self.nanos(Instant::now());
        let created = now.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX));
        let stamp = stamp_of(now);
        self.with_index(|index| {
            let Some(slot) = nearest(index, created, idle) else { return };
            if idle {
                slot.idle_since.store(stamp | RELEASED, Ordering::Relaxed);
                return;
            }
            let before = slot.idle_since.swap(0, Ordering::Relaxed);
            if before & RELEASED != 0 {
                slot.popped_release.store(before & !RELEASED, Ordering::Relaxed);
                slot.popped_at.store(stamp, Ordering::Relaxed);
            }
        });
    }

    /// Counts the closes since the last call: the connections the hooks saw opened that the
    /// pool no longer counts. Returns how many closed, by reason (like [`CloseReason::ALL`]).
    pub(crate) fn reconcile(&self, pool: &PgPool) -> [u64; 4] {
        let mut new = [0u64; 4];
        let Ok(mut index) = self.index.lock() else { return new };
        // Read under the lock: `after_connect` runs after the pool counted the connection, so
        // a connection being opened makes this read low, never high.
        let size = pool.size() as usize;
        let gone = index.entries.len().saturating_sub(size);
        if gone == 0 {
            return new;
        }
        let mut slots: Vec<Arc<Slot>> = index.slots().cloned().collect();
        let mut conns: Vec<Conn> =
            slots.iter().map(|s| Conn { created: s.created, idle_since: self.idle_since(s) }).collect();
        let options = pool.options();
        let now = Instant::now();
        for _ in 0..gone {
            let (i, reason) = if pool.is_closed() {
                (oldest(&conns), CloseReason::PoolClosed)
            } else {
                pick(&conns, now, options.get_idle_timeout(), options.get_max_lifetime())
            };
            if i >= conns.len() {
                break;
            }
            // `remove`, not `swap_remove`: the index stays sorted by creation time.
            conns.remove(i);
            slots.remove(i);
            let r = CloseReason::ALL.iter().position(|x| *x == reason).unwrap_or(2);
            new[r] += 1;
            self.closed[r].fetch_add(1, Ordering::Relaxed);
        }
        self.replace(&mut index, slots);
        new
    }

    /// The figures now (after [`reconcile`](Self::reconcile)).
    pub(crate) fn figures(&self) -> LifecycleFigures {
        let now = Instant::now();
        let (open, oldest_age) = self.index.lock().map_or((0, None), |index| {
            // Sorted by creation time: the first is the oldest.
            let oldest = index.slots().next().map(|s| now.saturating_duration_since(s.created));
            (u32::try_from(index.entries.len()).unwrap_or(u32::MAX), oldest)
        });
        LifecycleFigures {
            opened: self.opened.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
            open,
            oldest_age,
        }
    }
}

/// A time `ns` from [`Lifecycle::base`] as a slot stores it: plus 1 (0 means none), below
/// [`RELEASED`].
fn stamp_of(ns: u64) -> u64 {
    ns.min(RELEASED - 2).saturating_add(1)
}

/// The slots the hooks last saw given back or handed out (see [`Lifecycle::releases`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Releases {
    /// Handed out to the app (an acquire from the idle queue, not given back since).
    handed_out: usize,
    /// Given back over [`STUCK_AFTER`] ago and not taken again.
    old: usize,
    /// Given back, not taken again, and passed over: a connection released later was taken
    /// from the idle queue over [`STUCK_AFTER`] after this release.
    passed_over: usize,
}

/// How far apart two connects can be and still be told apart by their age alone: the hook
/// reads the age a moment after sqlx computed it, and a thread can be preempted in between.
const AMBIGUOUS: Duration = Duration::from_millis(500);

/// At most this many neighbours on each side are looked at: the work stays bounded.
const NEIGHBOURS: usize = 8;

/// The slot a hook's connection most likely is: the one created nearest `created`, but among
/// those created within [`AMBIGUOUS`] of it, the nearest whose state fits the event (an
/// acquire takes an idle connection, a release gives back one that was out). Without that
/// preference, connects made together can swap, and an acquire that clears the wrong slot
/// leaves a released mark on a connection the app holds.
///
/// The neighbours are visited nearest first, so the search usually stops at the first slot
/// it reads.
fn nearest(index: &Index, created: u64, release: bool) -> Option<&Arc<Slot>> {
    let at = index.entries.partition_point(|(c, _)| *c <= created);
    let (floor, ceiling) = (at.saturating_sub(NEIGHBOURS), at.saturating_add(NEIGHBOURS).min(index.entries.len()));
    let fits = |s: &Slot| {
        let v = s.idle_since.load(Ordering::Relaxed);
        if release { v & RELEASED == 0 } else { v != 0 }
    };
    let ambiguous = u64::try_from(AMBIGUOUS.as_nanos()).unwrap_or(u64::MAX);
    let distance = |i: usize| index.entries.get(i).map_or(u64::MAX, |(c, _)| c.abs_diff(created));
    // Below `at` the creation times fall going down, from `at` on they rise: merging the two
    // runs visits the neighbours by distance (the earlier one first on a tie).
    let (mut down, mut up) = (at, at);
    let mut closest = None;
    loop {
        let i = match (down > floor, up < ceiling) {
            (true, true) if distance(down - 1) <= distance(up) => down - 1,
            (_, true) => up,
            (true, false) => down - 1,
            (false, false) => break,
        };
        if i < at {
            down = i;
        } else {
            up = i + 1;
        }
        closest.get_or_insert(i);
        let (_, slot) = index.entries.get(i)?;
        if distance(i) > ambiguous {
            break;
        }
        if fits(slot) {
            return Some(slot);
        }
    }
    closest.and_then(|i| index.entries.get(i)).map(|(_, s)| s)
}

fn oldest(conns: &[Conn]) -> usize {
    conns.iter().enumerate().min_by_key(|(_, c)| c.created).map_or(0, |(i, _)| i)
}

/// The connection that most likely closed, and why: the longest idle one past `idle_timeout`
/// (sqlx's reaper checks that first), else the oldest past `max_lifetime`, else the longest
/// idle one (a failed ping on acquire takes the head of sqlx's idle queue) or the oldest.
fn pick(
    conns: &[Conn],
    now: Instant,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
) -> (usize, CloseReason) {
    let longest_idle = conns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.idle_since.map(|t| (i, now.saturating_duration_since(t))))
        .max_by_key(|(_, idle)| *idle);
    if let (Some((i, idle)), Some(timeout)) = (longest_idle, idle_timeout)
        && idle >= timeout
    {
        return (i, CloseReason::IdleTimeout);
    }
    let o = oldest(conns);
    if let (Some(c), Some(max)) = (conns.get(o), max_lifetime)
        && now.saturating_duration_since(c.created) >= max
    {
        return (o, CloseReason::MaxLifetime);
    }
    (longest_idle.map_or(o, |(i, _)| i), CloseReason::Broken)
}

/// One watched pool's lifecycle ledger, as the watch reads it (published by
/// [`publish::pool`](crate::publish::pool)).
#[derive(Debug)]
pub(crate) struct Published {
    ledger: Arc<Lifecycle>,
    pool: PgPool,
}

impl Published {
    /// The ledger of `pool`, whose options carry the hooks that feed it.
    pub(crate) fn new(pool: &PgPool, ledger: Arc<Lifecycle>) -> Published {
        Published { ledger, pool: pool.clone() }
    }

    /// Slots the app released (the hooks saw `after_release`) over [`STUCK_AFTER`] ago, that
    /// the pool does not count idle: a lower bound of the slots stuck in sqlx's return-to-pool
    /// cleanup. A busy pool always has a few releases in flight (sqlx pings each connection
    /// before it goes idle): those are younger. Read after [`read`](Self::read), which
    /// drops the connections that closed.
    ///
    /// Two lower bounds, the larger wins. Releases over `STUCK_AFTER` old minus every idle
    /// connection reads 0 on a busy pool (its recent releases sit in the idle queue), so the
    /// queue's order is used too: releases passed over by a later one (sqlx hands out the
    /// longest idle first), as far as the slots not idle and not handed out allow.
    pub(crate) fn released_not_idle(&self) -> u32 {
        let idle = self.pool.num_idle();
        let out = (self.pool.size() as usize).saturating_sub(idle);
        let r = self.ledger.releases(Instant::now());
        let passed_over = r.passed_over.min(out.saturating_sub(r.handed_out));
        u32::try_from(r.old.saturating_sub(idle).max(passed_over).min(out)).unwrap_or(u32::MAX)
    }

    /// Counts the closes since the last reading; returns the figures (publishes nothing).
    pub(crate) fn read(&self) -> LifecycleFigures {
        self.ledger.reconcile(&self.pool);
        self.ledger.figures()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_likeliest_close_is_picked_by_sqlx_rules() {
        let now = Instant::now();
        let ago = |s: u64| now - Duration::from_secs(s);
        let conns = [
            Conn { created: ago(100), idle_since: None },
            Conn { created: ago(50), idle_since: Some(ago(40)) },
            Conn { created: ago(30), idle_since: Some(ago(5)) },
        ];
        let s = Duration::from_secs;
        assert_eq!(pick(&conns, now, Some(s(30)), None), (1, CloseReason::IdleTimeout));
        assert_eq!(pick(&conns, now, Some(s(60)), Some(s(90))), (0, CloseReason::MaxLifetime));
        assert_eq!(pick(&conns, now, Some(s(60)), Some(s(120))), (1, CloseReason::Broken));
        assert_eq!(pick(&conns, now, None, None), (1, CloseReason::Broken));
    }

    /// The acquire and release hooks never wait for the ledger's lock (held here as a
    /// connect or a sample would): the hot path takes no pool-wide lock.
    #[test]
    fn hooks_never_wait_for_the_ledger_lock() {
        let ledger = Arc::new(Lifecycle::default());
        for _ in 0..512 {
            ledger.on_connect();
        }
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let l = Arc::clone(&ledger);
        let hooks = std::thread::spawn(move || {
            l.seen(Duration::ZERO, true); // this thread's first use
            ready_tx.send(()).ok();
            go_rx.recv().ok();
            for i in 0..10_000u64 {
                l.seen(Duration::from_micros(i % 700), i % 2 == 0);
            }
            done_tx.send(()).ok();
        });
        ready.recv().unwrap();
        let held = ledger.index.lock().unwrap();
        go.send(()).unwrap();
        let finished = done.recv_timeout(Duration::from_secs(20));
        drop(held);
        hooks.join().unwrap();
        assert!(finished.is_ok(), "10,000 acquire/release hooks waited for the ledger's lock");
    }

    #[test]
    fn a_hook_marks_the_connection_nearest_its_age() {
        let ledger = Lifecycle::default();
        for _ in 0..3 {
            ledger.on_connect();
            std::thread::sleep(Duration::from_millis(20));
        }
        let created: Vec<Instant> = ledger.index.lock().unwrap().slots().map(|s| s.created).collect();
        // The middle one is handed out, then given back.
        ledger.seen(created[1].elapsed(), false);
        let idle = |l: &Lifecycle| -> Vec<bool> {
            l.index.lock().unwrap().slots().map(|s| l.idle_since(s).is_some()).collect()
        };
        assert_eq!(idle(&ledger), [true, false, true]);
        ledger.seen(created[1].elapsed(), true);
        assert_eq!(idle(&ledger), [true, true, true]);
        assert!(ledger.figures().oldest_age.unwrap() >= created[0].elapsed() - Duration::from_millis(1));
    }

    /// The search by distance picks what a scan of every neighbour picks (the nearest fitting
    /// slot within `AMBIGUOUS`, else the nearest), on indexes with clustered connects.
    #[test]
    fn the_nearest_first_search_agrees_with_a_full_scan() {
        fn by_scan(index: &Index, created: u64, release: bool) -> Option<usize> {
            let at = index.entries.partition_point(|(c, _)| *c <= created);
            let (lo, hi) = (at.saturating_sub(NEIGHBOURS), (at + NEIGHBOURS).min(index.entries.len()));
            let ambiguous = AMBIGUOUS.as_nanos() as u64;
            let fits = |s: &Slot| {
                let v = s.idle_since.load(Ordering::Relaxed);
                if release { v & RELEASED == 0 } else { v != 0 }
            };
            let mut closest: Option<(u64, usize)> = None;
            let mut fitting: Option<(u64, usize)> = None;
            for i in lo..hi {
                let d = index.entries[i].0.abs_diff(created);
                if closest.is_none_or(|(b, _)| d < b) {
                    closest = Some((d, i));
                }
                if d <= ambiguous && fitting.is_none_or(|(b, _)| d < b) && fits(&index.entries[i].1) {
                    fitting = Some((d, i));
                }
            }
            fitting.or(closest).map(|(_, i)| i)
        }
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let len = 1 + next(40) as usize;
            // Connects in bursts: gaps from 1 ns to 2 s, so some runs are ambiguous, some not.
            let mut at = 1_000_000_000_000u64;
            let mut created = Vec::new();
            for _ in 0..len {
                at += [1, 1_000, 3_000_000, 400_000_000, 2_000_000_000][next(5) as usize] + next(1_000);
                created.push(at);
            }
            let entries = created
                .into_iter()
                .map(|c| {
                    let state = [0, 5, 5 | RELEASED][next(3) as usize];
                    let slot = Arc::new(Slot {
                        created: Instant::now(),
                        idle_since: AtomicU64::new(state),
                        popped_release: AtomicU64::new(0),
                        popped_at: AtomicU64::new(0),
                    });
                    (c, slot)
                })
                .collect();
            let index = Index { generation: 0, entries };
            for _ in 0..50 {
                let probe = index.entries[next(len as u64) as usize].0.saturating_sub(next(600_000_000)) + next(5);
                let release = next(2) == 0;
                let got = nearest(&index, probe, release).map(Arc::as_ptr);
                let want = by_scan(&index, probe, release).map(|i| Arc::as_ptr(&index.entries[i].1));
                assert_eq!(
                    got,
                    want,
                    "round {round}: probe {probe} in {:?}",
                    index.entries.iter().map(|e| e.0).collect::<Vec<_>>()
                );
            }
        }
    }

    /// sqlx hands out the longest idle connection first: a release passed over by a later
    /// release taken again over a second after it is not in the idle queue, however many
    /// connections are idle now.
    #[test]
    fn a_release_passed_over_by_the_idle_queue_is_stuck() {
        let ledger = Lifecycle::default();
        for _ in 0..3 {
            ledger.on_connect();
        }
        let secs = |s: u64| ledger.stamp(ledger.base + Duration::from_secs(s));
        {
            let index = ledger.index.lock().unwrap();
            let [stuck, busy, other] = [0, 1, 2].map(|i| &index.entries[i].1);
            // Both given back at 10 s; `busy` was taken again at 12 s and given back at 12.5 s.
            stuck.idle_since.store(secs(10) | RELEASED, Ordering::Relaxed);
            busy.popped_release.store(secs(10) + 1, Ordering::Relaxed);
            busy.popped_at.store(secs(12), Ordering::Relaxed);
            busy.idle_since.store((secs(12) + 500_000_000) | RELEASED, Ordering::Relaxed);
            other.idle_since.store(0, Ordering::Relaxed);
        }
        let r = ledger.releases(ledger.base + Duration::from_millis(12_700));
        assert_eq!((r.handed_out, r.old, r.passed_over), (1, 1, 1));
        // Taken again too soon after the release to tell: no proof.
        ledger.index.lock().unwrap().entries[1].1.popped_at.store(secs(10) + 900_000_000, Ordering::Relaxed);
        let r = ledger.releases(ledger.base + Duration::from_millis(12_700));
        assert_eq!((r.old, r.passed_over), (1, 0));
    }
}
