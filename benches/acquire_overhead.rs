//! What the watched pool handle costs, measured in one run against the bare pool on a
//! throwaway local server (a bench binary: `cargo bench --bench acquire_overhead`).
//!
//! (a) acquire + release of an idle connection, one task: ns per pair, and the difference.
//!     The pool has far more idle connections than the loop can use up while sqlx's release
//!     task pings returned connections, so an acquire never waits.
//! (b) acquire + `SELECT 1` + release, 16 tasks over 8 connections: queries per second.
//!
//! Besides `WatchedPool`, both measure the bare pool given `instrument_options_named`'s hooks
//! (how a library-driven pool is watched: hook counters and the lifecycle ledger run on every
//! acquire and release).
//!
//! (c) the named hooks alone, beside the bare pool, at 8 and at 512 connections (`BENCH_HOOK_SIZES`,
//!     e.g. `8,512`; 8 and 32 in the quick run), 1 task (the acquiring thread's CPU added per
//!     acquire + release pair) and 16 tasks (pairs per second: the loss to contention), and
//!     sqlx's floor beside them: a pool whose three hooks do nothing. Its own server
//!     (`max_connections` 1,700: three pools of 512). `BENCH_ONLY_C` runs only this part.
//!
//! `WatchedPool` always keeps the call site of every checkout (for the exhaustion snapshot
//! and stranded slots), so both figures include that bookkeeping.
//!
//! The app's side is set up as in production: a Prometheus recorder with the recommended
//! buckets and an INFO `tracing` subscriber (the DEBUG spans are off). Rounds alternate
//! between variants so machine noise hits all of them. Each variant is compared with the bare
//! pool round by round; the figure is the median of those paired differences with a 95 %
//! bootstrap interval. A control (a second bare pool, measured the same way) shows what the
//! method reports when there is no difference: its interval is the noise floor. (a) also
//! reports the acquiring thread's own CPU time, which other processes on a shared machine do
//! not inflate: the figure to read against the 1 µs goal when the machine is loaded.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use poolwatch::sqlx;
use poolwatch::{Config, WatchedPool, instrument_pool};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const PAIRS: u32 = 2_000;
const ROUNDS: usize = 101;
const THROUGHPUT_ROUNDS: usize = 30;
const TASKS: usize = 16;
const CONNECTIONS: u32 = 8;
const THROUGHPUT_WINDOW: Duration = Duration::from_millis(500);

#[derive(Clone)]
enum Handle {
    Bare(PgPool),
    Watched(WatchedPool),
}

impl Handle {
    async fn pair(&self) {
        match self {
            Handle::Bare(p) => drop(p.acquire().await.expect("acquire")),
            Handle::Watched(p) => drop(p.acquire().await.expect("acquire")),
        }
    }

    async fn select_1(&self) {
        match self {
            Handle::Bare(p) => {
                let mut c = p.acquire().await.expect("acquire");
                sqlx::query("SELECT 1").execute(&mut *c).await.expect("select");
            }
            Handle::Watched(p) => {
                let mut c = p.acquire().await.expect("acquire");
                sqlx::query("SELECT 1").execute(&mut *c).await.expect("select");
            }
        }
    }
}

/// Wall ns, client CPU ns and the calling thread's CPU ns per acquire + release pair, one
/// round. The pairs run on the thread that calls `block_on`: its CPU time is the handle's own
/// work (sqlx's return-to-pool task, the same for every variant, runs on a worker), and, unlike
/// wall time, is not inflated by other processes taking the core.
async fn pairs(h: &Handle) -> (f64, f64, f64) {
    let (cpu, own) = (cpu_ns(), thread_cpu_ns());
    let started = Instant::now();
    for _ in 0..PAIRS {
        h.pair().await;
    }
    let wall = started.elapsed().as_nanos() as f64 / f64::from(PAIRS);
    let per = |ns: u64| ns as f64 / f64::from(PAIRS);
    (wall, per(cpu_ns() - cpu), per(thread_cpu_ns() - own))
}

/// CPU time of the calling thread so far, in ns (Linux).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time this process has used so far, every thread's (exited ones included: Tokio's
/// blocking threads come and go, so a sum over the live threads' schedstat can shrink), in ns.
fn cpu_ns() -> u64 {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which lives on this stack.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let us =
        |t: libc::timeval| u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0);
    (us(usage.ru_utime) + us(usage.ru_stime)) * 1_000
}

/// Queries per second with 16 tasks, and this process's CPU µs per query, one round.
async fn throughput(h: &Handle) -> (f64, f64) {
    let cpu = cpu_ns();
    let deadline = Instant::now() + THROUGHPUT_WINDOW;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    h.select_1().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    let cpu_us = (cpu_ns() - cpu) as f64 / 1000.0 / total as f64;
    (total as f64 / started.elapsed().as_secs_f64(), cpu_us)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A 95 % bootstrap interval of the median of `v` (2,000 resamples, fixed seed).
fn interval(v: &[f64]) -> (f64, f64) {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut medians: Vec<f64> =
        (0..2000).map(|_| median((0..v.len()).map(|_| v[(next() % v.len() as u64) as usize]).collect())).collect();
    medians.sort_by(f64::total_cmp);
    (medians[50], medians[1949])
}

/// A pool of `max` connections, all opened, and its watch. `test_before_acquire` is off for
/// (a) so an idle acquire does no I/O and the pair measures the handles themselves.
async fn watched_pair(
    cluster: &cluster::Cluster,
    max: u32,
    name: &str,
    leak: bool,
    test_before_acquire: bool,
) -> (PgPool, poolwatch::PoolWatch) {
    let options =
        PgPoolOptions::new().max_connections(max).test_before_acquire(test_before_acquire).min_connections(max);
    // "hooks": the bare pool as a library drives it, with the README's
    // `instrument_options_named` (hook counters and the lifecycle ledger on every acquire and
    // release).
    let options = if name.contains("hooks") { poolwatch::instrument_options_named(options, name) } else { options };
    let pool = options.connect_with(cluster.options()).await.expect("connect");
    let mut config = Config::new(name);
    config.leak_threshold = leak.then_some(Duration::from_secs(30));
    let watch = instrument_pool(&pool, config).expect("instrument");
    (pool, watch)
}

async fn warm(pool: &PgPool) {
    let conns: Vec<_> = futures_all(pool).await;
    drop(conns);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn futures_all(pool: &PgPool) -> Vec<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut v = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        v.push(pool.acquire().await.expect("warm"));
    }
    v
}

fn main() {
    if std::env::var_os("BENCH_NO_RECORDER").is_none() {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), poolwatch::catalog::SECONDS_BUCKETS)
            .expect("buckets")
            .install_recorder()
            .expect("recorder");
    }
    if std::env::var_os("BENCH_NO_SUBSCRIBER").is_none() {
        tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_writer(std::io::sink).init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // `cargo bench` passes `--bench`: the full run. Under `cargo test` (CI), a few rounds show
    // the bench still works; its figures then mean little.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds_a, rounds_b) = if full { (ROUNDS, THROUGHPUT_ROUNDS) } else { (5, 3) };
    rt.block_on(async {
        let cluster = cluster::Cluster::start();

        if std::env::var_os("BENCH_ONLY_C").is_some() {
            return hooks_by_size(full).await;
        }
        // (a) idle acquire + release.
        if std::env::var_os("BENCH_ONLY_B").is_none() {
        let (bare, _w0) = watched_pair(&cluster, 48, "bench_bare", false, false).await;
        let (plain, w1) = watched_pair(&cluster, 48, "bench_watched", false, false).await;
        let (leaky, w2) = watched_pair(&cluster, 48, "bench_leak", true, false).await;
        let (hooked, _w6) = watched_pair(&cluster, 48, "bench_hooks", false, false).await;
        for p in [&bare, &plain, &leaky, &hooked] {
            warm(p).await;
        }
        println!(
            "future sizes: PgPool::acquire {} B, WatchedPool::acquire {} B",
            std::mem::size_of_val(&bare.acquire()),
            std::mem::size_of_val(&w1.pool().acquire())
        );
        let variants = [
            ("bare PgPool", Handle::Bare(bare.clone())),
            ("WatchedPool", Handle::Watched(w1.pool())),
            ("WatchedPool + leak_threshold", Handle::Watched(w2.pool())),
            ("bare PgPool + named hooks", Handle::Bare(hooked.clone())),
            ("control: bare, 2nd pool", Handle::Bare(plain.clone())),
        ];
        for (_, h) in &variants {
            let _ = pairs(h).await; // warm-up
        }
        let mut rounds = vec![Vec::new(); variants.len()];
        let mut cpu = vec![Vec::new(); variants.len()];
        let mut own = vec![Vec::new(); variants.len()];
        for r in 0..rounds_a {
            for k in 0..variants.len() {
                let i = (r + k) % variants.len(); // rotate the order so drift hits all variants
                let (wall, cpu_ns, own_ns) = pairs(&variants[i].1).await;
                rounds[i].push(wall);
                cpu[i].push(cpu_ns);
                own[i].push(own_ns);
            }
        }
        println!("(a) acquire + release of an idle connection, 1 task, {PAIRS} pairs x {rounds_a} interleaved rounds");
        println!("    added = median of per-round differences to the bare pool [95 % interval]");
        for (i, (name, _)) in variants.iter().enumerate() {
            let added: Vec<f64> = rounds[i].iter().zip(&rounds[0]).map(|(w, b)| w - b).collect();
            let cpu_added: Vec<f64> = cpu[i].iter().zip(&cpu[0]).map(|(w, b)| w - b).collect();
            let (lo, hi) = interval(&added);
            let (clo, chi) = interval(&cpu_added);
            println!(
                "    {name:<32} median {:>6.0} ns/pair, added {:>+5.0} ns [{lo:+.0}, {hi:+.0}];  client CPU {:>6.0} ns/pair, added {:>+5.0} ns [{clo:+.0}, {chi:+.0}]",
                median(rounds[i].clone()),
                median(added),
                median(cpu[i].clone()),
                median(cpu_added),
            );
        }
        println!("    the acquiring thread's own CPU (immune to other processes taking the core):");
        for (i, (name, _)) in variants.iter().enumerate() {
            let added: Vec<f64> = own[i].iter().zip(&own[0]).map(|(w, b)| w - b).collect();
            let (lo, hi) = interval(&added);
            println!(
                "    {name:<32} median {:>6.0} ns/pair, added {:>+5.0} ns [{lo:+.0}, {hi:+.0}]",
                median(own[i].clone()),
                median(added)
            );
        }
        drop(variants);
        for p in [bare, plain, leaky, hooked] {
            p.close().await;
        }
        drop((w1, w2));
        }

        if std::env::var_os("BENCH_ONLY_A").is_some() {
            return;
        }
        // (b) 16 tasks, 8 connections, SELECT 1.
        let (bare, _w3) = watched_pair(&cluster, CONNECTIONS, "bench_bare_q", false, true).await;
        let (watched, w4) = watched_pair(&cluster, CONNECTIONS, "bench_watched_q", false, true).await;
        let (control, _w5) = watched_pair(&cluster, CONNECTIONS, "bench_control_q", false, true).await;
        let (hooked, _w7) = watched_pair(&cluster, CONNECTIONS, "bench_hooks_q", false, true).await;
        let variants = [
            ("bare PgPool", Handle::Bare(bare.clone())),
            ("WatchedPool", Handle::Watched(w4.pool())),
            ("bare PgPool + named hooks", Handle::Bare(hooked.clone())),
            ("control: bare, 2nd pool", Handle::Bare(control.clone())),
        ];
        for (_, h) in &variants {
            let _ = throughput(h).await; // warm-up
        }
        let mut rounds = vec![Vec::new(); variants.len()];
        let mut cpu = vec![Vec::new(); variants.len()];
        for r in 0..rounds_b {
            for k in 0..variants.len() {
                let i = (r + k) % variants.len();
                let (qps, cpu_us) = throughput(&variants[i].1).await;
                rounds[i].push(qps);
                cpu[i].push(cpu_us);
            }
        }
        println!(
            "(b) acquire + SELECT 1 + release, {TASKS} tasks over {CONNECTIONS} connections, {} ms x {rounds_b} rounds",
            THROUGHPUT_WINDOW.as_millis()
        );
        for (i, (name, _)) in variants.iter().enumerate() {
            let qps: Vec<String> = rounds[i].iter().map(|q| format!("{q:.0}")).collect();
            println!(
                "    {name:<30} median {:>8.0} queries/s, {:.2} µs client CPU/query   rounds: {}",
                median(rounds[i].clone()),
                median(cpu[i].clone()),
                qps.join(" ")
            );
        }
        for (i, (name, _)) in variants.iter().enumerate().skip(1) {
            let loss: Vec<f64> = rounds[i].iter().zip(&rounds[0]).map(|(w, b)| (1.0 - w / b) * 100.0).collect();
            let (lo, hi) = interval(&loss);
            let added: Vec<f64> = cpu[i].iter().zip(&cpu[0]).map(|(w, b)| (w - b) * 1000.0).collect();
            let (clo, chi) = interval(&added);
            println!(
                "    {name:<30} throughput loss vs bare {:+.2} % [{lo:+.2}, {hi:+.2}] (median of per-round pairs); client CPU added {:+.0} ns/query [{clo:+.0}, {chi:+.0}]",
                median(loss),
                median(added),
            );
        }
        bare.close().await;
        watched.close().await;
        control.close().await;
        hooked.close().await;
        drop(w4);
        drop(cluster);
        hooks_by_size(full).await;
    });
}

/// (c): the named hooks beside the bare pool at each size, 1 and 16 tasks, with sqlx's own
/// floor: the same three hooks doing nothing (what any hook costs inside sqlx: the connection's
/// metadata, two clock reads, and the boxed call), so the hooks' own share can be told apart.
async fn hooks_by_size(full: bool) {
    let sizes: Vec<u32> = std::env::var("BENCH_HOOK_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| if full { vec![8, 512] } else { vec![8, 32] });
    let (rounds_1, rounds_16) = if full { (61, 30) } else { (5, 3) };
    let cluster = cluster::Cluster::start_with(&[("max_connections", "1700")]);
    println!("(c) named hooks vs bare pool (no WatchedPool, no watch): the hooks' own cost by pool size");
    println!("    floor = the same hooks doing nothing (sqlx's own cost of having hooks)");
    const NAMES: [&str; 3] = ["bare", "floor", "hooks"];
    for size in sizes {
        let open = async |variant: usize| {
            let options = PgPoolOptions::new().max_connections(size).min_connections(size).test_before_acquire(false);
            let options = match variant {
                1 => noop_hooks(options),
                2 => poolwatch::instrument_options_named(options, &format!("bench_c_{size}")),
                _ => options,
            };
            let pool = options.connect_with(cluster.options()).await.expect("connect");
            warm(&pool).await;
            pool
        };
        let pools = [open(0).await, open(1).await, open(2).await];
        let variants: Vec<Handle> = pools.iter().map(|p| Handle::Bare(p.clone())).collect();
        for h in &variants {
            let _ = pairs(h).await;
        }
        let mut own = [Vec::new(), Vec::new(), Vec::new()];
        for r in 0..rounds_1 {
            for k in 0..3 {
                let i = (r + k) % 3;
                own[i].push(pairs(&variants[i]).await.2);
            }
        }
        for (v, base) in [(1, 0), (2, 0), (2, 1)] {
            let added: Vec<f64> = own[v].iter().zip(&own[base]).map(|(h, b)| h - b).collect();
            let (lo, hi) = interval(&added);
            println!(
                "    {size:>4} connections, 1 task:   {:<5} {:>6.0} ns/pair, {} added {:>+5.0} ns over {} of the acquiring thread's CPU [{lo:+.0}, {hi:+.0}]",
                NAMES[base],
                median(own[base].clone()),
                NAMES[v],
                median(added),
                NAMES[base],
            );
        }
        let mut rate = [Vec::new(), Vec::new(), Vec::new()];
        for r in 0..rounds_16 {
            for k in 0..3 {
                let i = (r + k) % 3;
                rate[i].push(pair_rate(&variants[i]).await);
            }
        }
        for (v, base) in [(1, 0), (2, 0), (2, 1)] {
            let loss: Vec<f64> = rate[v].iter().zip(&rate[base]).map(|(h, b)| (1.0 - h / b) * 100.0).collect();
            let (lo, hi) = interval(&loss);
            println!(
                "    {size:>4} connections, {TASKS} tasks: {:<5} {:>8.0} pairs/s, {}' throughput loss {:+.2} % [{lo:+.2}, {hi:+.2}]",
                NAMES[base],
                median(rate[base].clone()),
                NAMES[v],
                median(loss)
            );
        }
        for p in pools {
            p.close().await;
        }
    }
}

/// The three hooks `instrument_options_named` sets, doing nothing, with futures that need no
/// allocation: what sqlx itself spends on a pool that has hooks.
fn noop_hooks(options: PgPoolOptions) -> PgPoolOptions {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    struct Ready<T>(std::marker::PhantomData<T>);
    impl Future for Ready<()> {
        type Output = Result<(), sqlx::Error>;
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Ready(Ok(()))
        }
    }
    impl Future for Ready<bool> {
        type Output = Result<bool, sqlx::Error>;
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Ready(Ok(true))
        }
    }
    options
        .after_connect(|_conn, _meta| Box::pin(Ready::<()>(std::marker::PhantomData)))
        .before_acquire(|_conn, _meta| Box::pin(Ready::<bool>(std::marker::PhantomData)))
        .after_release(|_conn, _meta| Box::pin(Ready::<bool>(std::marker::PhantomData)))
}

/// Acquire + release pairs per second with 16 tasks, one round.
async fn pair_rate(h: &Handle) -> f64 {
    let deadline = Instant::now() + THROUGHPUT_WINDOW;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    h.pair().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}
