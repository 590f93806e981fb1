//! Per-address reachability (incident 4) on real loopback sockets: a listening address is up,
//! a refused one is down at once, one whose SYNs are dropped is down after the timeout (and
//! the probe does not hang), through the watched pool's exported metrics and the plain
//! figures.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use poolwatch::reach::{probe_addresses, probe_host};
use poolwatch::sqlx;
use poolwatch::{Cause, Config, Detail, instrument_pool};
use socket2::{Domain, Socket, Type};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use support::cluster::free_port;
use support::{Cluster, POOL, eventually, metric, recorder};

const ADDRESS: &str = "server_address";
const UP: &str = "poolwatch_server_address_up";
const CONNECT: &str = "poolwatch_server_address_connect_seconds";
const RESOLVED: &str = "poolwatch_server_addresses";

/// A loopback listener that never accepts, with an accept backlog of 0 filled by connections
/// that are never accepted: the kernel drops the next SYN, so a connect to it hangs (the
/// "blackholed address" of incident 4).
struct Blackhole {
    _listener: Socket,
    _queued: Vec<TcpStream>,
    address: SocketAddr,
}

impl Blackhole {
    fn new() -> Blackhole {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).expect("bind");
        listener.listen(0).expect("listen");
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        for _ in 0..64 {
            match TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Blackhole { _listener: listener, _queued: queued, address };
                }
                Err(e) => panic!("filling the backlog of {address}: {e}"),
            }
        }
        panic!("the accept backlog of {address} never filled after 64 connections")
    }
}

/// A loopback address where nothing listens: 127.0.0.2 (all of 127/8 is loopback) on a port
/// free on 127.0.0.1.
fn refused_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], free_port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_is_up_refused_is_down_at_once_blackholed_is_down_after_the_timeout() {
    let listening = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listening.local_addr().unwrap();
    let refused = refused_address();
    let blackhole = Blackhole::new();
    let timeout = Duration::from_millis(1000);

    let started = Instant::now();
    // A hang guard only (a probe never waits past its timeout per address): no timing asserted.
    let figures =
        tokio::time::timeout(Duration::from_secs(120), probe_addresses(&[up, refused, blackhole.address], timeout))
            .await
            .expect("the probe hung");
    let took = started.elapsed();
    println!("probe of 3 addresses took {took:?}: {figures:#?}");

    assert_eq!(figures.iter().map(|f| f.address).collect::<Vec<_>>(), [up, refused, blackhole.address]);
    let (ok, no, hang) = (figures[0], figures[1], figures[2]);
    assert!(ok.up && ok.error.is_none(), "{ok:?}");
    assert!(ok.connect_time > Duration::ZERO && ok.connect_time < timeout, "{ok:?}");
    assert!(!no.up && no.error == Some(Cause::Refused), "{no:?}");
    assert!(no.connect_time < timeout, "a refused connect fails before the timeout: {no:?}");
    assert!(!hang.up && hang.error == Some(Cause::TimedOut), "{hang:?}");
    assert!(hang.connect_time >= timeout, "{hang:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_resolves_and_each_address_is_probed() {
    let listening = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listening.local_addr().unwrap().port();
    let reach = probe_host("localhost", port, Duration::from_secs(2)).await;
    println!("localhost: {reach:?}");
    assert_eq!(reach.resolve_error, None);
    assert!(reach.resolved >= 1 && reach.addresses.len() == reach.resolved, "{reach:?}");
    let v4 = reach.get(SocketAddr::from(([127, 0, 0, 1], port))).expect("localhost resolves to 127.0.0.1");
    assert!(v4.up, "{v4:?}");
    // Any other address (::1) has nothing listening on that port.
    assert_eq!(reach.up(), 1, "{reach:?}");
}

/// The watched pool at 127.0.0.1 is up with a connect time; pointed at a refused address and
/// then at a blackholed one, the new address reads down and the old one leaves the figures
/// (NaN series); the census keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_pool_exports_each_address_up_down_and_connect_time() {
    recorder();
    let cluster = Cluster::start();
    let options = cluster.options();
    let pool = PgPoolOptions::new().max_connections(4).connect_with(options.clone()).await.unwrap();
    let timeout = Duration::from_millis(500);
    // Per-address series are exported at Detail::Full only.
    let config = Config::new("reach")
        .detail(Detail::Full)
        .sample_interval(Duration::from_millis(100))
        .census_interval(Duration::from_millis(200))
        .reach_interval(Duration::from_millis(200))
        .census_timeout(timeout);
    let watch = instrument_pool(&pool, config).unwrap();
    let server = format!("127.0.0.1:{}", cluster.port());
    let get = |name: &str, address: &str| metric(name, &[(POOL, "reach"), (ADDRESS, address)]);

    // 1. The real server: up, with a connect time.
    let connect = eventually(Duration::from_secs(10), "the server address is probed up", async || {
        (get(UP, &server) == Some(1.0)).then(|| get(CONNECT, &server)).flatten()
    })
    .await;
    assert!(connect > 0.0 && connect < timeout.as_secs_f64(), "connect time {connect}");
    assert_eq!(metric(RESOLVED, &[(POOL, "reach")]), Some(1.0));
    let reach = watch.reachability();
    assert_eq!(reach.resolved, 1, "{reach:?}");
    assert!(reach.addresses[0].up && reach.addresses[0].connect_time > Duration::ZERO, "{reach:?}");
    println!("server address up, TCP connect {:.3} ms", connect * 1e3);

    // 2. The host now points where nothing listens: down at once, the old address has no value.
    let refused = refused_address();
    pool.set_connect_options(options.clone().host("127.0.0.2").port(refused.port()));
    let refused_s = refused.to_string();
    let connect = eventually(Duration::from_secs(10), "the refused address is probed down", async || {
        (get(UP, &refused_s) == Some(0.0)).then(|| get(CONNECT, &refused_s)).flatten()
    })
    .await;
    assert!(connect < timeout.as_secs_f64() / 2.0, "refused is fast: {connect}");
    let old = get(UP, &server).expect("the old address keeps its series");
    assert!(old.is_nan(), "an address that left the answer reads NaN, not a stale 1: {old}");
    let reach = watch.reachability();
    assert_eq!(reach.addresses.len(), 1, "{reach:?}");
    assert_eq!(reach.addresses[0].error, Some(Cause::Refused), "{reach:?}");
    println!("refused address down after {:.3} ms", connect * 1e3);

    // 3. A blackholed address: down after census_timeout; the census is not held up.
    let blackhole = Blackhole::new();
    pool.set_connect_options(options.clone().port(blackhole.address.port()));
    let hole = blackhole.address.to_string();
    let connect = eventually(Duration::from_secs(10), "the blackholed address is probed down", async || {
        (get(UP, &hole) == Some(0.0)).then(|| get(CONNECT, &hole)).flatten()
    })
    .await;
    assert!(connect >= timeout.as_secs_f64() && connect < timeout.as_secs_f64() + 1.0, "timed out: {connect}");
    assert!(get(UP, &refused_s).is_some_and(f64::is_nan));
    assert_eq!(watch.reachability().addresses[0].error, Some(Cause::TimedOut));
    println!("blackholed address down after {:.3} ms", connect * 1e3);
    let census = watch.census_now().await.expect("the census runs on its own connection");
    assert!(census.census_up);
    let census_seconds = metric("poolwatch_census_duration_seconds", &[(POOL, "reach")]).unwrap();
    assert!(census_seconds < timeout.as_secs_f64(), "the probes do not lengthen the census: {census_seconds}");
    println!("census with a blackholed address: {:.3} ms", census_seconds * 1e3);

    watch.shutdown().await;
    pool.close().await;
}

/// A host given by name (`localhost`) is resolved by the watch and its address exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_pool_at_localhost_resolves_the_name() {
    recorder();
    let cluster = Cluster::start();
    let options = cluster.options().host("localhost");
    let pool = PgPoolOptions::new().max_connections(2).connect_with(options).await.unwrap();
    let config = Config::new("reach_localhost").detail(Detail::Full).census_interval(Duration::from_millis(200));
    // The first census is followed by a probe at once (no reach_interval needed).
    let watch = instrument_pool(&pool, config).unwrap();
    let server = format!("127.0.0.1:{}", cluster.port());
    let labels = [(POOL, "reach_localhost"), (ADDRESS, server.as_str())];
    eventually(Duration::from_secs(10), "localhost's 127.0.0.1 is probed up", async || {
        (metric(UP, &labels) == Some(1.0)).then_some(())
    })
    .await;
    let resolved = metric(RESOLVED, &[(POOL, "reach_localhost")]).unwrap();
    let reach = watch.reachability();
    assert!(resolved >= 1.0 && resolved == reach.resolved as f64, "{resolved} vs {reach:?}");
    assert!(metric(CONNECT, &labels).is_some_and(|s| s > 0.0));
    watch.shutdown().await;
}

/// A unix-socket host has no addresses: nothing is probed or exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_hosts_are_not_probed() {
    recorder();
    let dir = support::cluster::temp_dir("reach-socket");
    let options = PgConnectOptions::new_without_pgpass().socket(&dir).username("postgres");
    let pool = PgPoolOptions::new().connect_lazy_with(options);
    let config = Config::new("reach_unix").census_interval(Duration::from_millis(100));
    let watch = instrument_pool(&pool, config).unwrap();
    // The census fails (no server), so ticks are known to have passed; the probe ran after each.
    eventually(Duration::from_secs(10), "two failed censuses", async || {
        (support::metric_sum("poolwatch_census_errors_total", &[(POOL, "reach_unix")]) >= 2.0).then_some(())
    })
    .await;
    assert_eq!(watch.reachability(), poolwatch::reach::Reachability::default());
    assert_eq!(metric(RESOLVED, &[(POOL, "reach_unix")]), None);
    watch.shutdown().await;
    std::fs::remove_dir_all(dir).ok();
}
