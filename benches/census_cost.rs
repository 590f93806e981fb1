//! What the server pays for watching: one server census at 10, 200 and 1,000 other backends
//! (wall time and the server's CPU time), one reachability probe (the backend the server
//! forks for it), and the projection to 1,000 replicas at the default cadence.
//!
//! `cargo bench --bench census_cost` (root, or a user that may read the server's
//! `/proc/<pid>/stat`). Server CPU is read from the kernel: the census backend's
//! `/proc/<pid>/schedstat` (ns) before and after N censuses; a probe's backend lives a few ms,
//! so its CPU is the postmaster's own plus its reaped children's (`/proc/<pid>/stat`, clock
//! ticks) over N probes. Under `cargo test` it runs a quick smoke pass.
//!
//! `CENSUS_COST_STEADY=<seconds>`: only the steady state of one quiet replica at the default
//! `Config` (one pool, no traffic), counted on the server over that many seconds after
//! `CENSUS_COST_WARMUP` (15 s; 420 s lets the settings re-read reach its stretch): backends
//! started, statements (`pg_stat_statements`), the server CPU of the watch's backends, and one
//! `SELECT 1` against one protocol-level ping (what the heartbeats could send instead).
//!
//! Each whole-census figure is followed by its phases (wall time per census, from the census's
//! trace spans): `list` (the socket list before the queries: while the pool is steady a
//! `lookup` of each of its sockets by address pair, else a netlink `dump`, and an `fd_walk` of
//! `/proc/self/fd` when a socket not seen before shows up), `sql` (the session-end counters
//! and the census query, round trips included), `settle` (the ledger of ended sessions),
//! `attribution` (the pool's ports learnt), and the sample that follows (`census_now` =
//! census + sample). `dump`, `lookup` and `fd_walk` are counted inside the phase that ran them.
//!
//! Then the census through a real PgBouncer with the pooler census (`pooler_admin`: `SHOW
//! CLIENTS` + `SHOW POOLS` on the admin console, 200 other clients on the pooler).

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/pgbouncer.rs"]
mod pgbouncer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolwatch::reach::probe_addresses;
use poolwatch::sqlx;
use poolwatch::{Config, instrument_pool};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};

const REPLICAS: f64 = 1000.0;

/// Wall time of the census's phases, from its trace spans (`poolwatch.census` and
/// `poolwatch.census.phase`).
mod phases {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing_subscriber::layer::{Context, Layer};
    use tracing_subscriber::registry::LookupSpan;

    static TOTALS: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());

    struct Started(String, Instant);

    #[derive(Default)]
    struct PhaseName(Option<String>);

    impl Visit for PhaseName {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "phase" {
                self.0 = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    pub struct Phases;

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Phases {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let name = match attrs.metadata().name() {
                "poolwatch.census" => Some("census".to_owned()),
                "poolwatch.census.phase" => {
                    let mut v = PhaseName::default();
                    attrs.record(&mut v);
                    v.0
                }
                _ => None,
            };
            if let (Some(name), Some(span)) = (name, ctx.span(id)) {
                span.extensions_mut().insert(Started(name, Instant::now()));
            }
        }

        fn on_close(&self, id: Id, ctx: Context<'_, S>) {
            let Some(span) = ctx.span(&id) else { return };
            if let Some(Started(name, at)) = span.extensions_mut().remove::<Started>() {
                let mut totals = TOTALS.lock().unwrap();
                let e = totals.entry(name).or_default();
                e.0 += 1;
                e.1 += at.elapsed();
            }
        }
    }

    pub fn install() {
        use tracing_subscriber::layer::SubscriberExt;
        let filter = tracing_subscriber::filter::Targets::new().with_target("poolwatch", tracing::Level::TRACE);
        let subscriber = tracing_subscriber::registry().with(Phases.with_filter(filter));
        tracing::subscriber::set_global_default(subscriber).unwrap();
    }

    pub fn reset() {
        TOTALS.lock().unwrap().clear();
    }

    /// Prints each phase's wall time per census (and how many times it ran per census).
    pub fn print(censuses: usize, whole_ms: f64) {
        let totals = std::mem::take(&mut *TOTALS.lock().unwrap());
        let per = |name: &str| totals.get(name).map_or(0.0, |(_, d)| d.as_secs_f64() * 1e3 / censuses as f64);
        let census = per("census");
        let mut line = format!("       phases (mean ms per census): census {census:.3} =");
        for name in ["list", "sql", "settle", "attribution"] {
            line += &format!(" {name} {:.3}", per(name));
        }
        line += &format!(
            " + rest {:.3}",
            census - ["list", "sql", "settle", "attribution"].iter().map(|n| per(n)).sum::<f64>()
        );
        line += &format!("; sample {:.3}", whole_ms - census);
        println!("{line}");
        let mut inner = String::from("       inside them:");
        for name in ["dump", "lookup", "fd_walk"] {
            let (n, d) = totals.get(name).copied().unwrap_or_default();
            inner += &format!(
                " {name} {:.3} ms ({:.1} per census)",
                d.as_secs_f64() * 1e3 / censuses as f64,
                n as f64 / censuses as f64
            );
        }
        println!("{inner}");
    }
}

#[tokio::main]
async fn main() {
    phases::install();
    let full = std::env::args().any(|a| a == "--bench");
    if let Some(secs) = std::env::var("CENSUS_COST_STEADY").ok().and_then(|s| s.parse().ok()) {
        steady_state(Duration::from_secs(secs)).await;
        return;
    }
    let (steps, rounds, probes): (&[usize], usize, usize) =
        if full { (&[10, 200, 1000], 300, 300) } else { (&[10], 5, 5) };
    // `CENSUS_COST_STEPS=1000 CENSUS_COST_ROUNDS=100`: one step, fewer rounds (a shared machine).
    let only: Vec<usize> = std::env::var("CENSUS_COST_STEPS")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    let steps: &[usize] = if only.is_empty() { steps } else { &only };
    let rounds = std::env::var("CENSUS_COST_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(rounds);
    let cluster = cluster::Cluster::start_with(&[("max_connections", "1100")]);
    let defaults = Config::new("bench");
    let pool =
        PgPoolOptions::new().max_connections(5).min_connections(5).connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("bench").census_interval(Duration::from_secs(3600))).unwrap();
    watch.census_now().await.unwrap();
    let mut probe = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let census_pid: i32 =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = 'poolwatch-census:bench'")
            .fetch_one(&mut probe)
            .await
            .unwrap();
    let app_name = watch.application_name().to_owned();
    println!("server cost of watching ({rounds} censuses per step; watched pool of 5; PostgreSQL on loopback):");
    println!("  load: {}", uptime());

    let mut idle = Vec::new();
    let mut census_cpu_at_1000 = 0.0;
    for &backends in steps {
        while idle.len() < backends {
            idle.push(PgConnection::connect_with(&cluster.options()).await.unwrap());
        }
        for _ in 0..rounds.min(20) {
            watch.census_now().await.unwrap();
        }
        let cpu_before = schedstat_ns(census_pid);
        let mut ms = Vec::with_capacity(rounds);
        phases::reset();
        for _ in 0..rounds {
            let t = Instant::now();
            watch.census_now().await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let server_ms = (schedstat_ns(census_pid) - cpu_before) as f64 / 1e6 / rounds as f64;
        census_cpu_at_1000 = server_ms;
        let mean = ms.iter().sum::<f64>() / rounds as f64;
        report(&format!("  {backends:>4} other backends, whole census (+ a sample):"), ms);
        phases::print(rounds, mean);
        println!("  {backends:>4} other backends, census server CPU: {server_ms:.3} ms per census");
        beside_descriptors(&watch, backends, rounds).await;
        query_alone(&mut probe, &app_name, backends, rounds).await;
    }
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.server.map(|c| c.total()), Some(5), "the census counts only the watched pool");
    drop(idle);
    // The other backends exit and are reaped before the probes are measured: their CPU would
    // count in the postmaster's children's time.
    for _ in 0..600 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
            .fetch_one(&mut probe)
            .await
            .unwrap();
        if n <= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The reachability probe: a TCP connect the postmaster forks a backend for.
    let server = SocketAddr::from(([127, 0, 0, 1], cluster.port()));
    let postmaster = parent_pid(census_pid);
    let before = process_cpu_with_children_ms(postmaster);
    let t = Instant::now();
    for _ in 0..probes {
        let r = probe_addresses(&[server], Duration::from_secs(5)).await;
        assert!(r[0].up, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = t.elapsed().as_secs_f64() * 1e3 / probes as f64;
    // Let the last forked backends exit and be reaped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe_ms = (process_cpu_with_children_ms(postmaster) - before) / probes as f64;
    println!(
        "  reachability probe, 1 address: server CPU {probe_ms:.2} ms per probe (postmaster + forked backend), {wall:.2} ms per round incl. a 10 ms pause"
    );

    // The direct heartbeat's SELECT 1 on the dedicated connection, for scale.
    let my_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut probe).await.unwrap();
    let before = schedstat_ns(my_pid);
    for _ in 0..rounds {
        sqlx::query("SELECT 1").execute(&mut probe).await.unwrap();
    }
    let select1_ms = (schedstat_ns(my_pid) - before) as f64 / 1e6 / rounds as f64;
    println!("  direct heartbeat SELECT 1: server CPU {select1_ms:.3} ms each");

    let census_every = defaults.census_interval.as_secs_f64();
    let reach_every = defaults.reach_interval.as_secs_f64();
    let per_replica = census_cpu_at_1000 / 1e3 / census_every + probe_ms / 1e3 / reach_every;
    let heartbeat = select1_ms / 1e3 / defaults.heartbeat_interval.as_secs_f64();
    println!(
        "projected server CPU, {REPLICAS} replicas at the defaults (census every {census_every} s ±20 %, probe every {reach_every} s ±20 %):"
    );
    println!(
        "  census + probes: {:.4} cores ({:.4} census + {:.4} probes); the old cadence (census every 15 s, a probe after each): {:.3} cores",
        per_replica * REPLICAS,
        census_cpu_at_1000 / 1e3 / census_every * REPLICAS,
        probe_ms / 1e3 / reach_every * REPLICAS,
        (census_cpu_at_1000 + probe_ms) / 1e3 / 15.0 * REPLICAS,
    );
    println!(
        "  besides: the direct heartbeat's SELECT 1 every {} s: {:.4} cores",
        defaults.heartbeat_interval.as_secs(),
        heartbeat * REPLICAS
    );
    println!("  load: {}", uptime());
    through_the_pooler(&cluster, if full { 200 } else { 10 }, rounds).await;
}

/// One row of the census's result.
type CensusRow = (Option<String>, Option<i32>, Option<f64>, bool, i64);

/// The census's SQL alone, on a plain connection, with its server CPU.
async fn query_alone(conn: &mut PgConnection, app_name: &str, backends: usize, rounds: usize) {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
    // The `$2` port keys of a pool of 5 matched by port.
    let keys: Vec<String> = (0..5).map(|i| format!("127.0.0.1 {}", 40000 + i)).collect();
    for (what, sql) in [
        ("the census SQL", poolwatch::CENSUS_SQL),
        (
            "counts only",
            "SELECT state, client_port, 0::float8, false, 0::int8 FROM pg_stat_activity WHERE application_name = $1 AND $2::text[] IS NOT NULL",
        ),
    ] {
        let before = schedstat_ns(pid);
        let mut ms = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let _: Vec<CensusRow> = sqlx::query_as(sql).bind(app_name).bind(&keys).fetch_all(&mut *conn).await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let cpu = (schedstat_ns(pid) - before) as f64 / 1e6 / rounds as f64;
        report(&format!("  {backends:>4} other backends, {what} alone (server CPU {cpu:.3} ms):"), ms);
    }
}

/// The whole census again with 1,000 more open descriptors in the process (500 loopback
/// connections, both ends), as in a big app: the client side of a census must not grow with
/// them (no `/proc/self/fd` walk for sockets it already knows).
async fn beside_descriptors(watch: &poolwatch::PoolWatch, backends: usize, rounds: usize) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let held: Vec<_> = (0..500)
        .map(|_| {
            let client = std::net::TcpStream::connect(address).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    for _ in 0..rounds.min(20) {
        watch.census_now().await.unwrap();
    }
    let mut ms = Vec::with_capacity(rounds);
    phases::reset();
    for _ in 0..rounds {
        let t = Instant::now();
        watch.census_now().await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = ms.iter().sum::<f64>() / rounds as f64;
    report(&format!("  {backends:>4} other backends + 1,000 open descriptors, whole census (+ a sample):"), ms);
    phases::print(rounds, mean);
    drop(held);
}

/// Opens the pool's 5 connections and returns them to the pool.
async fn fill(pool: &sqlx::PgPool) {
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.acquire().await.unwrap());
    }
}

/// The census through PgBouncer with `pooler_admin`, and the admin console's two SHOWs alone.
async fn through_the_pooler(cluster: &cluster::Cluster, clients: usize, rounds: usize) {
    let bouncer = pgbouncer::PgBouncer::start(cluster.port(), &[("max_client_conn", "400")]);
    let pool = PgPoolOptions::new().max_connections(5).min_connections(5).connect_lazy_with(bouncer.options());
    let config = Config::new("bench_pooler")
        .census_interval(Duration::from_secs(3600))
        .direct_connect_options(cluster.options())
        .pooler_admin(bouncer.admin_url());
    let watch = instrument_pool(&pool, config).unwrap();
    fill(&pool).await;
    assert_eq!(watch.census_now().await.unwrap().phantom, Some(0), "the pooler census matches every connection");
    let mut admin = PgConnection::connect_with(&bouncer.admin_options()).await.unwrap();
    println!("through PgBouncer (transaction mode) with pooler_admin, watched pool of 5:");
    measure(&watch, "pooler clients", 0, rounds).await;
    shows_alone(&mut admin, 0, rounds).await;
    let mut others = Vec::new();
    for _ in 0..clients {
        others.push(PgConnection::connect_with(&bouncer.options()).await.unwrap());
    }
    measure(&watch, "pooler clients", clients, rounds).await;
    shows_alone(&mut admin, clients, rounds).await;
    let s = watch.census_now().await.unwrap();
    assert_eq!(s.pooler.map(|p| p.clients), Some(5), "the pooler census counts only the watched pool");
    assert_eq!(s.phantom, Some(0));
}

async fn shows_alone(admin: &mut PgConnection, clients: usize, rounds: usize) {
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        admin.execute(sqlx::raw_sql("SHOW CLIENTS")).await.unwrap();
        admin.execute(sqlx::raw_sql("SHOW POOLS")).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {clients:>3} other pooler clients, SHOW CLIENTS + SHOW POOLS alone:"), ms);
}

async fn measure(watch: &poolwatch::PoolWatch, what: &str, backends: usize, rounds: usize) {
    for _ in 0..rounds.min(20) {
        watch.census_now().await.unwrap();
    }
    let mut ms: Vec<f64> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        watch.census_now().await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("  {backends:>3} other {what}, whole census:"), ms);
}

/// Nanoseconds on CPU of a process (first field of `/proc/<pid>/schedstat`).
fn schedstat_ns(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("read schedstat (run as root)");
    text.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat field")
}

/// utime + stime + cutime + cstime of a process, in ms.
fn process_cpu_with_children_ms(pid: i32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &text[text.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14-17 of stat; after the comm field the index is 11-14.
    let ticks: u64 = f[11..15].iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
    ticks as f64 * 1000.0 / 100.0 // USER_HZ
}

fn parent_pid(pid: i32) -> i32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &text[text.rfind(')').expect("comm") + 2..];
    after_comm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("ppid")
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| format!("load average {}", l.split_whitespace().take(3).collect::<Vec<_>>().join(", ")))
        .unwrap_or_default()
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("{what} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms", pct(0.5), pct(0.99));
}

/// Statement text → (calls, total execution ms), from `pg_stat_statements`.
async fn statements(admin: &mut PgConnection) -> std::collections::BTreeMap<String, (i64, f64)> {
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT regexp_replace(left(query, 70), '\\s+', ' ', 'g'), calls, total_exec_time FROM pg_stat_statements \
         WHERE query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_stat_activity WHERE application_name IN%'",
    )
    .fetch_all(admin)
    .await
    .unwrap();
    let mut by_text = std::collections::BTreeMap::new();
    for (text, calls, ms) in rows {
        let e: &mut (i64, f64) = by_text.entry(text).or_default();
        (e.0, e.1) = (e.0 + calls, e.1 + ms);
    }
    by_text
}

/// The pids of the watch's backends: the pool's connections and poolwatch's own.
async fn watch_pids(admin: &mut PgConnection, tag: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name IN ($1, 'poolwatch-census:steady')")
        .bind(tag)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// One quiet replica at the defaults, counted on the server (see the module docs).
async fn steady_state(span: Duration) {
    let cluster = cluster::Cluster::start_with(&[("shared_preload_libraries", "pg_stat_statements")]);
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    admin.execute("CREATE EXTENSION pg_stat_statements").await.unwrap();
    println!("steady state of one quiet replica at the defaults ({}), over {span:?}:", uptime());
    // One SELECT 1 against one ping (a Sync message: no statement), on a backend of its own.
    let mut c = PgConnection::connect_with(&cluster.options()).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut c).await.unwrap();
    for round in 0..2 {
        let before = schedstat_ns(pid);
        for _ in 0..5000 {
            c.execute(sqlx::raw_sql("SELECT 1")).await.unwrap();
        }
        let select1 = (schedstat_ns(pid) - before) as f64 / 5e3 / 1e3;
        let before = schedstat_ns(pid);
        for _ in 0..5000 {
            c.ping().await.unwrap();
        }
        let ping = (schedstat_ns(pid) - before) as f64 / 5e3 / 1e3;
        println!(
            "  round {round}: server CPU per SELECT 1 {select1:.1} µs, per ping (Sync) {ping:.1} µs (back to back)"
        );
    }
    // Spaced out as the heartbeats are (here one a second): each finds the backend's caches cold.
    for _ in 0..2 {
        for what in ["SELECT 1", "ping"] {
            let mut ns = 0u64;
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let before = schedstat_ns(pid);
                if what == "ping" {
                    c.ping().await.unwrap();
                } else {
                    c.execute(sqlx::raw_sql("SELECT 1")).await.unwrap();
                }
                ns += schedstat_ns(pid) - before;
            }
            println!("  spaced 1 s apart: server CPU per {what} {:.1} µs", ns as f64 / 20.0 / 1e3);
        }
    }
    drop(c);
    let pool = PgPoolOptions::new().connect_with(cluster.options()).await.unwrap();
    let watch = instrument_pool(&pool, Config::new("steady")).unwrap();
    let tag = watch.application_name().to_owned();
    while watch.server_settings().is_none() || watch.heartbeat().pool.successes < 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Start-up (the lint's session, the first census and probe, the pool's connection) is
    // over; `CENSUS_COST_WARMUP=<seconds>` waits longer, until the re-read has stretched too.
    let warmup = std::env::var("CENSUS_COST_WARMUP").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let pids = watch_pids(&mut admin, &tag).await;
    let cpu = |pids: &[i32]| pids.iter().map(|p| schedstat_ns(*p)).sum::<u64>();
    let postmaster = parent_pid(pids[0]);
    let (cpu0, forks0) = (cpu(&pids), process_cpu_with_children_ms(postmaster));
    let cpu0_each: Vec<u64> = pids.iter().map(|p| schedstat_ns(*p)).collect();
    let sessions0: i64 =
        sqlx::query_scalar("SELECT sum(sessions)::bigint FROM pg_stat_database").fetch_one(&mut admin).await.unwrap();
    let statements0 = statements(&mut admin).await;
    tokio::time::sleep(span).await;
    let statements1 = statements(&mut admin).await;
    let sessions1: i64 =
        sqlx::query_scalar("SELECT sum(sessions)::bigint FROM pg_stat_database").fetch_one(&mut admin).await.unwrap();
    assert_eq!(watch_pids(&mut admin, &tag).await, pids, "the watch's backends stayed the same");
    let (cpu1, forks1) = (cpu(&pids), process_cpu_with_children_ms(postmaster));
    let per_hour = 3600.0 / span.as_secs_f64();
    for (pid, (before, after)) in pids.iter().zip(cpu0_each.iter().zip(pids.iter().map(|p| schedstat_ns(*p)))) {
        let name: String = sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        println!("  backend {name}: {:.1} ms per hour", (after - before) as f64 / 1e6 * per_hour);
    }
    println!("  the watch's backends: {} (the pool's and poolwatch's own)", pids.len());
    println!("  backends started: {:.1} per hour", (sessions1 - sessions0) as f64 * per_hour);
    for (text, (calls, ms)) in &statements1 {
        let (c0, ms0) = statements0.get(text).copied().unwrap_or_default();
        if calls > &c0 {
            let n = (calls - c0) as f64;
            println!("  {:>7.0} per hour, {:.3} ms exec each: {text}", n * per_hour, (ms - ms0) / n);
        }
    }
    let backend_ms = (cpu1 - cpu0) as f64 / 1e6;
    let us_per_s = backend_ms * 1e3 / span.as_secs_f64();
    println!(
        "  server CPU of the watch's backends: {:.1} ms per hour = {us_per_s:.2} µs/s per replica: {:.4} core for 1,000 replicas, {:.3} for 10,000",
        backend_ms * per_hour,
        us_per_s * 1e-3,
        us_per_s * 1e-2
    );
    // Coarse (clock ticks), and it counts the server's own children too (autovacuum workers).
    println!("  postmaster + reaped children: {:.1} ms per hour", (forks1 - forks0) * per_hour);
    println!("  load after: {}", uptime());
}
